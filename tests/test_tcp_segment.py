"""chimney.tcp.segment: encode/decode round trips, scapy cross-checks, malformed input."""
from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from chimney.tcp.segment import (ACK, CWR, ECE, FIN, PSH, RST, SYN, URG, Segment,
                                 SegmentError, checksum, decode, pseudo_header)

V4 = ("192.0.2.1", "198.51.100.7")
V6 = ("2001:db8::1", "2001:db8:ffff::2")


def full_segment(**kw) -> Segment:
    base = dict(src_port=49152, dst_port=80, seq=0xDEADBEEF, ack=0x01020304,
                flags=SYN | ACK, window=29200, mss=1460, wscale=7, sack_permitted=True,
                tsval=123456, tsecr=654321, payload=b"")
    base.update(kw)
    return Segment(**base)


@pytest.mark.parametrize("ips", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("seg", [
    full_segment(),
    Segment(1, 2, seq=5, ack=6, flags=ACK | PSH, window=65535, payload=b"hello world"),
    Segment(1, 2, seq=0xFFFFFFFF, ack=0, flags=FIN | ACK, window=0, tsval=1, tsecr=2),
    Segment(443, 50000, seq=7, ack=9, flags=ACK, window=100, tsval=5, tsecr=6,
            sack_blocks=[(100, 200), (300, 400), (0xFFFFFF00, 0x10)], payload=b"x" * 3),
    Segment(9, 9, flags=RST),
    Segment(9, 9, flags=FIN | SYN | RST | PSH | ACK | URG | ECE | CWR, urgent=3,
            payload=b"odd"),
], ids=repr)
def test_round_trip(seg, ips):
    raw = seg.encode(*ips)
    assert decode(raw, *ips) == seg


@pytest.mark.parametrize("ips", [V4, V6], ids=["ipv4", "ipv6"])
def test_encoding_matches_scapy(ips):
    seg = full_segment(payload=b"payload bytes")
    raw = seg.encode(*ips)
    ip_layer = IP if ips is V4 else IPv6
    # scapy computes the checksum itself when chksum is unset
    ref = TCP(sport=seg.src_port, dport=seg.dst_port, seq=seg.seq, ack=seg.ack,
              flags="SA", window=seg.window,
              options=[("MSS", 1460), ("NOP", None), ("NOP", None), ("SAckOK", b""),
                       ("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321)),
                       ("NOP", None), ("WScale", 7)]) / b"payload bytes"
    ref_raw = bytes(ip_layer(src=ips[0], dst=ips[1]) / ref)
    ref_tcp = ref_raw[20 if ips is V4 else 40:]
    assert raw == ref_tcp


@pytest.mark.parametrize("ips", [V4, V6], ids=["ipv4", "ipv6"])
def test_decodes_what_scapy_builds(ips):
    ip_layer = IP if ips is V4 else IPv6
    pkt = ip_layer(src=ips[0], dst=ips[1]) / TCP(
        sport=1000, dport=2000, seq=42, ack=43, flags="PA", window=512,
        options=[("NOP", None), ("NOP", None), ("Timestamp", (7, 8)),
                 ("SAck", (10, 20, 30, 40))]) / b"abc"
    raw = bytes(pkt)[20 if ips is V4 else 40:]
    seg = decode(raw, *ips)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (1000, 2000, 42, 43)
    assert seg.flags == PSH | ACK and seg.window == 512
    assert (seg.tsval, seg.tsecr) == (7, 8)
    assert seg.sack_blocks == [(10, 20), (30, 40)]
    assert seg.payload == b"abc"


def test_checksum_rfc1071_example():
    # RFC 1071 §3 worked example: the sum of these words is 0xddf2
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xddf2 & 0xFFFF


def test_unknown_option_is_skipped():
    seg = Segment(1, 2, flags=ACK)
    raw = bytearray(seg.encode(*V4))
    # add option kind 30 (MPTCP), length 4, then EOL padding to 8 bytes
    opts = bytes([30, 4, 0, 0, 1, 1, 1, 0])
    raw = raw[:12] + bytes([(28 // 4) << 4]) + raw[13:16] + b"\0\0" + raw[18:20] + opts
    csum = checksum(pseudo_header(*V4, len(raw)) + bytes(raw))
    raw[16:18] = struct.pack("!H", csum)
    assert decode(bytes(raw), *V4) == Segment(1, 2, flags=ACK)


def _with_options(opts: bytes, ips=V4) -> bytes:
    """A header carrying raw option bytes (padded to 4), with a good checksum."""
    opts = opts + bytes(-len(opts) % 4)
    hdr = bytearray(struct.pack("!HHIIBBHHH", 1, 2, 0, 0, (20 + len(opts)) // 4 << 4,
                                ACK, 100, 0, 0) + opts)
    hdr[16:18] = struct.pack("!H", checksum(pseudo_header(*ips, len(hdr)) + bytes(hdr)))
    return bytes(hdr)


@pytest.mark.parametrize("raw, why", [
    (b"", "truncated"),
    (b"\x00" * 19, "truncated"),
    (_with_options(b"")[:12] + bytes([4 << 4]) + _with_options(b"")[13:], "below 20"),
    (_with_options(b"")[:12] + bytes([6 << 4]) + _with_options(b"")[13:], "beyond"),
    (_with_options(bytes([1, 2, 4, 5])), "bad length 4"),     # MSS cut by the header end
    (_with_options(bytes([2, 3, 5, 1])), "MSS option length"),
    (_with_options(bytes([3, 4, 7, 1])), "window scale option length"),
    (_with_options(bytes([4, 3, 0, 0])), "SACK-permitted option length"),
    (_with_options(bytes([8, 9]) + bytes(7)), "timestamps option length"),
    (_with_options(bytes([5, 7]) + bytes(6)), "SACK option length"),
    (_with_options(bytes([5, 2, 0, 0])), "SACK option length"),
    (_with_options(bytes([1, 1, 1, 30])), "no length byte"),
    (_with_options(bytes([30, 0, 0, 0])), "bad length 0"),
    (_with_options(bytes([30, 1, 0, 0])), "bad length 1"),
    (_with_options(bytes([30, 9, 0, 0])), "bad length 9"),
], ids=lambda x: x if isinstance(x, str) else "raw")
def test_malformed_raises_segment_error(raw, why):
    with pytest.raises(SegmentError, match=why):
        decode(raw, *V4)


def test_bad_checksum():
    raw = bytearray(full_segment(payload=b"data").encode(*V4))
    raw[-1] ^= 0x01
    with pytest.raises(SegmentError, match="checksum"):
        decode(bytes(raw), *V4)
    # the right bytes under the wrong pseudo-header fail as well
    with pytest.raises(SegmentError, match="checksum"):
        decode(full_segment().encode(*V4), V4[0], "192.0.2.99")


def test_bad_addresses():
    with pytest.raises(SegmentError):
        decode(full_segment().encode(*V4), "not-an-ip", V4[1])
    with pytest.raises(SegmentError, match="families"):
        decode(full_segment().encode(*V4), V4[0], V6[1])
    with pytest.raises(SegmentError):
        decode("a string", *V4)  # type: ignore[arg-type]


def test_too_many_options_refused_on_encode():
    seg = full_segment(flags=ACK, sack_blocks=[(1, 2), (3, 4), (5, 6), (7, 8)])
    with pytest.raises(SegmentError, match="more than 40"):
        seg.encode(*V4)


def test_fuzz_only_segment_error():
    """Random corruption of valid segments raises SegmentError or decodes; nothing else."""
    rng = random.Random(1)
    good = [full_segment().encode(*V4),
            Segment(1, 2, flags=ACK, tsval=1, tsecr=2, sack_blocks=[(1, 2)],
                    payload=b"zz").encode(*V4)]
    for _ in range(3000):
        raw = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            if not raw:
                raw += b"\0"
            elif op == 0:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            elif op == 1:
                del raw[rng.randrange(len(raw)):]
            else:
                raw += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        for verify in (True, False):
            try:
                decode(bytes(raw), *V4, verify_checksum=verify)
            except SegmentError:
                pass
