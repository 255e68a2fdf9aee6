"""A raw TCP peer for the conformance tests: it writes whole Ethernet frames
carrying segments it builds field by field, and reads back every segment the
stack under test puts on the wire, on a fake clock (no root, deterministic).

Two stacks under test, one interface:

* `SoftwarePeer`: a HostStack on an Interface (the software TCP); the
  connection comes up through a real handshake the peer drives (so the SYN
  options are the peer's to choose).
* `OffloadPeer`: the TOE in process (a Nic over a memfd of "guest RAM", a
  datagram socketpair as the wire, commands through the rings); the connection
  is an established state tree offloaded to it.

Both give: `feed(...)` a segment (or raw TCP bytes), `out()` the segments sent
since, `advance(secs)`, `app_send(data)`, `app_recv()` (all bytes the
application has got so far), `reset()` (did the connection abort).  `seq` is
the peer's next sequence number, `ack` the stack's (what the peer acknowledges)."""
from __future__ import annotations

import ipaddress
import struct

from test_toe_engine import Rig
from test_toe_helpers import Buf

from chimney import hw
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.iface import Interface
from chimney.inet import checksum
from chimney.staterec import codec
from chimney.staterec.codec import NONE32, ObjEntry
from chimney.tcp.segment import ACK, SYN, Segment, decode, pseudo_header
from chimney.tcp.state import TcpCached, TcpConst, TcpDelegated, TcpState

OUR_MAC = bytes.fromhex("02c41e000001")       # the stack under test
PEER_MAC = bytes.fromhex("02c41e0000fe")
OUR_IP, PEER_IP = "10.9.0.2", "10.9.0.1"
OUR_PORT, PEER_PORT = 7000, 40001
PEER_ISS = 5000                               # the peer's initial sequence number
M32 = (1 << 32) - 1


def ipv4_frame(tcp: bytes) -> bytes:
    """An Ethernet frame from the peer to the stack carrying `tcp` as is."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                      ipaddress.ip_address(PEER_IP).packed, ipaddress.ip_address(OUR_IP).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return OUR_MAC + PEER_MAC + b"\x08\x00" + hdr + tcp


def raw_tcp(*, seq: int, ack: int, flags: int, window: int = 65535, options: bytes = b"",
            payload: bytes = b"", urgent: int = 0) -> bytes:
    """TCP bytes with exactly these options (padded to 4 bytes with EOL), checksummed."""
    options += b"\x00" * (-len(options) % 4)
    raw = bytearray(struct.pack("!HHIIBBHHH", PEER_PORT, OUR_PORT, seq & M32, ack & M32,
                                ((20 + len(options)) // 4) << 4, flags, window, 0, urgent)
                    + options + payload)
    struct.pack_into("!H", raw, 16, checksum(pseudo_header(PEER_IP, OUR_IP, len(raw)) + bytes(raw)))
    return bytes(raw)


def decode_frame(f: bytes) -> Segment | None:
    if f[12:14] != b"\x08\x00" or f[23] != 6:
        return None
    ihl = (f[14] & 15) * 4
    tot = struct.unpack_from("!H", f, 16)[0]
    assert f[20] & 0x40, "DF set on every segment"
    return decode(f[14 + ihl:14 + tot], OUR_IP, PEER_IP)      # checksum verified


class _Peer:
    seq: int
    ack: int
    ts_peer = 1                 # the peer's TSval clock (ticks as the test likes)

    def segment(self, **kw) -> Segment:
        for k in ("seq", "ack"):
            if k not in kw:
                kw[k] = getattr(self, k)
        kw.setdefault("flags", ACK)
        kw.setdefault("window", 65535)
        if self.timestamps and "tsval" not in kw:
            kw["tsval"], kw["tsecr"] = self.ts_peer, self.ts_echo
        return Segment(PEER_PORT, OUR_PORT, **kw)

    def feed(self, **kw) -> list[Segment]:
        """Send one segment (fields default to the peer's state); returns out()."""
        return self.feed_raw(self.segment(**kw).encode(PEER_IP, OUR_IP))

    def sent(self, segs: list[Segment]) -> list[Segment]:
        for s in segs:
            if s.tsval is not None:
                self.ts_echo = s.tsval
        return segs


class SoftwarePeer(_Peer):
    name = "software"

    def __init__(self, config=None):
        self.t = 1000.0
        self.frames: list[bytes] = []
        self.iface = Interface(OUR_MAC, ipv4=(OUR_IP, 24), send_frame=self.frames.append,
                               clock=lambda: self.t)
        self.stack = HostStack(self.iface, config=config, clock=lambda: self.t)
        self.iface.arp_cache.learn(ipaddress.ip_address(PEER_IP), PEER_MAC, self.t, confirmed=True)
        self.listener = self.stack.listen(OUR_PORT)
        self.flow = None
        self.timestamps = False
        self.ts_echo = 0
        self.got = bytearray()

    def syn(self, *, options: bytes | None = None, **kw) -> list[Segment]:
        """The peer's SYN (raw options when given); returns what the stack answered."""
        self.seq = PEER_ISS
        if options is not None:
            return self.feed_raw(raw_tcp(seq=PEER_ISS, ack=0, flags=SYN, options=options))
        kw.setdefault("mss", 1460)
        return self.feed(flags=SYN, ack=0, **kw)

    def establish(self, *, timestamps=False, sack=False, wscale=None, mss=1460) -> Segment:
        """Handshake from the peer; returns the stack's SYN-ACK."""
        self.timestamps = timestamps
        out = self.syn(mss=mss, sack_permitted=sack, wscale=wscale)
        synack = next(s for s in out if s.syn)
        self.seq, self.ack = PEER_ISS + 1, synack.seq + 1
        assert self.feed() == []
        self.flow = self.listener.take()
        assert self.flow is not None and self.flow.conn.established
        return synack

    def feed_raw(self, tcp: bytes) -> list[Segment]:
        self.iface.on_frame(ipv4_frame(tcp))
        self.stack.flush()
        return self.out()

    def out(self) -> list[Segment]:
        self.stack.flush()
        segs = [s for s in map(decode_frame, self.frames) if s is not None]
        self.frames.clear()
        return self.sent(segs)

    def advance(self, secs: float) -> list[Segment]:
        end = self.t + secs
        while self.t < end:
            self.t = min(end, self.t + 0.01)
            self.stack.poll()
        return self.out()

    def app_send(self, data: bytes) -> list[Segment]:
        n = self.flow.conn.send(data, self.t)
        assert n == len(data)
        return self.out()

    def app_recv(self) -> bytes:
        while b := self.flow.conn.recv(1 << 20, self.t):
            self.got += b
        return bytes(self.got)

    def reset(self) -> bool:
        return self.flow.conn.reset

    def app_close(self) -> list[Segment]:
        """The application shuts down writing: FIN after the data."""
        self.flow.conn.shutdown_write(self.t)
        return self.out()

    def eof(self) -> bool:
        self.app_recv()
        return self.flow.conn.eof

    @property
    def state(self) -> str:
        return self.flow.conn.state.name

    def close(self) -> None:
        pass


OUR_ISS = 1000                  # SND.UNA of the offloaded tree
RECV_BUFS = 16


class OffloadPeer(_Peer, Rig):
    """The TOE in process on test_toe_engine's Rig (a Nic over a memfd of guest RAM, a
    datagram socketpair for its wire, the clock injected); _Peer's segment helpers
    come first."""
    name = "offload"

    def __init__(self):
        Rig.__init__(self)
        self.ctx = None
        self.got = bytearray()
        self.events: list[dict] = []
        self.completions: list[dict] = []
        self.bufs: dict[int, Buf] = {}
        self.timestamps = False
        self.ts_echo = 0

    def establish(self, *, timestamps=False, sack=False, wscale=None, mss=1460, rcv_wnd=65535,
                  recv_bufs=RECV_BUFS, path_mtu=1500, cwnd=14600) -> None:
        """Offload an established connection: the peer's next byte PEER_ISS+1, ours OUR_ISS."""
        self.timestamps = timestamps
        self.seq, self.ack = PEER_ISS + 1, OUR_ISS
        const = TcpConst(local_ip=OUR_IP, local_port=OUR_PORT, remote_ip=PEER_IP,
                         remote_port=PEER_PORT, remote_mss=mss, timestamps=timestamps, sack=sack,
                         window_scaling=wscale is not None, snd_wscale=wscale or 0,
                         rcv_wscale=wscale or 0)
        d = TcpDelegated(state=TcpState.ESTABLISHED, rcv_nxt=self.seq, rcv_wnd=rcv_wnd,
                         snd_una=OUR_ISS, snd_nxt=OUR_ISS, snd_max=OUR_ISS, snd_wnd=65535,
                         max_snd_wnd=65535, snd_wl1=self.seq, cwnd=cwnd, ssthresh=1 << 30,
                         ts_recent=self.ts_peer if timestamps else 0, ts_time=1)
        tree = [ObjEntry(hw.OBJ_NEIGHBOR, 11, NONE32, codec.Neighbor(OUR_MAC, PEER_MAC)),
                ObjEntry(hw.OBJ_PATH, 12, 0, codec.Path(OUR_IP, PEER_IP, path_mtu)),
                ObjEntry(hw.OBJ_TCP, 13, 1, codec.Tcp(const, TcpCached(nagle=False), d))]
        if path_mtu > self.nic.mtu:         # the NIC refuses a path MTU above its own
            self.nic.reg_write(hw.REG_MTU, 4, path_mtu)
        c, st = self.drv.initiate(tree)
        assert c["status"] == hw.ST_SUCCESS and [s.status for s in st] == [0, 0, 0], (c, st)
        self.ctx = st[2].nic_ctx
        for i in range(recv_bufs):
            self._post_recv(100 + i)
        self.pump()

    def _post_recv(self, tag: int) -> None:
        b = self.bufs.get(tag) or self.alloc(4096)
        self.bufs[tag] = b
        self.drv.orecv(self.ctx, b.iova, 4096, tag=tag)

    def feed_raw(self, tcp: bytes) -> list[Segment]:
        self.peer.send(ipv4_frame(tcp))
        self.pump()
        return self.out()

    def out(self) -> list[Segment]:
        segs = []
        while True:
            try:
                f = self.peer.recv(65536)
            except BlockingIOError:
                break
            s = decode_frame(f)
            if s is not None:
                segs.append(s)
        return self.sent(segs)

    def advance(self, secs: float) -> list[Segment]:
        end = self.now + secs
        while self.now < end:
            self.now = min(end, self.now + 0.01)
            self.pump()
        return self.out()

    def app_send(self, data: bytes) -> list[Segment]:
        b = self.alloc(len(data))
        b.mem[:] = data
        self.drv.osend(self.ctx, b.iova, len(data), tag=1)
        self.pump()
        return self.out()

    def _collect(self) -> None:
        self.events += [e for e in self.drv.pop(hw.EVENTQ) if e["kind"] != hw.EV_SEND_BACKLOG]
        for r in self.drv.pop(hw.OCOMPLQ_FIRST):
            self.completions.append(r)
            if r["kind"] == hw.OC_RECV_DONE and r["status"] == hw.ST_SUCCESS:
                self.got += bytes(self.bufs[r["tag"]].mem[:r["len"]])
                self._post_recv(r["tag"])
        self.pump()

    def app_recv(self) -> bytes:
        self._collect()
        return bytes(self.got)

    def reset(self) -> bool:
        self._collect()
        return any(e["kind"] == hw.EV_ABORT for e in self.events)

    def app_close(self) -> list[Segment]:
        self.drv.osend(self.ctx, 0, 0, tag=2, flags=hw.OSF_DISCONNECT)
        self.pump()
        return self.out()

    def eof(self) -> bool:
        self._collect()
        return any(e["kind"] == hw.EV_DISCONNECT for e in self.events)

    @property
    def state(self) -> str:
        """The TOE's state of the connection (a QUERY)."""
        self._collect()
        if any(e["kind"] == hw.EV_TIME_WAIT for e in self.events):
            return "TIME_WAIT"
        c, recs = self.drv.query([self.ctx])
        assert c["status"] == hw.ST_SUCCESS, c
        return recs[0].state.delegated.state.name

    def close(self) -> None:
        self.nic.close()
        self.wire.close()
        self.peer.close()


def make_peer(kind: str):
    return SoftwarePeer() if kind == "software" else OffloadPeer()


def data(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


class Received:
    """The stack's outgoing byte stream as the peer sees it: segments (first
    transmissions, retransmissions, probes, overlapping or not) laid down by
    sequence number from `base`, n bytes expected."""

    def __init__(self, base: int, n: int):
        self.base, self.buf, self.have = base, bytearray(n), bytearray(n)

    def add(self, segs) -> None:
        for s in segs:
            off = (s.seq - self.base) & M32
            for i, b in enumerate(s.payload):
                if off + i < len(self.buf):
                    if self.have[off + i]:
                        assert self.buf[off + i] == b, f"byte {off + i} sent twice, differently"
                    self.buf[off + i], self.have[off + i] = b, 1

    def top(self) -> int:
        """Offset of the first byte not yet seen."""
        i = self.have.find(0)
        return len(self.buf) if i < 0 else i

    def bytes(self) -> bytes:
        return bytes(self.buf[:self.top()])


def take_all(peer, rx: Received, rounds: int = 50, window: int = 65535) -> None:
    """Acknowledge what has arrived, in order, until the whole stream is in rx
    (each round the retransmission timer may fire)."""
    for _ in range(rounds):
        if rx.top() == len(rx.buf):
            return
        rx.add(peer.feed(ack=rx.base + rx.top(), window=window) + peer.advance(1.1))
