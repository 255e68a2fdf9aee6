"""vfio-user wire format: the message header and payload layouts.

Shared by the device's server and the host bus's client.  Layouts follow
QEMU's docs/interop/vfio-user.rst as QEMU 11's client speaks it; all fields are
host byte order (little-endian here).
"""
from __future__ import annotations

import array
import socket
import struct

HDR = struct.Struct("<HHIII")          # id, command, size, flags, error
HDR_SIZE = HDR.size

# Commands
VERSION = 1
DMA_MAP = 2
DMA_UNMAP = 3
DEVICE_GET_INFO = 4
DEVICE_GET_REGION_INFO = 5
DEVICE_GET_REGION_IO_FDS = 6
DEVICE_GET_IRQ_INFO = 7
DEVICE_SET_IRQS = 8
REGION_READ = 9
REGION_WRITE = 10
DMA_READ = 11
DMA_WRITE = 12
DEVICE_RESET = 13
DIRTY_PAGES = 14
REGION_WRITE_MULTI = 15
COMMAND_NAMES = {
    VERSION: "VERSION", DMA_MAP: "DMA_MAP", DMA_UNMAP: "DMA_UNMAP",
    DEVICE_GET_INFO: "DEVICE_GET_INFO", DEVICE_GET_REGION_INFO: "DEVICE_GET_REGION_INFO",
    DEVICE_GET_REGION_IO_FDS: "DEVICE_GET_REGION_IO_FDS", DEVICE_GET_IRQ_INFO: "DEVICE_GET_IRQ_INFO",
    DEVICE_SET_IRQS: "DEVICE_SET_IRQS", REGION_READ: "REGION_READ", REGION_WRITE: "REGION_WRITE",
    DMA_READ: "DMA_READ", DMA_WRITE: "DMA_WRITE", DEVICE_RESET: "DEVICE_RESET",
    DIRTY_PAGES: "DIRTY_PAGES", REGION_WRITE_MULTI: "REGION_WRITE_MULTI",
}

# Header flags
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
TYPE_MASK = 0xF
NO_REPLY = 0x10
ERROR = 0x20

# Payloads
VERSION_HDR = struct.Struct("<HH")                   # major, minor, then JSON + NUL
DMA_MAP_MSG = struct.Struct("<IIQQQ")                # argsz, flags, offset, iova, size
DMA_UNMAP_MSG = struct.Struct("<IIQQ")               # argsz, flags, iova, size
DEVICE_INFO = struct.Struct("<IIII")                 # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")               # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("<IIII")                    # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")                    # argsz, flags, index, start, count
REGION_RW = struct.Struct("<QII")                    # offset, region, count, then data
CAP_HEADER = struct.Struct("<HHI")                   # id, version, next
SPARSE_MMAP_HDR = struct.Struct("<II")               # nr_areas, reserved
SPARSE_MMAP_AREA = struct.Struct("<QQ")              # offset, size

# DMA flags
DMA_READ_FLAG = 1 << 0
DMA_WRITE_FLAG = 1 << 1
UNMAP_GET_DIRTY_BITMAP = 1 << 0
UNMAP_ALL = 1 << 1

# Device info flags
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

# Region info
REGION_FLAG_READ = 1 << 0
REGION_FLAG_WRITE = 1 << 1
REGION_FLAG_MMAP = 1 << 2
REGION_FLAG_CAPS = 1 << 3
REGION_INFO_CAP_SPARSE_MMAP = 1
PCI_NUM_REGIONS = 9              # BAR0-5, ROM, config, VGA
PCI_CONFIG_REGION = 7
PCI_ROM_REGION = 6

# IRQs
PCI_INTX_IRQ = 0
PCI_MSI_IRQ = 1
PCI_MSIX_IRQ = 2
PCI_ERR_IRQ = 3
PCI_REQ_IRQ = 4
PCI_NUM_IRQS = 5
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK_ALL = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# Limits we advertise and enforce.  No allocation is ever sized by a field of
# an incoming message beyond these.
MAX_MSG_FDS = 8
MAX_DATA_XFER = 1 << 20
MAX_MSG_SIZE = HDR_SIZE + REGION_RW.size + MAX_DATA_XFER
# Each DMA mapping is one memory area of the device process, out of the
# kernel's vm.max_map_count (65530 by default): stay well below it.
MAX_DMA_MAPS = 16384


def send_msg(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one whole message, with fds as SCM_RIGHTS on its first byte."""
    view = memoryview(data)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([view], anc)
        view = view[sent:]
    while view:
        sent = sock.send(view)
        view = view[sent:]


def recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes | None:
    """Read exactly n bytes; collect SCM_RIGHTS fds into `fds`. None on EOF."""
    buf = bytearray()
    while len(buf) < n:
        data, anc, flags, _ = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * MAX_MSG_FDS))
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % 4])
                if fds is None:
                    for fd in got:
                        _close_quietly(fd)
                else:
                    fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            # More fds than we accept: those the kernel dropped are gone; say so.
            raise ProtocolError("too many file descriptors in one message")
        if not data:
            return None
        buf += data
    return bytes(buf)


def _close_quietly(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass


class ProtocolError(Exception):
    """The peer broke the stream's framing; the connection cannot go on."""
