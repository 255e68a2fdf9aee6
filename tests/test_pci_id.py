"""The NIC's PCI id is configurable (`chimney device --pci-id`, default
1de5:c41e): parsing, and the guest side finding the NIC by $CHIMNEY_PCI_ID.
The device presenting it in config space is in test_vfio_user_protocol.py."""
import pytest

from chimney import hw
from chimney.guest.bus import vfio


@pytest.mark.parametrize("text, ids", [("1de5:c41e", (0x1DE5, 0xC41E)), ("C41E:0A01", (0xC41E, 0x0A01))])
def test_parse(text, ids):
    assert hw.parse_pci_id(text) == ids


@pytest.mark.parametrize("text", ["1de5", "1de5:c41", "1de5:c41e:0", "xyz1:0001", "0000:0001", "ffff:0001", ""])
def test_parse_refuses(text):
    with pytest.raises(ValueError):
        hw.parse_pci_id(text)


def _fake_sysfs(root, functions):
    for addr, (vendor, device) in functions.items():
        d = root / addr
        d.mkdir()
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")


def test_guest_finds_the_nic_by_chimney_pci_id(tmp_path, monkeypatch):
    _fake_sysfs(tmp_path, {"0000:00:02.0": (0x1DE5, 0xC41E), "0000:01:00.0": (0xC41E, 0x0A01)})
    monkeypatch.setattr(vfio, "SYSFS_PCI", str(tmp_path))
    monkeypatch.delenv("CHIMNEY_PCI_ID", raising=False)
    assert vfio.nic_ids() == (hw.PCI_VENDOR_ID, hw.PCI_DEVICE_ID)
    assert vfio.find_device() == "0000:00:02.0"
    monkeypatch.setenv("CHIMNEY_PCI_ID", "c41e:0a01")
    assert vfio.find_device() == "0000:01:00.0"
    monkeypatch.setenv("CHIMNEY_PCI_ID", "nonsense")
    with pytest.raises(vfio.VfioBusError, match="CHIMNEY_PCI_ID: 'nonsense' is not a PCI id"):
        vfio.find_device()


def test_vm_threads_the_id_to_the_device_and_the_guest(tmp_path):
    """Vm(pci_id=...): the device gets --pci-id, guest commands CHIMNEY_PCI_ID;
    the default id adds neither (nothing booted here)."""
    from chimney.host.device import device_options
    from chimney.host.vm import Vm
    other = Vm("pci", workdir=tmp_path / "a", pci_id="C41E:0A01", make_workdir=False)
    assert other.pci_id == "c41e:0a01" and other.guest_env() == {"CHIMNEY_PCI_ID": "c41e:0a01"}
    opts = device_options(**other.device_options("ns"))
    assert opts[opts.index("--pci-id") + 1] == "c41e:0a01"
    plain = Vm("pci", workdir=tmp_path / "b", make_workdir=False)
    assert plain.guest_env() == {} and "--pci-id" not in device_options(**plain.device_options("ns"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="not a PCI id"):
        Vm("pci", workdir=tmp_path / "c", pci_id="1de5", make_workdir=False)
