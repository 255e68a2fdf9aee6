"""The miniport's chimney calls (docs/chimney-model.md; the bytes in chimney/hw.py):
state manipulation, data I/O and event indications over the CMD/CMDC/EVENT and
OSEND/ORECV/OCOMPL queues, with the NDIS semantics.

    ch = Chimney(miniport)          # after miniport.up(); ch.supported says if the NIC has it
    ch.up()                         # rings, pool buffers, SET_PARAMS
    req = ch.initiate(entries, cb)  # codec.ObjEntry list (a state tree); cb(req) when done
    ch.query(ctxs) / ch.terminate(ctxs) / ch.update(entries) / ch.invalidate(ctxs) / ch.set_params()
    ch.register(host_handle, handler)   # handler gets the connection's completions and events
    ch.send(ctx, handle, data) / ch.disconnect(ctx) / ch.abort(ctx)
    ch.post_receive(ctx, handle, size, push=True) / ch.accept(ctx, n)
    ch.poll()                       # read CMDC, EVENT, OCOMPL; dispatch

Everything is non-blocking and single-threaded; the host stack's loop calls
poll() (HostStack.step does, through the offload manager).  Each object has
the host's handle (u64, chosen by the caller, returned in every indication)
and the NIC's context (u32, from Initiate, passed in every request).

Receive side scaling: `rss_queues` offload queue sets (OSEND[k], ORECV[k],
OCOMPL[k], default one per CPU), each on its own MSI-X vector (VEC_OFFLOAD_FIRST
+ k) and its own indication pool.  A connection's completions come on the set
its RSS hash picks in the indirection table (`set_rss_table`, changeable while
traffic runs); its requests go to that set too.  The consumers are not threads
(the host stack has one owner): poll() serves each set's completion ring in
turn, starting with a different set each time.  Order across a move: the device
writes all of a connection's records on its old set before the first on the new
one, so a record found on another set than the connection's last one makes the
driver serve that old set first (`_serve_set`); requests switch sets only once
the device took every earlier request of the connection from the old set's
rings.

Interrupts: CMDC and EVENT use the miniport's receive vector, the queue sets
their own; the to-host offload rings are a ready check of the miniport
(`add_ready_check`, with the sets' vectors), so a stack waiting for frames in
`miniport.recv(timeout)` also wakes for offload completions and events.

Guest memory: one DMA area per ring and one arena (`DmaArena`, first fit
with coalescing) for command buffers, send data, posted receives and the
indication pool.

Handler interface (any object; missing methods are ignored):
    on_send_done(tag, nbytes, status)
    on_recv_done(tag, data, flags, status)          # data: bytes (len 0 on UPLOADED/ABORTED)
    on_indicate(data, flags) -> bytes accepted (0 = refuse); the Chimney answers ACCEPT
    on_event(kind, reason, value)
    on_ocompl_error(tag, status)
"""
from __future__ import annotations

import itertools
import os
import time
from collections import Counter, deque

from .. import hw
from ..staterec import codec
from ..staterec.codec import ObjEntry
from . import rss
from .chimney_rings import Block, ChimneyError, DmaArena, ToDeviceRing, ToHostRing
from .miniport import VEC_OFFLOAD_FIRST, VEC_RX

CMD_NAMES = {b.mask: b.name for b in hw.CMD_OPCODES}
STATUS_NAMES = {b.mask: b.name for b in hw.STATUS_CODES}
EVENT_NAMES = {b.mask: b.name for b in hw.EVENT_KINDS}
REASON_NAMES = {b.mask: b.name for b in hw.RETRIEVE_REASONS}
OC_NAMES = {b.mask: b.name for b in hw.OCOMPL_KINDS}
_OC_STAT = {k: f"oc_{v}".lower() for k, v in OC_NAMES.items()}
# the data-path layouts as plain structs, fields in hw's order (keyword packing per
# request costs more than the rest of the request)
_OSEND = hw.OSendDesc._struct
_ORECV = hw.ORecvDesc._struct
_OCOMPL = hw.OComplRec._struct
assert [f.name for f in hw.OSendDesc.fields] == ["ctx", "flags", "addr", "len", "tag"]
assert [f.name for f in hw.ORecvDesc.fields] == ["ctx", "flags", "addr", "len", "tag"]
assert [f.name for f in hw.OComplRec.fields] == ["kind", "flags", "status", "tag", "host_handle",
                                                  "len", "ctx"]


def _reached(head: int, mark: int) -> bool:
    """A ring's consumer index is at or past mark (32-bit indices that wrap)."""
    return (head - mark) & 0xFFFFFFFF < 0x80000000


def default_rss_queues() -> int:
    """One queue set per CPU, as many as the NIC has."""
    return max(1, min(os.cpu_count() or 1, hw.NUM_OFFLOAD_QUEUES))


class QueueSet:
    """One RSS queue set k: OSEND[k] and ORECV[k] (requests), OCOMPL[k] (their
    completions and indications), MSI-X vector VEC_OFFLOAD_FIRST + k, and the
    records read off OCOMPL[k] but not dispatched yet."""

    def __init__(self, ch, k: int, send: int, recv: int, compl: int):
        self.k = k
        self.sendq = ToDeviceRing(ch, hw.OSENDQ_FIRST + k, send)
        self.recvq = ToDeviceRing(ch, hw.ORECVQ_FIRST + k, recv)
        self.complq = ToHostRing(ch, hw.OCOMPLQ_FIRST + k, compl)
        self.vector = VEC_OFFLOAD_FIRST + k
        self.taken: deque = deque()
        self.serving = False
        self.records = 0                # records dispatched from this set

    def pending(self) -> bool:
        return bool(self.taken) or self.complq.pending()


class SendRings:
    """The send rings of all queue sets as one occupancy (the manager orders a
    TERMINATE after the sends still on them)."""

    def __init__(self, rings):
        self.rings = rings
        self.size = sum(r.size for r in rings)

    def space(self) -> int:
        return sum(r.space() for r in self.rings)


# -- commands -------------------------------------------------------------------------------

class Command:
    """One state-manipulation request in flight.  After completion: status (overall),
    count, and `result`: ObjStatus entries (INITIATE), ObjRecord entries
    (QUERY, TERMINATE) or None."""

    def __init__(self, opcode: int, tag: int, cb=None, extra=None):
        self.opcode, self.tag, self.cb = opcode, tag, cb
        self.done = False
        self.status: int | None = None
        self.count = 0
        self.result = None
        self.error: str | None = None
        self.extra = extra
        self.req: Block | None = None
        self.resp: Block | None = None
        self.started = time.monotonic()
        self.seconds = 0.0

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.opcode, str(self.opcode))

    @property
    def ok(self) -> bool:
        return self.done and self.status == hw.ST_SUCCESS

    def __repr__(self) -> str:
        return (f"Command({self.name} tag={self.tag} done={self.done} "
                f"status={STATUS_NAMES.get(self.status, self.status)} count={self.count})")


class Chimney:
    def __init__(self, miniport, *, cmd_ring: int = 64, event_ring: int = 1024,
                 send_ring: int = 1024, recv_ring: int = 1024, compl_ring: int = 4096,
                 arena_size: int = 40 << 20, pool_buffers: int = 32, pool_buf_size: int = 64 * 1024,
                 vector: int | None = None, rss_queues: int | None = None):
        self.mp = miniport
        self.nqueues = rss.check_queues(default_rss_queues() if rss_queues is None else rss_queues)
        self.rss_table = rss.spread_table(self.nqueues)     # as last sent to the NIC
        self.qsets: list[QueueSet] = []
        self.conn_queue: dict[int, int] = {}    # handle -> the set its completions come on
        self.req_set: dict[int, list[int]] = {}     # handle -> [set, send mark, recv mark]
        self.ctx_handle: dict[int, int] = {}    # NIC context -> handle (offloaded connections)
        self.handle_ctx: dict[int, int] = {}    # ... and back
        self.served: dict[int, dict] = {}       # handle -> {"queue": last set, "records": per set}
        self._turn = 0
        self.bus = miniport.bus
        self.sizes = dict(cmd=cmd_ring, event=event_ring, send=send_ring, recv=recv_ring,
                          compl=compl_ring)
        self.arena_size = arena_size
        self.pool_buffers = pool_buffers
        self.pool_buf_size = pool_buf_size
        self.vector = vector
        self.features = miniport.rd(hw.REG_FEATURES)
        self.supported = bool(self.features & hw.FEAT_TCP_OFFLOAD)
        self.is_up = False
        self.stats: Counter = Counter()
        self.handlers: dict[int, object] = {}
        self.status_handler = None              # on_status(kind) for PAUSE/RESUME/UPLOAD_ALL
        self.neigh_query_handler = None         # on_neigh_query(ctx, handle)
        self.paused = False
        self._tags = itertools.count(1)
        self.commands: dict[int, Command] = {}
        self._cmd_backlog: list[Command] = []
        self.sends: dict[int, tuple[Block, int]] = {}        # tag -> (block, handle)
        self.forwards: dict[int, tuple[Block, int]] = {}     # tag -> (block, handle): FORWARDs
        self.recvs: dict[int, tuple[Block, int]] = {}        # tag -> (block, handle)
        self.pool: dict[int, Block] = {}                     # tag -> block (given to the device)
        self.pool_set: dict[int, int] = {}                   # tag -> the queue set whose pool has it
        self.events: list[dict] = []                         # recent events (bounded), for tests
        self._owed = False          # a data doorbell rang while the device slept: KICK before waiting

    # -- bring-up ------------------------------------------------------------------------
    def up(self, params: dict | None = None) -> None:
        if not self.supported:
            raise ChimneyError(f"the device does not offer TCP offload (features {self.features:#x})")
        self.dbw = self.mp.dbw
        vec = self.vector if self.vector is not None else VEC_RX
        self.cmdq = ToDeviceRing(self, hw.CMDQ, self.sizes["cmd"])
        self.cmdcq = ToHostRing(self, hw.CMDCQ, self.sizes["cmd"])
        self.eventq = ToHostRing(self, hw.EVENTQ, self.sizes["event"])
        for r in (self.cmdq, self.cmdcq, self.eventq):
            self._queue_up(r, vec)
        sz = self.sizes
        self.qsets = [QueueSet(self, k, sz["send"], sz["recv"], sz["compl"])
                      for k in range(self.nqueues)]
        for qs in self.qsets:
            # one vector per set (an explicit `vector` puts everything on that one)
            qv = self.vector if self.vector is not None else qs.vector
            for r in (qs.sendq, qs.recvq, qs.complq):
                self._queue_up(r, qv)
        self.sendq = SendRings([qs.sendq for qs in self.qsets])
        self.arena = DmaArena(self.bus.dma_alloc(self.arena_size))
        # a stack waiting for frames also wakes for offload work (and the sets' vectors)
        self.mp.add_ready_check(self.pending, vectors=[] if self.vector is not None else
                                [qs.vector for qs in self.qsets])
        self.mp.before_wait.append(self.kick_owed)
        self.is_up = True
        per_set = max(4, self.pool_buffers // self.nqueues)     # the same memory, shared out
        for qs in self.qsets:
            for _ in range(per_set):
                self.give_pool_buffer(k=qs.k)
            qs.recvq.ring()
        if self.nqueues > 1:
            self.set_rss_table(self.rss_table)      # the NIC's own table sends all to set 0
        self.set_params(params)

    def _queue_up(self, ring, vector: int) -> None:
        mp, qid = self.mp, ring.qid
        mp.wr(hw.qreg(qid, "Q_BASE_LO"), ring.mem.iova & 0xFFFFFFFF)
        mp.wr(hw.qreg(qid, "Q_BASE_HI"), ring.mem.iova >> 32)
        mp.wr(hw.qreg(qid, "Q_SIZE"), ring.size)
        mp.wr(hw.qreg(qid, "Q_VECTOR"), vector)
        mp.wr(hw.qreg(qid, "Q_CTRL"), hw.QCTRL_ENABLE)
        st = mp.rd(hw.qreg(qid, "Q_STATUS"))
        if not st & hw.QSTATUS_ENABLED:
            raise ChimneyError(f"offload queue {qid} did not enable (status {st:#x})")

    def kick_owed(self) -> None:
        """Write the KICK a lazily rung data doorbell owes, if the device still sleeps
        with entries it has not taken (called before the driver waits)."""
        if not self._owed:
            return
        self._owed = False
        dbw = self.dbw
        if dbw[hw.DB_NEED_KICK] and any(
                dbw[hw.DB_HEAD_BASE + 4 * r.qid] != r.tail
                for qs in self.qsets for r in (qs.sendq, qs.recvq)):
            self.stats["kicks"] += 1
            self.mp.wr(hw.REG_KICK, 1)

    def pending(self) -> bool:
        return self.is_up and (self.cmdcq.pending() or self.eventq.pending() or
                               any(qs.pending() for qs in self.qsets))

    # -- state manipulation ----------------------------------------------------------------
    def _command(self, opcode: int, req: bytes, resp_len: int, cb=None, extra=None) -> Command:
        if not self.is_up:
            raise ChimneyError("chimney not up")
        cmd = Command(opcode, next(self._tags) & 0xFFFFFFFF or 1, cb, extra)
        cmd.req = self._alloc(max(8, len(req)))
        cmd.req.mem[:len(req)] = req
        cmd.req_len = len(req)
        cmd.resp = self._alloc(resp_len) if resp_len else None
        self.commands[cmd.tag] = cmd
        self.stats[f"cmd_{cmd.name.lower()}"] += 1
        if self.cmdq.space() <= 0 or self._cmd_backlog:
            self._cmd_backlog.append(cmd)       # behind the ones waiting: commands keep their order
        else:
            self._issue(cmd)
        return cmd

    def _issue(self, cmd: Command) -> None:
        self.cmdq.put(opcode=cmd.opcode, flags=0, tag=cmd.tag, req_addr=cmd.req.iova,
                      req_len=cmd.req_len, resp_len=cmd.resp.size if cmd.resp else 0,
                      resp_addr=cmd.resp.iova if cmd.resp else 0)
        self.cmdq.ring()

    def _alloc(self, n: int) -> Block:
        b = self.arena.alloc(n)
        if b is None:
            raise ChimneyError(f"offload DMA arena exhausted ({n} bytes wanted, "
                               f"{self.arena.available} free)")
        return b

    def initiate(self, entries: list[ObjEntry], cb=None) -> Command:
        """Offload a state tree; result: one ObjEntry (status, type, nic_ctx, host_handle) per record."""
        req = codec.encode_records(entries)
        for e in entries:
            # the set the NIC starts the connection on: the table as the NIC will have it
            # when it takes this command (commands are taken in order)
            if e.type == hw.OBJ_TCP and e.state is not None:
                self.conn_queue[e.host_handle] = self.rss_table[e.state.const.rss_hash
                                                                & (rss.TABLE_SIZE - 1)]
        return self._command(hw.CMD_INITIATE, req, hw.ObjStatus.size * len(entries) + 64, cb,
                             extra=entries)

    def update(self, entries: list[ObjEntry], cb=None) -> Command:
        return self._command(hw.CMD_UPDATE, codec.encode_records(entries), 16 * len(entries) + 64, cb)

    def query(self, ctxs: list[int], cb=None) -> Command:
        """Result: ObjEntry per object (const, cached and delegated state; no data bytes)."""
        per = 32 + codec._TCP_STATE_LEN + 8
        return self._command(hw.CMD_QUERY, codec.encode_contexts(ctxs), per * len(ctxs) + 64, cb)

    def invalidate(self, ctxs: list[int], cb=None) -> Command:
        return self._command(hw.CMD_INVALIDATE, codec.encode_contexts(ctxs), 16 * len(ctxs) + 64, cb)

    def terminate(self, ctxs: list[int], cb=None, data_room: int = 0) -> Command:
        """Upload; result: ObjEntry per object with its delegated state and data.
        data_room: bytes of send + receive data the response must hold (the caller's
        estimate; NO_SPACE completions are retried with a bigger buffer)."""
        per = 32 + codec._TCP_STATE_LEN + 8
        size = per * len(ctxs) + data_room + 4096
        return self._command(hw.CMD_TERMINATE, codec.encode_contexts(ctxs), size, cb,
                             extra={"ctxs": list(ctxs), "data_room": data_room})

    def set_params(self, params: dict | None = None, cb=None) -> Command:
        p = dict(ticks_per_second=1000, ack_frequency=2, delayed_ack_ticks=40, max_retransmits=15,
                 dupack_threshold=3, push_ticks=20, neigh_stale_ticks=600_000, rto_min_ticks=200)
        p.update(params or {})
        return self._command(hw.CMD_SET_PARAMS, hw.OffloadParams.pack(**p), 0, cb)

    def set_rss_table(self, buckets, cb=None) -> Command:
        """Program the NIC's indirection table: buckets[i] is the queue set of the
        connections whose hash & 127 is i (ValueError for a table the sets set up
        cannot take).  Usable while traffic runs: a connection that moves keeps its
        data in order (see the module's text)."""
        table = rss.check_table(buckets, self.nqueues)
        self.rss_table = table
        self.stats["rss_tables"] += 1
        return self._command(hw.CMD_RSS_TABLE, table, 0, cb)

    def queue_of(self, handle: int) -> int | None:
        """The queue set a connection's completions come on (as last seen)."""
        return self.conn_queue.get(handle)

    def wait(self, cmd: Command, timeout: float = 10.0) -> Command:
        """Poll until cmd completes (for tests and simple callers; other work is dispatched too)."""
        end = time.monotonic() + timeout
        while not cmd.done:
            if time.monotonic() > end:
                raise TimeoutError(f"{cmd} did not complete in {timeout} s")
            if not self.poll():
                self.kick_owed()
                time.sleep(0.0005)
        return cmd

    def _on_cmd_compl(self, rec: dict) -> None:
        cmd = self.commands.pop(rec["tag"], None)
        if cmd is None:
            self.stats["cmdc_unknown_tag"] += 1
            return
        cmd.status, cmd.count = rec["status"], rec["count"]
        nbytes = rec["resp_bytes"]
        if cmd.status == hw.ST_NO_SPACE and cmd.opcode == hw.CMD_TERMINATE and \
                cmd.extra.get("retries", 0) < 4:
            # the response did not fit; nothing was changed: again with room to spare
            self._free_cmd(cmd)
            more = cmd.extra["data_room"] * 2 + (1 << 20)
            cmd2 = self.terminate(cmd.extra["ctxs"], cmd.cb, more)
            cmd2.extra["retries"] = cmd.extra.get("retries", 0) + 1
            self.stats["terminate_no_space_retry"] += 1
            return
        try:
            if cmd.resp is not None and nbytes > cmd.resp.size:
                raise codec.CodecError(f"resp_bytes {nbytes} > buffer {cmd.resp.size}")
            raw = bytes(cmd.resp.mem[:nbytes]) if cmd.resp is not None else b""
            if cmd.opcode == hw.CMD_INITIATE:
                cmd.result = codec.decode_statuses(raw)
                self._forget_failed(cmd)
            elif cmd.opcode == hw.CMD_TERMINATE:
                cmd.result = decode_response_records(raw, with_data=True)
            elif cmd.opcode == hw.CMD_QUERY:
                cmd.result = decode_response_records(raw, with_data=False)
            elif raw and len(raw) % hw.ObjStatus.size == 0:
                cmd.result = codec.decode_statuses(raw)
        except codec.CodecError as e:
            cmd.error = f"bad {cmd.name} response: {e}"
            self.stats["cmd_bad_response"] += 1
        self._free_cmd(cmd)
        cmd.done = True
        cmd.seconds = time.monotonic() - cmd.started
        if cmd.status != hw.ST_SUCCESS:
            self.stats[f"cmd_status_{STATUS_NAMES.get(cmd.status, cmd.status)}".lower()] += 1
        if cmd.cb is not None:
            cmd.cb(cmd)

    def _forget_failed(self, cmd: Command) -> None:
        ok = {e.host_handle: e.nic_ctx for e in cmd.result if e.status in (hw.ST_SUCCESS, hw.ST_PARTIAL)}
        for e in cmd.extra or ():
            if e.type != hw.OBJ_TCP:
                continue
            if e.host_handle in ok:
                self.ctx_handle[ok[e.host_handle]] = e.host_handle
                self.handle_ctx[e.host_handle] = ok[e.host_handle]
            else:
                self.conn_queue.pop(e.host_handle, None)

    def _free_cmd(self, cmd: Command) -> None:
        for b in (cmd.req, cmd.resp):
            if b is not None:
                self.arena.free(b)
        cmd.req = cmd.resp = None

    # -- data I/O --------------------------------------------------------------------------
    def register(self, handle: int, handler) -> None:
        self.handlers[handle] = handler

    def unregister(self, handle: int) -> None:
        self.handlers.pop(handle, None)
        self.conn_queue.pop(handle, None)
        self.req_set.pop(handle, None)
        ctx = self.handle_ctx.pop(handle, None)
        if ctx is not None and self.ctx_handle.get(ctx) == handle:
            del self.ctx_handle[ctx]

    def send_room(self) -> int:
        return min(qs.sendq.space() for qs in self.qsets)

    def _requests_set(self, handle: int) -> tuple[QueueSet, list[int]]:
        """The set a connection's next request goes to: the one its completions come
        on, once the device took every request of it from the set it used so far (the
        device takes the sets' rings one after the other, so a request on a new set
        could otherwise overtake an earlier one)."""
        r = self.req_set.get(handle)
        want = self.conn_queue.get(handle, 0)
        if r is None:
            r = self.req_set[handle] = [want, 0, 0]
            old = self.qsets[want]
            r[1], r[2] = old.sendq.tail, old.recvq.tail
        elif r[0] != want:
            old = self.qsets[r[0]]
            if _reached(old.sendq.head(), r[1]) and _reached(old.recvq.head(), r[2]):
                r[0] = want
                self.stats["rss_request_moves"] += 1
        return self.qsets[r[0]], r

    def send(self, ctx: int, handle: int, data) -> int | None:
        """One send request (PSH at its end); the data is copied into DMA memory (once).
        Returns its tag, or None when the ring or the arena is full (nothing queued)."""
        n = len(data)
        if n == 0:
            raise ValueError("empty send")
        qs, mark = self._requests_set(handle)
        q = qs.sendq
        if q.size - ((q.tail - self.dbw[hw.DB_HEAD_BASE + 4 * q.qid]) & 0xFFFFFFFF) <= 0:
            self.stats["send_ring_full"] += 1
            return None
        b = self.arena.alloc(n)
        if b is None:
            self.stats["send_arena_full"] += 1
            return None
        b.mem[:n] = data
        tag = next(self._tags) & 0xFFFFFFFF or 1
        self.sends[tag] = (b, handle)
        q.put_raw(_OSEND, ctx, hw.OSF_SEND, b.iova, n, tag)
        mark[1] = q.tail
        if len(self.sends) == 1:
            q.ring()            # nothing else outstanding: latency counts, kick a sleeping device now
        else:
            q.ring_lazy()       # the device has work of ours (and acks to wait for): no trap
        st = self.stats
        st["sends"] += 1
        st["send_bytes"] += n
        return tag

    def request_data(self, tag: int, n: int) -> bytes:
        """The first n bytes of an outstanding send request (valid until its completion
        handler returns)."""
        ent = self.sends.get(tag)
        if ent is None or ent[0] is None:
            return b""
        return bytes(ent[0].mem[:n])

    def disconnect(self, ctx: int, handle: int) -> int | None:
        """Graceful: FIN after all queued data."""
        return self._osend_ctl(ctx, handle, hw.OSF_DISCONNECT)

    def abort(self, ctx: int, handle: int) -> int | None:
        """Abortive: RST; outstanding I/O completes ABORTED."""
        return self._osend_ctl(ctx, handle, hw.OSF_ABORT)

    def _osend_ctl(self, ctx: int, handle: int, flag: int) -> int | None:
        qs, mark = self._requests_set(handle)
        if qs.sendq.space() <= 0:
            return None
        tag = next(self._tags) & 0xFFFFFFFF or 1
        self.sends[tag] = (None, handle)
        qs.sendq.put(ctx=ctx, flags=flag, addr=0, len=0, tag=tag)
        mark[1] = qs.sendq.tail
        qs.sendq.ring()
        return tag

    def forward(self, ctx: int, handle: int, segment) -> int | None:
        """Hand the NIC a received TCP segment (header and payload) of connection ctx that
        the host stack parsed (IP options, fragments, IPv6 extension headers, or held
        during a handover): processed as if it came off the wire.  Returns its tag, or
        None when the ring or the arena is full (nothing queued)."""
        n = len(segment)
        if not 20 <= n <= 0xFFFF:
            raise ValueError(f"a TCP segment of {n} bytes")
        qs, mark = self._requests_set(handle)      # the connection's own send ring, in order
        q = qs.sendq
        if q.size - ((q.tail - self.dbw[hw.DB_HEAD_BASE + 4 * q.qid]) & 0xFFFFFFFF) <= 0:
            self.stats["forward_ring_full"] += 1
            return None
        b = self.arena.alloc(n)
        if b is None:
            self.stats["forward_arena_full"] += 1
            return None
        b.mem[:n] = segment
        tag = next(self._tags) & 0xFFFFFFFF or 1
        self.forwards[tag] = (b, handle)
        q.put_raw(_OSEND, ctx, hw.OSF_FORWARD, b.iova, n, tag)
        mark[1] = q.tail
        q.ring()
        self.stats["forwards"] += 1
        return tag

    def _forward_done(self, tag: int, status: int) -> bool:
        """A forward's completion (SEND_DONE or ERROR): True if tag was one."""
        ent = self.forwards.pop(tag, None)
        if ent is None:
            return False
        self.arena.free(ent[0])
        self.stats["forwards_done" if status == hw.ST_SUCCESS else "forwards_refused"] += 1
        return True

    def post_receive(self, ctx: int, handle: int, size: int, push: bool = True) -> int | None:
        qs, mark = self._requests_set(handle)
        q = qs.recvq
        if q.space() <= 0:
            return None
        b = self.arena.alloc(size)
        if b is None:
            self.stats["recv_arena_full"] += 1
            return None
        tag = next(self._tags) & 0xFFFFFFFF or 1
        self.recvs[tag] = (b, handle)
        q.put_raw(_ORECV, ctx, hw.ORF_POST | (0 if push else hw.ORF_NO_PUSH), b.iova, size, tag)
        mark[2] = q.tail
        q.ring_lazy()
        self.stats["posted_receives"] += 1
        return tag

    def give_pool_buffer(self, b: Block | None = None, k: int = 0) -> bool:
        """An indication buffer for queue set k's pool."""
        if b is None:
            b = self.arena.alloc(self.pool_buf_size)
            if b is None:
                return False
        q = self.qsets[k].recvq
        if q.space() <= 0:
            self.arena.free(b)
            return False
        tag = next(self._tags) & 0xFFFFFFFF or 1
        self.pool[tag] = b
        self.pool_set[tag] = k
        q.put(ctx=0, flags=hw.ORF_POOL, addr=b.iova, len=self.pool_buf_size, tag=tag)
        return True

    def accept(self, ctx: int, n: int, handle: int | None = None) -> None:
        """Answer an indication: n bytes consumed (0 = refuse)."""
        if handle is None:
            handle = self.ctx_handle.get(ctx)       # on the connection's request set
        if handle is None:
            q = self.qsets[0].recvq
        else:
            qs, mark = self._requests_set(handle)
            q = qs.recvq
        q.put_raw(_ORECV, ctx, hw.ORF_ACCEPT, 0, n, 0)
        if handle is not None:
            mark[2] = q.tail
        q.ring_lazy()

    # -- completions and events ---------------------------------------------------------------
    def poll(self, limit: int = 1024, first: int | None = None) -> int:
        """Read CMDC, OCOMPL and EVENT, dispatch; returns the records handled.
        first: the queue set served first (by default each poll starts at the next)."""
        if not self.is_up:
            return 0
        n = 0
        # command completions first: a connection's first indication may share this poll
        # with its INITIATE completion (which registers its handle)
        for rec in self.cmdcq.take(limit):
            n += 1
            self._on_cmd_compl(rec)
        # each queue set's consumer in turn, a different one first each time
        nq = self.nqueues
        if first is None:
            first, self._turn = self._turn, (self._turn + 1) % nq
        for i in range(nq):
            n += self._serve_set((first + i) % nq, limit)
        while self._cmd_backlog and self.cmdq.space() > 0:
            self._issue(self._cmd_backlog.pop(0))
        for rec in self.eventq.take(limit):
            n += 1
            self._on_event(rec)
        for qs in self.qsets:
            qs.recvq.ring_lazy()
        return n

    def _serve_set(self, k: int, limit: int) -> int:
        """Dispatch up to limit records of queue set k's completion ring, in ring order.
        A set already being served further up the call chain is left alone: what an
        inner call needs of it lies before the record the outer call stopped at."""
        qs = self.qsets[k]
        if qs.serving:
            return 0
        qs.serving = True
        n = 0
        try:
            while n < limit:
                if not qs.taken:
                    recs = qs.complq.take_raw(_OCOMPL, limit - n)
                    if not recs:
                        break
                    qs.taken.extend(recs)
                rec = qs.taken.popleft()
                self._in_order(k, rec)
                n += 1
                qs.records += 1
                self._on_ocompl_raw(*rec, k=k)
        finally:
            qs.serving = False
        return n

    def _in_order(self, k: int, rec) -> None:
        """Before a connection's record from set k: if its records came on another set
        so far (RSS moved it), the device wrote all of those first; dispatch them first."""
        kind, status, handle = rec[0], rec[2], rec[4]
        if kind in (hw.OC_ERROR, hw.OC_POOL_RETURN) or status == hw.ST_UPLOAD_IN_PROGRESS:
            return      # not the connection's stream (a refusal on the request's set)
        prev = self.conn_queue.get(handle)
        if prev is None:
            return
        if prev != k:
            self.stats["rss_moves_seen"] += 1
            old = self.qsets[prev]
            self._serve_set(prev, len(old.taken) + old.complq.size)
            self.conn_queue[handle] = k
        c = self.served.get(handle)
        if c is None:
            c = self.served[handle] = {"queue": k, "records": Counter()}
            if len(self.served) > 4096:         # kept past the upload for the tools; bounded
                del self.served[next(iter(self.served))]
        c["queue"] = k
        c["records"][k] += 1

    def _handler(self, handle: int, method: str):
        h = self.handlers.get(handle)
        return getattr(h, method, None) if h is not None else None

    def _on_ocompl(self, r: dict, k: int = 0) -> None:
        self._on_ocompl_raw(r["kind"], r["flags"], r["status"], r["tag"], r["host_handle"],
                            r["len"], r["ctx"], k=k)

    def _on_ocompl_raw(self, kind, flags, status, tag, host_handle, ln, ctx, k: int = 0) -> None:
        stats = self.stats
        stats[_OC_STAT.get(kind) or f"oc_{kind}"] += 1
        if kind == hw.OC_SEND_DONE:
            if self.forwards and self._forward_done(tag, status):
                return
            ent = self.sends.get(tag)
            if ent is None:
                stats["oc_unknown_send_tag"] += 1
                return
            b, handle = ent
            h = self.handlers.get(handle)
            f = getattr(h, "on_send_done", None) if h is not None else None
            try:
                if f:
                    f(tag, ln, status)      # the request's data is still readable (request_data)
            finally:
                del self.sends[tag]
                if b is not None:
                    self.arena.free(b)
        elif kind == hw.OC_RECV_DONE:
            ent = self.recvs.pop(tag, None)
            if ent is None:
                stats["oc_unknown_recv_tag"] += 1
                return
            b, handle = ent
            n = min(ln, b.size)
            data = bytes(b.mem[:n])
            self.arena.free(b)
            stats["recv_bytes"] += n
            h = self.handlers.get(handle)
            f = getattr(h, "on_recv_done", None) if h is not None else None
            if f:
                f(tag, data, flags, status)
        elif kind == hw.OC_INDICATE:
            b = self.pool.pop(tag, None)
            if b is None:
                stats["oc_unknown_pool_tag"] += 1
                return
            pk = self.pool_set.pop(tag, 0)
            n = min(ln, b.size)
            data = bytes(b.mem[:n])
            f = self._handler(host_handle, "on_indicate")
            taken = 0
            if f:
                taken = max(0, min(n, int(f(data, flags) or 0)))
            stats["indicated_bytes"] += n
            stats["indicate_accepted_bytes"] += taken
            self.accept(ctx, taken, host_handle)
            self.give_pool_buffer(b, pk)        # back to the pool it came from
        elif kind == hw.OC_POOL_RETURN:
            b = self.pool.pop(tag, None)
            if b is not None:
                self.give_pool_buffer(b, self.pool_set.pop(tag, 0))
        elif kind == hw.OC_ERROR:
            if self.forwards and self._forward_done(tag, status):
                return
            handle = host_handle
            b = None
            ent = self.sends.get(tag)
            if ent is not None:
                b, handle = ent
            else:
                ent = self.recvs.pop(tag, None)
                if ent is not None:
                    b, handle = ent
            f = self._handler(handle, "on_ocompl_error")
            try:
                if f:
                    f(tag, status)          # a refused send's data is still readable
            finally:
                self.sends.pop(tag, None)
                if b is not None:
                    self.arena.free(b)

    def _on_event(self, r: dict) -> None:
        kind = r["kind"]
        name = EVENT_NAMES.get(kind, str(kind))
        self.stats[f"ev_{name.lower()}"] += 1
        self.events.append(dict(r, name=name, reason_name=REASON_NAMES.get(r["reason"])))
        del self.events[:-256]
        if kind in (hw.EV_PAUSE, hw.EV_RESUME, hw.EV_UPLOAD_ALL):
            if kind == hw.EV_PAUSE:
                self.paused = True
            elif kind == hw.EV_RESUME:
                self.paused = False
            if self.status_handler is not None:
                self.status_handler(kind)
            return
        if kind == hw.EV_NEIGH_REACH_QUERY:
            if self.neigh_query_handler is not None:
                self.neigh_query_handler(r["ctx"], r["host_handle"])
            return
        f = self._handler(r["host_handle"], "on_event")
        if f:
            f(kind, r["reason"], r["value"])
        else:
            self.stats["ev_unknown_handle"] += 1


def decode_response_records(buf, with_data: bool) -> list[ObjEntry]:
    """QUERY / TERMINATE responses: records of live objects, each standing alone."""
    return codec.decode_records(buf, with_data=with_data, tree=False)
