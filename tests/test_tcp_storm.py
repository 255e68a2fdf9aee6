"""Segments that fail the acceptability tests (RFC 9293 §3.10.7.4, RFC 5961) move
nothing: a seeded, bounded storm of bad segments aimed at one end of a real transfer
(out-of-window sequence numbers, unacceptable or old ACKs, sequence numbers ahead of
RCV.NXT, wild flags, windows and timestamps, corrupted checksums) leaves the transfer
to complete with exact bytes both ways."""
from __future__ import annotations

import heapq
import random

import pytest

from chimney.tcp.engine import Config, Connection, seq_add
from chimney.tcp.segment import ACK, FIN, PSH, RST, Segment, SegmentError, decode
from chimney.tcp.state import TcpCached, TcpState as S
from test_tcp_helpers import LOCAL_ISS, REMOTE_ISS, established, feed, ours, peer

A = ("192.0.2.1", 40000)            # the connection under attack (sends the bulk)
B = ("192.0.2.2", 5001)             # its real peer
L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1


# ------------------------------------------------- what a bad segment must not move ----
def test_pure_ack_ahead_of_rcv_nxt_does_not_move_the_send_window():
    """Acceptable (inside the window), but out of sequence: its window would set
    SND.WL1 beyond every real segment's SEG.SEQ and freeze SND.WND for good."""
    c = established()
    feed(c, peer(seq=R1 + 100, window=0))
    assert (c.d.snd_wnd, c.d.snd_wl1) == (10_000, R1)
    feed(c, peer(seq=R1, window=5000))                       # the real one still counts
    assert (c.d.snd_wnd, c.d.snd_wl1) == (5000, R1)


def test_data_ahead_of_rcv_nxt_is_queued_but_its_window_waits():
    c = established()
    feed(c, peer(seq=R1 + 100, payload=b"b" * 100, window=0))
    assert c.d.snd_wnd == 10_000 and len(c._ooo) == 1
    feed(c, peer(seq=R1, payload=b"a" * 100, window=7000))
    assert c.d.snd_wnd == 7000 and c.recv(300, 0.0) == b"a" * 100 + b"b" * 100


def test_old_ack_does_not_take_the_timestamp():
    """An old ACK (SEG.ACK < SND.UNA) with a TSval far ahead must not become
    TS.Recent: PAWS would then drop every real segment."""
    c = established(const=dict(timestamps=True), ts_recent=100, ts_time=0)
    c.send(b"a" * 500, 0.0)
    c.take_segments()
    feed(c, peer(ack=L1 + 500, tsval=101, tsecr=0), now=0.1)
    feed(c, peer(ack=L1 + 200, window=1, tsval=2_000_000_000, tsecr=0), now=0.2)
    assert c.d.ts_recent == 101 and c.d.snd_wnd == 10_000
    feed(c, peer(payload=b"ok", tsval=102, tsecr=0), now=0.3)
    assert c.dropped_paws == 0 and c.recv(10, 0.3) == b"ok"


def test_unacceptable_ack_moves_nothing():
    """RFC 5961 §5.2: an ACK beyond SND.MAX is answered and dropped -- no window,
    no timestamp, no FIN, no keep-alive restart."""
    cached = TcpCached(nagle=False, keepalive=True, ka_timeout=60_000)
    c = established(cached=cached, ka_timeout_delta=60_000, ka_probe_count=2,
                    const=dict(timestamps=True), ts_recent=100, ts_time=0)
    out = feed(c, peer(ack=L1 + 5000, flags=ACK | FIN, window=0, payload=b"x",
                       tsval=500, tsecr=0), now=10.0)
    assert out == [ours(tsval=10_000, tsecr=100)]
    assert (c.d.snd_wnd, c.d.snd_wl1, c.d.ts_recent, c.d.rcv_nxt) == (10_000, R1, 100, R1)
    assert c.state is S.ESTABLISHED and c.d.ka_probe_count == 2 and c._ka_deadline == 60.0


def test_time_wait_restarts_only_for_the_fin_retransmitted():
    c = established(S.TIME_WAIT, rcv_nxt=R1 + 1, snd_una=L1 + 1, snd_nxt=L1 + 1,
                    snd_max=L1 + 1, retransmit_delta=60_000)
    feed(c, peer(seq=R1 + 50_000, ack=L1 + 1, flags=ACK | FIN), now=5.0)     # out of window
    assert c.next_deadline() == 60.0
    feed(c, peer(seq=R1, ack=L1 + 1, flags=ACK | FIN), now=5.0)              # the FIN again
    assert c.next_deadline() == 65.0


# --------------------------------------------------------------------- the storm ----


class Link:
    """A clean link with a fixed delay; every segment crosses as bytes."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, str, bytes]] = []
        self._n = 0
        cfg = dict(rto_min=0.2, recv_buffer_size=64 * 1024, send_buffer_size=64 * 1024)
        isn = random.Random(seed + 1)
        self.a = Connection.client(A, B, Config(isn=lambda: isn.getrandbits(32), **cfg))
        self.b = Connection.listener(B, Config(isn=lambda: isn.getrandbits(32), **cfg))

    def transmit(self) -> None:
        for name, conn, (src, dst) in (("b", self.a, (A[0], B[0])), ("a", self.b, (B[0], A[0]))):
            for seg in conn.take_segments():
                self._n += 1
                heapq.heappush(self.queue, (self.now + 0.005, self._n, name, seg.encode(src, dst)))

    def deliver_due(self) -> None:
        while self.queue and self.queue[0][0] <= self.now:
            _, _, name, raw = heapq.heappop(self.queue)
            src, dst = (A[0], B[0]) if name == "b" else (B[0], A[0])
            conn = self.b if name == "b" else self.a
            conn.on_segment(decode(raw, src, dst), self.now, src)

    def next_time(self) -> float | None:
        times = [t for t in (self.a.next_deadline(), self.b.next_deadline()) if t is not None]
        if self.queue:
            times.append(self.queue[0][0])
        return min(times) if times else None


def bad_segment(rng: random.Random, c: Connection) -> Segment:
    """One segment the connection must not act on (beyond an ACK or a challenge ACK),
    built from its current state so that it lands near the edges of what it accepts."""
    d = c.d
    rcv_nxt, rcv_wnd = d.rcv_nxt, d.rcv_wnd
    kind = rng.randrange(4)
    flags = rng.getrandbits(8)
    payload = rng.randbytes(rng.choice([0, 0, 1, 10, 100, 1400]))
    ack = rng.getrandbits(32)
    sack: list[tuple[int, int]] = []
    if kind == 0:
        # sequence number outside the receive window, left or right; anything else goes
        if rng.random() < 0.5:
            seq = seq_add(rcv_nxt, rcv_wnd + rng.choice([0, 1, rng.randrange(1 << 30)]))
        else:
            seq = seq_add(rcv_nxt, -len(payload) - 1 - rng.choice([0, rng.randrange(1 << 30)]))
        if rng.random() < 0.5:
            ack = seq_add(d.snd_una, rng.randrange(-1000, 1000))
        if rng.random() < 0.3:
            sack = [(seq_add(d.snd_una, 1), d.snd_max)]
    elif kind == 1:
        # in the window, but the ACK is unacceptable (RFC 5961 §5.2): beyond SND.MAX or
        # older than SND.UNA - MAX.SND.WND
        seq = seq_add(rcv_nxt, rng.randrange(max(1, rcv_wnd)) if rng.random() < 0.5 else 0)
        if rng.random() < 0.5:
            ack = seq_add(d.snd_max, 1 + rng.choice([0, rng.randrange(1 << 30)]))
        else:
            ack = seq_add(d.snd_una, -d.max_snd_wnd - 1 - rng.choice([0, rng.randrange(1 << 30)]))
        flags |= ACK
        if seq == rcv_nxt:
            flags &= ~RST                       # an exact RST resets, rightly
        if rng.random() < 0.3:
            sack = [(seq_add(d.snd_una, 1), d.snd_max)]
    elif kind == 2:
        # an old ACK (SND.UNA - MAX.SND.WND =< SEG.ACK < SND.UNA): it may be taken,
        # but says nothing new -- no window, no timestamp, no state from it
        seq = rcv_nxt
        ack = seq_add(d.snd_una, -1 - rng.randrange(max(1, d.max_snd_wnd)))
        flags = ACK | (flags & PSH)
        payload = b""
    else:
        # a pure ACK ahead of RCV.NXT (acceptable, queued nothing): its window is not
        # in sequence with what was received, so it must not become SND.WND / SND.WL1
        seq = seq_add(rcv_nxt, 1 + rng.randrange(max(1, rcv_wnd - 1)))
        ack = d.snd_una
        flags = ACK
        payload = b""
    tsval = None
    if c.const.timestamps:
        tsval = rng.choice([rng.getrandbits(32), seq_add(d.ts_recent, rng.randrange(1 << 31))])
    window = rng.choice([0, 1, 100, rng.getrandbits(16)])
    return Segment(B[1], A[1], seq=seq, ack=ack, flags=flags, window=window, payload=payload,
                   urgent=rng.getrandbits(16), sack_blocks=sack,
                   tsval=tsval, tsecr=rng.getrandbits(32) if tsval is not None else None)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_storm_of_bad_segments_does_not_stall_a_transfer(seed):
    link = Link(seed)
    rng = random.Random(seed * 7919)
    data_a = rng.randbytes(2_000_000)           # a -> b, the bulk
    data_b = rng.randbytes(200_000)             # b -> a
    got_a, got_b = bytearray(), bytearray()
    sent_a = sent_b = 0
    storm = dropped_bad_checksum = 0
    link.a.connect(0.0)
    reading = True
    for _ in range(200_000):
        a, b, now = link.a, link.b, link.now
        if a.established and sent_a < len(data_a) and a.writable:
            sent_a += a.send(data_a[sent_a:sent_a + 16_384], now)
        if b.established and sent_b < len(data_b) and b.writable:
            sent_b += b.send(data_b[sent_b:sent_b + 4096], now)
        if rng.random() < 0.02:
            reading = not reading               # b's application pauses: windows shut
        if reading:
            got_b += b.recv(rng.choice([100, 5000, 1 << 20]), now)
        got_a += a.recv(1 << 20, now)
        if len(got_a) == len(data_b) and len(got_b) == len(data_a):
            break
        if a.state in (S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1) and storm < 200_000:
            for _ in range(rng.randrange(0, 24)):
                seg = bad_segment(rng, a)
                storm += 1
                if rng.random() < 0.3:          # corrupted on the wire
                    raw = bytearray(seg.encode(B[0], A[0]))
                    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
                    try:
                        seg = decode(bytes(raw), B[0], A[0])
                    except SegmentError:
                        dropped_bad_checksum += 1
                        continue
                a.on_segment(seg, now, B[0])
        link.transmit()
        t = link.next_time()
        link.now = max(now, min(t, now + 0.001) if t is not None else now + 0.001)
        assert link.now < 60.0, ("stalled", len(got_b), len(got_a), a.state, a.d.snd_wnd, a.error)
        link.deliver_due()
        link.a.poll(link.now)
        link.b.poll(link.now)
    assert bytes(got_b) == data_a and bytes(got_a) == data_b
    assert link.now < 10.0, link.now
    assert storm > 5000 and dropped_bad_checksum > 1000
    assert link.a.state is S.ESTABLISHED and link.a.error is None
    assert link.a.dropped_unacceptable > 500


def test_challenge_acks_are_rate_limited():
    """RFC 5961 §7: a storm of in-window RSTs and SYNs gets a challenge ACK at most
    once per oow_ack_interval, not one each."""
    c = established()
    out = []
    for i in range(100):
        out += feed(c, peer(seq=R1 + 1 + i, flags=RST if i % 2 else 0x02), now=i * 0.001)
    assert out == [ours()] and c.state is S.ESTABLISHED
    assert feed(c, peer(seq=R1 + 5, flags=RST), now=0.6) == [ours()]
