"""Conformance, a FIN in every state (RFC 9293 §3.10.7, "eighth, check the FIN
bit", and §3.6): a raw peer closes (first, second, at the same time as the
stack, again as a retransmission) and checks the state the stack moves to and
the ACK it sends.  Synchronized states on the software TCP and the offloaded
one alike; LISTEN, SYN-SENT and SYN-RECEIVED are the host stack's only."""
import pytest
from rawpeer import (
    OUR_IP,
    OUR_PORT,
    PEER_IP,
    PEER_ISS,
    PEER_PORT,
    SoftwarePeer,
    make_peer,
)

from chimney.tcp.segment import ACK, FIN, PSH, RST, SYN, Segment


@pytest.fixture(params=["software", "offload"])
def peer(request):
    p = make_peer(request.param)
    p.establish()
    yield p
    p.close()


def acks_fin(peer, out, fin_seq):
    """An ACK of the peer's FIN at fin_seq came out (RCV.NXT = FIN + 1)."""
    assert out and any(s.flags & ACK and s.ack == fin_seq + 1 and not s.payload for s in out), out


def fin_from_peer(peer, **kw):
    fin_seq = peer.seq
    out = peer.feed(flags=ACK | FIN, **kw) + peer.advance(0.3)
    return fin_seq, out


def our_fin(peer):
    out = peer.app_close()
    fins = [s for s in out if s.flags & FIN]
    assert len(fins) == 1 and fins[0].seq == peer.ack, out
    return fins[0]


def test_rfc9293_3_10_7_4_fin_in_established_enters_close_wait(peer):
    peer.feed(payload=b"last", flags=ACK | PSH)
    peer.seq += 4
    fin_seq, out = fin_from_peer(peer)
    acks_fin(peer, out, fin_seq)
    assert peer.state == "CLOSE_WAIT"
    assert peer.app_recv() == b"last" and peer.eof()


def test_rfc9293_3_10_7_4_fin_retransmitted_in_close_wait_acked_again(peer):
    fin_seq, _ = fin_from_peer(peer)
    out = peer.feed(seq=fin_seq, flags=ACK | FIN) + peer.advance(0.3)
    acks_fin(peer, out, fin_seq)
    assert peer.state == "CLOSE_WAIT"


def test_rfc9293_3_10_7_4_fin_in_last_ack_acked_and_our_fin_acked_closes(peer):
    fin_seq, _ = fin_from_peer(peer)
    peer.seq = fin_seq + 1
    fin = our_fin(peer)
    assert peer.state == "LAST_ACK"
    out = peer.feed(seq=fin_seq, flags=ACK | FIN) + peer.advance(0.3)     # our FIN not yet acked
    acks_fin(peer, out, fin_seq)
    assert peer.state == "LAST_ACK"
    peer.feed(ack=fin.seq + 1)
    assert peer.state == "CLOSED"


def test_rfc9293_3_10_7_4_fin_in_fin_wait_1_simultaneous_close_enters_closing(peer):
    """Our FIN not acknowledged: the peer's FIN (acknowledging only up to our
    FIN) moves FIN-WAIT-1 to CLOSING; the ACK of our FIN then to TIME-WAIT."""
    fin = our_fin(peer)
    assert peer.state == "FIN_WAIT_1"
    fin_seq, out = fin_from_peer(peer, ack=fin.seq)
    acks_fin(peer, out, fin_seq)
    assert peer.state == "CLOSING"
    # a retransmission of the FIN in CLOSING: acknowledged again, still CLOSING
    out = peer.feed(seq=fin_seq, flags=ACK | FIN, ack=fin.seq) + peer.advance(0.3)
    acks_fin(peer, out, fin_seq)
    assert peer.state == "CLOSING"
    peer.feed(seq=fin_seq + 1, ack=fin.seq + 1)
    assert peer.state == "TIME_WAIT"


def test_rfc9293_3_10_7_4_fin_acking_our_fin_in_fin_wait_1_enters_time_wait(peer):
    fin = our_fin(peer)
    fin_seq, out = fin_from_peer(peer, ack=fin.seq + 1)
    acks_fin(peer, out, fin_seq)
    assert peer.state == "TIME_WAIT"


def test_rfc9293_3_10_7_4_fin_in_fin_wait_2_enters_time_wait(peer):
    fin = our_fin(peer)
    peer.feed(ack=fin.seq + 1)
    assert peer.state == "FIN_WAIT_2"
    # data still flows to us in FIN-WAIT-2 (a half-closed connection)
    peer.feed(payload=b"more", flags=ACK | PSH, ack=fin.seq + 1)
    peer.seq += 4
    assert peer.app_recv() == b"more"
    fin_seq, out = fin_from_peer(peer, ack=fin.seq + 1)
    acks_fin(peer, out, fin_seq)
    assert peer.state == "TIME_WAIT"


# -- TIME-WAIT and the states before ESTABLISHED (the host stack) -------------------------

@pytest.fixture
def sw():
    p = SoftwarePeer()
    p.establish()
    return p


def test_rfc9293_3_10_7_4_fin_retransmitted_in_time_wait_acked_and_2msl_restarted(sw):
    fin = our_fin(sw)
    fin_seq, _ = fin_from_peer(sw, ack=fin.seq + 1)
    assert sw.state == "TIME_WAIT"
    sw.advance(40)                                  # part of 2 MSL (60 s)
    out = sw.feed(seq=fin_seq, flags=ACK | FIN, ack=fin.seq + 1) + sw.advance(0.3)
    acks_fin(sw, out, fin_seq)
    sw.advance(40)                                  # 80 s after entering: restarted, still waiting
    assert sw.state == "TIME_WAIT"
    sw.advance(25)
    assert sw.state == "CLOSED"


def test_rfc9293_3_10_7_4_fin_on_the_handshake_ack_enters_close_wait():
    """SYN-RECEIVED: the ACK completing the handshake carries a FIN."""
    p = SoftwarePeer()
    sa = next(s for s in p.syn() if s.syn)
    p.seq, p.ack = PEER_ISS + 1, sa.seq + 1
    out = p.feed(flags=ACK | FIN) + p.advance(0.3)
    p.flow = p.listener.take()
    assert p.flow is not None
    acks_fin(p, out, PEER_ISS + 1)
    assert p.state == "CLOSE_WAIT" and p.eof()


def test_rfc9293_3_10_7_3_fin_without_syn_in_syn_sent_dropped():
    """SYN-SENT: an acceptable ACK with FIN but no SYN: "drop the segment and return"."""
    p = SoftwarePeer()
    flow = p.stack.open(PEER_IP, PEER_PORT, local_port=OUR_PORT + 1)
    syn = next(s for s in p.out() if s.syn)
    seg = Segment(PEER_PORT, OUR_PORT + 1, seq=PEER_ISS, ack=syn.seq + 1, flags=ACK | FIN, window=65535)
    assert p.feed_raw(seg.encode(PEER_IP, OUR_IP)) == []
    assert flow.conn.state.name == "SYN_SENT"


@pytest.mark.xfail(strict=True, reason=(
    "a segment with FIN and neither ACK nor SYN to a listening port is answered with "
    "RST|ACK instead of being dropped"))
def test_rfc9293_3_10_7_2_fin_without_ack_to_a_listener_dropped():
    """LISTEN: a segment with neither RST, ACK nor SYN: "drop the segment and return"."""
    p = SoftwarePeer()
    seg = Segment(PEER_PORT, OUR_PORT, seq=PEER_ISS, flags=FIN, window=65535)
    assert p.feed_raw(seg.encode(PEER_IP, OUR_IP)) == []
    assert p.listener.take() is None


def test_rfc9293_3_10_7_2_fin_ack_to_a_listener_reset():
    """LISTEN: any acknowledgment is bad: <SEQ=SEG.ACK><CTL=RST>."""
    p = SoftwarePeer()
    seg = Segment(PEER_PORT, OUR_PORT, seq=PEER_ISS, ack=4321, flags=FIN | ACK, window=65535)
    out = p.feed_raw(seg.encode(PEER_IP, OUR_IP))
    assert [(s.flags, s.seq) for s in out] == [(RST, 4321)], out


def test_rfc9293_3_10_7_4_syn_fin_in_established_challenge_acked(sw):
    """A SYN (with FIN) on a synchronized connection: challenge ACK (RFC 5961
    §4.2); the FIN is not processed."""
    out = sw.feed(flags=SYN | FIN | ACK)
    assert [(s.flags, s.ack) for s in out] == [(ACK, sw.seq)], out
    assert sw.state == "ESTABLISHED"
