"""The plain-frame NIC: register file, queues, interrupts, and the glue that
drives the C fast path.  Everything numeric comes from chimney.hw."""
from __future__ import annotations

import logging
import mmap
import os
import struct
import time

from .. import hw
from ._fastpath import ffi, lib
from .dma import DmaTable, report_dma_error
from .pci import bar_memfd
from .toe import Toe

log = logging.getLogger("chimney.device.nic")

RXQ0 = hw.RXQ_FIRST
TX_BUDGET = 256
RX_BUDGET = 256


class Queue:
    def __init__(self, qid: int):
        self.qid = qid
        self.kind = hw.queue_kind(qid)
        self.fp = ffi.new("struct fp_queue *")
        self.fp.qid = qid
        self.reset()

    def reset(self):
        self.base = 0
        self.size = 0
        self.ctrl = 0
        self.vector = 0
        self.enabled = False
        self.fp.error = 0
        self.fp.head = 0
        self.fp.completed = 0
        self.notified = 0       # fp.completed when we last raised the vector

    @property
    def status(self) -> int:
        s = hw.QSTATUS_ENABLED if self.enabled else 0
        return s | (hw.QSTATUS_ERROR if self.fp.error else 0)


class Vector:
    """One MSI-X vector: the eventfd QEMU gave us and moderation state."""

    def __init__(self):
        self.fd: int | None = None
        self.itr_us = 0
        self.last = 0.0
        self.pending = False


class Nic:
    def __init__(self, dma: DmaTable, mac: bytes, tap_fd: int = -1, pcap_fd: int = -1,
                 link_up: bool = True, impair_tx=None, impair_rx=None):
        self.dma = dma
        self.default_mac = mac
        self.tap_fd = tap_fd
        self.pcap_fd = pcap_fd
        self.link_up = link_up
        # Emulated link misbehaviour (chimney.device.impair), per direction.
        self.impair_tx = impair_tx
        self.impair_rx = impair_rx
        self._imp_tx = impair_tx.c if impair_tx else ffi.NULL
        self._imp_rx = impair_rx.c if impair_rx else ffi.NULL
        # The doorbell page: a memfd QEMU maps into the guest, sealed so it cannot shrink it.
        self.db_fd = bar_memfd("chimney-doorbell", hw.BAR_DOORBELL_SIZE)
        self.db = mmap.mmap(self.db_fd, hw.BAR_DOORBELL_SIZE)
        self.dbw = hw.Words(self.db)
        self.stats = ffi.new("uint64_t[]", len(hw.STATS))
        self.scratch = ffi.new("uint8_t[]", hw.MAX_FRAME + 64)
        self.macbuf = ffi.new("uint8_t[6]")
        self.queues = [Queue(q) for q in range(hw.NUM_QIDS)]
        self.vectors = [Vector() for _ in range(hw.MSIX_VECTORS)]
        self.toe = Toe(self)        # the TCP chimney offload engine (chimney.device.toe)
        self.reset()

    # -- reset and state -----------------------------------------------------
    def reset(self):
        self.ctrl = 0
        self.mtu = 1500
        self.cause = 0
        self.mac = self.default_mac
        self.dma_err_addr = 0
        self.dma_err_qid = 0xFF
        self.dma_err_count = 0
        self.seen_dma_errors = 0
        for q in self.queues:
            q.reset()
        for v in self.vectors:
            v.itr_us = 0
            v.pending = False
        self.db[:] = bytes(hw.BAR_DOORBELL_SIZE)
        for i in range(len(hw.STATS)):
            self.stats[i] = 0
        self.toe.reset()
        self._sync_mac()

    def _sync_mac(self):
        ffi.memmove(self.macbuf, self.mac, 6)

    @property
    def enabled(self) -> bool:
        return bool(self.ctrl & hw.CTRL_ENABLE)

    @property
    def status(self) -> int:
        s = hw.STATUS_READY
        if self.link_up:
            s |= hw.STATUS_LINK_UP
        if self.enabled:
            s |= hw.STATUS_ENABLED
        return s

    def stat(self, name: str) -> int:
        return self.stats[hw.STAT_INDEX[name]]

    # -- BAR0 registers --------------------------------------------------------
    def reg_read(self, off: int, size: int) -> int:
        if hw.STATS_BASE <= off < hw.STATS_BASE + 8 * len(hw.STATS):
            i, part = divmod(off - hw.STATS_BASE, 8)
            val = self.stats[i]
            return val if size == 8 else (val >> (8 * part)) & 0xFFFFFFFF
        if hw.Q_BASE <= off < hw.Q_BASE + hw.NUM_QIDS * hw.Q_STRIDE:
            q = self.queues[(off - hw.Q_BASE) // hw.Q_STRIDE]
            r = (off - hw.Q_BASE) % hw.Q_STRIDE
            return {0x00: q.base & 0xFFFFFFFF, 0x04: q.base >> 32, 0x08: q.size,
                    0x0C: q.ctrl, 0x10: q.vector, 0x14: q.status, 0x18: q.fp.head}.get(r, 0)
        if hw.VEC_ITR_BASE <= off < hw.VEC_ITR_BASE + hw.VEC_ITR_STRIDE * hw.MSIX_VECTORS:
            return self.vectors[(off - hw.VEC_ITR_BASE) // hw.VEC_ITR_STRIDE].itr_us
        mac_lo = int.from_bytes(self.mac[:4], "little")
        mac_hi = int.from_bytes(self.mac[4:], "little")
        if off == hw.REG_CAUSE:
            c, self.cause = self.cause, 0
            return c
        if off == hw.REG_DMA_ERR_ADDR:
            return self.dma_err_addr if size == 8 else self.dma_err_addr & 0xFFFFFFFF
        if off == hw.REG_DMA_ERR_ADDR + 4:
            return self.dma_err_addr >> 32
        if off == hw.REG_DMA_ERR_INFO:
            return self.dma_err_qid | (min(self.dma_err_count, 0xFFFFFF) << 8)
        values = {hw.REG_ID: hw.reg("ID").reset, hw.REG_VERSION: hw.reg("VERSION").reset,
                  hw.REG_FEATURES: hw.FEATURES, hw.REG_CTRL: self.ctrl,
                  hw.REG_STATUS: self.status, hw.REG_MAC_LO: mac_lo, hw.REG_MAC_HI: mac_hi,
                  hw.REG_MTU: self.mtu, hw.REG_NUM_QUEUES: hw.reg("NUM_QUEUES").reset,
                  hw.REG_NUM_VECTORS: hw.MSIX_VECTORS}
        return values.get(off, 0)

    def reg_write(self, off: int, size: int, val: int) -> None:
        if size == 8:
            # Every writable register is 32 bits wide: an 8-byte write is two
            # 4-byte writes, low half first, as a 64-bit PCIe write would be.
            self.reg_write(off, 4, val & 0xFFFFFFFF)
            self.reg_write(off + 4, 4, val >> 32)
            return
        if hw.Q_BASE <= off < hw.Q_BASE + hw.NUM_QIDS * hw.Q_STRIDE:
            return self._queue_write(self.queues[(off - hw.Q_BASE) // hw.Q_STRIDE],
                                     (off - hw.Q_BASE) % hw.Q_STRIDE, val)
        if hw.VEC_ITR_BASE <= off < hw.VEC_ITR_BASE + hw.VEC_ITR_STRIDE * hw.MSIX_VECTORS:
            self.vectors[(off - hw.VEC_ITR_BASE) // hw.VEC_ITR_STRIDE].itr_us = min(val, 1_000_000)
            return
        if off == hw.REG_CTRL:
            if val & hw.CTRL_RESET:
                log.info("function reset by driver")
                self.reset()
                return
            was = self.enabled
            self.ctrl = val & (hw.CTRL_ENABLE | hw.CTRL_PROMISC)
            if was != self.enabled:
                log.info("device %s", "enabled" if self.enabled else "disabled")
        elif off == hw.REG_MAC_LO:
            self.mac = val.to_bytes(4, "little") + self.mac[4:]
            self._sync_mac()
        elif off == hw.REG_MAC_HI:
            self.mac = self.mac[:4] + (val & 0xFFFF).to_bytes(2, "little")
            self._sync_mac()
        elif off == hw.REG_MTU:
            if 68 <= val <= hw.MAX_FRAME - 18:
                self.mtu = val
                for q in self.queues:
                    q.fp.max_frame = val + 18
            else:
                log.warning("MTU %d out of range, ignored", val)
        elif off == hw.REG_KICK:
            self.stats[hw.STAT_INDEX["kicks"]] += 1
        # Writes to read-only registers are ignored, as on hardware.

    def _queue_write(self, q: Queue, r: int, val: int) -> None:
        if q.kind is None or not q.kind.implemented:
            return              # reserved queue numbers: writes ignored
        if r == 0x00:
            q.base = (q.base & ~0xFFFFFFFF) | val
        elif r == 0x04:
            q.base = (q.base & 0xFFFFFFFF) | (val << 32)
        elif r == 0x08:
            q.size = val
        elif r == 0x10:
            q.vector = val if val < hw.MSIX_VECTORS else q.vector
        elif r == 0x0C:
            q.ctrl = val & 1
            if val & 1:
                self._queue_enable(q)
            else:
                q.enabled = False
                q.fp.error = 0

    def _queue_enable(self, q: Queue) -> None:
        q.fp.error = 0
        q.fp.head = 0
        q.fp.completed = 0
        q.notified = 0
        self.dbw[hw.DB_TAIL_BASE + 4 * q.qid] = 0
        self.dbw[hw.DB_HEAD_BASE + 4 * q.qid] = 0
        size_ok = (hw.QUEUE_SIZE_MIN <= q.size <= hw.QUEUE_SIZE_MAX and q.size & (q.size - 1) == 0)
        ring_bytes = q.size * hw.RING_ENTRY[q.kind.name].size
        if (not size_ok or q.base % 16 or q.base + ring_bytes > 1 << 64
                or not self.dma.covers(q.base, ring_bytes, write=True)):
            q.enabled = False
            q.fp.error = 3
            # refused before any access: not in the dma_errors statistic
            report_dma_error(self, q.qid, q.base, f"ring of {q.size} entries invalid or unmapped",
                             counted=True, stopped=True)
            return
        q.fp.base = q.base
        q.fp.size = q.size
        q.fp.max_frame = self.mtu + 18
        q.enabled = True
        log.info("queue %d (%s) enabled: %d entries at %#x, vector %d",
                 q.qid, q.kind.name, q.size, q.base, q.vector)

    # -- errors and interrupts -------------------------------------------------
    def raise_vector(self, v: int) -> None:
        vec = self.vectors[v]
        now = time.monotonic()
        if vec.itr_us and (now - vec.last) * 1e6 < vec.itr_us:
            vec.pending = True
            return
        self._fire(v, now)

    def _fire(self, v: int, now: float) -> None:
        vec = self.vectors[v]
        vec.pending = False
        off = hw.DB_ARM_BASE + 4 * v
        if vec.fd is None or not self.dbw[off]:
            return              # not armed: the driver is polling, it will see the work
        self.dbw[off] = 0
        vec.last = now
        try:
            os.write(vec.fd, struct.pack("<Q", 1))
            self.stats[hw.STAT_INDEX["interrupts"]] += 1
        except OSError as e:
            log.warning("vector %d: eventfd write failed: %s", v, e)

    def next_deadline(self) -> float | None:
        """Earliest moment a moderated interrupt is due (monotonic seconds)."""
        due = [v.last + v.itr_us / 1e6 for v in self.vectors if v.pending]
        t = self.toe.next_deadline() if self.enabled else None
        if t is not None:
            due.append(t)
        for imp in (self.impair_tx, self.impair_rx):
            t = imp.next_due() if imp is not None else None
            if t is not None:
                due.append(t)
        return min(due) if due else None

    def run_timers(self) -> None:
        now = time.monotonic()
        for i, v in enumerate(self.vectors):
            if v.pending and (now - v.last) * 1e6 >= v.itr_us:
                self._fire(i, now)

    # -- data path ---------------------------------------------------------------
    def _tail(self, qid: int) -> int:
        return self.dbw[hw.DB_TAIL_BASE + 4 * qid]

    def _after(self, q: Queue, rc: int) -> None:
        self.dbw[hw.DB_HEAD_BASE + 4 * q.qid] = q.fp.head
        if rc < 0:
            q.enabled = False
            report_dma_error(self, q.qid, q.fp.err_addr, f"ring of {q.size} entries",
                             counted=True, stopped=True)     # the fast path counted it
        if q.fp.completed != q.notified:
            q.notified = q.fp.completed
            self.raise_vector(q.vector)

    def poll_tx(self) -> int:
        """Send what the driver posted on every enabled TX queue."""
        if not self.enabled:
            return 0
        work = 0
        for q in self.queues[hw.TXQ_FIRST:hw.TXQ_FIRST + hw.NUM_TXQ]:
            if not q.enabled:
                continue
            tail = self._tail(q.qid)
            if tail == q.fp.head:
                continue
            errs = self.stats[hw.STAT_INDEX["dma_errors"]]
            rc = lib.fp_tx(self.dma.ctable, q.fp, tail, self.tap_fd if self.link_up else -1,
                           self.pcap_fd, self.stats, self.scratch, TX_BUDGET, self._imp_tx)
            self._note_buffer_errors(q, errs, rc)
            self._after(q, rc)
            work += max(rc, 0)
        return work

    def poll_rx(self) -> int:
        """Move frames from the wire into RX queue 0."""
        if self.tap_fd < 0:
            return 0
        q = self.queues[RXQ0]
        active = self.enabled and q.enabled
        errs = self.stats[hw.STAT_INDEX["dma_errors"]]
        n = lib.fp_rx(self.dma.ctable, q.fp if active else ffi.NULL,
                      self._tail(RXQ0) if active else 0, self.tap_fd, self.pcap_fd, self.stats,
                      self.scratch, self.macbuf, int(bool(self.ctrl & hw.CTRL_PROMISC)), RX_BUDGET,
                      self._imp_rx, self.toe.c if self.enabled else ffi.NULL)
        if active:
            self._note_buffer_errors(q, errs, -1 if q.fp.error else n)
            self._after(q, -1 if q.fp.error else n)
        return n

    def flush_impaired(self) -> int:
        """Release the frames an impaired link held back whose time has come."""
        n = 0
        if self.impair_tx is not None and self.impair_tx.c.count:
            n += lib.fp_impair_tx_flush(self._imp_tx, self.tap_fd)
        if self.impair_rx is not None and self.impair_rx.c.count:
            q = self.queues[RXQ0]
            active = self.enabled and q.enabled
            errs = self.stats[hw.STAT_INDEX["dma_errors"]]
            got = lib.fp_impair_rx_flush(self._imp_rx, self.dma.ctable, q.fp if active else ffi.NULL,
                                         self._tail(RXQ0) if active else 0, self.pcap_fd, self.stats,
                                         self.macbuf, int(bool(self.ctrl & hw.CTRL_PROMISC)),
                                         self.toe.c if self.enabled else ffi.NULL)
            if active and got:
                self._note_buffer_errors(q, errs, -1 if q.fp.error else got)
                self._after(q, -1 if q.fp.error else got)
            n += got
        return n

    def _note_buffer_errors(self, q: Queue, before: int, rc: int) -> None:
        after = self.stats[hw.STAT_INDEX["dma_errors"]]
        if after != before and rc >= 0:
            report_dma_error(self, q.qid, q.fp.err_addr, "buffer, frame dropped",
                             errors=after - before, counted=True)

    def poll_offload(self) -> int:
        """The TOE: commands, offload I/O, steered segments, its timers."""
        if not self.enabled:
            return 0
        return self.toe.poll()

    def has_tx_work(self) -> bool:
        if not self.enabled:
            return False
        if self.toe.has_work():
            return True
        return any(q.enabled and self._tail(q.qid) != q.fp.head
                   for q in self.queues[hw.TXQ_FIRST:hw.TXQ_FIRST + hw.NUM_TXQ])

    def set_need_kick(self, on: bool) -> None:
        self.dbw[hw.DB_NEED_KICK] = int(on)

    def heartbeat(self) -> None:
        self.dbw[hw.DB_HEARTBEAT] = self.dbw[hw.DB_HEARTBEAT] + 1

    def close(self) -> None:
        self.dbw.release()
        self.db.close()
        os.close(self.db_fd)
