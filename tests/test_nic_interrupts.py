"""Interrupts and doorbells on the host bus: armed vectors fire once per arm,
moderation (VEC_ITR) spaces messages out, and a sleeping device asks for a
kick (DB_NEED_KICK) and wakes on it."""
import struct
import time

import pytest
from conftest import check_stopped_cleanly, start_device

from chimney import hw
from chimney.guest.bringup import bring_up
from chimney.guest.bus import u32
from chimney.guest.miniport import VEC_TX

FRAME = bytes.fromhex("ffffffffffff02c41e0000ff88b5") + bytes(50)


@pytest.fixture
def mp(tmp_path):
    dev = start_device(tmp_path)
    g = bring_up(socket=dev.socket, ring_size=64, stack=False)
    m = g.mp
    yield m
    g.close()
    check_stopped_cleanly(dev)


def arm(m, v):
    struct.pack_into("<I", m.db, hw.DB_ARM_BASE + 4 * v, 1)


def test_unarmed_vector_stays_quiet_armed_fires_once(mp):
    mp.bus.clear_irq(VEC_TX)
    mp.send(FRAME)
    assert mp.flush_tx(2)           # flush arms while it waits: drain that
    mp.bus.clear_irq(VEC_TX)
    struct.pack_into("<I", mp.db, hw.DB_ARM_BASE + 4 * VEC_TX, 0)
    mp.send(FRAME)
    assert not mp.bus.wait_irq(VEC_TX, 0.2), "an unarmed vector fired"
    arm(mp, VEC_TX)
    mp.send(FRAME)
    assert mp.bus.wait_irq(VEC_TX, 2), "an armed vector did not fire"
    assert u32(mp.db, hw.DB_ARM_BASE + 4 * VEC_TX) == 0, "the device must clear ARM when it fires"
    mp.send(FRAME)                  # not re-armed: no second message
    assert not mp.bus.wait_irq(VEC_TX, 0.2)


def test_moderation_spaces_messages(mp):
    itr_us = 100_000
    mp.wr(hw.VEC_ITR_BASE + hw.VEC_ITR_STRIDE * VEC_TX, itr_us)
    assert mp.rd(hw.VEC_ITR_BASE + hw.VEC_ITR_STRIDE * VEC_TX) == itr_us
    mp.bus.clear_irq(VEC_TX)
    arm(mp, VEC_TX)
    mp.send(FRAME)
    assert mp.bus.wait_irq(VEC_TX, 2)
    t_first = time.monotonic()
    arm(mp, VEC_TX)
    mp.send(FRAME)                  # completes at once, but its message must wait
    assert mp.bus.wait_irq(VEC_TX, 2), "the moderated message never came"
    gap = time.monotonic() - t_first
    assert gap >= 0.8 * itr_us / 1e6, f"second message after {gap * 1e3:.1f} ms, ITR is {itr_us / 1e3} ms"
    assert mp.stats()["tx_frames"] + mp.stats()["tx_drops"] == 2


def _post_without_ringing(mp):
    i = mp.tx_tail % mp.ring_size
    mp.tx_bufs.mem[i * mp.buf_size:i * mp.buf_size + len(FRAME)] = FRAME
    hw.TxDesc.pack_into(mp.tx_ring.mem, i * 16, addr=mp.tx_bufs.iova + i * mp.buf_size,
                        len=len(FRAME), flags=hw.TXF_EOP)
    mp.tx_tail += 1


def test_sleeping_device_asks_for_a_kick_and_wakes(mp):
    time.sleep(0.05)                # idle: the device goes to sleep
    assert u32(mp.db, hw.DB_NEED_KICK) == 1
    kicks = mp.stats()["kicks"]
    _post_without_ringing(mp)
    struct.pack_into("<I", mp.db, hw.DB_TAIL_BASE + 4 * hw.TXQ_FIRST, mp.tx_tail)
    mp.wr(hw.REG_KICK, 1)
    t0 = time.monotonic()
    assert mp.flush_tx(2)
    assert time.monotonic() - t0 < 0.5
    assert mp.stats()["kicks"] == kicks + 1
    assert u32(mp.db, hw.DB_NEED_KICK) == 0 or mp.tx_free() == mp.ring_size
    # The miniport's own ring-then-kick path works whether or not it had to kick.
    time.sleep(0.05)
    mp.send(FRAME)
    assert mp.flush_tx(2)


def test_doorbell_without_kick_is_still_served(mp):
    """A driver that rings without kicking (or races the flag) is only delayed."""
    time.sleep(0.05)
    _post_without_ringing(mp)
    struct.pack_into("<I", mp.db, hw.DB_TAIL_BASE + 4 * hw.TXQ_FIRST, mp.tx_tail)   # no KICK
    end = time.monotonic() + 1
    while mp.tx_free() != mp.ring_size and time.monotonic() < end:
        time.sleep(0.001)
    assert mp.tx_free() == mp.ring_size, "a doorbell without a kick was lost"


def test_heartbeat_moves(mp):
    b0 = u32(mp.db, hw.DB_HEARTBEAT)
    time.sleep(0.05)
    assert u32(mp.db, hw.DB_HEARTBEAT) != b0


def test_doorbells_under_stress_never_tear(tmp_path):
    """400k frames through a 1024-entry ring while the device polls the
    doorbell: a torn tail read (a half-written index) would stop the queue
    with Q_STATUS.ERROR, as it did when doorbells were written byte by byte."""
    dev = start_device(tmp_path)
    g = bring_up(socket=dev.socket, ring_size=1024, stack=False)
    try:
        m = g.mp
        sent = 0
        while sent < 400_000:
            m.send_many([FRAME] * 256)
            sent += 256
        assert m.flush_tx(10)
        assert m.rd(hw.qreg(hw.TXQ_FIRST, "Q_STATUS")) == hw.QSTATUS_ENABLED
        s = m.stats()
        assert s["tx_frames"] + s["tx_drops"] == sent and s["dma_errors"] == 0
    finally:
        g.close()
        check_stopped_cleanly(dev)
