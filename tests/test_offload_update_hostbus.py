"""The chimney's state interface driven by the host stack, end to end on the host
bus: the device process's TAP in namespace R (a Linux peer on the wire, and a
router), a second namespace S behind R (a veth hop) with an off-link peer.

    guest 10.199.0.2 --TAP-- R: 10.199.0.1 (chim0), 10.199.0.3 (gw2: a macvlan, its own MAC)
                              R: 10.198.0.1 (r0) --veth-- S: 10.198.0.2 (r1)

Each test moves a transfer offloaded and checks every byte, and proves from the
NIC (QUERY) or the wire what the update did: a neighbour's MAC change (gratuitous
ARP / unsolicited NA), a smaller MTU on the router's hop (its ICMP "fragmentation
needed"), a gateway change (the path moves to the macvlan's neighbour), no route
left (INVALIDATE, upload, an error for the application), and a reachability
query answered after a probe."""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest
from test_offload_hostbus import ADDR, close_and_finish, pattern, pump

from chimney import hw
from chimney.guest.bringup import bring_up
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

TAP = "chim0"
FAR4, ROUTER4, GW2 = "10.198.0.2", "10.198.0.1", "10.199.0.3"
FAR6, ROUTER6 = "fd00:c41f::2", "fd00:c41f::1"
NEW_MAC = "02:c4:1e:00:00:77"

# A Linux peer (IPv4 and IPv6): accepts one connection, sends `send` bytes of
# pattern(seed) while reading to EOF, prints the bytes and sha256 it received.
PEER = r'''
import hashlib, json, random, select, socket, sys, time
a = json.loads(sys.argv[1])
ls = socket.create_server(("::", a["port"]), family=socket.AF_INET6, dualstack_ipv6=True)
print("listening", flush=True)
c, _ = ls.accept()
data = random.Random(a["seed"]).randbytes(a["send"])
c.setblocking(False)
h, got, off, shut = hashlib.sha256(), 0, 0, False
end = time.monotonic() + a.get("timeout", 90)
while time.monotonic() < end:
    r, w, _ = select.select([c], [c] if off < len(data) else [], [], 0.2)
    if w:
        try:
            off += c.send(data[off:off + 65536])
        except BlockingIOError:
            pass
    if off >= len(data) and not shut:
        c.shutdown(socket.SHUT_WR)
        shut = True
    if r:
        try:
            b = c.recv(1 << 20)
        except (BlockingIOError, ConnectionResetError):
            b = None
        if b == b"":
            break
        if b:
            h.update(b)
            got += len(b)
print(json.dumps({"got": got, "sha256": h.hexdigest(), "sent": off}), flush=True)
'''


def peer(ns, port, send=0, seed="peer"):
    p = ns.popen(sys.executable, "-c", PEER, json.dumps({"port": port, "send": send, "seed": seed}),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"listening"
    return p


def peer_result(g, p, timeout=60) -> dict:
    g.stack.run_until(lambda: p.poll() is not None, timeout)
    out, err = p.communicate(timeout=10)
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()
    return json.loads(lines[-1])


def sysfs(ns, path) -> str:
    return ns.run("cat", path).stdout.strip()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upd")
    pcap = tmp / "wire.pcap"
    with Netns("updr") as r, Netns("upds") as s, DeviceProcess(
            str(tmp / "nic.sock"), tap=TAP, netns=r.name, pcap=str(pcap),
            log_path=str(tmp / "device.log")) as dev:
        for ns in (r, s):       # no duplicate address detection on the veth (its addresses are ours)
            ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        r.configure_peer(TAP, ADDR)
        r.run("ip", "link", "add", "r0", "type", "veth", "peer", "name", "r1", "netns", s.name)
        r.run("ip", "addr", "add", f"{ROUTER4}/24", "dev", "r0")
        r.run("ip", "link", "set", "r0", "up")
        s.run("ip", "addr", "add", f"{FAR4}/24", "dev", "r1")
        s.run("ip", "link", "set", "r1", "up")
        s.run("ip", "route", "add", "default", "via", ROUTER4)
        r.run("ip", "-6", "addr", "add", f"{ROUTER6}/64", "dev", "r0", "nodad")
        s.run("ip", "-6", "addr", "add", f"{FAR6}/64", "dev", "r1", "nodad")
        s.run("ip", "-6", "route", "add", "default", "via", ROUTER6)
        r.run("ip", "link", "add", "gw2", "link", TAP, "type", "macvlan", "mode", "bridge")
        r.run("ip", "addr", "add", f"{GW2}/24", "dev", "gw2")
        r.run("ip", "link", "set", "gw2", "up")
        for k in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.arp_ignore=1",
                  f"net.ipv4.conf.{TAP}.arp_notify=1", f"net.ipv6.conf.{TAP}.ndisc_notify=1",
                  "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{TAP}.rp_filter=0",
                  "net.ipv4.conf.gw2.rp_filter=0"):
            r.run("sysctl", "-qw", k)
        yield dev, r, s, pcap
        assert dev.alive, dev.log_text()[-3000:]
        assert "Traceback" not in dev.log_text(), dev.log_text()[-3000:]


class Guest:
    def __init__(self, dev, **kw):
        self.g = bring_up(socket=dev.socket, ip=(ADDR.guest4, ADDR.prefix4),
                          ip6=[(ADDR.guest6, ADDR.prefix6)], offload="never", require_offload=True, **kw)
        self.stack, self.ch, self.mgr = self.g.stack, self.g.chimney, self.g.offload
        self.iface = self.stack.iface

    def query(self, ctx):
        cmd = self.ch.wait(self.ch.query([ctx]))
        (e,) = cmd.result
        assert e.status == hw.ST_SUCCESS and e.state is not None, e
        return e

    def close(self):
        try:
            self.g.mp.down()
        finally:
            self.g.bus.close()


@pytest.fixture
def guest(net):
    g = Guest(net[0])
    yield g
    g.close()


def transfer(g, s, n_out, p, seed, until_mid, mid, n_in=0, peer_seed="peer"):
    """Both directions to the end, `mid()` once until_mid(off, rx) holds; checks every byte."""
    out = pattern(seed, n_out)
    rx = bytearray()
    off = pump(g, s, out, 0, rx, until_mid)
    mid()
    off = pump(g, s, out, off, rx, lambda o, r: o >= n_out and len(r) >= n_in, timeout=90)
    assert bytes(rx) == pattern(peer_seed, n_in)
    close_and_finish(g, s)
    res = peer_result(g, p)
    assert res["got"] == n_out and res["sha256"] == hashlib.sha256(out).hexdigest()
    return res


# -- 1. a neighbour's MAC changes mid-transfer --------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_peer_mac_change_updates_the_offloaded_neighbour(net, guest, family):
    _, r, _, _ = net
    g = guest
    old_mac = sysfs(r, f"/sys/class/net/{TAP}/address")
    addr = ADDR.peer4 if family == 4 else ADDR.peer6
    port = 7100 + family
    n = 6_000_000
    p = peer(r, port, send=n, seed="mac-peer")
    s = g.stack.connect(addr, port, timeout=10)
    assert s.offload() and s.offloaded
    nobj = g.mgr.neighbours[str(ipaddress.ip_address(addr))]
    assert g.query(nobj.ctx).state.dst_mac == bytes.fromhex(old_mac.replace(":", ""))
    new = bytes.fromhex(NEW_MAC.replace(":", ""))
    seen = {}

    def change_mac():
        r.run("ip", "link", "set", "dev", TAP, "address", NEW_MAC)
        assert g.stack.run_until(lambda: g.mgr.stats["neigh_update_mac"] >= 1, 10), dict(g.mgr.stats)
        seen["dst_mac"] = g.query(nobj.ctx).state.dst_mac      # what the NIC sends to now
    try:
        transfer(g, s, n, p, "mac-guest", lambda o, rx: o >= n // 3 and len(rx) >= n // 3,
                 change_mac, n_in=n, peer_seed="mac-peer")
    finally:
        r.run("ip", "link", "set", "dev", TAP, "address", old_mac)
    assert seen["dst_mac"] == new
    assert s.upload_count == 1 and s.offload_count == 1      # the close's upload only
    assert g.iface.stats["arp_in" if family == 4 else "nd_na_in"] > 0
    print(f"\nIPv{family}: MAC changed mid-transfer, {g.mgr.stats['neigh_update_mac']} UPDATE(s), "
          f"{n} bytes each way verified")


# -- 2. a smaller MTU on the router's hop -------------------------------------------------------

def guest_segments(pcap, sport):
    """(seq, IP packet length) of every TCP data segment from our port `sport` in the
    capture (pcapng; IPv4 or IPv6)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap
    out = []
    for pkt in rdpcap(str(pcap)):
        ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        tcp = pkt.getlayer(TCP)
        if ip is None or tcp is None or tcp.sport != sport or not bytes(tcp.payload):
            continue
        total = ip.len if ip.version == 4 else 40 + ip.plen
        out.append((tcp.seq, total))
    return out


@pytest.mark.parametrize("family", [4, 6])
def test_router_mtu_drop_updates_the_path_mtu(net, guest, family):
    _, r, s_ns, pcap = net
    g = guest
    # 1280: IPv6's minimum (below it Linux takes IPv6 off r0 altogether)
    far, mtu = (FAR4, 1280) if family == 4 else (FAR6, 1280)
    g.iface.set_gateway(family, ADDR.peer4 if family == 4 else ADDR.peer6)
    n = 8_000_000
    p = peer(s_ns, 7200 + family)
    s = g.stack.connect(far, 7200 + family, timeout=10)
    assert s.offload() and s.offloaded
    pobj = g.mgr.paths[(ADDR.guest4 if family == 4 else ADDR.guest6, far)]
    assert g.query(pobj.ctx).state.path_mtu == 1500
    mark = {}

    def lower_mtu():
        r.run("ip", "link", "set", "dev", "r0", "mtu", str(mtu))
        out = pattern("pmtu", n)
        off = [mark["off"]]

        def more():     # keep sending: the router drops what is too big and says so
            if off[0] < n and s.path.writable():
                off[0] += s.send(out[off[0]:off[0] + 65536], timeout=0)
            return g.mgr.stats["path_mtu_updates"] >= 1
        assert g.stack.run_until(more, 15), (dict(g.mgr.stats), dict(g.iface.stats))
        mark["off2"] = off[0]
        mark["snd_max"] = g.query(s.path.ctx).state.delegated.snd_max
        mark["path_mtu"] = g.query(pobj.ctx).state.path_mtu
    out = pattern("pmtu", n)
    rx = bytearray()
    try:
        mark["off"] = pump(g, s, out, 0, rx, lambda o, _: o >= n // 4)
        lower_mtu()
        pump(g, s, out, mark["off2"], rx, lambda o, _: o >= n, timeout=90)
        close_and_finish(g, s)
        res = peer_result(g, p)
    finally:
        r.run("ip", "link", "set", "dev", "r0", "mtu", "1500")
    assert res["got"] == n and res["sha256"] == hashlib.sha256(out).hexdigest()
    assert mark["path_mtu"] == mtu and g.mgr.stats["path_mtu_updates"] == 1
    assert g.iface.stats["icmp_frag_needed_in" if family == 4 else "icmpv6_packet_too_big_in"] >= 1
    # every segment the NIC sent from the update on fits the new MTU
    sport = s.flow.key[1]
    later = [t for q, t in guest_segments(pcap, sport) if (q - mark["snd_max"]) % (1 << 32) < (1 << 31)]
    assert later and max(t for t in later) <= mtu, max(later)
    print(f"\nIPv{family} path MTU 1500 -> {mtu} mid-transfer: {len(later)} segments after the UPDATE, "
          f"largest {max(later)} bytes; {n} bytes verified")


# -- 3. a gateway change moves the path to another neighbour -------------------------------------

def test_gateway_change_moves_the_path_to_the_new_neighbour(net, guest):
    _, r, s_ns, _ = net
    g = guest
    g.iface.set_gateway(4, ADDR.peer4)
    n = 6_000_000
    p = peer(s_ns, 7301, send=n, seed="gw-peer")
    s = g.stack.connect(FAR4, 7301, timeout=10)
    assert s.offload() and s.offloaded
    pobj = g.mgr.paths[(ADDR.guest4, FAR4)]
    old_n = pobj.parent
    gw2_mac = bytes.fromhex(sysfs(r, "/sys/class/net/gw2/address").replace(":", ""))
    seen = {}

    def switch():
        seen["rx0"] = int(sysfs(r, "/sys/class/net/gw2/statistics/rx_bytes"))
        g.iface.set_gateway(4, GW2)
        assert g.stack.run_until(lambda: g.mgr.stats["path_moves"] >= 1 or
                                 g.mgr.stats["path_move_refused"], 10), dict(g.mgr.stats)
        e = g.query(pobj.ctx)
        seen["parent"], seen["new"] = e.parent, pobj.parent
        # the stream bytes the NIC had sent when the move took effect: the rest goes to GW2
        snd_max = g.query(s.path.ctx).state.delegated.snd_max
        seen["sent"] = (snd_max - s.path.snd_una0) % (1 << 32)
    transfer(g, s, n, p, "gw-guest", lambda o, rx: o >= n // 3 and len(rx) >= n // 3, switch,
             n_in=n, peer_seed="gw-peer")
    rx_gw2 = int(sysfs(r, "/sys/class/net/gw2/statistics/rx_bytes")) - seen["rx0"]
    assert g.mgr.stats["path_moves"] == 1 and not g.mgr.stats["path_move_refused"], g.mgr.last_errors
    new = seen["new"]
    assert new is not old_n and new.key == GW2 and new.mac == gw2_mac
    assert seen["parent"] == new.ctx                # the NIC's path hangs off the new neighbour
    assert rx_gw2 >= n - seen["sent"] > 0           # and what the NIC sent since went to its MAC
    assert s.upload_count == 1 and s.offload_count == 1
    print(f"\ngateway {ADDR.peer4} -> {GW2} mid-transfer: path moved by UPDATE; "
          f"{rx_gw2} bytes reached {GW2}'s MAC; {n} bytes each way verified")


# -- 4. no route left: INVALIDATE, upload, an error ----------------------------------------------

def test_route_removed_invalidates_uploads_and_fails_the_connection(net, guest):
    _, _, s_ns, _ = net
    g = guest
    g.iface.set_gateway(4, ADDR.peer4)
    p = peer(s_ns, 7401, send=4_000_000, seed="nr-peer")
    s = g.stack.connect(FAR4, 7401, timeout=10)
    assert s.offload() and s.offloaded
    out = pattern("nr", 4_000_000)
    rx = bytearray()
    off = pump(g, s, out, 0, rx, lambda o, r_: o >= 1_000_000 and len(r_) >= 1_000_000)
    g.iface.set_gateway(4, None)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="no route to host"):
        pump(g, s, out, off, rx, lambda o, r_: False, timeout=20)
    took = time.monotonic() - t0
    assert bytes(rx) == pattern("nr-peer", 4_000_000)[:len(rx)]      # what did arrive is right
    st = g.mgr.stats
    assert st["invalidate_no_route"] == 1 and st["retrieve"] >= 1, dict(st)
    assert st["uploaded"] == 1 and st["upload_no_route_aborted"] == 1
    assert g.ch.stats["ev_retrieve"] >= 1
    assert not s.offloaded
    p.kill()
    p.communicate()
    print(f"\nroute removed mid-transfer: INVALIDATE, RETRIEVE, upload, error after {took:.2f} s")


# -- 5. the NIC's reachability query ----------------------------------------------------------

def test_reachability_query_is_answered_after_a_probe(net, guest):
    _, r, _, _ = net
    g = guest
    assert g.ch.wait(g.ch.set_params({"neigh_stale_ticks": 300})).ok
    try:
        n = 2_000_000
        p = peer(r, 7501)
        s = g.stack.connect(ADDR.peer4, 7501, timeout=10)
        assert s.offload() and s.offloaded
        nobj = g.mgr.neighbours[ADDR.peer4]
        out = pattern("reach", n)
        rx = bytearray()
        off = pump(g, s, out, 0, rx, lambda o, _: o >= n // 2)
        # the host forgets the neighbour; the link stays idle past the NIC's stale time
        g.stack.run_until(lambda: not s.path.sends, 10)
        del g.iface.arp_cache.entries[ipaddress.ip_address(ADDR.peer4)]
        g.stack.run_until(lambda: False, 0.6)
        asked = g.iface.stats["arp_requests_out"]
        pump(g, s, out, off, rx, lambda o, _: o >= n)
        assert g.stack.run_until(lambda: g.mgr.stats["neigh_update_reach_answer"] >= 1, 10), \
            dict(g.mgr.stats)
        e = g.query(nobj.ctx)
        close_and_finish(g, s)
        res = peer_result(g, p)
    finally:
        g.ch.wait(g.ch.set_params({"neigh_stale_ticks": 600_000}))
    assert res["got"] == n and res["sha256"] == hashlib.sha256(out).hexdigest()
    assert g.ch.stats["ev_neigh_reach_query"] >= 1
    assert g.mgr.stats["neigh_query_probes"] >= 1 and g.iface.stats["arp_requests_out"] > asked
    peer_mac = bytes.fromhex(sysfs(r, f"/sys/class/net/{TAP}/address").replace(":", ""))
    assert e.state.dst_mac == peer_mac                 # never MAC zero
    assert e.state.host_reach_delta < 300              # confirmed: fresh at the NIC
    print(f"\nreachability query: probed, answered, delta at QUERY {e.state.host_reach_delta} ticks")
