"""The host stack's software TCP on the host bus: a HostStack on a Miniport
against a real device process whose TAP sits in a namespace with a Linux peer.
Bulk transfers both ways with the guest as client and as server (sha256 on
both ends, throughput printed: run with -s), once over IPv6, RST for a closed
port, and a garbled TCP segment from the peer counted without harm.

The transfer size is CHIMNEY_TCP_MB (default 10 MB; IPv6 uses a fifth of it)."""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from chimney.guest.bringup import bring_up
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.iface import Interface
from chimney.guest.stack.socket import SHUT_WR, connect, listen
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs
from chimney.tcp import Segment

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

ADDR = PeerAddrs()
TAP = "chim0"
MB = float(os.environ.get("CHIMNEY_TCP_MB", "10"))
N = int(MB * 1_000_000)
N6 = N // 5
IO_TIMEOUT = 120        # seconds for one whole bulk transfer


@pytest.fixture
def stack(tmp_path):
    with Netns("tcp") as ns:
        with DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=ns.name,
                           log_path=str(tmp_path / "device.log")) as dev:
            ns.configure_peer(TAP, ADDR)
            g = bring_up(socket=dev.socket, ip=(ADDR.guest4, ADDR.prefix4),
                         ip6=[(ADDR.guest6, ADDR.prefix6)])
            mp, st = g.mp, g.stack
            try:
                yield st, mp, ns
            finally:
                g.close()
            assert dev.alive, dev.log_text()
        assert st.iface.stats["drop_internal_error"] == 0, repr(st.iface.last_error)
        assert st.iface.stats["handler_errors"] == 0, repr(st.iface.last_error)
        assert st.stats["tcp_internal_error"] == 0, repr(st.last_error)
        assert st.stats["tx_errors"] == 0, repr(st.last_error)


def peer_mac(ns) -> bytes:
    return bytes.fromhex(ns.run("cat", f"/sys/class/net/{TAP}/address").stdout.strip().replace(":", ""))


def rate(n: int, secs: float) -> str:
    return f"{n / 1e6:.1f} MB in {secs:.2f} s = {n / 1e6 / max(secs, 1e-9):.2f} MB/s"


def start_peer(ns, script, *args) -> subprocess.Popen:
    return ns.popen(sys.executable, "-u", "-c", script, *map(str, args),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_peer(st, proc, timeout=IO_TIMEOUT) -> dict:
    """Serve the stack until the peer exits; its last stdout line as JSON."""
    try:
        st.run_until(lambda: proc.poll() is not None, timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


# The peer as server: takes our bytes until EOF, answers their sha256 (64 hex
# characters), then sends n random bytes and closes; prints the sha of those.
PEER_SERVER = r"""
import hashlib, json, os, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port)); ls.listen(1); ls.settimeout(60)
print("ready", flush=True)
c, _ = ls.accept(); c.settimeout(60)
h, got = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); got += len(b)
c.sendall(h.hexdigest().encode())
data = os.urandom(n)
c.sendall(data)
c.close()
print(json.dumps({"got": got, "sent_sha": hashlib.sha256(data).hexdigest()}))
"""


def guest_client_transfer(st, ns, peer_ip: str, n: int, port: int):
    proc = start_peer(ns, PEER_SERVER, peer_ip, port, n)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        data = os.urandom(n)
        s = connect(st, peer_ip, port, timeout=10)
        t0 = time.monotonic()
        s.sendall(data, timeout=IO_TIMEOUT)
        s.shutdown(SHUT_WR)
        digest = s.recv_exactly(64, timeout=IO_TIMEOUT)
        t1 = time.monotonic()
        h, got = hashlib.sha256(), 0
        while True:
            b = s.recv(1 << 16, timeout=IO_TIMEOUT)
            if not b:
                break
            h.update(b)
            got += len(b)
        t2 = time.monotonic()
        flow = s.flow
        s.close()
        res = finish_peer(st, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert res["got"] == n
    assert digest.decode() == hashlib.sha256(data).hexdigest()
    assert got == n and h.hexdigest() == res["sent_sha"]
    print(f"\n[{peer_ip}] guest -> peer: {rate(n, t1 - t0)}; peer -> guest: {rate(n, t2 - t1)}; "
          f"software TCP sent {flow.data_segments_out} data segments, {flow.segments_out} in all")
    assert flow.data_segments_out >= n // 1460
    return flow


@needs_root
def test_guest_client_bulk_ipv4(stack):
    st, _, ns = stack
    guest_client_transfer(st, ns, ADDR.peer4, N, 5001)
    assert st.stats["tcp_drop_malformed"] == 0 and st.stats["tcp_send_errors"] == 0


@needs_root
def test_guest_client_bulk_ipv6(stack):
    st, _, ns = stack
    guest_client_transfer(st, ns, ADDR.peer6, N6, 5002)
    assert st.stats["tcp_drop_malformed"] == 0 and st.stats["tcp_send_errors"] == 0


# The peer as client: connects to us, sends n random bytes, shuts down its
# write side, reads ours to EOF; prints both hashes and its timings.
PEER_CLIENT = r"""
import hashlib, json, os, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port), timeout=60)
data = os.urandom(n)
t0 = time.monotonic()
c.sendall(data)
c.shutdown(socket.SHUT_WR)
t1 = time.monotonic()
h, got = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); got += len(b)
t2 = time.monotonic()
c.close()
print(json.dumps({"sent_sha": hashlib.sha256(data).hexdigest(), "got": got,
                  "got_sha": h.hexdigest(), "t_send": t1 - t0, "t_recv": t2 - t1}))
"""


@needs_root
def test_guest_server_bulk_ipv4(stack):
    st, _, ns = stack
    ls = listen(st, 6001)
    proc = start_peer(ns, PEER_CLIENT, ADDR.guest4, 6001, N)
    try:
        s, peer = ls.accept(timeout=10)
        assert peer[0] == ADDR.peer4
        t0 = time.monotonic()
        h, got = hashlib.sha256(), 0
        while True:
            b = s.recv(1 << 16, timeout=IO_TIMEOUT)
            if not b:
                break
            h.update(b)
            got += len(b)
        t1 = time.monotonic()
        data = os.urandom(N)
        s.sendall(data, timeout=IO_TIMEOUT)
        s.close()
        res = finish_peer(st, proc)
        t2 = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
    ls.close()
    assert got == N and h.hexdigest() == res["sent_sha"]
    assert res["got"] == N and res["got_sha"] == hashlib.sha256(data).hexdigest()
    print(f"\n[server {ADDR.guest4}] peer -> guest: {rate(N, t1 - t0)}; guest -> peer: {rate(N, t2 - t1)} "
          f"(peer measured {rate(N, res['t_recv'])})")
    # the connection is gone from the table once closed (or in TIME-WAIT)
    st.run_until(lambda: s.flow.key not in st.flows or s.flow.conn.state.name == "TIME_WAIT", 5)
    assert s.flow.key not in st.flows or s.flow.conn.state.name == "TIME_WAIT"


PEER_REFUSED = r"""
import json, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    r = "connected"
except ConnectionRefusedError:
    r = "refused"
except OSError as e:
    r = repr(e)
print(json.dumps({"result": r}))
"""


@needs_root
def test_closed_port_refuses(stack):
    st, _, ns = stack
    ls = listen(st, 6100)       # a listener on another port changes nothing
    before = st.stats["tcp_rst_out"]
    res = finish_peer(st, start_peer(ns, PEER_REFUSED, ADDR.guest4, 6101), timeout=20)
    assert res["result"] == "refused"
    assert st.stats["tcp_rst_out"] == before + 1 and st.stats["tcp_no_connection"] >= 1
    res = finish_peer(st, start_peer(ns, PEER_REFUSED, ADDR.guest6, 6101), timeout=20)
    assert res["result"] == "refused"
    assert st.stats["tcp_rst_out"] == before + 2
    ls.close()


@needs_root
def test_guest_connect_to_closed_port_refused(stack):
    st, _, _ = stack
    for peer in (ADDR.peer4, ADDR.peer6):
        with pytest.raises(ConnectionRefusedError):
            connect(st, peer, 5999, timeout=10)
    assert st.run_until(lambda: not st.flows, 2), st.flows


PEER_ECHO = r"""
import socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(1); ls.settimeout(30)
print("ready", flush=True)
c, _ = ls.accept(); c.settimeout(30)
while True:
    b = c.recv(65536)
    if not b:
        break
    c.sendall(b)
c.close()
print('{"ok": true}')
"""

# TCP segments with a valid IPv4 header from the peer to our connection's
# ports: one with a bad TCP checksum, one whose data offset runs past the end.
INJECT_TCP = r"""
import socket, struct, sys
def csum(b):
    b += b"\0" * (len(b) & 1)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
ifname, dst_mac, src_mac = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
sport, dport = int(sys.argv[4]), int(sys.argv[5])
src, dst = socket.inet_aton(sys.argv[6]), socket.inet_aton(sys.argv[7])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
def ip(tcp):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0x4242, 0x4000, 64, 6, 0, src, dst)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return dst_mac + src_mac + b"\x08\x00" + h + tcp
bad_sum = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x18, 1000, 0xBEEF, 0) + b"garbled!"
bad_off = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 15 << 4, 0x10, 1000, 0, 0)
s.send(ip(bad_sum))
s.send(ip(bad_off))
"""


@needs_root
def test_garbled_segment_counted_connection_goes_on(stack):
    st, mp, ns = stack
    proc = start_peer(ns, PEER_ECHO, ADDR.peer4, 5003)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        s = connect(st, ADDR.peer4, 5003, timeout=10)
        with pytest.raises(BlockingIOError):
            s.recv(10, timeout=0)                   # nothing there yet, not EOF
        with pytest.raises(TimeoutError):
            s.recv(10, timeout=0.2)
        s.sendall(b"before", timeout=10)
        assert s.recv_exactly(6, timeout=10) == b"before"
        lport = s.getsockname()[1]
        before = st.stats["tcp_drop_malformed"]
        ns.run(sys.executable, "-c", INJECT_TCP, TAP, mp.mac.hex(), peer_mac(ns).hex(),
               "5003", str(lport), ADDR.peer4, ADDR.guest4, timeout=10)
        st.run_until(lambda: st.stats["tcp_drop_malformed"] >= before + 2, 5)
        assert st.stats["tcp_drop_malformed"] == before + 2, dict(st.stats)
        msg = os.urandom(100_000)
        s.sendall(msg, timeout=20)
        assert s.recv_exactly(len(msg), timeout=20) == msg
        s.close()
        assert finish_peer(st, proc, timeout=20) == {"ok": True}
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not s.flow.conn.reset and s.flow.conn.error is None


@needs_root
def test_nonblocking_recv_and_accept(stack):
    st, _, ns = stack
    ls = listen(st, 6200)
    with pytest.raises(BlockingIOError):
        ls.accept(timeout=0)
    proc = start_peer(ns, PEER_CLIENT, ADDR.guest4, 6200, 10)
    try:
        s, _ = ls.accept(timeout=10)
        got = b""
        st.run_until(lambda: s.path.eof(), 10)
        while True:
            b = s.recv(4, timeout=0)
            if not b:
                break
            got += b
        assert len(got) == 10
        assert s.recv(4, timeout=0) == b""          # EOF, not BlockingIOError
        s.sendall(b"x" * 5)
        s.close()
        res = finish_peer(st, proc, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert res["got"] == 5 and hashlib.sha256(got).hexdigest() == res["sent_sha"]
    ls.close()


# -- back to back, no device: two HostStacks wired together on a fake clock --------------

class Wire:
    """Two HostStacks whose Interfaces hand frames to each other, on one fake clock."""

    def __init__(self):
        self.t = 1000.0
        clock = lambda: self.t
        self.q = []
        self.a = HostStack(Interface("02:00:00:00:00:0a", ipv4=("10.9.0.1", 24), ipv6=[("fd00:9::1", 64)],
                                     send_frame=lambda f: self.q.append(("b", f)), clock=clock))
        self.b = HostStack(Interface("02:00:00:00:00:0b", ipv4=("10.9.0.2", 24), ipv6=[("fd00:9::2", 64)],
                                     send_frame=lambda f: self.q.append(("a", f)), clock=clock))

    def pump(self, rounds: int = 1) -> None:
        for _ in range(rounds):
            while self.q:
                to, f = self.q.pop(0)
                getattr(self, to).iface.on_frame(f)
            self.t += 0.001
            self.a.poll()
            self.b.poll()


def test_back_to_back_fake_clock():
    w = Wire()
    lst = w.b.listen(7000)
    flow = w.a.open("10.9.0.2", 7000)
    w.pump(5)
    assert flow.conn.established and lst.ready() is not None
    peer = lst.take()
    assert peer.key[3] == flow.key[1] and 49152 <= flow.key[1] <= 65535
    data = os.urandom(300_000)
    off, got = 0, bytearray()
    for _ in range(2000):
        if off < len(data):
            off += flow.conn.send(data[off:off + 65536], w.a.clock())
        got += peer.conn.recv(1 << 20, w.b.clock())
        w.a.flush()
        w.b.flush()
        w.pump()
        if len(got) == len(data):
            break
    assert bytes(got) == data
    assert flow.data_segments_out >= len(data) // 1460 and peer.data_segments_out == 0
    # a SYN to a closed port and a segment for no connection: RST, counted
    before = w.b.stats["tcp_rst_out"]
    w.a.open("10.9.0.2", 7001)
    w.a.open("fd00:9::2", 7001)
    w.pump(3)
    assert w.b.stats["tcp_rst_out"] == before + 2
    refused = [f.conn for f in w.a.flows.values() if f.key[3] == 7001]
    assert len(refused) == 2 and all(c.closed and c.error == "connection refused" for c in refused)
    # malformed: a bad checksum and a short header, counted, never raised
    raw = Segment(flow.key[1], 7000, seq=1, flags=0x10, payload=b"x").encode("10.9.0.1", "10.9.0.2")
    w.b.on_tcp(flow.key[0], peer.key[0], raw[:-1] + b"y")
    w.b.on_tcp(flow.key[0], peer.key[0], raw[:10])
    assert w.b.stats["tcp_drop_malformed"] == 2 and w.b.stats["tcp_internal_error"] == 0
    # retransmission runs on the injected clock: drop a data segment once
    flow.conn.send(b"late", w.a.clock())
    w.a.flush()
    assert w.q and w.q.pop()[0] == "b"
    w.t += 5
    w.pump(3)
    assert peer.conn.recv(10, w.b.clock()) == b"late"
