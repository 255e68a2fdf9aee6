"""Keeping the NIC's cached neighbour and path state in step with the host stack:
the chimney's Update and Invalidate, driven by what the interface learns, and the
answers to the NIC's neighbour reachability queries.

- a neighbour's MAC changes (a gratuitous ARP, an NA with override, any ARP/ND
  learning): UPDATE of the offloaded neighbour's dst MAC;
- an ICMP "fragmentation needed" / "packet too big" quoting a segment of an
  offloaded connection that is in flight (RFC 5927: the quoted 4-tuple is ours
  and SndUna <= seq < SndMax, read with a QUERY): UPDATE of the path's MTU
  (the NIC's MSS follows), remembered for the path's next offload;
- the default gateway changes (Interface.set_gateway): a path whose next hop
  moved to another neighbour gets an UPDATE naming that neighbour's context as
  its parent (the new neighbour is offloaded first, alone, when it is not yet);
  if the NIC refuses the move, the path is invalidated instead and its
  connections come back through RETRIEVE and are offloaded again;
- no next hop at all any more: INVALIDATE; the NIC asks for the uploads
  (RETRIEVE), the manager uploads, and a connection with no route is aborted
  with the error "no route to host" (the application gets an error, not a hang);
- NEIGH_REACH_QUERY: a fresh cache entry (confirmed within its reachable time)
  is answered at once with its MAC and the ticks since it was confirmed; else the
  neighbour is probed (ARP / NS) and the answer goes when it confirms, or as
  stale (STALE_DELTA, the largest delta: never "just seen") when it does not
  within the cache's retries.
Updates are one per object at a time (the model's rule); what changes while
one is in flight is sent when it completes.
"""
from __future__ import annotations

import ipaddress

from .... import hw
from ....staterec.codec import NONE32, Neighbor, ObjEntry, Path
from ....tcp.engine import seq_sub
from ..icmp import quoted_tcp4
from ..icmpv6 import quoted_tcp6

TICKS_PER_SECOND = 1000         # the NIC's tick (SET_PARAMS ticks_per_second)
STALE_DELTA = 0xFFFFFFFE        # host reachability delta: not seen reachable in living memory
MIN_PMTU = {4: 576, 6: 1280}    # an ICMP asking for less is taken as this much (RFC 1191 / 8201)


class CachedStateSync:
    def __init__(self, mgr):
        self.mgr = mgr
        self.stats = mgr.stats
        self.iface = mgr.stack.iface
        self.pmtu: dict = {}            # (local, remote) -> MTU learnt from ICMP
        self.queries: dict = {}         # neighbour address -> [answer-stale deadline, next probe]
        self.moves: dict = {}           # path key -> new hop whose MAC is awaited
        self.iface.arp_cache.on_update = self.on_neigh_entry
        self.iface.nd_cache.on_update = self.on_neigh_entry
        self.iface.on_pmtu = self.on_pmtu
        self.iface.on_route = self.on_route

    # -- helpers --------------------------------------------------------------------------
    def _cache(self, addr):
        return self.iface.arp_cache if addr.version == 4 else self.iface.nd_cache

    def path_mtu(self, pkey) -> int:
        return min(self.iface.mtu, self.pmtu.get(pkey, self.iface.mtu))

    def _live(self, o) -> bool:
        return bool(o.ctx) and not o.pending and not o.invalid

    def _neigh_for_query(self, ctx, handle):
        """The neighbour a query names: by our handle (what every layer returns), else
        by context."""
        ns = list(self.mgr.neighbours.values())
        return next((o for o in ns if o.handle == handle), None) or \
            next((o for o in ns if o.ctx == ctx), None)

    def _delta(self, e, now) -> int:
        return min(int(max(0.0, now - e.updated) * TICKS_PER_SECOND), STALE_DELTA)

    def _update_neigh(self, o, mac: bytes, delta: int, why: str) -> None:
        """UPDATE of neighbour o (queued behind one in flight)."""
        o.mac_asked = bytes(mac)
        if o.busy:
            o.want = (mac, delta, why)
            return
        o.busy = True
        iface = self.iface
        rec = ObjEntry(hw.OBJ_NEIGHBOR, o.handle, NONE32, Neighbor(
            src_mac=bytes(iface.mac), dst_mac=bytes(mac), vlan_id=iface.vlan,
            host_reach_delta=delta), nic_ctx=o.ctx)

        def done(cmd):
            o.busy = False
            if cmd.status == hw.ST_SUCCESS:
                o.mac = bytes(mac)
                self.stats[f"neigh_update_{why}"] += 1
            else:
                o.mac_asked = o.mac
                self.stats["neigh_update_failed"] += 1
                self.mgr.last_errors.append(f"UPDATE neighbour {o.key}: status {cmd.status}")
            want = o.want
            if want is not None:
                o.want = None
                if o.ctx:
                    self._update_neigh(o, *want)
        self.mgr.ch.update([rec], cb=done)

    # -- neighbours ---------------------------------------------------------------------------
    def on_neigh_entry(self, addr, e) -> None:
        """The cache learnt or confirmed addr (e), or gave it up (None)."""
        key = str(addr)
        now = self.mgr.clock()
        o = self.mgr.neighbours.get(key)
        q = self.queries.get(key)
        if q is not None and (e is None or self._cache(addr).fresh(e, now)):
            del self.queries[key]
            if o is not None and o.ctx:
                if e is None:
                    self._update_neigh(o, o.mac, STALE_DELTA, "stale_answer")
                else:
                    self._update_neigh(o, e.mac, self._delta(e, now), "reach_answer")
                self.stats["neigh_query_answered"] += 1
            return
        if e is not None and o is not None and self._live(o) and e.mac is not None and \
                e.mac != (o.mac_asked or o.mac):
            self._update_neigh(o, e.mac, self._delta(e, now), "mac")
        if e is not None and e.mac is not None:
            for pkey, hop in list(self.moves.items()):
                if hop == key:
                    del self.moves[pkey]
                    p = self.mgr.paths.get(pkey)
                    if p is not None:
                        self._move(p, addr, e)

    def on_neigh_query(self, ctx, handle) -> None:
        """NEIGH_REACH_QUERY from the NIC for the neighbour with this context."""
        o = self._neigh_for_query(ctx, handle)
        if o is None:
            self.stats["neigh_query_unknown"] += 1
            return
        addr = ipaddress.ip_address(o.key)
        cache, now = self._cache(addr), self.mgr.clock()
        e = cache.get(addr)
        if cache.fresh(e, now):
            self._update_neigh(o, e.mac, self._delta(e, now), "reach_answer")
            self.stats["neigh_query_answered"] += 1
            return
        if o.key in self.queries:
            return
        if not self.iface.probe_neighbour(addr, now):
            self._update_neigh(o, o.mac, STALE_DELTA, "stale_answer")
            self.stats["neigh_query_answered"] += 1
            return
        self.stats["neigh_query_probes"] += 1
        wait = cache.retrans_time * cache.max_retries
        self.queries[o.key] = [now + wait, now + cache.retrans_time]

    # -- path MTU -----------------------------------------------------------------------------
    def on_pmtu(self, version: int, mtu: int, quote: bytes) -> None:
        """An ICMP too-big: checked against the offloaded connection it quotes."""
        q = quoted_tcp4(quote) if version == 4 else quoted_tcp6(quote)
        if q is None:
            self.stats["pmtu_ignored_no_tcp_quote"] += 1
            return
        src, dst, sport, dport, seq = q
        local, remote = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        key = (local, sport, remote, dport)
        p = next((p for p in self.mgr.offloaded.values() if p.flow.key == key), None)
        if p is None or p.state != "offloaded":
            self.stats["pmtu_ignored_not_offloaded"] += 1
            return
        pobj = p.pobj
        if mtu == 0:
            self.stats["pmtu_ignored_no_mtu"] += 1      # a pre-RFC 1191 router: no plateau search
            return
        mtu = max(mtu, MIN_PMTU[version])
        if mtu >= pobj.mtu:
            self.stats["pmtu_ignored_not_smaller"] += 1
            return

        def queried(cmd):
            e = next((e for e in (cmd.result or []) if e.host_handle == p.handle), None)
            if e is None or e.state is None:
                self.stats["pmtu_ignored_query_failed"] += 1
                return
            d = e.state.delegated
            if not (seq_sub(seq, d.snd_una) >= 0 and seq_sub(d.snd_max, seq) > 0):
                self.stats["pmtu_ignored_seq_not_in_flight"] += 1
                return
            self._update_path_mtu(pobj, mtu)
        self.mgr.ch.query([p.ctx], cb=queried)

    def _update_path_mtu(self, pobj, mtu: int) -> None:
        self.pmtu[pobj.key] = min(mtu, self.pmtu.get(pobj.key, mtu))
        if not self._live(pobj) or pobj.busy or mtu >= pobj.mtu:
            return
        pobj.busy = True
        local, remote = pobj.key
        rec = ObjEntry(hw.OBJ_PATH, pobj.handle, NONE32, Path(local, remote, mtu), nic_ctx=pobj.ctx)

        def done(cmd):
            pobj.busy = False
            if cmd.status == hw.ST_SUCCESS:
                pobj.mtu = mtu
                self.stats["path_mtu_updates"] += 1
            else:
                self.stats["path_mtu_update_failed"] += 1
                self.mgr.last_errors.append(f"UPDATE path {pobj.key}: status {cmd.status}")
            if self.pmtu.get(pobj.key, mtu) < pobj.mtu:
                self._update_path_mtu(pobj, self.pmtu[pobj.key])
        self.mgr.ch.update([rec], cb=done)

    # -- routes -------------------------------------------------------------------------------
    def on_route(self, version: int) -> None:
        """The interface's next hops of this family changed: move or invalidate paths."""
        for pkey, pobj in list(self.mgr.paths.items()):
            remote = ipaddress.ip_address(pkey[1])
            if remote.version != version or not self._live(pobj):
                continue
            hop = self.iface.next_hop(remote)
            if hop is None:
                self.invalidate(pobj, "no_route")
                continue
            if str(hop) == pobj.parent.key:
                self.moves.pop(pkey, None)
                continue
            e = self._cache(hop).get(hop)
            if e is not None and e.mac is not None:
                self._move(pobj, hop, e)
            else:
                self.moves[pkey] = str(hop)
                self.iface.probe_neighbour(hop)
                self.stats["path_move_resolving"] += 1

    def invalidate(self, o, why: str) -> None:
        """INVALIDATE o: the NIC stops sending on its connections and asks for their
        upload (RETRIEVE); no new connection links to it any more."""
        o.invalid = True
        self.mgr.forget(o)
        self.stats[f"invalidate_{why}"] += 1
        for p in self.mgr.offloaded.values():
            if p.pobj is o or p.pobj.parent is o:
                p.no_route = why == "no_route"

        def done(cmd):
            if cmd.status != hw.ST_SUCCESS:
                self.stats["invalidate_failed"] += 1
                self.mgr.last_errors.append(f"INVALIDATE {o.key}: status {cmd.status}")
        self.mgr.ch.invalidate([o.ctx], cb=done)

    def _move(self, pobj, hop, e) -> None:
        """Move pobj to neighbour hop (MAC known): offload the neighbour when needed,
        then UPDATE the path with it as parent."""
        mgr = self.mgr
        if pobj.busy or not self._live(pobj):
            self.moves[pobj.key] = str(hop)     # after the update in flight (poll retries)
            return
        key = str(hop)
        n = mgr.neighbours.get(key)
        if n is not None and n.pending:
            self.moves[pobj.key] = key          # its INITIATE completes first
            return
        pobj.busy = True
        if n is not None and self._live(n):
            self._update_parent(pobj, n)
            return
        from .manager import _Obj
        n = mgr.neighbours[key] = _Obj("neigh", key, next(mgr._handles))
        n.mac, n.pending = bytes(e.mac), True
        iface = self.iface
        rec = ObjEntry(hw.OBJ_NEIGHBOR, n.handle, NONE32, Neighbor(
            src_mac=bytes(iface.mac), dst_mac=bytes(e.mac), vlan_id=iface.vlan,
            host_reach_delta=self._delta(e, mgr.clock())))

        def initiated(cmd):
            n.pending = False
            r = next((r for r in (cmd.result or []) if r.host_handle == n.handle), None)
            if r is None or r.status != hw.ST_SUCCESS or not r.nic_ctx:
                mgr.forget(n)
                pobj.busy = False
                self.stats["path_move_neigh_failed"] += 1
                self.invalidate(pobj, "move_refused")
                return
            n.ctx = r.nic_ctx
            self._update_parent(pobj, n)
        mgr.ch.initiate([rec], cb=initiated)

    def _update_parent(self, pobj, n) -> None:
        mgr = self.mgr
        local, remote = pobj.key
        rec = ObjEntry(hw.OBJ_PATH, pobj.handle, n.ctx, Path(local, remote, pobj.mtu),
                       nic_ctx=pobj.ctx)

        def done(cmd):
            pobj.busy = False
            if cmd.status != hw.ST_SUCCESS:
                # the NIC did not move it: the connections come back and go down again
                self.stats["path_move_refused"] += 1
                mgr.last_errors.append(f"UPDATE path {pobj.key} to neighbour {n.key}: "
                                       f"status {cmd.status}")
                if n.refs == 0:
                    mgr.forget(n)
                    mgr.ch.terminate([n.ctx])
                self.invalidate(pobj, "move_refused")
                return
            old = pobj.parent
            pobj.parent = n
            if pobj.refs:
                n.refs += 1
                old.refs -= 1
                if old.refs <= 0:
                    mgr.forget(old)
                    mgr.ch.terminate([old.ctx])
            self.stats["path_moves"] += 1
            if self.pmtu.get(pobj.key, pobj.mtu) < pobj.mtu:     # learnt while it moved
                self._update_path_mtu(pobj, self.pmtu[pobj.key])
        mgr.ch.update([rec], cb=done)

    def after_initiate(self, o) -> None:
        """o was just offloaded: what changed while its INITIATE was in flight (a new
        MAC, a smaller path MTU, another next hop) is sent now."""
        if o.kind == "neigh":
            addr = ipaddress.ip_address(o.key)
            e = self._cache(addr).get(addr)
            if e is not None and e.mac is not None and e.mac != o.mac:
                self._update_neigh(o, e.mac, self._delta(e, self.mgr.clock()), "mac")
            return
        if self.pmtu.get(o.key, o.mtu) < o.mtu:
            self._update_path_mtu(o, self.pmtu[o.key])
        remote = ipaddress.ip_address(o.key[1])
        hop = self.iface.next_hop(remote)
        if hop is None:
            self.invalidate(o, "no_route")
        elif str(hop) != o.parent.key:
            self.moves[o.key] = str(hop)        # poll moves it once its MAC is known
            e = self._cache(hop).get(hop)
            if e is None or e.mac is None:
                self.iface.probe_neighbour(hop)

    # -- timers ---------------------------------------------------------------------------------
    def poll(self) -> None:
        """Reachability queries waiting for an answer: probe again, or answer stale."""
        if not self.queries and not self.moves:
            return
        now = self.mgr.clock()
        for key, q in list(self.queries.items()):
            addr = ipaddress.ip_address(key)
            cache = self._cache(addr)
            if now >= q[0]:
                del self.queries[key]
                o = self.mgr.neighbours.get(key)
                if o is not None and o.ctx:
                    self._update_neigh(o, o.mac, STALE_DELTA, "stale_answer")
                    self.stats["neigh_query_answered"] += 1
            elif now >= q[1]:
                q[1] = now + cache.retrans_time
                e = cache.get(addr)
                if e is None or e.state != "incomplete":    # INCOMPLETE: the cache re-solicits
                    self.iface.probe_neighbour(addr, now)
        for pkey, hop in list(self.moves.items()):
            p = self.mgr.paths.get(pkey)
            if p is None:
                del self.moves[pkey]
                continue
            addr = ipaddress.ip_address(hop)
            e = self._cache(addr).get(addr)
            if e is not None and e.mac is not None and not p.busy:
                del self.moves[pkey]
                self._move(p, addr, e)
