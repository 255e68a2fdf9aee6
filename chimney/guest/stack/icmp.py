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
FRAG_NEEDED = 4         # DEST_UNREACH code: fragmentation needed and DF set (RFC 1191)
ECHO_REQUEST = 8
TIME_EXCEEDED = 11
PARAMETER_PROBLEM = 12
ERROR_TYPES = (DEST_UNREACH, 4, 5, TIME_EXCEEDED, PARAMETER_PROBLEM)   # 4: source quench, 5: redirect
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


def frag_needed(m: IcmpPacket) -> tuple[int, bytes] | None:
    """(next-hop MTU, quoted datagram) of a "fragmentation needed" (RFC 1191: the MTU
    is the low half of the second word; 0 from an old router), else None."""
    if m.type != DEST_UNREACH or m.code != FRAG_NEEDED:
        return None
    return m.seq, m.payload


def quoted_tcp4(quote: bytes) -> tuple[bytes, bytes, int, int, int] | None:
    """(source, destination, source port, destination port, sequence) of the TCP
    segment an ICMP error quotes (its IPv4 header and at least 8 bytes), else None."""
    if len(quote) < 20 or quote[0] >> 4 != 4:
        return None
    ihl = (quote[0] & 0xF) * 4
    if ihl < 20 or quote[9] != 6 or len(quote) < ihl + 8:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", quote, ihl)
    return bytes(quote[12:16]), bytes(quote[16:20]), sport, dport, seq


def frag_needed_message(mtu: int, datagram: bytes) -> bytes:
    """A "fragmentation needed" quoting `datagram` (what a router sends; tests)."""
    return build(DEST_UNREACH, FRAG_NEEDED, 0, mtu, datagram)


def parameter_problem(pointer: int, datagram: bytes) -> bytes:
    """RFC 792 Parameter Problem: `pointer` is the octet at fault in the datagram, of
    which the message quotes the header and the first 8 bytes of data."""
    return build(PARAMETER_PROBLEM, 0, (pointer & 0xFF) << 8, 0, datagram)


class ErrorLimiter:
    """A token bucket for the ICMP errors we send (RFC 1122 §3.2.2: bounded, so a
    stream of bad datagrams is not answered one for one): `burst` at once, then
    `rate` a second."""

    def __init__(self, rate: float = 10.0, burst: int = 10):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), None

    def allow(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


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
