"""ICMPv6 (RFC 4443): messages with the pseudo-header checksum, echo
request/reply.  Neighbour discovery messages are in nd.py."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .ether import FrameError
from .ipv6 import NH_ICMPV6, pseudo_checksum

DEST_UNREACH = 1
PACKET_TOO_BIG = 2
TIME_EXCEEDED = 3
ECHO_REQUEST = 128
ECHO_REPLY = 129
ROUTER_SOLICIT = 133
ROUTER_ADVERT = 134
NEIGHBOR_SOLICIT = 135
NEIGHBOR_ADVERT = 136
REDIRECT = 137


@dataclass
class Icmpv6Message:
    type: int
    code: int
    body: bytes      # everything after the 4-byte type/code/checksum


def parse(src: bytes, dst: bytes, data: bytes, verify_checksum: bool = True) -> Icmpv6Message:
    if len(data) < 4:
        raise FrameError("icmpv6_truncated", f"{len(data)} bytes")
    if verify_checksum and pseudo_checksum(src, dst, NH_ICMPV6, data) != 0:
        raise FrameError("icmpv6_bad_checksum")
    return Icmpv6Message(data[0], data[1], bytes(data[4:]))


def build(src: bytes, dst: bytes, type_: int, code: int, body: bytes) -> bytes:
    raw = bytes([type_, code, 0, 0]) + bytes(body)
    c = pseudo_checksum(src, dst, NH_ICMPV6, raw)
    return raw[:2] + struct.pack("!H", c) + raw[4:]


def parse_echo(msg: Icmpv6Message) -> tuple[int, int, bytes]:
    """(ident, seq, payload) of an echo request or reply."""
    if len(msg.body) < 4:
        raise FrameError("icmpv6_truncated", "echo without id/seq")
    ident, seq = struct.unpack_from("!HH", msg.body)
    return ident, seq, msg.body[4:]


def echo(src: bytes, dst: bytes, type_: int, ident: int, seq: int, payload: bytes) -> bytes:
    return build(src, dst, type_, 0, struct.pack("!HH", ident & 0xFFFF, seq & 0xFFFF) + bytes(payload))


def packet_too_big(msg: Icmpv6Message) -> tuple[int, bytes] | None:
    """(MTU, quoted packet) of a Packet Too Big (RFC 4443 3.2), else None."""
    if msg.type != PACKET_TOO_BIG or msg.code != 0 or len(msg.body) < 4:
        return None
    return struct.unpack_from("!I", msg.body)[0], msg.body[4:]


def quoted_tcp6(quote: bytes) -> tuple[bytes, bytes, int, int, int] | None:
    """(source, destination, source port, destination port, sequence) of the TCP
    segment an ICMPv6 error quotes (no extension headers), else None."""
    if len(quote) < 48 or quote[0] >> 4 != 6 or quote[6] != 6:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", quote, 40)
    return bytes(quote[8:24]), bytes(quote[24:40]), sport, dport, seq
