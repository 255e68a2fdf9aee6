"""IPv6 (RFC 8200): the fixed header, the extension headers a host must walk
(hop-by-hop and destination options, a routing header with no segments left,
the fragment header), addresses derived from a MAC, multicast MACs, and the
upper-layer pseudo-header checksum.  Fragments are reassembled by
`Reassembler6` (RFC 8200 §4.5; overlapping fragments drop the datagram, RFC
5722).  Other extension headers (ESP, AH, mobility, HIP, shim6) are dropped by
the caller."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .ether import FrameError
from .ipv4 import Reassembler, checksum

HEADER_LEN = 40
NH_HOPOPT, NH_TCP, NH_UDP, NH_ROUTING, NH_FRAGMENT, NH_ICMPV6, NH_NONE, NH_DSTOPTS = \
    0, 6, 17, 43, 44, 58, 59, 60
EXTENSION_HEADERS = {NH_HOPOPT, NH_ROUTING, NH_FRAGMENT, NH_DSTOPTS, 51, 50, 135, 139, 140}
_HDR = struct.Struct("!IHBB16s16s")
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_ROUTERS = ipaddress.IPv6Address("ff02::2")
UNSPECIFIED = ipaddress.IPv6Address("::")


@dataclass
class Header:
    src: bytes
    dst: bytes
    next_header: int
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0
    payload_length: int = 0


def parse(data: bytes) -> tuple[Header, bytes]:
    if len(data) < HEADER_LEN:
        raise FrameError("ipv6_truncated", f"{len(data)} bytes")
    vtf, plen, nh, hlim, src, dst = _HDR.unpack_from(data)
    if vtf >> 28 != 6:
        raise FrameError("ipv6_bad_version", f"version {vtf >> 28}")
    if HEADER_LEN + plen > len(data):
        raise FrameError("ipv6_truncated", f"payload length {plen} > {len(data) - HEADER_LEN}")
    h = Header(bytes(src), bytes(dst), nh, hlim, (vtf >> 20) & 0xFF, vtf & 0xFFFFF, plen)
    return h, bytes(data[HEADER_LEN:HEADER_LEN + plen])


def build(src: bytes, dst: bytes, next_header: int, payload: bytes, *, hop_limit: int = 64,
          traffic_class: int = 0, flow_label: int = 0) -> bytes:
    if len(payload) > 0xFFFF:
        raise ValueError("jumbograms are not supported")
    vtf = (6 << 28) | ((traffic_class & 0xFF) << 20) | (flow_label & 0xFFFFF)
    return _HDR.pack(vtf, len(payload), next_header, hop_limit, src, dst) + bytes(payload)


def pseudo_checksum(src: bytes, dst: bytes, next_header: int, payload: bytes) -> int:
    """The upper-layer checksum over the RFC 8200 pseudo-header and payload
    (0 when payload already holds a correct checksum)."""
    ph = src + dst + struct.pack("!IxxxB", len(payload), next_header)
    return checksum(ph + bytes(payload))


def link_local_from_mac(mac: bytes) -> ipaddress.IPv6Address:
    """fe80::/64 with the modified EUI-64 interface identifier (RFC 4291 app. A)."""
    iid = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid)


def solicited_node(addr: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX for addr."""
    return ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + addr.packed[13:])


def multicast_mac(addr: ipaddress.IPv6Address) -> bytes:
    """33:33 followed by the low 32 bits of the multicast address (RFC 2464)."""
    return b"\x33\x33" + addr.packed[12:]


# -- extension headers (RFC 8200 §4) -----------------------------------------------------
OPT_PAD1, OPT_PADN = 0, 1


def skip_options(payload: bytes) -> tuple[int, bytes]:
    """A hop-by-hop or destination options header: (next header, what follows).  Pad1
    and PadN are skipped, and so is an unknown option whose type says "skip" (its two
    high bits 00); any other unknown option discards the packet (we send no Parameter
    Problem: the sender learns nothing it needs from us)."""
    if len(payload) < 8:
        raise FrameError("ipv6_truncated", "options header")
    nh, n = payload[0], (payload[1] + 1) * 8
    if n > len(payload):
        raise FrameError("ipv6_truncated", f"options header of {n} bytes")
    i = 2
    while i < n:
        t = payload[i]
        if t == OPT_PAD1:
            i += 1
            continue
        if i + 1 >= n or i + 2 + payload[i + 1] > n:
            raise FrameError("ipv6_bad_option", f"option {t} overruns its header")
        if t != OPT_PADN and t >> 6:
            raise FrameError("ipv6_unknown_option", f"option {t:#04x}")
        i += 2 + payload[i + 1]
    return nh, payload[n:]


def skip_routing(payload: bytes) -> tuple[int, bytes]:
    """A routing header: with segments left we would have to forward, and a host does
    not (dropped); with none left (we are the last hop) it is skipped."""
    if len(payload) < 8:
        raise FrameError("ipv6_truncated", "routing header")
    nh, n, left = payload[0], (payload[1] + 1) * 8, payload[3]
    if n > len(payload):
        raise FrameError("ipv6_truncated", f"routing header of {n} bytes")
    if left:
        raise FrameError("ipv6_source_route", f"type {payload[2]}, {left} segments left")
    return nh, payload[n:]


@dataclass
class Fragment:
    """A fragment header, in the terms `ipv4.Reassembler` works with: its key is
    (src, dst, proto, ident), and an IPv6 datagram is known by (src, dst, ident)
    alone, so proto stays 0; next_header is the one of the offset-0 fragment."""
    src: bytes
    dst: bytes
    ident: int
    frag_offset: int        # in bytes
    mf: bool
    next_header: int
    proto: int = 0

    @property
    def atomic(self) -> bool:
        """Offset 0 and no more fragments: a whole packet (RFC 6946)."""
        return not self.mf and not self.frag_offset


def parse_fragment(h: Header, payload: bytes) -> tuple[Fragment, bytes]:
    """The fragment header at the front of payload: (Fragment, fragment data)."""
    if len(payload) < 8:
        raise FrameError("ipv6_truncated", "fragment header")
    nh, _, off_m, ident = struct.unpack_from("!BBHI", payload)
    return Fragment(h.src, h.dst, ident, off_m & 0xFFF8, bool(off_m & 1), nh), payload[8:]


class Reassembler6(Reassembler):
    """IPv6 fragment reassembly (RFC 8200 §4.5) with the IPv4 reassembler's bounds and
    rules (non-final fragments a multiple of 8 bytes, duplicates ignored, overlaps drop
    the whole datagram as RFC 5722 asks, a timeout from the first fragment: 60 s by
    default, as §4.5 says); counters frag6_*."""

    def __init__(self, stats: dict, *, max_datagrams: int = 16, timeout: float = 60.0,
                 max_size: int = 0xFFFF):
        super().__init__(stats, max_datagrams=max_datagrams, timeout=timeout, max_size=max_size)

    def _count(self, key: str, n: int = 1) -> None:
        key = "frag6" + key.removeprefix("frag")
        self.stats[key] = self.stats.get(key, 0) + n
