"""The receiver's reassembly queue and the SACK blocks it reports (RFC 2018 §4): the
first block holds the segment that triggered the ACK, the others are the most
recently reported; queued bytes are never given up for a shorter duplicate."""
from __future__ import annotations

from test_tcp_helpers import LOCAL_ISS, REMOTE_ISS, config, established, feed, ours, peer

L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1
STREAM = bytes(range(256)) * 16              # the peer's bytes: STREAM[i] at R1 + i
SACK = dict(sack=True)


def part(start: int, end: int, **kw):
    return peer(seq=R1 + start, payload=STREAM[start:end], **kw)


def blocks(*ranges):
    return [(R1 + a, R1 + b) for a, b in ranges]


# ------------------------------------------------------------- RFC 2018 §4 order ----
def test_first_sack_block_reports_the_segment_that_triggered_the_ack():
    c = established(const=SACK)
    assert feed(c, part(1000, 1100)) == [ours(sack_blocks=blocks((1000, 1100)))]
    assert feed(c, part(2000, 2100)) == [ours(sack_blocks=blocks((2000, 2100), (1000, 1100)))]
    assert feed(c, part(3000, 3100)) == [
        ours(sack_blocks=blocks((3000, 3100), (2000, 2100), (1000, 1100)))]
    # a segment extending the oldest block makes that block the first
    assert feed(c, part(1100, 1200)) == [
        ours(sack_blocks=blocks((1000, 1200), (3000, 3100), (2000, 2100)))]
    # so does a duplicate of a block already held
    assert feed(c, part(2000, 2050)) == [
        ours(sack_blocks=blocks((2000, 2100), (1000, 1200), (3000, 3100)))]


def test_sack_reports_the_most_recent_blocks_when_not_all_fit():
    """Four blocks fit without timestamps, three with: the most recently reported
    ones, not the lowest in sequence."""
    c = established(const=SACK)
    for i in range(1, 6):
        out = feed(c, part(500 * i, 500 * i + 100))
    assert out == [ours(sack_blocks=blocks(*[(500 * i, 500 * i + 100) for i in (5, 4, 3, 2)]))]
    t = established(const=dict(sack=True, timestamps=True), ts_recent=1, ts_time=0)
    for i in range(1, 6):
        out = feed(t, part(500 * i, 500 * i + 100, tsval=2, tsecr=0))
    assert out[0].sack_blocks == blocks(*[(500 * i, 500 * i + 100) for i in (5, 4, 3)])


def test_filling_the_first_gap_reports_the_remaining_blocks():
    c = established(const=SACK)
    feed(c, part(1000, 1100))
    feed(c, part(2000, 2100))
    assert feed(c, part(0, 1000)) == [ours(ack=R1 + 1100, window=4096 - 1100,
                                           sack_blocks=blocks((2000, 2100)))]


# ---------------------------------------------------------------- reassembly ----
def test_shorter_duplicate_never_discards_queued_bytes():
    """A shorter duplicate at the same sequence number as a queued (and SACKed)
    segment must not replace it: the peer will not resend what it saw SACKed."""
    c = established(const=SACK)
    assert feed(c, part(1000, 1500)) == [ours(sack_blocks=blocks((1000, 1500)))]
    assert feed(c, part(1000, 1100)) == [ours(sack_blocks=blocks((1000, 1500)))]
    assert feed(c, part(0, 1000)) == [ours(ack=R1 + 1500, window=4096 - 1500)]
    assert c.recv(4096, 0.0) == STREAM[:1500]


def test_overlapping_out_of_order_segments_merge():
    c = established(const=SACK)
    feed(c, part(1000, 1500))
    feed(c, part(1200, 1800))                       # overlaps the right end
    feed(c, part(800, 1100))                        # overlaps the left end
    assert feed(c, part(1800, 1900)) == [ours(sack_blocks=blocks((800, 1900)))]   # adjacent
    assert len(c._ooo) == 1
    feed(c, part(0, 800))
    assert c.d.rcv_nxt == R1 + 1900 and c.recv(4096, 0.0) == STREAM[:1900]


def test_a_segment_covering_several_queued_blocks_keeps_them_all():
    c = established(const=SACK)
    feed(c, part(1000, 1100))
    feed(c, part(1300, 1400))
    feed(c, part(1600, 1700))
    assert feed(c, part(1050, 1650)) == [ours(sack_blocks=blocks((1000, 1700)))]
    feed(c, part(0, 1000))
    assert c.d.rcv_nxt == R1 + 1700 and c.recv(4096, 0.0) == STREAM[:1700]


def test_queued_fin_survives_a_shorter_duplicate():
    c = established(const=SACK)
    feed(c, part(1000, 1200, flags=0x11))           # data and FIN
    feed(c, part(1000, 1100))
    feed(c, part(0, 1000))
    assert c.d.rcv_nxt == R1 + 1201 and c.eof is False and c.recv(4096, 0.0) == STREAM[:1200]
    assert c.eof


def test_reassembly_queue_bound_counts_blocks():
    c = established(cfg=config(max_ooo_segments=2), const=SACK)
    for start in (1000, 2000, 3000):
        feed(c, part(start, start + 100))
    assert sorted(c._ooo) == [R1 + 1000, R1 + 2000]         # the third block was not kept
    feed(c, part(1100, 1200))                               # growing a block is always fine
    assert sorted(c._ooo) == [R1 + 1000, R1 + 2000] and len(c._ooo[R1 + 1000][0]) == 200
