"""PCI function behaviour seen through config space on the host bus."""
import pytest

from chimney import hw
from chimney.device.pci import CAP_PCIE, PCI_COMMAND, CMD_MASTER, CMD_MEMORY
from chimney.guest.bus.vfio_user import VfioUserBus
from chimney.guest.miniport import Miniport

from conftest import check_stopped_cleanly, start_device


@pytest.fixture
def mp(tmp_path):
    dev = start_device(tmp_path)
    bus = VfioUserBus(dev.socket)
    m = Miniport(bus, ring_size=16)
    m.up()
    yield m
    bus.close()
    check_stopped_cleanly(dev)


def test_flr_is_advertised_and_resets_the_function(mp):
    bus = mp.bus
    devcap = bus.config_read(CAP_PCIE + 4, 4)
    assert devcap & (1 << 28), "DevCap must advertise FLR (Linux then resets with FLR, not a bus reset)"
    bus.config_write(PCI_COMMAND, 2, CMD_MEMORY | CMD_MASTER)
    mp.wr(hw.REG_MAC_LO, 0x44332211)
    assert mp.rd(hw.REG_STATUS) & hw.STATUS_ENABLED
    assert mp.rd(hw.qreg(hw.TXQ_FIRST, "Q_STATUS")) & hw.QSTATUS_ENABLED

    devctl = bus.config_read(CAP_PCIE + 8, 2)
    bus.config_write(CAP_PCIE + 8, 2, devctl | 0x8000)          # initiate FLR

    assert not bus.config_read(CAP_PCIE + 8, 2) & 0x8000, "initiate-FLR reads back as 0"
    assert not bus.config_read(PCI_COMMAND, 2) & CMD_MASTER, "FLR clears bus master"
    assert not mp.rd(hw.REG_STATUS) & hw.STATUS_ENABLED
    assert mp.rd(hw.qreg(hw.TXQ_FIRST, "Q_STATUS")) == 0
    assert mp.rd(hw.REG_MAC_LO) != 0x44332211, "the MAC returns to its permanent value"
    # The function comes back up as new.
    mp.up()
    mp.send(bytes.fromhex("ffffffffffff02c41e00000188b5") + bytes(50))
    assert mp.flush_tx(2)
