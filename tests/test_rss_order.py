"""RSS moves of an offloaded connection, in process: the real TOE (the Rig of
test_toe_engine) under the real chimney calls (chimney.guest.chimney_calls), the
clock injected.  A connection whose receives are posted moves to another queue
set while its data is arriving; whichever set the driver serves first, the data
reaches the connection in the order it was received."""
from __future__ import annotations

import pytest
from test_toe_engine import RCV, SND, Rig, data, tree

from chimney import hw
from chimney.guest import rss
from chimney.guest.bus import DmaBuffer
from chimney.guest.chimney_calls import Chimney
from chimney.tcp.segment import ACK, PSH

HASH = 0x1234_5605          # bucket 5


class RigMiniport:
    """The Miniport surface the chimney calls use, over the Rig's Nic."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.bus = self
        self.dbw = rig.nic.dbw
        self.before_wait: list = []
        self.vectors: list[int] = []

    def dma_alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        b = self.rig.alloc(size)
        return DmaBuffer(b.mem, b.iova)

    def rd(self, off: int, size: int = 4) -> int:
        return self.rig.nic.reg_read(off, size)

    def wr(self, off: int, val: int, size: int = 4) -> None:
        self.rig.nic.reg_write(off, size, val)

    def _ring(self, qid: int, tail: int) -> None:
        self.dbw[hw.DB_TAIL_BASE + 4 * qid] = tail

    def add_ready_check(self, fn, vectors=()) -> None:
        self.vectors = list(vectors)


class Conn:
    """A connection's handler: what the chimney calls hand up, in order."""

    def __init__(self):
        self.got: list[tuple[int, bytes]] = []

    def on_recv_done(self, tag, payload, flags, status):
        self.got.append((tag, payload))


@pytest.fixture
def setup():
    rig = Rig()
    mp = RigMiniport(rig)
    ch = Chimney(mp, rss_queues=2, arena_size=4 << 20, pool_buffers=8, pool_buf_size=4096,
                 cmd_ring=16, event_ring=16, send_ring=16, recv_ring=32, compl_ring=32)
    ch.up()
    run(rig, ch, lambda: not ch.commands)       # RSS_TABLE and SET_PARAMS done
    yield rig, ch
    rig.close()


def run(rig, ch, pred, rounds=50):
    for _ in range(rounds):
        rig.pump()
        ch.poll()
        if pred():
            return
    raise AssertionError("condition not reached")


def heads(rig, k):
    """Records the device wrote on OCOMPL[k] so far (its HEAD)."""
    return rig.nic.dbw[hw.DB_HEAD_BASE + 4 * (hw.OCOMPLQ_FIRST + k)]


def offload_on_set0(rig, ch):
    assert ch.nqueues == 2 and ch.rss_table == rss.spread_table(2)
    e = tree()
    e[2].state.const.rss_hash = HASH
    ch.set_rss_table(bytes(128))                # everything on set 0
    cmd = ch.initiate(e)
    run(rig, ch, lambda: cmd.done)
    ctx = cmd.result[2].nic_ctx
    conn = Conn()
    ch.register(13, conn)
    assert ch.queue_of(13) == 0
    return ctx, conn


def test_each_set_has_its_own_vector_and_pool(setup):
    rig, ch = setup
    vecs = [rig.nic.reg_read(hw.qreg(q, "Q_VECTOR"), 4)
            for k in range(2) for q in (hw.OSENDQ_FIRST + k, hw.ORECVQ_FIRST + k, hw.OCOMPLQ_FIRST + k)]
    assert vecs == [3, 3, 3, 4, 4, 4]
    assert sorted(set(ch.pool_set.values())) == [0, 1]
    assert len(rig.nic.toe.pools[0]) == len(rig.nic.toe.pools[1]) == 4
    assert rig.nic.toe.rss_table == rss.spread_table(2)


@pytest.mark.parametrize("first", [1, 0])
def test_move_with_receives_posted_keeps_the_order(setup, first):
    rig, ch = setup
    ctx, conn = offload_on_set0(rig, ch)
    tags = [ch.post_receive(ctx, 13, 1000) for _ in range(4)]
    assert all(tags)
    run(rig, ch, lambda: not rig.nic.dbw[hw.DB_HEAD_BASE + 4 * hw.ORECVQ_FIRST] < ch.qsets[0].recvq.tail)
    chunks = [data(1000, i) for i in range(4)]
    # two buffers fill while the connection is on set 0 ...
    rig.feed(seq=RCV, ack=SND, payload=chunks[0], flags=ACK | PSH)
    rig.feed(seq=RCV + 1000, ack=SND, payload=chunks[1], flags=ACK | PSH)
    assert heads(rig, 0) == 2 and heads(rig, 1) == 0
    # ... the table moves it to set 1 (two receives still posted), and two more fill
    ch.set_rss_table(bytes(1 if b == HASH & 127 else 0 for b in range(128)))
    rig.pump()
    assert rig.nic.toe.rss_table[5] == 1
    rig.feed(seq=RCV + 2000, ack=SND, payload=chunks[2], flags=ACK | PSH)
    rig.feed(seq=RCV + 3000, ack=SND, payload=chunks[3], flags=ACK | PSH)
    # the device moved it with its receives posted: the last two are on set 1
    assert heads(rig, 0) == 2 and heads(rig, 1) == 2
    ch.poll(first=first)            # set `first` served first
    assert [t for t, _ in conn.got] == tags
    assert b"".join(p for _, p in conn.got) == b"".join(chunks)
    assert ch.queue_of(13) == 1
    assert ch.stats["rss_moves_seen"] == 1 and ch.served[13] == {"queue": 1, "records": {0: 2, 1: 2}}


def test_requests_follow_once_the_old_set_is_taken(setup):
    rig, ch = setup
    ctx, conn = offload_on_set0(rig, ch)
    t1 = ch.post_receive(ctx, 13, 1000)
    rig.pump()
    ch.set_rss_table(bytes(1 if b == HASH & 127 else 0 for b in range(128)))
    rig.pump()
    rig.feed(seq=RCV, ack=SND, payload=data(1000), flags=ACK | PSH)
    ch.poll(first=1)
    assert conn.got == [(t1, data(1000))] and ch.queue_of(13) == 1
    before = ch.qsets[1].recvq.tail
    t2 = ch.post_receive(ctx, 13, 1000)
    assert ch.qsets[1].recvq.tail == before + 1 and ch.stats["rss_request_moves"] == 1
    ch.accept(ctx, 0)       # an answer given by context alone (an IM's) goes to the same set
    assert ch.qsets[1].recvq.tail == before + 2
    rig.pump()
    rig.feed(seq=RCV + 1000, ack=SND, payload=data(1000, 1), flags=ACK | PSH)
    ch.poll()
    assert [t for t, _ in conn.got] == [t1, t2]


def test_bad_tables_are_refused_before_the_nic(setup):
    rig, ch = setup
    with pytest.raises(ValueError, match="queue sets 0..1"):
        ch.set_rss_table(bytes([2] * 128))
    with pytest.raises(ValueError, match="128 buckets"):
        ch.set_rss_table(bytes(64))
    assert rig.nic.toe.rss_table == rss.spread_table(2)
