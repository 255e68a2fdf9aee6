"""Hostile segment sequences and hostile imported state: the engine never raises,
stays within its bounds, and `validate_state` names what an imported state gets
wrong (the offload target calls it before rebuilding a connection)."""
from __future__ import annotations

import dataclasses

import pytest

from chimney.tcp import Connection, TcpCached, TcpConst, TcpDelegated, TcpState as S
from chimney.tcp.engine import validate_state
from chimney.tcp.segment import ACK, FIN, RST
from test_tcp_helpers import (LOCAL, LOCAL_ISS, MSS, REMOTE, REMOTE_ISS, config,
                              established, feed, ours, peer)

L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1
U32 = (1 << 32) - 1


# ------------------------------------------------------------ hostile sequences ----
def test_retransmission_storm_backs_off_without_overflow():
    """Thousands of RTOs (the offload target keeps the connection when it gives up
    retransmitting, and a peer can keep it alive): the backoff stays at RTO max."""
    c = established(cfg=config(max_retransmits=5000, abort_on_timeout=False, rto_max=0.05,
                               rto_min=0.001),
                    cached=TcpCached(nagle=False, max_rt=0))
    c.send(b"r" * 100, 0.0)
    now = 0.0
    for _ in range(3000):
        now = c.next_deadline()
        c.poll(now)
        assert c.take_segments()[0].payload == b"r" * 100
    assert c.d.retransmit_count == 3000 and c._rto() == 0.05
    feed(c, peer(ack=L1 + 100), now=now)
    assert c.d.retransmit_count == 0 and c.next_deadline() is None


def test_window_probe_storm_backs_off_without_overflow():
    """A peer that keeps its window shut and answers every probe: probes forever,
    at most one per RTO max, never an exception."""
    c = established(snd_wnd=0, cfg=config(rto_max=0.05, rto_min=0.001))
    c.send(b"p" * 500, 0.0)
    now = 0.0
    for _ in range(3000):
        now = c.next_deadline()
        c.poll(now)
        assert c.take_segments() == [ours(payload=b"p")]
        assert feed(c, peer(ack=L1, window=0), now=now) == []
    assert c.d.window_probe_count == 3000 and c.next_deadline() - now <= 0.05 + 1e-9
    out = feed(c, peer(ack=L1, window=1000), now=now)
    assert [len(s.payload) for s in out] == [500]


def test_keepalive_storm_is_one_probe_per_tick():
    """Keep-alive times of zero (an Update can set them): a probe at most once per
    tick of the clock, never a loop at one instant."""
    cached = TcpCached(nagle=False, keepalive=True, ka_timeout=0, ka_interval=0,
                       ka_probe_count=U32)
    c = established(cached=cached, ka_timeout_delta=0)
    now = 0.0
    for _ in range(1000):
        c.poll(now)
        assert c.take_segments() == [ours(seq=L1 - 1)]
        nxt = c.next_deadline()
        assert nxt >= now + 0.001 - 1e-9
        now = nxt
    assert c.state is S.ESTABLISHED and c.d.ka_probe_count == 1000


def test_absurd_peer_window_is_bounded():
    """Window scale 14 and a window of 65535: about 1 GiB, below the 2^30 maximum
    (RFC 7323 §2.3), so sequence comparisons stay sound."""
    c = established(const=dict(window_scaling=True, snd_wscale=14))
    feed(c, peer(window=0xFFFF))
    assert c.d.snd_wnd == 0xFFFF << 14 and c.d.max_snd_wnd == 0xFFFF << 14
    c.send(b"w" * 5000, 0.0)
    assert sum(len(s.payload) for s in c.take_segments()) == 5000
    feed(c, peer(ack=L1 + 5000, window=0xFFFF))
    assert c.d.snd_una == L1 + 5000
    # an ACK one window below SND.UNA is still inside RFC 5961's range; beyond, not
    assert feed(c, peer(ack=L1 + 5000 - (0xFFFF << 14) - 1, window=0xFFFF)) == [ours(seq=L1 + 5000)]


def test_hostile_segment_values_never_raise():
    """Every field at its extremes, in every synchronized state."""
    extremes = [0, 1, 0x7FFF_FFFF, 0x8000_0000, U32]
    for st in (S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT, S.CLOSING,
               S.LAST_ACK, S.TIME_WAIT):
        for seq in extremes + [R1, R1 - 1]:
            for ack in extremes + [L1, L1 + 1]:
                c = established(st, const=dict(timestamps=True, sack=True,
                                               window_scaling=True, snd_wscale=14),
                                fin_queued=st not in (S.ESTABLISHED, S.CLOSE_WAIT),
                                ts_recent=5, ts_time=0)
                for flags in (ACK, 0xFF, 0x3F, 0x00):
                    seg = peer(seq=seq, ack=ack, flags=flags, window=0xFFFF, urgent=0xFFFF,
                               payload=b"x" * 3, tsval=U32, tsecr=U32,
                               sack_blocks=[(0, U32), (U32, 0), (L1, L1 + 10)])
                    c.on_segment(seg, 1.0)
                    c.poll(2.0)
                    c.take_segments()


# ----------------------------------------------------------- hostile imported state ----
def good_state():
    c = established()
    c.send(b"d" * 3000, 0.0)
    c.take_segments()
    return c.export(0.5)


def test_validate_accepts_what_the_engine_exports():
    assert validate_state(*good_state()) is None
    c = established(const=dict(timestamps=True), ts_recent=1, ts_time=7)
    c.close(0.0)
    feed(c, peer(ack=L1 + 1, flags=ACK | 0x01), now=1.0)
    assert c.state is S.TIME_WAIT and validate_state(*c.export(2.0)) is None


@pytest.mark.parametrize("field, value, words", [
    ("snd_nxt", L1 - 100, "SND.NXT"),
    ("snd_max", L1 + 1000, "SND.MAX"),
    ("snd_max", L1 + 5000, "send buffer"),
    ("snd_wnd", 1 << 31, "window"),
    ("rcv_wnd", U32, "window"),
    ("cwnd", 0, "cwnd"),
    ("snd_wl1", R1 + 10, "SND.WL1"),
    ("rcv_nxt", 1 << 32, "32-bit"),
    ("retransmit_delta", -5, "timer"),
    ("state", S.SYN_SENT, "state"),
    ("fin_queued", False, "FIN"),
])
def test_validate_names_what_is_wrong(field, value, words):
    const, cached, d = good_state()
    if field == "fin_queued":
        d = dataclasses.replace(d, state=S.FIN_WAIT_1, fin_queued=False)
    else:
        d = dataclasses.replace(d, **{field: value})
    reason = validate_state(const, cached, d)
    assert reason is not None and words in reason, reason


@pytest.mark.parametrize("change, words", [
    (dict(snd_wscale=15), "window scale"),
    (dict(rcv_wscale=-1), "window scale"),
    (dict(remote_mss=0), "MSS"),
])
def test_validate_checks_the_const_state(change, words):
    const, cached, d = good_state()
    reason = validate_state(dataclasses.replace(const, **change), cached, d)
    assert reason is not None and words in reason, reason


def test_validate_checks_keepalive_times():
    const, cached, d = good_state()
    reason = validate_state(const, dataclasses.replace(cached, keepalive=True, ka_interval=0), d)
    assert reason is not None and "keep-alive" in reason


def test_hostile_imported_state_runs_without_raising():
    """Rebuilt anyway (validate_state not consulted): the engine repairs what it
    cannot run with and carries on."""
    const = TcpConst(local_ip=LOCAL[0], local_port=LOCAL[1], remote_ip=REMOTE[0],
                     remote_port=REMOTE[1], remote_mss=MSS, window_scaling=True,
                     snd_wscale=40, rcv_wscale=-3)
    d = TcpDelegated(state=S.ESTABLISHED, rcv_nxt=R1, rcv_wnd=U32, snd_una=L1,
                     snd_nxt=L1 - 100, snd_max=L1 - 50, snd_wnd=U32, max_snd_wnd=0,
                     snd_wl1=R1 + 1000, cwnd=0, ssthresh=0, srtt=U32, rttvar=U32,
                     retransmit_count=U32, window_probe_count=U32, dup_ack_count=U32,
                     ka_probe_count=U32, total_rt=U32, retransmit_delta=0,
                     send_buffer=b"s" * 3000)
    c = Connection.from_state(const, TcpCached(nagle=False, keepalive=True, ka_interval=0,
                                               ka_timeout=0), d, 0.0,
                              config(abort_on_timeout=False))
    now = 0.0
    sent = bytearray()
    for i in range(200):
        now += 0.01
        c.poll(now)
        for seg in c.take_segments():
            if seg.payload and seg.seq == (L1 + len(sent)) % (1 << 32):
                sent += seg.payload
        c.on_segment(peer(ack=L1 + len(sent), window=i % 3), now)
        c.take_segments()
    assert (c.d.snd_una - L1) % (1 << 32) == len(sent) <= 3000
    assert sent == b"s" * len(sent) and len(sent) > 0
    assert validate_state(const, TcpCached(), d) is not None


@pytest.mark.parametrize("seed", range(6))
def test_hostile_sequences_keep_the_state_valid(seed):
    """Random hostile segments (near the edges and at the extremes) between
    application calls and timer runs, with the offload target's configuration:
    nothing raises, and every state the engine exports passes validate_state."""
    import random
    rng = random.Random(seed)
    ts = seed % 2 == 0
    c = established(const=dict(timestamps=ts, sack=True, window_scaling=True,
                               snd_wscale=rng.choice([0, 7, 14])),
                    cfg=config(abort_on_timeout=False, max_burst=8, rto_min=0.01,
                               rto_max=0.5, max_retransmits=50),
                    cached=TcpCached(nagle=rng.random() < 0.5, keepalive=True,
                                     ka_timeout=50, ka_interval=10, ka_probe_count=1000),
                    ka_timeout_delta=50, ts_recent=1, ts_time=0)
    now = 0.0

    def near(base: int) -> int:
        return (base + rng.choice([0, 1, -1, rng.randrange(-70_000, 70_000),
                                   rng.getrandbits(32)])) % (1 << 32)
    for step in range(1500):
        now += rng.choice([0.0, 0.001, 0.01, 0.3])
        d = c.d
        r = rng.random()
        if r < 0.15 and c.writable:
            c.send(rng.randbytes(rng.choice([1, 500, 5000, 40_000])), now)
        elif r < 0.2:
            c.recv(rng.choice([1, 1000, 1 << 20]), now)
        elif r < 0.3:
            c.poll(now)
        elif r < 0.31 and c.state in (S.ESTABLISHED, S.CLOSE_WAIT):
            c.shutdown_write(now)
        else:
            flags = rng.choice([ACK, ACK, ACK | 0x08, rng.getrandbits(8) & ~(RST | FIN)])
            if rng.random() < 0.002:
                flags |= rng.choice([RST, FIN])     # now and then one that may end it
            seg = peer(seq=near(d.rcv_nxt), ack=near(rng.choice([d.snd_una, d.snd_max])),
                       flags=flags, window=rng.choice([0, 1, 0xFFFF, rng.getrandbits(16)]),
                       payload=rng.randbytes(rng.choice([0, 0, 1, 1000])),
                       tsval=rng.choice([d.ts_recent, near(d.ts_recent)]) if ts else None,
                       tsecr=0 if ts else None,
                       sack_blocks=[(near(d.snd_una), near(d.snd_max))] if rng.random() < 0.2 else [])
            c.on_segment(seg, now)
        c.take_segments()
        if c.closed:
            break
        steps = step
        if step % 25 == 0:
            reason = validate_state(*c.export(now))
            assert reason is None, (step, reason)
    assert steps > 300
