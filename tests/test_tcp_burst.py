"""Segmentation offload in the engine (Config.max_burst): a burst stands for exactly
the segments the engine sends one by one -- checked differentially: two connections,
one with bursts and one without, get the same calls and segments and must emit the
same segments (bursts split with split_tso) and end in the same state."""
from __future__ import annotations

import random

import pytest

from chimney.tcp.segment import ACK, split_tso
from test_tcp_helpers import LOCAL_ISS, REMOTE_ISS, config, established, peer


def pair(**kw):
    a = established(cfg=config(max_burst=1, send_buffer_size=1 << 20), **kw)
    b = established(cfg=config(max_burst=64, send_buffer_size=1 << 20), **kw)
    return a, b


def expand(segs):
    return [p for s in segs for p in split_tso(s)]


def same(a, b, bursts):
    sa, sb = a.take_segments(), b.take_segments()
    bursts[0] += sum(1 for s in sb if s.tso)
    assert not any(s.tso for s in sa)
    assert sa == expand(sb)
    assert a.d == b.d
    assert (a._rtt_seq, a._rtt_start, a._rtx_deadline, a._persist_deadline,
            a._delack_deadline, a._adv_edge) == (b._rtt_seq, b._rtt_start, b._rtx_deadline,
                                                 b._persist_deadline, b._delack_deadline,
                                                 b._adv_edge)
    return sa


@pytest.mark.parametrize("seed", range(12))
def test_bursts_equal_segment_by_segment(seed):
    rnd = random.Random(seed)
    kw = dict(snd_wnd=rnd.choice([4000, 30_000, 200_000]), cwnd=rnd.choice([3000, 50_000, 400_000]))
    if seed % 3 == 0:
        kw["const"] = dict(timestamps=True)
        kw["ts_recent"] = 1
    a, b = pair(**kw)
    bursts = [0]
    now, peer_seq = 0.0, REMOTE_ISS + 1
    acked = LOCAL_ISS + 1
    fin = False
    for step in range(60):
        now += rnd.random() * 0.05
        r = rnd.random()
        if r < 0.35 and not fin:
            data = bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 500, 1000, 4000, 20_000, 70_000])))
            assert a.send(data, now) == b.send(data, now)
        elif r < 0.38 and not fin:
            a.shutdown_write(now); b.shutdown_write(now); fin = True
        elif r < 0.9:
            top = a.d.snd_max
            span = (top - acked) % (1 << 32)
            if span:
                acked = (acked + rnd.randrange(1, span + 1)) % (1 << 32)
            wnd = rnd.choice([a.d.snd_wnd, 2000, 10_000, 60_000])
            kwx = dict(tsval=int(now * 1000) + 1, tsecr=0) if seed % 3 == 0 else {}
            seg = peer(seq=peer_seq, ack=acked, flags=ACK, window=wnd, **kwx)
            a.on_segment(seg, now); b.on_segment(seg, now)
        else:
            dl = a.next_deadline()
            assert dl == b.next_deadline()
            if dl is not None:
                now = max(now, dl)
                a.poll(now); b.poll(now)
        same(a, b, bursts)
    assert bursts[0] or seed % 4 == 3 or kw["cwnd"] == 3000 or kw["snd_wnd"] == 4000


def test_burst_is_one_segment_with_psh_on_its_last_piece():
    a, b = pair(snd_wnd=100_000)
    data = bytes(range(256)) * 20          # 5120 bytes: 5 full segments and a runt
    a.send(data, 0.0); b.send(data, 0.0)
    sb = b.take_segments()
    assert [s.tso for s in sb] == [1000, 0] and len(sb[0].payload) == 5000
    pieces = expand(sb)
    assert [len(p.payload) for p in pieces] == [1000] * 5 + [120]
    assert pieces == a.take_segments()
