"""Hostile but well-formed guests and peers: timer storms and hoarding.  The timer
path never leaves a traceback loop behind, a zero window held for many hours keeps
probing at rto_max, a guest that posts huge sends or never answers indications is
bounded per connection and does not starve the others."""
from __future__ import annotations

import pytest
from test_toe_engine import (
    LPORT,
    OUR_IP,
    OUR_MAC,
    PEER_IP,
    PEER_MAC,
    RCV,
    SND,
    Rig,
    data,
    tree,
)
from test_toe_helpers import eth_ipv4_tcp

from chimney import hw
from chimney.tcp.segment import ACK, PSH, Segment


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def offload_port(rig, port: int, **kw) -> int:
    e = tree(**kw)
    e[2].state.const.local_port = port
    e[2].host_handle = port
    c, st = rig.drv.initiate(e)
    assert c["status"] == hw.ST_SUCCESS, st
    return st[2].nic_ctx


def test_zero_window_for_a_day_keeps_probing_at_rto_max(rig):
    ctx = offload_port(rig, LPORT, send=b"z" * 100, snd_wnd=0, snd_nxt=SND, snd_max=SND,
                       retransmit_delta=1000)
    rig.drv.set_params(rto_min_ticks=200)
    seen = 0
    for _ in range(1500):                       # 25 h of a window that never opens
        rig.advance(60.0)
        seen += len(rig.out())
    toe = rig.nic.toe
    assert toe.internal_errors == 0
    assert 1400 <= seen <= 1500                 # one probe per rto_max, no storm
    c, recs = rig.drv.terminate([ctx])
    assert c["status"] == hw.ST_SUCCESS
    assert recs[0].state.delegated.send_buffer == b"z" * 100


def test_an_exception_in_the_timer_path_asks_for_upload_once(rig, monkeypatch):
    a = offload_port(rig, LPORT)
    b = offload_port(rig, LPORT + 1)
    conn = rig.nic.toe.conns[a].conn

    def boom():
        raise OverflowError("int too large to convert to float")
    monkeypatch.setattr(conn, "_on_rto", boom)
    buf = rig.alloc(4096)
    rig.drv.osend(a, buf.iova, 10, tag=1)
    rig.drv.osend(b, buf.iova, 10, tag=2)
    rig.pump()
    assert len(rig.out()) == 2
    for _ in range(20):
        rig.advance(1.5)
    toe = rig.nic.toe
    assert toe.internal_errors == 1             # once: its timers stop
    ev = [(e["kind"], e["reason"], e["ctx"]) for e in rig.drv.pop(hw.EVENTQ)
          if e["kind"] == hw.EV_RETRIEVE]
    assert ev[0] == (hw.EV_RETRIEVE, hw.RR_HARDWARE_FAILURE, a)
    assert (hw.EV_RETRIEVE, hw.RR_HARDWARE_FAILURE, b) not in ev
    c, recs = rig.drv.terminate([a])
    assert c["status"] == hw.ST_SUCCESS
    assert recs[0].state.delegated.send_buffer == bytes(10)


def test_huge_sends_are_bounded_per_connection_and_do_not_starve_others(rig, monkeypatch):
    toe = rig.nic.toe
    monkeypatch.setattr(toe, "pending_fair", 1 << 20)
    monkeypatch.setattr(toe, "pending_max", 3 << 20)
    monkeypatch.setattr(toe, "send_pool", 4 << 20)
    hogs = [offload_port(rig, 30000 + i, snd_wnd=0, retransmit_delta=60_000)
            for i in range(3)]                  # a closed window: their sends never drain
    good = offload_port(rig, LPORT)
    big = rig.alloc(1 << 20)
    tag = 100
    refused = {}
    for h in hogs:
        for _ in range(6):                     # 6 MiB each, beyond the engine's 256 KiB
            tag += 1
            rig.drv.osend(h, big.iova, 1 << 20, tag=tag)
        rig.pump()
        errs = [r for r in rig.drv.pop(hw.OCOMPLQ_FIRST) if r["kind"] == hw.OC_ERROR]
        assert all(r["status"] == hw.ST_RESOURCES for r in errs)
        refused[h] = len(errs)
    # the first hog stops at pending_max, the next ones at the device pool
    assert refused[hogs[0]] == 6 - 3
    assert toe.pending_bytes <= (4 << 20) + (1 << 20) * len(hogs)
    assert refused[hogs[2]] >= 5
    # a well-behaved connection below pending_fair is never refused
    buf = rig.alloc(65536)
    buf.mem[:] = data(65536)
    for i in range(8):
        rig.drv.osend(good, buf.iova, 65536, tag=i)
    rig.pump()
    assert [r for r in rig.drv.pop(hw.OCOMPLQ_FIRST) if r["kind"] == hw.OC_ERROR] == []
    assert sum(len(s.payload) for s in rig.out()) > 0
    rig.feed(seq=RCV, ack=SND + 8 * 65536, window=65535)
    for _ in range(40):
        segs = rig.out()
        if not segs:
            break
        top = max(s.seq + len(s.payload) for s in segs)
        rig.feed(seq=RCV, ack=top, window=65535)
    done = [r["tag"] for r in rig.drv.pop(hw.OCOMPLQ_FIRST) if r["kind"] == hw.OC_SEND_DONE]
    assert done == list(range(8))
    # terminating the hogs returns what they queued, and frees the pool
    held = 0
    for h in hogs:
        c, recs = rig.drv.terminate([h])
        assert c["status"] == hw.ST_SUCCESS
        held += len(recs[0].state.delegated.send_buffer)
    assert held == (6 * len(hogs) - sum(refused.values())) << 20
    assert toe.pending_bytes == 0


def test_a_guest_that_never_answers_indications_does_not_starve_others(rig):
    hog = offload_port(rig, 30000)
    good = offload_port(rig, LPORT)
    pools = [rig.alloc(4096) for _ in range(4)]
    for i, p in enumerate(pools):
        rig.drv.orecv(0, p.iova, 4096, tag=900 + i, flags=hw.ORF_POOL)
    rig.pump()
    def feed(port, seq, payload):
        seg = Segment(5001, port, seq=seq, ack=SND, flags=ACK | PSH, window=65535,
                      payload=payload)
        rig.peer.send(eth_ipv4_tcp(PEER_MAC, OUR_MAC, PEER_IP, OUR_IP, seg))
        rig.pump()
    got = bytearray()
    for i in range(50):
        feed(30000, RCV + 100 * i, data(100, 1))        # the hog's data: never accepted
        feed(LPORT, RCV + 100 * i, data(100, i))
        for r in rig.drv.pop(hw.OCOMPLQ_FIRST):
            assert r["kind"] == hw.OC_INDICATE
            if r["ctx"] == good:
                got += pools[r["tag"] - 900].mem[:r["len"]]
                rig.drv.orecv(good, 0, r["len"], tag=0, flags=hw.ORF_ACCEPT)
                rig.drv.orecv(0, pools[r["tag"] - 900].iova, 4096, tag=r["tag"],
                              flags=hw.ORF_POOL)
        rig.pump()
    assert bytes(got) == b"".join(data(100, i) for i in range(50))
    toe = rig.nic.toe
    assert toe.conns[hog].indicated == 100                # one pool buffer, held
    assert len(toe.conns[hog].conn.d.recv_buffer) == 5000  # the rest waits in its window


def test_a_forged_pure_ack_from_beyond_rcv_nxt_cannot_lock_the_send_window(rig):
    """One valid-checksum pure ACK with SEQ inside the receive window but ahead of
    RCV.NXT and window 0 (what a flood of garbled frames hits sooner or later): let
    through, its SEQ becomes SND.WL1 and the real peer's window updates (SEQ = RCV.NXT)
    are ignored for good.  It is taken as if sent at RCV.NXT: the next real ACK
    opens the window again, and the transfer goes on."""
    ctx = offload_port(rig, LPORT)
    buf = rig.alloc(65536)
    buf.mem[:60000] = data(60000)
    rig.drv.osend(ctx, buf.iova, 60000, tag=1)
    rig.pump()
    got = {}
    for _ in range(100):
        segs = rig.out()
        for s in segs:
            got[s.seq] = bytes(s.payload)
        top = SND + sum(len(v) for v in got.values())
        rig.feed(seq=RCV + 1000, ack=top, window=0)        # forged
        rig.feed(seq=RCV, ack=top, window=65535)           # the peer
        if top == SND + 60000:
            break
        rig.advance(0.05)
    assert b"".join(got[k] for k in sorted(got)) == data(60000)
    assert [r["tag"] for r in rig.drv.pop(hw.OCOMPLQ_FIRST)] == [1]
    assert rig.nic.toe.conn_stats(ctx)["acks_ahead"] > 0


def test_records_held_when_a_completion_ring_write_fails(rig, monkeypatch):
    """A to-host ring whose memory the driver took away stops; the completions that
    could not be written are kept, in order, for the restarted ring."""
    ctx = offload_port(rig, LPORT)
    buf = rig.alloc(4096)
    for tag in (1, 2):
        rig.drv.osend(ctx, buf.iova, 10, tag=tag)
    rig.pump()
    rig.out()
    ring = rig.drv.rings[hw.OCOMPLQ_FIRST].iova
    dma = rig.nic.dma
    real = dma.write
    monkeypatch.setattr(dma, "write", lambda addr, b: False if addr == ring else real(addr, b))
    rig.feed(seq=RCV, ack=SND + 20)
    assert rig.nic.dma_err_count == 1 and rig.drv.pop(hw.OCOMPLQ_FIRST) == []
    monkeypatch.setattr(dma, "write", real)
    rig.drv.setup_queue(hw.OCOMPLQ_FIRST, 256)
    rig.pump()
    assert [(r["kind"], r["tag"]) for r in rig.drv.pop(hw.OCOMPLQ_FIRST)] == [
        (hw.OC_SEND_DONE, 1), (hw.OC_SEND_DONE, 2)]


def test_pool_buffers_go_round_the_waiting_connections(rig):
    """One pool buffer at a time and three connections with data waiting: each gets
    its turn, in the order they started waiting -- not always the same one."""
    ctxs = [offload_port(rig, 30000 + i) for i in range(3)]
    pool = rig.alloc(4096)

    def feed(port, seq, payload):
        seg = Segment(5001, port, seq=seq, ack=SND, flags=ACK | PSH, window=65535,
                      payload=payload)
        rig.peer.send(eth_ipv4_tcp(PEER_MAC, OUR_MAC, PEER_IP, OUR_IP, seg))
    for i in range(3):
        for k in range(4):
            feed(30000 + i, RCV + 100 * k, data(100, i))
        rig.pump()
    order = []
    for _ in range(9):
        rig.drv.orecv(0, pool.iova, 100, tag=7, flags=hw.ORF_POOL)
        rig.pump()
        ind = [r for r in rig.drv.pop(hw.OCOMPLQ_FIRST) if r["kind"] == hw.OC_INDICATE]
        assert len(ind) == 1
        order.append(ctxs.index(ind[0]["ctx"]))
        rig.drv.orecv(ind[0]["ctx"], 0, 100, tag=0, flags=hw.ORF_ACCEPT)
        rig.pump()
    assert order == [0, 1, 2] * 3


def test_the_fullest_connection_still_fits_one_terminate_record():
    """What a connection can hold -- a full engine send buffer, pending_max of held
    sends, a receive window plus buffered bytes at the INITIATE bound -- fits the data
    a state record may carry, so its TERMINATE response always decodes."""
    from chimney.device import toe as toe_mod
    from chimney.device.toe_objects import MAX_RECV
    from chimney.staterec import codec
    from chimney.tcp.engine import Config
    send = Config.send_buffer_size + toe_mod.Toe.pending_max
    assert send + MAX_RECV <= codec.MAX_DATA
    e = tree(send=b"s" * send, recv=b"r" * MAX_RECV, rcv_wnd=0)
    back = codec.decode_records(codec.encode_records(e))
    d = back[2].state.delegated
    assert (len(d.send_buffer), len(d.recv_buffer)) == (send, MAX_RECV)
    # and INITIATE refuses a receive side past the bound
    e = tree(recv=b"r" * 100, rcv_wnd=MAX_RECV)
    assert codec.check_tcp(e[2].state, Config.send_buffer_size, MAX_RECV)


def test_buffers_unmapped_after_posting_lose_no_data(rig):
    """A posted receive or pool buffer the guest unmapped afterwards completes with
    DMA_ERROR; the received bytes stay and go to the next buffer."""
    import os
    fd = os.memfd_create("late")            # the DMA table owns it from map() on
    os.ftruncate(fd, 1 << 16)
    late = 0x9_0000_0000
    rig.dma.map(late, 1 << 16, 0, True, True, fd)
    ctx = offload_port(rig, LPORT)
    rig.drv.orecv(ctx, late, 1000, tag=1)
    rig.drv.orecv(0, late + 8192, 4096, tag=2, flags=hw.ORF_POOL)
    rig.pump()
    rig.dma.unmap(late, 1 << 16)
    rig.feed(seq=RCV, ack=SND, payload=data(300), flags=ACK | PSH)
    got = [(r["kind"], r["tag"], r["status"]) for r in rig.drv.pop(hw.OCOMPLQ_FIRST)]
    assert got == [(hw.OC_RECV_DONE, 1, hw.ST_DMA_ERROR), (hw.OC_ERROR, 2, hw.ST_DMA_ERROR)]
    b = rig.alloc(4096)
    rig.drv.orecv(ctx, b.iova, 1000, tag=3)
    rig.pump()
    done = rig.drv.pop(hw.OCOMPLQ_FIRST)
    assert [(r["tag"], r["len"], r["status"]) for r in done] == [(3, 300, hw.ST_SUCCESS)]
    assert bytes(b.mem[:300]) == data(300)
