"""The host stack's lower layers on the host bus: an Interface on a Miniport
against a real device process, whose TAP sits in a namespace with a Linux
peer.  Pings both ways over IPv4, ours over IPv6, ARP and ND learn the peer,
and a garbled frame from the peer is counted, not fatal."""
import ipaddress
import json
import os
import subprocess
import sys

import pytest

from chimney.guest.bringup import bring_up
from chimney.guest.stack import attach, ping_on_miniport, run_on_miniport
from chimney.guest.stack.neigh import REACHABLE
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

ADDR = PeerAddrs()
TAP = "chim0"


@pytest.fixture
def stack(tmp_path):
    with Netns("stack") as ns:
        with DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=ns.name,
                           pcap=str(tmp_path / "wire.pcap"),
                           log_path=str(tmp_path / "device.log")) as dev:
            ns.configure_peer(TAP, ADDR)
            g = bring_up(socket=dev.socket, stack=False)
            mp = g.mp
            try:
                iface = attach(mp, ipv4=(ADDR.guest4, ADDR.prefix4),
                               ipv6=[(ADDR.guest6, ADDR.prefix6)])
                iface.up()
                yield iface, mp, ns
            finally:
                g.close()
            assert dev.alive, dev.log_text()
        assert iface.stats["drop_internal_error"] == 0, repr(iface.last_error)


def peer_mac(ns) -> bytes:
    return bytes.fromhex(ns.run("cat", f"/sys/class/net/{TAP}/address").stdout.strip().replace(":", ""))


PEER_PING = r"""
import json, os, socket, struct, sys, time
def csum(b):
    b += b"\0" * (len(b) & 1)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
dst, count = sys.argv[1], int(sys.argv[2])
v6 = ":" in dst
if v6:      # the kernel fills in ICMPv6 checksums and hands us the message without the IPv6 header
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(0.5)
ident, out = os.getpid() & 0xFFFF, []
REQ, REP = (128, 129) if v6 else (8, 0)
for seq in range(1, count + 1):
    data = b"chimney-peer-%d" % seq
    raw = struct.pack("!BBHHH", REQ, 0, 0, ident, seq) + data
    if not v6:
        raw = raw[:2] + struct.pack("!H", csum(raw)) + raw[4:]
    t0 = time.monotonic(); s.sendto(raw, (dst, 0)); got = None
    end = t0 + 3
    while got is None and time.monotonic() < end:
        try:
            pkt, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        icmp = pkt if v6 else pkt[(pkt[0] & 15) * 4:]
        t, _, c, i, q = struct.unpack("!BBHHH", icmp[:8])
        if t == REP and i == ident and q == seq and src[0] == dst:
            got = {"seq": q, "ok": icmp[8:] == data and (v6 or csum(icmp) == 0), "rtt": time.monotonic() - t0}
    out.append(got)
print(json.dumps(out))
"""


def run_in_peer(iface, mp, ns, script, *args, timeout=15):
    """Run a Python script in the namespace while the interface serves; its stdout."""
    proc = ns.popen(sys.executable, "-c", script, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        run_on_miniport(iface, mp, until=lambda: proc.poll() is not None, timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err.decode()
    return out


def test_peer_pings_us_over_ipv4(stack):
    iface, mp, ns = stack
    replies = json.loads(run_in_peer(iface, mp, ns, PEER_PING, ADDR.guest4, "3"))
    assert [r and r["seq"] for r in replies] == [1, 2, 3], replies
    assert all(r["ok"] for r in replies)
    assert iface.stats["icmp_echo_requests_in"] >= 3 and iface.stats["icmp_echo_replies_out"] >= 3
    assert iface.stats["arp_requests_in"] >= 1 and iface.stats["arp_replies_out"] >= 1


def test_peer_pings_us_over_ipv6(stack):
    iface, mp, ns = stack
    replies = json.loads(run_in_peer(iface, mp, ns, PEER_PING, ADDR.guest6, "3"))
    assert [r and r["seq"] for r in replies] == [1, 2, 3], replies
    assert all(r["ok"] for r in replies)
    assert iface.stats["icmpv6_echo_requests_in"] >= 3 and iface.stats["icmpv6_echo_replies_out"] >= 3
    assert iface.stats["nd_ns_in"] >= 1 and iface.stats["nd_na_out"] >= 1


PEER_UDP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)       # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: let Linux fragment
for n in (100, 4000, 9000):
    s.sendto(bytes(i & 0xFF for i in range(n)), (sys.argv[1], 9999))
"""


def test_peer_sends_fragmented_datagrams(stack):
    """Linux fragments big UDP datagrams on the 1500-byte wire; we reassemble
    and hand them to the registered protocol (UDP here, as TCP will be)."""
    iface, mp, ns = stack
    got = []
    iface.register_protocol(17, lambda src, dst, payload: got.append((src, dst, payload)))
    run_in_peer(iface, mp, ns, PEER_UDP, ADDR.guest4)
    run_on_miniport(iface, mp, until=lambda: len(got) == 3, timeout=5)
    assert [len(p) - 8 for _, _, p in got] == [100, 4000, 9000], dict(iface.stats)
    for src, dst, p in got:
        assert str(src) == ADDR.peer4 and str(dst) == ADDR.guest4
        assert p[8:] == bytes(i & 0xFF for i in range(len(p) - 8))
    assert iface.stats["frag_reassembled"] == 2 and iface.stats["frag_fragments_in"] == 3 + 7
    assert not iface.reassembler.partial


def test_we_ping_peer_over_ipv4_and_ipv6(stack):
    iface, mp, ns = stack
    mac = peer_mac(ns)
    r4 = ping_on_miniport(iface, mp, ADDR.peer4, count=3, payload=b"chimney-v4", timeout=3)
    assert all(r is not None for r in r4), dict(iface.stats)
    assert [r.seq for r in r4] == sorted(r.seq for r in r4) and all(r.payload == b"chimney-v4" for r in r4)
    assert all(0 <= r.rtt < 3 for r in r4)
    e = iface.arp_cache.get(ipaddress.IPv4Address(ADDR.peer4))
    assert e is not None and e.mac == mac and e.state == REACHABLE

    r6 = ping_on_miniport(iface, mp, ADDR.peer6, count=3, payload=b"chimney-v6", timeout=3)
    assert all(r is not None for r in r6), dict(iface.stats)
    assert all(r.payload == b"chimney-v6" and r.src == ipaddress.IPv6Address(ADDR.peer6) for r in r6)
    e6 = iface.nd_cache.get(ipaddress.IPv6Address(ADDR.peer6))
    assert e6 is not None and e6.mac == mac and e6.state == REACHABLE
    # the link-local path works too
    ll = ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:])
    assert ping_on_miniport(iface, mp, ll, timeout=3)[0] is not None, dict(iface.stats)

    # Linux learnt us as well
    neigh = ns.run("ip", "neigh", "show", "dev", TAP).stdout
    assert ADDR.guest4 in neigh and ADDR.guest6 in neigh and mp.mac.hex(":") in neigh
    assert iface.stats["frames_out"] >= 6 and iface.stats["tx_errors"] == 0


INJECT = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
dst, src = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
ip = bytearray(b"\x45\x00\x00\x20\x00\x01\x40\x00\x40\x01\xde\xad" + bytes([10,199,0,1,10,199,0,2]) + bytes(12))
s.send(dst + src + b"\x08\x00" + bytes(ip))                      # bad IPv4 header checksum
s.send(dst + src + b"\x08\x00" + b"\x4f" + bytes(45))           # IHL 15 in a short packet
s.send(dst + src + b"\x08\x06" + b"\xde\xad\xbe\xef" * 4)       # ARP cut short
s.send(dst + src + b"\x86\xdd" + b"\x60" + bytes(20))           # IPv6 header cut short
"""


def test_garbled_frames_from_peer_counted(stack):
    iface, mp, ns = stack
    before = dict(iface.stats)
    ns.run(sys.executable, "-c", INJECT, TAP, mp.mac.hex(), peer_mac(ns).hex(), timeout=10)
    keys = ["drop_ipv4_bad_checksum", "drop_ipv4_truncated", "drop_arp_truncated", "drop_ipv6_truncated"]
    run_on_miniport(iface, mp, until=lambda: all(iface.stats[k] > before.get(k, 0) for k in keys), timeout=5)
    for k in keys:
        assert iface.stats[k] == before.get(k, 0) + 1, (k, dict(iface.stats))
    # and the interface carries on
    assert ping_on_miniport(iface, mp, ADDR.peer4, timeout=3)[0] is not None, dict(iface.stats)
