"""IPv6 neighbour discovery (RFC 4861): neighbour solicitation and
advertisement messages with their link-layer address options.  The cache is
neigh.py; answering and learning are in iface.py.  Duplicate address detection
is not done: our addresses are configured, and the test wire is ours alone."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .ether import FrameError
from .icmpv6 import NEIGHBOR_ADVERT, NEIGHBOR_SOLICIT, Icmpv6Message, build as build_icmpv6

OPT_SOURCE_LL = 1
OPT_TARGET_LL = 2
NA_ROUTER = 0x80000000
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000


@dataclass
class NdMessage:
    type: int
    target: bytes               # 16 bytes
    flags: int = 0              # NA only
    source_ll: bytes | None = None
    target_ll: bytes | None = None

    @property
    def solicited(self) -> bool:
        return bool(self.flags & NA_SOLICITED)

    @property
    def override(self) -> bool:
        return bool(self.flags & NA_OVERRIDE)


def parse(msg: Icmpv6Message, hop_limit: int) -> NdMessage:
    """Validate (RFC 4861 7.1.1/7.1.2) and parse an NS or NA."""
    if msg.type not in (NEIGHBOR_SOLICIT, NEIGHBOR_ADVERT):
        raise FrameError("nd_unsupported", f"type {msg.type}")
    if hop_limit != 255 or msg.code != 0:
        raise FrameError("nd_invalid", f"hop limit {hop_limit} code {msg.code}")
    if len(msg.body) < 20:
        raise FrameError("nd_truncated", f"{len(msg.body)} bytes")
    flags = struct.unpack_from("!I", msg.body)[0]
    target = bytes(msg.body[4:20])
    if target[0] == 0xFF:
        raise FrameError("nd_invalid", "multicast target")
    m = NdMessage(msg.type, target, flags if msg.type == NEIGHBOR_ADVERT else 0)
    opts, i = msg.body[20:], 0
    while i < len(opts):
        if len(opts) - i < 2 or opts[i + 1] == 0 or len(opts) - i < opts[i + 1] * 8:
            raise FrameError("nd_bad_option", f"option at {i}")
        kind, n = opts[i], opts[i + 1] * 8
        if kind == OPT_SOURCE_LL and n >= 8:
            m.source_ll = bytes(opts[i + 2:i + 8])
        elif kind == OPT_TARGET_LL and n >= 8:
            m.target_ll = bytes(opts[i + 2:i + 8])
        i += n
    return m


def _ll_option(kind: int, mac: bytes) -> bytes:
    return bytes([kind, 1]) + mac


def solicit(src: bytes, dst: bytes, target: bytes, source_ll: bytes | None) -> bytes:
    """An NS (ICMPv6 payload) for target; no source LL option when src is ::."""
    body = bytes(4) + target + (_ll_option(OPT_SOURCE_LL, source_ll) if source_ll else b"")
    return build_icmpv6(src, dst, NEIGHBOR_SOLICIT, 0, body)


def advertise(src: bytes, dst: bytes, target: bytes, target_ll: bytes, *, solicited: bool,
              override: bool = True, router: bool = False) -> bytes:
    flags = (NA_SOLICITED if solicited else 0) | (NA_OVERRIDE if override else 0) | \
        (NA_ROUTER if router else 0)
    body = struct.pack("!I", flags) + target + _ll_option(OPT_TARGET_LL, target_ll)
    return build_icmpv6(src, dst, NEIGHBOR_ADVERT, 0, body)
