"""The host stack's lower layers without a device: our packets parsed by scapy
and scapy's by us, checksums, fragment reassembly, neighbour caches, and
malformed input counted, never raised."""
import ipaddress
import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, fragment
from scapy.layers.inet6 import (ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS,
                                ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils6 import in6_getnsma, in6_getnsmac

from chimney.guest.stack import FrameError, Interface, arp, ether, icmp, icmpv6, ipv4, ipv6, nd
from chimney.guest.stack.neigh import INCOMPLETE, REACHABLE, STALE

MAC = bytes.fromhex("020000c41e02")
PEER_MAC = bytes.fromhex("020000c41e01")
ME4, PEER4 = "10.199.0.2", "10.199.0.1"
ME6, PEER6 = "fd00:c41e::2", "fd00:c41e::1"
MACS, PEER_MACS = ether.mac_str(MAC), ether.mac_str(PEER_MAC)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def net():
    sent = []
    clock = Clock()
    iface = Interface(MAC, ipv4=(ME4, 24), ipv6=[(ME6, 64)], send_frame=sent.append, clock=clock)
    return iface, sent, clock


def scapy_checksums_ok(pkt):
    """Rebuild pkt with scapy computing every checksum; equal bytes mean ours were right."""
    raw = bytes(pkt)
    again = pkt.__class__(raw)
    for layer in (IP, ICMP, ICMPv6EchoRequest, ICMPv6EchoReply, ICMPv6ND_NS, ICMPv6ND_NA):
        if layer in again:
            if hasattr(again[layer], "chksum"):
                del again[layer].chksum
            if hasattr(again[layer], "cksum"):
                del again[layer].cksum
    return bytes(again.__class__(bytes(again))) == raw


def peer_frame(l3, dst=MACS):
    return bytes(Ether(src=PEER_MACS, dst=dst) / l3)


# -- Ethernet ---------------------------------------------------------------------------------

def test_ether_roundtrip_with_scapy():
    raw = ether.build(PEER_MAC, MAC, ether.ETH_P_IP, b"hello")
    p = Ether(raw)
    assert p.dst == PEER_MACS and p.src == MACS and p.type == 0x0800
    assert len(raw) == ether.MIN_FRAME and bytes(p.payload)[:5] == b"hello"
    f = ether.parse(bytes(Ether(src=PEER_MACS, dst=MACS, type=0x86DD) / (b"x" * 100)))
    assert (f.dst, f.src, f.ethertype, f.payload, f.vlan) == (MAC, PEER_MAC, 0x86DD, b"x" * 100, None)


def test_ether_vlan_tag():
    raw = ether.build(PEER_MAC, MAC, ether.ETH_P_ARP, bytes(28), vlan=(3 << 13) | 42)
    p = Ether(raw)
    assert Dot1Q in p and p[Dot1Q].vlan == 42 and p[Dot1Q].prio == 3 and p[Dot1Q].type == 0x0806
    f = ether.parse(bytes(Ether(src=PEER_MACS, dst=MACS) / Dot1Q(vlan=7) / IP(src=PEER4, dst=ME4)))
    assert f.vid == 7 and f.ethertype == ether.ETH_P_IP


@pytest.mark.parametrize("raw,reason", [(b"", "truncated"), (bytes(13), "truncated"),
                                        (bytes(12) + b"\x81\x00\x00", "truncated"),
                                        (bytes(12) + b"\x00\x40" + bytes(50), "not_ethernet_ii")])
def test_ether_malformed(raw, reason):
    with pytest.raises(FrameError) as e:
        ether.parse(raw)
    assert e.value.reason == reason


# -- ARP ---------------------------------------------------------------------------------------

def test_arp_roundtrip_with_scapy():
    req = arp.request(MAC, ipaddress.IPv4Address(ME4).packed, ipaddress.IPv4Address(PEER4).packed)
    p = ARP(req)
    assert p.op == 1 and p.hwsrc == MACS and p.psrc == ME4 and p.pdst == PEER4 and p.hwdst == "00:00:00:00:00:00"
    s = arp.parse(bytes(ARP(op=2, hwsrc=PEER_MACS, psrc=PEER4, hwdst=MACS, pdst=ME4)))
    assert (s.op, s.sha, s.spa, s.tha, s.tpa) == (2, PEER_MAC, bytes([10, 199, 0, 1]), MAC, bytes([10, 199, 0, 2]))
    g = ARP(arp.gratuitous(MAC, bytes([10, 199, 0, 2])))
    assert g.psrc == g.pdst == ME4
    for bad in (bytes(27), bytes(ARP(ptype=0x86DD)), bytes(ARP(op=9))):
        with pytest.raises(FrameError):
            arp.parse(bad)


def test_arp_answer_learn_and_gratuitous(net):
    iface, sent, clock = net
    iface.up()
    g = Ether(sent[0])
    assert g.dst == "ff:ff:ff:ff:ff:ff" and g[ARP].op == 1 and g[ARP].psrc == g[ARP].pdst == ME4
    sent.clear()
    iface.on_frame(peer_frame(ARP(op=1, hwsrc=PEER_MACS, psrc=PEER4, pdst=ME4), dst="ff:ff:ff:ff:ff:ff"))
    r = Ether(sent[0])
    assert r.dst == PEER_MACS and r[ARP].op == 2 and r[ARP].hwsrc == MACS and r[ARP].psrc == ME4
    assert r[ARP].hwdst == PEER_MACS and r[ARP].pdst == PEER4
    e = iface.arp_cache.get(ipaddress.IPv4Address(PEER4))
    assert e.mac == PEER_MAC and e.state == STALE       # learned from a request addressed to us
    # a request for someone else teaches nothing new and is not answered
    sent.clear()
    iface.on_frame(peer_frame(ARP(op=1, hwsrc="02:00:00:00:00:09", psrc="10.199.0.9", pdst="10.199.0.7"),
                              dst="ff:ff:ff:ff:ff:ff"))
    assert not sent and iface.arp_cache.get(ipaddress.IPv4Address("10.199.0.9")) is None
    assert iface.stats["arp_not_for_us"] == 1


def test_arp_resolution_queue_and_reply(net):
    iface, sent, clock = net
    for i in range(12):                 # more than the queue holds
        iface.send_ip(PEER4, 253, bytes([i]) * 10)
    assert len(sent) == 1 and Ether(sent[0])[ARP].pdst == PEER4      # one request, the rest wait
    e = iface.arp_cache.get(ipaddress.IPv4Address(PEER4))
    assert e.state == INCOMPLETE and len(e.queue) == iface.arp_cache.queue_len
    assert iface.stats["drop_arp_queue_full"] == 12 - iface.arp_cache.queue_len
    sent.clear()
    iface.on_frame(peer_frame(ARP(op=2, hwsrc=PEER_MACS, psrc=PEER4, hwdst=MACS, pdst=ME4)))
    assert e.state == REACHABLE and e.mac == PEER_MAC
    pkts = [Ether(f) for f in sent]
    assert [p[IP].proto for p in pkts] == [253] * iface.arp_cache.queue_len
    assert all(p.dst == PEER_MACS for p in pkts)
    assert pkts[0][Raw].load == bytes([12 - iface.arp_cache.queue_len]) * 10   # oldest dropped
    # resolved: straight out now
    sent.clear()
    iface.send_ip(PEER4, 253, b"now")
    assert len(sent) == 1 and Ether(sent[0])[IP].dst == PEER4
    # ageing: reachable -> stale, and a stale entry is used but probed by unicast
    clock.t += iface.arp_cache.reachable_time + 1
    iface.poll()
    assert e.state == STALE
    sent.clear()
    iface.send_ip(PEER4, 253, b"stale")
    kinds = sorted(Ether(f).type for f in sent)
    assert kinds == [0x0800, 0x0806] and Ether([f for f in sent if Ether(f).type == 0x0806][0]).dst == PEER_MACS


def test_arp_retries_then_gives_up(net):
    iface, sent, clock = net
    iface.send_ip("10.199.0.77", 253, b"x")
    for _ in range(10):
        clock.t += iface.arp_cache.retrans_time + 0.01
        iface.poll()
    reqs = [Ether(f) for f in sent if Ether(f).type == 0x0806]
    assert len(reqs) == iface.arp_cache.max_retries
    assert iface.arp_cache.get(ipaddress.IPv4Address("10.199.0.77")) is None
    assert iface.stats["drop_arp_unresolved"] == 1 and iface.stats["arp_resolution_failed"] == 1


def test_no_route_counted(net):
    iface, sent, clock = net
    assert iface.send_ip("192.0.2.1", 6, b"x") is False
    assert iface.send_ip("2001:db8::1", 6, b"x") is False
    assert iface.stats["drop_no_route"] == 2 and not sent


def test_default_gateway():
    sent = []
    iface = Interface(MAC, ipv4=(ME4, 24), send_frame=sent.append, clock=lambda: 0.0, gateway4=PEER4)
    iface.send_ip("192.0.2.1", 253, b"x")
    assert Ether(sent[0])[ARP].pdst == PEER4


# -- IPv4 and ICMP -------------------------------------------------------------------------------

def test_ipv4_build_parsed_by_scapy():
    raw = ipv4.build(bytes([10, 199, 0, 2]), bytes([10, 199, 0, 1]), 17, b"payload", ident=0x1234, ttl=33)
    p = IP(raw)
    assert p.src == ME4 and p.dst == PEER4 and p.proto == 17 and p.id == 0x1234 and p.ttl == 33
    assert p.flags == "DF" and p.len == 27 and bytes(p.payload) == b"payload"
    assert scapy_checksums_ok(p)


def test_ipv4_parse_scapy():
    h, payload = ipv4.parse(bytes(IP(src=PEER4, dst=ME4, id=77, ttl=9, tos=0x10, proto=6) / b"abc") + b"padding")
    assert (h.src, h.dst, h.ident, h.ttl, h.tos, h.proto, h.df) == (
        bytes([10, 199, 0, 1]), bytes([10, 199, 0, 2]), 77, 9, 0x10, 6, False)
    assert payload == b"abc"                    # padding cut off by the total length


def test_icmp_roundtrip_with_scapy():
    raw = icmp.echo_request(0x4321, 7, b"ping!")
    p = ICMP(raw)
    assert p.type == 8 and p.id == 0x4321 and p.seq == 7 and bytes(p.payload) == b"ping!"
    assert scapy_checksums_ok(IP(src=ME4, dst=PEER4) / p)
    m = icmp.parse(bytes(ICMP(type=0, id=5, seq=6) / b"odd"))      # odd length checksum
    assert (m.type, m.ident, m.seq, m.payload) == (0, 5, 6, b"odd")
    bad = bytearray(raw)
    bad[-1] ^= 1
    with pytest.raises(FrameError):
        icmp.parse(bytes(bad))


def test_ipv4_identification_and_df(net):
    iface, sent, clock = net
    iface.on_frame(peer_frame(ARP(op=2, hwsrc=PEER_MACS, psrc=PEER4, hwdst=MACS, pdst=ME4)))
    iface.arp_cache.learn(ipaddress.IPv4Address(PEER4), PEER_MAC, clock(), confirmed=True)
    for _ in range(3):
        iface.send_ip(PEER4, 253, b"x")
    ids = [Ether(f)[IP].id for f in sent]
    assert all(Ether(f)[IP].flags == "DF" for f in sent)
    assert ids[1] == (ids[0] + 1) % 0x8000 and ids[2] == (ids[1] + 1) % 0x8000
    assert all(i < 0x8000 for i in ids)             # the upper half belongs to the NIC's offload


def test_echo_request_answered(net):
    iface, sent, clock = net
    req = peer_frame(IP(src=PEER4, dst=ME4) / ICMP(type=8, id=99, seq=3) / b"0123456789")
    iface.on_frame(req)
    # the reply waited for ARP (we learn nothing from ICMP); the peer answers
    assert Ether(sent[-1])[ARP].pdst == PEER4
    iface.on_frame(peer_frame(ARP(op=2, hwsrc=PEER_MACS, psrc=PEER4, hwdst=MACS, pdst=ME4)))
    p = Ether(sent[-1])
    assert p.dst == PEER_MACS and p[IP].src == ME4 and p[IP].dst == PEER4 and p[IP].flags == "DF"
    assert p[ICMP].type == 0 and p[ICMP].id == 99 and p[ICMP].seq == 3 and p[Raw].load == b"0123456789"
    assert scapy_checksums_ok(p)
    assert iface.stats["icmp_echo_requests_in"] == 1 and iface.stats["icmp_echo_replies_out"] == 1


def test_our_ping_and_rtt(net):
    iface, sent, clock = net
    iface.arp_cache.learn(ipaddress.IPv4Address(PEER4), PEER_MAC, clock(), confirmed=True)
    seq = iface.ping(PEER4, b"hello")
    p = Ether(sent[-1])
    assert p[ICMP].type == 8 and p[ICMP].seq == seq and scapy_checksums_ok(p)
    clock.t += 0.25
    iface.on_frame(peer_frame(IP(src=PEER4, dst=ME4) / ICMP(type=0, id=p[ICMP].id, seq=seq) / b"hello"))
    r = iface.ping_reply(PEER4, seq)
    assert r is not None and r.rtt == pytest.approx(0.25) and r.payload == b"hello"
    # a reply nobody asked for is counted, not matched
    iface.on_frame(peer_frame(IP(src=PEER4, dst=ME4) / ICMP(type=0, id=p[ICMP].id, seq=seq + 5)))
    assert iface.stats["icmp_unmatched_replies"] == 1 and len(iface.pings.replies) == 1


def test_register_protocol(net):
    iface, sent, clock = net
    got = []
    iface.register_protocol(6, lambda s, d, p: got.append((s, d, p)))
    iface.register_protocol(17, lambda s, d, p: 1 / 0)
    iface.on_frame(peer_frame(IP(src=PEER4, dst=ME4, proto=6) / b"segment"))
    iface.on_frame(peer_frame(IPv6(src=PEER6, dst=ME6, nh=6) / b"segment6"))
    iface.on_frame(peer_frame(IP(src=PEER4, dst=ME4, proto=17) / b"boom"))
    iface.on_frame(peer_frame(IP(src=PEER4, dst=ME4, proto=132) / b"sctp"))
    assert got == [(ipaddress.ip_address(PEER4), ipaddress.ip_address(ME4), b"segment"),
                   (ipaddress.ip_address(PEER6), ipaddress.ip_address(ME6), b"segment6")]
    assert iface.stats["handler_errors"] == 1 and iface.stats["drop_ipv4_unknown_protocol"] == 1


# -- IPv6, ND, ICMPv6 ----------------------------------------------------------------------------

def test_ipv6_addresses_match_scapy():
    ll = ipv6.link_local_from_mac(MAC)
    assert str(ll) == "fe80::ff:fec4:1e02"
    a = ipaddress.IPv6Address(PEER6)
    assert ipv6.solicited_node(a).packed == in6_getnsma(a.packed) and str(ipv6.solicited_node(a)) == "ff02::1:ff00:1"
    assert ether.mac_str(ipv6.multicast_mac(ipv6.solicited_node(a))) == in6_getnsmac(ipv6.solicited_node(a).packed)


def test_ipv6_and_icmpv6_echo_with_scapy():
    src, dst = ipaddress.IPv6Address(ME6).packed, ipaddress.IPv6Address(PEER6).packed
    raw = ipv6.build(src, dst, ipv6.NH_ICMPV6, icmpv6.echo(src, dst, icmpv6.ECHO_REQUEST, 1, 2, b"abc"),
                     hop_limit=17, traffic_class=0x20, flow_label=0x12345)
    p = IPv6(raw)
    assert p.src == ME6 and p.dst == PEER6 and p.hlim == 17 and p.tc == 0x20 and p.fl == 0x12345
    assert ICMPv6EchoRequest in p and p.id == 1 and p.seq == 2 and p.data == b"abc"
    assert scapy_checksums_ok(p)
    theirs = bytes(IPv6(src=PEER6, dst=ME6) / ICMPv6EchoReply(id=5, seq=6, data=b"xyz"))
    h, payload = ipv6.parse(theirs)
    m = icmpv6.parse(h.src, h.dst, payload)
    assert m.type == icmpv6.ECHO_REPLY and icmpv6.parse_echo(m) == (5, 6, b"xyz")
    with pytest.raises(FrameError) as e:
        icmpv6.parse(ipaddress.IPv6Address("fd00:c41e::3").packed, h.dst, payload)   # wrong pseudo-header
    assert e.value.reason == "icmpv6_bad_checksum"


def test_nd_messages_with_scapy():
    me, peer = ipaddress.IPv6Address(ME6), ipaddress.IPv6Address(PEER6)
    sn = ipv6.solicited_node(peer)
    ns = nd.solicit(me.packed, sn.packed, peer.packed, MAC)
    p = IPv6(ipv6.build(me.packed, sn.packed, ipv6.NH_ICMPV6, ns, hop_limit=255))
    assert ICMPv6ND_NS in p and p[ICMPv6ND_NS].tgt == PEER6 and p[ICMPv6NDOptSrcLLAddr].lladdr == MACS
    assert scapy_checksums_ok(p)
    na = nd.advertise(me.packed, peer.packed, me.packed, MAC, solicited=True)
    p = IPv6(ipv6.build(me.packed, peer.packed, ipv6.NH_ICMPV6, na, hop_limit=255))
    assert p[ICMPv6ND_NA].S == 1 and p[ICMPv6ND_NA].O == 1 and p[ICMPv6ND_NA].R == 0
    assert p[ICMPv6ND_NA].tgt == ME6 and p[ICMPv6NDOptDstLLAddr].lladdr == MACS and scapy_checksums_ok(p)
    theirs = bytes(IPv6(src=PEER6, dst=ME6, hlim=255) / ICMPv6ND_NA(tgt=PEER6, S=1, O=0) /
                   ICMPv6NDOptDstLLAddr(lladdr=PEER_MACS))
    h, payload = ipv6.parse(theirs)
    m = nd.parse(icmpv6.parse(h.src, h.dst, payload), h.hop_limit)
    assert m.target == peer.packed and m.solicited and not m.override and m.target_ll == PEER_MAC
    h, payload = ipv6.parse(bytes(IPv6(src=PEER6, dst=ME6, hlim=64) / ICMPv6ND_NA(tgt=PEER6)))
    with pytest.raises(FrameError):             # hop limit must be 255
        nd.parse(icmpv6.parse(h.src, h.dst, payload), h.hop_limit)


def test_ns_answered_and_neighbour_learned(net):
    iface, sent, clock = net
    me = ipaddress.IPv6Address(ME6)
    sn = str(ipv6.solicited_node(me))
    ns = Ether(src=PEER_MACS, dst=in6_getnsmac(ipv6.solicited_node(me).packed)) / \
        IPv6(src=PEER6, dst=sn, hlim=255) / ICMPv6ND_NS(tgt=ME6) / ICMPv6NDOptSrcLLAddr(lladdr=PEER_MACS)
    iface.on_frame(bytes(ns))
    p = Ether(sent[-1])
    assert p.dst == PEER_MACS and p[IPv6].src == ME6 and p[IPv6].dst == PEER6 and p[IPv6].hlim == 255
    assert p[ICMPv6ND_NA].tgt == ME6 and p[ICMPv6ND_NA].S == 1 and p[ICMPv6NDOptDstLLAddr].lladdr == MACS
    assert scapy_checksums_ok(p)
    e = iface.nd_cache.get(ipaddress.IPv6Address(PEER6))
    assert e.mac == PEER_MAC and e.state == STALE
    # the link-local address is answered too
    ll = iface.ll6
    ns = Ether(src=PEER_MACS, dst=in6_getnsmac(ipv6.solicited_node(ll).packed)) / \
        IPv6(src="fe80::1", dst=str(ipv6.solicited_node(ll)), hlim=255) / ICMPv6ND_NS(tgt=str(ll)) / \
        ICMPv6NDOptSrcLLAddr(lladdr=PEER_MACS)
    iface.on_frame(bytes(ns))
    assert Ether(sent[-1])[ICMPv6ND_NA].tgt == str(ll)
    assert iface.stats["nd_na_out"] == 2


def test_ipv6_ping_resolves_with_nd(net):
    iface, sent, clock = net
    seq = iface.ping(PEER6, b"v6")
    p = Ether(sent[-1])
    assert p.dst == "33:33:ff:00:00:01" and p[ICMPv6ND_NS].tgt == PEER6 and p[IPv6].dst == "ff02::1:ff00:1"
    iface.on_frame(bytes(Ether(src=PEER_MACS, dst=MACS) / IPv6(src=PEER6, dst=ME6, hlim=255) /
                         ICMPv6ND_NA(tgt=PEER6, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=PEER_MACS)))
    assert iface.nd_cache.get(ipaddress.IPv6Address(PEER6)).state == REACHABLE
    p = Ether(sent[-1])
    assert p.dst == PEER_MACS and ICMPv6EchoRequest in p and p.seq == seq and scapy_checksums_ok(p)
    clock.t += 0.5
    iface.on_frame(peer_frame(IPv6(src=PEER6, dst=ME6) / ICMPv6EchoReply(id=p.id, seq=seq, data=b"v6")))
    r = iface.ping_reply(PEER6, seq)
    assert r is not None and r.rtt == pytest.approx(0.5)
    # and the peer's echo request is answered
    iface.on_frame(peer_frame(IPv6(src=PEER6, dst=ME6) / ICMPv6EchoRequest(id=9, seq=1, data=b"q")))
    p = Ether(sent[-1])
    assert ICMPv6EchoReply in p and p.id == 9 and p.data == b"q" and scapy_checksums_ok(p)


def test_nd_retries_then_gives_up(net):
    iface, sent, clock = net
    iface.ping("fd00:c41e::99")
    for _ in range(10):
        clock.t += 1.01
        iface.poll()
    assert sum(ICMPv6ND_NS in Ether(f) for f in sent) == iface.nd_cache.max_retries
    assert iface.stats["drop_nd_unresolved"] == 1


# -- fragments -----------------------------------------------------------------------------------

def frags(payload=bytes(range(256)) * 8, ident=0x77, fragsize=400, proto=253):
    pkt = IP(src=PEER4, dst=ME4, id=ident, proto=proto, flags=0) / payload
    return [peer_frame(f) for f in fragment(pkt, fragsize=fragsize)], payload


@pytest.fixture
def sink(net):
    iface, sent, clock = net
    got = []
    iface.register_protocol(253, lambda s, d, p: got.append(p))
    return iface, got, clock


def test_reassembly_in_order(sink):
    iface, got, clock = sink
    fs, payload = frags()
    assert len(fs) > 3
    for f in fs:
        iface.on_frame(f)
    assert got == [payload] and iface.stats["frag_reassembled"] == 1 and not iface.reassembler.partial


def test_reassembly_out_of_order_and_duplicates(sink):
    iface, got, clock = sink
    fs, payload = frags()
    order = fs[::-1] + [fs[0]]
    order.insert(2, fs[-2])                 # an exact duplicate is ignored
    for f in order[:-1]:
        iface.on_frame(f)
    assert got == [payload] and iface.stats["frag_duplicates"] == 1
    iface.on_frame(order[-1])               # a fragment of a datagram already done starts a new one...
    clock.t += 31
    iface.poll()                            # ...that times out
    assert got == [payload] and iface.stats["frag_timeout"] == 1


def test_reassembly_overlap_drops_datagram(sink):
    iface, got, clock = sink
    payload = bytes(range(64))
    a = IP(src=PEER4, dst=ME4, id=5, proto=253, flags="MF", frag=0) / payload[:32]
    b = IP(src=PEER4, dst=ME4, id=5, proto=253, flags=0, frag=2) / payload[16:]   # overlaps a
    iface.on_frame(peer_frame(a))
    iface.on_frame(peer_frame(b))
    assert not got and iface.stats["frag_overlap"] == 1 and not iface.reassembler.partial


def test_reassembly_too_many_and_timeout(sink):
    iface, got, clock = sink
    n = iface.reassembler.max_datagrams
    for ident in range(n + 3):
        fs, _ = frags(ident=ident)
        iface.on_frame(fs[0])
    assert len(iface.reassembler.partial) == n and iface.stats["frag_too_many"] == 3
    clock.t += iface.reassembler.timeout + 1
    iface.poll()
    assert not iface.reassembler.partial and iface.stats["frag_timeout"] == n and not got
    fs, payload = frags(ident=1000)         # room again
    for f in fs:
        iface.on_frame(f)
    assert got == [payload]


def test_reassembly_size_limit_and_bad_lengths():
    stats = {}
    r = ipv4.Reassembler(stats, max_size=1000)
    h = ipv4.Header(src=b"\1" * 4, dst=b"\2" * 4, proto=17, ident=1, mf=True, frag_offset=992)
    assert r.add(h, bytes(16), 0.0) is None and stats["frag_too_big"] == 1
    h = ipv4.Header(src=b"\1" * 4, dst=b"\2" * 4, proto=17, ident=2, mf=True, frag_offset=0)
    assert r.add(h, bytes(13), 0.0) is None and stats["frag_bad_length"] == 1    # not a multiple of 8
    last = ipv4.Header(src=b"\1" * 4, dst=b"\2" * 4, proto=17, ident=3, mf=False, frag_offset=8)
    first = ipv4.Header(src=b"\1" * 4, dst=b"\2" * 4, proto=17, ident=3, mf=True, frag_offset=0)
    assert r.add(last, b"B" * 5, 0.0) is None
    assert r.add(first, b"A" * 8, 0.0) == (first, b"A" * 8 + b"B" * 5)
    # a second "last" fragment that disagrees on the length drops the datagram
    r.add(ipv4.Header(src=b"\1" * 4, dst=b"\2" * 4, proto=17, ident=4, frag_offset=16), b"x", 0.0)
    r.add(ipv4.Header(src=b"\1" * 4, dst=b"\2" * 4, proto=17, ident=4, frag_offset=24), b"y", 0.0)
    assert stats["frag_inconsistent"] == 1 and not r.partial


# -- malformed input ---------------------------------------------------------------------------------

def good_ip():
    return bytearray(bytes(IP(src=PEER4, dst=ME4) / ICMP(type=8, id=1, seq=1) / b"abcdefgh"))


def with_checksum(b):
    b[10:12] = b"\0\0"
    b[10:12] = struct.pack("!H", ipv4.checksum(bytes(b[:(b[0] & 15) * 4])))
    return bytes(b)


def bad_ipv4_cases():
    b = good_ip()
    b[11] ^= 0xFF
    yield "drop_ipv4_bad_checksum", bytes(b)
    yield "drop_ipv4_truncated", bytes(good_ip()[:19])
    b = good_ip()
    b[2:4] = struct.pack("!H", 200)
    yield "drop_ipv4_truncated", with_checksum(b)          # total length beyond the frame
    b = good_ip()
    b[2:4] = struct.pack("!H", 12)
    yield "drop_ipv4_bad_length", with_checksum(b)         # total length inside the header
    b = good_ip()
    b[0] = 0x43
    yield "drop_ipv4_bad_ihl", with_checksum(b)
    b = good_ip()
    b[0] = 0x4F
    yield "drop_ipv4_truncated", with_checksum(b)          # IHL 15: 60 bytes, more than there are
    b = good_ip()
    b[0] = 0x65
    yield "drop_ipv4_bad_version", with_checksum(b)
    # options are accepted (tests/test_ipv4_options.py); a source route with hops left is not
    yield "drop_ipv4_source_route", bytes(IP(src=PEER4, dst=ME4, options=[b"\x83\x07\x04\x0a\x00\x00\x05\x00"]) / ICMP())
    yield "drop_ipv4_not_for_us", bytes(IP(src=PEER4, dst="10.199.0.3") / ICMP())
    b = bytearray(bytes(IP(src=PEER4, dst=ME4) / ICMP(type=8) / b"x"))
    b[-1] ^= 0xFF
    yield "drop_icmp_bad_checksum", bytes(b)
    yield "drop_icmp_truncated", bytes(IP(src=PEER4, dst=ME4, proto=1) / b"abc")


@pytest.mark.parametrize("key,l3", list(bad_ipv4_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_ipv4_counted(net, key, l3):
    iface, sent, clock = net
    iface.on_frame(bytes(Ether(src=PEER_MACS, dst=MACS, type=0x0800)) + l3)
    assert iface.stats[key] == 1, dict(iface.stats)
    assert not sent and iface.stats["frames_in"] == 1 and not iface.stats["drop_internal_error"]


def test_malformed_frames_of_every_kind_counted(net):
    iface, sent, clock = net
    cases = [
        ("drop_truncated", b"\x01\x02"),
        ("drop_not_for_us", bytes(Ether(src=PEER_MACS, dst="02:11:22:33:44:55") / IP(src=PEER4, dst=ME4))),
        ("drop_unknown_ethertype", bytes(Ether(src=PEER_MACS, dst=MACS, type=0x88B5) / b"x")),
        ("drop_vlan_mismatch", bytes(Ether(src=PEER_MACS, dst=MACS) / Dot1Q(vlan=5) / IP(src=PEER4, dst=ME4))),
        ("drop_arp_truncated", bytes(Ether(src=PEER_MACS, dst=MACS, type=0x0806)) + bytes(10)),
        ("drop_arp_unsupported", peer_frame(ARP(ptype=0x86DD, plen=16))),
        ("drop_ipv6_truncated", bytes(Ether(src=PEER_MACS, dst=MACS, type=0x86DD)) + bytes(30)),
        ("drop_ipv6_truncated", peer_frame(IPv6(src=PEER6, dst=ME6, plen=500) / b"x")),
        ("drop_ipv6_not_for_us", peer_frame(IPv6(src=PEER6, dst="fd00:c41e::3") / ICMPv6EchoRequest())),
        ("drop_ipv6_extension_header", peer_frame(IPv6(src=PEER6, dst=ME6, nh=50) / bytes(8))),   # ESP
        ("drop_ipv6_bad_extension", peer_frame(IPv6(src=PEER6, dst=ME6, nh=0) / bytes(8))),  # HBH twice
        ("drop_ipv6_source_route", peer_frame(IPv6(src=PEER6, dst=ME6, nh=43) / bytes.fromhex(
            "3a00000100000000"))),
        ("drop_icmpv6_bad_checksum", peer_frame(IPv6(src=PEER6, dst=ME6) / ICMPv6EchoRequest(cksum=1))),
        ("drop_nd_invalid", peer_frame(IPv6(src=PEER6, dst=ME6, hlim=64) / ICMPv6ND_NS(tgt=ME6))),
        ("drop_nd_bad_option", peer_frame(IPv6(src=PEER6, dst=ME6, hlim=255) / ICMPv6ND_NS(tgt=ME6) / b"\x01\x00")),
        ("drop_looped_back", bytes(Ether(src=MACS, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=ME4))),
    ]
    for key, frame in cases:
        before = iface.stats[key]
        iface.on_frame(frame)
        assert iface.stats[key] == before + 1, (key, dict(iface.stats))
    assert iface.stats["frames_in"] == len(cases) and not sent and not iface.stats["drop_internal_error"]


def test_garbage_never_raises(net):
    """Random bytes, and valid frames truncated and bit-flipped: all counted, no exception."""
    iface, sent, clock = net
    iface.register_protocol(6, lambda s, d, p: None)
    rnd = random.Random(1234)
    seeds = [
        peer_frame(IP(src=PEER4, dst=ME4) / ICMP(type=8) / b"data"),
        peer_frame(ARP(op=1, hwsrc=PEER_MACS, psrc=PEER4, pdst=ME4), dst="ff:ff:ff:ff:ff:ff"),
        peer_frame(IPv6(src=PEER6, dst=ME6) / ICMPv6EchoRequest(data=b"x")),
        peer_frame(IPv6(src=PEER6, dst=ME6, hlim=255) / ICMPv6ND_NS(tgt=ME6) / ICMPv6NDOptSrcLLAddr(lladdr=PEER_MACS)),
        peer_frame(IP(src=PEER4, dst=ME4, flags="MF", proto=6) / bytes(64)),
    ]
    n = 0
    for _ in range(600):
        n += 1
        iface.on_frame(bytes(rnd.randrange(256) for _ in range(rnd.randrange(80))))
    for _ in range(1500):
        f = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randrange(1, 4)):
            i = rnd.randrange(len(f))
            f[i] ^= 1 << rnd.randrange(8)
        if rnd.random() < 0.3:
            f = f[:rnd.randrange(len(f))]
        iface.on_frame(bytes(f))
        n += 1
        if rnd.random() < 0.05:
            clock.t += 5
            iface.poll()
    assert iface.stats["frames_in"] == n
    assert iface.stats["drop_internal_error"] == 0, repr(iface.last_error)
    assert sum(v for k, v in iface.stats.items() if k.startswith("drop_")) > n // 2


def test_bad_ipv4_source_and_broadcast_ping(net):
    iface, sent, clock = net
    iface.on_frame(peer_frame(IP(src="224.0.0.1", dst=ME4) / ICMP(type=8)))
    iface.on_frame(peer_frame(IP(src="10.199.0.255", dst=ME4) / ICMP(type=8)))
    assert iface.stats["drop_ipv4_bad_source"] == 2
    iface.on_frame(peer_frame(IP(src=PEER4, dst="10.199.0.255") / ICMP(type=8), dst="ff:ff:ff:ff:ff:ff"))
    assert iface.stats["icmp_echo_requests_in"] == 1 and iface.stats["icmp_echo_replies_out"] == 0 and not sent


def test_vlan_interface():
    sent = []
    iface = Interface(MAC, ipv4=(ME4, 24), send_frame=sent.append, clock=lambda: 0.0, vlan=42)
    iface.on_frame(bytes(Ether(src=PEER_MACS, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=42) /
                         ARP(op=1, hwsrc=PEER_MACS, psrc=PEER4, pdst=ME4)))
    p = Ether(sent[-1])
    assert p[Dot1Q].vlan == 42 and p[ARP].op == 2
    iface.on_frame(peer_frame(ARP(op=1, hwsrc=PEER_MACS, psrc=PEER4, pdst=ME4)))     # untagged
    assert iface.stats["drop_vlan_mismatch"] == 1 and len(sent) == 1


def test_ping_timeout_and_cache_expiry(net):
    iface, sent, clock = net
    iface.arp_cache.learn(ipaddress.IPv4Address(PEER4), PEER_MAC, clock(), confirmed=True)
    iface.ping(PEER4)
    clock.t += iface.pings.timeout + 1
    iface.poll()
    assert iface.stats["ping_timeouts"] == 1 and not iface.pings.outstanding
    assert iface.arp_cache.get(ipaddress.IPv4Address(PEER4)).state == STALE
    clock.t += iface.arp_cache.stale_time + 1
    iface.poll()
    assert iface.arp_cache.get(ipaddress.IPv4Address(PEER4)) is None


def test_arp_conflict_and_gratuitous_update(net):
    iface, sent, clock = net
    iface.on_frame(peer_frame(ARP(op=1, hwsrc=PEER_MACS, psrc=ME4, pdst=ME4), dst="ff:ff:ff:ff:ff:ff"))
    assert iface.stats["arp_address_conflict"] == 1 and not sent
    iface.arp_cache.learn(ipaddress.IPv4Address(PEER4), PEER_MAC, clock(), confirmed=True)
    iface.on_frame(peer_frame(ARP(op=1, hwsrc="02:00:00:00:00:aa", psrc=PEER4, pdst=PEER4),
                              dst="ff:ff:ff:ff:ff:ff"))        # the peer moved: its gratuitous ARP
    e = iface.arp_cache.get(ipaddress.IPv4Address(PEER4))
    assert e.mac == bytes.fromhex("0200000000aa") and e.state == STALE and not sent


def test_mtu_no_fragmentation(net):
    iface, sent, clock = net
    iface.arp_cache.learn(ipaddress.IPv4Address(PEER4), PEER_MAC, clock(), confirmed=True)
    assert iface.send_ip(PEER4, 253, bytes(1480)) is True
    assert len(Ether(sent[-1])) == 1514
    assert iface.send_ip(PEER4, 253, bytes(1481)) is False
    assert iface.send_ip(PEER6, 253, bytes(1461)) is False
    assert iface.stats["drop_mtu_exceeded"] == 2 and len(sent) == 1
