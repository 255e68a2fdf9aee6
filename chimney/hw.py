"""The chimney NIC's hardware interface, version 1: the one source of truth.

Everything both sides of the PCI bus agree on lives here: identity, BAR layout,
registers, the doorbell page, queue numbering, descriptor layouts, status bits,
interrupt causes and feature bits.  The device (chimney.device), the miniport
(chimney.guest) and the C fast path (chimney/device/hw.h, generated from this
module) all read these tables; docs/datasheet.md is generated from them.

Pure Python on purpose: the guest runs it under its own interpreter.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

VERSION_MAJOR = 1
VERSION_MINOR = 2      # 1.1: TCP chimney offload (command, event and offload queues)
                       # 1.2: OSEND FORWARD (the host hands a received segment to the NIC)

# --- PCI identity ----------------------------------------------------------
# No in-kernel Linux driver claims this ID (checked with a Debian 6.12 guest),
# so the function stays free for vfio-pci.  Vendor 1de5 is assigned to a real
# company (Eideticom), not to us: `chimney device --pci-id VVVV:DDDD` presents
# another ID (parse_pci_id), and guest tools look for $CHIMNEY_PCI_ID then.
PCI_VENDOR_ID = 0x1DE5
PCI_DEVICE_ID = 0xC41E
PCI_SUBSYS_VENDOR_ID = 0x1DE5
PCI_SUBSYS_ID = 0x0001
PCI_CLASS_CODE = 0x020000  # network controller, Ethernet
PCI_REVISION = 0x01


def parse_pci_id(text: str) -> tuple[int, int]:
    """"VVVV:DDDD" (hex) as (vendor, device); ValueError with one line if not.
    Vendor ffff is what an absent function reads as, 0000 is invalid."""
    vendor, sep, device = text.partition(":")
    try:
        if not sep or len(vendor) != 4 or len(device) != 4:
            raise ValueError
        ids = int(vendor, 16), int(device, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a PCI id VVVV:DDDD (four hex digits each)") from None
    if ids[0] in (0x0000, 0xFFFF):
        raise ValueError(f"{text!r}: vendor {vendor} is not a valid PCI vendor id")
    return ids

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
    QueueKind("CMD", 16, 1, "CmdDesc", "to-device", True,
              "state manipulation: initiate, update, query, invalidate, terminate, parameters"),
    QueueKind("CMDC", 17, 1, "CmdCompl", "to-host", True,
              "command completions, one per command, in command order"),
    QueueKind("EVENT", 18, 1, "EventRec", "to-host", True,
              "disconnect, abort, retrieve, send backlog, reachability query, status"),
    QueueKind("OSEND", 32, 8, "OSendDesc", "to-device", True,
              "offload send and disconnect requests, one queue per RSS queue set"),
    QueueKind("ORECV", 40, 8, "ORecvDesc", "to-device", True,
              "offload posted receives, indication buffers and indication answers"),
    QueueKind("OCOMPL", 48, 8, "OComplRec", "to-host", True,
              "offload send/receive completions and receive indications"),
)
NUM_QIDS = 64
TXQ_FIRST, NUM_TXQ = 0, 8
RXQ_FIRST, NUM_RXQ = 8, 8
CMDQ, CMDCQ, EVENTQ = 16, 17, 18
OSENDQ_FIRST, ORECVQ_FIRST, OCOMPLQ_FIRST, NUM_OFFLOAD_QUEUES = 32, 40, 48, 8
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
    ("LINK_UP", 1 << 1, "the wire backend is attached and its link is up (see Link)"),
    ("ENABLED", 1 << 2, "CTRL.ENABLE has taken effect"),
)
CAUSE_BITS = _bits(
    ("LINK", 1 << 0, "STATUS.LINK_UP changed (the misc vector fires)"),
    ("DMA_ERROR", 1 << 1, "a guest address fell outside every DMA mapping"),
    ("QUEUE_ERROR", 1 << 2, "a queue was stopped (see its Q_STATUS)"),
)
FEATURE_BITS = _bits(
    ("PLAIN_FRAMES", 1 << 0, "TX/RX queues for plain Ethernet frames"),
    ("MSIX_MODERATION", 1 << 1, "per-vector minimum interval (VEC_ITR)"),
    ("DOORBELL_PAGE", 1 << 2, "mmappable doorbell page with kick suppression"),
    ("SCATTER_GATHER", 1 << 3, "frames span descriptors (EOP marks the end)"),
    ("TCP_OFFLOAD", 1 << 16, "TCP chimney offload: CMD/CMDC/EVENT and OSEND/ORECV/OCOMPL queues"),
)
FEATURES = sum(b.mask for b in FEATURE_BITS)

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

# DMA_ERR_INFO's fields.
DMA_ERR_QID_NONE = 0xFF         # bits 7:0 when no DMA error happened since reset
DMA_ERR_COUNT_SHIFT = 8
DMA_ERR_COUNT_MAX = 0xFFFFFF    # bits 31:8 saturate here
MAC_HI_MASK = 0xFFFF            # MAC_HI holds bytes 4-5

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
    # TCP chimney offload (1.1)
    ("offload_conns", "TCP connections offloaded now (a gauge, not a counter)"),
    ("offload_segs_out", "TCP segments the TOE sent on offloaded connections"),
    ("offload_segs_in", "TCP segments steered to the TOE (checksum good)"),
    ("offload_bytes_out", "TCP payload bytes the TOE sent (retransmissions included)"),
    ("offload_bytes_in", "TCP payload bytes of segments steered to the TOE"),
    ("offload_retransmits", "TCP segments the TOE sent again (RTO, fast retransmit, probes)"),
    ("offload_csum_errors", "segments of offloaded connections dropped: bad IP/TCP checksum"),
    ("offload_rx_overflow", "segments of offloaded connections dropped: TOE input queue full"),
    ("offload_cmds", "commands completed on CMDC"),
    ("offload_cmd_errors", "commands or objects that completed with an error status"),
    ("offload_req_errors", "OSEND/ORECV requests refused (ERROR on OCOMPL)"),
    ("offload_events", "records written to the EVENT queue"),
    # wire segmentation offload (the TAP's virtio-net header; counters only)
    ("wire_tso_out", "TCP super-segments handed to the wire whole (the host kernel segments them)"),
    ("wire_gso_in", "TCP super-segments received whole from the wire (the host kernel's GSO/GRO)"),
    ("wire_segmented", "MSS-sized frames the device cut from super-segments in software"),
    ("wire_csum_completed", "received frames whose partial TCP/UDP checksum the device completed"),
)
STAT_INDEX = {name: i for i, (name, _) in enumerate(STATS)}
# Each counter as a register: the register file (chimney.device.nic) is built from these.
STAT_REGISTERS = tuple(Register(name, STATS_BASE + 8 * i, 8, "RO", 0, doc)
                       for i, (name, doc) in enumerate(STATS))

# Per-queue register block: BAR0 + Q_BASE + qid * Q_STRIDE + offset.
Q_BASE = 0x1000
Q_STRIDE = 0x20
Q_STATUS_BITS = _bits(
    ("ENABLED", 1 << 0, "queue is running"),
    ("ERROR", 1 << 1, "queue stopped: its ring left the DMA mappings or was invalid"),
)
Q_CTRL_BITS = _bits(
    ("ENABLE", 1 << 0, "run the queue (0 -> 1 resets its indices and checks the ring)"),
)
# Why the device stopped a queue (the fast path's fp_queue.error; Q_STATUS shows
# ERROR for any of them).  Device-internal: shared by nic.py, toe.py and the C.
QUEUE_STOP_CODES = _bits(
    ("RING_DMA", 1, "a descriptor's address in the ring left the DMA mappings"),
    ("BAD_INDEX", 2, "TX/RX: the driver's TAIL ran more than the ring size ahead of HEAD"),
    ("INVALID", 3, "at enable: bad size or alignment, or the ring outside the DMA mappings"),
    ("FAULT", 4, "a ring read or write failed (DMA error, or guest memory gone: SIGBUS)"),
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
VEC_ITR_MAX_US = 1_000_000      # larger values are clamped
VEC_ITR = Register("VEC_ITR", 0, 4, "RW", 0,
                   "minimum microseconds between two messages on the vector (0: none)")

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
            assert f.offset >= pos, (self.name, f.name)
            fmt += _FMT.get(f.size, f"{f.size}s")   # other sizes: byte strings
            pos = f.offset + f.size
        if self.size > pos:
            fmt += f"{self.size - pos}x"
        object.__setattr__(self, "_struct", struct.Struct(fmt))
        object.__setattr__(self, "_defaults", tuple(0 if f.size in _FMT else b"" for f in self.fields))
        assert self._struct.size == self.size, self.name

    def pack(self, **values) -> bytes:
        return self._struct.pack(*(values.get(f.name, d) for f, d in zip(self.fields, self._defaults)))

    def pack_into(self, buf, offset: int, **values) -> None:
        self._struct.pack_into(buf, offset, *(values.get(f.name, d)
                                              for f, d in zip(self.fields, self._defaults)))

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
MTU_MIN = 68            # the smallest IPv4 MTU (RFC 791)
MTU_MAX = 9216          # jumbo frames
FRAME_OVERHEAD = 18     # Ethernet header and one VLAN tag: a frame is at most MTU + 18 bytes
MAX_FRAME = MTU_MAX + FRAME_OVERHEAD

# Who may read what when: the driver and the device run at once on shared memory,
# so each ring has one word that hands an entry over, stored last by the writer
# and loaded first by the reader (chimney/device/fastpath.c and toe.py, and
# chimney/guest/miniport.py and offload.py follow these; docs/datasheet.md lists them).
RING_ORDERING = (
    ("Every hand-over of ring entries has one word that makes it: TAIL hands entries to the "
     "device (TX, RX and the to-device offload rings), a descriptor's status word hands a TX or RX "
     "descriptor back, HEAD hands to-host entries (CMDC, EVENT, OCOMPL) to the driver. The "
     "writer stores everything else first (buffer data, then the entry's other fields) and the "
     "hand-over word last, in one aligned store of its full width (16 bits for a status word, 32 "
     "for TAIL/HEAD: never byte by byte) and with release ordering (in C "
     "`__atomic_store_n(..., __ATOMIC_RELEASE)`)."),
    ("The reader loads the hand-over word first, in one aligned load, and only once it says the "
     "entry is ready (DD set; the index past the entry) loads the entry's other fields and its "
     "buffer, with acquire ordering (in C an acquire load or `__atomic_thread_fence(__ATOMIC_ACQUIRE)` "
     "after it). An RX descriptor loaded the other way round can show the length the driver posted "
     "(0) next to a status already done: the frame would be lost."),
    ("Python drivers have no fences: they rely on x86's store and load ordering (stores are seen "
     "in program order, loads are not reordered with other loads) plus single aligned accesses "
     "through a memoryview of the right item size (`memoryview(ring).cast(\"H\")` for status words, "
     "`hw.Words` for the doorbell page); `struct` packs and unpacks byte by byte."),
    ("An entry goes back to its owner only by the hand-over word: the device writes an RX or TX "
     "descriptor only while it is between HEAD and TAIL, and never touches it again after its "
     "status store; the driver reuses a TX buffer only after DD, and returns to-host entries "
     "(TAIL) only after it has read them."),
)

# --- TCP chimney offload (interface 1.1) ----------------------------------------
# Rings "to-device" work like TX: the driver writes entries and advances
# DB_TAIL[qid]; the device consumes them and mirrors its index in DB_HEAD[qid].
# Rings "to-host" (CMDC, EVENT, OCOMPL) run the other way: the device writes
# entry DB_HEAD[qid] % size and then advances DB_HEAD[qid]; the driver reads
# entries below DB_HEAD and returns them by advancing DB_TAIL[qid] (entries
# consumed, free-running).  The device never overwrites an entry the driver
# has not returned: when a to-host ring is full it holds its records back, in
# order, and writes them as the driver frees space (nothing is dropped).
#
# Objects (docs/chimney-model.md, "State objects"): neighbour, path and TCP
# connection.  Each has the host's handle (u64, chosen by the driver, returned
# in every completion and indication) and the NIC's context (u32, returned by
# Initiate, passed in every request).  Context 0 is never used.
OBJ_TYPES = _bits(
    ("NEIGHBOR", 1, "neighbour: link-layer addresses, reachability"),
    ("PATH", 2, "path: source and destination IP address, path MTU"),
    ("TCP", 3, "TCP connection: const, cached and delegated state, send and receive data"),
)
OBJ_NONE = 0xFFFFFFFF       # parent field: no parent / context field: none

CMD_OPCODES = _bits(
    ("INITIATE", 1, "offload a state tree (request: ObjRecord list); response: ObjStatus per object"),
    ("UPDATE", 2, "change cached state (request: ObjRecord list with nic_ctx and cached part)"),
    ("QUERY", 3, "read state (request: u32 contexts); response: ObjRecord per object, no data"),
    ("INVALIDATE", 4, "cached state is stale (request: u32 contexts); dependents ask for upload"),
    ("TERMINATE", 5, "upload (request: u32 contexts); response: ObjRecord per object with its data"),
    ("SET_PARAMS", 6, "global parameters (request: OffloadParams)"),
    ("RSS_TABLE", 7, "indirection table (request: u8 queue per hash bucket, 128 buckets)"),
)
STATUS_CODES = _bits(
    ("SUCCESS", 0, "done"),
    ("PENDING", 1, "not finished (never in a completion record)"),
    ("PARTIAL", 2, "some objects of the request failed; see each ObjStatus"),
    ("RESOURCES", 3, "out of NIC resources (connections, buffer memory)"),
    ("FAILURE", 4, "refused (e.g. a TCP state that cannot be offloaded, a parent that failed)"),
    ("INVALID_HANDLE", 5, "unknown or stale NIC context"),
    ("INVALID_REQUEST", 6, "malformed request (bad opcode, length, object type, field)"),
    ("DMA_ERROR", 7, "a buffer address outside every DMA mapping"),
    ("NO_SPACE", 8, "the response buffer is too small; nothing was changed"),
    ("UPLOAD_IN_PROGRESS", 9, "the connection is being (or was) uploaded"),
    ("ABORTED", 10, "the connection was reset; outstanding I/O is returned"),
    ("UPLOADED", 11, "the connection was terminated; the data is in the Terminate response"),
    ("BUSY", 12, "an update of this object is still in progress"),
)
EVENT_KINDS = _bits(
    ("DISCONNECT", 1, "the peer sent FIN; all earlier data was consumed"),
    ("ABORT", 2, "the peer sent an acceptable RST; outstanding I/O completes as ABORTED"),
    ("RETRIEVE", 3, "the NIC asks the host to upload the connection; `reason` says why"),
    ("SEND_BACKLOG", 4, "preferred outstanding send bytes changed (value)"),
    ("NEIGH_REACH_QUERY", 5, "is this neighbour still reachable? answer with UPDATE"),
    ("PAUSE", 6, "status: stop initiating offloads (in-flight initiates still accepted)"),
    ("RESUME", 7, "status: offloads welcome again"),
    ("UPLOAD_ALL", 8, "status: upload every connection"),
    ("TIME_WAIT", 9, "the connection reached TIME-WAIT and must be uploaded (handed back)"),
)
RETRIEVE_REASONS = _bits(
    ("HARDWARE_FAILURE", 1, "must upload"),
    ("INVALID_STATE", 2, "must upload (also: its cached state was invalidated)"),
    ("URGENT_DATA", 3, "must upload: urgent data received"),
    ("TIMEOUT", 4, "must upload: MaxRT, persist or FIN-WAIT-2 timer expired"),
    ("UPLOAD_REQUESTED", 5, "must upload: requested through the NIC's own management"),
    ("HIGH_DROP_RATE", 6, "may upload"),
    ("HIGH_FRAGMENTATION", 7, "may upload"),
    ("OUT_OF_ORDER", 8, "may upload: many out-of-order segments"),
    ("LOW_ACTIVITY", 9, "may upload"),
    ("NO_RECEIVES", 10, "may upload: no receive buffers posted"),
    ("SMALL_IO", 11, "may upload"),
)
OSEND_FLAGS = _bits(
    ("SEND", 1 << 0, "send `len` bytes at `addr` (PSH at the end)"),
    ("DISCONNECT", 1 << 1, "graceful disconnect: FIN after all queued data (no buffer)"),
    ("ABORT", 1 << 2, "abortive disconnect: RST, outstanding I/O completes as ABORTED"),
    ("FORWARD", 1 << 3, ("a received TCP segment (header and payload, `len` bytes at `addr`) "
                         "the host stack parsed for the connection: processed as if it came "
                         "off the wire (alone)")),
)
ORECV_FLAGS = _bits(
    ("POST", 1 << 0, "post a receive buffer of `len` bytes at `addr` for connection `ctx`"),
    ("NO_PUSH", 1 << 1, "with POST: complete only when full (default: push mode)"),
    ("POOL", 1 << 2, "give an indication buffer to the queue's pool (ctx ignored)"),
    ("ACCEPT", 1 << 3, "answer an indication on `ctx`: `len` bytes consumed (0 = refuse)"),
)
OCOMPL_KINDS = _bits(
    ("SEND_DONE", 1, "a send request completed (acknowledged by the peer), or was returned"),
    ("RECV_DONE", 2, "a posted receive completed with `len` bytes (PUSH flag if pushed)"),
    ("INDICATE", 3, "data with no receive posted: `len` bytes in pool buffer `tag`"),
    ("POOL_RETURN", 4, "a pool buffer comes back unused (reset, terminate)"),
    ("ERROR", 5, "a request on this queue was refused; status says why"),
)
OCOMPL_FLAGS = _bits(
    ("PUSH", 1 << 0, "the data ended at a PSH, or the push timer fired"),
    ("FIN", 1 << 1, "the peer's FIN follows this data"),
)
NEIGH_FLAGS = _bits(("VLAN", 1 << 0, "vlan_id is valid"),)
TCP_CONST_FLAGS = _bits(
    ("TIMESTAMPS", 1 << 0, "timestamps negotiated (RFC 7323)"),
    ("SACK", 1 << 1, "SACK permitted negotiated (RFC 2018)"),
    ("WINDOW_SCALING", 1 << 2, "window scaling negotiated (RFC 7323)"),
)
TCP_CACHED_FLAGS = _bits(
    ("KEEPALIVE", 1 << 0, "keep-alive on"),
    ("NAGLE", 1 << 1, "Nagle on"),
    ("KEEPALIVE_RESTART", 1 << 2, "restart the keep-alive timer (Update)"),
    ("MAXRT_RESTART", 1 << 3, "restart the MaxRT timer (Update)"),
    ("UPDATE_RCV_WND", 1 << 4, "initial_rcv_wnd changed (Update)"),
)
TCP_DELEGATED_FLAGS = _bits(
    ("FIN_QUEUED", 1 << 0, "the host asked for FIN after the data"),
    ("IN_RECOVERY", 1 << 1, "NewReno fast recovery (RFC 6582)"),
)
TCP_STATES = ("CLOSED", "LISTEN", "SYN-SENT", "SYN-RECEIVED", "ESTABLISHED", "FIN-WAIT-1",
              "FIN-WAIT-2", "CLOSE-WAIT", "CLOSING", "LAST-ACK", "TIME-WAIT")

CmdDesc = Layout("CmdDesc", 32, "one state-manipulation command", (
    Field("opcode", 0, 2, "CMD_OPCODES"),
    Field("flags", 2, 2, "0"),
    Field("tag", 4, 4, "driver's command id, echoed in the completion"),
    Field("req_addr", 8, 8, "request buffer (guest bus address)"),
    Field("req_len", 16, 4, "request bytes"),
    Field("resp_len", 20, 4, "response buffer capacity"),
    Field("resp_addr", 24, 8, "response buffer (guest bus address; 0 if resp_len is 0)"),
))
CmdCompl = Layout("CmdCompl", 16, "a command's completion on CMDC", (
    Field("tag", 0, 4, "the command's tag"),
    Field("opcode", 4, 2, "the command's opcode"),
    Field("status", 6, 2, "STATUS_CODES: overall result"),
    Field("resp_bytes", 8, 4, "bytes written to the response buffer"),
    Field("count", 12, 4, "objects processed"),
))
ObjRecord = Layout("ObjRecord", 32, "header of one object in a request or response buffer; "
                   "the object's state follows (NeighState, PathState or TcpConstState + "
                   "TcpCachedState + TcpDelegatedState), then for TCP send_len and recv_len "
                   "bytes of data; records are padded to 8 bytes", (
    Field("type", 0, 1, "OBJ_TYPES"),
    Field("link", 1, 1, "1: the object is already offloaded (nic_ctx), no state follows"),
    Field("status", 2, 2, "STATUS_CODES (responses)"),
    Field("parent", 4, 4, "index of the parent record in this buffer, or its NIC context if "
          "the parent is a link, OBJ_NONE for a neighbour"),
    Field("host_handle", 8, 8, "the host's handle"),
    Field("nic_ctx", 16, 4, "the NIC's context (links, Update; responses)"),
    Field("state_len", 20, 4, "bytes of state that follow this header"),
    Field("data_len", 24, 4, "bytes of TCP data after the state (send_len + recv_len)"),
))
ObjStatus = Layout("ObjStatus", 16, "Initiate response: one per object, in request order", (
    Field("status", 0, 2, "STATUS_CODES"),
    Field("type", 2, 1, "OBJ_TYPES"),
    Field("nic_ctx", 4, 4, "the NIC's context for this object (0 on failure)"),
    Field("host_handle", 8, 8, "the host's handle"),
))
NeighState = Layout("NeighState", 24, "neighbour: const, cached, delegated", (
    Field("src_mac", 0, 6, "const: our link-layer address"),
    Field("vlan_id", 6, 2, "const: VLAN id (flags.VLAN)"),
    Field("dst_mac", 8, 6, "cached: the neighbour's link-layer address"),
    Field("flags", 14, 2, "NEIGH_FLAGS"),
    Field("host_reach_delta", 16, 4, "cached: ticks since the host saw it reachable"),
    Field("nic_reach_delta", 20, 4, "delegated: ticks since the NIC saw it reachable"),
))
PathState = Layout("PathState", 40, "path: const, cached", (
    Field("src_ip", 0, 16, "const: source address (IPv4 as ::ffff:a.b.c.d)"),
    Field("dst_ip", 16, 16, "const: destination address"),
    Field("path_mtu", 32, 4, "cached: path MTU"),
    Field("flags", 36, 4, "bit 0: IPv6"),
))
TcpConstState = Layout("TcpConstState", 16, "TCP const state", (
    Field("local_port", 0, 2, ""),
    Field("remote_port", 2, 2, ""),
    Field("flags", 4, 2, "TCP_CONST_FLAGS"),
    Field("snd_wscale", 6, 1, "shift applied to the peer's window"),
    Field("rcv_wscale", 7, 1, "shift applied to our window"),
    Field("remote_mss", 8, 2, "the peer's MSS"),
    Field("rss_hash", 12, 4, "RSS (Toeplitz) hash computed by the host"),
))
TcpCachedState = Layout("TcpCachedState", 40, "TCP cached state (times in ticks)", (
    Field("flags", 0, 2, "TCP_CACHED_FLAGS"),
    Field("ttl", 2, 1, "TTL / hop limit"),
    Field("tos", 3, 1, "TOS / traffic class"),
    Field("initial_rcv_wnd", 4, 4, ""),
    Field("rcv_indicate_size", 8, 4, "hint for indications (0: as much as possible)"),
    Field("ka_probe_count", 12, 4, ""),
    Field("ka_timeout", 16, 4, ""),
    Field("ka_interval", 20, 4, ""),
    Field("max_rt", 24, 4, ""),
    Field("flow_label", 28, 4, ""),
    Field("user_priority", 32, 1, ""),
))
_DELEGATED_U32 = ("rcv_nxt", "rcv_wnd", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "max_snd_wnd",
                  "snd_wl1", "cwnd", "ssthresh", "srtt", "rttvar", "ts_recent", "ts_recent_age",
                  "ts_time", "total_rt", "dup_ack_count", "window_probe_count", "ka_probe_count",
                  "ka_timeout_delta", "retransmit_count", "retransmit_delta", "recover",
                  "snd_backlog", "rcv_backlog", "send_len", "recv_len")
TcpDelegatedState = Layout("TcpDelegatedState", 4 + 4 * len(_DELEGATED_U32) + 4,
                           "TCP delegated state (timer deltas: 0xffffffff = not running); "
                           "send_len bytes of send data from SND.UNA, then recv_len bytes of "
                           "buffered receive data ending at RCV.NXT, follow the record", (
    Field("state", 0, 1, "index in TCP_STATES"),
    Field("flags", 1, 1, "TCP_DELEGATED_FLAGS"),
    *(Field(n, 4 + 4 * i, 4, "") for i, n in enumerate(_DELEGATED_U32)),
))
OffloadParams = Layout("OffloadParams", 32, "SET_PARAMS: the chimney's global parameters", (
    Field("ticks_per_second", 0, 4, "timer unit (1000)"),
    Field("ack_frequency", 4, 4, "ACK at least every this many full segments"),
    Field("delayed_ack_ticks", 8, 4, ""),
    Field("max_retransmits", 12, 4, ""),
    Field("dupack_threshold", 16, 4, ""),
    Field("push_ticks", 20, 4, "push timer for push-mode receives"),
    Field("neigh_stale_ticks", 24, 4, ""),
    Field("rto_min_ticks", 28, 4, "lower bound of the RTO (beyond the spec; default 1000)"),
))
OSendDesc = Layout("OSendDesc", 32, "an offload send or disconnect request", (
    Field("ctx", 0, 4, "the connection's NIC context"),
    Field("flags", 4, 2, "OSEND_FLAGS"),
    Field("addr", 8, 8, "data (SEND), the TCP segment (FORWARD)"),
    Field("len", 16, 4, "bytes (SEND, FORWARD)"),
    Field("tag", 20, 4, "driver's request id, echoed in SEND_DONE"),
))
ORecvDesc = Layout("ORecvDesc", 32, "a posted receive, an indication buffer or an indication answer", (
    Field("ctx", 0, 4, "the connection's NIC context (POST, ACCEPT)"),
    Field("flags", 4, 2, "ORECV_FLAGS"),
    Field("addr", 8, 8, "buffer (POST, POOL)"),
    Field("len", 16, 4, "buffer bytes (POST, POOL); bytes consumed (ACCEPT)"),
    Field("tag", 20, 4, "driver's id, echoed in RECV_DONE / INDICATE / POOL_RETURN"),
))
OComplRec = Layout("OComplRec", 32, "an offload completion or indication on OCOMPL", (
    Field("kind", 0, 1, "OCOMPL_KINDS"),
    Field("flags", 1, 1, "OCOMPL_FLAGS"),
    Field("status", 2, 2, "STATUS_CODES"),
    Field("tag", 4, 4, "the request's tag (SEND_DONE, RECV_DONE) or pool buffer's (INDICATE)"),
    Field("host_handle", 8, 8, "the connection's host handle"),
    Field("len", 16, 4, "bytes sent / received / indicated"),
    Field("ctx", 20, 4, "the connection's NIC context"),
))
EventRec = Layout("EventRec", 32, "an event indication on EVENT", (
    Field("kind", 0, 2, "EVENT_KINDS"),
    Field("reason", 2, 2, "RETRIEVE_REASONS (RETRIEVE)"),
    Field("ctx", 4, 4, "the object's NIC context (0 for status events)"),
    Field("host_handle", 8, 8, "the object's host handle"),
    Field("value", 16, 4, "SEND_BACKLOG: bytes"),
))
# What the device does beyond the layouts above: the rules a driver must follow
# (chimney/device/toe.py implements them; docs/datasheet.md lists them).
OFFLOAD_RULES = (
    "Contexts are a 20-bit slot plus a 12-bit generation (bits 31:20); a terminated context is "
    "stale at once (INVALID_HANDLE) and its slot is reused last.",
    "INITIATE: one ObjStatus per record, in order; a record whose parent failed gets FAILURE; "
    "TCP in CLOSED, LISTEN, SYN-SENT, SYN-RECEIVED or TIME-WAIT gets FAILURE; a 4-tuple already "
    "offloaded gets FAILURE; VLAN neighbours get FAILURE (no tagging). Overall status: SUCCESS, "
    "PARTIAL, or FAILURE when every record failed. resp_len below 16 x records: NO_SPACE, nothing done.",
    "QUERY and TERMINATE responses: one ObjRecord per requested context, in order, `parent` = the "
    "parent's NIC context (OBJ_NONE for a neighbour), so parse them record by record "
    "(chimney.staterec.codec.decode_records with tree=False), not as a tree. An unknown context gives a header-only "
    "record (type NEIGHBOR, status INVALID_HANDLE, nic_ctx = the context). QUERY leaves the data "
    "out (send_len/recv_len still give the sizes); TERMINATE carries it. Too small a response "
    "buffer: NO_SPACE and nothing is terminated.",
    "UPDATE: ObjRecords with nic_ctx and the object's full state; only cached fields are taken "
    "(neighbour dst_mac and host_reach_delta, path MTU, TCP cached); a path's parent, when not "
    "NONE32, is the context of the neighbour the path moves to.",
    "TERMINATE of a TCP connection: its outstanding OSEND requests complete SEND_DONE status "
    "UPLOADED (their bytes are in send_buffer, after the unacknowledged ones); its posted receives "
    "complete RECV_DONE status UPLOADED with len = bytes already written into the buffer (valid "
    "stream data just before recv_buffer). Bytes of an unanswered INDICATE are still in "
    "recv_buffer. A neighbour or path with live dependents gets FAILURE (terminate dependents "
    "first, or earlier in the same list).",
    "Each pass the device takes ORECV, then OSEND, then CMD entries: a request posted before a "
    "TERMINATE's doorbell is normally part of the upload. A request that arrives for a connection "
    "terminated lately completes (SEND_DONE / RECV_DONE) with status UPLOAD_IN_PROGRESS and len 0: "
    "its data was not taken (ACCEPT: nothing consumed); for an unknown context it is an ERROR "
    "with INVALID_HANDLE.",
    "OSEND: SEND and DISCONNECT may be combined (FIN after the data); the request completes when "
    "its last byte (DISCONNECT alone: the FIN) is acknowledged. ABORT sends RST, completes every "
    "outstanding request ABORTED, and itself completes SUCCESS.",
    ("OSEND FORWARD (never combined with another flag): a segment of the connection the NIC did not "
     "take off the wire because only the host can parse its IP layer (IPv4 options, fragments "
     "reassembled by the host, IPv6 extension headers) or because it arrived while the host "
     "handed the connection over. The buffer holds the TCP header and payload (20..65535 bytes, "
     "the data offset inside it, source port = the remote port, destination port = the local "
     "port); the checksum is not checked (the host did), the addresses are the connection's. "
     "It is processed exactly as a received segment, then completes SEND_DONE SUCCESS with len = "
     "its bytes; a malformed one ERROR INVALID_REQUEST (nothing processed), one for a reset "
     "connection SEND_DONE ABORTED."),
    "INDICATE hands the pool buffer to the host; give it back with another POOL. Every INDICATE "
    "must be answered with ACCEPT (len = bytes consumed, 0 = refuse); until then the connection's "
    "posted receives are not filled either. After a partial ACCEPT or a refusal nothing is "
    "indicated until the next POST on that connection.",
    "Receive side scaling: a connection's completions and indications go to "
    "OCOMPL[rss_table[rss_hash & 127]] (queue 0 by default) whatever queue the request came on, "
    "and its indications use that queue's pool. Requests are taken queue by queue (ORECV 0-7, "
    "then OSEND 0-7), so a driver keeps a connection's requests on one queue until the device "
    "took the last of them (HEAD past it) before it uses another. After an RSS_TABLE change a "
    "connection moves, with its posted receives, sends and indication outstanding (they belong to "
    "the connection, not to a queue), as soon as none of its records still waits in the device for "
    "room on the old OCOMPL ring; its first record on the new queue is thus written after its last "
    "one on the old (HEAD of the old ring already past it). The order of its records is its "
    "delivery order: a driver that reads a record of a connection on another queue than the "
    "connection's previous records must first read the old queue up to its HEAD; then data is "
    "delivered in the order received whichever queue it serves first. Refusals (ERROR) and "
    "UPLOAD_IN_PROGRESS answers go to the OCOMPL queue paired with the request's queue.",
    "A to-device TAIL more than the ring size ahead of HEAD is ignored (nothing consumed) and "
    "reported once: a CMDC or OCOMPL ERROR record with status INVALID_REQUEST and tag 0xffffffff, "
    "CAUSE.QUEUE_ERROR and the misc vector; the queue keeps running once TAIL is sane again.",
    "Events: DISCONNECT once the peer's FIN arrived and all earlier data was consumed; ABORT on an "
    "acceptable RST (outstanding I/O ABORTED); RETRIEVE TIMEOUT when retransmission, keep-alive or "
    "FIN-WAIT-2 gives up (no RST is sent, the state is kept for TERMINATE); RETRIEVE INVALID_STATE "
    "after INVALIDATE (the connection stops sending) and when the connection reached CLOSED without "
    "a reset (LAST-ACK acknowledged); RETRIEVE URGENT_DATA; TIME_WAIT; SEND_BACKLOG when "
    "max(cwnd, snd_wnd) doubled or halved since the last one, at most every 100 ms.",
    "NEIGH_REACH_QUERY (ctx = the neighbour): with neigh_stale_ticks set, before sending on a "
    "connection whose neighbour neither the NIC (segments making progress) nor the host (UPDATE's "
    "host_reach_delta) saw reachable within that many ticks; once, until an UPDATE of the "
    "neighbour answers it. Sending goes on meanwhile.",
    "Status events (ctx 0): PAUSE when the connection table is 90 % full or the link goes down "
    "(INITIATE goes on: RESOURCES once full), RESUME once the link is up and the table below 80 % "
    "again. UPLOAD_ALL when the link goes down (after that PAUSE): upload every connection.",
    "Once a connection is in TIME-WAIT, CLOSED, aborted or terminated, its segments are no "
    "longer steered to the TOE: they reach the RX ring.",
    "SET_PARAMS: zero fields keep their value; ticks_per_second must be 0 or 1000. Defaults: "
    "rto_min 1000, push_ticks 500, delayed ACK 200, max_retransmits 15, dupack_threshold 3.",
)
# The port's link (chimney/device/nic.py and toe.py implement it; docs/datasheet.md lists it).
LINK_RULES = (
    "STATUS.LINK_UP is set while the wire backend is attached and its link is up. The link goes "
    "down and up only by the device's own management (the control socket of `chimney device`), "
    "as a cable pull would; a device without a wire backend has no link. CTRL.RESET leaves the "
    "link as it is.",
    "While the link is down nothing crosses the wire: frames the driver or the TOE send are "
    "dropped (tx_drops), frames arriving are lost before the MAC (no RX ring, no TOE, no pcap). "
    "Queues, commands and timers keep running; offloaded connections keep their state and "
    "retransmit into the void.",
    "Each change of STATUS.LINK_UP sets CAUSE.LINK and fires the misc vector.",
    "With TCP_OFFLOAD, link down writes the status events PAUSE (unless paused already) and "
    "UPLOAD_ALL to the EVENT queue: the host should upload every connection and carry on in "
    "software (its frames are dropped too until the link returns). Link up writes RESUME once "
    "the connection table is also below 80 %: offloads are welcome again. Both only while "
    "CTRL.ENABLE is set: a driver that enables the device later reads STATUS.LINK_UP.",
)
OFFLOAD_LAYOUTS = (CmdDesc, CmdCompl, ObjRecord, ObjStatus, NeighState, PathState, TcpConstState,
                   TcpCachedState, TcpDelegatedState, OffloadParams, OSendDesc, ORecvDesc,
                   OComplRec, EventRec)
LAYOUTS = (TxDesc, RxDesc) + OFFLOAD_LAYOUTS
LAYOUT_BY_NAME = {lay.name: lay for lay in LAYOUTS}
RING_ENTRY = {k.name: LAYOUT_BY_NAME[k.entry] for k in QUEUE_KINDS}   # the entry layout per queue kind


def bit(bits: tuple[Bit, ...], name: str) -> int:
    return next(b.mask for b in bits if b.name == name)


def reg(name: str) -> Register:
    return next(r for r in REGISTERS if r.name == name)


def qreg(qid: int, name: str) -> int:
    """BAR0 offset of a queue register."""
    return Q_BASE + qid * Q_STRIDE + next(r.offset for r in QUEUE_REGISTERS if r.name == name)


def stat_offset(name: str) -> int:
    return STATS_BASE + 8 * STAT_INDEX[name]


# The tables' module-level names (CTRL_ENABLE, REG_CTRL, QREG_SIZE, QSTOP_FAULT, ...),
# spelled out so they can be grepped.  `python -m chimney.hw` rewrites the block
# from the tables; tests/test_datasheet.py checks it is current.
NAMED_BITS = (("CTRL", CTRL_BITS), ("STATUS", STATUS_BITS), ("CAUSE", CAUSE_BITS),
              ("FEAT", FEATURE_BITS), ("QSTATUS", Q_STATUS_BITS), ("QCTRL", Q_CTRL_BITS),
              ("QSTOP", QUEUE_STOP_CODES),
              ("TXF", TX_FLAGS), ("RXF", RX_FLAGS), ("DESC", DESC_STATUS),
              ("OBJ", OBJ_TYPES), ("CMD", CMD_OPCODES), ("ST", STATUS_CODES),
              ("EV", EVENT_KINDS), ("RR", RETRIEVE_REASONS), ("OSF", OSEND_FLAGS),
              ("ORF", ORECV_FLAGS), ("OC", OCOMPL_KINDS), ("OCF", OCOMPL_FLAGS),
              ("NEIGHF", NEIGH_FLAGS), ("TCF", TCP_CONST_FLAGS),
              ("TCCF", TCP_CACHED_FLAGS), ("TCDF", TCP_DELEGATED_FLAGS))
# --- names: generated by `python -m chimney.hw`; do not edit ---
REG_ID = 0x0
REG_VERSION = 0x4
REG_FEATURES = 0x8
REG_CTRL = 0x10
REG_STATUS = 0x14
REG_MAC_LO = 0x18
REG_MAC_HI = 0x1c
REG_MTU = 0x20
REG_KICK = 0x24
REG_CAUSE = 0x28
REG_NUM_QUEUES = 0x2c
REG_NUM_VECTORS = 0x30
REG_DMA_ERR_ADDR = 0x40
REG_DMA_ERR_INFO = 0x48
QREG_BASE_LO = 0x0
QREG_BASE_HI = 0x4
QREG_SIZE = 0x8
QREG_CTRL = 0xc
QREG_VECTOR = 0x10
QREG_STATUS = 0x14
QREG_HEAD = 0x18
CTRL_ENABLE = 0x1
CTRL_RESET = 0x2
CTRL_PROMISC = 0x4
STATUS_READY = 0x1
STATUS_LINK_UP = 0x2
STATUS_ENABLED = 0x4
CAUSE_LINK = 0x1
CAUSE_DMA_ERROR = 0x2
CAUSE_QUEUE_ERROR = 0x4
FEAT_PLAIN_FRAMES = 0x1
FEAT_MSIX_MODERATION = 0x2
FEAT_DOORBELL_PAGE = 0x4
FEAT_SCATTER_GATHER = 0x8
FEAT_TCP_OFFLOAD = 0x10000
QSTATUS_ENABLED = 0x1
QSTATUS_ERROR = 0x2
QCTRL_ENABLE = 0x1
QSTOP_RING_DMA = 0x1
QSTOP_BAD_INDEX = 0x2
QSTOP_INVALID = 0x3
QSTOP_FAULT = 0x4
TXF_EOP = 0x1
RXF_EOP = 0x1
DESC_DD = 0x1
DESC_DMA_ERR = 0x2
DESC_LEN_ERR = 0x4
OBJ_NEIGHBOR = 0x1
OBJ_PATH = 0x2
OBJ_TCP = 0x3
CMD_INITIATE = 0x1
CMD_UPDATE = 0x2
CMD_QUERY = 0x3
CMD_INVALIDATE = 0x4
CMD_TERMINATE = 0x5
CMD_SET_PARAMS = 0x6
CMD_RSS_TABLE = 0x7
ST_SUCCESS = 0x0
ST_PENDING = 0x1
ST_PARTIAL = 0x2
ST_RESOURCES = 0x3
ST_FAILURE = 0x4
ST_INVALID_HANDLE = 0x5
ST_INVALID_REQUEST = 0x6
ST_DMA_ERROR = 0x7
ST_NO_SPACE = 0x8
ST_UPLOAD_IN_PROGRESS = 0x9
ST_ABORTED = 0xa
ST_UPLOADED = 0xb
ST_BUSY = 0xc
EV_DISCONNECT = 0x1
EV_ABORT = 0x2
EV_RETRIEVE = 0x3
EV_SEND_BACKLOG = 0x4
EV_NEIGH_REACH_QUERY = 0x5
EV_PAUSE = 0x6
EV_RESUME = 0x7
EV_UPLOAD_ALL = 0x8
EV_TIME_WAIT = 0x9
RR_HARDWARE_FAILURE = 0x1
RR_INVALID_STATE = 0x2
RR_URGENT_DATA = 0x3
RR_TIMEOUT = 0x4
RR_UPLOAD_REQUESTED = 0x5
RR_HIGH_DROP_RATE = 0x6
RR_HIGH_FRAGMENTATION = 0x7
RR_OUT_OF_ORDER = 0x8
RR_LOW_ACTIVITY = 0x9
RR_NO_RECEIVES = 0xa
RR_SMALL_IO = 0xb
OSF_SEND = 0x1
OSF_DISCONNECT = 0x2
OSF_ABORT = 0x4
OSF_FORWARD = 0x8
ORF_POST = 0x1
ORF_NO_PUSH = 0x2
ORF_POOL = 0x4
ORF_ACCEPT = 0x8
OC_SEND_DONE = 0x1
OC_RECV_DONE = 0x2
OC_INDICATE = 0x3
OC_POOL_RETURN = 0x4
OC_ERROR = 0x5
OCF_PUSH = 0x1
OCF_FIN = 0x2
NEIGHF_VLAN = 0x1
TCF_TIMESTAMPS = 0x1
TCF_SACK = 0x2
TCF_WINDOW_SCALING = 0x4
TCCF_KEEPALIVE = 0x1
TCCF_NAGLE = 0x2
TCCF_KEEPALIVE_RESTART = 0x4
TCCF_MAXRT_RESTART = 0x8
TCCF_UPDATE_RCV_WND = 0x10
TCDF_FIN_QUEUED = 0x1
TCDF_IN_RECOVERY = 0x2
# --- end of generated names ---

def c_header() -> str:
    """The definitions the C fast path needs, generated so they cannot drift."""
    out = ["/* generated from chimney/hw.py by chimney/device/fastpath_build.py; do not edit */",
           "#ifndef CHIMNEY_HW_H", "#define CHIMNEY_HW_H"]
    for L in LAYOUTS:
        out.append(f"#define {L.name.upper()}_SIZE {L.size}")
        for f in L.fields:
            out.append(f"#define {L.name.upper()}_{f.name.upper()} {f.offset}")
    out += [f"#define REG_{r.name} {r.offset:#x}" for r in REGISTERS]
    out += [f"#define QREG_{r.name.removeprefix('Q_')} {r.offset:#x}" for r in QUEUE_REGISTERS]
    for n, v in (("STATS_BASE", STATS_BASE), ("Q_BASE", Q_BASE), ("Q_STRIDE", Q_STRIDE),
                 ("VEC_ITR_BASE", VEC_ITR_BASE), ("VEC_ITR_STRIDE", VEC_ITR_STRIDE),
                 ("DB_TAIL_BASE", DB_TAIL_BASE), ("DB_HEAD_BASE", DB_HEAD_BASE),
                 ("DB_ARM_BASE", DB_ARM_BASE), ("DB_NEED_KICK", DB_NEED_KICK),
                 ("DB_HEARTBEAT", DB_HEARTBEAT)):
        out.append(f"#define {n} {v:#x}")
    for prefix, bits in (("TXF", TX_FLAGS), ("RXF", RX_FLAGS), ("DESC", DESC_STATUS),
                         ("QSTATUS", Q_STATUS_BITS), ("QSTOP", QUEUE_STOP_CODES)):
        for b in bits:
            out.append(f"#define {prefix}_{b.name} {b.mask:#x}")
    for name, _ in STATS:
        out.append(f"#define STAT_{name.upper()} {STAT_INDEX[name]}")
    out.append(f"#define NUM_STATS {len(STATS)}")
    out.append(f"#define MAX_FRAME {MAX_FRAME}")
    out.append("#endif")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    from .hwgen import main
    main()
