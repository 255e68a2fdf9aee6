"""IPv6 (RFC 8200): the fixed header, addresses derived from a MAC, multicast
MACs, and the upper-layer pseudo-header checksum.  Extension headers are not
processed: packets carrying them are dropped and counted by the caller."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .ether import FrameError
from .ipv4 import checksum

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
