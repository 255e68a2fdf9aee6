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

PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_BAR0 = 0x10
PCI_INTERRUPT_LINE = 0x3C
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
    def __init__(self):
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
        self._w16(0x00, hw.PCI_VENDOR_ID)
        self._w16(0x02, hw.PCI_DEVICE_ID)
        self._w16(PCI_STATUS, 0x0010)                 # capability list present
        d[0x08] = hw.PCI_REVISION
        d[0x09:0x0C] = hw.PCI_CLASS_CODE.to_bytes(3, "little")
        d[0x0E] = 0x00                                # type 0 header, single function
        self._w16(0x2C, hw.PCI_SUBSYS_VENDOR_ID)
        self._w16(0x2E, hw.PCI_SUBSYS_ID)
        d[0x34] = CAP_MSIX
        d[0x3D] = 0                                   # no INTx pin: MSI-X only
        self._mask(PCI_COMMAND, 2, CMD_WRITABLE)
        self._mask(0x0C, 1, 0xFF)                     # cache line size
        self._mask(PCI_INTERRUPT_LINE, 1, 0xFF)
        for bar, size in BAR_SIZES.items():
            self._mask(PCI_BAR0 + 4 * bar, 4, 0xFFFFFFFF & ~(size - 1))

        # MSI-X: table and PBA in BAR4.
        d[CAP_MSIX] = 0x11
        d[CAP_MSIX + 1] = CAP_PCIE
        self._w16(CAP_MSIX + 2, hw.MSIX_VECTORS - 1)
        self._w32(CAP_MSIX + 4, hw.MSIX_TABLE_OFFSET | hw.BAR_MSIX)
        self._w32(CAP_MSIX + 8, hw.MSIX_PBA_OFFSET | hw.BAR_MSIX)
        self._mask(CAP_MSIX + 2, 2, 0xC000)           # enable, function mask

        # PCI Express capability, version 2, endpoint.
        d[CAP_PCIE] = 0x10
        d[CAP_PCIE + 1] = CAP_PM
        self._w16(CAP_PCIE + 2, 0x0002)               # v2, device/port type 0 (endpoint)
        self._w32(CAP_PCIE + 4, 0x00008001)           # DevCap: MPS 256, role-based error reporting
        self._w16(CAP_PCIE + 8, 0x2810)               # DevCtl: MRRS 512, MPS 128, relaxed ordering
        self._mask(CAP_PCIE + 8, 2, 0x7CFF)
        self._w32(CAP_PCIE + 0x0C, 0x00400041)        # LinkCap: 2.5 GT/s x4, no ASPM, port 0
        self._w16(CAP_PCIE + 0x12, 0x1041)            # LinkSta: 2.5 GT/s x4, slot clock
        self._w32(CAP_PCIE + 0x24, 0x00000010)        # DevCap2: completion timeout disable

        # Power management, D0 only.
        d[CAP_PM] = 0x01
        d[CAP_PM + 1] = 0x00
        self._w16(CAP_PM + 2, 0x0003)                 # PM spec 1.2
        self._w16(CAP_PM + 4, 0x0008)                 # No_Soft_Reset
        # Extended capabilities: none (a zero header at 0x100 ends the list).

    def reset(self):
        self.__init__()

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
