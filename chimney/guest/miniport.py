"""The chimney miniport: brings the NIC up on any bus and moves plain frames.

Control registers are trapped (slow); the data path touches only guest
memory (descriptor rings, buffers) and the doorbell page, and writes BAR0
KICK only when the device says it sleeps.  Interrupts wake a waiting reader;
a device that stops its heartbeat is reported instead of waited on forever.
"""
from __future__ import annotations

import os
import select
import struct
import time

from .. import hw
from .bus import DeviceGone

TXQ = hw.TXQ_FIRST
RXQ = hw.RXQ_FIRST
VEC_TX = 1
VEC_RX = 2
VEC_OFFLOAD_FIRST = 3       # + k: offload queue set k's completions (RSS), one vector each
NUM_VECTORS = VEC_OFFLOAD_FIRST + hw.NUM_OFFLOAD_QUEUES
assert NUM_VECTORS <= hw.MSIX_VECTORS
DESC = 16
STATUS_OFF_TX = hw.TxDesc.offset_of("status")
STATUS_OFF_RX = hw.RxDesc.offset_of("status")
HEARTBEAT_TIMEOUT = 2.0
# the descriptor layouts as plain structs, fields in hw's order (the data path packs
# one per frame: keyword packing costs more than the rest of the descriptor work)
_TXD = hw.TxDesc._struct
_RXD = hw.RxDesc._struct
assert [f.name for f in hw.TxDesc.fields] == ["addr", "len", "flags", "status"]
assert [f.name for f in hw.RxDesc.fields] == ["addr", "buflen", "len", "flags", "status"]
_U16 = struct.Struct("<H")
# Descriptor fields as indices of a 16-bit view of the ring: one index is one aligned
# 16-bit load or store, which the other side sees whole (struct would go byte by byte).
_TX_STATUS_W = hw.TxDesc.offset_of("status") // 2
_RX_LEN_W = hw.RxDesc.offset_of("len") // 2
_RX_FLAGS_W = hw.RxDesc.offset_of("flags") // 2
_RX_STATUS_W = hw.RxDesc.offset_of("status") // 2
_DESC_W = DESC // 2


class MiniportError(Exception):
    pass


class Miniport:
    def __init__(self, bus, ring_size: int = 256, buf_size: int = 2048, itr_us: int = 0):
        if ring_size & (ring_size - 1) or not hw.QUEUE_SIZE_MIN <= ring_size <= hw.QUEUE_SIZE_MAX:
            raise ValueError("ring_size must be a power of two in [8, 4096]")
        self.bus = bus
        self.ring_size = ring_size
        self.buf_size = buf_size
        self.itr_us = itr_us
        self.mac = b""
        self.tx_tail = self.tx_clean = 0
        self.rx_next = self.rx_tail = 0
        self.tx_errors = 0
        self.rx_errors = 0
        self._rx_parts: list[bytes] = []     # a frame whose EOP has not arrived yet
        self._rx_backlog: list[bytes] = []
        self.before_wait: list = []         # called before sleeping on an interrupt (owed kicks)
        self._ready_checks: list = []       # more work that wakes a receiver (add_ready_check)
        self._wake_vectors: list[int] = []  # more vectors a receiver sleeps on (add_ready_check)

    # -- registers -------------------------------------------------------------
    def rd(self, off: int, size: int = 4) -> int:
        return self.bus.reg_read(hw.BAR_REGS, off, size)

    def wr(self, off: int, val: int, size: int = 4) -> None:
        self.bus.reg_write(hw.BAR_REGS, off, size, val)

    # -- bring-up ----------------------------------------------------------------
    def up(self) -> None:
        ident, version = self.rd(hw.REG_ID), self.rd(hw.REG_VERSION)
        if ident != hw.reg("ID").reset:
            raise MiniportError(f"not a chimney NIC (ID {ident:#x})")
        if version >> 16 != hw.VERSION_MAJOR:
            raise MiniportError(f"hardware interface {version >> 16}.{version & 0xFFFF}, "
                                f"driver speaks {hw.VERSION_MAJOR}.x")
        feats = self.rd(hw.REG_FEATURES)
        need = hw.FEAT_PLAIN_FRAMES | hw.FEAT_DOORBELL_PAGE
        if feats & need != need:
            raise MiniportError(f"device features {feats:#x} lack {need:#x}")
        self.wr(hw.REG_CTRL, hw.CTRL_RESET)
        deadline = time.monotonic() + 2
        while not self.rd(hw.REG_STATUS) & hw.STATUS_READY:
            if time.monotonic() > deadline:
                raise MiniportError("device did not become ready after reset")
            time.sleep(0.001)
        self.mac = self.rd(hw.REG_MAC_LO).to_bytes(4, "little") + \
            (self.rd(hw.REG_MAC_HI) & hw.MAC_HI_MASK).to_bytes(2, "little")
        self.db = self.bus.map_bar(hw.BAR_DOORBELL)
        self.dbw = hw.Words(self.db)
        self.bus.enable_msix(NUM_VECTORS)
        n = self.ring_size
        self.tx_ring = self.bus.dma_alloc(n * DESC)
        self.tx_bufs = self.bus.dma_alloc(n * self.buf_size)
        self.rx_ring = self.bus.dma_alloc(n * DESC)
        self.rx_bufs = self.bus.dma_alloc(n * self.buf_size)
        self._txw = memoryview(self.tx_ring.mem).cast("H")
        self._rxw = memoryview(self.rx_ring.mem).cast("H")
        for v in range(VEC_TX, NUM_VECTORS):
            self.wr(hw.VEC_ITR_BASE + hw.VEC_ITR_STRIDE * v, self.itr_us)
        self._queue_up(TXQ, self.tx_ring, VEC_TX)
        self._queue_up(RXQ, self.rx_ring, VEC_RX)
        self.tx_tail = self.tx_clean = 0
        self.rx_next = 0
        for i in range(n):
            self._post_rx(i)
        self.rx_tail = n
        self.wr(hw.REG_CTRL, hw.CTRL_ENABLE)
        self._ring(RXQ, self.rx_tail)
        if not self.rd(hw.REG_STATUS) & hw.STATUS_ENABLED:
            raise MiniportError("device did not enable")

    def _queue_up(self, qid: int, ring, vector: int) -> None:
        self.wr(hw.qreg(qid, "Q_BASE_LO"), ring.iova & 0xFFFFFFFF)
        self.wr(hw.qreg(qid, "Q_BASE_HI"), ring.iova >> 32)
        self.wr(hw.qreg(qid, "Q_SIZE"), self.ring_size)
        self.wr(hw.qreg(qid, "Q_VECTOR"), vector)
        self.wr(hw.qreg(qid, "Q_CTRL"), hw.QCTRL_ENABLE)
        st = self.rd(hw.qreg(qid, "Q_STATUS"))
        if not st & hw.QSTATUS_ENABLED:
            raise MiniportError(f"queue {qid} did not enable (status {st:#x})")

    def down(self) -> None:
        self.wr(hw.REG_CTRL, hw.CTRL_RESET)

    @property
    def link_up(self) -> bool:
        return bool(self.rd(hw.REG_STATUS) & hw.STATUS_LINK_UP)

    # -- doorbells and interrupts --------------------------------------------------
    def _ring(self, qid: int, tail: int) -> None:
        self.dbw[hw.DB_TAIL_BASE + 4 * qid] = tail
        if self.dbw[hw.DB_NEED_KICK]:
            self.wr(hw.REG_KICK, 1)

    def _arm(self, vector: int) -> None:
        self.dbw[hw.DB_ARM_BASE + 4 * vector] = 1

    def _wait(self, vector: int, ready, timeout: float | None) -> bool:
        """Wait until ready() or timeout; interrupts wake us, the heartbeat
        tells a slow device from a dead one.  The vector is armed only when we are
        about to sleep: a poll (timeout 0) leaves it unarmed, so a busy driver takes
        no interrupts."""
        if ready():
            return True
        if timeout is not None and timeout <= 0:
            return False
        end = None if timeout is None else time.monotonic() + timeout
        beat, beat_at = self.dbw[hw.DB_HEARTBEAT], time.monotonic()
        while True:
            self._arm(vector)
            wake = self._wake_vectors if vector == VEC_RX else ()
            for v in wake:
                self._arm(v)
            if ready():             # work that landed before the arm took effect
                return True
            now = time.monotonic()
            if end is not None and now >= end:
                return False
            for f in self.before_wait:
                f()
            step = 0.5 if end is None else min(0.5, end - now)
            if wake:
                self._wait_any((vector, *wake), step)
            else:
                self.bus.wait_irq(vector, step)
            if ready():
                return True
            b = self.dbw[hw.DB_HEARTBEAT]
            if b != beat:
                beat, beat_at = b, time.monotonic()
            elif time.monotonic() - beat_at > HEARTBEAT_TIMEOUT:
                raise DeviceGone(f"device heartbeat stopped for {HEARTBEAT_TIMEOUT} s")

    def _wait_any(self, vectors, timeout: float) -> None:
        """Sleep until one of the vectors fires (each fired one's event consumed)."""
        fds = [self.bus.irq_fd(v) for v in vectors]
        r, _, _ = select.select(fds, [], [], timeout)
        for fd in r:
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass

    # -- transmit -------------------------------------------------------------------
    def _reclaim_tx(self) -> None:
        w, n = self._txw, self.ring_size
        while self.tx_clean != self.tx_tail:
            st = w[(self.tx_clean % n) * _DESC_W + _TX_STATUS_W]
            if not st & hw.DESC_DD:
                break
            if st & (hw.DESC_DMA_ERR | hw.DESC_LEN_ERR):
                self.tx_errors += 1
            self.tx_clean += 1

    def tx_free(self) -> int:
        self._reclaim_tx()
        return self.ring_size - (self.tx_tail - self.tx_clean)

    def send(self, frame: bytes, timeout: float = 5.0) -> None:
        self.send_many([frame], timeout)

    def send_many(self, frames, timeout: float = 5.0) -> None:
        """Queue frames and ring the doorbell once per batch that fits."""
        n, bs = self.ring_size, self.buf_size
        ring, bufs = self.tx_ring.mem, self.tx_bufs.mem
        iova = self.tx_bufs.iova
        pending = 0
        for frame in frames:
            if len(frame) > bs:
                raise ValueError(f"frame of {len(frame)} bytes exceeds the {bs}-byte buffers")
            if self.tx_tail - self.tx_clean >= n:
                self._reclaim_tx()
                if self.tx_tail - self.tx_clean >= n:
                    if pending:
                        self._ring(TXQ, self.tx_tail)
                        pending = 0
                    if not self._wait(VEC_TX, lambda: self.tx_free() > 0, timeout):
                        raise MiniportError("transmit ring stayed full")
            i = self.tx_tail % n
            bufs[i * bs:i * bs + len(frame)] = frame
            _TXD.pack_into(ring, i * DESC, iova + i * bs, len(frame), hw.TXF_EOP, 0)
            self.tx_tail += 1
            pending += 1
        if pending:
            self._ring(TXQ, self.tx_tail)

    def flush_tx(self, timeout: float = 5.0) -> bool:
        """Wait until the device has finished every queued frame."""
        return self._wait(VEC_TX, lambda: self.tx_free() == self.ring_size, timeout)

    # -- receive --------------------------------------------------------------------
    def _post_rx(self, i: int) -> None:
        slot = i % self.ring_size
        _RXD.pack_into(self.rx_ring.mem, slot * DESC, self.rx_bufs.iova + slot * self.buf_size,
                       self.buf_size, 0, 0, 0)

    def rx_capacity(self, frame_len: int, payload_len: int) -> int:
        """Payload bytes the RX ring holds when every frame is frame_len bytes long and
        carries payload_len of them: what a receive window may offer without the peer
        being able to overrun the posted buffers (rx_no_buffer)."""
        slots_per_frame = -(-frame_len // self.buf_size)
        return self.ring_size // slots_per_frame * max(payload_len, 0)

    def add_ready_check(self, fn, vectors=()) -> None:
        """fn() -> bool: work on other rings (the chimney's offload queues); `recv(timeout)`
        wakes for it as for a received frame.  vectors: the MSI-X vectors that work
        signals on besides VEC_RX (the offload queue sets' own); a receiver arms them
        and sleeps on all of them."""
        self._ready_checks.append(fn)
        self._wake_vectors.extend(v for v in vectors if v not in self._wake_vectors)

    def _rx_ready(self) -> bool:
        off = (self.rx_next % self.ring_size) * DESC + STATUS_OFF_RX
        if _U16.unpack_from(self.rx_ring.mem, off)[0] & hw.DESC_DD:
            return True
        return any(f() for f in self._ready_checks)

    def poll_rx(self, limit: int = 64) -> list[bytes]:
        """Frames already received, without waiting.

        The device stores a descriptor's length and flags before its status word, so
        the status is loaded first and the rest only once it says done: loaded the
        other way round, the length could be the 0 we posted while the status is
        already done, and the frame would be lost."""
        frames, parts = [], self._rx_parts
        ring, bufs, n, bs = self.rx_ring.mem, self.rx_bufs.mem, self.ring_size, self.buf_size
        iova, dd, dma_err, eop = self.rx_bufs.iova, hw.DESC_DD, hw.DESC_DMA_ERR, hw.RXF_EOP
        pack, w = _RXD.pack_into, self._rxw
        while len(frames) < limit:
            slot = self.rx_next % n
            base = slot * _DESC_W
            status = w[base + _RX_STATUS_W]
            if not status & dd:
                break
            ln, flags = w[base + _RX_LEN_W], w[base + _RX_FLAGS_W]
            if status & dma_err:
                self.rx_errors += 1
                parts.append(None)      # the frame is incomplete: dropped at EOP
            else:
                parts.append(bytes(bufs[slot * bs:slot * bs + ln]))
            pack(ring, slot * DESC, iova + slot * bs, bs, 0, 0, 0)     # post it again
            self.rx_next += 1
            self.rx_tail += 1
            if flags & eop:
                if len(parts) == 1:
                    if parts[0] is not None:
                        frames.append(parts[0])
                elif None not in parts:
                    frames.append(b"".join(parts))
                parts.clear()
        if frames or parts:
            self._ring(RXQ, self.rx_tail)
        return frames

    def recv(self, timeout: float | None = None) -> bytes | None:
        """One frame, or None after timeout seconds."""
        if not self._rx_backlog:
            if not self._wait(VEC_RX, self._rx_ready, timeout):
                return None
            frames = self.poll_rx()
            if not frames:
                return None
            frames.reverse()
            self._rx_backlog = frames       # newest first: pop() from the end
        return self._rx_backlog.pop()

    # -- statistics -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {name: self.rd(hw.stat_offset(name), 8) for name, _ in hw.STATS}
