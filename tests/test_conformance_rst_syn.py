"""Conformance, resets and SYNs (RFC 9293 §3.10.7, RFC 5961 §3-5): a raw peer
on an established connection, the software TCP and the offloaded one (the
TOE) alike, plus the handshake states only the host stack has."""
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

from chimney.tcp.segment import ACK, PSH, RST, SYN, Segment



@pytest.fixture(params=["software", "offload"])
def peer(request):
    p = make_peer(request.param)
    p.establish()
    yield p
    if request.param == "offload":
        p.close()


def challenge_ack(peer, out):
    """Exactly one ACK, <SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK>, nothing else."""
    assert [(s.flags, s.seq, s.ack, s.payload) for s in out] == [(ACK, peer.ack, peer.seq, b"")], out


def still_works(peer):
    peer.feed(payload=b"still here", flags=ACK | PSH)
    assert peer.app_recv().endswith(b"still here")
    assert not peer.reset()


def test_rfc5961_3_2_rst_exact_sequence_resets(peer):
    out = peer.feed(flags=RST, ack=0)
    assert out == [] and peer.reset()


def test_rfc5961_3_2_rst_with_ack_exact_sequence_resets(peer):
    out = peer.feed(flags=RST | ACK)
    assert out == [] and peer.reset()


@pytest.mark.parametrize("off", [1, 1000, 60_000])
def test_rfc9293_3_10_7_4_rst_in_window_sends_challenge_ack(peer, off):
    """RFC 5961 §3.2: in the window but not RCV.NXT: a challenge ACK, no reset."""
    out = peer.feed(flags=RST, seq=peer.seq + off, ack=0)
    challenge_ack(peer, out)
    assert not peer.reset()
    still_works(peer)


@pytest.mark.parametrize("off", [-1, -5000, 70_000, 1 << 31])
def test_rfc5961_3_2_rst_outside_window_silently_dropped(peer, off):
    out = peer.feed(flags=RST, seq=peer.seq + off, ack=0)
    assert out == [] and not peer.reset()
    still_works(peer)


@pytest.mark.parametrize("off", [0, 100, 70_000, -10])
def test_rfc5961_4_2_syn_in_established_sends_challenge_ack(peer, off):
    """Whatever its sequence number, a SYN on a synchronized connection gets a
    challenge ACK and changes nothing (no reset, no data taken)."""
    out = peer.feed(flags=SYN, seq=peer.seq + off, ack=0, mss=1460)
    challenge_ack(peer, out)
    assert not peer.reset()
    still_works(peer)


def test_rfc5961_4_2_syn_ack_in_established_sends_challenge_ack(peer):
    out = peer.feed(flags=SYN | ACK, seq=peer.seq - 1, mss=1460)
    challenge_ack(peer, out)
    still_works(peer)


@pytest.mark.parametrize("ack_off", [10_000, -(1 << 20)], ids=["beyond-snd-nxt", "older-than-max-wnd"])
def test_rfc5961_5_2_unacceptable_ack_discarded_and_acked(peer, ack_off):
    """SND.UNA - MAX.SND.WND =< SEG.ACK =< SND.NXT, or the segment is discarded
    (its data too) and an ACK sent."""
    out = peer.feed(flags=ACK | PSH, ack=peer.ack + ack_off, payload=b"bogus")
    assert [(s.flags, s.seq, s.ack) for s in out] == [(ACK, peer.ack, peer.seq)], out
    assert peer.app_recv() == b""
    still_works(peer)


# -- the handshake's states (the host stack only) -----------------------------------------

@pytest.fixture
def sw():
    return SoftwarePeer()


def test_rfc9293_3_10_7_4_rst_in_syn_received_returns_to_listen(sw):
    sa = next(s for s in sw.syn() if s.syn)
    sw.seq, sw.ack = PEER_ISS + 1, sa.seq + 1
    assert sw.feed(flags=RST, ack=0) == []
    assert sw.listener.take() is None
    sw.establish()                         # the listener still takes a new handshake


def active_open(sw):
    flow = sw.stack.open(PEER_IP, PEER_PORT, local_port=OUR_PORT + 1)
    syn = [s for s in sw.out() if s.syn]
    assert len(syn) == 1 and not syn[0].flags & ACK
    return flow, syn[0]


def test_rfc9293_3_10_7_3_rst_ack_in_syn_sent_refuses(sw):
    flow, syn = active_open(sw)
    seg = Segment(PEER_PORT, OUR_PORT + 1, seq=0, ack=syn.seq + 1, flags=RST | ACK)
    sw.feed_raw(seg.encode(PEER_IP, OUR_IP))
    assert flow.conn.reset and flow.conn.error == "connection refused"


@pytest.mark.parametrize("bad", [0, 2, -1], ids=["ack-iss", "ack-beyond-snd-nxt", "ack-before-iss"])
def test_rfc9293_3_10_7_3_rst_with_unacceptable_ack_in_syn_sent_dropped(sw, bad):
    flow, syn = active_open(sw)
    seg = Segment(PEER_PORT, OUR_PORT + 1, seq=0, ack=(syn.seq + bad) & 0xFFFFFFFF, flags=RST | ACK)
    assert sw.feed_raw(seg.encode(PEER_IP, OUR_IP)) == []
    assert not flow.conn.reset and flow.conn.state.name == "SYN_SENT"


def test_rfc9293_3_10_7_3_bad_ack_in_syn_sent_answered_with_rst(sw):
    """SYN-SENT, an ACK outside ISS < SEG.ACK =< SND.NXT: <SEQ=SEG.ACK><CTL=RST>."""
    flow, syn = active_open(sw)
    bad = (syn.seq + 500) & 0xFFFFFFFF
    out = sw.feed_raw(Segment(PEER_PORT, OUR_PORT + 1, seq=PEER_ISS, ack=bad, flags=SYN | ACK,
                              window=65535, mss=1460).encode(PEER_IP, OUR_IP))
    assert [(s.flags, s.seq) for s in out] == [(RST, bad)], out
    assert flow.conn.state.name == "SYN_SENT"


@pytest.mark.parametrize("flags,payload", [(ACK, b""), (ACK | PSH, b"data"), (0, b"xy"), (SYN, b"")],
                         ids=["ack", "ack-data", "no-ack-data", "syn-no-listener"])
def test_rfc9293_3_10_7_1_segment_to_no_connection_gets_rst(sw, flags, payload):
    """CLOSED: with ACK, <SEQ=SEG.ACK><CTL=RST>; without, <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>."""
    port = OUR_PORT + 7
    seg = Segment(PEER_PORT, port, seq=777, ack=4242, flags=flags, window=100, payload=payload)
    out = sw.feed_raw(seg.encode(PEER_IP, OUR_IP))
    assert len(out) == 1 and out[0].dst_port == PEER_PORT and out[0].src_port == port, out
    r = out[0]
    if flags & ACK:
        assert (r.flags, r.seq) == (RST, 4242)
    else:
        assert (r.flags, r.seq, r.ack) == (RST | ACK, 0, 777 + seg.seg_len())


def test_rfc9293_3_10_7_1_rst_to_no_connection_not_answered(sw):
    seg = Segment(PEER_PORT, OUR_PORT + 7, seq=777, ack=1, flags=RST | ACK, window=100)
    assert sw.feed_raw(seg.encode(PEER_IP, OUR_IP)) == []
