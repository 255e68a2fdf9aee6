"""The TCP engine's timers and congestion control: RTO (RFC 6298), slow start and
congestion avoidance (RFC 5681), fast retransmit and NewReno recovery (RFC 6582),
zero-window persist (RFC 9293 §3.8.6.1), keep-alive (RFC 1122 §4.2.3.6), PAWS (RFC 7323)."""
from __future__ import annotations

import pytest

from chimney.tcp.segment import ACK, PSH, RST
from chimney.tcp.state import TcpCached, TcpState as S
from test_tcp_helpers import (BUF, LOCAL_ISS, REMOTE_ISS, config, established, feed, ours,
                              peer)

L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1
SMSS = 1000


# --------------------------------------------------------------------- RFC 6298 ----
def test_first_rtt_sample_and_rto():
    c = established()
    c.send(b"a" * 100, 0.0)
    c.take_segments()
    assert c.next_deadline() == 1.0                     # §2.1 initial RTO
    feed(c, peer(ack=L1 + 100), now=0.5)
    assert (c.d.srtt, c.d.rttvar) == (500 * 8, 250 * 4)  # §2.2: SRTT=R, RTTVAR=R/2
    assert c._rto() == pytest.approx(1.5)               # SRTT + 4*RTTVAR


def test_subsequent_rtt_samples():
    c = established(srtt=500 * 8, rttvar=250 * 4, cfg=config(rto_min=0.001))
    c.send(b"a" * 100, 0.0)
    c.take_segments()
    feed(c, peer(ack=L1 + 100), now=0.1)
    # §2.3: RTTVAR = 3/4*250 + 1/4*|500-100| = 287.5; SRTT = 7/8*500 + 1/8*100 = 450
    assert c.d.srtt == 450 * 8
    assert c.d.rttvar == pytest.approx(287.5 * 4, abs=1)
    assert c._rto() == pytest.approx(0.450 + 4 * 0.2875, abs=0.002)


def test_rto_minimum_and_maximum():
    c = established(srtt=10 * 8, rttvar=1 * 4)
    assert c._rto() == 1.0                              # §2.4: at least 1 s
    c = established(srtt=100_000 * 8, rttvar=0)
    assert c._rto() == 60.0                             # §2.5: at most 60 s


def test_retransmission_backoff_and_karn():
    c = established(cfg=config(max_retransmits=20), cached=TcpCached(nagle=False, max_rt=0))
    c.send(b"r" * 100, 0.0)
    assert c.take_segments() == [ours(flags=ACK | PSH, payload=b"r" * 100)]
    fired = []
    for _ in range(8):
        t = c.next_deadline()
        fired.append(t)
        c.poll(t)
        assert c.take_segments() == [ours(flags=ACK | PSH, payload=b"r" * 100)]
    # §5.5: doubled each time, capped at 60 s (§2.5)
    assert [b - a for a, b in zip([0.0] + fired, fired)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert c.d.retransmit_count == 8
    # §3 Karn: the ACK of a retransmitted segment gives no RTT sample
    feed(c, peer(ack=L1 + 100), now=fired[-1] + 0.5)
    assert (c.d.srtt, c.d.rttvar, c.d.retransmit_count) == (0, 0, 0)
    assert c.next_deadline() is None                    # §5.2: all acked, timer off


def test_rto_go_back_n_and_loss_window():
    c = established()
    c.send(b"x" * 3000, 0.0)
    assert len(c.take_segments()) == 3
    c.poll(1.0)
    # RFC 5681 §3.1: ssthresh = max(FlightSize/2, 2*SMSS), cwnd = 1 SMSS
    assert (c.d.ssthresh, c.d.cwnd) == (2 * SMSS, SMSS)
    assert c.take_segments() == [ours(payload=b"x" * 1000)]
    assert c.d.snd_nxt == L1 + 1000 and c.d.snd_max == L1 + 3000
    # slow start from one segment: the ACK lets two more go
    assert [s.seq for s in feed(c, peer(ack=L1 + 1000), now=1.1)] == [L1 + 1000, L1 + 2000]


def test_max_rt_aborts():
    c = established(cached=TcpCached(nagle=False, max_rt=5000))
    c.send(b"x", 0.0)
    c.take_segments()
    c.poll(1.0)
    c.poll(3.0)
    assert c.state is S.ESTABLISHED
    c.poll(7.0)                                          # 1 + 2 + 4 s >= MaxRT 5 s
    assert c.state is S.CLOSED and c.error == "timeout"
    assert c.take_segments()[-1] == ours(seq=L1 + 1, ack=0, flags=RST, window=0)


# --------------------------------------------------------------------- RFC 5681 ----
def test_slow_start_and_congestion_avoidance():
    c = established(cwnd=2 * SMSS, ssthresh=4 * SMSS)
    c.send(b"y" * 20_000, 0.0)
    assert len(c.take_segments()) == 2
    feed(c, peer(ack=L1 + 1000))
    assert c.d.cwnd == 3 * SMSS                         # slow start: +SMSS per ACK
    feed(c, peer(ack=L1 + 2000))
    assert c.d.cwnd == 4 * SMSS
    feed(c, peer(ack=L1 + 3000))
    assert c.d.cwnd == 4 * SMSS + SMSS * SMSS // (4 * SMSS)  # avoidance: eq. 3


def test_dup_acks_fast_retransmit_and_newreno():
    c = established(cwnd=10 * SMSS)
    c.send(b"z" * 10_000, 0.0)
    assert len(c.take_segments()) == 10
    # segment 1 lost; the peer dup-acks the other nine (only three needed)
    assert feed(c, peer(ack=L1)) == []
    assert feed(c, peer(ack=L1)) == []
    assert c.d.dup_ack_count == 2
    out = feed(c, peer(ack=L1))
    assert out == [ours(payload=b"z" * 1000)]            # RFC 5681 §3.2 step 2
    assert c.d.in_recovery and c.d.recover == L1 + 10_000
    assert c.d.ssthresh == 5 * SMSS                     # FlightSize/2
    assert c.d.cwnd == 8 * SMSS                         # ssthresh + 3*SMSS
    feed(c, peer(ack=L1))
    assert c.d.cwnd == 9 * SMSS                         # RFC 6582 §3.2 step 4: inflate
    # partial ACK (segment 5 was also lost): resend it, deflate by the amount acked
    out = feed(c, peer(ack=L1 + 4000))
    assert out == [ours(seq=L1 + 4000, payload=b"z" * 1000)]
    assert c.d.in_recovery and c.d.cwnd == 9 * SMSS - 4000 + SMSS
    # full ACK: leave recovery, cwnd = min(ssthresh, FlightSize + SMSS)
    feed(c, peer(ack=L1 + 10_000))
    assert not c.d.in_recovery and c.d.cwnd == min(5 * SMSS, SMSS + SMSS)
    assert c.d.dup_ack_count == 0


def test_dup_ack_needs_outstanding_data_and_same_window():
    c = established()
    feed(c, peer(ack=L1))
    assert c.d.dup_ack_count == 0                       # nothing outstanding
    c.send(b"q" * 100, 0.0)
    c.take_segments()
    feed(c, peer(ack=L1, window=5000))                  # window update, not a dup
    feed(c, peer(ack=L1, window=5000, payload=b"d"))    # carries data, not a dup
    assert c.d.dup_ack_count == 0


def test_no_second_fast_retransmit_below_recover():
    """RFC 6582 §3.2 step 2: dup ACKs not above `recover` start no new recovery."""
    c = established(cwnd=10 * SMSS, recover=L1 + 5000)
    c.send(b"z" * 4000, 0.0)
    c.take_segments()
    for _ in range(3):
        assert feed(c, peer(ack=L1)) == []
    assert not c.d.in_recovery


# ------------------------------------------------------------------- persist ----
def test_zero_window_persist_probes():
    c = established(snd_wnd=0)
    c.send(b"p" * 50, 0.0)
    assert c.take_segments() == []
    assert c.next_deadline() == 1.0
    c.poll(1.0)
    assert c.take_segments() == [ours(payload=b"p")]     # one byte beyond the window
    assert c.d.window_probe_count == 1 and c.d.snd_nxt == L1
    assert c.next_deadline() == 3.0                      # backed off
    assert feed(c, peer(ack=L1, window=0), now=2.0) == []
    c.poll(3.0)
    assert c.take_segments() == [ours(payload=b"p")]
    assert c.next_deadline() == 7.0
    # the window opens: all the data goes, the probe count resets
    out = feed(c, peer(ack=L1, window=1000), now=4.0)
    assert out == [ours(flags=ACK | PSH, payload=b"p" * 50)]
    assert c.d.window_probe_count == 0


def test_probe_byte_accepted():
    c = established(snd_wnd=0)
    c.send(b"ab", 0.0)
    c.poll(1.0)
    c.take_segments()
    out = feed(c, peer(ack=L1 + 1, window=100), now=1.1)
    assert out == [ours(seq=L1 + 1, flags=ACK | PSH, payload=b"b")]


# ---------------------------------------------------------------- keep-alive ----
def test_keepalive_probes_and_timeout():
    cached = TcpCached(nagle=False, keepalive=True, ka_timeout=10_000, ka_interval=1000,
                       ka_probe_count=2)
    c = established(cached=cached, ka_timeout_delta=10_000)
    assert c.next_deadline() == 10.0
    c.poll(10.0)
    assert c.take_segments() == [ours(seq=L1 - 1)]        # SEG.SEQ = SND.NXT - 1
    # an answer restarts the idle timer
    feed(c, peer(), now=10.5)
    assert c.next_deadline() == 20.5 and c.d.ka_probe_count == 0
    c.poll(20.5)
    c.poll(21.5)
    assert len(c.take_segments()) == 2
    c.poll(22.5)
    assert c.state is S.CLOSED and c.error == "keep-alive timeout"


def test_probe_window_elicits_the_peers_current_window():
    """probe_window: SEG.SEQ = SND.UNA-1 with one garbage octet (RFC 1122 §4.2.3.6),
    only with nothing in flight; the peer's duplicate ACK updates SND.WND (§3.10.7.4
    window update: SND.WL1 = SEG.SEQ, SND.WL2 <= SEG.ACK) back up to MAX.SND.WND."""
    c = established()
    assert c.d.max_snd_wnd == 10_000
    c.send(b"d" * 100, 0.0)
    c.take_segments()
    assert c.probe_window(0.1) is False and c.take_segments() == []     # data in flight
    feed(c, peer(ack=L1 + 100, window=3000), now=0.2)       # all acked, the data unread
    assert (c.d.snd_wnd, c.d.max_snd_wnd) == (3000, 10_000)
    assert c.probe_window(0.3) is True
    assert c.take_segments() == [ours(seq=L1 + 99, payload=b"\0")]
    feed(c, peer(ack=L1 + 100, window=10_000), now=0.31)    # the peer's application read it
    assert (c.d.snd_wnd, c.d.snd_una, c.d.retransmit_count) == (10_000, L1 + 100, 0)
    assert c.take_segments() == []                          # nothing answers the answer


def test_window_probe_is_answered_at_once_every_time():
    """As a receiver the engine answers a probe's duplicate octet with an immediate ACK
    each time (a zero-length one only once per oow_ack_interval): back to back
    probes learn the window without waiting out that interval."""
    c = established()
    for t in (1.0, 1.01, 1.02):
        assert feed(c, peer(seq=REMOTE_ISS, payload=b"\0"), now=t) == [ours()]
    assert feed(c, peer(seq=REMOTE_ISS), now=1.03) == [ours()]
    assert feed(c, peer(seq=REMOTE_ISS), now=1.04) == []    # zero-length: rate-limited
    assert c.readable is False


# --------------------------------------------------------------------- PAWS ----
def test_paws_drops_old_timestamp():
    c = established(const=dict(timestamps=True), ts_recent=1000, ts_time=5)
    out = feed(c, peer(payload=b"old", tsval=999, tsecr=0))
    assert out == [ours(tsval=5, tsecr=1000)]            # RFC 7323 §5.3: ACK, drop
    assert c.recv(10, 0.0) == b""
    feed(c, peer(payload=b"new", tsval=1001, tsecr=0))
    assert c.recv(10, 0.0) == b"new" and c.d.ts_recent == 1001


def test_timestamps_on_every_segment_and_echo():
    c = established(const=dict(timestamps=True), ts_recent=77, ts_time=1000)
    c.send(b"t", 0.0)
    assert c.take_segments() == [ours(flags=ACK | PSH, payload=b"t", tsval=1000,
                                      tsecr=77)]
    c.poll(0.25)  # nothing due
    assert c.take_segments() == []
    assert c.smss == 1000 - 12                           # the option's 12 bytes


def test_receive_window_reopens_after_read():
    """RFC 9293 §3.8.6.2.2: announce the window once it opened by min(BUF/2, MSS)."""
    c = established()
    feed(c, peer(payload=b"w" * BUF))
    c.poll(1)
    assert c.take_segments() == [ours(ack=R1 + BUF, window=0)]
    c.recv(100, 1)
    assert c.take_segments() == []                       # opened by too little
    c.recv(2000, 1)
    assert c.take_segments() == [ours(ack=R1 + BUF, window=2100)]


def test_rto_is_three_seconds_after_a_lost_syn():
    """RFC 6298 §5.7: SYN timed out and no RTT sample: RTO 3 s once data flows."""
    from chimney.tcp import Connection
    from test_tcp_helpers import LOCAL, REMOTE
    from chimney.tcp.segment import SYN
    c = Connection.client(LOCAL, REMOTE, config())
    c.connect(0.0)
    c.poll(1.0)                                          # the SYN timed out once
    feed(c, peer(seq=REMOTE_ISS, ack=L1, flags=SYN | ACK, mss=1000), now=1.2)
    assert c.state is S.ESTABLISHED and c.d.srtt == 0   # Karn: no sample
    c.send(b"d", 1.2)
    c.take_segments()
    assert c.next_deadline() == pytest.approx(4.2)


def test_retransmission_after_rto_skips_sacked_data():
    """RFC 2018: after the go-back-N of an RTO, ranges the peer SACKs again are skipped
    (they still count against the congestion window: no RFC 6675 "pipe")."""
    c = established(const=dict(sack=True))
    c.send(b"s" * 5000, 0.0)
    assert len(c.take_segments()) == 5
    c.poll(1.0)
    assert [s.seq for s in c.take_segments()] == [L1]
    out = feed(c, peer(ack=L1 + 1000, sack_blocks=[(L1 + 2000, L1 + 4000)]), now=1.1)
    assert [(s.seq, len(s.payload)) for s in out] == [(L1 + 1000, 1000)]
    out = feed(c, peer(ack=L1 + 2000, sack_blocks=[(L1 + 2000, L1 + 4000)]), now=1.2)
    assert [(s.seq, len(s.payload)) for s in out] == [(L1 + 4000, 1000)]
    assert c.d.snd_nxt == L1 + 5000


def test_unacceptable_pure_acks_are_answered_at_most_twice_a_second():
    """Two peers finding each other's ACKs unacceptable must not trade ACKs forever."""
    c = established()
    assert feed(c, peer(seq=R1 + BUF + 5), now=1.0) == [ours()]
    assert feed(c, peer(seq=R1 + BUF + 5), now=1.2) == []
    assert feed(c, peer(seq=R1 + BUF + 5, payload=b"d"), now=1.3) == [ours()]  # data: yes
    assert feed(c, peer(seq=R1 + BUF + 5), now=1.6) == [ours()]


def test_zero_receive_window_still_takes_acks():
    """RFC 9293 §3.10.7.4: with RCV.WND = 0, valid ACKs are still accepted."""
    c = established()
    c.send(b"a" * 100, 0.0)
    c.take_segments()
    feed(c, peer(payload=b"f" * BUF))
    assert c.d.rcv_wnd == 0
    feed(c, peer(seq=R1 + BUF + 1, ack=L1 + 100), now=0.1)   # beyond our closed window
    assert c.d.snd_una == L1 + 100 and c.recv(BUF + 10, 0.1) == b"f" * BUF


def test_paws_lets_a_reordered_duplicate_ack_through():
    c = established(const=dict(timestamps=True), ts_recent=1000, ts_time=5)
    c.send(b"k" * 3000, 0.0)
    c.take_segments()
    assert feed(c, peer(tsval=999, tsecr=5)) == []            # a dup ACK, reordered
    assert c.d.dup_ack_count == 1 and c.d.ts_recent == 1000
