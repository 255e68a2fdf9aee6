"""TCP segments: a dataclass, its wire encoding and a validating decoder.

Header layout per RFC 9293 §3.1; options per RFC 9293 §3.2 (MSS), RFC 7323 §2 (window
scale) and §3 (timestamps), RFC 2018 (SACK-permitted and SACK blocks). The checksum
covers the IPv4 (RFC 9293 §3.1) or IPv6 (RFC 8200 §8.1) pseudo-header.

`decode` raises `SegmentError` for every malformed input and nothing else.
"""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import struct
from dataclasses import dataclass, field
from ..inet import checksum  # noqa: F401 (part of this module's API)

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
_FLAG_NAMES = [(FIN, "FIN"), (SYN, "SYN"), (RST, "RST"), (PSH, "PSH"), (ACK, "ACK"),
               (URG, "URG"), (ECE, "ECE"), (CWR, "CWR")]

# option kinds
OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8

HEADER_LEN = 20
# The TCP header's one description (RFC 9293 §3.1), for the engine and the NIC's TOE:
# the fixed 20 bytes, and those followed by NOP, NOP, timestamps (the usual data segment).
HEADER = struct.Struct("!HHIIBBHHH")
HEADER_TS = struct.Struct("!HHIIBBHHHIII")
TS_OPTION = struct.Struct("!I")                                # one word of the option block
TS_LEAD = (OPT_NOP << 24) | (OPT_NOP << 16) | (OPT_TS << 8) | 10
TS_LEAD_BYTES = TS_LEAD.to_bytes(4, "big")                     # NOP NOP timestamps (alone)
_HDR, _HDR_TS, _TS_LEAD = HEADER, HEADER_TS, TS_LEAD
MAX_OPTIONS_LEN = 40
IPPROTO_TCP = 6


class SegmentError(ValueError):
    """A TCP segment that cannot be decoded (or encoded)."""


def flags_str(flags: int) -> str:
    return "|".join(name for bit, name in _FLAG_NAMES if flags & bit) or "-"


@dataclass
class Segment:
    src_port: int
    dst_port: int
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 0                 # raw 16-bit field, unscaled
    urgent: int = 0
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: list[tuple[int, int]] = field(default_factory=list)
    tsval: int | None = None        # timestamps option present iff tsval is not None
    tsecr: int | None = None
    payload: bytes = b""
    # > 0: a burst of full segments of this size (engine Config.max_burst), split on
    # the way out; never on the wire, never decoded
    tso: int = 0

    # -- convenience -------------------------------------------------------------------
    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)

    @property
    def has_ack(self) -> bool:
        return bool(self.flags & ACK)

    def seg_len(self) -> int:
        """Sequence space the segment occupies: data plus one each for SYN and FIN."""
        return len(self.payload) + (1 if self.syn else 0) + (1 if self.fin else 0)

    def __repr__(self) -> str:  # compact, for test failure messages
        opts = []
        if self.mss is not None:
            opts.append(f"mss={self.mss}")
        if self.wscale is not None:
            opts.append(f"ws={self.wscale}")
        if self.sack_permitted:
            opts.append("sackok")
        if self.sack_blocks:
            opts.append(f"sack={self.sack_blocks}")
        if self.tsval is not None:
            opts.append(f"ts={self.tsval}/{self.tsecr}")
        return (f"<Segment {self.src_port}->{self.dst_port} {flags_str(self.flags)} "
                f"seq={self.seq} ack={self.ack} win={self.window} len={len(self.payload)}"
                + (" " + " ".join(opts) if opts else "") + ">")

    # -- wire format -------------------------------------------------------------------
    def options_bytes(self) -> bytes:
        """Options in the usual order, NOP-padded to a multiple of 4 bytes."""
        out = bytearray()
        if self.mss is not None:
            out += struct.pack("!BBH", OPT_MSS, 4, self.mss)
        if self.sack_permitted:
            out += bytes([OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2])
        if self.tsval is not None:
            out += bytes([OPT_NOP, OPT_NOP]) + struct.pack(
                "!BBII", OPT_TS, 10, self.tsval & 0xFFFFFFFF, (self.tsecr or 0) & 0xFFFFFFFF)
        if self.wscale is not None:
            out += bytes([OPT_NOP]) + struct.pack("!BBB", OPT_WSCALE, 3, self.wscale)
        if self.sack_blocks:
            out += bytes([OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(self.sack_blocks)])
            for left, right in self.sack_blocks:
                out += struct.pack("!II", left & 0xFFFFFFFF, right & 0xFFFFFFFF)
        if len(out) % 4:
            out += bytes(4 - len(out) % 4)          # EOL padding
        if len(out) > MAX_OPTIONS_LEN:
            raise SegmentError(f"options take {len(out)} bytes, more than 40")
        return bytes(out)

    def encode(self, src_ip: str, dst_ip: str) -> bytes:
        return self.encode_sum(pseudo_sum(src_ip, dst_ip))

    def encode_sum(self, psum: int) -> bytes:
        """encode() with the pseudo-header's address part already summed
        (`pseudo_sum`): what a connection sends on every segment."""
        if self.mss is None and self.wscale is None and not self.sack_permitted and \
                not self.sack_blocks:
            payload = self.payload
            if self.tsval is not None:
                hs, off = _HDR_TS, 0x80
                vals = [self.src_port, self.dst_port, self.seq & 0xFFFFFFFF, self.ack & 0xFFFFFFFF,
                        off, self.flags & 0xFF, self.window & 0xFFFF, 0, self.urgent & 0xFFFF,
                        _TS_LEAD, self.tsval & 0xFFFFFFFF, (self.tsecr or 0) & 0xFFFFFFFF]
            else:
                hs, off = _HDR, 0x50
                vals = [self.src_port, self.dst_port, self.seq & 0xFFFFFFFF, self.ack & 0xFFFFFFFF,
                        off, self.flags & 0xFF, self.window & 0xFFFF, 0, self.urgent & 0xFFFF]
            hdr = hs.pack(*vals)
            n = int.from_bytes(payload, "big")
            if len(payload) & 1:
                n <<= 8
            # every part but the last is of even length, so the words of the
            # concatenation sum (mod 0xffff) as the parts' values do
            t = (psum + hs.size + len(payload) + int.from_bytes(hdr, "big") + n) % 0xFFFF
            vals[7] = 0xFFFF - t if t else 0
            return hs.pack(*vals) + payload
        opts = self.options_bytes()
        offset = (HEADER_LEN + len(opts)) // 4
        hdr = struct.pack("!HHIIBBHHH", self.src_port, self.dst_port,
                          self.seq & 0xFFFFFFFF, self.ack & 0xFFFFFFFF,
                          offset << 4, self.flags & 0xFF, self.window & 0xFFFF, 0,
                          self.urgent & 0xFFFF)
        raw = bytearray(hdr + opts + self.payload)
        n = int.from_bytes(raw, "big")
        if len(raw) & 1:
            n <<= 8
        t = (psum + len(raw) + n) % 0xFFFF
        struct.pack_into("!H", raw, 16, 0xFFFF - t if t else 0)
        return bytes(raw)


def split_tso(seg: Segment) -> list[Segment]:
    """The segments a burst (seg.tso > 0) stands for: consecutive pieces of seg.tso
    bytes (the last may be shorter), the same header, PSH (if any) on the last only."""
    if not seg.tso or len(seg.payload) <= seg.tso:
        return [dataclasses.replace(seg, tso=0)] if seg.tso else [seg]
    out = []
    p, m, n = seg.payload, seg.tso, len(seg.payload)
    for off in range(0, n, m):
        last = off + m >= n
        out.append(dataclasses.replace(
            seg, seq=(seg.seq + off) & 0xFFFFFFFF, payload=p[off:off + m], tso=0,
            flags=seg.flags if last else seg.flags & ~PSH,
            sack_blocks=list(seg.sack_blocks)))
    return out


@functools.lru_cache(maxsize=1024)
def _address_pair(src_ip: str, dst_ip: str) -> tuple[int, bytes]:
    # Parsed once per address pair, not once per segment: ipaddress is slow.
    try:
        src, dst = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)
    except ValueError as e:
        raise SegmentError(f"bad address: {e}") from None
    if src.version != dst.version:
        raise SegmentError("source and destination address families differ")
    return src.version, src.packed + dst.packed


@functools.lru_cache(maxsize=1024)
def pseudo_sum(src_ip: str, dst_ip: str) -> int:
    """The pseudo-header's addresses and protocol, summed modulo 0xffff: add the
    TCP length and the segment's words to get its Internet checksum sum."""
    _, addrs = _address_pair(src_ip, dst_ip)
    return (int.from_bytes(addrs, "big") + IPPROTO_TCP) % 0xFFFF


def pseudo_header(src_ip: str, dst_ip: str, length: int) -> bytes:
    """RFC 9293 §3.1 (IPv4) or RFC 8200 §8.1 (IPv6) pseudo-header."""
    version, addrs = _address_pair(src_ip, dst_ip)
    if version == 4:
        return addrs + struct.pack("!BBH", 0, IPPROTO_TCP, length)
    return addrs + struct.pack("!IxxxB", length, IPPROTO_TCP)


def decode(raw: bytes, src_ip: str, dst_ip: str, verify_checksum: bool = True,
           psum: int | None = None) -> Segment:
    """Parse and validate one TCP segment; raises SegmentError on malformed input.
    psum: pseudo_sum(src_ip, dst_ip), when the caller has it already."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise SegmentError(f"expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) < HEADER_LEN:
        raise SegmentError(f"truncated header: {len(raw)} bytes")
    (src_port, dst_port, seq, ack, off_byte, flags, window, csum,
     urgent) = _HDR.unpack_from(raw)
    offset = (off_byte >> 4) * 4
    if offset < HEADER_LEN:
        raise SegmentError(f"data offset {offset} below 20")
    if offset > len(raw):
        raise SegmentError(f"data offset {offset} beyond segment length {len(raw)}")
    if verify_checksum:
        if psum is None:
            psum = pseudo_sum(src_ip, dst_ip)
        n = int.from_bytes(raw, "big")
        if len(raw) & 1:
            n <<= 8
        if (psum + len(raw) + n) % 0xFFFF:      # the one's complement sum is not 0xffff
            raise SegmentError(f"bad checksum 0x{csum:04x}")
    seg = Segment(src_port, dst_port, seq, ack, flags, window, urgent,
                  payload=raw[offset:])
    if offset == 32 and raw[20:24] == TS_LEAD_BYTES:          # NOP NOP timestamps, alone
        seg.tsval, seg.tsecr = struct.unpack_from("!II", raw, 24)
    elif offset > HEADER_LEN:
        _parse_options(raw[HEADER_LEN:offset], seg)
    return seg


def _parse_options(opts: bytes, seg: Segment) -> None:
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(opts):
            raise SegmentError(f"option kind {kind} has no length byte")
        length = opts[i + 1]
        if length < 2 or i + length > len(opts):
            raise SegmentError(f"option kind {kind} has bad length {length}")
        body = opts[i + 2:i + length]
        if kind == OPT_MSS:
            if length != 4:
                raise SegmentError(f"MSS option length {length}")
            seg.mss = struct.unpack("!H", body)[0]
        elif kind == OPT_WSCALE:
            if length != 3:
                raise SegmentError(f"window scale option length {length}")
            seg.wscale = body[0]
        elif kind == OPT_SACK_PERM:
            if length != 2:
                raise SegmentError(f"SACK-permitted option length {length}")
            seg.sack_permitted = True
        elif kind == OPT_SACK:
            if (length - 2) % 8 or length == 2:
                raise SegmentError(f"SACK option length {length}")
            seg.sack_blocks = [struct.unpack_from("!II", body, j)
                               for j in range(0, length - 2, 8)]
        elif kind == OPT_TS:
            if length != 10:
                raise SegmentError(f"timestamps option length {length}")
            seg.tsval, seg.tsecr = struct.unpack("!II", body)
        # RFC 9293 §3.1: unknown options are skipped by their length
        i += length
