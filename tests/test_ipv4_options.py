"""IPv4 options at the packet level (RFC 791, RFC 1122 §3.2.1.8): datagrams with
options are delivered with the options checked and ignored; a malformed option drops
the datagram and is answered with an ICMP Parameter Problem pointing at it; a source
route with hops left is dropped (a host does not forward)."""
from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPOption_RR, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from chimney.guest.stack import Interface, ether, ipv4

MAC = bytes.fromhex("020000c41e02")
PEER_MAC = bytes.fromhex("020000c41e01")
ME4, PEER4 = "10.199.0.2", "10.199.0.1"
MACS, PEER_MACS = ether.mac_str(MAC), ether.mac_str(PEER_MAC)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def net():
    sent, got, clock = [], [], Clock()
    iface = Interface(MAC, ipv4=(ME4, 24), send_frame=sent.append, clock=clock)
    iface.arp_cache.learn(ipaddress.IPv4Address(PEER4), PEER_MAC, clock(), confirmed=True)
    iface.register_protocol(6, lambda s, d, p: got.append(p))
    return iface, sent, got, clock


def frame(opts: bytes, l4=None, dst_mac=MACS, dst=ME4, **ip):
    """A datagram with exactly these option bytes (padded to 4 with EOL)."""
    opts += bytes(-len(opts) % 4)
    pkt = IP(src=PEER4, dst=dst, options=[opts] if opts else [], **ip) / (l4 if l4 is not None else
                                                                          TCP(sport=1, dport=2) / b"data")
    return bytes(Ether(src=PEER_MACS, dst=dst_mac) / pkt)


GOOD = {
    "nop-padded record route": b"\x01" + b"\x07\x0b\x04" + bytes(8),
    "record route full": b"\x07\x07\x08" + bytes(4),
    "timestamp only": b"\x44\x0c\x05\x00" + bytes(8),
    "timestamp and address": b"\x44\x0c\x05\x01" + bytes(8),
    "timestamp full, overflow counted": b"\x44\x08\x09\x10" + bytes(4),
    "stream id": b"\x88\x04\x12\x34",
    "security": b"\x82\x0b" + bytes(9),
    "unknown option skipped by its length": b"\x9e\x06abcd" + b"\x01\x01",
    "router alert": b"\x94\x04\x00\x00",
    "end of list, then anything": b"\x00\xff\xff\xff",
    "source route at its end": b"\x83\x07\x08\x0a\x00\x00\x05",
    "the most option space": b"\x07\x27\x04" + bytes(36),
}


@pytest.mark.parametrize("opts", list(GOOD.values()), ids=list(GOOD))
def test_datagram_with_options_delivered(net, opts):
    iface, sent, got, _ = net
    iface.on_frame(frame(opts))
    assert got and bytes(TCP(got[0])[Raw].load) == b"data", dict(iface.stats)
    assert iface.stats["ipv4_options_in"] == 1 and iface.stats["ipv4_delivered"] == 1
    assert not [k for k in iface.stats if k.startswith("drop_")] and not sent


def test_echo_with_options_answered_without_them(net):
    iface, sent, _, _ = net
    rr = IPOption_RR(routers=["0.0.0.0"] * 3)
    iface.on_frame(bytes(Ether(src=PEER_MACS, dst=MACS) / IP(src=PEER4, dst=ME4, options=[rr])
                         / ICMP(type=8, id=7, seq=9) / b"ping"))
    iface.on_frame(bytes(Ether(src=PEER_MACS, dst=MACS)
                         / IP(src=PEER4, dst=ME4, options=[GOOD["timestamp only"]])
                         / ICMP(type=8, id=7, seq=10) / b"ping"))
    replies = [Ether(f) for f in sent]
    assert [r[ICMP].seq for r in replies] == [9, 10]
    for r in replies:
        assert r[IP].ihl == 5 and r[ICMP].type == 0 and r[Raw].load == b"ping"


BAD = {  # option bytes, offset of the octet at fault inside the options
    "length 0": (b"\x01\x44\x00\x00", 2),
    "length 1": (b"\x07\x01\x00\x00", 1),
    "length past the header": (b"\x01\x07\x0b\x04" + bytes(4), 2),
    "no room for the length": (b"\x01\x01\x01\x07", 3),
    "record route too short": (b"\x07\x02\x00\x00", 1),
    "record route pointer below 4": (b"\x07\x07\x03" + bytes(5), 2),
    "timestamp too short": (b"\x44\x03\x05\x00", 1),
    "timestamp pointer below 5": (b"\x44\x08\x04\x00" + bytes(4), 2),
    "timestamp unknown flag": (b"\x44\x08\x05\x02" + bytes(4), 3),
    "unknown option overrunning": (b"\x9e\x09" + bytes(6), 1),
}


@pytest.mark.parametrize("opts,at", list(BAD.values()), ids=list(BAD))
def test_malformed_option_dropped_with_parameter_problem(net, opts, at):
    iface, sent, got, _ = net
    raw = frame(opts)
    iface.on_frame(raw)
    assert not got and iface.stats["drop_ipv4_bad_option"] == 1, dict(iface.stats)
    assert iface.stats["icmp_parameter_problems_out"] == 1 and len(sent) == 1
    p = Ether(sent[0])
    assert p[IP].src == ME4 and p[IP].dst == PEER4 and p[ICMP].type == 12 and p[ICMP].code == 0
    icmp_bytes = bytes(p[ICMP])
    assert icmp_bytes[4] == 20 + at                          # the pointer: the octet at fault
    ihl = (raw[14] & 15) * 4
    assert icmp_bytes[8:] == raw[14:14 + ihl + 8]            # the header and 8 bytes of data
    assert ipv4.checksum(icmp_bytes) == 0


def test_source_route_with_hops_left_dropped(net):
    iface, sent, got, _ = net
    iface.on_frame(frame(b"\x83\x07\x04\x0a\x00\x00\x05"))         # loose, next hop 10.0.0.5
    iface.on_frame(frame(b"\x01\x89\x0b\x08" + bytes(8)))           # strict, one hop left
    assert not got and iface.stats["drop_ipv4_source_route"] == 2 and not sent


def test_no_parameter_problem_where_icmp_errors_are_forbidden(net):
    iface, sent, got, _ = net
    bad = b"\x07\x01\x00\x00"
    iface.on_frame(frame(bad, dst_mac="ff:ff:ff:ff:ff:ff"))                       # link broadcast
    iface.on_frame(frame(bad, dst="10.199.0.255", dst_mac="ff:ff:ff:ff:ff:ff"))   # subnet broadcast
    iface.on_frame(frame(bad, l4=ICMP(type=3, code=1) / bytes(28)))               # an ICMP error
    iface.on_frame(frame(bad, frag=8, proto=6, l4=bytes(16)))                     # a later fragment
    assert iface.stats["drop_ipv4_bad_option"] == 4 and not sent and not got


def test_parameter_problems_are_rate_limited(net):
    iface, sent, _, clock = net
    for _ in range(50):
        iface.on_frame(frame(b"\x07\x01\x00\x00"))
    assert iface.stats["drop_ipv4_bad_option"] == 50
    assert len(sent) == 10
    clock.t += 1.0
    for _ in range(50):
        iface.on_frame(frame(b"\x07\x01\x00\x00"))
    assert len(sent) == 20


def test_fragments_with_options_reassembled(net):
    iface, sent, got, _ = net
    data = bytes(range(256)) * 4
    pkt = IP(src=PEER4, dst=ME4, id=0x55, flags=0, options=[IPOption_RR(routers=["0.0.0.0"] * 2)]) \
        / TCP(sport=1, dport=2) / data
    for f in fragment(pkt, fragsize=256):
        iface.on_frame(bytes(Ether(src=PEER_MACS, dst=MACS) / f))
    assert len(got) == 1 and bytes(TCP(got[0])[Raw].load) == data, dict(iface.stats)
    assert iface.stats["frag_reassembled"] == 1 and not sent


def test_check_options_directly():
    ipv4.check_options(b"")
    ipv4.check_options(b"\x01\x01\x01\x00")
    with pytest.raises(ipv4.OptionError) as e:
        ipv4.check_options(b"\x01\x07\x02\x00")
    assert e.value.pointer == 22 and e.value.reason == "ipv4_bad_option"
