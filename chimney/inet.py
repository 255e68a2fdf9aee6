"""Helpers every Internet protocol layer shares (pure Python: the guest runs it)."""
from __future__ import annotations


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data: IPv4 headers, ICMP, and TCP/UDP
    with their pseudo-headers.

    The one's-complement sum of 16-bit words is the data, read as one
    big-endian integer, modulo 0xffff (2^16 = 1 mod 0xffff), so one bignum
    operation does what a loop over the words would; the end-around-carry sum
    of data that is not all zeros is never 0, hence the 0xffff case."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n:
        s = 0xFFFF
    return ~s & 0xFFFF
