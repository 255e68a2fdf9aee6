"""The chimney's forward path on the host bus against a Linux peer: segments of an
offloaded connection that only the host stack can parse (IPv4 options, IPv4 and IPv6
fragments) reach the NIC through OSEND FORWARD instead of being dropped by the host
(the connection stalled: the NIC never saw them, the peer retransmitted forever)."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, TCP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from test_ipv4_options_hostbus import OPTIONS, PEER_CLIENT
from test_offload_hostbus import ADDR, TAP, Guest

from chimney.guest.stack.socket import listen

pytestmark = [pytest.mark.netns]
IO_TIMEOUT = 60


def test_offloaded_connection_whose_peer_sends_ip_options(wire):
    """Every segment of the Linux client carries a record-route option: the NIC leaves
    them all to the host, which forwards them; data moves both ways, sha256-verified."""
    dev, ns = wire
    n = 300_000
    g = Guest(dev, policy="always")
    ls = listen(g.stack, 6501)
    proc = ns.popen(sys.executable, "-u", "-c", PEER_CLIENT, ADDR.guest4, "6501", str(n),
                    OPTIONS["nop-padded record route"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        s, _ = ls.accept(timeout=10)
        assert g.stack.run_until(lambda: s.offloaded, 10)
        h, got, t0 = hashlib.sha256(), 0, time.monotonic()
        while time.monotonic() - t0 < IO_TIMEOUT:
            b = s.recv(1 << 16, timeout=IO_TIMEOUT)
            if not b:
                break
            h.update(b)
            got += len(b)
        data = random.Random("opt-guest").randbytes(n)
        s.sendall(data, timeout=IO_TIMEOUT)
        assert s.offloaded and s.upload_count == 0          # the NIC carried it throughout
        s.close()
        g.stack.run_until(lambda: proc.poll() is not None, IO_TIMEOUT)
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err.decode()
        res = json.loads(out.decode().strip().splitlines()[-1])
        assert got == n and h.hexdigest() == res["sent_sha"]
        assert res["got"] == n and res["got_sha"] == hashlib.sha256(data).hexdigest()
        st, ms, cs = g.stack.stats, g.mgr.stats, g.ch.stats
        # the client's data and its ACKs of ours went down the chimney, none was lost
        assert st["tcp_forwarded"] >= n // 1460, dict(st)
        assert ms["segments_forwarded"] == st["tcp_forwarded"]
        assert cs["forwards_done"] == cs["forwards"] and cs["forwards_refused"] == 0
        assert st["tcp_drop_detached"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        ls.close()
        g.close()


# A Linux server that accepts one connection (IPv4 or IPv6), says so, and then only
# reads (it never sends, so the segments injected in its name do not collide with its
# own): the bytes it got, once its time is up or EOF.
SILENT_SERVER = r"""
import json, socket, sys, time
port = int(sys.argv[1])
ls = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
print("listening", flush=True)
c, _ = ls.accept()
c.settimeout(0.2)
end, got = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    try:
        b = c.recv(1 << 16)
    except socket.timeout:
        continue
    if not b:
        break
    got += len(b)
print(json.dumps({"got": got}), flush=True)
"""

# Writes the frames (hex, one a line on stdin) onto the TAP from the namespace side:
# they reach the NIC as if off the wire.
INJECT = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for line in sys.stdin:
    if line.strip():
        s.send(bytes.fromhex(line.strip()))
"""


def peer_segments(q, family: int, payloads: list[bytes]) -> list[tuple]:
    """TCP segments in the Linux peer's name that continue the stream the NIC expects
    (its RCV.NXT, the timestamp it last took): (IP packet (scapy), payload) each."""
    const, d = q.const, q.delegated
    seq, out = d.rcv_nxt, []
    for p in payloads:
        opts = [("NOP", None), ("NOP", None), ("Timestamp", (d.ts_recent, d.ts_time))] \
            if const.timestamps else []
        tcp = TCP(sport=const.remote_port, dport=const.local_port, seq=seq, ack=d.snd_nxt,
                  flags="PA", window=min(0xFFFF, d.snd_wnd >> const.snd_wscale), options=opts)
        ip = IP(src=ADDR.peer4, dst=ADDR.guest4, id=random.randrange(1 << 16), flags=0) \
            if family == 4 else IPv6(src=ADDR.peer6, dst=ADDR.guest6)
        out.append(ip / tcp / p)
        seq = (seq + len(p)) & 0xFFFFFFFF
    return out


def fragmented(pkt, family: int, size: int = 1024) -> list:
    """pkt in fragments of `size` bytes of its IP payload, sent last one first."""
    if family == 4:
        frags = fragment(IP(bytes(pkt)), fragsize=size)
    else:
        whole = IPv6(bytes(pkt))
        upper = bytes(whole.payload)            # TCP header and payload, checksum computed
        ident = random.randrange(1 << 32)
        frags = []
        for off in range(0, len(upper), size):
            chunk = upper[off:off + size]
            more = off + size < len(upper)
            frags.append(IPv6(src=whole.src, dst=whole.dst) /
                         IPv6ExtHdrFragment(nh=6, offset=off // 8, m=int(more), id=ident) / chunk)
    return frags[::-1]


@pytest.mark.parametrize("family", [4, 6])
def test_fragmented_segments_on_an_offloaded_connection_reach_the_application(wire, family):
    """Three segments in the peer's name, the first and the last in IP fragments (which
    the NIC leaves to the host: it reassembles and forwards), the middle one whole (the
    NIC takes it off the wire itself): the application reads them in order."""
    dev, ns = wire
    port = 6510 + family
    srv = ns.popen(sys.executable, "-u", "-c", SILENT_SERVER, str(port), "30",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert srv.stdout.readline().strip() == b"listening"
    g = Guest(dev, policy="always", ip6=[(ADDR.guest6, ADDR.prefix6)])
    try:
        s = g.stack.connect(ADDR.peer4 if family == 4 else ADDR.peer6, port, timeout=10)
        assert g.stack.run_until(lambda: s.offloaded, 10)
        s.sendall(b"hello", timeout=10)             # the NIC has a send window and an RTT
        assert g.stack.run_until(lambda: s.path.outstanding == 0, 10)
        (q,) = g.mgr.query([s]).values()
        rnd = random.Random(f"frag{family}")
        payloads = [rnd.randbytes(3000), rnd.randbytes(1000), rnd.randbytes(2500)]
        a, b, c = peer_segments(q["state"], family, payloads)
        mac = ns.run("cat", f"/sys/class/net/{TAP}/address").stdout.strip()
        eth = Ether(src=mac, dst=":".join(f"{x:02x}" for x in g.mp.mac))
        frames = [eth / f for f in fragmented(a, family)] + [eth / b] + \
            [eth / f for f in fragmented(c, family)]
        inj = ns.popen(sys.executable, "-c", INJECT, TAP, stdin=subprocess.PIPE,
                       stderr=subprocess.PIPE)
        _, err = inj.communicate("\n".join(bytes(f).hex() for f in frames).encode(), timeout=20)
        assert inj.returncode == 0, err.decode()
        want = b"".join(payloads)
        got = s.recv_exactly(len(want), timeout=20)
        assert got == want
        st = g.stack.iface.stats
        assert st["frag_reassembled" if family == 4 else "frag6_reassembled"] == 2
        assert g.stack.stats["tcp_forwarded"] == 2 and g.ch.stats["forwards_done"] == 2
        assert s.offloaded and s.upload_count == 0
    finally:
        g.close()
        if srv.poll() is None:
            srv.kill()
        srv.communicate()
