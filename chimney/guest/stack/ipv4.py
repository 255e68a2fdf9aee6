"""IPv4 (RFC 791): header parse/build with checksum, option checks, and bounded
fragment reassembly.  Options are checked and then ignored, as RFC 1122 §3.2.1.8
allows a host (check_options); what we send carries none."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .ether import FrameError
from ...inet import checksum  # noqa: F401 (part of this module's API)

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
HEADER_LEN = 20
FLAG_DF = 0x4000
FLAG_MF = 0x2000
_HDR = struct.Struct("!BBHHHBBH4s4s")
OPT_EOL = 0             # end of the option list: the rest is padding
OPT_NOP = 1
OPT_RR = 7              # record route
OPT_TS = 68             # timestamp
OPT_LSRR = 131          # loose source and record route
OPT_SSRR = 137          # strict source and record route


class OptionError(FrameError):
    """A malformed option: `pointer` is the octet of the IP header at fault, as an ICMP
    Parameter Problem gives it (RFC 792)."""

    def __init__(self, detail: str, pointer: int):
        super().__init__("ipv4_bad_option", detail)
        self.pointer = pointer


@dataclass
class Header:
    src: bytes
    dst: bytes
    proto: int
    ttl: int = 64
    ident: int = 0
    df: bool = True
    mf: bool = False
    frag_offset: int = 0        # in bytes
    tos: int = 0
    total_length: int = 0
    checksum: int = 0
    options: bytes = b""

    @property
    def is_fragment(self) -> bool:
        return self.mf or self.frag_offset != 0


def parse(data: bytes, verify_checksum: bool = True) -> tuple[Header, bytes]:
    """(header, payload); raises FrameError with reason truncated, bad_version,
    bad_ihl, bad_length or bad_checksum.  Ethernet padding is cut off."""
    if len(data) < HEADER_LEN:
        raise FrameError("ipv4_truncated", f"{len(data)} bytes")
    vihl, tos, total, ident, flags_frag, ttl, proto, csum, src, dst = _HDR.unpack_from(data)
    if vihl >> 4 != 4:
        raise FrameError("ipv4_bad_version", f"version {vihl >> 4}")
    ihl = (vihl & 0xF) * 4
    if ihl < HEADER_LEN:
        raise FrameError("ipv4_bad_ihl", f"IHL {ihl // 4}")
    if len(data) < ihl:
        raise FrameError("ipv4_truncated", f"IHL {ihl // 4} but {len(data)} bytes")
    if total < ihl:
        raise FrameError("ipv4_bad_length", f"total length {total} < header {ihl}")
    if total > len(data):
        raise FrameError("ipv4_truncated", f"total length {total} > {len(data)} bytes")
    if verify_checksum and checksum(data[:ihl]) != 0:
        raise FrameError("ipv4_bad_checksum", f"{csum:#06x}")
    h = Header(src=bytes(src), dst=bytes(dst), proto=proto, ttl=ttl, ident=ident,
               df=bool(flags_frag & FLAG_DF), mf=bool(flags_frag & FLAG_MF),
               frag_offset=(flags_frag & 0x1FFF) * 8, tos=tos, total_length=total,
               checksum=csum, options=bytes(data[HEADER_LEN:ihl]))
    if flags_frag & 0x8000:
        raise FrameError("ipv4_bad_flags", "reserved flag set")
    return h, bytes(data[ihl:total])


def check_options(opts: bytes) -> None:
    """The options of a datagram addressed to us (RFC 791 §3.1, RFC 1122 §3.2.1.8).
    Every option but EOL and NOP must have a length of at least 2 that stays inside
    the header; unknown options are skipped by it.  Record route and timestamp need a
    sane pointer and are then ignored, as are security and stream id.  A source route
    with addresses still to visit names a next hop we would have to forward to, and a
    host does not forward (RFC 1122 §3.3.5): dropped as ipv4_source_route; one that has
    reached its end (us) is accepted.  Raises OptionError or FrameError."""
    i, n = 0, len(opts)
    while i < n:
        t = opts[i]
        if t == OPT_EOL:
            return
        if t == OPT_NOP:
            i += 1
            continue
        at = HEADER_LEN + i
        if i + 1 >= n:
            raise OptionError(f"option {t} without a length", at)
        ln = opts[i + 1]
        if ln < 2 or i + ln > n:
            raise OptionError(f"option {t} of length {ln} in {n - i} bytes", at + 1)
        if t in (OPT_RR, OPT_LSRR, OPT_SSRR):
            if ln < 3:
                raise OptionError(f"route option {t} of length {ln}", at + 1)
            ptr = opts[i + 2]
            if ptr < 4:
                raise OptionError(f"route option {t} with pointer {ptr}", at + 2)
            if t != OPT_RR and ptr + 3 <= ln:
                raise FrameError("ipv4_source_route", f"option {t}: hops left, we do not forward")
        elif t == OPT_TS:
            if ln < 4:
                raise OptionError(f"timestamp option of length {ln}", at + 1)
            ptr, flag = opts[i + 2], opts[i + 3] & 0xF
            if ptr < 5:
                raise OptionError(f"timestamp option with pointer {ptr}", at + 2)
            if flag not in (0, 1, 3):
                raise OptionError(f"timestamp option with flag {flag}", at + 3)
        i += ln


def build(src: bytes, dst: bytes, proto: int, payload: bytes, *, ident: int = 0, ttl: int = 64,
          df: bool = True, tos: int = 0, mf: bool = False, frag_offset: int = 0) -> bytes:
    total = HEADER_LEN + len(payload)
    if total > 0xFFFF:
        raise ValueError(f"datagram of {total} bytes")
    ff = (FLAG_DF if df else 0) | (FLAG_MF if mf else 0) | (frag_offset // 8)
    hdr = _HDR.pack(0x45, tos, total, ident & 0xFFFF, ff, ttl, proto, 0, src, dst)
    s = int.from_bytes(hdr, "big") % 0xFFFF       # never all zeros: the version is in it
    return _HDR.pack(0x45, tos, total, ident & 0xFFFF, ff, ttl, proto, 0xFFFF - s if s else 0, src, dst) + \
        (payload if type(payload) is bytes else bytes(payload))


@dataclass
class _Partial:
    first_seen: float
    pieces: dict = field(default_factory=dict)    # offset -> bytes
    total: int | None = None                       # payload length, known once the last fragment came
    size: int = 0
    first_header: Header | None = None


class Reassembler:
    """Bounded reassembly: at most `max_datagrams` in progress, each at most
    `max_size` bytes of payload, dropped `timeout` seconds after its first
    fragment (so it holds at most max_datagrams * max_size bytes).  Overlapping fragments drop the whole datagram (as RFC 5722 asks
    of IPv6; the ambiguity is an attack vector); an exact duplicate is ignored.
    Counters go to `stats` (frag_*)."""

    def __init__(self, stats: dict, *, max_datagrams: int = 16, timeout: float = 30.0,
                 max_size: int = 65535 - HEADER_LEN):
        self.stats = stats
        self.max_datagrams = max_datagrams
        self.timeout = timeout
        self.max_size = max_size
        self.partial: dict[tuple, _Partial] = {}

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _drop(self, key: tuple, reason: str) -> None:
        p = self.partial.pop(key, None)
        self._count(reason)
        if p is not None:
            self._count("frag_datagrams_dropped")
            self._count("frag_fragments_dropped", len(p.pieces))

    def add(self, h: Header, payload: bytes, now: float) -> tuple[Header, bytes] | None:
        """Feed one fragment; returns (header of the first fragment, whole payload) when complete."""
        self._count("frag_fragments_in")
        key = (h.src, h.dst, h.proto, h.ident)
        off, end = h.frag_offset, h.frag_offset + len(payload)
        p = self.partial.get(key)
        if (h.mf and len(payload) % 8) or end > self.max_size or (h.mf and not payload):
            # non-final fragments carry multiples of 8 bytes; nothing beyond the size limit
            self._drop(key, "frag_bad_length" if end <= self.max_size else "frag_too_big")
            self._count("frag_fragments_dropped")
            return None
        if p is None:
            if len(self.partial) >= self.max_datagrams:
                self._count("frag_too_many")
                self._count("frag_fragments_dropped")
                return None
            p = self.partial[key] = _Partial(first_seen=now)
        if not h.mf:
            if p.total is not None and p.total != end:
                self._drop(key, "frag_inconsistent")
                self._count("frag_fragments_dropped")
                return None
            p.total = end
        if p.total is not None and (end > p.total or max(
                (o + len(b) for o, b in p.pieces.items()), default=0) > p.total):
            self._drop(key, "frag_inconsistent")
            self._count("frag_fragments_dropped")
            return None
        if off in p.pieces and p.pieces[off] == payload:
            self._count("frag_duplicates")
            return None
        for o, b in p.pieces.items():
            if off < o + len(b) and o < end:
                self._drop(key, "frag_overlap")
                self._count("frag_fragments_dropped")
                return None
        p.pieces[off] = bytes(payload)
        p.size += len(payload)
        if off == 0:
            p.first_header = h
        if p.total is not None and p.size == p.total:
            del self.partial[key]
            data = b"".join(p.pieces[o] for o in sorted(p.pieces))
            self._count("frag_reassembled")
            return p.first_header, data
        return None

    def poll(self, now: float) -> None:
        for key, p in list(self.partial.items()):
            if now - p.first_seen > self.timeout:
                self._drop(key, "frag_timeout")

    def next_deadline(self) -> float | None:
        return min((p.first_seen + self.timeout for p in self.partial.values()), default=None)
