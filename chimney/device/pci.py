"""The PCI function's configuration space: identity, BARs, capabilities.

A 4 KiB config region makes QEMU treat the function as PCIe.  QEMU emulates
BAR addressing and the MSI-X table itself; we still keep BAR registers with
proper sizing semantics so that any client (and our tests) see real hardware
behaviour.  Only the bytes a real device would let software change are
writable; the rest is read-only.
"""
from __future__ import annotations

import fcntl
import os
import struct

from .. import hw

CONFIG_SIZE = 4096

# Capability offsets
CAP_MSIX = 0x40
CAP_PCIE = 0x50
CAP_PM = 0x90

# Type 0 header offsets (PCI Local Bus spec, 6.1)
PCI_VENDOR = 0x00
PCI_DEVICE = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS = 0x09                # 3 bytes: programming interface, subclass, class
PCI_CACHE_LINE_SIZE = 0x0C
PCI_HEADER_TYPE = 0x0E
PCI_BAR0 = 0x10
PCI_SUBSYSTEM_VENDOR = 0x2C
PCI_SUBSYSTEM = 0x2E
PCI_CAP_PTR = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
STATUS_CAP_LIST = 0x0010
# Capability IDs and the registers inside each capability (offsets from its start)
CAP_ID_PM, CAP_ID_PCIE, CAP_ID_MSIX = 0x01, 0x10, 0x11
CAP_NEXT = 1
MSIX_CTRL, MSIX_TABLE, MSIX_PBA = 0x02, 0x04, 0x08
PCIE_CAPS, PCIE_DEVCAP, PCIE_DEVCTL, PCIE_LNKCAP, PCIE_LNKSTA, PCIE_DEVCAP2 = \
    0x02, 0x04, 0x08, 0x0C, 0x12, 0x24
PM_PMC, PM_CTRL = 0x02, 0x04
CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
CMD_WRITABLE = CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE | 0x40 | 0x100  # + parity, SERR

# BAR index -> size, for the memory BARs we implement (32-bit, non-prefetchable).
BAR_SIZES = {hw.BAR_REGS: hw.BAR_REGS_SIZE, hw.BAR_DOORBELL: hw.BAR_DOORBELL_SIZE,
             hw.BAR_MSIX: hw.BAR_MSIX_SIZE}


def bar_memfd(name: str, size: int) -> int:
    """A memfd for a BAR the client maps (the doorbell page), sealed at `size`.

    The client gets this fd in the REGION_INFO reply and could ftruncate it:
    our next touch of the page would then die of SIGBUS.  The seals make the
    size fixed for good, and F_SEAL_SEAL stops the client adding seals of its
    own (F_SEAL_FUTURE_WRITE would keep the next client from mapping it).
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        raise
    return fd


class ConfigSpace:
    def __init__(self, ids: tuple[int, int] = (hw.PCI_VENDOR_ID, hw.PCI_DEVICE_ID)):
        self.ids = ids                          # vendor, device (chimney device --pci-id)
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)     # which bits software may write
        self._build()

    def _w16(self, off, v):
        struct.pack_into("<H", self.data, off, v)

    def _w32(self, off, v):
        struct.pack_into("<I", self.data, off, v)

    def _mask(self, off, nbytes, value):
        self.wmask[off:off + nbytes] = value.to_bytes(nbytes, "little")

    def _build(self):
        d = self.data
        self._w16(PCI_VENDOR, self.ids[0])
        self._w16(PCI_DEVICE, self.ids[1])
        self._w16(PCI_STATUS, STATUS_CAP_LIST)
        d[PCI_REVISION_ID] = hw.PCI_REVISION
        d[PCI_CLASS:PCI_CLASS + 3] = hw.PCI_CLASS_CODE.to_bytes(3, "little")
        d[PCI_HEADER_TYPE] = 0x00                     # type 0 header, single function
        self._w16(PCI_SUBSYSTEM_VENDOR, hw.PCI_SUBSYS_VENDOR_ID)
        self._w16(PCI_SUBSYSTEM, hw.PCI_SUBSYS_ID)
        d[PCI_CAP_PTR] = CAP_MSIX
        d[PCI_INTERRUPT_PIN] = 0                      # no INTx pin: MSI-X only
        self._mask(PCI_COMMAND, 2, CMD_WRITABLE)
        self._mask(PCI_CACHE_LINE_SIZE, 1, 0xFF)
        self._mask(PCI_INTERRUPT_LINE, 1, 0xFF)
        for bar, size in BAR_SIZES.items():
            self._mask(PCI_BAR0 + 4 * bar, 4, 0xFFFFFFFF & ~(size - 1))

        # MSI-X: table and PBA in BAR4.
        d[CAP_MSIX] = CAP_ID_MSIX
        d[CAP_MSIX + CAP_NEXT] = CAP_PCIE
        self._w16(CAP_MSIX + MSIX_CTRL, hw.MSIX_VECTORS - 1)
        self._w32(CAP_MSIX + MSIX_TABLE, hw.MSIX_TABLE_OFFSET | hw.BAR_MSIX)
        self._w32(CAP_MSIX + MSIX_PBA, hw.MSIX_PBA_OFFSET | hw.BAR_MSIX)
        self._mask(CAP_MSIX + MSIX_CTRL, 2, 0xC000)   # enable, function mask

        # PCI Express capability, version 2, endpoint.
        d[CAP_PCIE] = CAP_ID_PCIE
        d[CAP_PCIE + CAP_NEXT] = CAP_PM
        self._w16(CAP_PCIE + PCIE_CAPS, 0x0002)       # v2, device/port type 0 (endpoint)
        self._w32(CAP_PCIE + PCIE_DEVCAP, 0x00008001)  # MPS 256, role-based error reporting
        self._w16(CAP_PCIE + PCIE_DEVCTL, 0x2810)     # MRRS 512, MPS 128, relaxed ordering
        self._mask(CAP_PCIE + PCIE_DEVCTL, 2, 0x7CFF)
        self._w32(CAP_PCIE + PCIE_LNKCAP, 0x00400041)  # 2.5 GT/s x4, no ASPM, port 0
        self._w16(CAP_PCIE + PCIE_LNKSTA, 0x1041)     # 2.5 GT/s x4, slot clock
        self._w32(CAP_PCIE + PCIE_DEVCAP2, 0x00000010)  # completion timeout disable

        # Power management, D0 only.
        d[CAP_PM] = CAP_ID_PM
        d[CAP_PM + CAP_NEXT] = 0x00                   # the last capability
        self._w16(CAP_PM + PM_PMC, 0x0003)            # PM spec 1.2
        self._w16(CAP_PM + PM_CTRL, 0x0008)           # No_Soft_Reset
        # Extended capabilities: none (a zero header at 0x100 ends the list).

    def reset(self):
        self.__init__(self.ids)

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.data[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            o = offset + i
            m = self.wmask[o]
            self.data[o] = (self.data[o] & ~m) | (b & m)

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.data, PCI_COMMAND)[0]

    @property
    def bus_master(self) -> bool:
        return bool(self.command & CMD_MASTER)
