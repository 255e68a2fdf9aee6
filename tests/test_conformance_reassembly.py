"""Conformance, what the receiver does with the segments it gets (RFC 9293
§3.10.7.4, RFC 5681 §4.2, RFC 2018, RFC 7323 §4-5, RFC 6093): out-of-order
segments queued and acknowledged at once, overlaps trimmed, the SACK blocks'
order, PAWS, urgent data kept in the stream.  A raw peer on an established
connection, the software TCP and the offloaded one alike."""
import pytest
from rawpeer import data, make_peer

from chimney import hw
from chimney.tcp.segment import ACK, FIN, PSH, RST, URG

N = 6000
CHUNK = 1000


def peer_of(kind, **kw):
    p = make_peer(kind)
    p.establish(**kw)
    return p


@pytest.fixture(params=["software", "offload"])
def kind(request):
    return request.param


@pytest.fixture
def peer(kind):
    p = peer_of(kind)
    yield p
    p.close()


def piece(peer, start, end, blob, flags=ACK | PSH, **kw):
    return peer.feed(seq=peer.seq + start, payload=blob[start:end], flags=flags, **kw)


def test_rfc9293_3_10_7_4_out_of_order_queued_and_delivered_in_order(peer):
    """Segments 3, 5, 2, 4, 1 of 6 (then 6): held until the gap before them is
    filled, then delivered in order, each byte once."""
    blob = data(N)
    for i in (3, 5, 2, 4, 1, 0):
        acks = piece(peer, i * CHUNK, (i + 1) * CHUNK, blob)
        if i:
            assert peer.app_recv() == b""
    assert peer.app_recv() == blob
    peer.seq += N
    acks += peer.advance(0.3)
    assert acks and acks[-1].ack == peer.seq


def test_rfc5681_4_2_out_of_order_segment_acked_at_once(peer):
    """An out-of-order segment is acknowledged immediately (a duplicate ACK for
    RCV.NXT), not after the delayed-ACK timer; so is the one that fills the gap."""
    blob = data(3 * CHUNK)
    out = piece(peer, CHUNK, 2 * CHUNK, blob)
    assert [(s.flags & ACK, s.ack, s.payload) for s in out] == [(ACK, peer.seq, b"")], out
    out = piece(peer, 2 * CHUNK, 3 * CHUNK, blob)
    assert [s.ack for s in out] == [peer.seq], out
    out = piece(peer, 0, CHUNK, blob)
    assert out and all(s.ack == peer.seq + 3 * CHUNK for s in out), out
    assert peer.app_recv() == blob


@pytest.mark.parametrize("layout", [
    [(0, 1000), (500, 1500), (1500, 3000)],                  # a retransmission half old, half new
    [(1000, 2000), (500, 2500), (0, 600), (2500, 3000)],      # a queued segment overlapped on both sides
    [(2000, 3000), (1000, 2000), (1500, 2600), (0, 3000)],    # the gap filled by one covering everything
    [(0, 3000), (0, 3000), (1000, 1001)],                     # wholly old duplicates
], ids=["half-old", "both-sides", "cover-all", "duplicates"])
def test_rfc9293_3_10_7_4_overlaps_trimmed_each_byte_once(peer, layout):
    blob = data(3000, 5)
    for a, b in layout:
        piece(peer, a, b, blob)
    assert peer.app_recv() == blob
    peer.seq += 3000
    acks = peer.feed(payload=b"!", flags=ACK | PSH) + peer.advance(0.3)
    assert acks[-1].ack == peer.seq + 1
    assert peer.app_recv() == blob + b"!"


def sack_peer(kind):
    return peer_of(kind, sack=True)


def test_rfc2018_4_first_sack_block_is_the_triggering_segment(kind):
    """Each ACK for out-of-order data carries SACK blocks; the first names the
    block holding the segment that triggered it, the others repeat the most
    recently reported ones."""
    p = sack_peer(kind)
    try:
        base, blob = p.seq, data(10 * CHUNK)

        def blk(a, b):
            return ((base + a * CHUNK) & 0xFFFFFFFF, (base + b * CHUNK) & 0xFFFFFFFF)

        out = piece(p, 2 * CHUNK, 3 * CHUNK, blob)
        assert [s.sack_blocks for s in out] == [[blk(2, 3)]], out
        out = piece(p, 6 * CHUNK, 7 * CHUNK, blob)
        assert [s.sack_blocks for s in out] == [[blk(6, 7), blk(2, 3)]], out
        out = piece(p, 4 * CHUNK, 5 * CHUNK, blob)
        assert [s.sack_blocks for s in out] == [[blk(4, 5), blk(6, 7), blk(2, 3)]], out
        # a segment that joins two blocks: the joined block first
        out = piece(p, 3 * CHUNK, 4 * CHUNK, blob)
        assert [s.sack_blocks for s in out] == [[blk(2, 5), blk(6, 7)]], out
        # one that extends the oldest block again: it moves to the front
        out = piece(p, 7 * CHUNK, 8 * CHUNK, blob)
        assert [s.sack_blocks for s in out] == [[blk(6, 8), blk(2, 5)]], out
        # the gap at the start filled: the block it joins is gone (acknowledged)
        out = piece(p, 0, 2 * CHUNK, blob)
        assert [(s.ack, s.sack_blocks) for s in out] == [(base + 5 * CHUNK, [blk(6, 8)])], out
        assert p.app_recv() == blob[:5 * CHUNK]
    finally:
        p.close()


def test_rfc2018_no_sack_blocks_when_not_permitted(peer):
    out = piece(peer, CHUNK, 2 * CHUNK, data(2 * CHUNK))
    assert out and all(not s.sack_blocks for s in out)


# -- timestamps: PAWS (RFC 7323 §5) --------------------------------------------------------

@pytest.fixture
def ts_peer(kind):
    p = make_peer(kind)
    p.ts_peer = 1000
    p.establish(timestamps=True)
    p.ts_peer = 1010
    # one in-order segment: TS.Recent = 1010
    p.feed(payload=b"x", flags=ACK | PSH)
    p.seq += 1
    p.advance(0.3)
    yield p
    p.close()


def test_rfc7323_5_3_paws_old_timestamp_dropped_and_acked(ts_peer):
    p = ts_peer
    out = p.feed(payload=b"stale", flags=ACK | PSH, tsval=900, tsecr=p.ts_echo)
    assert [(s.flags & ACK, s.ack, s.tsecr) for s in out] == [(ACK, p.seq, 1010)], out
    assert p.app_recv() == b"x"
    # the same bytes with a current timestamp are taken
    p.ts_peer = 1020
    p.feed(payload=b"fresh", flags=ACK | PSH)
    assert p.app_recv() == b"xfresh"


def test_rfc7323_5_3_paws_wraps_modulo_2_32(ts_peer):
    """TSval comparisons are modulo 2^32: 2^31 ahead is older, not newer."""
    p = ts_peer
    p.feed(payload=b"w", flags=ACK | PSH, tsval=(1010 + (1 << 31) + 5) & 0xFFFFFFFF, tsecr=p.ts_echo)
    assert p.app_recv() == b"x"


def test_rfc7323_5_2_rst_accepted_whatever_its_timestamp(ts_peer):
    """RST segments are acceptable regardless of their timestamp (§5.2)."""
    p = ts_peer
    assert p.feed(flags=RST, ack=0, tsval=5, tsecr=0) == []
    assert p.reset()


def test_rfc7323_4_3_ts_recent_only_from_in_sequence_segments(ts_peer):
    """An out-of-order segment's TSval is not taken into TS.Recent (SEG.SEQ >
    Last.ACK.sent): the duplicate ACK it triggers echoes the older TS.Recent."""
    p = ts_peer
    out = p.feed(seq=p.seq + 500, payload=b"later", flags=ACK | PSH, tsval=2000, tsecr=p.ts_echo)
    assert [s.tsecr for s in out] == [1010], out
    p.ts_peer = 1030
    out = p.feed(payload=b"y" * 500, flags=ACK | PSH) + p.advance(0.3)
    assert out[-1].tsecr == 1030 and out[-1].ack == p.seq + 505


# -- urgent data (RFC 9293 §3.8.5, RFC 6093) ------------------------------------------------

def test_rfc6093_urgent_data_kept_in_the_stream(peer):
    """The stack does not take urgent data out of band; what it must do is not
    corrupt the stream: every byte, urgent or not, delivered in order, once
    (RFC 6093: urgent data in line); or, offloaded, hand the connection back to
    the host with none of it lost."""
    blob = data(3 * CHUNK, 9)
    piece(peer, 0, CHUNK, blob)
    # urgent pointer: the last urgent byte is 100 bytes into the segment (RFC 9293 §3.8.5)
    piece(peer, CHUNK, 2 * CHUNK, blob, flags=ACK | PSH | URG, urgent=100)
    piece(peer, 2 * CHUNK, 3 * CHUNK, blob)
    got = peer.app_recv()
    if peer.name == "offload" and len(got) < len(blob):
        # the TOE asks for the connection back; the host gets the rest in the state
        assert any(e["kind"] == hw.EV_RETRIEVE for e in peer.events), peer.events
        _, recs = peer.drv.terminate([peer.ctx])
        got += recs[0].state.delegated.recv_buffer
    assert got == blob


def test_rfc9293_3_10_7_4_fin_out_of_order_waits_for_the_gap(peer):
    """A FIN beyond RCV.NXT is not processed until the data before it arrives."""
    blob = data(2 * CHUNK)
    piece(peer, CHUNK, 2 * CHUNK, blob, flags=ACK | PSH | FIN)
    assert not peer.eof() and peer.state == "ESTABLISHED"
    out = piece(peer, 0, CHUNK, blob) + peer.advance(0.3)
    assert peer.app_recv() == blob and peer.eof()
    assert out[-1].ack == peer.seq + 2 * CHUNK + 1
