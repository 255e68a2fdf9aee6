"""The plain-frame NIC: register file, interrupts, and the glue that drives the
C fast path; its queues are chimney.device.ring's, its TOE gets a ToePort.
Everything numeric comes from chimney.hw."""
from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import queue
import struct
import time
from collections.abc import Callable

from .. import hw
from ._fastpath import ffi, lib
from .dma import DmaTable, report_dma_error
from .pci import bar_memfd
from .port import ToePort
from .ring import Ring, Rings
from .toe import Toe

log = logging.getLogger("chimney.device.nic")

RXQ0 = hw.RXQ_FIRST
_REG = {r.name: r for r in hw.REGISTERS}
TX_BUDGET = 256
RX_BUDGET = 256


class Vector:
    """One MSI-X vector: the eventfd QEMU gave us and moderation state."""

    def __init__(self):
        self.fd: int | None = None
        self.itr_us = hw.VEC_ITR.reset
        self.last = 0.0
        self.pending = False

    def write_itr(self, val: int) -> None:
        self.itr_us = min(val, hw.VEC_ITR_MAX_US)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One 32-bit word of the register file (8-byte registers have two)."""
    reg: hw.Register
    half: int                               # 1: the upper word of an 8-byte register
    get: Callable[[], int] | None           # None: reads the reset value
    put: Callable[[int], None] | None       # None: writes are ignored


class NicIrq:
    """The NIC's interrupts and error registers, as its rings and its TOE report to them."""

    def __init__(self, nic: Nic):
        self._nic = nic

    def raise_vector(self, v: int) -> None:
        self._nic.raise_vector(v)

    def queue_error(self) -> None:
        """A bad ring index: CAUSE.QUEUE_ERROR and the misc vector."""
        self._nic.cause |= hw.CAUSE_QUEUE_ERROR
        self._nic.raise_vector(hw.VECTOR_MISC)

    def ring_stopped(self, qid: int, addr: int, what: str) -> None:
        """A ring access at addr failed: the queue has stopped."""
        report_dma_error(self._nic, qid, addr, what, stopped=True)

    def buffer_dma_error(self, qid: int, addr: int) -> None:
        """A buffer outside the DMA mappings (the request fails, the queue runs on)."""
        report_dma_error(self._nic, qid, addr, "buffer")


class NicWire:
    """The NIC's port as its TOE sends on it."""

    def __init__(self, nic: Nic):
        self._nic = nic

    @property
    def tx_fd(self) -> int:
        return self._nic.tap_fd if self._nic.link_up else -1

    @property
    def pcap_fd(self) -> int:
        return self._nic.pcap_fd

    @property
    def impair(self):
        return self._nic._imp_tx

    @property
    def mtu(self) -> int:
        return self._nic.mtu


class Nic:
    def __init__(self, dma: DmaTable, mac: bytes, tap_fd: int = -1, pcap_fd: int = -1,
                 link_up: bool = True, impair_tx=None, impair_rx=None):
        self.dma = dma
        self.default_mac = mac
        self.tap_fd = tap_fd
        self.pcap_fd = pcap_fd
        self.link_up = link_up
        # The link taken down and up by the device's management (chimney.device.control):
        # changes, frames lost while down per direction (tx: tx_drops gained meanwhile).
        self.link_changes = 0
        self.link_drops_rx = 0
        self._link_drops_tx = 0
        self._tx_drops_at_down = 0
        # work other threads (the control socket) hand to the device loop, run by run_timers
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        # Emulated link misbehaviour (chimney.device.impair), per direction.
        self.impair_tx = impair_tx
        self.impair_rx = impair_rx
        self._imp_tx = impair_tx.c if impair_tx else ffi.NULL
        self._imp_rx = impair_rx.c if impair_rx else ffi.NULL
        # The doorbell page: a memfd QEMU maps into the guest.
        self.db_fd = bar_memfd("chimney-doorbell", hw.BAR_DOORBELL_SIZE)
        self.db = mmap.mmap(self.db_fd, hw.BAR_DOORBELL_SIZE)
        self.dbw = hw.Words(self.db)
        self.stats = ffi.new("uint64_t[]", len(hw.STATS))
        self.scratch = ffi.new("uint8_t[]", hw.MAX_FRAME + 64)
        self.macbuf = ffi.new("uint8_t[6]")
        irq = NicIrq(self)
        self.rings = Rings(self.dbw, dma, irq)
        self.queues = self.rings.queues
        self.vectors = [Vector() for _ in range(hw.MSIX_VECTORS)]
        # the TCP chimney offload engine (chimney.device.toe)
        self.toe = Toe(ToePort(rings=self.rings, dma=dma, irq=irq, wire=NicWire(self),
                               clock=time.monotonic, stats=self.stats, enabled=lambda: self.enabled))
        self._regs = self._register_file()
        self.reset()

    # -- reset and state -----------------------------------------------------
    def reset(self):
        self.ctrl = _REG["CTRL"].reset
        self.mtu = _REG["MTU"].reset
        self.cause = _REG["CAUSE"].reset
        self.mac = self.default_mac
        self.dma_err_addr = _REG["DMA_ERR_ADDR"].reset
        self.dma_err_qid = hw.DMA_ERR_QID_NONE
        self.dma_err_count = 0
        self.seen_dma_errors = 0
        self.rings.reset()
        for v in self.vectors:
            v.itr_us = hw.VEC_ITR.reset
            v.pending = False
        self.db[:] = bytes(hw.BAR_DOORBELL_SIZE)
        if not self.link_up:        # the counters restart; the link stays down
            self._link_drops_tx = self.link_drops_tx
            self._tx_drops_at_down = 0
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

    # -- the link --------------------------------------------------------------------
    def set_link(self, up: bool) -> bool:
        """Take the wire's link down or bring it back, as a cable pull would: STATUS.LINK_UP,
        CAUSE.LINK with the misc vector, the TOE's status events.  False if it already was."""
        if self.tap_fd < 0:
            raise ValueError("the NIC has no wire backend (start it with --tap)")
        if up == self.link_up:
            return False
        if up:
            self._link_drops_tx += self.stat("tx_drops") - self._tx_drops_at_down
        else:
            self._tx_drops_at_down = self.stat("tx_drops")
        self.link_up = up
        self.link_changes += 1
        log.info("link %s", "up" if up else "down")
        self.toe.link_changed(up)
        self.cause |= hw.CAUSE_LINK
        self.raise_vector(hw.VECTOR_MISC)
        return True

    @property
    def link_drops_tx(self) -> int:
        """tx_drops counted while the link was down."""
        now = 0 if self.link_up else self.stat("tx_drops") - self._tx_drops_at_down
        return self._link_drops_tx + now

    def link_status(self) -> dict:
        return {"link": "up" if self.link_up else "down", "wire": self.tap_fd >= 0,
                "link_changes": self.link_changes, "link_drops_tx": self.link_drops_tx,
                "link_drops_rx": self.link_drops_rx, "enabled": self.enabled,
                "stats": {name: self.stat(name) for name, _ in hw.STATS}}

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn in the device loop (thread-safe): the NIC's state has one owner."""
        self._calls.put(fn)

    def _run_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    # -- BAR0 registers --------------------------------------------------------
    # The register file is a table, offset -> _Slot, built once from hw.REGISTERS,
    # hw.STAT_REGISTERS, hw.QUEUE_REGISTERS and hw.VEC_ITR: each register's access
    # kind says what a read or a write does, its handlers say where the value lives.
    def _register_file(self) -> dict[int, _Slot]:
        mask32 = 0xFFFFFFFF
        handlers = {    # name -> (get, put); get None: the register's reset value
            "ID": (None, None),
            "VERSION": (None, None),
            "FEATURES": (None, None),
            "CTRL": (lambda: self.ctrl, self._write_ctrl),
            "STATUS": (lambda: self.status, None),
            "MAC_LO": (lambda: int.from_bytes(self.mac[:4], "little"), self._write_mac_lo),
            "MAC_HI": (lambda: int.from_bytes(self.mac[4:], "little"), self._write_mac_hi),
            "MTU": (lambda: self.mtu, self._write_mtu),
            "KICK": (None, self._write_kick),
            "CAUSE": (lambda: self.cause, self._store_cause),
            "NUM_QUEUES": (None, None),
            "NUM_VECTORS": (None, None),
            "DMA_ERR_ADDR": (lambda: self.dma_err_addr, None),
            "DMA_ERR_INFO": (lambda: self.dma_err_qid | (min(self.dma_err_count, hw.DMA_ERR_COUNT_MAX)
                                                         << hw.DMA_ERR_COUNT_SHIFT), None),
        }
        assert set(handlers) == {r.name for r in hw.REGISTERS}, "a register without handlers"
        table: dict[int, _Slot] = {}

        def add(reg: hw.Register, base: int, get, put) -> None:
            assert put is None or reg.width == 4, "writable registers are 32 bits wide"
            assert reg.access not in ("RC", "W1C") or (get and put), f"{reg.name}: {reg.access} needs both"
            for half in range(reg.width // 4):
                table[base + reg.offset + 4 * half] = _Slot(reg, half, get, put)

        for r in hw.REGISTERS:
            add(r, 0, *handlers[r.name])
        for i, r in enumerate(hw.STAT_REGISTERS):
            add(r, 0, lambda i=i: self.stats[i], None)
        for q in self.queues:
            writable = q.kind is not None and q.kind.implemented   # reserved queues ignore writes
            queue_handlers = {
                "Q_BASE_LO": (lambda q=q: q.base & mask32, q.write_base_lo),
                "Q_BASE_HI": (lambda q=q: q.base >> 32, q.write_base_hi),
                "Q_SIZE": (lambda q=q: q.size, q.write_size),
                "Q_CTRL": (lambda q=q: q.ctrl, lambda v, q=q: self._write_queue_ctrl(q, v)),
                "Q_VECTOR": (lambda q=q: q.vector, q.write_vector),
                "Q_STATUS": (lambda q=q: q.status, None),
                "Q_HEAD": (lambda q=q: q.fp.head, None),
            }
            assert set(queue_handlers) == {r.name for r in hw.QUEUE_REGISTERS}
            for r in hw.QUEUE_REGISTERS:
                get, put = queue_handlers[r.name]
                add(r, hw.Q_BASE + q.qid * hw.Q_STRIDE, get, put if writable else None)
        for v, vec in enumerate(self.vectors):
            add(hw.VEC_ITR, hw.VEC_ITR_BASE + v * hw.VEC_ITR_STRIDE,
                lambda vec=vec: vec.itr_us, vec.write_itr)
        return table

    def reg_read(self, off: int, size: int) -> int:
        slot = self._regs.get(off)
        if slot is None:
            return 0                # unassigned offsets read as zero
        reg = slot.reg
        if reg.access == "WO":
            return 0
        val = reg.reset if slot.get is None else slot.get()
        if reg.access == "RC":
            slot.put(0)
        if reg.width == 8 and size == 4:
            return (val >> (32 * slot.half)) & 0xFFFFFFFF
        return val

    def reg_write(self, off: int, size: int, val: int) -> None:
        if size == 8:
            # Every writable register is 32 bits wide: an 8-byte write is two
            # 4-byte writes, low half first, as a 64-bit PCIe write would be.
            self.reg_write(off, 4, val & 0xFFFFFFFF)
            self.reg_write(off + 4, 4, val >> 32)
            return
        slot = self._regs.get(off)
        if slot is None or slot.put is None or slot.reg.access in ("RO", "RC"):
            return                  # writes to read-only registers are ignored, as on hardware
        if slot.reg.access == "W1C":
            slot.put(slot.get() & ~val)
        else:
            slot.put(val)

    def _write_ctrl(self, val: int) -> None:
        if val & hw.CTRL_RESET:
            log.info("function reset by driver")
            self.reset()
            return
        was = self.enabled
        self.ctrl = val & (hw.CTRL_ENABLE | hw.CTRL_PROMISC)
        if was != self.enabled:
            log.info("device %s", "enabled" if self.enabled else "disabled")

    def _write_mac_lo(self, val: int) -> None:
        self.mac = val.to_bytes(4, "little") + self.mac[4:]
        self._sync_mac()

    def _write_mac_hi(self, val: int) -> None:
        self.mac = self.mac[:4] + (val & hw.MAC_HI_MASK).to_bytes(2, "little")
        self._sync_mac()

    def _write_mtu(self, val: int) -> None:
        if hw.MTU_MIN <= val <= hw.MTU_MAX:
            self.mtu = val
            for q in self.queues:
                q.fp.max_frame = val + hw.FRAME_OVERHEAD
        else:
            log.warning("MTU %d out of range, ignored", val)

    def _write_kick(self, val: int) -> None:
        self.stats[hw.STAT_INDEX["kicks"]] += 1

    def _store_cause(self, val: int) -> None:
        self.cause = val

    def _write_queue_ctrl(self, q: Ring, val: int) -> None:
        q.ctrl = val & hw.QCTRL_ENABLE
        if val & hw.QCTRL_ENABLE:
            self._queue_enable(q)
        else:
            q.enabled = False
            q.fp.error = 0

    def _queue_enable(self, q: Ring) -> None:
        self.rings.restart(q)
        if not self.rings.geometry_ok(q):
            q.enabled = False
            q.fp.error = hw.QSTOP_INVALID
            # refused before any access: not in the dma_errors statistic
            report_dma_error(self, q.qid, q.base, f"ring of {q.size} entries invalid or unmapped",
                             counted=True, stopped=True)
            return
        q.fp.base = q.base
        q.fp.size = q.size
        q.fp.max_frame = self.mtu + hw.FRAME_OVERHEAD
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
        self._run_calls()
        now = time.monotonic()
        for i, v in enumerate(self.vectors):
            if v.pending and (now - v.last) * 1e6 >= v.itr_us:
                self._fire(i, now)

    # -- data path ---------------------------------------------------------------
    def _after(self, q: Ring, rc: int) -> None:
        self.rings.publish(q)
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
            tail = self.rings.tail(q.qid)
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
        if not self.link_up:
            n = lib.fp_wire_discard(self.tap_fd, self.scratch, RX_BUDGET)
            self.link_drops_rx += n
            return n
        q = self.queues[RXQ0]
        active = self.enabled and q.enabled
        errs = self.stats[hw.STAT_INDEX["dma_errors"]]
        n = lib.fp_rx(self.dma.ctable, q.fp if active else ffi.NULL,
                      self.rings.tail(RXQ0) if active else 0, self.tap_fd, self.pcap_fd, self.stats,
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
            n += lib.fp_impair_tx_flush(self._imp_tx, self.tap_fd if self.link_up else -1)
        if self.impair_rx is not None and self.impair_rx.c.count:
            q = self.queues[RXQ0]
            active = self.enabled and q.enabled
            errs = self.stats[hw.STAT_INDEX["dma_errors"]]
            got = lib.fp_impair_rx_flush(self._imp_rx, self.dma.ctable, q.fp if active else ffi.NULL,
                                         self.rings.tail(RXQ0) if active else 0, self.pcap_fd, self.stats,
                                         self.macbuf, int(bool(self.ctrl & hw.CTRL_PROMISC)),
                                         self.toe.c if self.enabled else ffi.NULL)
            if active and got:
                self._note_buffer_errors(q, errs, -1 if q.fp.error else got)
                self._after(q, -1 if q.fp.error else got)
            n += got
        return n

    def _note_buffer_errors(self, q: Ring, before: int, rc: int) -> None:
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
        return any(q.enabled and self.rings.busy(q.qid)
                   for q in self.queues[hw.TXQ_FIRST:hw.TXQ_FIRST + hw.NUM_TXQ])

    def set_need_kick(self, on: bool) -> None:
        self.dbw[hw.DB_NEED_KICK] = int(on)

    def heartbeat(self) -> None:
        self.dbw[hw.DB_HEARTBEAT] = self.dbw[hw.DB_HEARTBEAT] + 1

    def close(self) -> None:
        self.dbw.release()
        self.db.close()
        os.close(self.db_fd)
