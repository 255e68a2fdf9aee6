"""Loss recovery with SACK, segment by segment: RFC 6675's DupAck and IsLost
(a dup ACK is one that SACKs new data, whatever its window; DupThresh
segments SACKed above SND.UNA is a loss), RFC 3042 limited transmit, RFC
6582 §4.1 (a new fast recovery right after a full ACK, not after an RTO),
and header prediction leaving everything else to the full walk."""
from __future__ import annotations

from chimney.tcp.segment import ACK
from chimney.tcp.state import TcpState as S
from test_tcp_helpers import LOCAL_ISS, REMOTE_ISS, config, established, feed, ours, peer

L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1
SMSS = 1000


def sack_conn(**kw):
    return established(const={"sack": True}, **kw)


def test_sacked_segments_trigger_fast_retransmit_before_three_dup_acks():
    c = sack_conn(cwnd=10 * SMSS)
    c.send(b"z" * 6000, 0.0)
    assert len(c.take_segments()) == 6
    # segment 1 lost; an ACK loss or coalescing: the two dup ACKs that arrive SACK 3 segments
    assert feed(c, peer(ack=L1, sack_blocks=[(L1 + 1000, L1 + 2000)])) == []
    out = feed(c, peer(ack=L1, sack_blocks=[(L1 + 1000, L1 + 4000)]))
    assert c.d.dup_ack_count == 2 and c.d.in_recovery
    assert out == [ours(payload=b"z" * 1000)]
    assert c.d.recover == L1 + 6000


def test_two_segments_sacked_are_not_yet_a_loss():
    c = sack_conn(cwnd=10 * SMSS)
    c.send(b"z" * 6000, 0.0)
    c.take_segments()
    feed(c, peer(ack=L1, sack_blocks=[(L1 + 1000, L1 + 2000)]))
    feed(c, peer(ack=L1, sack_blocks=[(L1 + 1000, L1 + 3000)]))
    assert c.d.dup_ack_count == 2 and not c.d.in_recovery


def test_dup_ack_with_new_sack_counts_despite_a_window_change():
    c = sack_conn(cwnd=10 * SMSS)
    c.send(b"z" * 6000, 0.0)
    c.take_segments()
    feed(c, peer(ack=L1, window=9000, sack_blocks=[(L1 + 1000, L1 + 2000)]))
    assert c.d.dup_ack_count == 1
    # the same SACK again with another window change: nothing new, not a dup ACK
    feed(c, peer(ack=L1, window=8000, sack_blocks=[(L1 + 1000, L1 + 2000)]))
    assert c.d.dup_ack_count == 1
    # no SACK, window changed: RFC 5681's definition, not a dup ACK either
    feed(c, peer(ack=L1, window=7000))
    assert c.d.dup_ack_count == 1


def test_limited_transmit_sends_new_data_on_the_first_two_dup_acks():
    c = established(cwnd=3 * SMSS)
    c.send(b"a" * 3000 + b"b" * 3000, 0.0)
    assert [len(s.payload) for s in c.take_segments()] == [1000] * 3      # cwnd-limited
    out = feed(c, peer(ack=L1))
    assert out == [ours(seq=L1 + 3000, payload=b"b" * 1000)]             # RFC 3042
    out = feed(c, peer(ack=L1))
    assert out == [ours(seq=L1 + 4000, payload=b"b" * 1000)]
    assert c.d.cwnd == 3 * SMSS                                          # cwnd unchanged
    out = feed(c, peer(ack=L1))                                          # third: fast retransmit
    assert out[0] == ours(payload=b"a" * 1000) and c.d.in_recovery


def test_new_fast_recovery_right_after_a_full_ack():
    c = established(cwnd=10 * SMSS)
    c.send(b"z" * 4000, 0.0)
    c.take_segments()
    for _ in range(3):
        feed(c, peer(ack=L1))
    assert c.d.in_recovery and c.d.recover == L1 + 4000
    feed(c, peer(ack=L1 + 4000))                  # full ACK: recovery over, SND.UNA == recover
    assert not c.d.in_recovery and c.d.snd_una == c.d.recover
    c.send(b"y" * 4000, 0.0)
    c.take_segments()
    out = []
    for _ in range(3):
        out += feed(c, peer(ack=L1 + 4000))
    assert c.d.in_recovery and out[-1] == ours(seq=L1 + 4000, payload=b"y" * 1000)


def test_no_fast_recovery_at_recover_after_an_rto():
    c = established(cwnd=10 * SMSS)
    c.send(b"z" * 3000, 0.0)
    c.take_segments()
    c.poll(c.next_deadline())                     # RTO: recover = SND.MAX, go back N
    assert c.d.recover == L1 + 3000
    feed(c, peer(ack=L1 + 3000), now=1.5)         # everything acked: SND.UNA == recover
    c.send(b"y" * 3000, 1.5)
    c.take_segments()
    for _ in range(3):
        feed(c, peer(ack=L1 + 3000), now=1.6)
    assert not c.d.in_recovery                    # RFC 6582's careful variant


def test_header_prediction_leaves_window_updates_and_old_timestamps_to_the_walk():
    c = established(const={"timestamps": True}, ts_recent=500)
    # in-order data with a window change: taken, and the window updated
    feed(c, peer(payload=b"abc", window=7000, tsval=600, tsecr=0))
    assert c.recv(10, 0.0) == b"abc" and c.d.snd_wnd == 7000 and c.d.ts_recent == 600
    # in-order data with an older timestamp: PAWS drops it (and counts it)
    out = feed(c, peer(seq=R1 + 3, payload=b"old", window=7000, tsval=100, tsecr=0))
    assert c.recv(10, 0.0) == b"" and c.dropped_paws == 1
    assert out and out[0].flags == ACK and out[0].ack == R1 + 3
    assert c.state is S.ESTABLISHED


def test_limited_transmit_respects_the_peer_window():
    c = established(cwnd=3 * SMSS, snd_wnd=3000, max_snd_wnd=3000)
    c.send(b"a" * 6000, 0.0)
    assert len(c.take_segments()) == 3
    assert feed(c, peer(ack=L1, window=3000)) == []     # no room in the peer's window
    assert config().dupack_threshold == 3
