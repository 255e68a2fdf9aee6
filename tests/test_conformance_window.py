"""Conformance, the send and receive windows (RFC 9293 §3.8.6, §3.10.7.4): zero
windows and probing, a shrinking window, silly window syndrome avoidance on
both sides, data beyond the right edge.  A raw peer on an established
connection; the software TCP and the offloaded one where the check applies
(the receive side's buffer is the host stack's in software and the posted
buffers' when offloaded, so the receive-window checks are per path)."""
import itertools

import pytest
from rawpeer import Received, SoftwarePeer, data, make_peer, take_all

from chimney.tcp.engine import Config
from chimney.tcp.segment import ACK, PSH

MSS = 1460


@pytest.fixture(params=["software", "offload"])
def peer(request):
    p = make_peer(request.param)
    p.establish()
    yield p
    p.close()


def test_rfc9293_3_8_6_1_zero_window_probed_and_never_given_up(peer):
    """MUST-35/36: with a zero window and data to send, the sender probes (at
    least one octet of new data, at growing intervals) and keeps the connection
    open as long as the receiver keeps acknowledging the probes."""
    peer.feed(window=0)
    out = peer.app_send(data(5000))
    assert [s for s in out if s.payload] == [], out
    probes, t, gaps, last = [], 0.0, [], None
    while t < 200:
        segs = peer.advance(0.5)
        t += 0.5
        for s in segs:
            if s.payload or s.seq != peer.ack:
                probes.append((t, s))
                if last is not None:
                    gaps.append(t - last)
                last = t
                peer.feed(window=0)             # the probe's byte not taken: still zero
    assert len(probes) >= 4, probes
    assert all(len(s.payload) <= 1 for _, s in probes)
    assert any(s.payload == data(1) for _, s in probes)          # new data, the first octet
    assert gaps[-1] > gaps[0]                                      # backing off
    assert not peer.reset()
    # the window opens: the whole 5000 bytes go, and the probes' bytes were the stream's
    rx = Received(peer.ack, 5000)
    rx.add(s for _, s in probes)
    rx.add(peer.feed(window=65535) + peer.advance(0.1))
    take_all(peer, rx)
    assert rx.bytes() == data(5000)


def test_rfc9293_3_8_6_shrinking_window_sender_robust(peer):
    """MUST-34: the sender is robust against a window that shrinks (the right
    edge moving left): it sends nothing beyond the new edge, and all the data
    arrives once the window opens again."""
    base, n = peer.ack, 20_000
    rx = Received(base, n)
    peer.feed(window=4 * MSS)
    rx.add(peer.app_send(data(n)))
    first = rx.top()
    assert 0 < first <= 4 * MSS
    # acknowledge one segment, advertise a window whose right edge is left of the old
    peer.feed(ack=base + MSS, window=MSS // 2)
    later = peer.advance(0.05)
    assert all(s.seq + len(s.payload) - base <= max(first, MSS + MSS // 2) for s in later), later
    rx.add(later)
    assert not peer.reset()
    # open wide and acknowledge what has arrived, as it comes: every byte, exactly
    take_all(peer, rx)
    assert rx.bytes() == data(n)


def test_rfc9293_3_8_6_2_1_sender_sws_avoidance(peer):
    """MUST-38: a window that opens by a sliver does not get a sliver of a
    segment: the sender waits for an MSS (or half the largest window seen)."""
    peer.feed(window=0)
    peer.app_send(data(10_000))
    out = peer.feed(window=100)                 # 100 bytes, far less than MSS and max window/2
    assert [s for s in out if s.payload] == [], out
    out = peer.feed(window=3 * MSS)
    sizes = [len(s.payload) for s in out if s.payload]
    assert sizes and all(n == MSS for n in sizes), sizes


def test_rfc9293_3_10_7_4_data_beyond_the_window_not_accepted(peer):
    """A segment wholly right of RCV.NXT + RCV.WND (the window advertised) is not
    acceptable: ACKed and dropped.  Dropped means dropped: once the peer has
    sent the bytes before it, the connection does not hold it."""
    acks = peer.feed(payload=b"a", flags=ACK | PSH)
    peer.seq += 1
    acks += peer.advance(0.3)
    assert acks and acks[-1].ack == peer.seq
    base, wnd = peer.seq, acks[-1].window              # no window scaling negotiated
    out = peer.feed(seq=base + wnd + 10, payload=b"beyond", flags=ACK | PSH)
    assert [(s.flags & ACK, s.ack) for s in out] == [(ACK, base)], out
    # the bytes before it, in the window, the application reading as they come
    blob = data(wnd + 10)
    for off in range(0, len(blob), MSS):
        peer.feed(seq=base + off, payload=blob[off:off + MSS], flags=ACK | PSH)
        peer.app_recv()
    peer.seq = base + len(blob)
    assert peer.app_recv() == b"a" + blob
    assert peer.advance(0.3)[-1].ack == peer.seq


# -- the receive side (software: the host stack's buffer) ---------------------------------

SMALL = 8 * MSS


@pytest.fixture
def small():
    p = SoftwarePeer(Config(recv_buffer_size=SMALL))
    p.establish()
    return p


def fill(p, n):
    out = []
    for off in range(0, n, MSS):
        out += p.feed(payload=data(n)[off:off + MSS], flags=ACK | PSH)
        p.seq += len(data(n)[off:off + MSS])
    return out + p.advance(0.3)


def test_rfc9293_3_8_6_2_2_receiver_closes_the_window_and_answers_probes(small):
    out = fill(small, SMALL)
    assert out and out[-1].ack == small.seq and out[-1].window == 0, out
    # a zero-window probe (one new octet): not taken, ACKed with the window still zero
    probe = small.feed(payload=b"P", flags=ACK)
    assert [(s.ack, s.window) for s in probe] == [(small.seq, 0)], probe


@pytest.mark.xfail(strict=True, reason=(
    "receiver SWS: after the application reads 100 bytes of a full buffer, the ACK of a "
    "zero-window probe takes the probe's byte and advertises a 99-byte window"))
def test_rfc9293_3_8_6_2_2_receiver_sws_avoidance(small):
    """MUST-39: the window is not reopened by less than min(RCV.BUFF/2, MSS): after
    the application reads a little, a probe still sees a zero window; once it has
    read enough, a window update goes out on its own."""
    fill(small, SMALL)
    got = small.flow.conn.recv(100, small.t)
    assert len(got) == 100
    quiet = small.advance(1.0)
    assert all(s.window == 0 for s in quiet), quiet
    probe = small.feed(payload=b"P", flags=ACK) + small.advance(0.3)
    assert probe and all(s.window == 0 for s in probe), probe
    small.app_recv()
    upd = small.out() + small.advance(0.3)
    assert upd and upd[-1].window >= MSS, upd
    assert small.app_recv() == data(SMALL)


def test_rfc9293_3_8_6_2_1_offloaded_usable_window_below_smss_still_sends():
    """What the host stack hands over on a 9000-byte link (its MSS capped at 1460,
    cwnd three of its segments; the peer's MSS 8960): the usable window is below
    the TOE's SMSS.  SWS avoidance may hold a sliver back, but the sender's
    algorithm sends on the override timeout (0.1-1 s) -- it must not stall."""
    p = make_peer("offload")
    try:
        p.establish(mss=8960, path_mtu=9000, cwnd=3 * 1448)
        rx = Received(p.ack, 50_000)
        rx.add(p.app_send(data(50_000)) + p.advance(2.0))
        assert rx.top() > 0, "nothing sent in 2 s"
        take_all(p, rx)
        assert rx.bytes() == data(50_000)
    finally:
        p.close()


@pytest.mark.parametrize("kind", ["software", "offload"])
def test_rfc9293_3_8_6_receiver_never_shrinks_its_window(kind):
    """SHOULD-14 "A TCP receiver SHOULD NOT shrink the window": the right edge
    it advertises (SEG.ACK + SEG.WND) never moves left, while data arrives and
    the application reads it in fits and starts."""
    p = SoftwarePeer(Config(recv_buffer_size=SMALL)) if kind == "software" else make_peer(kind)
    try:
        p.establish()
        edges, blob, sent = [], data(60 * MSS, 3), 0
        for i in range(60):
            wnd_left = (edges[-1] - p.seq) if edges else MSS
            if wnd_left >= MSS:
                out = p.feed(payload=blob[sent:sent + MSS], flags=ACK | PSH)
                p.seq += MSS
                sent += MSS
            else:
                out = []
            if i % 3 == 2 or wnd_left < MSS:
                p.app_recv()
                out += p.out()
            out += p.advance(0.25)
            edges += [(s.ack + s.window) & 0xFFFFFFFF for s in out if s.flags & ACK]
        assert len(edges) > 10 and sent > 20 * MSS
        assert all(((b - a) & 0xFFFFFFFF) < 1 << 31 for a, b in itertools.pairwise(edges)), edges
        assert p.app_recv() == blob[:sent]
    finally:
        p.close()
