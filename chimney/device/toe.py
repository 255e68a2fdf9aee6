"""The TOE: the device half of the TCP chimney (chimney-spec.md, issue 5).

A table of offloaded objects -- neighbours, paths, TCP connections -- and the
rings of hw 1.1's offload section:

    CMD  -> CMDC    state manipulation (initiate, update, query, invalidate,
                    terminate, parameters, RSS table), one completion per command
    OSEND/ORECV -> OCOMPL   data I/O: sends, posted receives, indication buffers
                    and answers; completions and indications
    EVENT           disconnect, abort, retrieve, send backlog, time-wait

Each TCP connection runs chimney.tcp.engine.Connection (the host stack's own
TCP, rebuilt from the state the host hands over); this module is the control
logic around it.  Per-segment and per-byte work is in C (toe.c): steering
received frames of offloaded connections away from the RX ring, checksum
verification, frame building and the wire/pcap/impairment; copies between
guest memory and buffers go through the DMA table (dma_copy, SIGBUS-guarded).

The clock is injected (`clock`), so tests can drive the TOE segment by
segment without a server.  Device-side rules beyond hw.py's docs are listed in
hw.OFFLOAD_RULES (the device behaviour section of docs/datasheet.md).
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import struct

from .. import hw
from ..staterec import codec
from ..staterec.codec import CodecError
from ..tcp.engine import Config, Connection, seq_add, seq_sub
from ..tcp.segment import PSH, SegmentError, split_tso
from ..tcp.segment import decode as decode_segment
from ..tcp.state import NOT_OFFLOADABLE, TICKS_PER_SECOND, TcpState
from ._fastpath import ffi, lib
from .port import ToePort

log = logging.getLogger("chimney.device.toe")

DRIVER_RULES = hw.OFFLOAD_RULES      # the rules the driver must follow (datasheet)

MASK32 = 0xFFFFFFFF
SLOT_BITS = 20
SLOT_MASK = (1 << SLOT_BITS) - 1
MAX_OBJECTS = 1 << 16
MAX_REQ = 64 << 20
RX_CAP = 512
BUDGET = 256
BACKLOG_INTERVAL = 0.1
TOE_HASH_SLOTS = 1 << 17
MAX_BURST = 44                  # segments per engine burst (segmentation offload)

_STATE_INDEX = {TcpState(n): i for i, n in enumerate(hw.TCP_STATES)}
_TCP_HDR = struct.Struct("!HHIIBBHHH")
_TS_OPT = struct.Struct("!I")
_TCP_HDR_TS = struct.Struct("!HHIIBBHHHIII")
_TS_WORD = 0x0101080A                          # NOP NOP timestamps, length 10
_TS_LEAD = b"\x01\x01\x08\x0a"                 # NOP NOP timestamps (alone)
_U32 = struct.Struct("<I")
_OCOMPL_CTX = hw.OComplRec.offset_of("ctx")      # where a packed record names its connection


# --------------------------------------------------------------------------------------
# Lenient per-record parsing (responses and UPDATE requests)
# --------------------------------------------------------------------------------------
def parse_records(buf, with_data: bool = True) -> list[codec.ObjEntry]:
    """Records one by one, parents not checked (QUERY/TERMINATE responses, UPDATE
    requests).  Raises CodecError on malformed input."""
    return codec.decode_records(buf, with_data=with_data, tree=False)


# --------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------
class Obj:
    type = 0

    def __init__(self, ctx: int, handle: int):
        self.ctx = ctx
        self.handle = handle
        self.parent: Obj | None = None
        self.children: set[int] = set()
        self.invalid = False


class NeighObj(Obj):
    type = hw.OBJ_NEIGHBOR

    def __init__(self, ctx, handle, st: codec.Neighbor, now: float = 0.0):
        super().__init__(ctx, handle)
        self.st = st
        self.nic_seen = now - st.nic_reach_delta / TICKS_PER_SECOND
        self.host_seen = now - st.host_reach_delta / TICKS_PER_SECOND
        self.query_out = False          # a NEIGH_REACH_QUERY awaits the host's UPDATE


class PathObj(Obj):
    type = hw.OBJ_PATH

    def __init__(self, ctx, handle, st: codec.Path):
        super().__init__(ctx, handle)
        self.st = st
        self.v6 = st.ipv6
        self.src16 = codec.ip16(st.src_ip)
        self.dst16 = codec.ip16(st.dst_ip)


@dataclasses.dataclass
class Posted:
    tag: int
    addr: int
    cap: int
    nopush: bool
    filled: int = 0


class TcpObj(Obj):
    type = hw.OBJ_TCP

    def __init__(self, ctx, handle, conn: Connection, path: PathObj, qidx: int):
        super().__init__(ctx, handle)
        self.conn = conn
        self.parent = path
        self.qidx = qidx
        c = conn.const
        self.key = (path.src16, path.dst16, c.local_port, c.remote_port)
        d = conn.d
        self.base_seq = d.snd_una                 # stream position 0 of the send side
        self.fed = len(d.send_buffer)             # stream bytes given to the engine
        self.queued = self.fed                    # ... plus those waiting for space
        self.pending: collections.deque = collections.deque()   # [data, off]
        self.requests: collections.deque = collections.deque()  # (tag, end, length)
        self.psh_ends: set[int] = set()
        self.disconnect_pending = False
        self.posted: collections.deque[Posted] = collections.deque()
        self.delivered = 0                        # receive stream bytes consumed
        self.psh_pos = -1                         # receive position of the last PSH
        self.push_deadline: float | None = None
        self.indicated = 0
        self.ind_blocked = False
        self.hi_seq = d.snd_max
        self.qidx_next: int | None = None
        self.events_sent: set[str] = set()
        self.backlog_last = 0
        self.backlog_time = -1e9
        self.sched: float | None = None
        self.dead = False                         # reset/aborted: no more I/O
        self.in_table = False
        # per-connection counters
        self.segs_out = self.segs_in = self.bytes_out = self.bytes_in = 0
        self.retransmits = 0


# --------------------------------------------------------------------------------------
# The TOE
# --------------------------------------------------------------------------------------
class Toe:
    max_conns = TOE_HASH_SLOTS // 4     # PAUSE at 90 %, RESUME below 80 %

    def __init__(self, port: ToePort):
        # all the TOE uses of the NIC it sits in (chimney.device.port)
        self.rings = port.rings
        self.dma = port.dma
        self.irq = port.irq
        self.wire = port.wire
        self.stats = port.stats
        self.device_enabled = port.enabled
        self.clock = port.clock
        self.c = ffi.new("struct toe *")
        self._slots = ffi.new("struct toe_slot[]", TOE_HASH_SLOTS)
        self._rx_id = ffi.new("uint32_t[]", RX_CAP)
        self._rx_off = ffi.new("uint32_t[]", RX_CAP)
        self._rx_len = ffi.new("uint32_t[]", RX_CAP)
        self._rx_buf = ffi.new("uint8_t[]", RX_CAP * (hw.MAX_FRAME + 64))
        self._rx_view = ffi.buffer(self._rx_buf)
        self._rx_mv = memoryview(self._rx_view)
        self.c.nslots = TOE_HASH_SLOTS
        self.c.slots = self._slots
        self.c.rx_cap = RX_CAP
        self.c.rx_id, self.c.rx_off, self.c.rx_len = self._rx_id, self._rx_off, self._rx_len
        self.c.rx_buf = self._rx_buf
        self.scratch = ffi.new("uint8_t[]", hw.MAX_FRAME + 64)
        self.reset()

    # -- state -------------------------------------------------------------------------
    def reset(self) -> None:
        lib.toe_clear(self.c)
        self.c.rx_count = 0
        self.c.ip_id = 0
        self.objs: dict[int, Obj] = {}
        self.gen = [0] * (MAX_OBJECTS + 1)
        self.free = collections.deque(range(1, MAX_OBJECTS + 1))
        self.conns: dict[int, TcpObj] = {}
        self.cfg = Config(abort_on_timeout=False, max_burst=MAX_BURST)
        self.push_ticks = 500
        self.neigh_stale_ticks = 0
        self.rss_table = bytes(128)
        self.out: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.pools: list[collections.deque] = [collections.deque()
                                               for _ in range(hw.NUM_OFFLOAD_QUEUES)]
        self.want_pool: list[set] = [set() for _ in range(hw.NUM_OFFLOAD_QUEUES)]
        self.heap: list = []
        self._hseq = 0
        self.touched: set[int] = set()
        self._keymap: dict = {}
        self.internal_errors = 0
        self.paused = False
        self.moving: set[int] = set()         # connections waiting to change RSS queue
        self.uploaded: collections.OrderedDict = collections.OrderedDict()  # ctx -> handle
        self._stat("offload_conns", set_to=0)

    def _stat(self, name: str, n: int = 1, set_to: int | None = None) -> None:
        i = hw.STAT_INDEX[name]
        if set_to is not None:
            self.stats[i] = set_to
        else:
            self.stats[i] += n

    def _now(self) -> float:
        return self.clock()

    def _new_ctx(self) -> int | None:
        if not self.free:
            return None
        slot = self.free.popleft()
        self.gen[slot] = (self.gen[slot] + 1) & 0xFFF
        return slot | (self.gen[slot] << SLOT_BITS) or None

    def _release(self, obj: Obj) -> None:
        self.objs.pop(obj.ctx, None)
        self.free.append(obj.ctx & SLOT_MASK)

    def lookup(self, ctx: int, typ: int | None = None) -> Obj | None:
        o = self.objs.get(ctx)
        if o is None or (typ is not None and o.type != typ):
            return None
        return o

    # -- the loop ----------------------------------------------------------------------
    def has_work(self) -> bool:
        if not self.device_enabled():
            return False
        for qid in self._in_qids():
            if self.rings[qid].enabled and self.rings.busy(qid):
                return True
        return bool(self.c.rx_count)

    @staticmethod
    def _in_qids():
        yield hw.CMDQ
        yield from range(hw.ORECVQ_FIRST, hw.ORECVQ_FIRST + hw.NUM_OFFLOAD_QUEUES)
        yield from range(hw.OSENDQ_FIRST, hw.OSENDQ_FIRST + hw.NUM_OFFLOAD_QUEUES)

    def poll(self) -> int:
        """One pass: received segments, commands, receive and send requests, timers,
        then every touched connection is serviced and the to-host rings flushed."""
        if not self.device_enabled():
            self.c.rx_count = 0
            return 0
        now = self._now()
        work = self._drain_rx(now)
        # requests before commands: what the driver posted before a TERMINATE is in it
        for k in range(hw.NUM_OFFLOAD_QUEUES):
            work += self._poll_orecv(k, now)
        for k in range(hw.NUM_OFFLOAD_QUEUES):
            work += self._poll_osend(k, now)
        work += self._poll_cmd(now)
        work += self._run_timers(now)
        if self.moving:
            for ctx in list(self.moving):
                o = self.conns.get(ctx)
                if o is None:
                    self.moving.discard(ctx)
                else:
                    self._maybe_move(o)
        self._service_touched(now)
        self.flush_out()
        return work

    def next_deadline(self) -> float | None:
        h = self.heap
        while h:
            t, _, ctx = h[0]
            o = self.conns.get(ctx)
            if o is None or o.sched != t:
                heapq.heappop(h)
                continue
            return t
        return None

    def _run_timers(self, now: float) -> int:
        n = 0
        h = self.heap
        while h and h[0][0] <= now:
            t, _, ctx = heapq.heappop(h)
            o = self.conns.get(ctx)
            if o is None or o.sched != t:
                continue
            o.sched = None
            if o.push_deadline is not None and o.push_deadline <= now:
                o.push_deadline = None
                self._push_complete(o, hw.OCF_PUSH)
            dl = o.conn.next_deadline()
            if dl is not None and dl <= now:
                o.conn.poll(now)
            self.touched.add(ctx)
            n += 1
        return n

    def _schedule(self, o: TcpObj) -> None:
        dl = o.conn.next_deadline()
        if o.push_deadline is not None and (dl is None or o.push_deadline < dl):
            dl = o.push_deadline
        if dl is not None and dl != o.sched:
            o.sched = dl
            self._hseq += 1
            heapq.heappush(self.heap, (dl, self._hseq, o.ctx))
        elif dl is None:
            o.sched = None

    # -- receive path ------------------------------------------------------------------
    def _drain_rx(self, now: float) -> int:
        n = self.c.rx_count
        if not n:
            return 0
        view = self._rx_mv
        rx_id, rx_off, rx_len = self._rx_id, self._rx_off, self._rx_len
        conns = self.conns
        touched = self.touched
        unpack, unpack_ts = _TCP_HDR.unpack_from, _TS_OPT.unpack_from
        total = 0
        for i in range(n):
            o = conns.get(rx_id[i])
            if o is None or o.dead:
                continue
            off = rx_off[i]             # frames are packed (a super-segment is one)
            end = off + rx_len[i]
            conn = o.conn
            una = conn.d.snd_una
            # the common segment (no options but timestamps) straight from the frame
            sport, dport, seq, ack, hl, flags, window, _, _ = unpack(view, off)
            hl = (hl >> 4) * 4
            tsval = None
            fast = (hl == 20 or (hl == 32 and view[off + 20:off + 24] == _TS_LEAD)) \
                and hl <= end - off
            seg = None
            if fast:
                if hl == 32:
                    tsval = unpack_ts(view, off + 24)[0]
                payload = view[off + hl:end]
                plen = len(payload)
            else:
                try:
                    seg = decode_segment(view[off:end], "", "", verify_checksum=False)
                except SegmentError:
                    continue
                plen = len(seg.payload)
            o.segs_in += 1
            o.bytes_in += plen
            total += plen
            try:
                if seg is None and not conn.on_fast(seq, ack, flags, window, tsval, payload, now):
                    seg = decode_segment(view[off:end], "", "", verify_checksum=False)
                if seg is not None:
                    conn.on_segment(seg, now)
            except Exception:
                log.exception("connection %#x: internal error on a segment", o.ctx)
                self.internal_errors += 1
                continue
            if plen or conn.d.snd_una != una:
                o.parent.parent.nic_seen = now       # forward progress: reachable
            if flags & PSH and plen:
                o.psh_pos = o.delivered + len(conn.d.recv_buffer)
            touched.add(o.ctx)
        if total:
            self._stat("offload_bytes_in", total)
        self.c.rx_count = 0
        return n

    def inject(self, frame: bytes) -> bool:
        """Tests: offer a frame as if it came from the wire (the C steering decides)."""
        raise NotImplementedError

    # -- servicing a connection -------------------------------------------------------
    def _service_touched(self, now: float) -> None:
        while self.touched:
            ctxs, self.touched = self.touched, set()
            for ctx in ctxs:
                o = self.conns.get(ctx)
                if o is not None:
                    try:
                        self._service(o, now)
                    except Exception:   # a bug of ours: ask for the upload, keep serving
                        log.exception("connection %#x: internal error", ctx)
                        self.internal_errors += 1
                        if "hwfail" not in o.events_sent:
                            o.events_sent.add("hwfail")
                            o.invalid = True
                            self._event(o, hw.EV_RETRIEVE, hw.RR_HARDWARE_FAILURE)

    def _service(self, o: TcpObj, now: float) -> None:
        if o.qidx_next is not None:
            self._maybe_move(o)
        self._feed(o, now)
        self._transmit(o)
        if not o.dead:
            self._complete_sends(o)
            self._deliver(o, now)
            self._events(o, now)
            self._transmit(o)          # window updates the receive side caused
        self._schedule(o)

    def _feed(self, o: TcpObj, now: float) -> None:
        """Queued send requests into the engine's send buffer as space frees."""
        conn = o.conn
        while o.pending and not o.dead:
            item = o.pending[0]
            data, off = item
            if conn.d.fin_queued or conn.d.state not in (TcpState.ESTABLISHED,
                                                         TcpState.CLOSE_WAIT):
                break
            space = conn.send_space()
            if space <= 0:
                break
            chunk = data[off:off + space] if off or len(data) > space else data
            n = conn.send(chunk, now)
            o.fed += n
            item[1] += n
            if item[1] >= len(data):
                o.pending.popleft()
            if n < len(chunk):
                break
        if o.disconnect_pending and not o.pending and not o.dead:
            o.disconnect_pending = False
            conn.shutdown_write(now)

    def _transmit(self, o: TcpObj) -> None:
        segs = o.conn.take_segments()
        if not segs:
            return
        if o.invalid or o.dead and not any(s.rst for s in segs):
            return                      # invalidated: the NIC stops sending
        path = o.parent
        neigh = path.parent
        stale = self.neigh_stale_ticks
        if stale and not neigh.query_out:
            now = self._now()
            if (now - max(neigh.nic_seen, neigh.host_seen)) * TICKS_PER_SECOND > stale:
                neigh.query_out = True
                self._event(neigh, hw.EV_NEIGH_REACH_QUERY)
        cached = o.conn.cached
        tap = self.wire.tx_fd
        psh_ends = o.psh_ends
        i = 0
        while i < len(segs):
            seg = segs[i]
            i += 1
            payload = seg.payload
            plen = len(payload)
            mss = seg.tso
            if mss and plen > mss and any(0 < seq_sub(e, seg.seq) < plen and
                                          not seq_sub(e, seg.seq) % mss for e in psh_ends):
                # a request ends inside the burst: its piece carries PSH, so send the
                # pieces one by one
                segs[i:i] = split_tso(seg)[1:]
                seg.payload = payload = payload[:mss]
                plen, mss = len(payload), 0
                seg.flags &= ~PSH
            if plen:
                end = seq_add(seg.seq, plen)
                if end in psh_ends:
                    seg.flags |= PSH
                if seq_sub(seg.seq, o.hi_seq) < 0:
                    o.retransmits += 1
                    self._stat("offload_retransmits")
                if seq_sub(end, o.hi_seq) > 0:
                    o.hi_seq = end
            if seg.tsval is not None and seg.mss is None and seg.wscale is None and \
                    not seg.sack_permitted and not seg.sack_blocks:
                # the usual segment: timestamps alone (what options_bytes would give)
                raw = _TCP_HDR_TS.pack(seg.src_port, seg.dst_port, seg.seq & MASK32,
                                       seg.ack & MASK32, 0x80, seg.flags & 0xFF,
                                       seg.window & 0xFFFF, 0, seg.urgent & 0xFFFF, _TS_WORD,
                                       seg.tsval & MASK32, (seg.tsecr or 0) & MASK32)
            else:
                hdr = seg.options_bytes()
                raw = _TCP_HDR.pack(seg.src_port, seg.dst_port, seg.seq & MASK32,
                                    seg.ack & MASK32, ((20 + len(hdr)) // 4) << 4,
                                    seg.flags & 0xFF, seg.window & 0xFFFF, 0,
                                    seg.urgent & 0xFFFF) + hdr
            if mss and plen > mss:
                r = lib.toe_xmit_burst(self.c, neigh.st.dst_mac, neigh.st.src_mac, int(path.v6),
                                       path.src16, path.dst16, cached.ttl, cached.tos,
                                       cached.flow_label, raw, len(raw), payload, plen, mss,
                                       tap, self.wire.pcap_fd, self.stats, self.scratch, self.wire.impair)
                if r > 0:
                    o.segs_out += r
                    o.bytes_out += plen
                continue
            r = lib.toe_xmit(self.c, neigh.st.dst_mac, neigh.st.src_mac, int(path.v6),
                             path.src16, path.dst16, cached.ttl, cached.tos, cached.flow_label,
                             raw, len(raw), payload, plen, tap, self.wire.pcap_fd, self.stats,
                             self.scratch, self.wire.impair)
            if r > 0:
                o.segs_out += 1
                o.bytes_out += plen

    def _acked_pos(self, o: TcpObj) -> int:
        return o.fed - len(o.conn.d.send_buffer)

    def _complete_sends(self, o: TcpObj) -> None:
        if not o.requests:
            return
        acked = self._acked_pos(o)
        while o.requests:
            end = o.requests[0][1]
            if end is None:
                if not o.conn._fin_acked:
                    break
            elif end > acked:
                break
            tag, end, length = o.requests.popleft()
            if end is not None:
                o.psh_ends.discard((o.base_seq + end) & MASK32)
            self._ocompl(o, hw.OC_SEND_DONE, tag, length, hw.ST_SUCCESS)

    def _deliver(self, o: TcpObj, now: float) -> None:
        conn = o.conn
        if o.indicated:
            return                      # waiting for the answer to an indication
        while o.posted and conn.d.recv_buffer:
            b = o.posted[0]
            data = conn.recv(b.cap - b.filled, now)
            if not self.dma.write(b.addr + b.filled, data):
                self._dma_error(hw.ORECVQ_FIRST + o.qidx, b.addr)
            b.filled += len(data)
            o.delivered += len(data)
            if b.filled >= b.cap:
                o.posted.popleft()
                pushed = o.psh_pos >= 0 and o.delivered >= o.psh_pos
                self._ocompl(o, hw.OC_RECV_DONE, b.tag, b.filled, hw.ST_SUCCESS,
                             hw.OCF_PUSH if pushed else 0)
                o.push_deadline = None
        fin = conn._fin_received and not conn.d.recv_buffer
        if o.posted and o.posted[0].filled:
            b = o.posted[0]
            if fin:
                self._push_complete(o, hw.OCF_FIN)
            elif not b.nopush:
                if o.psh_pos >= 0 and o.delivered >= o.psh_pos:
                    self._push_complete(o, hw.OCF_PUSH)
                elif o.push_deadline is None:
                    o.push_deadline = now + self.push_ticks / TICKS_PER_SECOND
        if not o.posted and conn.d.recv_buffer and not o.ind_blocked:
            self._indicate(o)

    def _push_complete(self, o: TcpObj, flags: int) -> None:
        if o.posted and o.posted[0].filled:
            b = o.posted.popleft()
            self._ocompl(o, hw.OC_RECV_DONE, b.tag, b.filled, hw.ST_SUCCESS, flags)
        o.push_deadline = None

    def _indicate(self, o: TcpObj) -> None:
        pool = self.pools[o.qidx]
        if not pool:
            self.want_pool[o.qidx].add(o.ctx)
            return
        tag, addr, cap = pool.popleft()
        buf = o.conn.d.recv_buffer
        limit = o.conn.cached.rcv_indicate_size or cap
        n = min(len(buf), cap, limit)
        if not self.dma.write(addr, buf[:n]):
            self._dma_error(hw.ORECVQ_FIRST + o.qidx, addr)
            return
        o.indicated = n
        flags = 0
        if o.psh_pos >= 0 and o.delivered + n >= o.psh_pos:
            flags |= hw.OCF_PUSH
        if o.conn._fin_received and n == len(buf):
            flags |= hw.OCF_FIN
        self._ocompl(o, hw.OC_INDICATE, tag, n, hw.ST_SUCCESS, flags)

    def _events(self, o: TcpObj, now: float) -> None:
        conn = o.conn
        sent = o.events_sent
        if conn.reset and "abort" not in sent:
            sent.add("abort")
            self._event(o, hw.EV_ABORT)
            self._abort_io(o, hw.ST_ABORTED)
            return
        if conn._fin_received and not conn.d.recv_buffer and not o.indicated \
                and "disconnect" not in sent:
            sent.add("disconnect")
            self._event(o, hw.EV_DISCONNECT)
        if conn.gave_up and "timeout" not in sent:
            sent.add("timeout")
            self._event(o, hw.EV_RETRIEVE, hw.RR_TIMEOUT)
        if conn.urgent_received and "urgent" not in sent:
            sent.add("urgent")
            self._event(o, hw.EV_RETRIEVE, hw.RR_URGENT_DATA)
        st = conn.d.state
        if st is TcpState.TIME_WAIT and "time_wait" not in sent:
            sent.add("time_wait")
            self._event(o, hw.EV_TIME_WAIT)
            self._untable(o)
        elif st is TcpState.CLOSED and not conn.reset and not conn.gave_up \
                and "closed" not in sent:
            sent.add("closed")
            self._event(o, hw.EV_RETRIEVE, hw.RR_INVALID_STATE)
            self._untable(o)
        if st in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            backlog = max(conn.d.cwnd, conn.d.snd_wnd)
            last = o.backlog_last
            if (backlog >= 2 * last or 2 * backlog <= last) and \
                    now - o.backlog_time >= BACKLOG_INTERVAL:
                o.backlog_last = backlog
                o.backlog_time = now
                self._event(o, hw.EV_SEND_BACKLOG, value=min(backlog, MASK32))

    def _abort_io(self, o: TcpObj, status: int) -> None:
        """Every outstanding request of the connection completes with `status`."""
        o.dead = True
        for tag, end, length in o.requests:
            self._ocompl(o, hw.OC_SEND_DONE, tag, 0, status)
        o.requests.clear()
        o.pending.clear()
        o.psh_ends.clear()
        while o.posted:
            b = o.posted.popleft()
            self._ocompl(o, hw.OC_RECV_DONE, b.tag, b.filled if status == hw.ST_UPLOADED else 0,
                         status)
        o.push_deadline = None
        self._untable(o)

    def _untable(self, o: TcpObj) -> None:
        if o.in_table:
            lip, rip, lp, rp = o.key
            lib.toe_del(self.c, lip, rip, lp, rp)
            o.in_table = False
            if self.c.ndead > TOE_HASH_SLOTS // 4:
                lib.toe_clear(self.c)
                for x in self.conns.values():
                    if x.in_table:
                        lib.toe_add(self.c, *x.key, x.ctx)

    # -- to-host records ---------------------------------------------------------------
    def _ocompl(self, o: TcpObj, kind: int, tag: int, length: int, status: int,
                flags: int = 0) -> None:
        self.out[hw.OCOMPLQ_FIRST + o.qidx].append(hw.OComplRec.pack(
            kind=kind, flags=flags, status=status, tag=tag, host_handle=o.handle,
            len=length, ctx=o.ctx))

    def _ocompl_error(self, k: int, tag: int, ctx: int, status: int, handle: int = 0) -> None:
        self._stat("offload_req_errors")
        self.out[hw.OCOMPLQ_FIRST + k].append(hw.OComplRec.pack(
            kind=hw.OC_ERROR, status=status, tag=tag, host_handle=handle, ctx=ctx))

    def _stale(self, k: int, kind: int, tag: int, ctx: int) -> None:
        """A request for a context that is gone: UPLOAD_IN_PROGRESS if it was uploaded
        lately (the request came too late for the Terminate), else INVALID_HANDLE."""
        handle = self.uploaded.get(ctx)
        if handle is None:
            return self._ocompl_error(k, tag, ctx, hw.ST_INVALID_HANDLE)
        self._stat("offload_req_errors")
        self.out[hw.OCOMPLQ_FIRST + k].append(hw.OComplRec.pack(
            kind=kind, status=hw.ST_UPLOAD_IN_PROGRESS, tag=tag, host_handle=handle, ctx=ctx))

    def _event(self, o: Obj | None, kind: int, reason: int = 0, value: int = 0) -> None:
        self._stat("offload_events")
        self.out[hw.EVENTQ].append(hw.EventRec.pack(
            kind=kind, reason=reason, ctx=o.ctx if o else 0,
            host_handle=o.handle if o else 0, value=value))

    def flush_out(self) -> int:
        """Write held records into the to-host rings, as far as the driver freed space."""
        written = 0
        for qid, pend in self.out.items():
            if not pend:
                continue
            if not self.rings[qid].enabled or not self.device_enabled():
                continue
            written += self.rings.produce(qid, pend, self._bad_index)
        return written

    def _bad_index(self, qid: int, tail: int) -> None:
        """A bad index the rings reported (once per value): the error record."""
        k = hw.queue_kind(qid)
        if k.name in ("CMD", "CMDC", "EVENT"):
            self._stat("offload_cmd_errors")
            self.out[hw.CMDCQ].append(hw.CmdCompl.pack(tag=MASK32, opcode=0,
                                                       status=hw.ST_INVALID_REQUEST))
        else:
            self._ocompl_error(qid - k.first, MASK32, 0, hw.ST_INVALID_REQUEST)

    def _dma_error(self, qid: int, addr: int) -> None:
        self.irq.buffer_dma_error(qid, addr)

    def _buf_ok(self, addr: int, length: int, write: bool) -> bool:
        return self.dma.covers(addr, length, write)

    def _consume(self, qid: int, budget: int = BUDGET) -> list[bytes]:
        return self.rings.consume(qid, budget, self._bad_index)

    def _poll_requests(self, k: int, first: int, layout, handler, now: float) -> int:
        """Consume one OSEND or ORECV ring; a request that trips a bug completes
        with FAILURE (and a log line) instead of stopping the device."""
        descs = self._consume(first + k)
        for raw in descs:
            d = layout.unpack_from(raw)
            try:
                handler(k, d, now)
            except Exception:
                log.exception("%s %d: internal error", layout.name, k)
                self.internal_errors += 1
                self._ocompl_error(k, d["tag"], d["ctx"], hw.ST_FAILURE)
        return len(descs)

    def _poll_osend(self, k: int, now: float) -> int:
        return self._poll_requests(k, hw.OSENDQ_FIRST, hw.OSendDesc, self._on_osend, now)

    def _on_osend(self, k: int, d: dict, now: float) -> None:
        ctx, flags, tag = d["ctx"], d["flags"], d["tag"]
        o = self.conns.get(ctx)
        if o is None:
            return self._stale(k, hw.OC_SEND_DONE, tag, ctx)
        if flags & ~(hw.OSF_SEND | hw.OSF_DISCONNECT | hw.OSF_ABORT) or not flags:
            return self._ocompl_error(k, tag, ctx, hw.ST_INVALID_REQUEST, o.handle)
        if o.dead:
            return self._ocompl(o, hw.OC_SEND_DONE, tag, 0, hw.ST_ABORTED)
        if flags & hw.OSF_ABORT:
            o.conn.abort(now)
            self._transmit(o)
            self._abort_io(o, hw.ST_ABORTED)
            self._ocompl(o, hw.OC_SEND_DONE, tag, 0, hw.ST_SUCCESS)
            return
        if flags & hw.OSF_SEND:
            n = d["len"]
            if n == 0 or n > codec.MAX_DATA:
                return self._ocompl_error(k, tag, ctx, hw.ST_INVALID_REQUEST, o.handle)
            if o.disconnect_pending or o.conn.d.fin_queued:
                return self._ocompl_error(k, tag, ctx, hw.ST_INVALID_REQUEST, o.handle)
            data = self.dma.read(d["addr"], n)
            if data is None:
                self._dma_error(hw.OSENDQ_FIRST + k, d["addr"])
                return self._ocompl_error(k, tag, ctx, hw.ST_DMA_ERROR, o.handle)
            o.pending.append([data, 0])
            o.queued += n
            o.requests.append((tag, o.queued, n))
            o.psh_ends.add((o.base_seq + o.queued) & MASK32)
        if flags & hw.OSF_DISCONNECT:
            o.disconnect_pending = True
            if not flags & hw.OSF_SEND:
                # completes once the FIN is acknowledged (end None)
                o.requests.append((tag, None, 0))
        self.touched.add(ctx)

    def _poll_orecv(self, k: int, now: float) -> int:
        return self._poll_requests(k, hw.ORECVQ_FIRST, hw.ORecvDesc, self._on_orecv, now)

    def _on_orecv(self, k: int, d: dict, now: float) -> None:
        ctx, flags, tag, n = d["ctx"], d["flags"], d["tag"], d["len"]
        if flags & hw.ORF_POOL:
            if not n or not self._buf_ok(d["addr"], n, True):
                if n:
                    self._dma_error(hw.ORECVQ_FIRST + k, d["addr"])
                return self._ocompl_error(k, tag, ctx, hw.ST_DMA_ERROR if n else
                                          hw.ST_INVALID_REQUEST)
            self.pools[k].append((tag, d["addr"], n))
            self.touched |= self.want_pool[k]     # connections waiting for a pool buffer
            self.want_pool[k] = set()
            return
        o = self.conns.get(ctx)
        if o is None:
            return self._stale(k, hw.OC_RECV_DONE, tag, ctx)
        if flags & hw.ORF_POST:
            if flags & hw.ORF_ACCEPT:
                return self._ocompl_error(k, tag, ctx, hw.ST_INVALID_REQUEST, o.handle)
            if not n or not self._buf_ok(d["addr"], n, True):
                if n:
                    self._dma_error(hw.ORECVQ_FIRST + k, d["addr"])
                return self._ocompl_error(k, tag, ctx, hw.ST_DMA_ERROR if n else
                                          hw.ST_INVALID_REQUEST, o.handle)
            if o.dead:
                return self._ocompl(o, hw.OC_RECV_DONE, tag, 0, hw.ST_ABORTED)
            o.posted.append(Posted(tag, d["addr"], n, bool(flags & hw.ORF_NO_PUSH)))
            o.ind_blocked = False
            self.touched.add(ctx)
        elif flags & hw.ORF_ACCEPT:
            if not o.indicated:
                return self._ocompl_error(k, tag, ctx, hw.ST_INVALID_REQUEST, o.handle)
            take = min(n, o.indicated)
            if take:
                o.conn.recv(take, now)
                o.delivered += take
            if take < o.indicated:
                o.ind_blocked = True
            o.indicated = 0
            self.touched.add(ctx)
        else:
            return self._ocompl_error(k, tag, ctx, hw.ST_INVALID_REQUEST, o.handle)

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
        entries = codec.decode_records(req, max_records=MAX_OBJECTS)
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
        if e.state is None:
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
        return dataclasses.replace(self.cfg, local_mss=max(64, mss), recv_buffer_size=rcv)

    # UPDATE -----------------------------------------------------------------------------
    def _cmd_update(self, req: bytes, resp_len: int, now: float):
        entries = parse_records(req)
        if not entries:
            return hw.ST_INVALID_REQUEST, b"", 0
        failed = 0
        for e in entries:
            o = self.lookup(e.nic_ctx, e.type)
            if o is None or e.state is None or e.link:
                failed += 1
                continue
            if isinstance(o, NeighObj):
                o.st.dst_mac = e.state.dst_mac
                o.st.host_reach_delta = e.state.host_reach_delta
                o.host_seen = now - e.state.host_reach_delta / TICKS_PER_SECOND
                o.query_out = False
            elif isinstance(o, PathObj):
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

    # QUERY / TERMINATE ------------------------------------------------------------------
    def _record(self, o: Obj, now: float, with_data: bool, status: int = hw.ST_SUCCESS) -> bytes:
        data = b""
        parent = o.parent.ctx if o.parent is not None else codec.NONE32
        if isinstance(o, NeighObj):
            o.st.nic_reach_delta = max(0, int((now - o.nic_seen) * TICKS_PER_SECOND))
            o.st.host_reach_delta = max(0, int((now - o.host_seen) * TICKS_PER_SECOND))
            state = codec.encode_neighbor(o.st)
        elif isinstance(o, PathObj):
            state = codec.encode_path(o.st)
        else:
            const, cached, d = o.conn.export(now)
            self._transmit(o)             # the delayed ACK export sent
            if o.pending:
                d.send_buffer = bytes(d.send_buffer) + b"".join(
                    bytes(x[0][x[1]:]) for x in o.pending)
            if o.disconnect_pending:
                d.fin_queued = True
            state, data = codec.encode_tcp(codec.Tcp(const, cached, d))
            if not with_data:
                data = b""
        rec = hw.ObjRecord.pack(type=o.type, link=0, status=status, parent=parent,
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
                out.append(self._record(o, now, with_data=False))
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
                plan.append((None, hw.ObjRecord.pack(
                    type=o.type, status=hw.ST_FAILURE,
                    parent=o.parent.ctx if o.parent else codec.NONE32,
                    host_handle=o.handle, nic_ctx=o.ctx)))
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
        out = []
        for o, rec in plan:
            if o is None:
                out.append(rec)
                continue
            out.append(self._record(o, now, with_data=True))
            self._terminate(o)
        self._stat("offload_conns", set_to=len(self.conns))
        self._pause_resume()
        return self._overall(bad, len(ctxs)), b"".join(out), len(ctxs)

    def _pause_resume(self) -> None:
        """Status indications: PAUSE when the connection table is 90 % full, RESUME
        once it is below 80 % again."""
        n = len(self.conns)
        if not self.paused and n * 10 >= self.max_conns * 9:
            self.paused = True
            self._event(None, hw.EV_PAUSE)
        elif self.paused and n * 10 < self.max_conns * 8:
            self.paused = False
            self._event(None, hw.EV_RESUME)

    def _terminate(self, o: Obj) -> None:
        if isinstance(o, TcpObj):
            for tag, end, length in o.requests:
                self._ocompl(o, hw.OC_SEND_DONE, tag, 0, hw.ST_UPLOADED)
            o.requests.clear()
            o.pending.clear()
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

    # -- observability -----------------------------------------------------------------
    def conn_stats(self, ctx: int) -> dict | None:
        o = self.conns.get(ctx)
        if o is None:
            return None
        d = o.conn.d
        return {"segs_out": o.segs_out, "segs_in": o.segs_in, "bytes_out": o.bytes_out,
                "bytes_in": o.bytes_in, "retransmits": o.retransmits, "cwnd": d.cwnd,
                "srtt": d.srtt, "state": str(d.state)}
