"""The TOE: the device half of the TCP chimney (docs/chimney-interfaces.md).

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
import heapq
import itertools
import logging

from .. import hw
from ..staterec import codec
from ..tcp import segment as tcpseg
from ..tcp.engine import Config, seq_add, seq_sub
from ..tcp.segment import FIN, PSH, RST, SYN, SegmentError, split_tso
from ..tcp.segment import decode as decode_segment
from ..tcp.state import TICKS_PER_SECOND, TcpState
from ._fastpath import ffi, lib
from .port import ToePort
from .toe_commands import ToeCommands
from .toe_objects import (
    MASK32,
    MAX_OBJECTS,
    MAX_SEND,
    Obj,
    Posted,
    TcpObj,
    parse_records,  # noqa: F401  (callers parse responses with it)
)

log = logging.getLogger("chimney.device.toe")

SLOT_BITS = 20
SLOT_MASK = (1 << SLOT_BITS) - 1
RX_CAP = 512
BUDGET = 256
BACKLOG_INTERVAL = 0.1
TOE_HASH_SLOTS = 1 << 17
MAX_BURST = 44                  # segments per engine burst (segmentation offload)

# the TCP header as chimney.tcp.segment describes it (one description for both sides)
_TCP_HDR, _TCP_HDR_TS, _TS_OPT = tcpseg.HEADER, tcpseg.HEADER_TS, tcpseg.TS_OPTION
_TS_WORD, _TS_LEAD = tcpseg.TS_LEAD, tcpseg.TS_LEAD_BYTES
_CTL = SYN | FIN | RST


# --------------------------------------------------------------------------------------
# The TOE
# --------------------------------------------------------------------------------------
class Toe(ToeCommands):
    max_conns = TOE_HASH_SLOTS // 4     # PAUSE at 90 %, RESUME below 80 %
    # Send bytes held beyond a connection's engine send buffer (copied from OSEND
    # requests): a connection below pending_fair is never refused, one above it only
    # while the device holds less than send_pool in all, and none above pending_max
    # (then the request completes ERROR / RESOURCES and nothing of it is taken).
    pending_fair = 4 << 20
    pending_max = MAX_SEND - Config.send_buffer_size
    send_pool = 512 << 20

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
        self.link_up = True     # the NIC's port, told by link_changed; a reset keeps it
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
        # connections waiting for a pool buffer, per queue, in the order they came
        self.want_pool: list[dict] = [{} for _ in range(hw.NUM_OFFLOAD_QUEUES)]
        self.heap: list = []
        self._hseq = 0
        self.touched: set[int] = set()
        self.pending_bytes = 0                # send bytes held beyond engine buffers
        self.final_tx: list[TcpObj] = []      # terminated this pass, their last segments
        self._keymap: dict = {}
        self.internal_errors = 0
        self.forwarded = 0                    # OSEND FORWARD segments processed
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
        if self.final_tx:
            self._final_transmit()
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
            try:
                if o.push_deadline is not None and o.push_deadline <= now:
                    o.push_deadline = None
                    self._push_complete(o, hw.OCF_PUSH)
                dl = o.conn.next_deadline()
                if dl is not None and dl <= now:
                    d = o.conn.d
                    # the engine backs off by 2 ** count in floats: past 1023 that
                    # overflows (a zero window held for hours); 255 is already rto_max
                    d.window_probe_count = min(d.window_probe_count, codec.MAX_BACKOFF)
                    o.conn.poll(now)
            except Exception:
                log.exception("connection %#x: internal error (timer)", o.ctx)
                self._internal_error(o)
            self.touched.add(ctx)
            n += 1
        return n

    def _internal_error(self, o: TcpObj) -> None:
        """A bug of ours (or a state the engine cannot run), logged by the caller: stop
        the connection's timers and sending, ask for its upload, serve the others."""
        self.internal_errors += 1
        o.invalid = True
        o.conn._reset_timers()
        o.push_deadline = None
        if "hwfail" not in o.events_sent:
            o.events_sent.add("hwfail")
            self._event(o, hw.EV_RETRIEVE, hw.RR_HARDWARE_FAILURE)

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
            ahead = not plen and not flags & _CTL and \
                0 < seq_sub(seq, conn.d.rcv_nxt) < conn.d.rcv_wnd
            if ahead:
                # a pure ACK from inside the window but beyond RCV.NXT (forged, or sent
                # after data we lost): taken as if sent at RCV.NXT.  As it is, its SEQ
                # would become SND.WL1, and every window update of the real peer (SEQ =
                # RCV.NXT) would be ignored until the peer's data got past it
                seq = conn.d.rcv_nxt
                o.acks_ahead += 1
            o.bytes_in += plen
            total += plen
            try:
                if seg is None and not conn.on_fast(seq, ack, flags, window, tsval, payload, now):
                    seg = decode_segment(view[off:end], "", "", verify_checksum=False)
                if seg is not None:
                    if ahead:
                        seg.seq = seq
                    conn.on_segment(seg, now)
            except Exception:
                log.exception("connection %#x: internal error (segment)", o.ctx)
                self._internal_error(o)
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

    # -- servicing a connection -------------------------------------------------------
    def _service_touched(self, now: float) -> None:
        while self.touched:
            ctxs, self.touched = self.touched, set()
            for ctx in ctxs:
                o = self.conns.get(ctx)
                if o is not None:
                    try:
                        self._service(o, now)
                    except Exception:
                        log.exception("connection %#x: internal error", ctx)
                        self._internal_error(o)

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
            self.pending_bytes -= n
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
        self._send(o, segs)

    def _final_transmit(self) -> None:
        """What connections terminated in this pass had to send (their pending ACK),
        through the normal output path, before their TERMINATE completes."""
        for o in self.final_tx:
            segs = o.conn.take_segments()
            if segs:
                self._send(o, segs)
        self.final_tx.clear()

    def _send(self, o: TcpObj, segs: list) -> None:
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
            n = min(b.cap - b.filled, len(conn.d.recv_buffer))
            if not self._buf_ok(b.addr + b.filled, n, True):
                # unmapped since it was posted: it completes DMA_ERROR with what it
                # holds, and the bytes stay for the next buffer
                self._dma_error(hw.ORECVQ_FIRST + o.qidx, b.addr)
                o.posted.popleft()
                self._ocompl(o, hw.OC_RECV_DONE, b.tag, b.filled, hw.ST_DMA_ERROR)
                continue
            data = conn.recv(n, now)
            self.dma.write(b.addr + b.filled, data)
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
        elif self.want_pool[o.qidx].pop(o.ctx, 0) is None and self.pools[o.qidx]:
            self._wake_pool(o.qidx)         # it needs no buffer now: the next in line

    def _wake_pool(self, k: int) -> None:
        """Service the first connections in line for queue k's pool buffers."""
        waiting, want = self.want_pool[k], len(self.pools[k])
        gone, first = [], []
        for ctx in waiting:
            if len(first) >= want:
                break
            o = self.conns.get(ctx)
            if o is None or o.dead or o.qidx != k:
                gone.append(ctx)            # terminated, reset or moved: out of the line
            else:
                first.append(ctx)
        for ctx in gone:
            del waiting[ctx]
        self.touched.update(first)

    def _push_complete(self, o: TcpObj, flags: int) -> None:
        if o.posted and o.posted[0].filled:
            b = o.posted.popleft()
            self._ocompl(o, hw.OC_RECV_DONE, b.tag, b.filled, hw.ST_SUCCESS, flags)
        o.push_deadline = None

    def _indicate(self, o: TcpObj) -> None:
        """Pool buffers go to the waiting connections in turn: one ahead in the line
        gets it first, and one served queues again at the back."""
        pool = self.pools[o.qidx]
        waiting = self.want_pool[o.qidx]
        ahead = len(waiting)
        if o.ctx in waiting:
            ahead = next((i for i, c in enumerate(itertools.islice(waiting, len(pool)))
                          if c == o.ctx), len(pool))
        if ahead >= len(pool):
            waiting.setdefault(o.ctx, None)
            return
        waiting.pop(o.ctx, None)
        tag, addr, cap = pool.popleft()
        buf = o.conn.d.recv_buffer
        limit = o.conn.cached.rcv_indicate_size or cap
        n = min(len(buf), cap, limit)
        if not self.dma.write(addr, buf[:n]):
            # the pool buffer was unmapped: it comes back as an error, the data stays
            self._dma_error(hw.ORECVQ_FIRST + o.qidx, addr)
            self._ocompl_error(o.qidx, tag, o.ctx, hw.ST_DMA_ERROR, o.handle)
            self.touched.add(o.ctx)
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
        self._drop_pending(o)
        self.want_pool[o.qidx].pop(o.ctx, None)
        o.psh_ends.clear()
        while o.posted:
            b = o.posted.popleft()
            self._ocompl(o, hw.OC_RECV_DONE, b.tag, b.filled if status == hw.ST_UPLOADED else 0,
                         status)
        o.push_deadline = None
        self._untable(o)

    def _drop_pending(self, o: TcpObj) -> None:
        self.pending_bytes -= o.queued - o.fed
        o.queued = o.fed
        o.pending.clear()

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
        if flags & ~(hw.OSF_SEND | hw.OSF_DISCONNECT | hw.OSF_ABORT | hw.OSF_FORWARD) or \
                not flags or flags & hw.OSF_FORWARD and flags != hw.OSF_FORWARD:
            return self._ocompl_error(k, tag, ctx, hw.ST_INVALID_REQUEST, o.handle)
        if o.dead:
            return self._ocompl(o, hw.OC_SEND_DONE, tag, 0, hw.ST_ABORTED)
        if flags & hw.OSF_FORWARD:
            return self._forward(k, o, d, now)
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
            held = o.queued - o.fed + n
            # the send side of a TERMINATE record: engine buffer plus held sends <= MAX_SEND
            pending_max = min(self.pending_max, MAX_SEND - o.conn.cfg.send_buffer_size)
            if held > self.pending_fair and (held > pending_max or
                                             self.pending_bytes + n > self.send_pool):
                return self._ocompl_error(k, tag, ctx, hw.ST_RESOURCES, o.handle)
            data = self.dma.read(d["addr"], n)
            if data is None:
                self._dma_error(hw.OSENDQ_FIRST + k, d["addr"])
                return self._ocompl_error(k, tag, ctx, hw.ST_DMA_ERROR, o.handle)
            o.pending.append([data, 0])
            o.queued += n
            self.pending_bytes += n
            o.requests.append((tag, o.queued, n))
            o.psh_ends.add((o.base_seq + o.queued) & MASK32)
        if flags & hw.OSF_DISCONNECT:
            o.disconnect_pending = True
            if not flags & hw.OSF_SEND:
                # completes once the FIN is acknowledged (end None)
                o.requests.append((tag, None, 0))
        self.touched.add(ctx)

    def _forward(self, k: int, o: TcpObj, d: dict, now: float) -> None:
        """OSEND FORWARD: a segment of this connection the host stack parsed (IP options,
        fragments, IPv6 extension headers, or held during a handover), taken as if it had
        come off the wire; the checksum was the host's to check."""
        tag, n = d["tag"], d["len"]
        if not 20 <= n <= 0xFFFF:
            return self._ocompl_error(k, tag, o.ctx, hw.ST_INVALID_REQUEST, o.handle)
        raw = self.dma.read(d["addr"], n)
        if raw is None:
            self._dma_error(hw.OSENDQ_FIRST + k, d["addr"])
            return self._ocompl_error(k, tag, o.ctx, hw.ST_DMA_ERROR, o.handle)
        try:
            seg = decode_segment(raw, "", "", verify_checksum=False)
        except SegmentError:
            return self._ocompl_error(k, tag, o.ctx, hw.ST_INVALID_REQUEST, o.handle)
        conn = o.conn
        if seg.src_port != conn.const.remote_port or seg.dst_port != conn.const.local_port:
            return self._ocompl_error(k, tag, o.ctx, hw.ST_INVALID_REQUEST, o.handle)
        self.forwarded += 1
        una, plen = conn.d.snd_una, len(seg.payload)
        o.segs_in += 1
        if not plen and not seg.flags & _CTL and \
                0 < seq_sub(seg.seq, conn.d.rcv_nxt) < conn.d.rcv_wnd:
            seg.seq = conn.d.rcv_nxt        # a pure ACK ahead of RCV.NXT, as in _drain_rx
            o.acks_ahead += 1
        o.bytes_in += plen
        if plen:
            self._stat("offload_bytes_in", plen)
        try:
            conn.on_segment(seg, now)
        except Exception:
            log.exception("connection %#x: internal error (forwarded segment)", o.ctx)
            self._internal_error(o)
            return self._ocompl(o, hw.OC_SEND_DONE, tag, 0, hw.ST_FAILURE)
        if plen or conn.d.snd_una != una:
            o.parent.parent.nic_seen = now
        if seg.flags & PSH and plen:
            o.psh_pos = o.delivered + len(conn.d.recv_buffer)
        self._ocompl(o, hw.OC_SEND_DONE, tag, n, hw.ST_SUCCESS)
        self.touched.add(o.ctx)

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
            self._wake_pool(k)
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

    # -- observability -----------------------------------------------------------------
    def conn_stats(self, ctx: int) -> dict | None:
        o = self.conns.get(ctx)
        if o is None:
            return None
        d = o.conn.d
        return {"segs_out": o.segs_out, "segs_in": o.segs_in, "bytes_out": o.bytes_out,
                "bytes_in": o.bytes_in, "retransmits": o.retransmits, "cwnd": d.cwnd,
                "acks_ahead": o.acks_ahead,
                "srtt": d.srtt, "state": str(d.state)}
