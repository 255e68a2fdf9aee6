"""IPv6 extension headers and fragment reassembly in the host stack's Interface
(RFC 8200 §4, §4.5; overlaps per RFC 5722): fragments are built by hand with scapy
and fed as frames; the upper layer sees the whole datagram or nothing."""
from __future__ import annotations

import random

import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Ether

from chimney.guest.stack import Interface, ether

MAC = bytes.fromhex("020000c41e02")
PEER_MAC = bytes.fromhex("020000c41e01")
ME6, PEER6 = "fd00:c41e::2", "fd00:c41e::1"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def net():
    clock = Clock()
    iface = Interface(MAC, ipv6=[(ME6, 64)], send_frame=lambda f: None, clock=clock)
    got = []
    iface.register_protocol(6, lambda s, d, p: got.append((str(s), str(d), p)))
    return iface, got, clock


def tcp_bytes(n: int, seed: int = 0) -> bytes:
    payload = random.Random(seed).randbytes(n)
    return bytes(TCP(sport=5001, dport=40000, seq=1, flags="A") / payload)


def fragments(upper: bytes, sizes, ident=0x1234, nh=6, offsets=None):
    """Frames carrying upper in fragments of `sizes` bytes (or at explicit offsets)."""
    out, off = [], 0
    for i, n in enumerate(sizes):
        at = off if offsets is None else offsets[i]
        last = at + n >= len(upper)
        fh = IPv6ExtHdrFragment(nh=nh, offset=at // 8, m=0 if last else 1, id=ident)
        out.append(bytes(Ether(src=ether.mac_str(PEER_MAC), dst=ether.mac_str(MAC))
                         / IPv6(src=PEER6, dst=ME6) / fh / upper[at:at + n]))
        off += n
    return out


def test_in_order(net):
    iface, got, _ = net
    upper = tcp_bytes(2980)                     # 3000 bytes with the TCP header
    for f in fragments(upper, [1232, 1232, 556]):
        iface.on_frame(f)
    assert got == [(PEER6, ME6, upper)]
    assert iface.stats["frag6_reassembled"] == 1 and iface.stats["frag6_fragments_in"] == 3


def test_out_of_order_and_duplicate(net):
    iface, got, _ = net
    upper = tcp_bytes(3000, 1)
    a, b, c = fragments(upper, [1232, 1232, 556])
    for f in (c, a, a, b):
        iface.on_frame(f)
    assert got == [(PEER6, ME6, upper)]
    assert iface.stats["frag6_duplicates"] == 1


def test_overlap_drops_the_datagram(net):
    """RFC 5722: a fragment overlapping another drops the datagram; the pieces that
    would have completed it do not bring it back."""
    iface, got, _ = net
    upper = tcp_bytes(3000, 2)
    first, rest = fragments(upper, [1232, 1768])
    overlapping = fragments(upper, [800], offsets=[1000])[0]      # 1000..1800 over both
    iface.on_frame(first)
    iface.on_frame(overlapping)
    assert iface.stats["frag6_overlap"] == 1
    iface.on_frame(rest)
    assert got == [] and iface.stats["frag6_reassembled"] == 0


def test_timeout_drops_an_incomplete_datagram(net):
    iface, got, clock = net
    upper = tcp_bytes(3000, 3)
    a, b, c = fragments(upper, [1232, 1232, 556])
    iface.on_frame(a)
    iface.on_frame(b)
    assert iface.next_timer() == pytest.approx(clock.t + 60)
    clock.t += 61
    iface.poll()
    assert iface.stats["frag6_timeout"] == 1 and iface.stats["frag6_fragments_dropped"] == 2
    iface.on_frame(c)       # too late: starts a datagram of its own, never complete
    assert got == []


def test_non_final_fragment_not_a_multiple_of_8_dropped(net):
    iface, got, _ = net
    upper = tcp_bytes(3000, 4)
    for f in fragments(upper, [1230, 1790]):      # the first: 1230 bytes and more to come
        iface.on_frame(f)
    assert got == [] and iface.stats["frag6_bad_length"] == 1


def test_atomic_fragment_and_option_headers_walked(net):
    """Hop-by-hop and destination options (padding only) around a fragment header at
    offset 0 with no more fragments (RFC 6946): the TCP segment is delivered."""
    iface, got, _ = net
    upper = tcp_bytes(500, 5)
    pkt = (Ether(src=ether.mac_str(PEER_MAC), dst=ether.mac_str(MAC)) / IPv6(src=PEER6, dst=ME6)
           / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(nh=60, offset=0, m=0, id=9)
           / IPv6ExtHdrDestOpt(nh=6) / upper)
    iface.on_frame(bytes(pkt))
    assert got == [(PEER6, ME6, upper)]


def test_unknown_option_that_says_discard(net):
    iface, got, _ = net
    upper = tcp_bytes(100, 6)
    opt = bytes([6, 0, 0x41, 4, 0, 0, 0, 0])      # type 0x41: high bits 01, discard
    iface.on_frame(bytes(Ether(src=ether.mac_str(PEER_MAC), dst=ether.mac_str(MAC))
                         / IPv6(src=PEER6, dst=ME6, nh=60) / (opt + upper)))
    assert got == [] and iface.stats["drop_ipv6_unknown_option"] == 1
