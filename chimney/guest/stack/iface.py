"""One Ethernet interface of the host stack: Ethernet, ARP, IPv4 with
reassembly, ICMPv4 echo, IPv6 with neighbour discovery and ICMPv6 echo.

No threads and no clock of its own: every entry point takes `now` (default:
the injected `clock()`), and `poll(now)` runs the timers.  Frames leave
through the `send_frame(bytes)` callable.  Whatever arrives, `on_frame`
counts it and never raises: malformed input is a `drop_<reason>` counter.
Upper protocols (TCP, later) register with `register_protocol(number,
handler)` and get `handler(src, dst, payload)` for IPv4 and IPv6 alike, with
`ipaddress` addresses.
"""
from __future__ import annotations

import ipaddress
import random
import time
from collections import Counter

from . import arp, ether, icmp, icmpv6, nd
from . import ipv4 as v4, ipv6 as v6
from .ether import FrameError
from .neigh import REACHABLE, NeighbourCache

IPv4Address, IPv6Address = ipaddress.IPv4Address, ipaddress.IPv6Address
LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/64")
BROADCAST4 = IPv4Address("255.255.255.255")
_IP4 = v4._HDR
_ETYPE = {t: t.to_bytes(2, "big") for t in (ether.ETH_P_IP, ether.ETH_P_ARP, ether.ETH_P_IPV6)}
_CACHE_MAX = 256
IDENT_SPACE = 0x8000      # IPv4 identification: the lower half is ours, the NIC's offload uses the upper


def _addr(a):
    return a if isinstance(a, (IPv4Address, IPv6Address)) else ipaddress.ip_address(a)


class Interface:
    def __init__(self, mac, ipv4=None, ipv6=(), send_frame=None, clock=time.monotonic, *,
                 gateway4=None, gateway6=None, vlan: int | None = None, ttl: int = 64,
                 hop_limit: int = 64, mtu: int = 1500, neigh_options: dict | None = None,
                 reassembly_options: dict | None = None):
        """mac: 6 bytes or 'aa:bb:..'; ipv4: (address, prefix length) or None;
        ipv6: global addresses as (address, prefix length) pairs (the link-local
        one is derived from the MAC); send_frame(bytes) puts a frame on the wire."""
        self.mac = ether.mac_bytes(mac)
        self.send_frame = send_frame
        self.clock = clock
        self.vlan = vlan
        self.ttl = ttl
        self.hop_limit = hop_limit
        self.mtu = mtu          # we set DF and never fragment: a bigger packet is dropped
        self.stats: Counter = Counter()
        self.last_error: BaseException | None = None
        if ipv4 is not None:
            addr, plen = ipv4
            self.ip4 = IPv4Address(addr)
            self.net4 = ipaddress.IPv4Network(f"{self.ip4}/{plen}", strict=False)
        else:
            self.ip4 = self.net4 = None
        self.gateway4 = None if gateway4 is None else IPv4Address(gateway4)
        self.ll6 = v6.link_local_from_mac(self.mac)
        self.addrs6 = [self.ll6]
        self.nets6 = [LINK_LOCAL6]
        for a in ipv6:
            if isinstance(a, (tuple, list)):
                a, plen = a
            else:
                plen = 64
            a6 = IPv6Address(a)
            self.addrs6.append(a6)
            self.nets6.append(ipaddress.IPv6Network(f"{a6}/{plen}", strict=False))
        self.gateway6 = None if gateway6 is None else IPv6Address(gateway6)
        self.groups6 = {v6.ALL_NODES} | {v6.solicited_node(a) for a in self.addrs6}
        self.group_macs = {v6.multicast_mac(g) for g in self.groups6}
        no = neigh_options or {}
        self.arp_cache = NeighbourCache(self.stats, "arp", **no)
        self.nd_cache = NeighbourCache(self.stats, "nd", **no)
        self.reassembler = v4.Reassembler(self.stats, **(reassembly_options or {}))
        self.reassembler6 = v6.Reassembler6(self.stats, **(reassembly_options or {}))
        self._icmp_errors = icmp.ErrorLimiter()
        self.protocols: dict = {}
        self._ident = random.randrange(IDENT_SPACE)
        self.pings = icmp.PingBook(ident=random.randrange(1, 0x10000))
        self.is_up = False
        # the receive fast path (_fast_in): sources the slow path has vetted once
        self._src4: dict = {}
        self._src6: dict = {}
        self._ours6 = {a.packed: a for a in self.addrs6}
        self._ip4_packed = self.ip4.packed if self.ip4 is not None else None
        self._hop4: dict = {}           # destination -> next hop
        self._hop6: dict = {}
        self._bcast4: dict = {}         # destination -> is it a broadcast address
        self._routes4: dict = {}        # id(destination) -> (destination, next hop, packed): unicast IPv4
        # hooks for the offload manager (None: nobody listens)
        self.on_pmtu = None             # on_pmtu(version, mtu, quoted packet): an ICMP too-big
        self.on_route = None            # on_route(version): the next hops of that family changed

    # -- plumbing ----------------------------------------------------------------------
    def _now(self, now):
        return self.clock() if now is None else now

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n

    def _tx(self, dst_mac: bytes, ethertype: int, payload: bytes) -> None:
        if self.vlan is None and type(dst_mac) is bytes and len(dst_mac) == 6 and ethertype in _ETYPE:
            frame = dst_mac + self.mac + _ETYPE[ethertype] + payload
            if len(frame) < ether.MIN_FRAME:
                frame += bytes(ether.MIN_FRAME - len(frame))
        else:
            frame = ether.build(dst_mac, self.mac, ethertype, payload, vlan=self.vlan)
        try:
            self.send_frame(frame)
        except Exception as e:          # a full ring or a gone device: count it, the caller carries on
            self.last_error = e
            self._count("tx_errors")
            return
        self._count("frames_out")
        self._count("bytes_out", len(frame))

    def register_protocol(self, proto: int, handler) -> None:
        """handler(src, dst, payload) for IPv4 protocol / IPv6 next header `proto`."""
        self.protocols[proto] = handler

    def up(self, now=None) -> None:
        """Interface up: announce our IPv4 address with a gratuitous ARP and our
        IPv6 addresses with unsolicited NAs (no DAD: the addresses are configured)."""
        self.is_up = True
        if self.ip4 is not None:
            self._tx(ether.BROADCAST, ether.ETH_P_ARP, arp.gratuitous(self.mac, self.ip4.packed))
            self._count("arp_gratuitous_out")
        for a in self.addrs6:
            pkt = nd.advertise(a.packed, v6.ALL_NODES.packed, a.packed, self.mac, solicited=False)
            self._tx(v6.multicast_mac(v6.ALL_NODES), ether.ETH_P_IPV6,
                     v6.build(a.packed, v6.ALL_NODES.packed, v6.NH_ICMPV6, pkt, hop_limit=255))
            self._count("nd_na_out")

    # -- receive ------------------------------------------------------------------------
    def on_frame(self, frame: bytes, now=None) -> None:
        """One frame from the wire.  Never raises."""
        try:
            st = self.stats
            st["frames_in"] += 1
            st["bytes_in"] += len(frame)
            if type(frame) is not bytes:
                frame = bytes(frame)
            if self._fast_in(frame):
                return
            now = self._now(now)
            self._on_frame(frame, now)
        except FrameError as e:
            self._count("drop_" + e.reason)
        except Exception as e:          # a bug must not take the receive loop down
            self.last_error = e
            self._count("drop_internal_error")

    def _fast_in(self, frame) -> bool:
        """The common case in one go: an untagged, unfragmented IPv4 (no options)
        or IPv6 (no extension headers) packet from a vetted unicast source to our
        own unicast address, for a registered upper protocol.  It takes exactly
        the slow path's steps and counts; anything else (or anything odd) is left
        to the slow path (False)."""
        if self.vlan is not None or len(frame) < 54 or frame[:6] != self.mac or frame[6:12] == self.mac:
            return False
        et = frame[12:14]
        if et == b"\x08\x00":
            if frame[14] != 0x45 or frame[30:34] != self._ip4_packed or frame[20] & 0xBF or frame[21]:
                return False
            total = (frame[16] << 8) | frame[17]
            proto = frame[23]
            if total < 20 or 14 + total > len(frame) or proto == 1:
                return False
            src = self._src4.get(frame[26:30])
            handler = self.protocols.get(proto)
            if src is None or handler is None or int.from_bytes(frame[14:34], "big") % 0xFFFF:
                return False        # an unknown source, protocol or a bad checksum: the slow path says why
            st = self.stats
            st["ipv4_in"] += 1
            st["ipv4_delivered"] += 1
            dst = self.ip4
            payload = frame[34:14 + total]
        elif et == b"\x86\xdd":
            nh = frame[20]
            if frame[14] >> 4 != 6 or nh == 58:
                return False
            plen = (frame[18] << 8) | frame[19]
            dst = self._ours6.get(frame[38:54])
            src = self._src6.get(frame[22:38])
            handler = self.protocols.get(nh)
            if dst is None or src is None or handler is None or 54 + plen > len(frame):
                return False
            st = self.stats
            st["ipv6_in"] += 1
            st["ipv6_delivered"] += 1
            payload = frame[54:54 + plen]
        else:
            return False
        try:
            handler(src, dst, bytes(payload))
        except Exception as e:
            self.last_error = e
            self._count("handler_errors")
        return True

    def _on_frame(self, frame: bytes, now: float) -> None:
        f = ether.parse(frame)
        if f.vid != (None if self.vlan is None else self.vlan & 0xFFF):
            raise FrameError("vlan_mismatch")
        if f.dst != self.mac and f.dst != ether.BROADCAST and f.dst not in self.group_macs:
            raise FrameError("not_for_us", "destination MAC")
        if f.src == self.mac:
            raise FrameError("looped_back")
        if f.ethertype == ether.ETH_P_ARP:
            self._on_arp(f, now)
        elif f.ethertype == ether.ETH_P_IP:
            self._on_ipv4(f, now)
        elif f.ethertype == ether.ETH_P_IPV6:
            self._on_ipv6(f, now)
        else:
            raise FrameError("unknown_ethertype", f"{f.ethertype:#06x}")

    def _flush(self, cache_name: str, mac: bytes, waiting: list) -> None:
        for ethertype, pkt in waiting:
            self._tx(mac, ethertype, pkt)
            self._count(f"{cache_name}_dequeued")

    # ARP
    def _on_arp(self, f, now: float) -> None:
        p = arp.parse(f.payload)
        self._count("arp_in")
        if self.ip4 is None:
            raise FrameError("not_for_us", "ARP without IPv4")
        sender = IPv4Address(p.spa)
        if ether.is_multicast(p.sha) or p.sha == bytes(6):
            raise FrameError("arp_bad_sender", ether.mac_str(p.sha))
        if sender == self.ip4:
            if p.sha != self.mac:
                self._count("arp_address_conflict")
            return
        for_us = IPv4Address(p.tpa) == self.ip4
        if not sender.is_unspecified:
            # RFC 826: update an entry we have; add one only when the packet is for us.
            confirmed = p.op == arp.REPLY and for_us
            waiting = self.arp_cache.learn(sender, p.sha, now, confirmed=confirmed, create=for_us)
            self._flush("arp", p.sha, waiting)
        if not for_us:
            self._count("arp_not_for_us")
            return
        if p.op == arp.REQUEST:
            self._count("arp_requests_in")
            self._tx(p.sha, ether.ETH_P_ARP, arp.reply(self.mac, self.ip4.packed, p.sha, p.spa))
            self._count("arp_replies_out")
        else:
            self._count("arp_replies_in")

    # IPv4
    def _is_ours4(self, a: IPv4Address) -> bool:
        return a == self.ip4 or a == self.net4.broadcast_address or a == BROADCAST4

    def _on_ipv4(self, f, now: float) -> None:
        h, payload = v4.parse(f.payload)
        self._count("ipv4_in")
        if self.ip4 is None or not self._is_ours4(IPv4Address(h.dst)):
            raise FrameError("ipv4_not_for_us")
        src = IPv4Address(h.src)
        if src.is_multicast or self._is_ours4(src) and src != self.ip4:
            raise FrameError("ipv4_bad_source", str(src))      # a broadcast or multicast source
        if h.options:
            self._check_options4(h, f, payload, now)
        if h.is_fragment:
            done = self.reassembler.add(h, payload, now)
            if done is None:
                return
            h, payload = done
        src, dst = IPv4Address(h.src), IPv4Address(h.dst)
        if dst == self.ip4 and h.proto in self.protocols and len(self._src4) < _CACHE_MAX:
            self._src4[h.src] = src         # a unicast source, vetted: the fast path may take it
        if h.proto == v4.PROTO_ICMP:
            self._on_icmp(src, dst, payload, now)
        else:
            self._deliver(h.proto, src, dst, payload, "ipv4")

    def _check_options4(self, h, f, payload: bytes, now: float) -> None:
        """Options are checked, then ignored (ipv4.check_options).  A malformed one drops
        the datagram and is answered with a Parameter Problem pointing at it (RFC 1122
        §3.2.2.5), except where §3.2.2 forbids an ICMP error: a broadcast, a non-initial
        fragment, an ICMP error itself, a source that is no single host."""
        self._count("ipv4_options_in")
        try:
            v4.check_options(h.options)
        except v4.OptionError as e:
            src = IPv4Address(h.src)
            if (h.dst == self.ip4.packed and f.dst == self.mac and h.frag_offset == 0
                    and not src.is_unspecified and not src.is_loopback
                    and not (h.proto == v4.PROTO_ICMP and payload[:1]
                             and payload[0] in icmp.ERROR_TYPES)
                    and self._icmp_errors.allow(now)):
                ihl = v4.HEADER_LEN + len(h.options)
                quote = f.payload[:min(h.total_length, ihl + 8)]
                self.send_ip(src, v4.PROTO_ICMP, icmp.parameter_problem(e.pointer, quote), now=now)
                self._count("icmp_parameter_problems_out")
            raise

    def _deliver(self, proto: int, src, dst, payload: bytes, fam: str) -> None:
        handler = self.protocols.get(proto)
        if handler is None:
            raise FrameError(f"{fam}_unknown_protocol", str(proto))
        self._count(f"{fam}_delivered")
        try:
            handler(src, dst, payload)
        except Exception as e:
            self.last_error = e
            self._count("handler_errors")

    def _on_icmp(self, src, dst, payload: bytes, now: float) -> None:
        m = icmp.parse(payload)
        self._count("icmp_in")
        if m.type == icmp.ECHO_REQUEST and m.code == 0:
            self._count("icmp_echo_requests_in")
            if dst != self.ip4:
                return          # no replies to broadcast pings
            self.send_ip(src, v4.PROTO_ICMP, icmp.echo_reply(m.ident, m.seq, m.payload), now=now)
            self._count("icmp_echo_replies_out")
        elif m.type == icmp.ECHO_REPLY:
            self._count("icmp_echo_replies_in")
            if self.pings.answer(src, m.ident, m.seq, m.payload, now) is None:
                self._count("icmp_unmatched_replies")
        elif (fn := icmp.frag_needed(m)) is not None:
            self._count("icmp_frag_needed_in")
            if self.on_pmtu is not None:
                self.on_pmtu(4, fn[0], fn[1])
        else:
            self._count(f"icmp_type_{m.type}_in")

    # IPv6
    def _on_ipv6(self, f, now: float) -> None:
        h, payload = v6.parse(f.payload)
        self._count("ipv6_in")
        dst = IPv6Address(h.dst)
        if dst not in self.addrs6 and dst not in self.groups6:
            raise FrameError("ipv6_not_for_us")
        src = IPv6Address(h.src)
        if src.is_multicast:
            raise FrameError("ipv6_bad_source")
        nh = h.next_header
        if nh in v6.EXTENSION_HEADERS:
            done = self._extension_headers6(h, payload, now)
            if done is None:
                return              # a fragment of a datagram not complete yet
            nh, payload = done
        if nh == v6.NH_ICMPV6:
            self._on_icmpv6(h, src, dst, payload, now)
        else:
            if dst.is_multicast:
                raise FrameError("ipv6_not_for_us", "multicast to an upper protocol")
            if nh == h.next_header and nh in self.protocols and len(self._src6) < _CACHE_MAX:
                self._src6[h.src] = src
            self._deliver(nh, src, dst, payload, "ipv6")

    def _extension_headers6(self, h, payload: bytes, now: float):
        """Walk the extension headers (RFC 8200 §4.1 order: hop-by-hop only first, one
        fragment header); (upper-layer protocol, its bytes), or None while a fragmented
        datagram is incomplete.  Raises FrameError for what a host drops."""
        nh, first, fragmented = h.next_header, True, False
        self._count("ipv6_extension_headers_in")
        while nh in v6.EXTENSION_HEADERS:
            if nh == v6.NH_HOPOPT and not first:
                raise FrameError("ipv6_bad_extension", "hop-by-hop options not first")
            if nh in (v6.NH_HOPOPT, v6.NH_DSTOPTS):
                nh, payload = v6.skip_options(payload)
            elif nh == v6.NH_ROUTING:
                nh, payload = v6.skip_routing(payload)
            elif nh == v6.NH_FRAGMENT and not fragmented:
                frag, data = v6.parse_fragment(h, payload)
                fragmented = True
                if frag.atomic:
                    nh, payload = frag.next_header, data
                else:
                    done = self.reassembler6.add(frag, data, now)
                    if done is None:
                        return None
                    nh, payload = done[0].next_header, done[1]
            else:
                raise FrameError("ipv6_extension_header", str(nh))
            first = False
        return nh, payload

    def _on_icmpv6(self, h, src, dst, payload: bytes, now: float) -> None:
        m = icmpv6.parse(h.src, h.dst, payload)
        self._count("icmpv6_in")
        if m.type in (icmpv6.NEIGHBOR_SOLICIT, icmpv6.NEIGHBOR_ADVERT):
            self._on_nd(src, dst, nd.parse(m, h.hop_limit), now)
        elif m.type == icmpv6.ECHO_REQUEST and m.code == 0:
            ident, seq, data = icmpv6.parse_echo(m)
            self._count("icmpv6_echo_requests_in")
            if dst.is_multicast:
                return
            self.send_ip(src, v6.NH_ICMPV6,
                         icmpv6.echo(dst.packed, src.packed, icmpv6.ECHO_REPLY, ident, seq, data),
                         src=dst, now=now)
            self._count("icmpv6_echo_replies_out")
        elif m.type == icmpv6.ECHO_REPLY:
            ident, seq, data = icmpv6.parse_echo(m)
            self._count("icmpv6_echo_replies_in")
            if self.pings.answer(src, ident, seq, data, now) is None:
                self._count("icmpv6_unmatched_replies")
        elif (ptb := icmpv6.packet_too_big(m)) is not None:
            self._count("icmpv6_packet_too_big_in")
            if self.on_pmtu is not None:
                self.on_pmtu(6, ptb[0], ptb[1])
        else:
            self._count(f"icmpv6_type_{m.type}_in")

    def _on_nd(self, src, dst, m, now: float) -> None:
        target = IPv6Address(m.target)
        if m.type == icmpv6.NEIGHBOR_SOLICIT:
            self._count("nd_ns_in")
            if src.is_unspecified and (m.source_ll or not dst.is_multicast):
                raise FrameError("nd_invalid", "DAD NS with a source LL option or unicast")
            if m.source_ll and not src.is_unspecified:
                waiting = self.nd_cache.learn(src, m.source_ll, now, confirmed=False)
                self._flush("nd", m.source_ll, waiting)
            if target not in self.addrs6:
                self._count("nd_not_for_us")
                return
            if src.is_unspecified:      # someone's DAD for our address: defend it to all nodes
                to, to_mac, solicited = v6.ALL_NODES, v6.multicast_mac(v6.ALL_NODES), False
            else:
                to, solicited = src, True
                to_mac = m.source_ll or self.nd_cache.lookup(src, now)[0]
                if to_mac is None:
                    raise FrameError("nd_no_source_ll", "unicast NS from an unknown neighbour")
            na = nd.advertise(target.packed, to.packed, target.packed, self.mac, solicited=solicited)
            self._tx(to_mac, ether.ETH_P_IPV6,
                     v6.build(target.packed, to.packed, v6.NH_ICMPV6, na, hop_limit=255))
            self._count("nd_na_out")
        else:
            self._count("nd_na_in")
            if m.solicited and dst.is_multicast:
                raise FrameError("nd_invalid", "solicited NA to multicast")
            if target in self.addrs6:
                self._count("nd_address_conflict")
                return
            e = self.nd_cache.get(target)
            if e is None:
                self._count("nd_na_unsolicited_ignored")
                return
            if m.target_ll is None and e.mac is None:
                return
            if e.mac is not None and e.mac != m.target_ll and not m.override:
                return          # RFC 4861 7.2.5: do not override a known MAC without O
            mac = m.target_ll or e.mac
            waiting = self.nd_cache.learn(target, mac, now, confirmed=m.solicited)
            self._flush("nd", mac, waiting)

    # -- routes -------------------------------------------------------------------------
    def set_gateway(self, version: int, gateway=None) -> None:
        """The default gateway of a family (None: no route off the link).  The next
        hops learnt for destinations are forgotten, and on_route hears of it."""
        if version == 4:
            self.gateway4 = None if gateway is None else IPv4Address(gateway)
            self._hop4.clear()
            self._routes4.clear()
        elif version == 6:
            self.gateway6 = None if gateway is None else IPv6Address(gateway)
            self._hop6.clear()
        else:
            raise ValueError(f"IP version {version!r}: 4 or 6")
        if self.on_route is not None:
            self.on_route(version)

    def next_hop(self, dst):
        """The neighbour a packet to dst goes to (None: no route)."""
        dst = _addr(dst)
        if dst.version == 4:
            return None if self.ip4 is None else self._next_hop4(dst)
        return self._next_hop6(dst)

    # -- send ---------------------------------------------------------------------------
    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) % IDENT_SPACE
        return self._ident

    def _next_hop4(self, dst: IPv4Address):
        hop = self._hop4.get(dst)
        if hop is None:
            hop = dst if dst in self.net4 else self.gateway4
            if hop is not None and len(self._hop4) < _CACHE_MAX:
                self._hop4[dst] = hop
        return hop

    def _next_hop6(self, dst: IPv6Address):
        hop = self._hop6.get(dst)
        if hop is None:
            hop = dst if any(dst in n for n in self.nets6) else self.gateway6
            if hop is not None and len(self._hop6) < _CACHE_MAX:
                self._hop6[dst] = hop
        return hop

    def _source6(self, dst: IPv6Address) -> IPv6Address:
        if dst.is_link_local or dst.is_multicast:
            return self.ll6
        for a, n in zip(self.addrs6[1:], self.nets6[1:], strict=True):
            if dst in n:
                return a
        return self.addrs6[1] if len(self.addrs6) > 1 else self.ll6

    def send_ip(self, dst, proto: int, payload: bytes, *, src=None, now=None, ttl: int | None = None) -> bool:
        """Send payload to dst (IPv4 or IPv6) as protocol `proto`.  Resolves the
        next hop with ARP/ND, queueing the packet meanwhile.  False when there is
        no route or the packet exceeds the MTU (counted); True when sent or queued."""
        now = self.clock() if now is None else now
        r = self._routes4.get(id(dst))
        if r is not None and r[0] is dst and src is None and ttl is None and self.vlan is None \
                and len(payload) + v4.HEADER_LEN <= self.mtu:
            # a unicast IPv4 destination seen before: the steps below in one go
            # while its neighbour entry is REACHABLE (what resolve() would use)
            e = self.arp_cache.entries.get(r[1])
            if e is not None and e.state == REACHABLE and now - e.updated <= self.arp_cache.reachable_time:
                ident = self._ident = (self._ident + 1) % IDENT_SPACE
                total = v4.HEADER_LEN + len(payload)
                hdr = _IP4.pack(0x45, 0, total, ident, v4.FLAG_DF, self.ttl, proto, 0, self._ip4_packed, r[2])
                t = int.from_bytes(hdr, "big") % 0xFFFF
                frame = e.mac + self.mac + b"\x08\x00" + _IP4.pack(
                    0x45, 0, total, ident, v4.FLAG_DF, self.ttl, proto, 0xFFFF - t if t else 0,
                    self._ip4_packed, r[2]) + payload
                if len(frame) < ether.MIN_FRAME:
                    frame += bytes(ether.MIN_FRAME - len(frame))
                st = self.stats
                st["ipv4_out"] += 1
                try:
                    self.send_frame(frame)
                except Exception as ex:     # as _tx: counted, the caller carries on
                    self.last_error = ex
                    st["tx_errors"] += 1
                    return True
                st["frames_out"] += 1
                st["bytes_out"] += len(frame)
                return True
        dst = _addr(dst)
        if len(payload) + (v4.HEADER_LEN if dst.version == 4 else v6.HEADER_LEN) > self.mtu:
            self._count("drop_mtu_exceeded")
            return False
        if dst.version == 4:
            if self.ip4 is None or (hop := self._next_hop4(dst)) is None:
                self._count("drop_no_route")
                return False
            pkt = v4.build(self.ip4.packed, dst.packed, proto, payload, ident=self._next_ident(),
                             ttl=self.ttl if ttl is None else ttl, df=True)
            self.stats["ipv4_out"] += 1
            bcast = self._bcast4.get(dst)
            if bcast is None:
                bcast = dst == self.net4.broadcast_address or dst == BROADCAST4
                if len(self._bcast4) < _CACHE_MAX:
                    self._bcast4[dst] = bcast
            if bcast:
                self._tx(ether.BROADCAST, ether.ETH_P_IP, pkt)
                return True
            if len(self._routes4) < _CACHE_MAX:
                self._routes4[id(dst)] = (dst, hop, dst.packed)
            return self._resolve_and_send(self.arp_cache, hop, ether.ETH_P_IP, pkt, now)
        src = self._source6(dst) if src is None else _addr(src)
        pkt = v6.build(src.packed, dst.packed, proto, payload,
                         hop_limit=self.hop_limit if ttl is None else ttl)
        self.stats["ipv6_out"] += 1
        if dst.is_multicast:
            self._tx(v6.multicast_mac(dst), ether.ETH_P_IPV6, pkt)
            return True
        if (hop := self._next_hop6(dst)) is None:
            self._count("drop_no_route")
            return False
        return self._resolve_and_send(self.nd_cache, hop, ether.ETH_P_IPV6, pkt, now)

    def _resolve_and_send(self, cache: NeighbourCache, hop, ethertype: int, pkt: bytes, now: float) -> bool:
        e = cache.entries.get(hop)
        if e is not None and e.state == REACHABLE and now - e.updated <= cache.reachable_time:
            self._tx(e.mac, ethertype, pkt)     # what resolve() would say, without its steps
            return True
        mac, solicit = cache.resolve(hop, ethertype, pkt, now)
        if mac is not None:
            self._tx(mac, ethertype, pkt)
        if solicit:
            self._solicit(hop, mac if solicit == "unicast" else None)
        return True

    def probe_neighbour(self, addr, now=None) -> bool:
        """Ask addr to confirm it is reachable (ARP / NS, unicast when its MAC is
        known); the answer reaches the cache's on_update.  False: the cache is full."""
        addr = _addr(addr)
        now = self._now(now)
        cache = self.arp_cache if addr.version == 4 else self.nd_cache
        how = cache.probe(addr, now)
        if how is None:
            return False
        e = cache.get(addr)
        self._solicit(addr, e.mac if how == "unicast" else None)
        return True

    def _solicit(self, addr, unicast_mac: bytes | None) -> None:
        if addr.version == 4:
            self._tx(unicast_mac or ether.BROADCAST, ether.ETH_P_ARP,
                     arp.request(self.mac, self.ip4.packed, addr.packed))
            self._count("arp_requests_out")
        else:
            src = self._source6(addr)
            dst = addr if unicast_mac else v6.solicited_node(addr)
            ns = nd.solicit(src.packed, dst.packed, addr.packed, self.mac)
            self._tx(unicast_mac or v6.multicast_mac(dst), ether.ETH_P_IPV6,
                     v6.build(src.packed, dst.packed, v6.NH_ICMPV6, ns, hop_limit=255))
            self._count("nd_ns_out")

    def ping(self, dst, payload: bytes = b"", *, now=None) -> int:
        """Send one echo request (ICMPv4 or ICMPv6 by the address); returns its
        sequence number.  Replies land in `self.pings.replies` (PingReply: src,
        ident, seq, rtt, payload); run the interface until they come."""
        now = self._now(now)
        dst = _addr(dst)
        seq = self.pings.next(dst, now)
        if dst.version == 4:
            self.send_ip(dst, v4.PROTO_ICMP, icmp.echo_request(self.pings.ident, seq, payload), now=now)
            self._count("icmp_echo_requests_out")
        else:
            src = self._source6(dst)
            msg = icmpv6.echo(src.packed, dst.packed, icmpv6.ECHO_REQUEST, self.pings.ident, seq, payload)
            self.send_ip(dst, v6.NH_ICMPV6, msg, src=src, now=now)
            self._count("icmpv6_echo_requests_out")
        return seq

    def ping_reply(self, dst, seq: int):
        """The PingReply for (dst, seq), or None yet."""
        dst = _addr(dst)
        return next((r for r in self.pings.replies if r.src == dst and r.seq == seq), None)

    # -- timers -------------------------------------------------------------------------
    def poll(self, now=None) -> None:
        """Run the timers: ARP/ND retries and ageing, reassembly timeouts, ping expiry."""
        now = self._now(now)
        for addr in self.arp_cache.poll(now):
            self._solicit(addr, None)
        for addr in self.nd_cache.poll(now):
            self._solicit(addr, None)
        self.reassembler.poll(now)
        self.reassembler6.poll(now)
        self._count("ping_timeouts", self.pings.poll(now))

    def next_timer(self) -> float | None:
        """The earliest time poll() has work to do (None: nothing pending soon)."""
        ds = [d for d in (self.arp_cache.next_deadline(), self.nd_cache.next_deadline(),
                          self.reassembler.next_deadline(), self.reassembler6.next_deadline())
              if d is not None]
        return min(ds) if ds else None
