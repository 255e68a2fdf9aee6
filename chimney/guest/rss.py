"""Receive side scaling, the host's part: the Toeplitz hash of a connection (computed
once, at offload, and handed to the NIC in the const state) and the indirection
table that maps hash buckets to offload queue sets.

    h = rss_hash(local_ip, local_port, remote_ip, remote_port)   # as the NIC would see a received segment
    table = spread_table(n)            # 128 buckets, n queue sets, evenly
    queue = table[h & (TABLE_SIZE - 1)]

The hash input is what a received segment carries, in Microsoft's order: source
address, destination address, source port, destination port (the source being the
remote end).  The key is Microsoft's default 40-byte RSS key.
"""
from __future__ import annotations

from .. import hw

TABLE_SIZE = 128            # buckets in the NIC's indirection table (CMD_RSS_TABLE)
MS_KEY = bytes.fromhex("6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c"
                       "6a42b73bbeac01fa")


def toeplitz(data: bytes, key: bytes = MS_KEY) -> int:
    """The Toeplitz hash of data: for every set bit of the input (most significant
    first), XOR in the 32-bit window of the key that starts at that bit."""
    if len(key) * 8 < len(data) * 8 + 32:
        raise ValueError(f"a {len(key)}-byte key hashes at most {len(key) - 4} bytes of input")
    k = int.from_bytes(key, "big")
    klen = len(key) * 8
    h = 0
    for i, byte in enumerate(data):
        for b in range(8):
            if byte & (0x80 >> b):
                h ^= (k >> (klen - 32 - (i * 8 + b))) & 0xFFFFFFFF
    return h


def hash_input(src_ip, dst_ip, src_port: int | None = None, dst_port: int | None = None) -> bytes:
    """The bytes hashed: addresses (IPv4 or IPv6, ipaddress objects), then the ports
    when given (the TCP hash types; without them the IP-only hash types)."""
    out = src_ip.packed + dst_ip.packed
    if src_port is not None:
        out += src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    return out


def rss_hash(local_ip, local_port: int, remote_ip, remote_port: int) -> int:
    """A connection's hash as the NIC would compute it over a received segment
    (source = the remote end)."""
    return toeplitz(hash_input(remote_ip, local_ip, remote_port, local_port))


def spread_table(nqueues: int) -> bytes:
    """The indirection table that spreads the buckets evenly over nqueues queue sets.

    Bucket b goes to (b ^ b >> 5) % nqueues, not b % nqueues: with Microsoft's key the
    two low bits of a hash do not change with the two low bits of the local port (the
    key bits that would carry them are zero), so b % 4 would put a run of consecutive
    ephemeral ports on two sets; folding in the bucket's top bits (which do change)
    spreads any 8 consecutive ports over all of 2, 4 or 8 sets, IPv4 and IPv6.
    b ^ b >> 5 is a permutation of the buckets, so the sets stay even."""
    check_queues(nqueues)
    return bytes((b ^ b >> 5) % nqueues for b in range(TABLE_SIZE))


def check_queues(nqueues: int) -> int:
    if not 1 <= nqueues <= hw.NUM_OFFLOAD_QUEUES:
        raise ValueError(f"RSS queues must be 1..{hw.NUM_OFFLOAD_QUEUES}, not {nqueues}")
    return nqueues


def check_table(buckets, nqueues: int) -> bytes:
    """An indirection table as the NIC takes it (one queue set per bucket, 128 buckets),
    every entry below nqueues; ValueError with one line otherwise."""
    table = bytes(buckets)
    if len(table) != TABLE_SIZE:
        raise ValueError(f"an RSS indirection table has {TABLE_SIZE} buckets, not {len(table)}")
    bad = [q for q in table if q >= nqueues]
    if bad:
        raise ValueError(f"RSS table entry {bad[0]}: only queue sets 0..{nqueues - 1} are set up")
    return table
