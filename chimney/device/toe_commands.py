"""The TOE's state-manipulation commands (CMD -> CMDC): INITIATE, UPDATE, QUERY,
TERMINATE, INVALIDATE, SET_PARAMS and RSS_TABLE, with the command ring itself.  A
mixin of chimney.device.toe.Toe: the methods use its tables and to-host records."""
from __future__ import annotations

import dataclasses
import logging
import struct

from .. import hw
from ..staterec import codec
from ..staterec.codec import CodecError
from ..tcp.engine import Config, Connection
from ..tcp.state import NOT_OFFLOADABLE, TICKS_PER_SECOND
from ._fastpath import lib
from .toe_objects import (
    MASK32,
    MAX_OBJECTS,
    MAX_INITIATE_SEND,
    MAX_REQ,
    NONE32_TICKS,
    SATURATING,
    NeighObj,
    Obj,
    PathObj,
    TcpObj,
    state_problem,
)

_U32 = struct.Struct("<I")
_OCOMPL_CTX = hw.OComplRec.offset_of("ctx")      # where a packed record names its connection

log = logging.getLogger("chimney.device.toe")


class ToeCommands:
    # -- commands ----------------------------------------------------------------------
    def _poll_cmd(self, now: float) -> int:
        descs = self._consume(hw.CMDQ, 64)
        for raw in descs:
            c = hw.CmdDesc.unpack_from(raw)
            try:
                status, resp, count = self._command(c, now)
            except Exception:           # a bug of ours: fail the command, keep serving
                log.exception("command %d (tag %d): internal error", c["opcode"], c["tag"])
                self.internal_errors += 1
                status, resp, count = hw.ST_FAILURE, b"", 0
            resp_bytes = 0
            if resp and status not in (hw.ST_NO_SPACE, hw.ST_DMA_ERROR):
                if len(resp) > c["resp_len"]:
                    status, resp_bytes = hw.ST_NO_SPACE, 0
                elif not self.dma.write(c["resp_addr"], resp):
                    self._dma_error(hw.CMDQ, c["resp_addr"])
                    status = hw.ST_DMA_ERROR
                else:
                    resp_bytes = len(resp)
            self._stat("offload_cmds")
            if status not in (hw.ST_SUCCESS,):
                self._stat("offload_cmd_errors")
            self.out[hw.CMDCQ].append(hw.CmdCompl.pack(tag=c["tag"], opcode=c["opcode"],
                                                       status=status, resp_bytes=resp_bytes,
                                                       count=count))
        return len(descs)

    def _command(self, c: dict, now: float) -> tuple[int, bytes, int]:
        op = c["opcode"]
        handlers = {hw.CMD_INITIATE: self._cmd_initiate, hw.CMD_UPDATE: self._cmd_update,
                    hw.CMD_QUERY: self._cmd_query, hw.CMD_INVALIDATE: self._cmd_invalidate,
                    hw.CMD_TERMINATE: self._cmd_terminate, hw.CMD_SET_PARAMS: self._cmd_params,
                    hw.CMD_RSS_TABLE: self._cmd_rss}
        h = handlers.get(op)
        if h is None or c["flags"]:
            return hw.ST_INVALID_REQUEST, b"", 0
        n = c["req_len"]
        if n > MAX_REQ:
            return hw.ST_INVALID_REQUEST, b"", 0
        req = b""
        if n:
            req = self.dma.read(c["req_addr"], n)
            if req is None:
                self._dma_error(hw.CMDQ, c["req_addr"])
                return hw.ST_DMA_ERROR, b"", 0
        if c["resp_len"] and not self._buf_ok(c["resp_addr"], c["resp_len"], True):
            self._dma_error(hw.CMDQ, c["resp_addr"])
            return hw.ST_DMA_ERROR, b"", 0
        try:
            return h(req, c["resp_len"], now)
        except CodecError as e:
            log.warning("command %d: malformed request: %s", op, e)
            return hw.ST_INVALID_REQUEST, b"", 0

    # INITIATE ---------------------------------------------------------------------------
    def _cmd_initiate(self, req: bytes, resp_len: int, now: float):
        entries = codec.decode_records(req, max_records=MAX_OBJECTS, record_errors=True)
        if not entries:
            return hw.ST_INVALID_REQUEST, b"", 0
        if resp_len < hw.ObjStatus.size * len(entries):
            return hw.ST_NO_SPACE, b"", 0
        made: list[Obj | None] = []
        failed = 0
        for i, e in enumerate(entries):
            obj, status = self._initiate_one(e, entries, made, now)
            made.append(obj if status == hw.ST_SUCCESS else None)
            e.status = status
            e.nic_ctx = obj.ctx if obj is not None and status == hw.ST_SUCCESS else 0
            if status != hw.ST_SUCCESS:
                failed += 1
                self._stat("offload_cmd_errors")
        for o in made:
            if isinstance(o, TcpObj):
                self.touched.add(o.ctx)
        self._stat("offload_conns", set_to=len(self.conns))
        self._pause_resume()
        overall = hw.ST_SUCCESS if not failed else (
            hw.ST_FAILURE if failed == len(entries) else hw.ST_PARTIAL)
        return overall, codec.encode_statuses(entries), len(entries)

    def _initiate_one(self, e, entries, made, now):
        if e.link:
            o = self.lookup(e.nic_ctx, e.type)
            return (o, hw.ST_SUCCESS) if o is not None and not o.invalid else (None, hw.ST_INVALID_HANDLE)
        # send data beyond our send buffer is taken (the host's buffer may be larger): the
        # connection's buffer grows to hold it, within what one record can carry back
        why = state_problem(e, MAX_INITIATE_SEND) or self._mtu_problem(e)
        if why:
            log.info("initiate: object %d (handle %#x) refused: %s", e.type, e.host_handle, why)
            return None, hw.ST_INVALID_REQUEST
        parent = None
        if e.type != hw.OBJ_NEIGHBOR:
            parent = made[e.parent]
            if parent is None:
                return None, hw.ST_FAILURE            # its parent failed
        if len(self.objs) >= MAX_OBJECTS:
            return None, hw.ST_RESOURCES
        if e.type == hw.OBJ_NEIGHBOR:
            if e.state.vlan_id is not None:
                return None, hw.ST_FAILURE            # VLAN tagging not implemented
            ctx = self._new_ctx()
            o = NeighObj(ctx, e.host_handle, e.state, now)
        elif e.type == hw.OBJ_PATH:
            ctx = self._new_ctx()
            o = PathObj(ctx, e.host_handle, e.state)
            o.parent = parent
        else:
            o = self._initiate_tcp(e, parent, now)
            if not isinstance(o, Obj):
                return None, o
        if parent is not None:
            parent.children.add(o.ctx)
        self.objs[o.ctx] = o
        return o, hw.ST_SUCCESS

    def _initiate_tcp(self, e, path: PathObj, now: float):
        t: codec.Tcp = e.state
        d = t.delegated
        if d.state in NOT_OFFLOADABLE:
            return hw.ST_FAILURE
        const = dataclasses.replace(t.const, local_ip=path.st.src_ip, remote_ip=path.st.dst_ip)
        key = (path.src16, path.dst16, const.local_port, const.remote_port)
        if any(x.key == key and not x.dead for x in self._by_key(key)):
            return hw.ST_FAILURE                      # already offloaded
        if len(self.conns) >= self.max_conns:
            return hw.ST_RESOURCES
        cfg = self._conn_config(path, d)
        conn = Connection.from_state(const, t.cached, d, now, cfg)
        ctx = self._new_ctx()
        qidx = self.rss_table[const.rss_hash & 127] % hw.NUM_OFFLOAD_QUEUES
        o = TcpObj(ctx, e.host_handle, conn, path, qidx)
        o.backlog_last = max(d.cwnd, d.snd_wnd)
        o.backlog_time = now
        if lib.toe_add(self.c, *key, ctx):
            self._release(o)
            return hw.ST_RESOURCES
        o.in_table = True
        self.conns[ctx] = o
        self._keys[key] = ctx
        return o

    def _by_key(self, key):
        ctx = self._keys.get(key)
        o = self.conns.get(ctx) if ctx is not None else None
        return [o] if o is not None else []

    @property
    def _keys(self) -> dict:
        return self._keymap

    def _conn_config(self, path: PathObj, d) -> Config:
        mss = path.st.path_mtu - (60 if path.v6 else 40)
        rcv = max(self.cfg.recv_buffer_size, d.rcv_wnd + len(d.recv_buffer))
        snd = max(self.cfg.send_buffer_size, len(d.send_buffer))
        return dataclasses.replace(self.cfg, local_mss=max(64, mss), recv_buffer_size=rcv,
                                   send_buffer_size=snd)

    # UPDATE -----------------------------------------------------------------------------
    def _cmd_update(self, req: bytes, resp_len: int, now: float):
        entries = codec.decode_records(req, tree=False, record_errors=True)
        if not entries:
            return hw.ST_INVALID_REQUEST, b"", 0
        failed = 0
        for e in entries:
            o = self.lookup(e.nic_ctx, e.type)
            if o is None or e.link or self._update_problem(e):
                failed += 1
                continue
            if isinstance(o, NeighObj):
                o.st.dst_mac = e.state.dst_mac
                o.st.host_reach_delta = e.state.host_reach_delta
                o.host_seen = now - e.state.host_reach_delta / TICKS_PER_SECOND
                o.query_out = False
            elif isinstance(o, PathObj):
                if e.parent not in (codec.NONE32, o.parent.ctx):
                    # the path moves to another neighbour (its context is the parent)
                    n = self.lookup(e.parent, hw.OBJ_NEIGHBOR)
                    if n is None or n.invalid:
                        failed += 1
                        continue
                    o.parent.children.discard(o.ctx)
                    n.children.add(o.ctx)
                    o.parent = n
                o.st.path_mtu = e.state.path_mtu
                mss = o.st.path_mtu - (60 if o.v6 else 40)
                for c in o.children:
                    t = self.conns.get(c)
                    if t is not None:
                        t.conn.cfg.local_mss = max(64, mss)
            else:
                conn = o.conn
                new = e.state.cached
                restart_ka, restart_rt = new.keepalive_restart, new.maxrt_restart
                new.keepalive_restart = new.maxrt_restart = False
                conn.cached = new
                if new.update_rcv_wnd:
                    new.update_rcv_wnd = False
                if restart_ka:
                    conn._restart_keepalive()
                if restart_rt:
                    conn.d.total_rt = 0
                self.touched.add(o.ctx)
        status = hw.ST_SUCCESS if not failed else (
            hw.ST_INVALID_HANDLE if failed == len(entries) else hw.ST_PARTIAL)
        return status, b"", len(entries)

    def _mtu_problem(self, e) -> str | None:
        if e.type == hw.OBJ_PATH and e.state is not None and \
                e.state.path_mtu > self.wire.mtu:
            return f"path MTU {e.state.path_mtu} above the NIC's MTU {self.wire.mtu}"
        return None

    def _update_problem(self, e) -> str | None:
        if e.state is None:
            return e.extra.get("error", "no state")
        if e.type == hw.OBJ_PATH:
            return self._mtu_problem(e)
        if e.type == hw.OBJ_NEIGHBOR:
            return codec.check_neighbor(e.state)
        if e.type == hw.OBJ_TCP:
            return codec.check_cached(e.state.cached)
        return None

    # QUERY / TERMINATE ------------------------------------------------------------------
    def _record(self, o: Obj, now: float, terminate: bool) -> bytes:
        """The object's state record.  QUERY (terminate False) reads without side
        effects: a pending delayed ACK stays pending.  TERMINATE: the engine puts that
        ACK in its outbox, and the device loop sends it (final_tx) before the
        completion reaches the host."""
        data = b""
        parent = o.parent.ctx if o.parent is not None else codec.NONE32
        if isinstance(o, NeighObj):
            o.st.nic_reach_delta = min(NONE32_TICKS, max(0, int((now - o.nic_seen) * TICKS_PER_SECOND)))
            o.st.host_reach_delta = min(NONE32_TICKS, max(0, int((now - o.host_seen) * TICKS_PER_SECOND)))
            state = codec.encode_neighbor(o.st)
        elif isinstance(o, PathObj):
            state = codec.encode_path(o.st)
        else:
            conn = o.conn
            held = conn._delack_deadline
            if not terminate:
                conn._delack_deadline = None      # export would send it
            try:
                const, cached, d = conn.export(now)
            finally:
                if not terminate:
                    conn._delack_deadline = held
            if o.pending:
                d.send_buffer = bytes(d.send_buffer) + b"".join(
                    bytes(x[0][x[1]:]) for x in o.pending)
            if o.disconnect_pending:
                d.fin_queued = True
            for name in SATURATING:              # counters and ages past 32 bits
                if getattr(d, name) > MASK32:
                    setattr(d, name, MASK32)
            state, data = codec.encode_tcp(codec.Tcp(const, cached, d))
            if not terminate:
                data = b""
        rec = hw.ObjRecord.pack(type=o.type, link=0, status=hw.ST_SUCCESS, parent=parent,
                                host_handle=o.handle, nic_ctx=o.ctx, state_len=len(state),
                                data_len=len(data)) + state + data
        return rec + bytes(-len(rec) % 8)

    @staticmethod
    def _missing(ctx: int) -> bytes:
        return hw.ObjRecord.pack(type=hw.OBJ_NEIGHBOR, status=hw.ST_INVALID_HANDLE,
                                 parent=codec.NONE32, nic_ctx=ctx)

    def _cmd_query(self, req: bytes, resp_len: int, now: float):
        ctxs = codec.decode_contexts(req)
        if not ctxs:
            return hw.ST_INVALID_REQUEST, b"", 0
        out, bad = [], 0
        for ctx in ctxs:
            o = self.objs.get(ctx)
            if o is None:
                bad += 1
                out.append(self._missing(ctx))
            else:
                out.append(self._record(o, now, terminate=False))
        resp = b"".join(out)
        if len(resp) > resp_len:
            return hw.ST_NO_SPACE, b"", len(ctxs)
        return self._overall(bad, len(ctxs)), resp, len(ctxs)

    @staticmethod
    def _overall(bad: int, n: int) -> int:
        return hw.ST_SUCCESS if not bad else (hw.ST_INVALID_HANDLE if bad == n else hw.ST_PARTIAL)

    def _cmd_terminate(self, req: bytes, resp_len: int, now: float):
        ctxs = codec.decode_contexts(req)
        if not ctxs:
            return hw.ST_INVALID_REQUEST, b"", 0
        # First pass: what would be returned (nothing changes if it does not fit)
        plan, bad = [], 0
        leaving: set[int] = set()
        seen: set[int] = set()
        for ctx in ctxs:
            o = self.objs.get(ctx)
            if o is None or ctx in seen:
                bad += 1
                plan.append((None, self._missing(ctx)))
                continue
            seen.add(ctx)
            if o.children - leaving:
                bad += 1
                plan.append((None, self._failed(o)))
                continue
            leaving.add(ctx)
            plan.append((o, None))
        size = sum(len(r) if o is None else 0 for o, r in plan)
        for o, _ in plan:
            if isinstance(o, TcpObj):
                d = o.conn.d
                size += hw.ObjRecord.size + codec._STATE_LEN[hw.OBJ_TCP] + len(d.send_buffer) \
                    + len(d.recv_buffer) + sum(len(x[0]) - x[1] for x in o.pending) + 8
            elif o is not None:
                size += hw.ObjRecord.size + codec._STATE_LEN[o.type] + 8
        if size > resp_len:
            return hw.ST_NO_SPACE, b"", len(ctxs)
        # Second pass, in request order: an object whose record cannot be built stays
        # (FAILURE), and so does a parent listed after it; the others leave.
        out = []
        left: set[int] = set()
        for o, rec in plan:
            if o is not None and o.children - left:
                bad += 1
                o, rec = None, self._failed(o)
            if o is None:
                out.append(rec)
                continue
            try:
                rec = self._record(o, now, terminate=True)
            except Exception:
                log.exception("terminate %#x: internal error", o.ctx)
                self.internal_errors += 1
                bad += 1
                out.append(self._failed(o))
                if isinstance(o, TcpObj):
                    self.touched.add(o.ctx)     # whatever export queued goes out as usual
                continue
            out.append(rec)
            left.add(o.ctx)
            if isinstance(o, TcpObj) and not o.invalid and not o.dead:
                self.final_tx.append(o)
            self._terminate(o)
        self._stat("offload_conns", set_to=len(self.conns))
        self._pause_resume()
        return self._overall(bad, len(ctxs)), b"".join(out), len(ctxs)

    @staticmethod
    def _failed(o: Obj) -> bytes:
        return hw.ObjRecord.pack(type=o.type, status=hw.ST_FAILURE,
                                 parent=o.parent.ctx if o.parent else codec.NONE32,
                                 host_handle=o.handle, nic_ctx=o.ctx)

    def _pause_resume(self) -> None:
        """Status indications: PAUSE when the connection table is 90 % full or the
        link is down, RESUME once the link is up and the table below 80 % again."""
        n = len(self.conns)
        if not self.paused and (n * 10 >= self.max_conns * 9 or not self.link_up):
            self.paused = True
            self._event(None, hw.EV_PAUSE)
        elif self.paused and self.link_up and n * 10 < self.max_conns * 8:
            self.paused = False
            self._event(None, hw.EV_RESUME)

    def link_changed(self, up: bool) -> None:
        """The port's link went down or came back (chimney.device.nic): down is PAUSE
        and UPLOAD_ALL, the host carries on in software; up is RESUME (if the table
        has room), offloads are welcome again."""
        if up == self.link_up:
            return
        self.link_up = up
        if not self.device_enabled():
            return          # no driver to tell: reset() clears what would be pending
        self._pause_resume()
        if not up:
            self._event(None, hw.EV_UPLOAD_ALL)

    def _terminate(self, o: Obj) -> None:
        if isinstance(o, TcpObj):
            for tag, end, length in o.requests:
                self._ocompl(o, hw.OC_SEND_DONE, tag, 0, hw.ST_UPLOADED)
            o.requests.clear()
            self._drop_pending(o)
            self.want_pool[o.qidx].pop(o.ctx, None)
            while o.posted:
                b = o.posted.popleft()
                self._ocompl(o, hw.OC_RECV_DONE, b.tag, b.filled, hw.ST_UPLOADED)
            o.dead = True
            self._untable(o)
            self.conns.pop(o.ctx, None)
            if self._keys.get(o.key) == o.ctx:
                del self._keys[o.key]
            self.uploaded[o.ctx] = o.handle
            if len(self.uploaded) > 4096:
                self.uploaded.popitem(last=False)
        if o.parent is not None:
            o.parent.children.discard(o.ctx)
        self._release(o)

    # INVALIDATE -------------------------------------------------------------------------
    def _cmd_invalidate(self, req: bytes, resp_len: int, now: float):
        ctxs = codec.decode_contexts(req)
        if not ctxs:
            return hw.ST_INVALID_REQUEST, b"", 0
        bad = 0
        for ctx in ctxs:
            o = self.objs.get(ctx)
            if o is None:
                bad += 1
                continue
            o.invalid = True
            for t in self._dependent_conns(o):
                t.invalid = True
                if "invalid" not in t.events_sent:
                    t.events_sent.add("invalid")
                    self._event(t, hw.EV_RETRIEVE, hw.RR_INVALID_STATE)
        return self._overall(bad, len(ctxs)), b"", len(ctxs)

    def _dependent_conns(self, o: Obj) -> list[TcpObj]:
        if isinstance(o, TcpObj):
            return [o]
        out = []
        for c in o.children:
            ch = self.objs.get(c)
            if ch is not None:
                out += self._dependent_conns(ch)
        return out

    # SET_PARAMS / RSS_TABLE -------------------------------------------------------------
    def _cmd_params(self, req: bytes, resp_len: int, now: float):
        if len(req) != hw.OffloadParams.size:
            return hw.ST_INVALID_REQUEST, b"", 0
        p = hw.OffloadParams.unpack_from(req)
        if p["ticks_per_second"] not in (0, TICKS_PER_SECOND):
            return hw.ST_INVALID_REQUEST, b"", 0
        # bounds a connection can run with: no backoff exponent past MAX_BACKOFF, a
        # delayed ACK within RFC 1122's 0.5 s
        if p["max_retransmits"] > codec.MAX_BACKOFF or p["delayed_ack_ticks"] > 500:
            return hw.ST_INVALID_REQUEST, b"", 0
        cfg = self.cfg
        t = TICKS_PER_SECOND
        if p["ack_frequency"]:
            cfg.ack_frequency = p["ack_frequency"]
        if p["delayed_ack_ticks"]:
            cfg.delayed_ack = p["delayed_ack_ticks"] / t
        if p["max_retransmits"]:
            cfg.max_retransmits = p["max_retransmits"]
        if p["dupack_threshold"]:
            cfg.dupack_threshold = p["dupack_threshold"]
        if p["rto_min_ticks"]:
            cfg.rto_min = p["rto_min_ticks"] / t
        if p["push_ticks"]:
            self.push_ticks = p["push_ticks"]
        if p["neigh_stale_ticks"]:
            self.neigh_stale_ticks = p["neigh_stale_ticks"]
        for o in self.conns.values():
            c = o.conn.cfg
            c.ack_frequency, c.delayed_ack = cfg.ack_frequency, cfg.delayed_ack
            c.max_retransmits, c.dupack_threshold = cfg.max_retransmits, cfg.dupack_threshold
            c.rto_min = cfg.rto_min
        return hw.ST_SUCCESS, b"", 1

    def _cmd_rss(self, req: bytes, resp_len: int, now: float):
        if len(req) != 128 or any(b >= hw.NUM_OFFLOAD_QUEUES for b in req):
            return hw.ST_INVALID_REQUEST, b"", 0
        self.rss_table = bytes(req)
        # A connection moves once none of its records waits for room on its old OCOMPL
        # queue (see _maybe_move), so the host can keep its data in order.
        for o in self.conns.values():
            new = self.rss_table[o.conn.const.rss_hash & 127]
            if new != o.qidx:
                o.qidx_next = new
                self.moving.add(o.ctx)
        return hw.ST_SUCCESS, b"", 1

    def _maybe_move(self, o: TcpObj) -> None:
        """RSS moved the connection: its records go to the new OCOMPL queue as soon as
        none of them still waits in the device for room on the old one (all are in the
        old ring, its HEAD past them).  Posted receives, sends and an unanswered
        indication move with it (the device keeps them per connection, not per queue).
        So the connection's first record on the new queue is written after its last on
        the old: a driver that finds a connection's record on another queue than its
        last one serves the old queue first, and delivery stays in order whichever
        queue it serves first (hw.OFFLOAD_RULES)."""
        new = o.qidx_next
        if new is None or new == o.qidx:
            o.qidx_next = None
            self.moving.discard(o.ctx)
            return
        if self._ocompl_held(o):
            return
        o.qidx, o.qidx_next = new, None
        self.moving.discard(o.ctx)

    def _ocompl_held(self, o: TcpObj) -> bool:
        """A record of the connection still waits for room on its OCOMPL ring."""
        ctx = _U32.pack(o.ctx)
        return any(r[_OCOMPL_CTX:_OCOMPL_CTX + 4] == ctx for r in self.out[hw.OCOMPLQ_FIRST + o.qidx])

