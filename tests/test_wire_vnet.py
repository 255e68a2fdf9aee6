"""The wire's virtio-net header in process: the TOE rig of test_toe_engine (a Nic
over a memfd of guest RAM, clock injected) with its datagram socketpair wire
marked as a TAP opened with IFF_VNET_HDR, so every datagram is a 10-byte
virtio_net_hdr and a frame, as the kernel reads and writes them.  Checks the
exact super-segment the TOE hands the kernel, the peer's super-segment taken
whole, partial and vouched-for checksums, malformed headers dropped and
counted, an impaired link segmenting in software, and the pcap."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from chimney.device._fastpath import lib
from test_toe_engine import (
    OUR_IP,
    OUR_MAC,
    PEER_IP,
    PEER_MAC,
    RCV,
    SND,
    Rig,
    data,
    offload,
)
from test_toe_helpers import eth_ipv4_tcp

from chimney import hw
from chimney.device.impair import Impairment
from chimney.device.nic import Nic
from chimney.device.wire import PcapWriter
from chimney.inet import checksum
from chimney.tcp.segment import ACK, PSH, Segment, decode

VNET = struct.Struct("<BBHHHH")         # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NEEDS_CSUM, DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4 = 0, 1
LPORT, RPORT = 40000, 5001


def pseudo_sum(src: str, dst: str, tcplen: int) -> int:
    """The TCP pseudo-header's one's-complement sum, folded, not complemented."""
    raw = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", 6, tcplen)
    return ~checksum(raw) & 0xFFFF


def partial(frame: bytes) -> bytes:
    """The frame as a local stack hands it over with NEEDS_CSUM: the TCP checksum
    field holds the pseudo-header sum only."""
    tcplen = len(frame) - 34
    return frame[:50] + struct.pack("!H", pseudo_sum(PEER_IP, OUR_IP, tcplen)) + frame[52:]


class VnetRig(Rig):
    def __init__(self, pcap=None, impair_tx=None):
        super().__init__()
        if pcap or impair_tx:                 # the same NIC, with a pcap or an impaired link
            self.nic.close()
            self.pcap = PcapWriter(pcap) if pcap else None
            self.nic = Nic(self.dma, OUR_MAC, tap_fd=self.wire.fileno(),
                           pcap_fd=self.pcap.fd if self.pcap else -1, link_up=True, impair_tx=impair_tx)
            self.nic.toe.clock = lambda: self.now
            self.nic.reg_write(hw.REG_CTRL, 4, hw.CTRL_ENABLE)
            self.drv.wr = lambda off, v: self.nic.reg_write(off, 4, v)
            self.drv.db = self.nic.dbw
            for qid in list(self.drv.rings):
                self.drv.setup_queue(qid, self.drv.ring)
        assert lib.fp_wire_vnet(self.wire.fileno(), 1) == 0

    def send_vnet(self, frame: bytes, *, flags=0, gso_type=GSO_NONE, gso_size=0, csum_start=0,
                  csum_offset=0, hdr_len=54):
        self.peer.send(VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) + frame)
        self.pump()

    def out_vnet(self) -> list[tuple[tuple, bytes]]:
        got = []
        while True:
            try:
                d = self.peer.recv(1 << 17)
            except BlockingIOError:
                return got
            got.append((VNET.unpack_from(d), d[VNET.size:]))

    def close(self):
        lib.fp_wire_vnet(self.wire.fileno(), 0)
        super().close()


@pytest.fixture
def vrig():
    r = VnetRig()
    yield r
    r.close()


def super_frame(seq: int, payload: bytes, flags=ACK | PSH) -> bytes:
    seg = Segment(RPORT, LPORT, seq=seq, ack=SND, flags=flags, window=65535, payload=payload)
    return eth_ipv4_tcp(PEER_MAC, OUR_MAC, PEER_IP, OUR_IP, seg)


def test_burst_leaves_as_one_super_segment(vrig):
    ctx = offload(vrig)                         # cwnd 10 segments of 1460
    buf = vrig.alloc(16384)
    buf.mem[:14600] = data(14600)
    vrig.drv.osend(ctx, buf.iova, 14600, tag=1)
    vrig.pump()
    (hdr, f), = vrig.out_vnet()
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = hdr
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (
        NEEDS_CSUM, GSO_TCPV4, 54, 1460, 34, 16)
    ip = f[14:34]
    assert len(f) == 54 + 14600 and int.from_bytes(ip[2:4], "big") == 20 + 20 + 14600
    assert checksum(ip) == 0 and ip[6] & 0x40
    assert int.from_bytes(ip[4:6], "big") + 9 <= 0xFFFF and ip[4] & 0x80   # 10 ids, all in the upper half
    assert int.from_bytes(f[50:52], "big") == pseudo_sum(OUR_IP, PEER_IP, 20 + 14600)
    assert f[54:] == data(14600)
    assert int.from_bytes(f[38:42], "big") == SND and f[47] & PSH
    assert vrig.stat("wire_tso_out") == 1
    assert vrig.stat("offload_segs_out") == 10 and vrig.stat("tx_frames") == 10
    assert vrig.stat("tx_bytes") == 10 * 54 + 14600


def test_super_segment_in_goes_to_the_toe_whole(vrig):
    ctx = offload(vrig)
    b = vrig.alloc(16384)
    vrig.drv.orecv(ctx, b.iova, 11680, tag=3)
    vrig.pump()
    f = super_frame(RCV, data(11680, 5))
    vrig.send_vnet(partial(f), flags=NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1460, csum_start=34,
                   csum_offset=16)
    done = vrig.drv.pop(hw.OCOMPLQ_FIRST)
    assert [(r["kind"], r["tag"], r["len"]) for r in done] == [(hw.OC_RECV_DONE, 3, 11680)]
    assert bytes(b.mem[:11680]) == data(11680, 5)
    assert vrig.stat("wire_gso_in") == 1 and vrig.stat("offload_segs_in") == 1
    assert vrig.stat("offload_csum_errors") == 0 and vrig.stat("rx_drops") == 0
    # the ACK went out as a plain frame: a zeroed header
    out = vrig.out_vnet()
    assert out and all(h == (0, 0, 0, 0, 0, 0) for h, _ in out)
    assert decode(out[-1][1][34:], OUR_IP, PEER_IP).ack == RCV + 11680


def test_partial_and_vouched_checksums_accepted_bad_ones_not(vrig):
    ctx = offload(vrig)
    b = vrig.alloc(4096)
    vrig.drv.orecv(ctx, b.iova, 300, tag=1)
    vrig.pump()
    # NEEDS_CSUM: completed, then steered
    vrig.send_vnet(partial(super_frame(RCV, b"a" * 100, ACK)), flags=NEEDS_CSUM, csum_start=34,
                   csum_offset=16)
    assert vrig.stat("wire_csum_completed") == 1 and vrig.stat("offload_segs_in") == 1
    # a wrong checksum the kernel vouches for (DATA_VALID): not verified again
    f = bytearray(super_frame(RCV + 100, b"b" * 100, ACK))
    f[50] ^= 0xFF
    vrig.send_vnet(bytes(f), flags=DATA_VALID)
    assert vrig.stat("offload_segs_in") == 2 and vrig.stat("offload_csum_errors") == 0
    # the same without the flag: dropped as a bad checksum
    f = bytearray(super_frame(RCV + 200, b"c" * 100, ACK | PSH))
    f[50] ^= 0xFF
    vrig.send_vnet(bytes(f))
    assert vrig.stat("offload_csum_errors") == 1 and vrig.stat("offload_segs_in") == 2
    vrig.send_vnet(super_frame(RCV + 200, b"c" * 100, ACK | PSH))
    done = vrig.drv.pop(hw.OCOMPLQ_FIRST)
    assert [(r["tag"], r["len"]) for r in done] == [(1, 300)]
    assert bytes(b.mem[:300]) == b"a" * 100 + b"b" * 100 + b"c" * 100


def test_malformed_headers_dropped_and_counted(vrig):
    offload(vrig)
    good = super_frame(RCV, data(2920), ACK)
    cases = [
        {"gso_type": 3, "gso_size": 1460},                  # UDP: not ours to cut
        {"gso_type": GSO_TCPV4, "gso_size": 0},             # no segment size
        {"gso_type": GSO_TCPV4, "gso_size": 60000},         # segments beyond a frame
        {"gso_type": 4, "gso_size": 1460},                  # says IPv6, is IPv4
        {"flags": NEEDS_CSUM, "csum_start": len(good), "csum_offset": 16},  # checksum outside the frame
        {"flags": NEEDS_CSUM, "csum_start": 34, "csum_offset": len(good)},
    ]
    for kw in cases:
        vrig.send_vnet(good, **kw)
    vrig.send_vnet(good[:40], gso_type=GSO_TCPV4, gso_size=1460)     # headers cut short
    vrig.peer.send(b"\x00" * 5)                                      # shorter than the header
    vrig.pump()
    assert vrig.stat("rx_drops") == len(cases) + 2
    assert vrig.stat("offload_segs_in") == 0 and vrig.stat("offload_csum_errors") == 0
    # the wire still works
    vrig.send_vnet(good)
    assert vrig.stat("offload_segs_in") == 1


def test_impaired_link_sends_segment_by_segment():
    rig = VnetRig(impair_tx=Impairment("seed=2"))
    try:
        ctx = offload(rig)
        buf = rig.alloc(16384)
        buf.mem[:14600] = data(14600)
        rig.drv.osend(ctx, buf.iova, 14600, tag=1)
        rig.pump()
        out = rig.out_vnet()
        assert len(out) == 10 and all(h == (0, 0, 0, 0, 0, 0) for h, _ in out)
        segs = [decode(f[34:], OUR_IP, PEER_IP) for _, f in out]     # full checksums
        assert [s.seq for s in segs] == [SND + 1460 * i for i in range(10)]
        assert [bool(s.flags & PSH) for s in segs] == [False] * 9 + [True]
        assert rig.stat("wire_tso_out") == 0 and rig.stat("offload_segs_out") == 10
    finally:
        rig.close()


def test_pcap_records_the_segments(tmp_path):
    from scapy.all import IP, TCP, rdpcap
    rig = VnetRig(pcap=str(tmp_path / "w.pcap"))
    try:
        ctx = offload(rig)
        buf = rig.alloc(16384)
        buf.mem[:14600] = data(14600)
        rig.drv.osend(ctx, buf.iova, 14600, tag=1)
        rig.pump()
        assert len(rig.out_vnet()) == 1
        rig.drv.orecv(ctx, buf.iova, 5000, tag=2)
        rig.pump()
        rig.send_vnet(partial(super_frame(RCV, data(4380, 1))), flags=NEEDS_CSUM, gso_type=GSO_TCPV4,
                      gso_size=1460, csum_start=34, csum_offset=16)
        rig.pcap.close()
    finally:
        rig.close()
    frames = [f for f in rdpcap(str(tmp_path / "w.pcap")) if TCP in f and len(f[TCP].payload)]
    out = [f for f in frames if f[IP].src == OUR_IP]
    back = [f for f in frames if f[IP].src == PEER_IP]
    assert [len(f[TCP].payload) for f in out] == [1460] * 10
    assert [len(f[TCP].payload) for f in back] == [1460] * 3
    # the super-segments' pieces keep who sent them and which way they went
    assert {(f.sniffed_on, f.direction) for f in out} == {("wire: TOE", 2)}
    assert {(f.sniffed_on, f.direction) for f in back} == {("wire: peer", 1)}
    assert b"".join(bytes(f[TCP].payload) for f in out) == data(14600)
    assert b"".join(bytes(f[TCP].payload) for f in back) == data(4380, 1)
    for seq in (out, back):
        ids = [f[IP].id for f in seq]
        assert ids == list(range(ids[0], ids[0] + len(seq)))
        assert [bool(f[TCP].flags & PSH) for f in seq] == [False] * (len(seq) - 1) + [True]
        for f in seq:
            raw = bytes(f[IP])
            assert checksum(raw[:20]) == 0 and f[IP].len == len(raw)
            assert checksum(raw[12:20] + struct.pack("!HH", 6, len(raw) - 20) + raw[20:]) == 0
    assert all(f[IP].id & 0x8000 for f in out)
