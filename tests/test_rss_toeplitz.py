"""The host's RSS hash against Microsoft's published verification vectors (the
default 40-byte key; input: source address, destination address, source port,
destination port)."""
from __future__ import annotations

import ipaddress

import pytest

from chimney.guest import rss
from chimney.guest.stack.host import EPHEMERAL

A = ipaddress.ip_address

# (destination, dst port, source, src port, hash over the addresses, hash with ports)
IPV4 = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323E8FC2, 0x51CCC178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xD718262A, 0xC626B0EA),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xD2D0A5DE, 0x5C2B394A),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xAFC7327F),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5D1809C5, 0x10E828A2),
]
IPV6 = [
    ("3ffe:2501:200:3::1", 1766, "3ffe:2501:200:1fff::7", 2794, 0x2CC18CD5, 0x40207D3D),
    ("ff02::1", 4739, "3ffe:501:8::260:97ff:fe40:efab", 14230, 0x0F0C461C, 0xDDE51BBF),
    ("fe80::200:f8ff:fe21:67cf", 38024, "3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251,
     0x4B61E985, 0x02D1FEEF),
]


@pytest.mark.parametrize("dst,dport,src,sport,h_ip,h_tcp", IPV4 + IPV6)
def test_microsoft_verification_vectors(dst, dport, src, sport, h_ip, h_tcp):
    assert rss.toeplitz(rss.hash_input(A(src), A(dst))) == h_ip
    assert rss.toeplitz(rss.hash_input(A(src), A(dst), sport, dport)) == h_tcp


def test_connection_hash_is_the_received_segments():
    # a connection's local end is the destination of what it receives
    dst, dport, src, sport, _, h_tcp = IPV4[0]
    assert rss.rss_hash(A(dst), dport, A(src), sport) == h_tcp


@pytest.mark.parametrize("local,remote", [("10.199.0.2", "10.199.0.1"), ("fd00:c41e::2", "fd00:c41e::1")])
def test_consecutive_ephemeral_ports_spread_over_every_set(local, remote):
    """The host stack hands out ephemeral ports one after the other: any 8 in a row
    (perf -P 8) land on all 4 sets of the default table."""
    table = rss.spread_table(4)
    lo, hi = EPHEMERAL
    qs = [table[rss.rss_hash(A(local), p, A(remote), 5201) & 127] for p in range(lo, hi + 1)]
    assert min(len(set(qs[i:i + 8])) for i in range(len(qs) - 8)) == 4


def test_tables_and_their_checks():
    assert rss.spread_table(3)[:7] == bytes([0, 1, 2, 0, 1, 2, 0])
    for n in (1, 2, 3, 4, 8):
        t = rss.spread_table(n)
        assert len(t) == rss.TABLE_SIZE and max(t.count(q) for q in range(n)) - \
            min(t.count(q) for q in range(n)) <= 1
    with pytest.raises(ValueError, match="1..8"):
        rss.spread_table(9)
    with pytest.raises(ValueError, match="128 buckets"):
        rss.check_table(bytes(5), 4)
    with pytest.raises(ValueError, match="queue sets 0..3"):
        rss.check_table(bytes([4] * 128), 4)
    with pytest.raises(ValueError, match="at most 36 bytes"):
        rss.toeplitz(bytes(37))
