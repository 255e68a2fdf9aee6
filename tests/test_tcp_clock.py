"""The engine's clock on application calls and its timestamp clock: every call that
can emit a segment or arm a timer takes the time (`now`), TS.Recent follows
Last.ACK.sent (RFC 7323 §4.3), and TSvals carry a per-connection random offset
(RFC 7323 §5.4) that travels with the connection's state."""
from __future__ import annotations

import pytest

from chimney.staterec import codec
from chimney.tcp.engine import Config, Connection
from chimney.tcp.segment import ACK, FIN, PSH
from test_tcp_helpers import (BUF, LOCAL, LOCAL_ISS, REMOTE, REMOTE_ISS, config,
                              established, feed, ours, peer)

L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1
TS = dict(timestamps=True)


def idle_after_one_exchange():
    """A timestamped connection that sent 100 bytes at 0.0, had them acknowledged at
    0.05 (an RTT sample), and has been idle since."""
    c = established(const=TS, ts_recent=7, ts_time=0)
    c.send(b"a" * 100, 0.0)
    c.take_segments()
    feed(c, peer(ack=L1 + 100, tsval=8, tsecr=0), now=0.05)
    assert c.next_deadline() is None
    return c


# ------------------------------------------------------------ application calls ----
def test_write_after_idle_is_timed_and_stamped_at_the_write():
    """RFC 6298 §5.1 / RFC 7323 §3: the RTO runs from the write and the TSval is the
    write's time; the first poll retransmits nothing and cwnd is unchanged."""
    c = idle_after_one_exchange()
    cwnd = c.d.cwnd
    c.send(b"b" * 100, 100.0)
    assert c.take_segments() == [ours(seq=L1 + 100, flags=ACK | PSH, payload=b"b" * 100,
                                      tsval=100_000, tsecr=8)]
    assert c.next_deadline() == pytest.approx(101.0)            # now + RTO (1 s minimum)
    c.poll(100.0)
    c.poll(100.5)
    assert c.take_segments() == []                              # no spurious retransmission
    assert c.d.cwnd == cwnd and c.d.retransmit_count == 0


def test_read_after_idle_sends_the_window_update_stamped_now():
    c = established(const=TS, ts_recent=7, ts_time=0)
    feed(c, peer(payload=b"r" * BUF, tsval=8, tsecr=0), now=0.0)
    assert c.take_segments() == []                              # window full, already ACKed
    assert c.recv(BUF, 50.0) == b"r" * BUF
    assert c.take_segments() == [ours(ack=R1 + BUF, window=BUF, tsval=50_000, tsecr=8)]


def test_shutdown_after_idle_times_the_fin_from_now():
    c = idle_after_one_exchange()
    c.shutdown_write(200.0)
    assert c.take_segments() == [ours(seq=L1 + 100, flags=ACK | FIN, tsval=200_000, tsecr=8)]
    assert c.next_deadline() == pytest.approx(201.0)
    c.poll(200.5)
    assert c.take_segments() == []


def test_abort_takes_the_time():
    c = idle_after_one_exchange()
    c.abort(300.0)
    assert [s.flags for s in c.take_segments()] == [0x04] and c.closed


# -------------------------------------------------------- TS.Recent (RFC 7323 §4.3) ----
def test_delayed_ack_echoes_the_timestamp_of_the_first_unacknowledged_segment():
    """TS.Recent is taken only from a segment with SEG.SEQ =< Last.ACK.sent: with an
    ACK delayed over two segments, the ACK echoes the first one's TSval."""
    c = established(const=TS, ts_recent=7, ts_time=0)
    assert feed(c, peer(payload=b"x" * 10, tsval=100, tsecr=0), now=0.0) == []
    assert feed(c, peer(seq=R1 + 10, payload=b"y" * 10, tsval=200, tsecr=0), now=0.01) == []
    c.poll(0.2)                                                 # the delayed ACK
    assert c.take_segments() == [ours(ack=R1 + 20, window=BUF - 20, tsval=200, tsecr=100)]
    # Last.ACK.sent is now R1 + 20: the next in-order segment updates TS.Recent
    feed(c, peer(seq=R1 + 20, payload=b"z" * 10, tsval=300, tsecr=0), now=0.3)
    c.poll(0.5)
    assert c.take_segments()[-1].tsecr == 300


def test_delayed_ack_timestamp_rule_holds_on_the_fast_path():
    """Header prediction must apply the same rule (the two segments are in order,
    acknowledge nothing new and change no window: the predicted case)."""
    c = established(const=TS, ts_recent=7, ts_time=0)
    assert c.on_fast(R1, L1, ACK, 10_000, 100, b"x" * 10, 0.0)
    assert c.on_fast(R1 + 10, L1, ACK, 10_000, 200, b"y" * 10, 0.01)
    c.poll(0.2)
    assert c.take_segments() == [ours(ack=R1 + 20, window=BUF - 20, tsval=200, tsecr=100)]


# -------------------------------------------------- timestamp offset (RFC 7323 §5.4) ----
def syn_tsval(cfg: Config, now: float) -> int:
    c = Connection.client(LOCAL, REMOTE, cfg)
    c.connect(now)
    (syn,) = c.take_segments()
    return syn.tsval


def test_timestamp_clock_has_a_random_offset_per_connection():
    """TSvals do not reveal the clock (uptime): each connection starts its timestamp
    clock at a random value."""
    tsvals = {syn_tsval(Config(isn=lambda: LOCAL_ISS), 5.0) for _ in range(4)}
    assert 5000 not in tsvals and len(tsvals) == 4


def test_timestamp_offset_comes_from_the_config_generator():
    assert syn_tsval(config(offer_timestamps=True, ts_offset=lambda: 1 << 31), 2.0) == \
        (1 << 31) + 2000


def test_timestamp_offset_travels_with_the_state_through_the_codec():
    """Handover: the rebuilt connection (another clock base, its state through the
    hardware interface's encoding) continues the same TSval sequence."""
    a = Connection.client(LOCAL, REMOTE, config(offer_timestamps=True,
                                                ts_offset=lambda: 0xFFFF_F000))
    a.connect(1.0)
    (syn,) = a.take_segments()
    feed(a, peer(seq=REMOTE_ISS, flags=ACK | 0x02, tsval=5, tsecr=syn.tsval), now=1.2)
    a.take_segments()
    const, cached, d = a.export(3.0)
    raw, data = codec.encode_tcp(codec.Tcp(const, cached, d))
    t = codec.decode_tcp(raw, data, codec.Path(LOCAL[0], REMOTE[0], 1500))
    b = Connection.from_state(t.const, t.cached, t.delegated, 500.0, config())
    b.send(b"q", 500.25)
    (seg,) = b.take_segments()
    assert seg.tsval == (0xFFFF_F000 + 3250) % (1 << 32)        # 1 s + 2 s + 0.25 s later
    assert seg.tsecr == 5
