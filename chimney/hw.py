"""The chimney NIC's hardware interface, version 1: the one source of truth.

Everything both sides of the PCI bus agree on lives here: identity, BAR layout,
registers, the doorbell page, queue numbering, descriptor layouts, status bits,
interrupt causes and feature bits.  The device (chimney.device), the miniport
(chimney.guest) and the C fast path (a header generated from this module at
build time) all read these tables; docs/datasheet.md is generated from them.

Pure Python on purpose: the guest runs it under its own interpreter.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

VERSION_MAJOR = 1
VERSION_MINOR = 0

# --- PCI identity ----------------------------------------------------------
# No in-kernel Linux driver claims this ID (checked with a Debian 6.12 guest),
# so the function stays free for vfio-pci.
PCI_VENDOR_ID = 0x1DE5
PCI_DEVICE_ID = 0xC41E
PCI_SUBSYS_VENDOR_ID = 0x1DE5
PCI_SUBSYS_ID = 0x0001
PCI_CLASS_CODE = 0x020000  # network controller, Ethernet
PCI_REVISION = 0x01

# --- BARs ------------------------------------------------------------------
BAR_REGS = 0        # trapped registers: every access is a vfio-user message
BAR_DOORBELL = 2    # one page, mmapped by QEMU into the guest: no VM exit
BAR_MSIX = 4        # MSI-X table and PBA (QEMU emulates the table)
BAR_REGS_SIZE = 0x4000
BAR_DOORBELL_SIZE = 0x1000
BAR_MSIX_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
MSIX_VECTORS = 32
VECTOR_MISC = 0     # link change, DMA errors, device status


@dataclass(frozen=True)
class Bit:
    name: str
    mask: int
    doc: str


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    width: int          # bytes: 4 or 8
    access: str         # RO, RW, WO, RC (read clears), W1C (write 1 to clear)
    reset: int
    doc: str
    bits: tuple[Bit, ...] = ()


def _bits(*spec: tuple[str, int, str]) -> tuple[Bit, ...]:
    return tuple(Bit(n, m, d) for n, m, d in spec)


# --- Queues ----------------------------------------------------------------
# Queues are rings of fixed-size entries in guest memory.  Each has a number
# (qid) that selects its register block in BAR0 and its doorbell slot.
@dataclass(frozen=True)
class QueueKind:
    name: str
    first: int
    count: int
    entry: str          # name of the entry layout
    direction: str     # "to-device": driver produces; "to-host": device produces
    implemented: bool
    doc: str


QUEUE_KINDS = (
    QueueKind("TX", 0, 8, "TxDesc", "to-device", True,
              "plain frames from the host stack to the wire"),
    QueueKind("RX", 8, 8, "RxDesc", "to-device", True,
              "buffers for plain frames from the wire; the device fills them"),
    QueueKind("CMD", 16, 1, "(reserved)", "to-device", False,
              "state manipulation: initiate, update, query, invalidate, terminate"),
    QueueKind("CMDC", 17, 1, "(reserved)", "to-host", False,
              "command completions"),
    QueueKind("EVENT", 18, 1, "(reserved)", "to-host", False,
              "disconnect, abort, retrieve, backlog, reachability, status"),
    QueueKind("OSEND", 32, 8, "(reserved)", "to-device", False,
              "offload send requests, one queue per RSS queue"),
    QueueKind("ORECV", 40, 8, "(reserved)", "to-device", False,
              "offload posted receives, one queue per RSS queue"),
    QueueKind("OCOMPL", 48, 8, "(reserved)", "to-host", False,
              "offload completions and receive indications"),
)
NUM_QIDS = 64
TXQ_FIRST, NUM_TXQ = 0, 8
RXQ_FIRST, NUM_RXQ = 8, 8
QUEUE_SIZE_MIN = 8
QUEUE_SIZE_MAX = 4096


def queue_kind(qid: int) -> QueueKind | None:
    for k in QUEUE_KINDS:
        if k.first <= qid < k.first + k.count:
            return k
    return None


# --- BAR0 registers --------------------------------------------------------
CTRL_BITS = _bits(
    ("ENABLE", 1 << 0, "device runs its queues and its wire"),
    ("RESET", 1 << 1, "write 1: full function reset (self-clearing)"),
    ("PROMISC", 1 << 2, "deliver every frame, not only ours/broadcast/multicast"),
)
STATUS_BITS = _bits(
    ("READY", 1 << 0, "device finished reset and accepts configuration"),
    ("LINK_UP", 1 << 1, "the wire backend is attached and up"),
    ("ENABLED", 1 << 2, "CTRL.ENABLE has taken effect"),
)
CAUSE_BITS = _bits(
    ("LINK", 1 << 0, "link state changed"),
    ("DMA_ERROR", 1 << 1, "a guest address fell outside every DMA mapping"),
    ("QUEUE_ERROR", 1 << 2, "a queue was stopped (see its Q_STATUS)"),
)
FEATURE_BITS = _bits(
    ("PLAIN_FRAMES", 1 << 0, "TX/RX queues for plain Ethernet frames"),
    ("MSIX_MODERATION", 1 << 1, "per-vector minimum interval (VEC_ITR)"),
    ("DOORBELL_PAGE", 1 << 2, "mmappable doorbell page with kick suppression"),
    ("SCATTER_GATHER", 1 << 3, "frames span descriptors (EOP marks the end)"),
    ("TCP_OFFLOAD", 1 << 16, "reserved: TCP chimney offload queues"),
)
FEATURES = sum(b.mask for b in FEATURE_BITS if b.name != "TCP_OFFLOAD")

REGISTERS = (
    Register("ID", 0x000, 4, "RO", 0x43484D59, "magic 'CHMY'"),
    Register("VERSION", 0x004, 4, "RO", (VERSION_MAJOR << 16) | VERSION_MINOR,
             "hardware interface version: major << 16 | minor"),
    Register("FEATURES", 0x008, 4, "RO", FEATURES, "what this device implements",
             FEATURE_BITS),
    Register("CTRL", 0x010, 4, "RW", 0, "device control", CTRL_BITS),
    Register("STATUS", 0x014, 4, "RO", 1, "device status", STATUS_BITS),
    Register("MAC_LO", 0x018, 4, "RW", 0, "MAC bytes 0-3 (byte 0 in bits 7:0)"),
    Register("MAC_HI", 0x01C, 4, "RW", 0, "MAC bytes 4-5 in bits 15:0"),
    Register("MTU", 0x020, 4, "RW", 1500, "largest IP packet; frames up to MTU+18"),
    Register("KICK", 0x024, 4, "WO", 0,
             "wake the device: write after a doorbell when DB_NEED_KICK is set"),
    Register("CAUSE", 0x028, 4, "RC", 0, "misc interrupt causes; read clears",
             CAUSE_BITS),
    Register("NUM_QUEUES", 0x02C, 4, "RO", (NUM_RXQ << 8) | NUM_TXQ,
             "bits 7:0 TX queues, 15:8 RX queues"),
    Register("NUM_VECTORS", 0x030, 4, "RO", MSIX_VECTORS, "MSI-X vectors"),
    Register("DMA_ERR_ADDR", 0x040, 8, "RO", 0, "guest address of the last DMA error"),
    Register("DMA_ERR_INFO", 0x048, 4, "RO", 0,
             "last DMA error: bits 7:0 qid (0xff: none), bits 31:8 count (saturating)"),
)

# Statistics: 64-bit counters, read with 8-byte accesses.
STATS_BASE = 0x100
STATS = (
    ("tx_frames", "frames sent on the wire"),
    ("tx_bytes", "bytes sent on the wire"),
    ("tx_drops", "frames dropped on transmit (bad length, wire error)"),
    ("rx_frames", "frames delivered into RX buffers"),
    ("rx_bytes", "bytes delivered into RX buffers"),
    ("rx_no_buffer", "frames dropped: no RX buffer posted"),
    ("rx_filtered", "frames dropped by the MAC filter"),
    ("rx_drops", "frames dropped for other reasons (runt, too long, part lost to a DMA error)"),
    ("dma_errors", "guest addresses outside every DMA mapping"),
    ("desc_errors", "malformed descriptors (zero length, oversize frame)"),
    ("interrupts", "MSI-X messages sent"),
    ("kicks", "KICK register writes"),
)
STAT_INDEX = {name: i for i, (name, _) in enumerate(STATS)}

# Per-queue register block: BAR0 + Q_BASE + qid * Q_STRIDE + offset.
Q_BASE = 0x1000
Q_STRIDE = 0x20
Q_STATUS_BITS = _bits(
    ("ENABLED", 1 << 0, "queue is running"),
    ("ERROR", 1 << 1, "queue stopped: its ring left the DMA mappings or was invalid"),
)
QUEUE_REGISTERS = (
    Register("Q_BASE_LO", 0x00, 4, "RW", 0, "ring address bits 31:0 (16-byte aligned)"),
    Register("Q_BASE_HI", 0x04, 4, "RW", 0, "ring address bits 63:32"),
    Register("Q_SIZE", 0x08, 4, "RW", 0, "entries, a power of two, 8..4096"),
    Register("Q_CTRL", 0x0C, 4, "RW", 0, "bit 0: enable (resets the ring indices)"),
    Register("Q_VECTOR", 0x10, 4, "RW", 0, "MSI-X vector for this queue's completions"),
    Register("Q_STATUS", 0x14, 4, "RO", 0, "queue status", Q_STATUS_BITS),
    Register("Q_HEAD", 0x18, 4, "RO", 0, "device's consumer index (free-running)"),
)

# Per-vector interrupt moderation: minimum microseconds between two messages.
VEC_ITR_BASE = 0x2000
VEC_ITR_STRIDE = 4

# --- Doorbell page (BAR2) ----------------------------------------------------
# Plain memory shared by driver and device; QEMU maps it into the guest, so a
# write costs no exit.  The device polls it while busy and, before it sleeps,
# sets DB_NEED_KICK: a driver that sees it after ringing writes BAR0 KICK.
DB_TAIL_BASE = 0x000     # + 4*qid: driver's producer index (u32, free-running)
DB_HEAD_BASE = 0x100     # + 4*qid: device's consumer index mirror (device writes)
DB_ARM_BASE = 0x200      # + 4*vector: driver writes 1 to arm; device clears on fire
DB_NEED_KICK = 0x300     # device writes 1 before sleeping, 0 when awake
DB_HEARTBEAT = 0x304     # device increments while its loop runs


class Words:
    """The 32-bit words of a shared page (the doorbell page), each read and
    written in one aligned access.  struct.pack_into writes little-endian
    values byte by byte, and the other side polling the page can then see a
    half-written index (seen: 0xc7ff -> 0xc800 read as 0xc8ff)."""

    def __init__(self, buf):
        self.view = memoryview(buf).cast("I")

    def __getitem__(self, offset: int) -> int:
        return self.view[offset >> 2]

    def __setitem__(self, offset: int, value: int) -> None:
        self.view[offset >> 2] = value & 0xFFFFFFFF

    def release(self) -> None:
        self.view.release()


# --- Descriptor layouts ------------------------------------------------------
@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int
    doc: str


_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass(frozen=True)
class Layout:
    name: str
    size: int
    doc: str
    fields: tuple[Field, ...]
    _struct: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        fmt, pos = "<", 0
        for f in self.fields:
            if f.offset > pos:
                fmt += f"{f.offset - pos}x"
            fmt += _FMT[f.size]
            pos = f.offset + f.size
        if self.size > pos:
            fmt += f"{self.size - pos}x"
        object.__setattr__(self, "_struct", struct.Struct(fmt))
        assert self._struct.size == self.size, self.name

    def pack(self, **values) -> bytes:
        return self._struct.pack(*(values.get(f.name, 0) for f in self.fields))

    def pack_into(self, buf, offset: int, **values) -> None:
        self._struct.pack_into(buf, offset, *(values.get(f.name, 0) for f in self.fields))

    def unpack_from(self, buf, offset: int = 0) -> dict:
        return dict(zip((f.name for f in self.fields), self._struct.unpack_from(buf, offset)))

    def offset_of(self, name: str) -> int:
        return next(f.offset for f in self.fields if f.name == name)


TX_FLAGS = _bits(
    ("EOP", 1 << 0, "last descriptor of a frame"),
)
RX_FLAGS = _bits(
    ("EOP", 1 << 0, "last descriptor of a frame"),
)
DESC_STATUS = _bits(
    ("DD", 1 << 0, "descriptor done: the device has finished with it"),
    ("DMA_ERR", 1 << 1, "its buffer address was outside every DMA mapping"),
    ("LEN_ERR", 1 << 2, "zero length, or the frame exceeded MTU+18 (dropped)"),
)

TxDesc = Layout("TxDesc", 16, "one transmit buffer; a frame is one or more, EOP on the last", (
    Field("addr", 0, 8, "guest (bus) address of the buffer"),
    Field("len", 8, 2, "bytes in the buffer"),
    Field("flags", 10, 2, "TX_FLAGS (driver)"),
    Field("status", 12, 2, "DESC_STATUS (device writes back)"),
))
RxDesc = Layout("RxDesc", 16, "one receive buffer; a frame fills one or more, EOP on the last", (
    Field("addr", 0, 8, "guest (bus) address of the buffer"),
    Field("buflen", 8, 2, "buffer size (driver)"),
    Field("len", 10, 2, "bytes written (device)"),
    Field("flags", 12, 2, "RX_FLAGS (device)"),
    Field("status", 14, 2, "DESC_STATUS (device writes back)"),
))
LAYOUTS = (TxDesc, RxDesc)
MAX_FRAME = 9216 + 18   # jumbo MTU limit plus Ethernet header and VLAN tag


def bit(bits: tuple[Bit, ...], name: str) -> int:
    return next(b.mask for b in bits if b.name == name)


def reg(name: str) -> Register:
    return next(r for r in REGISTERS if r.name == name)


def qreg(qid: int, name: str) -> int:
    """BAR0 offset of a queue register."""
    return Q_BASE + qid * Q_STRIDE + next(r.offset for r in QUEUE_REGISTERS if r.name == name)


def stat_offset(name: str) -> int:
    return STATS_BASE + 8 * STAT_INDEX[name]


# Convenient module-level names: CTRL_ENABLE, STATUS_LINK_UP, DESC_DD, ...
def _export():
    g = globals()
    for prefix, bits in (("CTRL", CTRL_BITS), ("STATUS", STATUS_BITS), ("CAUSE", CAUSE_BITS),
                         ("FEAT", FEATURE_BITS), ("QSTATUS", Q_STATUS_BITS),
                         ("TXF", TX_FLAGS), ("RXF", RX_FLAGS), ("DESC", DESC_STATUS)):
        for b in bits:
            g[f"{prefix}_{b.name}"] = b.mask
    for r in REGISTERS:
        g[f"REG_{r.name}"] = r.offset


_export()


def c_header() -> str:
    """The definitions the C fast path needs, generated so they cannot drift."""
    out = ["/* generated from chimney/hw.py; do not edit */"]
    for L in LAYOUTS:
        out.append(f"#define {L.name.upper()}_SIZE {L.size}")
        for f in L.fields:
            out.append(f"#define {L.name.upper()}_{f.name.upper()} {f.offset}")
    for prefix, bits in (("TXF", TX_FLAGS), ("RXF", RX_FLAGS), ("DESC", DESC_STATUS)):
        for b in bits:
            out.append(f"#define {prefix}_{b.name} {b.mask:#x}")
    for name, _ in STATS:
        out.append(f"#define STAT_{name.upper()} {STAT_INDEX[name]}")
    out.append(f"#define NUM_STATS {len(STATS)}")
    out.append(f"#define MAX_FRAME {MAX_FRAME}")
    return "\n".join(out) + "\n"
