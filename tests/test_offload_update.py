"""The offload manager keeps the NIC's cached neighbour and path state in step
(offload/sync.py): UPDATE on a neighbour's MAC change, on an ICMP too-big for an
in-flight segment and on a route change, INVALIDATE when no route is left, the
answers to neighbour reachability queries, and SEND_BACKLOG as the send limit.
A host stack on a fake clock and a fake chimney that records the requests (no root)."""
from __future__ import annotations

import ipaddress
import struct
from types import SimpleNamespace

from chimney import hw
from chimney.guest.stack import arp, ether, icmp, icmpv6, nd
from chimney.guest.stack import ipv4 as v4
from chimney.guest.stack import ipv6 as v6
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.iface import Interface
from chimney.guest.stack.offload import OffloadManager
from chimney.guest.stack.offload.manager import _Obj
from chimney.guest.stack.offload.sync import STALE_DELTA
from chimney.staterec.codec import ObjEntry, Tcp
from chimney.tcp.state import TcpCached, TcpConst, TcpDelegated, TcpState

OUR_MAC = bytes.fromhex("020000000001")
PEER_MAC = bytes.fromhex("020000000002")
NEW_MAC = bytes.fromhex("020000000099")
GW2_MAC = bytes.fromhex("0200000000aa")
OUR4, PEER4, GW2 = "10.9.0.1", "10.9.0.2", "10.9.0.3"
OUR6, PEER6 = "fd00::1", "fd00::2"


class FakeCmd:
    def __init__(self, op, arg, cb):
        self.op, self.arg, self.cb = op, arg, cb
        self.done, self.status, self.result = False, None, None

    def complete(self, status=hw.ST_SUCCESS, result=None):
        self.done, self.status, self.result = True, status, result
        if self.cb:
            self.cb(self)


class FakeChimney:
    """Records every state request; the test completes them."""

    def __init__(self):
        self.is_up, self.paused = True, False
        self.status_handler = self.neigh_query_handler = None
        self.cmds: list[FakeCmd] = []
        self.sendq = SimpleNamespace(space=lambda: 8, size=8)

    def _cmd(self, op, arg, cb):
        c = FakeCmd(op, arg, cb)
        self.cmds.append(c)
        return c

    def update(self, entries, cb=None):
        return self._cmd("update", entries, cb)

    def invalidate(self, ctxs, cb=None):
        return self._cmd("invalidate", ctxs, cb)

    def query(self, ctxs, cb=None):
        return self._cmd("query", ctxs, cb)

    def initiate(self, entries, cb=None):
        return self._cmd("initiate", entries, cb)

    def terminate(self, ctxs, cb=None, data_room=0):
        return self._cmd("terminate", ctxs, cb)

    def poll(self):
        return 0

    def take(self, op):
        got = [c for c in self.cmds if c.op == op]
        self.cmds = [c for c in self.cmds if c.op != op]
        return got


def rig(ipv6=False):
    t = [1000.0]
    out = []
    iface = Interface(OUR_MAC, ipv4=(OUR4, 24), ipv6=[(OUR6, 64)], send_frame=out.append,
                      clock=lambda: t[0])
    stack = HostStack(iface)
    ch = FakeChimney()
    mgr = OffloadManager(stack, ch, policy="never")
    peer = ipaddress.ip_address(PEER6 if ipv6 else PEER4)
    cache = iface.nd_cache if ipv6 else iface.arp_cache
    cache.learn(peer, PEER_MAC, t[0], confirmed=True)
    n = mgr.neighbours[str(peer)] = _Obj("neigh", str(peer), 1)
    n.ctx, n.mac, n.refs = 0x101, PEER_MAC, 1
    local = OUR6 if ipv6 else OUR4
    p = mgr.paths[(local, str(peer))] = _Obj("path", (local, str(peer)), 2, n)
    p.ctx, p.mtu, p.refs = 0x102, 1500, 1
    conn = SimpleNamespace(flow=SimpleNamespace(key=(ipaddress.ip_address(local), 40000, peer, 5001)),
                           state="offloaded", ctx=0x103, handle=3, pobj=p, no_route=False)
    mgr.offloaded[3] = conn
    return SimpleNamespace(t=t, out=out, iface=iface, stack=stack, ch=ch, mgr=mgr, n=n, p=p,
                           conn=conn, peer=peer, cache=cache)


def frames_of(r, ethertype):
    got = [ether.parse(f) for f in r.out]
    r.out.clear()
    return [f for f in got if f.ethertype == ethertype]


def arp_frame(op, sha, spa, tpa, dst=ether.BROADCAST, tha=bytes(6)):
    return ether.build(dst, sha, ether.ETH_P_ARP,
                       arp.build(op, sha, ipaddress.ip_address(spa).packed, tha,
                                 ipaddress.ip_address(tpa).packed))


def only_neigh_update(r):
    (u,) = r.ch.take("update")
    (e,) = u.arg
    assert e.type == hw.OBJ_NEIGHBOR and e.nic_ctx == r.n.ctx
    return u, e.state


# -- 1. a neighbour's MAC changes -----------------------------------------------------------

def test_gratuitous_arp_with_a_new_mac_updates_the_offloaded_neighbour():
    r = rig()
    r.iface.on_frame(arp_frame(arp.REQUEST, NEW_MAC, PEER4, PEER4))     # gratuitous
    u, st = only_neigh_update(r)
    assert st.dst_mac == NEW_MAC and st.src_mac == OUR_MAC
    u.complete()
    assert r.n.mac == NEW_MAC and r.mgr.stats["neigh_update_mac"] == 1
    # the same MAC again: nothing to tell the NIC
    r.iface.on_frame(arp_frame(arp.REQUEST, NEW_MAC, PEER4, PEER4))
    assert not r.ch.take("update")


def test_a_second_mac_change_waits_for_the_update_in_flight():
    r = rig()
    r.iface.on_frame(arp_frame(arp.REQUEST, NEW_MAC, PEER4, PEER4))
    (u,) = r.ch.take("update")
    r.iface.on_frame(arp_frame(arp.REQUEST, GW2_MAC, PEER4, PEER4))
    assert not r.ch.take("update")          # one update per object at a time
    u.complete()
    (u2,) = r.ch.take("update")
    assert u2.arg[0].state.dst_mac == GW2_MAC


def na_frame(src_mac, target, flags_override=True, solicited=False, dst=str(v6.ALL_NODES)):
    t = ipaddress.ip_address(target)
    d = ipaddress.ip_address(dst)
    pkt = nd.advertise(t.packed, d.packed, t.packed, src_mac, solicited=solicited,
                       override=flags_override)
    return ether.build(v6.multicast_mac(d) if d.is_multicast else OUR_MAC, src_mac, ether.ETH_P_IPV6,
                       v6.build(t.packed, d.packed, v6.NH_ICMPV6, pkt, hop_limit=255))


def test_unsolicited_na_with_override_updates_the_offloaded_neighbour():
    r = rig(ipv6=True)
    r.iface.on_frame(na_frame(NEW_MAC, PEER6, flags_override=False))
    assert not r.ch.take("update")          # no override: the known MAC stays (RFC 4861 7.2.5)
    r.iface.on_frame(na_frame(NEW_MAC, PEER6))
    _, st = only_neigh_update(r)
    assert st.dst_mac == NEW_MAC


# -- 5. the reachability query ---------------------------------------------------------------

def test_reachability_query_with_a_fresh_entry_answers_at_once_with_the_delta():
    r = rig()
    r.t[0] += 2.5                           # confirmed 2.5 s ago
    r.mgr.sync.on_neigh_query(r.n.ctx, r.n.handle)
    _, st = only_neigh_update(r)
    assert st.dst_mac == PEER_MAC and st.host_reach_delta == 2500
    assert not frames_of(r, ether.ETH_P_ARP)        # no probe needed


def test_reachability_query_without_an_entry_probes_and_answers_on_the_reply():
    r = rig()
    del r.cache.entries[r.peer]
    r.mgr.sync.on_neigh_query(r.n.ctx, r.n.handle)
    assert not r.ch.take("update")          # no answer before the neighbour does
    (req,) = frames_of(r, ether.ETH_P_ARP)
    a = arp.parse(req.payload)
    assert a.op == arp.REQUEST and a.tpa == r.peer.packed and req.dst == ether.BROADCAST
    r.t[0] += 0.01
    r.iface.on_frame(arp_frame(arp.REPLY, PEER_MAC, PEER4, OUR4, dst=OUR_MAC, tha=OUR_MAC))
    _, st = only_neigh_update(r)
    assert st.dst_mac == PEER_MAC and st.host_reach_delta == 0     # just confirmed
    assert r.mgr.stats["neigh_query_answered"] == 1


def test_reachability_query_with_a_stale_entry_probes_unicast():
    r = rig()
    r.t[0] += r.cache.reachable_time + 1     # REACHABLE no longer
    r.mgr.sync.on_neigh_query(r.n.ctx, r.n.handle)
    assert not r.ch.take("update")
    (req,) = frames_of(r, ether.ETH_P_ARP)
    assert req.dst == PEER_MAC               # the known MAC, asked directly


def test_reachability_query_never_answered_says_stale_not_mac_zero():
    r = rig()
    del r.cache.entries[r.peer]
    r.mgr.sync.on_neigh_query(r.n.ctx, r.n.handle)
    for _ in range(50):                     # the cache's retries run out
        r.t[0] += 0.2
        r.iface.poll()
        r.mgr.sync.poll()
    assert len(frames_of(r, ether.ETH_P_ARP)) == r.cache.max_retries
    _, st = only_neigh_update(r)
    assert st.host_reach_delta == STALE_DELTA
    assert st.dst_mac == PEER_MAC and st.dst_mac != bytes(6)


def test_reachability_query_ipv6_probes_with_ns():
    r = rig(ipv6=True)
    r.t[0] += r.cache.reachable_time + 1
    r.mgr.sync.on_neigh_query(r.n.ctx, r.n.handle)
    (ns,) = frames_of(r, ether.ETH_P_IPV6)
    _, payload = v6.parse(ns.payload)
    assert payload[0] == icmpv6.NEIGHBOR_SOLICIT and ns.dst == PEER_MAC
    r.iface.on_frame(na_frame(PEER_MAC, PEER6, solicited=True, dst=OUR6))
    _, st = only_neigh_update(r)
    assert st.dst_mac == PEER_MAC and st.host_reach_delta == 0


# -- 2. path MTU ------------------------------------------------------------------------------

def quote4(r, seq, sport=40000, dport=5001):
    tcp = struct.pack("!HHII", sport, dport, seq, 0) + bytes(12)
    return v4.build(ipaddress.ip_address(OUR4).packed, r.peer.packed, 6, tcp, ident=1, df=True)


def icmp_frame(msg):
    return ether.build(OUR_MAC, PEER_MAC, ether.ETH_P_IP,
                       v4.build(r_peer4(), ipaddress.ip_address(OUR4).packed, v4.PROTO_ICMP, msg, ident=2))


def r_peer4():
    return ipaddress.ip_address(PEER4).packed


def query_result(r, una, smax):
    d = TcpDelegated(state=TcpState.ESTABLISHED, snd_una=una, snd_nxt=smax, snd_max=smax)
    return [ObjEntry(hw.OBJ_TCP, r.conn.handle, r.p.ctx, Tcp(TcpConst(), TcpCached(), d),
                     nic_ctx=r.conn.ctx)]


def test_frag_needed_for_an_in_flight_segment_updates_the_path_mtu():
    r = rig()
    r.iface.on_frame(icmp_frame(icmp.frag_needed_message(1200, quote4(r, 5000))))
    (q,) = r.ch.take("query")
    assert q.arg == [r.conn.ctx]
    q.complete(result=query_result(r, 4000, 9000))
    (u,) = r.ch.take("update")
    (e,) = u.arg
    assert e.type == hw.OBJ_PATH and e.nic_ctx == r.p.ctx and e.state.path_mtu == 1200
    u.complete()
    assert r.p.mtu == 1200 and r.mgr.sync.path_mtu(r.p.key) == 1200
    assert r.mgr.stats["path_mtu_updates"] == 1


def test_frag_needed_quoting_a_sequence_not_in_flight_is_ignored():
    r = rig()
    r.iface.on_frame(icmp_frame(icmp.frag_needed_message(1200, quote4(r, 9000))))   # = SndMax
    (q,) = r.ch.take("query")
    q.complete(result=query_result(r, 4000, 9000))
    assert not r.ch.take("update")
    assert r.mgr.stats["pmtu_ignored_seq_not_in_flight"] == 1 and r.p.mtu == 1500


def test_frag_needed_for_another_connection_or_a_bigger_mtu_is_ignored():
    r = rig()
    r.iface.on_frame(icmp_frame(icmp.frag_needed_message(1200, quote4(r, 5000, sport=40001))))
    r.iface.on_frame(icmp_frame(icmp.frag_needed_message(1600, quote4(r, 5000))))
    r.iface.on_frame(icmp_frame(icmp.frag_needed_message(0, quote4(r, 5000))))
    assert not r.ch.cmds
    assert r.mgr.stats["pmtu_ignored_not_offloaded"] == 1
    assert r.mgr.stats["pmtu_ignored_not_smaller"] == 1 and r.mgr.stats["pmtu_ignored_no_mtu"] == 1


def test_packet_too_big_updates_an_ipv6_path_but_not_below_1280():
    r = rig(ipv6=True)
    tcp = struct.pack("!HHII", 40000, 5001, 5000, 0) + bytes(12)
    quoted = v6.build(ipaddress.ip_address(OUR6).packed, r.peer.packed, 6, tcp)
    src, dst = r.peer.packed, ipaddress.ip_address(OUR6).packed
    msg = icmpv6.build(src, dst, icmpv6.PACKET_TOO_BIG, 0, struct.pack("!I", 1000) + quoted)
    r.iface.on_frame(ether.build(OUR_MAC, PEER_MAC, ether.ETH_P_IPV6,
                                 v6.build(src, dst, v6.NH_ICMPV6, msg)))
    (q,) = r.ch.take("query")
    q.complete(result=query_result(r, 4000, 9000))
    (u,) = r.ch.take("update")
    assert u.arg[0].state.path_mtu == 1280


# -- 3, 4. routes ------------------------------------------------------------------------------

def offlink_rig():
    """The connection goes to 10.8.0.7 through gateway PEER4."""
    r = rig()
    r.iface.set_gateway(4, PEER4)
    far = ipaddress.ip_address("10.8.0.7")
    del r.mgr.paths[r.p.key]
    r.p.key = (OUR4, str(far))
    r.mgr.paths[r.p.key] = r.p
    r.conn.flow.key = (ipaddress.ip_address(OUR4), 40000, far, 5001)
    return r


def test_a_new_gateway_moves_the_path_to_its_neighbour():
    r = offlink_rig()
    r.iface.arp_cache.learn(ipaddress.ip_address(GW2), GW2_MAC, r.t[0], confirmed=True)
    r.iface.set_gateway(4, GW2)
    (i,) = r.ch.take("initiate")            # the new neighbour goes down alone first
    (ne,) = i.arg
    assert ne.type == hw.OBJ_NEIGHBOR and ne.state.dst_mac == GW2_MAC
    ne2 = ObjEntry(hw.OBJ_NEIGHBOR, ne.host_handle, nic_ctx=0x201, status=hw.ST_SUCCESS)
    i.complete(result=[ne2])
    (u,) = r.ch.take("update")
    (e,) = u.arg
    assert e.type == hw.OBJ_PATH and e.nic_ctx == r.p.ctx and e.parent == 0x201
    u.complete()
    assert r.p.parent.key == GW2 and r.p.parent.refs == 1
    (t,) = r.ch.take("terminate")           # the old neighbour had no other path
    assert t.arg == [0x101]
    assert r.mgr.stats["path_moves"] == 1 and PEER4 not in r.mgr.neighbours


def test_a_gateway_whose_mac_is_unknown_is_resolved_first():
    r = offlink_rig()
    r.iface.set_gateway(4, GW2)
    assert not r.ch.cmds
    (req,) = frames_of(r, ether.ETH_P_ARP)
    assert arp.parse(req.payload).tpa == ipaddress.ip_address(GW2).packed
    r.iface.on_frame(arp_frame(arp.REPLY, GW2_MAC, GW2, OUR4, dst=OUR_MAC, tha=OUR_MAC))
    (i,) = r.ch.take("initiate")
    assert i.arg[0].state.dst_mac == GW2_MAC


def test_a_refused_move_invalidates_the_path():
    r = offlink_rig()
    r.iface.arp_cache.learn(ipaddress.ip_address(GW2), GW2_MAC, r.t[0], confirmed=True)
    r.iface.set_gateway(4, GW2)
    (i,) = r.ch.take("initiate")
    i.complete(result=[ObjEntry(hw.OBJ_NEIGHBOR, i.arg[0].host_handle, nic_ctx=0x201,
                                status=hw.ST_SUCCESS)])
    (u,) = r.ch.take("update")
    u.complete(status=hw.ST_INVALID_HANDLE)
    (inv,) = r.ch.take("invalidate")
    assert inv.arg == [r.p.ctx] and r.mgr.stats["path_move_refused"] == 1
    assert r.p.key not in r.mgr.paths       # new connections get a new path


def test_no_route_left_invalidates_the_path():
    r = offlink_rig()
    r.iface.set_gateway(4, None)
    (inv,) = r.ch.take("invalidate")
    assert inv.arg == [r.p.ctx] and r.conn.no_route
    assert r.p.key not in r.mgr.paths and r.mgr.stats["invalidate_no_route"] == 1


# -- 6. SEND_BACKLOG ---------------------------------------------------------------------------

def test_send_backlog_sets_the_connection_send_limit():
    from chimney.guest.stack.offload.path import OffloadPath
    r = rig()
    d = TcpDelegated(state=TcpState.ESTABLISHED)
    sock = SimpleNamespace(flow=r.conn.flow, path=SimpleNamespace(rx_bytes=0))
    p = OffloadPath(r.mgr, sock, 3, 0x103, r.p, d)
    assert p.send_space() == r.mgr.send_limit
    p.on_event(hw.EV_SEND_BACKLOG, 0, 300_000)
    assert p.send_limit == 300_000 and p.send_space() == 300_000
    p.outstanding = 100_000
    assert p.send_space() == 200_000
    p.on_event(hw.EV_SEND_BACKLOG, 0, 1000)           # not below the floor
    assert p.send_limit == r.mgr.send_limit_floor
    p.on_event(hw.EV_SEND_BACKLOG, 0, 1 << 30)        # nor above the manager's limit
    assert p.send_limit == r.mgr.send_limit
    assert r.mgr.stats["send_backlog_events"] == 3


def test_the_same_new_mac_heard_twice_during_its_update_is_sent_once():
    r = rig()
    r.iface.on_frame(arp_frame(arp.REQUEST, NEW_MAC, PEER4, PEER4))
    r.iface.on_frame(arp_frame(arp.REQUEST, NEW_MAC, PEER4, OUR4))     # asks us, from the new MAC
    (u,) = r.ch.take("update")
    u.complete()
    assert not r.ch.take("update") and r.mgr.stats["neigh_update_mac"] == 1


def test_a_failed_mac_update_is_sent_again_on_the_next_announcement():
    r = rig()
    r.iface.on_frame(arp_frame(arp.REQUEST, NEW_MAC, PEER4, PEER4))
    (u,) = r.ch.take("update")
    u.complete(status=hw.ST_BUSY)
    assert r.n.mac == PEER_MAC and r.mgr.stats["neigh_update_failed"] == 1
    r.iface.on_frame(arp_frame(arp.REQUEST, NEW_MAC, PEER4, PEER4))
    (u2,) = r.ch.take("update")
    assert u2.arg[0].state.dst_mac == NEW_MAC


def test_icmp_errors_that_quote_no_tcp_segment_are_ignored():
    r = rig()
    udp = v4.build(ipaddress.ip_address(OUR4).packed, r.peer.packed, 17, bytes(16), ident=1)
    r.iface.on_frame(icmp_frame(icmp.frag_needed_message(1200, udp)))
    r.iface.on_frame(icmp_frame(icmp.frag_needed_message(1200, quote4(r, 5000)[:24])))   # truncated
    assert not r.ch.cmds and r.mgr.stats["pmtu_ignored_no_tcp_quote"] == 2


def test_a_mac_change_during_the_neighbours_initiate_is_sent_once_it_completes():
    r = rig()
    r.n.ctx, r.n.pending = 0, True          # its INITIATE is in flight
    r.iface.on_frame(arp_frame(arp.REQUEST, NEW_MAC, PEER4, PEER4))
    assert not r.ch.take("update")          # no context to update yet
    r.n.ctx, r.n.pending = 0x101, False
    r.mgr.sync.after_initiate(r.n)
    _, st = only_neigh_update(r)
    assert st.dst_mac == NEW_MAC


def test_a_route_change_during_the_paths_initiate_moves_it_once_it_completes():
    r = offlink_rig()
    r.p.ctx, r.p.pending = 0, True
    r.iface.arp_cache.learn(ipaddress.ip_address(GW2), GW2_MAC, r.t[0], confirmed=True)
    r.iface.set_gateway(4, GW2)
    assert not r.ch.cmds                    # nothing live to move yet
    r.p.ctx, r.p.pending = 0x102, False
    r.mgr.sync.after_initiate(r.p)
    r.mgr.sync.poll()
    (i,) = r.ch.take("initiate")
    assert i.arg[0].state.dst_mac == GW2_MAC
