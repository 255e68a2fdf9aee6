"""The device's queues as its Python code sees them: where each ring is, the
driver's index on the doorbell page, the check of an index against the ring
size, and the moving of entries between a ring and the device.

The C fast path moves TX/RX descriptors itself (struct fp_queue, which a Ring
owns); the Python side of those queues (enable, indices, the head mirror) and
every ring the TOE serves (CMD/CMDC, EVENT, OSEND/ORECV/OCOMPL) go through here.
Indices are free-running u32s: a to-device ring has (TAIL - HEAD) entries
posted, a to-host ring (HEAD - TAIL) entries the driver has not returned.
Either more than the ring size is a bad index.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from .. import hw
from ._fastpath import ffi

log = logging.getLogger("chimney.device.ring")

MASK32 = 0xFFFFFFFF
_QRESET = {r.name: r.reset for r in hw.QUEUE_REGISTERS}


class RingIrq(Protocol):
    """What the rings report to the NIC (its interrupts and error registers)."""

    def raise_vector(self, v: int) -> None: ...
    def queue_error(self) -> None: ...
    def ring_stopped(self, qid: int, addr: int, what: str) -> None: ...


class Ring:
    """One queue: its registers' state and the fast path's view of it (fp)."""

    def __init__(self, qid: int):
        self.qid = qid
        self.kind = hw.queue_kind(qid)
        self.fp = ffi.new("struct fp_queue *")
        self.fp.qid = qid
        self.reset()

    def reset(self):
        self.base = _QRESET["Q_BASE_HI"] << 32 | _QRESET["Q_BASE_LO"]
        self.size = _QRESET["Q_SIZE"]
        self.ctrl = _QRESET["Q_CTRL"]
        self.vector = _QRESET["Q_VECTOR"]
        self.enabled = False
        self.fp.error = 0
        self.fp.head = 0
        self.fp.completed = 0
        self.notified = 0       # fp.completed when we last raised the vector

    @property
    def status(self) -> int:
        s = hw.QSTATUS_ENABLED if self.enabled else 0
        return s | (hw.QSTATUS_ERROR if self.fp.error else 0)

    @property
    def entry_size(self) -> int:
        return hw.RING_ENTRY[self.kind.name].size

    def write_base_lo(self, val: int) -> None:
        self.base = (self.base & ~0xFFFFFFFF) | val

    def write_base_hi(self, val: int) -> None:
        self.base = (self.base & 0xFFFFFFFF) | (val << 32)

    def write_size(self, val: int) -> None:
        self.size = val

    def write_vector(self, val: int) -> None:
        self.vector = val if val < hw.MSIX_VECTORS else self.vector


class Rings:
    """Every queue of the device, the doorbell page they share, guest memory."""

    def __init__(self, dbw: hw.Words, dma, irq: RingIrq):
        self.dbw = dbw
        self.dma = dma
        self.irq = irq
        self.queues = [Ring(q) for q in range(hw.NUM_QIDS)]
        self.bad_tail: dict[int, int] = {}      # qid -> the bad index already reported

    def __getitem__(self, qid: int) -> Ring:
        return self.queues[qid]

    def reset(self) -> None:
        for q in self.queues:
            q.reset()
        self.bad_tail = {}

    # -- indices -----------------------------------------------------------------
    def tail(self, qid: int) -> int:
        """The driver's index of queue qid (its producer index on a to-device ring)."""
        return self.dbw[hw.DB_TAIL_BASE + 4 * qid]

    def publish(self, q: Ring) -> None:
        """Mirror the device's index on the doorbell page."""
        self.dbw[hw.DB_HEAD_BASE + 4 * q.qid] = q.fp.head

    def busy(self, qid: int) -> bool:
        """The indices differ: entries posted (to-device) or not yet returned (to-host)."""
        return self.tail(qid) != self.queues[qid].fp.head

    def restart(self, q: Ring) -> None:
        """Queue enable: both indices back to zero."""
        q.fp.error = 0
        q.fp.head = 0
        q.fp.completed = 0
        q.notified = 0
        self.dbw[hw.DB_TAIL_BASE + 4 * q.qid] = 0
        self.dbw[hw.DB_HEAD_BASE + 4 * q.qid] = 0

    def bad_index(self, qid: int, tail: int, on_bad_index: Callable[[int, int], None]) -> None:
        """An index more than the ring size away: ignored (nothing moves) and reported
        once per bad value -- a log line, CAUSE.QUEUE_ERROR and the misc vector, then
        on_bad_index(qid, tail) for what the ring's owner reports besides."""
        if self.bad_tail.get(qid) == tail:
            return
        self.bad_tail[qid] = tail
        log.warning("queue %d: index %#x out of range (ignored)", qid, tail)
        self.irq.queue_error()
        on_bad_index(qid, tail)

    # -- geometry ------------------------------------------------------------------
    def geometry_ok(self, q: Ring) -> bool:
        """At enable: a power-of-two size in range, 16-byte aligned, inside the mappings."""
        size_ok = (hw.QUEUE_SIZE_MIN <= q.size <= hw.QUEUE_SIZE_MAX and q.size & (q.size - 1) == 0)
        ring_bytes = q.size * q.entry_size
        return not (not size_ok or q.base % 16 or q.base + ring_bytes > 1 << 64
                    or not self.mapped(q.base, ring_bytes))

    def mapped(self, base: int, nbytes: int) -> bool:
        # Under a vIOMMU a ring may span several 4 KiB mappings: covers() accepts that.
        return self.dma.covers(base, nbytes, write=True)

    def stop(self, q: Ring, addr: int) -> None:
        """A ring read or write at addr failed: the queue stops (Q_STATUS.ERROR)."""
        q.fp.error = hw.QSTOP_FAULT
        q.enabled = False
        self.irq.ring_stopped(q.qid, addr, f"ring of {q.size} entries")

    # -- moving entries ------------------------------------------------------------------
    def consume(self, qid: int, budget: int, on_bad_index: Callable[[int, int], None]) -> list[bytes]:
        """Take up to `budget` entries the driver posted on to-device ring qid, in
        order, and advance (and mirror) the device's index past them."""
        q = self.queues[qid]
        if not q.enabled:
            return []
        tail = self.tail(qid)
        avail = (tail - q.fp.head) & MASK32
        if not avail:
            return []
        if avail > q.size:
            self.bad_index(qid, tail, on_bad_index)
            return []
        esz = q.entry_size
        n = min(avail, budget)
        out = []
        i = 0
        while i < n:
            slot = (q.fp.head + i) % q.size
            run = min(n - i, q.size - slot)
            raw = self.dma.read(q.base + slot * esz, run * esz)
            if raw is None:
                self.stop(q, q.base + slot * esz)
                break
            out += [raw[j * esz:(j + 1) * esz] for j in range(run)]
            i += run
        q.fp.head = (q.fp.head + len(out)) & MASK32
        q.fp.completed += len(out)
        self.publish(q)
        return out

    def produce(self, qid: int, pend, on_bad_index: Callable[[int, int], None]) -> int:
        """Write records from the deque `pend` into to-host ring qid, as far as the
        driver freed space, then advance the device's index and raise the queue's
        vector.  Only records written leave `pend`.  Returns the records written."""
        q = self.queues[qid]
        tail = self.tail(qid)
        used = (q.fp.head - tail) & MASK32
        if used > q.size:
            self.bad_index(qid, tail, on_bad_index)
            return 0
        space = q.size - used
        esz = q.entry_size
        n = min(space, len(pend))
        i = 0
        while i < n:
            slot = (q.fp.head + i) % q.size
            run = min(n - i, q.size - slot)
            recs = b"".join(itertools.islice(pend, run))
            if not self.dma.write(q.base + slot * esz, recs):
                # the records stay held: they go out once the driver restarts the ring
                self.stop(q, q.base + slot * esz)
                break
            for _ in range(run):
                pend.popleft()
            i += run
        if i:
            q.fp.head = (q.fp.head + i) & MASK32
            q.fp.completed += i
            self.publish(q)
            self.irq.raise_vector(q.vector)
        return i
