"""ICMPv4 (RFC 792): echo request/reply packets, and a ping bookkeeper shared
with ICMPv6 (the RTT of our own pings)."""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from .ether import FrameError
from .ipv4 import checksum

ECHO_REPLY = 0
DEST_UNREACH = 3
ECHO_REQUEST = 8
TIME_EXCEEDED = 11
_HDR = struct.Struct("!BBHHH")


@dataclass
class IcmpPacket:
    type: int
    code: int
    ident: int      # echo only (else the first half of the rest-of-header word)
    seq: int
    payload: bytes


def parse(data: bytes, verify_checksum: bool = True) -> IcmpPacket:
    if len(data) < 8:
        raise FrameError("icmp_truncated", f"{len(data)} bytes")
    if verify_checksum and checksum(data) != 0:
        raise FrameError("icmp_bad_checksum")
    t, code, _c, ident, seq = _HDR.unpack_from(data)
    return IcmpPacket(t, code, ident, seq, bytes(data[8:]))


def build(type_: int, code: int, ident: int, seq: int, payload: bytes) -> bytes:
    raw = _HDR.pack(type_, code, 0, ident & 0xFFFF, seq & 0xFFFF) + bytes(payload)
    return raw[:2] + struct.pack("!H", checksum(raw)) + raw[4:]


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    return build(ECHO_REQUEST, 0, ident, seq, payload)


def echo_reply(ident: int, seq: int, payload: bytes) -> bytes:
    return build(ECHO_REPLY, 0, ident, seq, payload)


@dataclass
class PingReply:
    src: object         # ipaddress.IPv4Address / IPv6Address
    ident: int
    seq: int
    rtt: float          # seconds, by the interface's clock
    payload: bytes


class PingBook:
    """Our outstanding echo requests, and the replies that matched them."""

    def __init__(self, ident: int, timeout: float = 30.0, max_outstanding: int = 1024,
                 max_replies: int = 1024):
        self.ident = ident
        self.timeout = timeout
        self.max_outstanding = max_outstanding
        self.seq = 0
        self.outstanding: dict[tuple, float] = {}    # (dst, seq) -> sent at
        self.replies: deque[PingReply] = deque(maxlen=max_replies)     # the most recent

    def next(self, dst, now: float) -> int:
        self.seq = (self.seq + 1) & 0xFFFF
        if len(self.outstanding) >= self.max_outstanding:
            self.outstanding.pop(next(iter(self.outstanding)))
        self.outstanding[(dst, self.seq)] = now
        return self.seq

    def answer(self, src, ident: int, seq: int, payload: bytes, now: float) -> PingReply | None:
        if ident != self.ident:
            return None
        sent = self.outstanding.pop((src, seq), None)
        if sent is None:
            return None
        r = PingReply(src, ident, seq, now - sent, payload)
        self.replies.append(r)
        return r

    def poll(self, now: float) -> int:
        old = [k for k, t in self.outstanding.items() if now - t > self.timeout]
        for k in old:
            del self.outstanding[k]
        return len(old)
