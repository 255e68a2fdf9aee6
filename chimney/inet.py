"""Helpers every Internet protocol layer shares (pure Python: the guest runs it)."""
from __future__ import annotations

import struct


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data: IPv4 headers, ICMP, and TCP/UDP
    with their pseudo-headers."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
