"""The Internet checksum against RFC 1071's word-by-word definition."""
import random
import struct

from chimney.inet import checksum


def reference(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def test_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF


def test_edge_cases():
    for data in (b"", b"\0", b"\0\0", b"\xff\xff", b"\xff\xff" * 7, b"\xff", b"\x00\x01",
                 b"\xff\xfe\x00\x01", bytes(1500), b"\xff" * 1501):
        assert checksum(data) == reference(data), data[:8]


def test_matches_the_definition_on_random_data():
    rng = random.Random(1071)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 200))
        assert checksum(data) == reference(data)
    for _ in range(50):
        data = rng.randbytes(rng.randrange(1400, 9000))
        assert checksum(data) == reference(data)
