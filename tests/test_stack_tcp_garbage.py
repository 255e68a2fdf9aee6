"""Malformed and unacceptable TCP from the wire, as whole Ethernet frames into
an Interface with a HostStack on an established connection (two stacks back
to back on a fake clock, no root): bad checksums (TCP and IPv4), truncated
headers, bogus data offsets and option lengths, out-of-window data and
PAWS-old segments, over IPv4 and IPv6.  Each is counted under its reason
and dropped -- nothing reaches the application, nothing raises -- and the
connection carries on afterwards."""
import os
import struct

import pytest

from chimney.guest.stack import ether
from chimney.guest.stack import ipv4 as v4
from chimney.guest.stack import ipv6 as v6
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.iface import Interface
from chimney.tcp.segment import ACK, PSH, Segment

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


class Wire:
    """Two HostStacks whose Interfaces hand frames to each other, on one fake clock."""

    def __init__(self):
        self.t = 1000.0
        clock = lambda: self.t      # noqa: E731
        self.q = []
        self.a = HostStack(Interface(MAC_A, ipv4=("10.9.0.1", 24), ipv6=[("fd00:9::1", 64)],
                                     send_frame=lambda f: self.q.append(("b", f)), clock=clock))
        self.b = HostStack(Interface(MAC_B, ipv4=("10.9.0.2", 24), ipv6=[("fd00:9::2", 64)],
                                     send_frame=lambda f: self.q.append(("a", f)), clock=clock))

    def pump(self, rounds: int = 1) -> None:
        for _ in range(rounds):
            while self.q:
                to, f = self.q.pop(0)
                getattr(self, to).iface.on_frame(f)
            self.t += 0.001
            self.a.poll()
            self.b.poll()


@pytest.fixture(params=["ipv4", "ipv6"])
def conn(request):
    w = Wire()
    lst = w.b.listen(7000)
    fa = w.a.open("10.9.0.2" if request.param == "ipv4" else "fd00:9::2", 7000)
    w.pump(5)
    fb = lst.take()
    assert fa.conn.established and fb is not None
    # some data first, so that the receive path is warm (the fast path knows the source)
    fa.conn.send(b"hello", w.a.clock())
    w.a.flush()
    w.pump(3)
    assert fb.conn.recv(100, w.b.clock()) == b"hello"
    return w, fa, fb, request.param


def frame_to_b(fam: str, fa, tcp: bytes, *, ip_checksum_ok=True) -> bytes:
    """An Ethernet frame from A to B carrying `tcp` as is."""
    local, _, remote, _ = fa.key
    if fam == "ipv4":
        pkt = bytearray(v4.build(local.packed, remote.packed, 6, tcp, ident=7))
        if not ip_checksum_ok:
            pkt[10] ^= 0xFF
        return ether.build(ether.mac_bytes(MAC_B), ether.mac_bytes(MAC_A), ether.ETH_P_IP, bytes(pkt))
    pkt = v6.build(local.packed, remote.packed, 6, tcp)
    return ether.build(ether.mac_bytes(MAC_B), ether.mac_bytes(MAC_A), ether.ETH_P_IPV6, pkt)


def data_segment(fa, fb, payload: bytes, seq_off: int = 0, tsval=None) -> Segment:
    ca = fa.conn
    return Segment(fa.key[1], fa.key[3], seq=(fb.conn.d.rcv_nxt + seq_off) % (1 << 32), ack=ca.d.rcv_nxt,
                   flags=ACK | PSH, window=1000,
                   tsval=(ca._ts_now() if tsval is None else tsval) if ca.const.timestamps else None,
                   tsecr=ca.d.ts_recent if ca.const.timestamps else None, payload=payload)


def addrs(fa):
    return str(fa.key[0]), str(fa.key[2])


def test_malformed_segments_counted_and_dropped(conn):
    w, fa, fb, fam = conn
    src, dst = addrs(fa)
    good = data_segment(fa, fb, b"payload!").encode(src, dst)
    st = w.b.stats
    bad_csum = bytearray(good)
    bad_csum[-1] ^= 0x01
    bad_offset_small = bytearray(good)
    bad_offset_small[12] = (4 << 4)                     # data offset 16 < 20
    bad_offset_big = bytearray(good)
    bad_offset_big[12] = (15 << 4)                      # 60 bytes of header in a shorter segment
    # options: an MSS option of length 3, an option running past the header, a zero length
    bogus = []
    for opts in (b"\x02\x03\x05\xb4", b"\x01\x01\x08\x20", b"\x01\x01\x05\x00"):
        hdr = struct.pack("!HHIIBBHHH", fa.key[1], fa.key[3], fb.conn.d.rcv_nxt, fa.conn.d.rcv_nxt,
                          6 << 4, ACK, 1000, 0, 0) + opts
        raw = bytearray(hdr + b"zz")
        from chimney.tcp.segment import pseudo_header
        from chimney.inet import checksum
        struct.pack_into("!H", raw, 16, checksum(pseudo_header(src, dst, len(raw)) + bytes(raw)))
        bogus.append(bytes(raw))
    cases = [bytes(bad_csum), good[:19], good[:8], bytes(bad_offset_small), bytes(bad_offset_big), *bogus]
    before = st["tcp_drop_malformed"]
    for raw in cases:
        w.b.iface.on_frame(frame_to_b(fam, fa, raw))
    assert st["tcp_drop_malformed"] == before + len(cases), dict(st)
    assert st["tcp_internal_error"] == 0 and w.b.iface.stats["drop_internal_error"] == 0
    assert fb.conn.recv(100, w.b.clock()) == b""                     # nothing reached the application
    # a frame whose IPv4 header checksum is wrong never reaches TCP
    if fam == "ipv4":
        seg_in = st["tcp_segments_in"]
        w.b.iface.on_frame(frame_to_b(fam, fa, good, ip_checksum_ok=False))
        assert w.b.iface.stats["drop_ipv4_bad_checksum"] == 1 and st["tcp_segments_in"] == seg_in
    # the connection is unharmed: the good segment is taken
    w.b.iface.on_frame(frame_to_b(fam, fa, good))
    assert fb.conn.recv(100, w.b.clock()) == b"payload!"


def test_out_of_window_and_paws_old_segments_counted_and_dropped(conn):
    w, fa, fb, fam = conn
    src, dst = addrs(fa)
    st = w.b.stats
    rcv_nxt = fb.conn.d.rcv_nxt
    wnd = fb.conn.d.rcv_wnd
    before = st["tcp_drop_unacceptable"]
    acks_before = fb.segments_out
    # beyond the right edge, and wholly old (left of RCV.NXT)
    w.b.iface.on_frame(frame_to_b(fam, fa, data_segment(fa, fb, b"far", seq_off=wnd + 10_000).encode(src, dst)))
    w.b.iface.on_frame(frame_to_b(fam, fa, data_segment(fa, fb, b"old", seq_off=-100).encode(src, dst)))
    n = 2
    if fa.conn.const.timestamps:
        # in window, but with a timestamp older than TS.Recent: PAWS
        old_ts = (fb.conn.d.ts_recent - 1000) % (1 << 32)
        w.b.iface.on_frame(frame_to_b(fam, fa, data_segment(fa, fb, b"paws", tsval=old_ts).encode(src, dst)))
        n += 1
    w.b.flush()
    assert st["tcp_drop_unacceptable"] == before + n, dict(st)
    assert fb.conn.d.rcv_nxt == rcv_nxt and fb.conn.recv(100, w.b.clock()) == b""
    assert fb.segments_out > acks_before          # answered with an ACK (§3.10.7.4), rate-limited
    # and the connection still moves data both ways
    data = os.urandom(50_000)
    off, got = 0, bytearray()
    for _ in range(500):
        if off < len(data):
            off += fa.conn.send(data[off:off + 8192], w.a.clock())
        got += fb.conn.recv(1 << 20, w.b.clock())
        w.a.flush()
        w.b.flush()
        w.pump()
        if len(got) == len(data):
            break
    assert bytes(got) == data
    assert st["tcp_internal_error"] == 0


def test_garbage_frames_never_raise(conn):
    w, fa, fb, fam = conn
    src, dst = addrs(fa)
    good = data_segment(fa, fb, b"x" * 100).encode(src, dst)
    rnd = __import__("random").Random(5)
    frame = frame_to_b(fam, fa, good)
    for _ in range(2000):
        f = bytearray(frame)
        for _ in range(rnd.randint(1, 6)):
            f[rnd.randrange(len(f))] = rnd.randrange(256)
        cut = rnd.choice([len(f), rnd.randrange(len(f) + 1)])
        w.b.iface.on_frame(bytes(f[:cut]))
    assert w.b.iface.stats["drop_internal_error"] == 0
    assert w.b.stats["tcp_internal_error"] == 0
    assert w.b.iface.stats["handler_errors"] == 0
