"""Descriptor ordering between device and driver, modelled load by load.

The device writes a receive descriptor's buffer, length and flags first and its
status word (DD) last; the driver must therefore load the status word first and
the rest only once it says done.  Loading the length first is a race: the length
can be seen as 0 (the value the driver posted) and the status as done a moment
later, and the frame is lost.  These tests replay every interleaving of the
device's stores with the miniport's loads, deterministically: the driver's view
of the ring is a model in which the device makes its next store just before a
chosen load.  The to-host offload rings (CMDC, OCOMPL, EVENT) are checked the
same way: there the device's last store is DB_HEAD, the driver's first load."""
from __future__ import annotations

import itertools

import pytest

from chimney import hw
from chimney.guest.bus import DmaBuffer
from chimney.guest.miniport import Miniport
from chimney.guest.chimney_calls import ToHostRing

IOVA = 0x1_0000_0000
RX_WORD = {f.name: f.offset // 2 for f in hw.RxDesc.fields}
DESC_WORDS = hw.RxDesc.size // 2


class FakeBus:
    """Registers that bring a Miniport up, memory, a doorbell page; no device."""

    def __init__(self):
        self.ram = bytearray(1 << 20)
        self.next = 0
        self.page = bytearray(hw.BAR_DOORBELL_SIZE)

    def reg_read(self, bar, off, size):
        if off == hw.REG_ID:
            return hw.reg("ID").reset
        if off == hw.REG_VERSION:
            return hw.reg("VERSION").reset
        if off == hw.REG_FEATURES:
            return hw.FEATURES
        if off == hw.REG_STATUS:
            return hw.STATUS_READY | hw.STATUS_ENABLED | hw.STATUS_LINK_UP
        if hw.Q_BASE <= off < hw.Q_BASE + hw.NUM_QIDS * hw.Q_STRIDE:
            return hw.QSTATUS_ENABLED
        return 0

    def reg_write(self, bar, off, size, val):
        pass

    def map_bar(self, bar):
        return self.page

    def enable_msix(self, n):
        pass

    def wait_irq(self, vector, timeout):
        return False

    def dma_alloc(self, size, align=4096):
        start = (self.next + align - 1) // align * align
        self.next = start + size
        return DmaBuffer(memoryview(self.ram)[start:start + size], IOVA + start)


class ModelWords:
    """The driver's 16-bit view of a ring in which the device makes store k just
    before the driver's load number at[k] (a non-decreasing schedule)."""

    def __init__(self, real, stores, at):
        self.real, self.stores, self.at = real, list(stores), list(at)
        self.loads = 0
        self.done = 0

    def _advance(self):
        while self.done < len(self.stores) and self.at[self.done] <= self.loads:
            self.stores[self.done]()
            self.done += 1

    def __getitem__(self, i):
        self._advance()
        self.loads += 1
        return self.real[i]

    def __setitem__(self, i, v):
        self.real[i] = v

    def finish(self):
        while self.done < len(self.stores):
            self.stores[self.done]()
            self.done += 1


def device_rx_stores(mp, frame: bytes, first_slot: int):
    """The device's stores for one frame, in its order: per descriptor the data,
    the length, the flags, and the status word last."""
    w, bs = memoryview(mp.rx_ring.mem).cast("H"), mp.buf_size
    parts = [frame[i:i + bs] for i in range(0, len(frame), bs)]
    stores = []
    for k, part in enumerate(parts):
        slot = (first_slot + k) % mp.ring_size
        base, size, last = slot * DESC_WORDS, len(part), k == len(parts) - 1

        def data(slot=slot, part=part):
            mp.rx_bufs.mem[slot * bs:slot * bs + len(part)] = part

        def length(base=base, n=size):
            w[base + RX_WORD["len"]] = n

        def flags(base=base, eop=last):
            w[base + RX_WORD["flags"]] = hw.RXF_EOP if eop else 0

        def status(base=base):
            w[base + RX_WORD["status"]] = hw.DESC_DD

        stores += [data, length, flags, status]
    return stores


def schedules(nstores: int, loads: int):
    """Every non-decreasing assignment of stores to load numbers 0..loads."""
    return itertools.combinations_with_replacement(range(loads + 1), nstores)


@pytest.fixture
def mp():
    m = Miniport(FakeBus(), ring_size=8, buf_size=256)
    m.up()
    return m


def receive_under(mp, frames, at):
    """Run poll_rx under one interleaving until the device is done; return what
    the driver delivered."""
    stores, slot = [], mp.rx_next
    for f in frames:
        stores += device_rx_stores(mp, f, slot)
        slot += (len(f) + mp.buf_size - 1) // mp.buf_size
    model = ModelWords(mp._rxw, stores, at)
    mp._rxw = model
    got = []
    try:
        for _ in range(len(stores) + 4):        # one poll per load at most is enough
            got += mp.poll_rx()
            if model.done == len(stores) and mp.rx_next == slot:
                break
        model.finish()
        got += mp.poll_rx()
    finally:
        mp._rxw = model.real
    return got


def test_length_zero_before_done_is_not_consumed(mp):
    """The torn state itself: length still 0 and status not done. Nothing is
    consumed; once the status says done, the frame is read with its length."""
    frame = bytes(range(60))
    stores = device_rx_stores(mp, frame, mp.rx_next)
    stores[0]()                                 # data in the buffer, length still 0
    assert mp.poll_rx() == [] and mp.rx_next == 0
    stores[1]()                                 # length, but no DD yet
    stores[2]()
    assert mp.poll_rx() == [] and mp.rx_next == 0
    stores[3]()
    assert mp.poll_rx() == [frame] and mp.rx_next == 1


@pytest.mark.parametrize("size", [60, 300])     # one descriptor, two descriptors
def test_every_interleaving_delivers_the_frame_exactly(size):
    frame = bytes((i * 7 + 3) & 0xFF for i in range(size))
    nstores = 4 * ((size + 255) // 256)
    tried = 0
    for at in schedules(nstores, 6):
        m = Miniport(FakeBus(), ring_size=8, buf_size=256)
        m.up()
        got = receive_under(m, [frame], at)
        assert got == [frame], f"stores before loads {at}: delivered {[len(g) for g in got]}"
        assert m.rx_errors == 0
        tried += 1
    assert tried > 50


def test_interleaving_across_ring_wrap(mp):
    """Frames landing while the driver polls, past the end of the ring (the
    device fills only slots the driver posted: at most a ring's worth at a time)."""
    for rnd in range(4):
        frames = [bytes([rnd * 16 + i]) * (60 + i) for i in range(5 + rnd % 2)]
        k = 4 * len(frames)
        for at in ((0,) * k, tuple(range(k)), tuple(i // 3 for i in range(k))):
            got = receive_under(mp, frames, at)
            assert got == frames, (rnd, at)
    assert mp.rx_next > mp.ring_size * 2


def test_tx_reclaim_waits_for_done(mp):
    """A transmit slot is reused only after the device's DD store."""
    mp.send(bytes(60))
    assert mp.tx_free() == mp.ring_size - 1
    w = memoryview(mp.tx_ring.mem).cast("H")
    w[hw.TxDesc.offset_of("status") // 2] = hw.DESC_DD
    assert mp.tx_free() == mp.ring_size


class _Ch:
    def __init__(self, bus):
        self.bus = bus
        self.dbw = hw.Words(bus.page)


def test_to_host_ring_reads_head_before_entries():
    """CMDC/OCOMPL/EVENT: the device writes the entry, then advances DB_HEAD. A
    driver that sees the new head reads the whole entry; one that does not, none."""
    bus = FakeBus()
    ch = _Ch(bus)
    ring = ToHostRing(ch, hw.OCOMPLQ_FIRST, 8)
    lay = hw.OComplRec
    for i in range(20):
        rec = lay.pack(kind=hw.OC_SEND_DONE, tag=i, host_handle=0x1122334455667788 + i, len=1000 + i)
        slot = i % 8
        ring.mem.mem[slot * lay.size:(slot + 1) * lay.size] = rec      # entry, head not yet
        assert ring.take_raw(lay._struct) == []
        assert ring.take() == []
        ch.dbw[hw.DB_HEAD_BASE + 4 * hw.OCOMPLQ_FIRST] = i + 1
        got = ring.take_raw(lay._struct) if i % 2 else [tuple(ring.take()[0].values())]
        assert got == [lay._struct.unpack(rec)]
        assert ch.dbw[hw.DB_TAIL_BASE + 4 * hw.OCOMPLQ_FIRST] == i + 1
