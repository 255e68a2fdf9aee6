"""QEMU 11 attaches `chimney device` through vfio-user-pci; the guest (a
Debian kernel under TCG, behind a virtual IOMMU) sees a PCIe Ethernet
controller with its memory BARs and MSI-X, and no kernel driver claims it."""
import re

import pytest

from chimney import hw
from chimney.host.device import DeviceProcess
from chimney.host.qemu import run_in_guest

pytestmark = pytest.mark.vm
PCI_ID = f"{hw.PCI_VENDOR_ID:04x}:{hw.PCI_DEVICE_ID:04x}"


@pytest.fixture(scope="module")
def guest_lspci(tmp_path_factory):
    d = tmp_path_factory.mktemp("vm-lspci")
    with DeviceProcess(str(d / "nic.sock"), log_path=str(d / "device.log")) as dev:
        res = run_in_guest(f"lspci -nn -d {PCI_ID}; echo ---; lspci -vv -d {PCI_ID}; echo ---; "
                           f"lspci -k -d {PCI_ID}; echo ---; "
                           f"cat /sys/bus/pci/devices/*/iommu_group/devices/*/vendor | sort -u",
                           vfio_user_socket=dev.socket, workdir=d / "vm", timeout=300)
        log = dev.log_text()
        alive = dev.alive
    return res, log, alive


def test_guest_lists_the_nic_as_ethernet_controller(guest_lspci):
    res, log, alive = guest_lspci
    assert res.rc == 0, res.stderr
    short, verbose, kernel, _ = res.stdout.decode().split("---\n")
    assert re.search(rf"Ethernet controller \[0200\]: .*\[{PCI_ID}\]", short), short
    regions = dict(re.findall(r"Region (\d): Memory at [0-9a-f]+ \(32-bit, non-prefetchable\) \[size=(\w+)\]",
                              verbose))
    assert regions == {str(hw.BAR_REGS): "16K", str(hw.BAR_DOORBELL): "4K", str(hw.BAR_MSIX): "4K"}, verbose
    assert f"MSI-X: Enable- Count={hw.MSIX_VECTORS}" in verbose
    assert "Express (v2) Endpoint" in verbose
    assert "IOMMU group" in verbose, "the NIC should sit behind the virtual IOMMU"
    assert "Kernel driver in use" not in kernel, "an in-kernel driver claimed our ID"
    assert alive and "version negotiated" in log and "Traceback" not in log
