"""The host stack's offload manager: which connections go down the chimney, the
state trees that carry them, the logical switch of their sockets, and the
way back (upload) with no byte lost or duplicated.

    mgr = OffloadManager(stack, chimney, policy="always")   # or "never" / "auto"
    mgr.offload([sock, ...], wait=True)     # one state tree (bulk); sock.path becomes an OffloadPath
    mgr.upload(sock, wait=True)             # TERMINATE; Connection.from_state; SoftwarePath again
    mgr.query([sock, ...])                  # delegated state of live connections
    mgr.probe_windows([sock, ...])          # the NIC keep-alive-probes them (UPDATE), until
    mgr.end_window_probes(saved)            # ... their cached state is put back

Policy: global (`mgr.policy`) or per socket (`sock.offload_policy`, None =
global).  "always": offloaded as soon as it is established (before the first
data byte, from Socket.connect/accept); "auto": once `auto_bytes` bytes moved
in software or the connection is `auto_age` seconds old; "never".

Handover (offload): the frames already received are processed and everything
queued is put on the wire and sent (the TX ring drained: nothing of the
software TCP's may follow the NIC's segments), then the Connection's state is
exported (a pending delayed ACK goes out first), the flow is detached from the
HostStack (no timers, no segment processing, no RST; what arrives for it is
held), the socket sees a `HandoverPath` (no data moves) until Initiate
completes.  On failure the flow is attached again, the held segments are
processed and the socket carries on in software.  On success the held
segments are handed to the NIC in arrival order (OSEND FORWARD,
`handover_segments_forwarded`; `handover_segments_unforwarded` counts those
the send ring had no room for).  While offloaded, a segment of the connection
that reaches the host (the NIC cannot parse IPv4 options, fragments or IPv6
extension headers; the host's IP layer did) is forwarded the same way
(`forward`, `segments_forwarded`).

Upload: TERMINATE (from then on segments for the flow are held); once it
completed and every outstanding request of the connection came back,
`Connection.from_state` with the state `OffloadPath.software_state` merged:
the receive data the host got from the NIC but the application did not read
yet in front of the returned buffered receive data (minus any overlap, found
by sequence number); the bytes the application wrote that the NIC never got
parked in the new SoftwarePath, which feeds them to the connection as its
send buffer takes them (then a FIN asked for meanwhile).  The receive buffer
is at least what keeps the NIC's advertised window open.  The held segments
are processed, and the policy looks at the socket again at once.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

from .... import hw
from ....staterec.codec import MIN_KA_TICKS, NONE32, Neighbor, ObjEntry, Path, Tcp
from ....tcp.engine import Config, Connection, seq_sub
from ....tcp.state import NOT_OFFLOADABLE, TcpState
from ...rss import MS_KEY, rss_hash, toeplitz  # noqa: F401 -- re-exported
from ..socket import SoftwarePath
from .path import HandoverPath, OffloadPath, data_rcv_end, data_snd_una
from .sync import CachedStateSync

POLICIES = ("always", "never", "auto")
NIC_SEND_BUFFER = Config.send_buffer_size   # the TOE runs the same engine with its defaults
AUTO_INTERVAL = 0.05        # seconds between the auto/always policy's rounds over its sockets


class _Obj:
    """An offloaded neighbour (key: its address) or path (key: (local, remote)):
    handle, NIC context, dependents, and the cached state the NIC was given."""

    def __init__(self, kind, key, handle, parent=None):
        self.kind, self.key, self.handle, self.parent = kind, key, handle, parent
        self.ctx = 0
        self.refs = 0
        self.pending = False        # in an Initiate not completed yet
        self.mac: bytes | None = None       # neighbour: the dst MAC the NIC has
        self.mtu = 0                        # path: the MTU the NIC has
        self.busy = False                   # an UPDATE of it in flight (one at a time)
        self.invalid = False                # INVALIDATE sent: no new links to it
        self.want = None                    # neighbour: the UPDATE to send after the one in flight
        self.mac_asked: bytes | None = None     # neighbour: the dst MAC of the latest UPDATE asked for


class OffloadManager:
    def __init__(self, stack, chimney, policy: str = "never", *, auto_bytes: int = 1 << 20,
                 auto_age: float | None = None, post_size: int = 256 * 1024, post_depth: int = 8,
                 rx_limit: int = 4 << 20, send_limit: int = 2 << 20, send_chunk: int = 256 * 1024,
                 push: bool = True, handover_timeout: float = 10.0, cached: dict | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.stack = stack
        self.clock = stack.clock            # the stack's clock: every deadline here is on it
        self.ch = chimney
        self.policy = policy
        self.auto_bytes = auto_bytes
        self.auto_age = auto_age
        self.post_size, self.post_depth, self.rx_limit = post_size, post_depth, rx_limit
        self.send_limit, self.send_chunk, self.push = send_limit, send_chunk, push
        self.handover_timeout = handover_timeout
        self.cached = dict(cached or {})    # TcpCached fields set on every offloaded connection
        self.stats: Counter = Counter()
        self._handles = itertools.count(1)
        self.neighbours: dict = {}          # key -> _Obj
        self.paths: dict = {}               # key -> _Obj
        self.offloaded: dict[int, object] = {}      # handle -> OffloadPath
        self.by_key: dict[tuple, object] = {}       # flow key -> OffloadPath (forwarding)
        self.sockets: list = []             # sockets the auto/always policy looks at
        self.uploads: list = []             # OffloadPaths whose upload is finishing
        self.dirty: set = set()             # OffloadPaths with sends / receives to (re)post
        self.last_errors: list[str] = []
        self.deferred_terminates: list = []
        self.closing: set = set()           # closed OffloadPaths waiting for their FIN's ACK
        self.parked: set = set()            # SoftwarePaths after an upload with bytes still to feed
        self._last_auto = 0.0
        self._uploaded_socks: list = []     # back in software since the policy last looked
        self.send_limit_floor = min(send_limit, 64 * 1024)     # a SEND_BACKLOG goes no lower
        stack.offload = self
        chimney.status_handler = self._on_status
        self.sync = CachedStateSync(self)   # UPDATE / INVALIDATE / reachability answers
        chimney.neigh_query_handler = self.sync.on_neigh_query

    # -- policy -----------------------------------------------------------------------------
    def policy_for(self, sock) -> str:
        return sock.offload_policy or self.policy

    def register(self, sock) -> None:
        """A new established socket (from Socket.connect / accept)."""
        pol = self.policy_for(sock)
        if pol == "always":
            self.offload([sock], wait=True)
        if pol in ("auto", "always"):
            self.sockets.append(sock)

    def _auto(self) -> None:
        now = self.clock()
        if self._uploaded_socks:
            # an upload just finished: the policy looks at those sockets at once, not at
            # its next round (the application may read everything the upload handed the
            # software TCP, to EOF, without the stack stepping again)
            socks, self._uploaded_socks = self._uploaded_socks, []
        elif now - self._last_auto < AUTO_INTERVAL:
            return
        else:
            self._last_auto = now
            socks = list(self.sockets)
        todo = []
        for s in socks:
            if s.is_closed:
                if s in self.sockets:
                    self.sockets.remove(s)
                continue
            if s.path.software_conn() is None or s.no_reoffload:
                continue
            pol = self.policy_for(s)
            if pol == "never":
                continue
            moved = s.flow.bytes_out + s.path.rx_bytes
            if pol == "always" or moved >= self.auto_bytes or \
                    (self.auto_age is not None and now - s.born >= self.auto_age):
                if self.offloadable(s):
                    todo.append(s)
        if todo:
            self.offload(todo, wait=False)

    def offloadable(self, sock) -> bool:
        c = sock.path.software_conn()
        if isinstance(sock.path, SoftwarePath) and sock.path.parked:
            return False        # bytes still waiting for the send buffer: not in the state yet
        if c is not None and len(c.d.send_buffer) > NIC_SEND_BUFFER:
            # uploaded with more than the NIC's send buffer (its queued send requests came
            # back too): the NIC would refuse the state, so wait until the peer took enough
            return False
        return (c is not None and self.ch.is_up and not self.ch.paused and
                c.state not in NOT_OFFLOADABLE and c.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
                and not c.urgent_received and sock.flow.key in self.stack.flows)

    # -- offload ------------------------------------------------------------------------------
    def _neigh_for(self, remote):
        iface = self.stack.iface
        if remote.version == 4:
            hop, cache = iface._next_hop4(remote), iface.arp_cache
        else:
            hop, cache = iface._next_hop6(remote), iface.nd_cache
        e = cache.get(hop)
        if e is None or e.mac is None:
            return None, None
        return hop, e

    def offload(self, socks, wait: bool = True, timeout: float = 10.0):
        """Offload these sockets' connections in one state tree.  Returns the Command
        (None when none could go)."""
        stack = self.stack
        # segments that already reached the host go into the state (dropped otherwise:
        # the flow is detached from here on), and everything the software TCP sent
        # leaves before the NIC takes over: none of it may follow the NIC's own segments
        stack.receive_pending()
        if not stack.drain_tx():
            self.stats["handover_tx_not_drained"] += 1
        now = stack.clock()
        entries: list[ObjEntry] = []
        index: dict[int, int] = {}       # id(_Obj) -> record index in this tree
        items = []
        new_objs = []
        for s in socks:
            if not self.offloadable(s):
                self.stats["offload_refused_locally"] += 1
                continue
            flow = s.flow
            local, lport, remote, rport = flow.key
            hop, ne = self._neigh_for(remote)
            if ne is None:
                self.stats["offload_no_neighbour"] += 1
                continue
            nkey = str(hop)
            nobj = self.neighbours.get(nkey)
            if nobj is None:
                nobj = self.neighbours[nkey] = _Obj("neigh", nkey, next(self._handles))
                nobj.mac = bytes(ne.mac)
                new_objs.append(nobj)
            if id(nobj) not in index:
                index[id(nobj)] = len(entries)
                if nobj.ctx and not nobj.pending:
                    entries.append(ObjEntry(hw.OBJ_NEIGHBOR, nobj.handle, NONE32, link=True,
                                            nic_ctx=nobj.ctx))
                else:
                    nobj.pending = True
                    delta = int(max(0.0, now - ne.updated) * 1000)
                    entries.append(ObjEntry(hw.OBJ_NEIGHBOR, nobj.handle, NONE32, Neighbor(
                        src_mac=bytes(stack.iface.mac), dst_mac=bytes(ne.mac),
                        vlan_id=stack.iface.vlan, host_reach_delta=min(delta, 0xFFFFFFFE))))
            pkey = (str(local), str(remote))
            pobj = self.paths.get(pkey)
            if pobj is not None and pobj.parent is not nobj:
                self.stats["offload_path_moved"] += 1      # neighbour changed: not handled (stay software)
                continue
            if pobj is None:
                pobj = self.paths[pkey] = _Obj("path", pkey, next(self._handles), nobj)
                new_objs.append(pobj)
            if id(pobj) not in index:
                index[id(pobj)] = len(entries)
                if pobj.ctx and not pobj.pending:
                    entries.append(ObjEntry(hw.OBJ_PATH, pobj.handle, index[id(nobj)], link=True,
                                            nic_ctx=pobj.ctx))
                else:
                    pobj.pending = True
                    pobj.mtu = self.sync.path_mtu(pkey)
                    entries.append(ObjEntry(hw.OBJ_PATH, pobj.handle, index[id(nobj)],
                                            Path(str(local), str(remote), pobj.mtu)))
            # the connection: state out of the software TCP, the flow detached
            conn = flow.conn
            const, cached, d = conn.export(now)
            stack._flush_flow(flow)           # the delayed ACK export sent
            stack.detach(flow, hold=True)     # what arrives until the NIC has it: held
            const.rss_hash = rss_hash(local, lport, remote, rport)
            cached.ttl = stack.iface.ttl if remote.version == 4 else stack.iface.hop_limit
            for k, v in self.cached.items():
                setattr(cached, k, v)
            handle = next(self._handles)
            entries.append(ObjEntry(hw.OBJ_TCP, handle, index[id(pobj)], Tcp(const, cached, d)))
            old_path = s.path
            s.path = HandoverPath(old_path)
            items.append((s, handle, pobj, d, len(entries) - 1, old_path))
        if not items:
            for o in new_objs:      # nothing to carry: forget objects made for nothing
                self.forget(o)
            return None
        stack.flush()       # the delayed ACKs of the exports (no data: export sends none)
        self.stats["initiates"] += 1
        self.stats["initiate_conns"] += len(items)
        objs = {o.handle: o for o in new_objs}
        try:
            cmd = self.ch.initiate(entries, cb=lambda c: self._initiated(c, items, objs))
        except Exception as e:  # noqa: BLE001 -- arena exhausted: everything back to software
            self.last_errors.append(f"initiate: {e}")
            for o in new_objs:
                self.forget(o)
            for s, handle, pobj, d, i, old in items:
                handover, s.path = s.path, old
                self.stack.attach(s.flow)
                handover.apply_deferred(s.path)
            return None
        if wait and not self.stack.run_until(lambda: cmd.done, timeout):
            self.last_errors.append("initiate timed out")
        return cmd

    def _initiated(self, cmd, items, objs) -> None:
        res = cmd.result or []
        by_handle = {e.host_handle: e for e in res}
        # neighbours and paths first
        for h, o in objs.items():
            e = by_handle.get(h)
            o.pending = False
            if e is not None and e.status in (hw.ST_SUCCESS, hw.ST_PARTIAL) and e.nic_ctx:
                o.ctx = e.nic_ctx
            else:
                self.forget(o)
        for s, handle, pobj, d, i, old_path in items:
            e = by_handle.get(handle)
            handover = s.path
            if e is None or e.status != hw.ST_SUCCESS or not e.nic_ctx or not pobj.ctx:
                self.stats["offload_failed"] += 1
                self.last_errors.append(f"initiate {s.flow.key}: status "
                                        f"{None if e is None else e.status}, command {cmd.status}")
                s.path = old_path
                self.stack.attach(s.flow)
                s.no_reoffload = True
                handover.apply_deferred(s.path)
                continue
            held = self.stack.release_held(s.flow.key)
            pobj.refs += 1
            pobj.parent.refs += 1 if pobj.refs == 1 else 0
            p = OffloadPath(self, s, handle, e.nic_ctx, pobj, d)
            self.offloaded[handle] = p
            self.by_key[s.flow.key] = p
            self.ch.register(handle, p)
            s.offload_handle = handle       # which RSS queue set served it (rss_info)
            s.path = p
            # arrived after the export, before the NIC took the 4-tuple: the NIC gets
            # them now, in arrival order, as if they had come off the wire
            for _src, _dst, seg in held:
                if self.ch.forward(p.ctx, handle, seg) is None:
                    self.stats["handover_segments_unforwarded"] += 1
                else:
                    self.stats["handover_segments_forwarded"] += 1
            self.stats["offloaded"] += 1
            s.offload_count += 1
            p.pump()
            handover.apply_deferred(p)
        for o in objs.values():
            if o.ctx and (self.neighbours if o.kind == "neigh" else self.paths).get(o.key) is o:
                self.sync.after_initiate(o)

    def forward(self, key, segment) -> bool:
        """A received segment of an offloaded connection that the NIC did not take off
        the wire (only the host could parse its IP layer) goes down the chimney (OSEND
        FORWARD).  False: not offloaded (any more), or the ring is full."""
        p = self.by_key.get(key)
        if p is None or p.state != "offloaded":
            return False
        if self.ch.forward(p.ctx, p.handle, segment) is None:
            self.stats["forward_ring_full"] += 1
            return False
        self.stats["segments_forwarded"] += 1
        return True

    # -- upload ---------------------------------------------------------------------------------
    def upload(self, sock_or_path, wait: bool = False, then: str | None = None, timeout: float = 10.0):
        """Start (and with wait, finish) the upload of an offloaded socket (or path)."""
        p = sock_or_path if isinstance(sock_or_path, OffloadPath) else sock_or_path.path
        if not isinstance(p, OffloadPath):
            return None
        if then:
            p.then = then
        if p.state == "offloaded":
            self._terminate([p])
        if wait:
            return self.stack.run_until(lambda: p.state == "uploaded", timeout)
        return None

    def upload_all(self, wait: bool = True, timeout: float = 30.0) -> int:
        ps = [p for p in self.offloaded.values() if p.state == "offloaded"]
        if ps:
            self._terminate(ps)
        if wait:
            self.stack.run_until(lambda: all(p.state == "uploaded" for p in ps), timeout)
        return len(ps)

    def _terminate(self, ps) -> None:
        for p in ps:
            p.state = "uploading"
            p.upload_started = self.clock()
        if self.ch.sendq.space() < self.ch.sendq.size:
            # send requests posted before the upload are still on the ring: the NIC takes
            # them first (there is no order between the CMD and OSEND queues)
            self.deferred_terminates.append(ps)
            return
        self._issue_terminate(ps)

    def _issue_terminate(self, ps) -> None:
        room = 0
        for p in ps:
            self.stack.hold(p.flow.key)     # what the NIC no longer takes: held for software
            p.state = "uploading"
            p.upload_started = self.clock()
            room += p.outstanding + 2 * self.rx_limit + 65536
        self.stats["terminates"] += 1
        cmd = self.ch.terminate([p.ctx for p in ps], cb=lambda c: self._terminated(c, ps),
                                data_room=min(room, 16 << 20))
        return cmd

    def _terminated(self, cmd, ps) -> None:
        recs = {e.nic_ctx: e for e in (cmd.result or []) if e.type == hw.OBJ_TCP}
        by_handle = {e.host_handle: e for e in (cmd.result or []) if e.type == hw.OBJ_TCP}
        for p in ps:
            e = by_handle.get(p.handle) or recs.get(p.ctx)
            if e is None or e.state is None:
                p.upload_error = f"TERMINATE {cmd.status}: no state for ctx {p.ctx} ({cmd.error})"
                self.last_errors.append(p.upload_error)
                self.stats["upload_no_state"] += 1
            p.uploaded_state = e.state if e is not None else None
            p.terminated = True
            self.uploads.append(p)
        self._finish_uploads()

    def _finish_uploads(self) -> None:
        now = self.clock()
        for p in list(self.uploads):
            if p.io_outstanding() and now - p.upload_started < self.handover_timeout:
                continue
            if p.io_outstanding():
                self.stats["upload_io_never_returned"] += 1
            self.uploads.remove(p)
            self._handover_up(p)

    def _handover_up(self, p) -> None:
        s, stack = p.sock, self.stack
        self.offloaded.pop(p.handle, None)
        if self.by_key.get(p.flow.key) is p:
            del self.by_key[p.flow.key]
        self.ch.unregister(p.handle)
        self.dirty.discard(p)
        p.state = "uploaded"
        self._release_path(p.pobj)
        st = p.uploaded_state
        if st is None or p.reset_flag:
            # aborted (or the NIC lost it): the socket keeps the dead OffloadPath
            stack.detached.pop(s.flow.key, None)
            stack.release_held(s.flow.key)
            if st is None and not p.reset_flag:
                p.err = p.err or (p.upload_error or "upload failed")
            return
        d, parked, fin = p.software_state(st)
        const = st.const
        const.local_ip, const.remote_ip = str(s.flow.key[0]), str(s.flow.key[2])
        # the window the NIC advertised stays open: the peer may have sent up to its
        # right edge already (a software buffer smaller than the NIC's would drop that)
        cfg = stack._config_for(s.flow.key[0])
        room = len(d.recv_buffer) + d.rcv_wnd
        if room > cfg.recv_buffer_size:
            cfg = dataclasses.replace(cfg, recv_buffer_size=room)
        conn = Connection.from_state(const, st.cached, d, stack.clock(), cfg)
        stack.attach(s.flow, conn)
        sp = SoftwarePath(stack, s.flow, parked)
        sp.rx_bytes = p.rx_bytes
        s.path = sp
        if fin:
            sp.shutdown_write()         # after the parked bytes
        if not sp.drain():
            self.parked.add(sp)
        self.stats["uploaded"] += 1
        if s in self.sockets:
            self._uploaded_socks.append(s)
        s.upload_count += 1
        if p.no_route and stack.iface.next_hop(s.flow.key[2]) is None:
            # invalidated for want of a route: an error for the application, not a hang
            conn.error = "no route to host"
            sp.abort()
            self.stats["upload_no_route_aborted"] += 1
        elif p.then == "close":
            sp.close()
        elif p.then == "abort":
            sp.abort()
        stack.flush()

    def _release_path(self, pobj) -> None:
        pobj.refs -= 1
        if pobj.refs > 0:
            return
        ctxs = [pobj.ctx]
        self.forget(pobj)
        n = pobj.parent
        n.refs -= 1
        if n.refs <= 0:
            ctxs.append(n.ctx)
            self.forget(n)
        self.stats["terminate_parents"] += 1
        self.ch.terminate([c for c in ctxs if c])

    def forget(self, o) -> None:
        """o is no longer one new connections link to (its key may name a newer one)."""
        d = self.neighbours if o.kind == "neigh" else self.paths
        if d.get(o.key) is o:
            del d[o.key]

    # -- query ------------------------------------------------------------------------------------
    def query(self, socks=None, wait: bool = True, timeout: float = 10.0) -> dict:
        """{host handle: {'state': Tcp state, 'sock': socket}} for offloaded connections."""
        ps = [s.path for s in socks] if socks is not None else list(self.offloaded.values())
        ps = [p for p in ps if isinstance(p, OffloadPath) and p.state == "offloaded"]
        if not ps:
            return {}
        cmd = self.ch.query([p.ctx for p in ps])
        if not wait:
            return {"command": cmd}
        self.ch.wait(cmd, timeout)
        out = {}
        by_handle = {e.host_handle: e for e in (cmd.result or [])}
        for p in ps:
            e = by_handle.get(p.handle)
            if e is not None and e.state is not None:
                out[p.handle] = {"sock": p.sock, "state": e.state, "path": p}
        return out

    # -- window probes ------------------------------------------------------------------------
    def probe_windows(self, socks, interval_ms: int = MIN_KA_TICKS, max_probes: int = 1000,
                      timeout: float = 10.0) -> dict:
        """Make the NIC probe these offloaded connections' peers every interval_ms: an
        UPDATE of their cached state turns keep-alive on (idle time and interval
        interval_ms, restarted now; the NIC takes no shorter keep-alive than 100 ticks
        of 1 ms), so the NIC sends SEG.SEQ = SND.UNA-1 probes and
        every answer brings the peer's current window into SND.WND (QUERY shows it).
        max_probes unanswered in a row before the NIC gives up: a peer may answer only
        some of them (Linux: one zero-length probe per half second).  -> {host handle:
        (path, the cached state it had)} for end_window_probes."""
        saved, entries = {}, []
        for h, v in self.query(socks, timeout=timeout).items():
            st, p = v["state"], v["path"]
            saved[h] = (p, dataclasses.replace(st.cached))
            st.cached = dataclasses.replace(st.cached, keepalive=True, keepalive_restart=True,
                                            ka_timeout=interval_ms, ka_interval=interval_ms,
                                            ka_probe_count=max_probes)
            entries.append(ObjEntry(hw.OBJ_TCP, h, NONE32, st, nic_ctx=p.ctx))
        if entries:
            self.stats["window_probes"] += len(entries)
            cmd = self.ch.update(entries)
            if not self.stack.run_until(lambda: cmd.done, timeout):
                self.last_errors.append("window probe update timed out")
        return saved

    def end_window_probes(self, saved: dict, timeout: float = 10.0) -> None:
        """Put back the cached state probe_windows changed (keep-alive restarted if it
        was on), for the connections still offloaded on the same NIC context."""
        live = [p for p, _ in saved.values() if p.state == "offloaded" and self.offloaded.get(p.handle) is p]
        entries = []
        for h, v in self.query([p.sock for p in live], timeout=timeout).items():
            st = v["state"]
            st.cached = dataclasses.replace(saved[h][1], keepalive_restart=saved[h][1].keepalive)
            entries.append(ObjEntry(hw.OBJ_TCP, h, NONE32, st, nic_ctx=v["path"].ctx))
        if entries:
            cmd = self.ch.update(entries)
            if not self.stack.run_until(lambda: cmd.done, timeout):
                self.last_errors.append("window probe restore timed out")

    @staticmethod
    def conn_stats(p, st) -> dict:
        """Per-connection figures from a QUERY result (live; SRTT in ms)."""
        d = st.delegated
        return {"state": str(d.state), "cwnd": d.cwnd, "ssthresh": d.ssthresh,
                "srtt_ms": d.srtt / 8, "rttvar_ms": d.rttvar / 4, "snd_wnd": d.snd_wnd,
                "bytes_acked": seq_sub(data_snd_una(d), p.snd_una0) & 0xFFFFFFFF,
                "bytes_received": seq_sub(data_rcv_end(d), p.rcv_nxt0) & 0xFFFFFFFF,
                "retransmit_count": d.retransmit_count, "total_rt": d.total_rt,
                "dup_ack_count": d.dup_ack_count}

    # -- receive side scaling ---------------------------------------------------------------------
    def _rss_chimney(self):
        return getattr(self.ch, "bottom", self.ch)      # under any intermediate drivers

    def set_rss_table(self, buckets, wait: bool = False, timeout: float = 10.0):
        """Program the NIC's RSS indirection table (buckets[i]: the queue set of the
        connections whose hash & 127 is i); usable while traffic runs, a connection that
        moves keeps its data in order.  ValueError for a table the queue sets cannot take."""
        cmd = self._rss_chimney().set_rss_table(buckets)
        self.stats["rss_tables"] += 1
        if wait and not self.stack.run_until(lambda: cmd.done, timeout):
            self.last_errors.append("RSS_TABLE timed out")
        return cmd

    def rss_info(self, sock) -> dict | None:
        """The queue set that served the socket's offloaded connection last and the
        records each set carried for it (None: never offloaded, or not known through
        intermediate drivers, whose handles differ)."""
        h = getattr(sock, "offload_handle", None)
        served = getattr(self._rss_chimney(), "served", {}).get(h) if h is not None else None
        if served is None:
            return None
        return {"queue": served["queue"], "records": {str(k): n for k, n in sorted(served["records"].items())}}

    # -- events -------------------------------------------------------------------------------------
    def _on_status(self, kind) -> None:
        if kind == hw.EV_UPLOAD_ALL:
            self.stats["upload_all"] += 1
            self.upload_all(wait=False)

    def on_send_backlog(self, p, value: int) -> None:
        """SEND_BACKLOG: the NIC's preferred outstanding send data for p's connection
        becomes its send limit, within [send_limit_floor, send_limit]."""
        p.send_limit = max(self.send_limit_floor, min(self.send_limit, value))
        self.stats["send_backlog_events"] += 1
        if p.state == "offloaded":
            self.dirty.add(p)

    # -- the loop -----------------------------------------------------------------------------------
    def poll(self) -> None:
        """The manager's part of the stack's step (HostStack.poll): the chimney's
        completions and events, reposting, deferred terminates, closes, uploads, policy.
        Every wait here runs the stack's step (stack.run_until), never a loop of its own."""
        if not self.ch.is_up:
            return
        self.ch.poll()
        for p in list(self.dirty):
            p.pump()
        for sp in list(self.parked):
            if sp.drain():
                self.parked.discard(sp)
        if self.deferred_terminates and (self.ch.sendq.space() >= self.ch.sendq.size or
                                         any(self.clock() - p.upload_started > 1.0
                                             for ps in self.deferred_terminates for p in ps)):
            todo, self.deferred_terminates = self.deferred_terminates, []
            for ps in todo:
                self._issue_terminate(ps)
        if self.closing:
            now = self.clock()
            for p in list(self.closing):
                if p.state != "offloaded":
                    self.closing.discard(p)
                elif (p.fin_posted and not p.sends) or now - p.close_started > 30:
                    self.closing.discard(p)
                    self.upload(p, then="close")
        if self.uploads:
            self._finish_uploads()
        self.sync.poll()
        if self.sockets:
            self._auto()
