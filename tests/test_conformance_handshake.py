"""Conformance, the handshake's options (RFC 9293 §3.7.1 and §3.2, RFC 7323, RFC
2018): a raw peer opens connections to the software TCP with SYNs whose
options it chooses byte by byte and checks the SYN-ACK and the segments that
follow.  The handshake is always the host stack's (connections are offloaded
established), so this module has no offloaded variant."""
import pytest
from rawpeer import (
    OUR_IP,
    OUR_PORT,
    PEER_IP,
    PEER_ISS,
    PEER_PORT,
    SoftwarePeer,
    data,
    raw_tcp,
)

from chimney.tcp.segment import ACK, RST, SYN, Segment


@pytest.fixture
def peer():
    return SoftwarePeer()


def synack_of(out):
    sa = [s for s in out if s.syn]
    assert len(sa) == 1 and sa[0].flags & ACK and sa[0].ack == PEER_ISS + 1, out
    return sa[0]


def sent_bytes(peer, segs):
    """Highest sequence the stack sent, relative to its first data byte."""
    return max((s.seq + len(s.payload) - peer.ack) & 0xFFFFFFFF for s in segs if s.payload)


def test_rfc9293_3_7_1_mss_option_sent_in_syn_ack(peer):
    sa = synack_of(peer.syn())
    assert sa.mss == 1460          # MTU 1500 less 40 bytes of IPv4 and TCP headers


@pytest.mark.parametrize("mss", [536, 1000])
def test_rfc9293_3_7_1_segments_bounded_by_the_peers_mss(peer, mss):
    peer.establish(mss=mss)
    segs = peer.app_send(data(10_000))
    assert segs and all(0 < len(s.payload) <= mss for s in segs if s.payload), segs


def test_rfc9293_3_7_1_no_mss_option_means_536(peer):
    out = peer.syn(options=b"")
    sa = synack_of(out)
    peer.seq, peer.ack = PEER_ISS + 1, sa.seq + 1
    peer.feed()
    peer.flow = peer.listener.take()
    segs = peer.app_send(data(5000))
    assert segs and max(len(s.payload) for s in segs) == 536


def test_rfc9293_3_7_1_timestamps_count_against_the_mss(peer):
    """Eff.snd.MSS = min(SendMSS + 20, MMS_S) - TCPhdrsize: the 12 bytes of the
    timestamps option come out of each segment's payload."""
    peer.establish(mss=1000, timestamps=True)
    segs = peer.app_send(data(10_000))
    assert max(len(s.payload) for s in segs) == 1000 - 12


def test_rfc7323_2_2_window_scale_echoed_and_the_peers_window_scaled(peer):
    sa = peer.establish(wscale=7)
    assert sa.wscale is not None
    # "the Window field in a segment with SYN is never scaled": 16 bits as is
    assert sa.window <= 0xFFFF
    peer.feed(window=10)                       # 10 << 7 = 1280 bytes: less than one MSS
    assert peer.flow.conn.d.snd_wnd == 1280
    peer.feed(window=40)                       # 5120 bytes
    segs = peer.app_send(data(20_000))
    # scaled: more than 40 bytes, within 5120 (what SWS avoidance holds back is under an MSS)
    assert 5120 - 1460 < sent_bytes(peer, segs) <= 5120, segs


def test_rfc7323_2_2_no_window_scale_from_the_peer_none_either_way(peer):
    sa = peer.establish(wscale=None)
    assert sa.wscale is None
    peer.feed(window=4000)                     # unscaled: 4000 bytes
    segs = peer.app_send(data(20_000))
    assert 4000 - 1460 < sent_bytes(peer, segs) <= 4000
    assert all(s.window <= 0xFFFF for s in segs)


def test_rfc7323_2_3_shift_count_above_14_used_as_14(peer):
    peer.establish(wscale=15)
    assert peer.flow.conn.const.snd_wscale == 14
    peer.feed(window=1)                        # 1 << 14, not 1 << 15
    assert peer.flow.conn.d.snd_wnd == 1 << 14


@pytest.mark.parametrize("offered", [True, False])
def test_rfc2018_2_sack_permitted_only_when_offered(peer, offered):
    sa = peer.establish(sack=offered)
    assert sa.sack_permitted is offered
    assert peer.flow.conn.const.sack is offered


def test_rfc7323_3_2_timestamps_echoed_and_then_in_every_segment(peer):
    peer.timestamps = True
    peer.ts_peer = 777
    out = peer.syn(tsval=777, tsecr=0)
    sa = synack_of(out)
    assert sa.tsval is not None and sa.tsecr == 777
    peer.seq, peer.ack, peer.ts_echo = PEER_ISS + 1, sa.seq + 1, sa.tsval
    peer.feed()
    peer.flow = peer.listener.take()
    peer.ts_peer = 800
    segs = peer.app_send(data(3000))
    later = peer.feed(payload=b"x" * 10) + peer.advance(0.5)     # the (delayed) ACK of it
    assert segs and later and all(s.tsval is not None and not s.rst for s in segs + later)
    assert later[-1].tsecr == 800 and later[-1].ack == PEER_ISS + 11


def test_rfc7323_3_2_no_timestamps_when_the_syn_had_none(peer):
    sa = peer.establish(timestamps=False)
    assert sa.tsval is None
    segs = peer.app_send(data(3000)) + peer.feed(payload=b"y" * 10)
    assert segs and all(s.tsval is None for s in segs)


def test_rfc9293_3_1_unknown_options_ignored(peer):
    """MUST-64: an option the stack does not implement, with a length field, is
    ignored without error (kinds 253/254 are the experimental ones)."""
    opts = b"\xfd\x06\x12\x34\x56\x78" + b"\x02\x04\x02\x00" + b"\x01\x01" + b"\x4c\x02"
    sa = synack_of(peer.syn(options=opts))
    assert sa.mss == 1460
    peer.seq, peer.ack = PEER_ISS + 1, sa.seq + 1
    peer.feed()
    peer.flow = peer.listener.take()
    assert peer.flow is not None and peer.flow.conn.established
    segs = peer.app_send(data(3000))
    assert max(len(s.payload) for s in segs) == 0x200      # the MSS after the unknown option


@pytest.mark.parametrize("opts", [
    b"\x02\x00\x05\xb4",                 # length 0
    b"\x02\x01\x05\xb4",                 # length 1 (shorter than kind + length)
    b"\x02\x03\x05\xb4",                 # MSS with length 3
    b"\x03\x02\x07\x00",                 # window scale with length 2
    b"\x08\x04\x00\x00",                 # timestamps with length 4
    b"\x02\x04\x05\xb4\xfd\x09\x00\x00",  # an option running past the header
], ids=["len0", "len1", "mss-len3", "ws-len2", "ts-len4", "past-header"])
def test_rfc9293_3_1_illegal_option_length_handled(peer, opts):
    """MUST-7: prepared for an illegal option length: the SYN is dropped (or reset),
    nothing half-opened is left behind, and the listener still serves a good SYN."""
    out = peer.syn(options=opts)
    assert not any(s.syn for s in out), out
    assert all(s.rst for s in out), out
    assert peer.stack.stats["tcp_internal_error"] == 0
    assert peer.listener.take() is None
    sa = peer.establish()
    assert sa.mss == 1460


def test_rfc9293_3_10_7_2_syn_with_data_not_delivered_before_the_handshake(peer):
    """Data on a SYN is queued (or dropped for retransmission) but never handed to
    the application before the connection is established; a stack that keeps it
    delivers it exactly once."""
    out = peer.feed_raw(raw_tcp(seq=PEER_ISS, ack=0, flags=SYN, options=b"\x02\x04\x05\xb4",
                                payload=b"early"))
    sa = synack_of(out)
    peer.seq, peer.ack = PEER_ISS + 1, sa.seq + 1
    kept = sa.ack == PEER_ISS + 1 + 5
    if kept:
        peer.seq += 5
    peer.feed()
    peer.flow = peer.listener.take()
    peer.feed(payload=b"late")
    assert peer.app_recv() == (b"early" if kept else b"") + b"late"


def test_rfc9293_3_10_7_3_ack_in_syn_received_outside_range_gets_rst(peer):
    """SYN-RECEIVED, an ACK that does not acknowledge our SYN: <SEQ=SEG.ACK><CTL=RST>."""
    sa = synack_of(peer.syn())
    peer.seq = PEER_ISS + 1
    bad_ack = (sa.seq + 1000) & 0xFFFFFFFF
    out = peer.feed(ack=bad_ack)
    assert [(s.flags, s.seq) for s in out] == [(RST, bad_ack)], out


def active_open(peer):
    flow = peer.stack.open(PEER_IP, PEER_PORT, local_port=OUR_PORT + 1)
    syn = [s for s in peer.out() if s.syn]
    assert len(syn) == 1 and not syn[0].flags & ACK
    return flow, syn[0]


def syn_ack_to(flow, syn, peer, **opts):
    seg = Segment(PEER_PORT, OUR_PORT + 1, seq=PEER_ISS, ack=syn.seq + 1, flags=SYN | ACK,
                  window=65535, **opts)
    return peer.feed_raw(seg.encode(PEER_IP, OUR_IP))


def test_rfc9293_3_7_1_our_syn_offers_mss_and_options(peer):
    _, syn = active_open(peer)
    assert syn.mss == 1460 and syn.window <= 0xFFFF
    assert syn.wscale is not None and syn.sack_permitted and syn.tsval is not None and syn.tsecr == 0


def test_rfc7323_2_2_scaling_only_when_both_syns_carry_it(peer):
    """Our SYN offered a shift; the peer's SYN-ACK has none: neither side scales,
    so our window fields are byte counts (and the peer's too)."""
    flow, syn = active_open(peer)
    out = syn_ack_to(flow, syn, peer, mss=1460)
    assert flow.conn.established and flow.conn.const.rcv_wscale == 0 and flow.conn.const.snd_wscale == 0
    ack = [s for s in out if s.flags & ACK and not s.syn]
    assert ack and ack[-1].window == min(flow.conn.d.rcv_wnd, 0xFFFF)


def test_rfc7323_3_2_no_timestamps_when_the_syn_ack_has_none(peer):
    flow, syn = active_open(peer)
    out = syn_ack_to(flow, syn, peer, mss=1460)
    assert flow.conn.const.timestamps is False
    flow.conn.send(b"abc", peer.t)
    out += peer.out()
    assert out and all(s.tsval is None for s in out), out
