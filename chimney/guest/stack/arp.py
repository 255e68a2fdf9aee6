"""ARP for IPv4 over Ethernet (RFC 826), packets only; the cache is neigh.py
and the behaviour (answering, learning, gratuitous ARP) is in iface.py."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .ether import FrameError

REQUEST = 1
REPLY = 2
_FMT = struct.Struct("!HHBBH6s4s6s4s")
LEN = _FMT.size         # 28


@dataclass
class ArpPacket:
    op: int
    sha: bytes      # sender hardware address
    spa: bytes      # sender protocol address (4 bytes)
    tha: bytes
    tpa: bytes

    @property
    def gratuitous(self) -> bool:
        return self.spa == self.tpa


def parse(data: bytes) -> ArpPacket:
    if len(data) < LEN:
        raise FrameError("arp_truncated", f"{len(data)} bytes")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _FMT.unpack_from(data)
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        raise FrameError("arp_unsupported", f"htype {htype} ptype {ptype:#x} hlen {hlen} plen {plen}")
    if op not in (REQUEST, REPLY):
        raise FrameError("arp_bad_op", f"op {op}")
    return ArpPacket(op, sha, spa, tha, tpa)


def build(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return _FMT.pack(1, 0x0800, 6, 4, op, sha, spa, tha, tpa)


def request(sha: bytes, spa: bytes, tpa: bytes) -> bytes:
    return build(REQUEST, sha, spa, bytes(6), tpa)


def reply(sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return build(REPLY, sha, spa, tha, tpa)


def gratuitous(sha: bytes, spa: bytes) -> bytes:
    """A gratuitous ARP request announcing spa at sha."""
    return build(REQUEST, sha, spa, bytes(6), spa)
