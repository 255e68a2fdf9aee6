"""Connection.on_fast (the device's receive path: header fields, no Segment) does
exactly what on_segment does -- checked differentially on random segment streams:
in-order data, pure ACKs, duplicates, out-of-order, window changes, old
timestamps, FIN, with and without timestamps."""
from __future__ import annotations

import random

import pytest

from chimney.tcp.segment import ACK, FIN, PSH
from test_tcp_helpers import config, established, peer


def via_fast(c, seg, now):
    if seg.mss is None and seg.wscale is None and not seg.sack_permitted and \
            not seg.sack_blocks and c.on_fast(seg.seq, seg.ack, seg.flags, seg.window,
                                              seg.tsval, memoryview(seg.payload), now):
        return True
    c.on_segment(seg, now)
    return False


@pytest.mark.parametrize("seed", range(16))
def test_on_fast_equals_on_segment(seed):
    rnd = random.Random(seed)
    ts = seed % 2 == 0
    kw = dict(const=dict(timestamps=True), ts_recent=1) if ts else {}
    a = established(cfg=config(recv_buffer_size=20_000), rcv_wnd=20_000, **kw)
    b = established(cfg=config(recv_buffer_size=20_000), rcv_wnd=20_000, **kw)
    a.send(bytes(30_000), 0.0); b.send(bytes(30_000), 0.0)
    assert a.take_segments() == b.take_segments()
    now, tsv, fast = 0.0, 10, 0
    for step in range(300):
        now += rnd.random() * 0.01
        d = a.d
        r = rnd.random()
        seq = d.rcv_nxt if r < 0.8 else (d.rcv_nxt + rnd.randrange(-3000, 3000)) % (1 << 32)
        top = (d.snd_max - d.snd_una) % (1 << 32)
        ack = d.snd_una if rnd.random() < 0.5 else (d.snd_una + rnd.randrange(0, top + 2)) % (1 << 32)
        n = rnd.choice([0, 0, 1000, 1000, 500, 1])
        flags = ACK | (PSH if rnd.random() < 0.3 else 0) | (FIN if step > 280 and rnd.random() < 0.1 else 0)
        if rnd.random() < 0.9:
            tsv += rnd.randrange(0, 3)
        kwx = dict(tsval=tsv if rnd.random() < 0.95 else 0, tsecr=0) if ts else {}
        wnd = d.snd_wnd if rnd.random() < 0.8 else rnd.choice([0, 5000, 60_000])
        seg = peer(seq=seq, ack=ack, flags=flags, window=wnd, payload=bytes([step & 255]) * n, **kwx)
        a.on_segment(seg, now)
        fast += via_fast(b, seg, now)
        assert a.take_segments() == b.take_segments()
        assert a.d == b.d and a._ooo == b._ooo and a._now == b._now
        assert (a._delack_deadline, a._rtx_deadline, a._ka_deadline, a._unacked_full_segments) == \
            (b._delack_deadline, b._rtx_deadline, b._ka_deadline, b._unacked_full_segments)
        if rnd.random() < 0.3:
            k = rnd.randrange(0, 5000)
            assert a.recv(k, now) == b.recv(k, now)
            assert a.take_segments() == b.take_segments()
        if rnd.random() < 0.05:
            a.poll(now + 0.3); b.poll(now + 0.3)
            assert a.take_segments() == b.take_segments()
    assert fast > 10
