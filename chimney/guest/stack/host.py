"""The host stack's TCP layer: one `HostStack` holding an Interface and every
TCP connection of the guest.

Single-threaded and clock-injected: `on_tcp` (registered as IP protocol 6 on
the Interface), `poll(now)` and `flush()` never block and take time from the
injected clock.  Only `step(timeout)` / `run_until(predicate, timeout)` wait,
and only in `miniport.recv`: they move frames from the miniport into the
Interface, run the timers and put every connection's outbox on the wire.

What it does with an incoming segment (after the Interface handed it up):
decode with the pseudo-header (a malformed segment is counted in
`stats["tcp_drop_malformed"]`, never raised); find the connection by its
4-tuple; else a SYN to a listening port makes a new Connection (a passive
open, queued for `accept` once established); else answer with `rst_for`.

Counters (`stats`): tcp_segments_in / tcp_segments_out, tcp_rst_out (our RSTs
for segments matching nothing), tcp_no_connection, tcp_passive_opens,
tcp_drop_malformed, tcp_drop_unacceptable (out of window or an old
timestamp: the engine ACKs and drops it), tcp_drop_not_unicast, tcp_drop_backlog_full,
tcp_send_errors (send_ip refused: no route, MTU), tx_errors (the miniport
refused a batch), tcp_forwarded (a segment of an offloaded connection that
reached the host because the NIC cannot parse its IP layer — options, fragments,
IPv6 extension headers — handed to the NIC with the offload manager's `forward`),
tcp_drop_detached (for an offloaded connection the NIC would not take back:
its forward refused, or ring full), tcp_held_handover (held while a connection changes hands, processed
when it is attached again), tcp_internal_error (a bug, with `last_error`); per
connection (`Flow`): segments_in, segments_out and data_segments_out — the
number of segments carrying payload that the *software* TCP sent, which an
offloaded connection must leave untouched.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import random
import time
from collections import Counter

from ...tcp import Config, Connection, SegmentError, decode, rst_for
from ...tcp.segment import ACK, pseudo_sum
from ...tcp.state import TcpState
from .iface import Interface
from .socket import ListeningSocket, Socket

IPPROTO_TCP = 6
EPHEMERAL = (49152, 65535)          # RFC 6335 dynamic ports
IPV4_MSS, IPV6_MSS = 1460, 1440     # for a 1500-byte MTU
HOLD_MAX = 8192                     # segments held per connection while it changes hands


class Flow:
    """One connection in the stack's table, with its per-connection counters."""

    __slots__ = (
        "bytes_out",
        "conn",
        "data_segments_out",
        "key",
        "listener",
        "owned",
        "psum_out",
        "remote_str",
        "src6",
        "segments_in",
        "segments_out",
    )

    def __init__(self, key, conn: Connection, listener=None):
        self.key = key                  # (local_ip, local_port, remote_ip, remote_port), ipaddress objects
        self.conn = conn
        self.segments_in = 0
        self.segments_out = 0
        self.data_segments_out = 0      # segments with payload sent by the software TCP
        self.bytes_out = 0
        self.owned = False              # a socket holds it (else reaped once closed)
        self.listener = listener        # the Listener that spawned it, until accepted
        local, _, remote, _ = key
        self.remote_str = str(remote)
        self.src6 = local if local.version == 6 else None      # send_ip's src
        self.psum_out = pseudo_sum(str(local), self.remote_str)     # our segments' pseudo-header

    def __repr__(self) -> str:
        return f"Flow({self.key}, {self.conn.state}, out={self.segments_out}, data={self.data_segments_out})"


class Listener:
    """A listening port: SYNs to it make connections; `backlog` established ones wait for accept."""

    def __init__(self, stack: HostStack, local_ip, port: int, backlog: int):
        self.stack = stack
        self.local_ip = local_ip        # None: any of our addresses
        self.port = port
        self.backlog = backlog
        self.pending: list[Flow] = []   # spawned, not yet accepted (handshaking or established)
        self.closed = False

    def ready(self) -> Flow | None:
        for f in self.pending:
            if f.conn.established:
                return f
        return None

    def take(self) -> Flow | None:
        f = self.ready()
        if f is not None:
            self.pending.remove(f)
            f.listener = None
            f.owned = True
        return f


class HostStack:
    def __init__(self, iface: Interface, miniport=None, config: Config | None = None,
                 clock=None, tx_batch: list | None = None):
        """iface: the Interface (its clock is ours unless `clock` is given);
        miniport: where step() receives frames from (None: feed on_frame yourself);
        tx_batch: the list iface's send_frame appends to, flushed with
        miniport.send_many (see `on_miniport`); None: frames leave one by one."""
        self.iface = iface
        self.miniport = miniport
        self.clock = clock or iface.clock
        self.config = config or Config()
        self.stats: Counter = Counter()
        self.flows: dict[tuple, Flow] = {}
        self.listeners: dict[tuple, Listener] = {}
        self._tx_batch = tx_batch
        self._next_port = random.randint(*EPHEMERAL)
        self.last_error: BaseException | None = None
        # offload hooks: flows run elsewhere (offloaded, or in a handover) are detached:
        # no timers, no segment processing, and segments for them get no RST
        self.detached: dict[tuple, Flow] = {}
        # segments that arrived for a detached flow while it changes hands (an upload on
        # its way back, an offload not confirmed yet): given to the software TCP when the
        # flow is attached again, so that none is dropped
        self.held: dict[tuple, list] = {}
        self.offload = None             # the offload manager (stack/offload.py), polled in poll()
        # ACK coalescing within one burst of received frames (step): a pure ACK that
        # only moves the acknowledgment forward replaces the one held before it
        self._coalesce = False
        self._held_acks: dict = {}      # Flow -> its latest pure ACK, not sent yet
        self._pairs: dict = {}          # (id(src), id(dst)) -> (src str, dst str, pseudo-header sum, src, dst)
        iface.register_protocol(IPPROTO_TCP, self.on_tcp)

    @classmethod
    def on_miniport(cls, miniport, ipv4=None, ipv6=(), config: Config | None = None,
                    clock=time.monotonic, **iface_kw) -> HostStack:
        """A HostStack over an Interface on an up miniport; frames leave in batches
        (one doorbell per step) through miniport.send_many."""
        batch: list = []
        iface = Interface(miniport.mac, ipv4=ipv4, ipv6=ipv6, send_frame=batch.append,
                          clock=clock, **iface_kw)
        return cls(iface, miniport, config, clock, tx_batch=batch)

    def up(self) -> None:
        """Interface up (gratuitous ARP, unsolicited NAs), sent at once."""
        self.iface.up()
        self.flush()

    # -- configuration -----------------------------------------------------------------
    def _config_for(self, local_ip) -> Config:
        mss = min(self.config.local_mss,
                  (IPV4_MSS if local_ip.version == 4 else IPV6_MSS) - (1500 - self.iface.mtu))
        rcv = self.config.recv_buffer_size
        capacity = getattr(self.miniport, "rx_capacity", None)
        if capacity is not None:
            # no more window than the RX ring buffers: full frames, each carrying at least
            # the MSS less 40 bytes of TCP options (a small MSS binds by slots, not bytes;
            # at least a byte a slot, so even the smallest MTU leaves a window open)
            rcv = min(rcv, capacity(self.iface.mtu + 14, max(mss - 40, 1)))
        return dataclasses.replace(self.config, local_mss=mss, recv_buffer_size=rcv)

    def _local_for(self, remote) -> ipaddress._BaseAddress:
        if remote.version == 4:
            if self.iface.ip4 is None:
                raise OSError("no IPv4 address")
            return self.iface.ip4
        return self.iface._source6(remote)

    def ephemeral_port(self, local_ip, remote_ip, remote_port: int) -> int:
        lo, hi = EPHEMERAL
        for _ in range(hi - lo + 1):
            p = self._next_port
            self._next_port = lo if p >= hi else p + 1
            if (local_ip, p, remote_ip, remote_port) not in self.flows and \
                    (local_ip, p, remote_ip, remote_port) not in self.detached and \
                    (None, p) not in self.listeners and (local_ip, p) not in self.listeners:
                return p
        raise OSError("no ephemeral port free")

    # -- opening -----------------------------------------------------------------------
    def open(self, remote_ip, remote_port: int, local_port: int | None = None) -> Flow:
        """Active open: a new client connection, SYN queued (flushed by the next step)."""
        remote = ipaddress.ip_address(remote_ip)
        local = self._local_for(remote)
        port = local_port or self.ephemeral_port(local, remote, remote_port)
        key = (local, port, remote, remote_port)
        if key in self.flows:
            raise OSError(f"address in use: {key}")
        conn = Connection.client((str(local), port), (str(remote), remote_port), self._config_for(local))
        flow = Flow(key, conn)
        flow.owned = True
        self.flows[key] = flow
        conn.connect(self.clock())
        self.flush()
        return flow

    def listen(self, port: int, local_ip=None, backlog: int = 16) -> Listener:
        lip = None if local_ip is None else ipaddress.ip_address(local_ip)
        if (lip, port) in self.listeners:
            raise OSError(f"port {port} already listening")
        lst = Listener(self, lip, port, backlog)
        self.listeners[(lip, port)] = lst
        return lst

    def unlisten(self, lst: Listener) -> None:
        """Stop listening; connections not accepted yet are aborted."""
        lst.closed = True
        self.listeners.pop((lst.local_ip, lst.port), None)
        for f in lst.pending:
            f.conn.abort(self.clock())
            f.listener = None
        lst.pending.clear()
        self.flush()

    def release(self, flow: Flow) -> None:
        """The socket let go of the flow: reaped once CLOSED (after TIME-WAIT and the like)."""
        flow.owned = False
        self._reap(flow)

    def detach(self, flow: Flow, hold: bool = False) -> None:
        """Take a flow out of software processing (offload handover); its segments are
        dropped, or with `hold` kept until `attach` or `release_held`."""
        self.flows.pop(flow.key, None)
        self.detached[flow.key] = flow
        if hold:
            self.hold(flow.key)

    def hold(self, key) -> None:
        """Keep the segments that arrive for a detached flow from now on (see `held`)."""
        self.held.setdefault(key, [])

    def release_held(self, key) -> list:
        """Stop holding for `key`; the segments held so far (src, dst, TCP bytes)."""
        return self.held.pop(key, [])

    def attach(self, flow: Flow, conn: Connection | None = None) -> None:
        """Back into software processing, with `conn` (rebuilt from uploaded state) if
        given; the segments held meanwhile are processed now, in arrival order."""
        if conn is not None:
            flow.conn = conn
        self.detached.pop(flow.key, None)
        self.flows[flow.key] = flow
        self._flush_flow(flow)
        for src, dst, payload in self.release_held(flow.key):
            self._segment_in(src, dst, payload)

    def _reap(self, flow: Flow) -> None:
        c = flow.conn
        if not flow.owned and flow.listener is None and (c.closed or c.state is TcpState.LISTEN):
            self.flows.pop(flow.key, None)
        elif flow.listener is not None and (c.closed or c.state is TcpState.LISTEN):
            # a passive open that was reset (or timed out) before accept
            flow.listener.pending.remove(flow)
            flow.listener = None
            self.flows.pop(flow.key, None)

    # -- receive -----------------------------------------------------------------------
    def on_tcp(self, src, dst, payload: bytes) -> None:
        """IP protocol 6 from the Interface.  Never raises."""
        try:
            self._on_tcp(src, dst, payload)
        except Exception as e:  # noqa: BLE001 -- a bug must not take the receive loop down
            self.last_error = e
            self.stats["tcp_internal_error"] += 1

    def _on_tcp(self, src, dst, payload: bytes) -> None:
        self.stats["tcp_segments_in"] += 1
        self._segment_in(src, dst, payload)

    def _segment_in(self, src, dst, payload: bytes) -> None:
        try:
            # keyed by identity (the Interface hands the same address objects
            # around; hashing an ipaddress costs more), the objects kept in the value
            pair = self._pairs.get((id(src), id(dst)))
            if pair is None or pair[3] is not src or pair[4] is not dst:
                if len(self._pairs) >= 1024:
                    self._pairs.clear()
                pair = (str(src), str(dst), pseudo_sum(str(src), str(dst)), src, dst)
                self._pairs[(id(src), id(dst))] = pair
            seg = decode(payload, pair[0], pair[1], psum=pair[2])
        except SegmentError:
            self.stats["tcp_drop_malformed"] += 1
            return
        if dst is not self.iface.ip4 and dst.version == 4 and dst != self.iface.ip4:
            self.stats["tcp_drop_not_unicast"] += 1     # broadcast: no connection, no RST
            return
        now = self.clock()
        key = (dst, seg.dst_port, src, seg.src_port)
        flow = self.flows.get(key)
        if flow is None and key in self.detached:
            held = self.held.get(key)
            if held is not None and len(held) < HOLD_MAX:
                held.append((src, dst, bytes(payload)))
                self.stats["tcp_held_handover"] += 1
            elif held is None and self.offload is not None and self.offload.forward(key, payload):
                # offloaded, but the NIC could not parse the packet (IP options, fragments,
                # IPv6 extension headers): the segment goes down the chimney
                self.stats["tcp_forwarded"] += 1
            else:
                self.stats["tcp_drop_detached"] += 1   # offloaded: no RST
            return
        if flow is None:
            lst = self.listeners.get((dst, seg.dst_port)) or self.listeners.get((None, seg.dst_port))
            if lst is not None and seg.syn and not seg.has_ack and not seg.rst:
                if len(lst.pending) >= lst.backlog:
                    self.stats["tcp_drop_backlog_full"] += 1
                    return
                conn = Connection.listener((str(dst), seg.dst_port), self._config_for(dst))
                flow = Flow(key, conn, listener=lst)
                self.flows[key] = flow
                lst.pending.append(flow)
                self.stats["tcp_passive_opens"] += 1
            else:
                self.stats["tcp_no_connection"] += 1
                r = rst_for(seg)
                if r is not None:
                    self._send_segment(r, dst, src, None)
                    self.stats["tcp_rst_out"] += 1
                return
        flow.segments_in += 1
        conn = flow.conn
        dropped = conn.dropped_unacceptable + conn.dropped_paws
        conn.on_segment(seg, now, flow.remote_str)
        if conn.dropped_unacceptable + conn.dropped_paws != dropped:
            self.stats["tcp_drop_unacceptable"] += 1    # out of window or PAWS: ACKed, dropped
        self._flush_flow(flow)

    # -- send --------------------------------------------------------------------------
    def _send_segment(self, seg, local, remote, flow: Flow | None) -> None:
        raw = seg.encode(str(local), str(remote)) if flow is None else seg.encode_sum(flow.psum_out)
        src = (local if local.version == 6 else None) if flow is None else flow.src6
        if self.iface.send_ip(remote, IPPROTO_TCP, raw, src=src):
            self.stats["tcp_segments_out"] += 1
            if flow is not None:
                flow.segments_out += 1
                flow.bytes_out += len(seg.payload)
                if seg.payload:
                    flow.data_segments_out += 1
        else:
            self.stats["tcp_send_errors"] += 1

    def _flush_flow(self, flow: Flow) -> None:
        segs = flow.conn.take_segments()
        local, _, remote, _ = flow.key
        held = self._held_acks
        for seg in segs:
            if self._coalesce and seg.flags == ACK and not seg.payload:
                prev = held.get(flow)
                if prev is not None and prev.ack == seg.ack:
                    # a duplicate ACK (or a window update): every one of those goes out
                    self._send_segment(prev, local, remote, flow)
                held[flow] = seg
                continue
            prev = held.pop(flow, None)
            if prev is not None:
                self._send_segment(prev, local, remote, flow)
            self._send_segment(seg, local, remote, flow)
        self._reap(flow)

    def _release_acks(self) -> None:
        held, self._held_acks = self._held_acks, {}
        for flow, seg in held.items():
            local, _, remote, _ = flow.key
            self._send_segment(seg, local, remote, flow)

    def flush(self) -> None:
        """Every connection's outbox onto the wire (and the batched frames to the miniport)."""
        for flow in list(self.flows.values()):
            self._flush_flow(flow)
        if self._held_acks:
            self._release_acks()
        self._flush_frames()

    def drain_tx(self, timeout: float = 1.0) -> bool:
        """Everything queued onto the wire and sent by the device (before a handover:
        nothing of the software TCP's may leave after the NIC took the connection)."""
        self.flush()
        return self.miniport is None or self.miniport.flush_tx(timeout)

    def _flush_frames(self) -> None:
        if self._tx_batch:
            frames = self._tx_batch[:]
            self._tx_batch.clear()
            try:
                self.miniport.send_many(frames)
            except Exception as e:  # noqa: BLE001 -- a full ring or a gone device: counted
                self.last_error = e
                self.stats["tx_errors"] += 1
                return

    # -- timers ------------------------------------------------------------------------
    def poll(self, now=None) -> None:
        now = self.clock() if now is None else now
        if self.offload is not None:
            self.offload.poll()
        self.iface.poll(now)
        for flow in list(self.flows.values()):
            d = flow.conn.next_deadline()
            if d is not None and d <= now:
                flow.conn.poll(now)
        self.flush()

    def next_deadline(self) -> float | None:
        ds = [d for d in (f.conn.next_deadline() for f in self.flows.values()) if d is not None]
        t = self.iface.next_timer()
        if t is not None:
            ds.append(t)
        return min(ds) if ds else None

    # -- the loop ----------------------------------------------------------------------
    def step(self, timeout: float = 0.0, burst: int = 256) -> int:
        """Wait up to `timeout` (less if a timer is due sooner) for a frame from the
        miniport, feed it and everything else already received, run the timers and
        flush.  Returns the number of frames received."""
        self.flush()
        n = 0
        if self.miniport is not None:
            nd = self.next_deadline()
            wait = timeout if nd is None else max(0.0, min(timeout, nd - self.clock()))
            n = self._receive(wait, burst)
        self.poll()
        return n

    def receive_pending(self, burst: int = 4096) -> int:
        """Feed what the miniport already received (no waiting, no timers) and flush:
        before a handover, so that the software TCP exports what already arrived."""
        n = 0 if self.miniport is None else self._receive(0.0, burst)
        self.flush()
        return n

    def _receive(self, wait: float, burst: int) -> int:
        n = 0
        frame = self.miniport.recv(timeout=wait)
        # within the burst, in-order data is acknowledged once per flow per flush
        # (a stretch ACK, as Linux's GRO makes); duplicate ACKs all go out
        self._coalesce = True
        try:
            while frame is not None:
                self.iface.on_frame(frame)
                n += 1
                if n % 32 == 0:
                    self.flush()        # keep ACKs and data moving on a long burst
                if n >= burst:
                    break
                frame = self.miniport.recv(timeout=0)
        finally:
            self._coalesce = False
        return n

    def run_until(self, predicate, timeout: float | None, tick: float = 0.05) -> bool:
        """Step until predicate() is true (True) or `timeout` seconds pass (False).
        timeout None: no limit."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if end is None:
                self.step(tick)
                continue
            left = end - time.monotonic()
            if left <= 0:
                return bool(predicate())
            self.step(min(left, tick))

    # -- sockets -----------------------------------------------------------------------
    def connect(self, addr, port: int, timeout: float | None = 10.0) -> Socket:
        return Socket.connect(self, addr, port, timeout)

    def listen_socket(self, port: int, addr=None, backlog: int = 16) -> ListeningSocket:
        return ListeningSocket(self, port, addr, backlog)
