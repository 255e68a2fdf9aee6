"""The TCP engine: one connection as a pure state machine (no I/O, injected clock).

Feed it segments with `on_segment(seg, now)`, run its timers with `poll(now)`, and take
what it wants to send with `take_segments()`. Application calls: `send`, `recv`,
`shutdown_write`, `close`, `abort`. Every call that can emit a segment or arm a timer
takes the time (`now`): a write after an idle period is stamped (TSval) and timed (RTO)
from the write, not from the last event the connection saw. Its whole state lives in `const`, `cached` and
`delegated` (chimney/tcp/state.py); `export(now)` and `Connection.from_state(...)` move a
running connection between the host stack and the offload target.

Section references are to RFC 9293 (TCP) unless another RFC is named.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Callable

from .segment import ACK, FIN, PSH, RST, SYN, URG, Segment
from .state import (SYNCHRONIZED, TICKS_PER_SECOND, TcpCached, TcpConst, TcpDelegated,
                    TcpState)

S = TcpState
MOD = 1 << 32
MAX_WINDOW = 0xFFFF << 14           # RFC 7323 §2.3: the largest window, below 2^30


# -- sequence-number arithmetic (§3.4) ---------------------------------------------------
def seq_add(a: int, n: int) -> int:
    return (a + n) % MOD


def seq_sub(a: int, b: int) -> int:
    """a - b as a signed distance."""
    d = (a - b) % MOD
    return d - MOD if d >= MOD // 2 else d


def seq_lt(a: int, b: int) -> bool:
    return seq_sub(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_sub(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    return seq_sub(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    return seq_sub(a, b) >= 0


@dataclass
class Config:
    """Per-stack parameters (the spec's "global parameters"), not per-connection state."""
    local_mss: int = 1460               # what we advertise (MTU - 40 for IPv4)
    send_buffer_size: int = 256 * 1024
    recv_buffer_size: int = 256 * 1024
    rto_initial: float = 1.0            # RFC 6298 §2.1
    rto_min: float = 1.0                # RFC 6298 §2.4 (lower it in tests if you like)
    rto_max: float = 60.0               # RFC 6298 §2.5
    max_retransmits: int = 15           # "maximum retransmissions"
    delayed_ack: float = 0.2            # RFC 1122 §4.2.3.2: < 0.5 s
    sws_override: float = 0.2           # §3.8.6.2.1 override timeout: 0.1 - 1 s
    ack_frequency: int = 2              # ACK at least every second full segment
    dupack_threshold: int = 3           # RFC 5681 §3.2
    msl: float = 30.0                   # TIME-WAIT lasts 2 MSL (§3.4.2)
    fin_wait_2_timeout: float | None = None   # give up on a peer that never sends FIN
    max_ooo_segments: int = 64          # bound on the reassembly queue
    oow_ack_interval: float = 0.5       # at most one ACK per this to unacceptable pure ACKs
    offer_timestamps: bool = True
    offer_sack: bool = True
    offer_window_scaling: bool = True
    # §3.4.1: ISN generator (RFC 6528's clock-plus-hash, or random; tests inject one)
    isn: Callable[[], int] = field(default_factory=lambda: _random_isn)
    # RFC 7323 §5.4: each connection's timestamp clock starts at a random value, so
    # TSvals do not reveal the clock (uptime); tests inject one
    ts_offset: Callable[[], int] = field(default_factory=lambda: _random_isn)
    # False (the offload target): on MaxRT / max retransmits, keep-alive or FIN-WAIT-2
    # timeout, send no RST and keep the state; set `gave_up` so the NIC asks for upload
    abort_on_timeout: bool = True
    # segmentation offload (the NIC's transmit path): up to this many full-sized
    # segments of new data leave as ONE Segment whose `tso` is the segment size; it
    # stands for exactly the segments the engine would otherwise emit one by one
    # (same headers, consecutive sequence numbers, PSH only on the last piece).
    # 1: never (the host stack sends what it gets).
    max_burst: int = 1


def _random_isn() -> int:
    return random.getrandbits(32)


def _ticks(seconds: float) -> int:
    return int(round(seconds * TICKS_PER_SECOND))


def rst_for(seg: Segment) -> Segment | None:
    """The reset answering a segment that has no connection (§3.10.7.1)."""
    if seg.rst:
        return None
    if seg.has_ack:
        return Segment(seg.dst_port, seg.src_port, seq=seg.ack, flags=RST)
    return Segment(seg.dst_port, seg.src_port, seq=0,
                   ack=seq_add(seg.seq, seg.seg_len()), flags=RST | ACK)


_U32_FIELDS = ("rcv_nxt", "rcv_wnd", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "max_snd_wnd",
               "snd_wl1", "cwnd", "ssthresh", "srtt", "rttvar", "ts_recent", "ts_recent_age",
               "ts_time", "total_rt", "dup_ack_count", "window_probe_count", "ka_probe_count",
               "retransmit_count", "recover", "snd_backlog", "rcv_backlog")
# our FIN is queued in every state after the application's CLOSE
_AFTER_CLOSE = frozenset({S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.LAST_ACK, S.TIME_WAIT})


def validate_state(const: TcpConst, cached: TcpCached, d: TcpDelegated) -> str | None:
    """None when `Connection.from_state` can run this state as it is; otherwise one
    line saying what is wrong with it. For state that crossed a trust boundary (the
    offload target's INITIATE): the engine only ever exports states that pass."""
    if not isinstance(d.state, TcpState) or d.state in (S.LISTEN, S.SYN_SENT,
                                                         S.SYN_RECEIVED):
        return f"TCP state {d.state} cannot be rebuilt (the handshake is not handed over)"
    for name in _U32_FIELDS:
        v = getattr(d, name)
        if type(v) is not int or not 0 <= v < MOD:
            return f"{name} {v!r} is not a 32-bit value"
    for name in ("retransmit_delta", "ka_timeout_delta"):
        v = getattr(d, name)
        if type(v) is not int or not -1 <= v < MOD:
            return f"timer {name} {v!r} out of range (-1 = not running)"
    if not isinstance(d.send_buffer, (bytes, bytearray)) or \
            not isinstance(d.recv_buffer, (bytes, bytearray)):
        return "send and receive buffers must be bytes"
    for name in ("snd_wscale", "rcv_wscale"):
        v = getattr(const, name)
        if type(v) is not int or not 0 <= v <= 14:
            return f"{name}: window scale {v!r} out of 0..14 (RFC 7323 §2.3)"
    if type(const.remote_mss) is not int or not 1 <= const.remote_mss <= 0xFFFF:
        return f"remote MSS {const.remote_mss!r} out of 1..65535"
    for name in ("snd_wnd", "max_snd_wnd", "rcv_wnd"):
        if getattr(d, name) > MAX_WINDOW:
            return f"{name} {getattr(d, name)} exceeds the largest window {MAX_WINDOW} " \
                   "(RFC 7323 §2.3)"
    if not seq_le(d.snd_una, d.snd_nxt):
        return f"SND.NXT {d.snd_nxt} is behind SND.UNA {d.snd_una}"
    if not seq_le(d.snd_nxt, d.snd_max):
        return f"SND.MAX {d.snd_max} is behind SND.NXT {d.snd_nxt}"
    room = len(d.send_buffer) + (1 if d.fin_queued else 0)
    if seq_sub(d.snd_max, d.snd_una) > room:
        return (f"SND.MAX - SND.UNA = {seq_sub(d.snd_max, d.snd_una)} is more than the "
                f"send buffer holds ({len(d.send_buffer)} bytes"
                f"{' and the FIN' if d.fin_queued else ''})")
    if seq_gt(d.snd_wl1, d.rcv_nxt):
        return f"SND.WL1 {d.snd_wl1} is ahead of RCV.NXT {d.rcv_nxt}"
    if d.cwnd == 0:
        return "cwnd 0: nothing could ever be sent"
    if d.state in _AFTER_CLOSE and not d.fin_queued:
        return f"state {d.state} without our FIN queued"
    if cached.keepalive and (cached.ka_timeout < 1 or cached.ka_interval < 1):
        return "keep-alive timeout and interval must be at least one tick"
    return None


class Connection:
    """One TCP connection. Live state: `const`, `cached` and `d` (the delegated state);
    the timer deltas and timestamp clock in `d` are filled in by `export(now)`, the
    engine itself runs timers as absolute deadlines on the injected clock."""

    def __init__(self, const: TcpConst, cached: TcpCached | None = None,
                 delegated: TcpDelegated | None = None, config: Config | None = None):
        self.const = const
        self.cached = cached if cached is not None else TcpCached()
        self.d = delegated if delegated is not None else TcpDelegated()
        self.cfg = config if config is not None else Config()
        self._own_buffers()
        self._now = 0.0
        self._outbox: list[Segment] = []
        # timers: absolute deadlines in seconds, None = not running
        self._rtx_deadline: float | None = None     # retransmit (or 2MSL in TIME-WAIT)
        self._persist_deadline: float | None = None
        self._delack_deadline: float | None = None
        self._ka_deadline: float | None = None
        # handshake-only state (never offloaded)
        self._iss = 0
        self._passive = False
        self._syn_timed_out = False                 # RFC 6298 §5.7
        self._syn_opts: Segment | None = None       # options the peer's SYN offered
        # ACK bookkeeping
        self._ack_now = False
        self._last_oow_ack = -1e9
        self._last_challenge_ack = -1e9
        self._unacked_full_segments = 0
        self._adv_edge = 0                          # right edge we last advertised
        # RTT sample (Karn: only for segments never retransmitted), RFC 6298 §3
        self._rtt_seq: int | None = None
        self._rtt_start = 0.0
        self._ts_offset = 0                         # tsval = now_ticks + _ts_offset
        self._ts_recent_at = 0.0
        # RFC 7323 §4.3 Last.ACK.sent: the ACK field we last sent. TS.Recent is taken
        # only from a segment at or left of it, so a delayed ACK echoes the TSval of
        # the first segment it acknowledges. Not offloaded: export() sends a pending
        # delayed ACK first, so it equals RCV.NXT in every exported state.
        self._last_ack_sent = 0
        # reassembly queue: seq -> (payload, fin), disjoint blocks that neither overlap
        # nor touch; not acknowledged, not offloaded
        self._ooo: dict[int, tuple[bytes, bool]] = {}
        # RFC 2018 §4: a sequence number in each queued block, most recently received
        # first -- the order SACK blocks are reported in
        self._sack_recent: list[int] = []
        self._fin_received = False
        self._fin_acked = False
        # SACK scoreboard (RFC 2018): ranges above SND.UNA the peer holds; retransmission
        # skips them. Not offloaded: the peer repeats its SACKs.
        self._sacked: list[tuple[int, int]] = []
        self._recover_from_rto = False              # `recover` was set by an RTO (RFC 6582 §4)
        # events for the socket layer
        self.error: str | None = None
        self.reset = False
        self.established = False
        self.urgent_received = False                # spec: "must upload" on urgent data
        # statistics (not connection state): segments dropped as unacceptable
        self.dropped_paws = 0                       # RFC 7323 §5.3, an old timestamp
        self.dropped_unacceptable = 0               # §3.10.7.4 first check: out of window
        self.gave_up = False                        # timed out, cfg.abort_on_timeout False

    # ---------------------------------------------------------------- construction ----
    @classmethod
    def client(cls, local: tuple[str, int], remote: tuple[str, int],
               config: Config | None = None, cached: TcpCached | None = None) -> Connection:
        return cls(TcpConst(local_ip=local[0], local_port=local[1], remote_ip=remote[0],
                            remote_port=remote[1]), cached, None, config)

    @classmethod
    def listener(cls, local: tuple[str, int], config: Config | None = None,
                 cached: TcpCached | None = None) -> Connection:
        c = cls(TcpConst(local_ip=local[0], local_port=local[1]), cached, None, config)
        c.listen()
        return c

    @classmethod
    def from_state(cls, const: TcpConst, cached: TcpCached, delegated: TcpDelegated,
                   now: float, config: Config | None = None) -> Connection:
        """Rebuild a running connection from its three state objects (offload/upload)."""
        c = cls(copy.deepcopy(const), copy.deepcopy(cached), copy.deepcopy(delegated),
                config)
        c._repair()
        d = c.d
        c._now = now
        c._iss = seq_add(d.snd_una, -1)
        c.established = d.state in SYNCHRONIZED
        c._fin_received = d.state in (S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK, S.TIME_WAIT)
        c._fin_acked = d.state in (S.FIN_WAIT_2, S.TIME_WAIT)
        c._ts_offset = d.ts_time - _ticks(now)
        c._ts_recent_at = now - d.ts_recent_age / TICKS_PER_SECOND
        c._adv_edge = seq_add(d.rcv_nxt, d.rcv_wnd)
        c._last_ack_sent = d.rcv_nxt

        def deadline(delta: int) -> float | None:
            return None if delta < 0 else now + delta / TICKS_PER_SECOND
        if d.state is S.TIME_WAIT or not c._persist_applies():
            c._rtx_deadline = deadline(d.retransmit_delta)
        else:
            c._persist_deadline = deadline(d.retransmit_delta)
        c._ka_deadline = deadline(d.ka_timeout_delta)
        return c

    def _repair(self) -> None:
        """Bring an imported state back inside the ranges the engine relies on, so
        that even a state `validate_state` would refuse cannot make it raise or send
        bytes from outside the send buffer. States the engine exported are unchanged."""
        k, d = self.const, self.d
        k.snd_wscale = min(max(0, k.snd_wscale), 14)
        k.rcv_wscale = min(max(0, k.rcv_wscale), 14)
        for name in ("snd_wnd", "max_snd_wnd", "rcv_wnd"):
            setattr(d, name, min(max(0, getattr(d, name)), MAX_WINDOW))
        d.max_snd_wnd = max(d.max_snd_wnd, d.snd_wnd)
        # SND.UNA =< SND.NXT =< SND.MAX =< SND.UNA + the send buffer (and our FIN)
        top = seq_add(d.snd_una, len(d.send_buffer) + (1 if d.fin_queued else 0))
        if not seq_le(d.snd_una, d.snd_max) or seq_gt(d.snd_max, top):
            d.snd_max = top if seq_gt(d.snd_max, top) else d.snd_una
        if not (seq_le(d.snd_una, d.snd_nxt) and seq_le(d.snd_nxt, d.snd_max)):
            d.snd_nxt = d.snd_una
        if seq_gt(d.snd_wl1, d.rcv_nxt):
            d.snd_wl1 = d.rcv_nxt               # else no window update would ever count
        d.cwnd = max(d.cwnd, self.smss)         # RFC 5681 §3.1: the loss window at least

    def _own_buffers(self) -> None:
        """The live buffers are bytearrays: appending and dropping acknowledged or
        delivered bytes from the front are then amortised O(1), not a copy of the
        whole buffer per segment.  export() hands bytes out again."""
        d = self.d
        if type(d.send_buffer) is not bytearray:
            d.send_buffer = bytearray(d.send_buffer)
        if type(d.recv_buffer) is not bytearray:
            d.recv_buffer = bytearray(d.recv_buffer)

    def export(self, now: float) -> tuple[TcpConst, TcpCached, TcpDelegated]:
        """Copies of the three state objects, timers as deltas (Terminate / Query).
        Pending delayed ACKs are sent first (spec: Terminate)."""
        self._now = now
        if self._delack_deadline is not None:
            self._send_ack()
        d = copy.deepcopy(self.d)
        d.send_buffer, d.recv_buffer = bytes(d.send_buffer), bytes(d.recv_buffer)

        def delta(deadline: float | None) -> int:
            return -1 if deadline is None else max(0, math.ceil(
                (deadline - now) * TICKS_PER_SECOND - 1e-9))
        timer = self._persist_deadline if self._persist_deadline is not None \
            else self._rtx_deadline
        d.retransmit_delta = delta(timer)
        d.ka_timeout_delta = delta(self._ka_deadline)
        d.ts_time = self._ts_now()
        d.ts_recent_age = _ticks(now - self._ts_recent_at)
        return copy.deepcopy(self.const), copy.deepcopy(self.cached), d

    # ------------------------------------------------------------------- properties ----
    @property
    def state(self) -> TcpState:
        return self.d.state

    @property
    def readable(self) -> bool:
        return bool(self.d.recv_buffer) or self._fin_received

    @property
    def eof(self) -> bool:
        """The peer sent FIN and everything before it was read."""
        return self._fin_received and not self.d.recv_buffer

    @property
    def writable(self) -> bool:
        return self.send_space() > 0 and not self.d.fin_queued and self.d.state in (
            S.SYN_SENT, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT)

    @property
    def closed(self) -> bool:
        return self.d.state is S.CLOSED

    def send_space(self) -> int:
        return max(0, self.cfg.send_buffer_size - len(self.d.send_buffer))

    def take_segments(self) -> list[Segment]:
        out, self._outbox = self._outbox, []
        return out

    def next_deadline(self) -> float | None:
        timers = [t for t in (self._rtx_deadline, self._persist_deadline,
                              self._delack_deadline, self._ka_deadline) if t is not None]
        return min(timers) if timers else None

    # ----------------------------------------------------------------- user calls ----
    def listen(self) -> None:
        """Passive OPEN (§3.10.1)."""
        if self.d.state is not S.CLOSED:
            raise RuntimeError(f"listen in {self.d.state}")
        self.d.state = S.LISTEN
        self._passive = True

    def connect(self, now: float) -> None:
        """Active OPEN (§3.10.1): send SYN, enter SYN-SENT."""
        if self.d.state is not S.CLOSED:
            raise RuntimeError(f"connect in {self.d.state}")
        self._now = now
        self._init_send_seq()
        self.d.state = S.SYN_SENT
        self._output()

    def send(self, data: bytes, now: float) -> int:
        """SEND (§3.10.2): queue what fits in the send buffer; returns bytes taken."""
        self._now = now
        if self.d.fin_queued or self.d.state not in (
                S.SYN_SENT, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT):
            raise ConnectionError(f"connection closing ({self.d.state})")
        n = min(len(data), self.send_space())
        if n:
            self.d.send_buffer += memoryview(data)[:n]
            self._output()
        return n

    def recv(self, max_bytes: int, now: float) -> bytes:
        """RECEIVE (§3.10.3): delivered bytes; b"" at EOF or when nothing is buffered."""
        self._now = now
        buf = self.d.recv_buffer
        data = bytes(buf[:max_bytes])
        if data:
            del buf[:max_bytes]
            self._update_rcv_wnd()
            # receiver SWS avoidance (§3.8.6.2.2): announce the window once it has
            # opened by min(buffer/2, MSS)
            grown = seq_sub(seq_add(self.d.rcv_nxt, self.d.rcv_wnd), self._adv_edge)
            if grown >= min(self.cfg.recv_buffer_size // 2, self.cfg.local_mss) and \
                    self.d.state in SYNCHRONIZED:
                self._ack_now = True
                self._output()
        return data

    def shutdown_write(self, now: float) -> None:
        """CLOSE (§3.10.4): FIN after all queued data."""
        self._now = now
        st = self.d.state
        if st in (S.LISTEN, S.SYN_SENT):
            self._enter_closed()
        elif st in (S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT):
            self.d.fin_queued = True
            if st is S.ESTABLISHED:
                self.d.state = S.FIN_WAIT_1
            elif st is S.CLOSE_WAIT:
                self.d.state = S.LAST_ACK
            # SYN-RECEIVED: FIN-WAIT-1 once the handshake completes
            self._output()
        # already closing: nothing to do

    close = shutdown_write

    def abort(self, now: float) -> None:
        """ABORT (§3.10.5): RST <SEQ=SND.NXT> in synchronized states, then CLOSED."""
        self._now = now
        if self.d.state in (S.SYN_RECEIVED, S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2,
                            S.CLOSE_WAIT):
            self._outbox.append(Segment(self.const.local_port, self.const.remote_port,
                                        seq=self.d.snd_nxt, flags=RST))
        self.error = self.error or "aborted"
        self._enter_closed()

    # ---------------------------------------------------------------------- timers ----
    def poll(self, now: float) -> None:
        """Run the timers that expired by `now`."""
        self._now = now
        d = self.d
        if self._rtx_deadline is not None and now >= self._rtx_deadline:
            self._rtx_deadline = None
            if d.state is S.TIME_WAIT:
                self._enter_closed()             # 2 MSL elapsed (§3.4.2)
                return
            if d.state is S.FIN_WAIT_2:          # the FIN-WAIT-2 timer shares the slot
                self.error = "FIN-WAIT-2 timeout"
                if not self.cfg.abort_on_timeout:
                    self._give_up()
                    return
                self._enter_closed()
                return
            self._on_rto()
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._persist_deadline = None
            self._on_persist()
        if self._ka_deadline is not None and now >= self._ka_deadline:
            self._ka_deadline = None
            self._on_keepalive()
        if self._delack_deadline is not None and now >= self._delack_deadline:
            self._ack_now = True
        self._output()

    def _give_up(self) -> None:
        """Timed out with abort_on_timeout off: stop the timers, keep the state."""
        self.gave_up = True
        self._reset_timers()

    def _rto(self) -> float:
        """RFC 6298 §2: RTO = SRTT + max(G, 4*RTTVAR), clamped; doubled per backoff."""
        d = self.d
        if d.srtt == 0 and d.rttvar == 0:
            base = self.cfg.rto_initial
            if self._syn_timed_out and d.state not in (S.SYN_SENT, S.SYN_RECEIVED):
                base = max(base, 3.0)              # §5.7: 3 s once data flows
        else:
            base = (d.srtt / 8 + max(1, d.rttvar)) / TICKS_PER_SECOND
        base = max(self.cfg.rto_min, base)
        return self._backoff(base, d.retransmit_count)

    def _backoff(self, base: float, count: int) -> float:
        """base doubled `count` times, at most RTO max (RFC 6298 §5.5). The exponent is
        bounded: counts grow without limit when the offload target keeps a connection
        it gave up on, or a peer answers probe after probe."""
        return min(self.cfg.rto_max, base * 2.0 ** min(max(0, count), 64))

    def _rtt_sample(self, r: float) -> None:
        """RFC 6298 §2.2/2.3 with alpha 1/8, beta 1/4, in x8 / x4 fixed point."""
        d = self.d
        rt = max(1, _ticks(r))
        if d.srtt == 0 and d.rttvar == 0:
            d.srtt = rt * 8
            d.rttvar = rt * 2                    # RTTVAR = R/2, x4
        else:
            delta = rt - d.srtt // 8
            d.srtt += delta
            d.rttvar += abs(delta) - d.rttvar // 4

    def _on_rto(self) -> None:
        d = self.d
        elapsed = self._rto()
        # RFC 6298 §5.5: back off; MaxRT / maximum retransmissions bound it
        d.total_rt += _ticks(elapsed)
        d.retransmit_count += 1
        if d.retransmit_count > self.cfg.max_retransmits or (
                self.cached.max_rt > 0 and d.total_rt >= self.cached.max_rt):
            self.error = "timeout"
            if not self.cfg.abort_on_timeout:
                self._give_up()
                return
            self.abort(self._now)
            return
        if d.state in SYNCHRONIZED:
            # RFC 5681 §3.1 eq. 4: ssthresh = max(FlightSize/2, 2*SMSS); cwnd = 1 SMSS
            d.ssthresh = max(self._flight() // 2, 2 * self.smss)
            d.cwnd = self.smss
            d.in_recovery = False
            d.recover = d.snd_max                 # RFC 6582 §3.2 step 1 after RTO
            self._recover_from_rto = True
            d.dup_ack_count = 0
        else:
            self._syn_timed_out = True
        self._rtt_seq = None                      # Karn
        self._sacked.clear()                      # RFC 2018 §8: forget SACKs after RTO
        d.snd_nxt = d.snd_una                     # go back N: resend from SND.UNA
        self._output(force_timer=True)

    def _on_persist(self) -> None:
        """The persist slot's two timers: with a window too small to use, the sender
        SWS override (§3.8.6.2.1: send what the window allows); with a zero window,
        a probe (§3.8.6.1: one byte beyond the window, backed off)."""
        d = self.d
        if not self._persist_applies():
            return
        if d.snd_wnd > 0:
            self._output_data(sws_override=True)
            return
        d.window_probe_count += 1
        off = seq_sub(d.snd_nxt, d.snd_una)
        probe = d.send_buffer[off:off + 1]
        self._emit(d.snd_nxt, ACK, probe)
        d.snd_max = self._max_seq(d.snd_max, seq_add(d.snd_nxt, 1))
        backoff = self._backoff(self._rto(), d.window_probe_count)
        self._persist_deadline = self._now + backoff

    def _on_keepalive(self) -> None:
        """RFC 1122 §4.2.3.6: probe with SEG.SEQ = SND.NXT-1; give up after N probes."""
        d = self.d
        if not self.cached.keepalive or d.state not in SYNCHRONIZED:
            return
        if d.ka_probe_count >= self.cached.ka_probe_count:
            self.error = "keep-alive timeout"
            if not self.cfg.abort_on_timeout:
                self._give_up()
                return
            self.abort(self._now)
            return
        d.ka_probe_count += 1
        self._emit(seq_add(d.snd_una, -1), ACK, b"")
        # at least one tick: zero times (an Update can set them) must not fire again
        # at the same instant
        self._ka_deadline = self._now + max(1, self.cached.ka_interval) / TICKS_PER_SECOND

    def probe_window(self, now: float) -> bool:
        """Elicit an ACK carrying the peer's current window, now: a keep-alive-style
        segment, SEG.SEQ = SND.UNA-1 (RFC 9293 §3.8.4), with the one garbage octet RFC 1122
        §4.2.3.6 allows.  The octet is there because a receiver holds it already and
        answers a duplicate octet with an immediate ACK, while it may rate-limit its
        answers to zero-length out-of-window segments (Linux and this engine: one per
        half second).  Only with everything acknowledged (the window the answer reports
        is then the peer's free receive space); True if sent."""
        self._now = now
        d = self.d
        if d.state not in (S.ESTABLISHED, S.CLOSE_WAIT) or d.snd_una != d.snd_max:
            return False
        self._emit(seq_add(d.snd_una, -1), ACK, b"\0")
        return True

    def _restart_keepalive(self) -> None:
        if self.cached.keepalive and self.d.state in SYNCHRONIZED:
            self.d.ka_probe_count = 0
            self._ka_deadline = self._now + max(1, self.cached.ka_timeout) / TICKS_PER_SECOND

    # -------------------------------------------------------------- segment arrival ----
    def on_segment(self, seg: Segment, now: float, remote_ip: str | None = None) -> None:
        """SEGMENT ARRIVES (§3.10.7)."""
        self._now = now
        st = self.d.state
        if st is S.ESTABLISHED and self._predict(seg.seq, seg.ack, seg.flags, seg.window,
                                                  seg.tsval, seg.payload, seg.sack_blocks):
            self._output()
            return
        if st is S.CLOSED:
            r = rst_for(seg)
            if r:
                self._outbox.append(r)
        elif st is S.LISTEN:
            self._on_listen(seg, remote_ip)
        elif st is S.SYN_SENT:
            self._on_syn_sent(seg)
        else:
            self._on_synchronized(seg)
        self._output()

    def on_fast(self, seq: int, ack: int, flags: int, window: int, tsval: int | None,
                payload, now: float) -> bool:
        """on_segment for a segment given as its header fields, with no options but
        timestamps (tsval None: none): when header prediction takes it, exactly what
        on_segment does and True; otherwise False and nothing changed -- hand
        on_segment the Segment.  Spares the device a Segment per segment."""
        if self.d.state is not S.ESTABLISHED:
            return False
        self._now = now
        if not self._predict(seq, ack, flags, window, tsval, payload, None):
            return False
        self._output()
        return True

    def _predicted(self, seg: Segment) -> bool:
        return self._predict(seg.seq, seg.ack, seg.flags, seg.window, seg.tsval,
                             seg.payload, seg.sack_blocks)

    def _predict(self, seq: int, ack: int, flags: int, window: int, tsval: int | None,
                 payload, sack_blocks) -> bool:
        """Header prediction (as BSD's tcp_input): in ESTABLISHED, with nothing
        queued out of order, no SACK scoreboard and no recovery, the two common
        segments -- in-order data that acknowledges nothing new and changes no
        window, or a pure ACK that acknowledges new data -- get exactly what the
        full §3.10.7.4 walk would do to them, without the walk.  False: take the
        full walk (nothing was changed)."""
        d = self.d
        if ((flags & (FIN | SYN | RST | ACK | URG)) != ACK or seq != d.rcv_nxt or self._ooo
                or self._sacked or sack_blocks or d.in_recovery):
            return False
        c = self.const
        if c.timestamps and (tsval is None or seq_lt(tsval, d.ts_recent)):
            return False
        wnd = window << c.snd_wscale
        n = len(payload)
        if n:
            if ack != d.snd_una or wnd != d.snd_wnd or n > d.rcv_wnd:
                return False
        elif not (seq_gt(ack, d.snd_una) and seq_le(ack, d.snd_max)) or (d.snd_wnd == 0 and wnd > 0):
            return False
        if not (seq_lt(d.snd_wl1, seq) or d.snd_wl1 == seq):
            return False
        # what the walk does: ACK field (fifth), window update, timestamp, text (seventh)
        self._restart_keepalive()
        if not n:
            acked = seq_sub(ack, d.snd_una)
            self._ack_advance(ack)
            self._congestion_on_ack(ack, acked)
        d.snd_wnd = wnd
        if wnd > d.max_snd_wnd:
            d.max_snd_wnd = wnd
        d.snd_wl1 = seq
        if c.timestamps and seq_le(seq, self._last_ack_sent):   # RFC 7323 §4.3
            d.ts_recent = tsval
            self._ts_recent_at = self._now
        if n:
            self._accept(payload, False)
            if not self._ack_now:
                if n >= self.smss_rcv:
                    self._unacked_full_segments += 1
                if self._unacked_full_segments >= self.cfg.ack_frequency:
                    self._ack_now = True
                elif self._delack_deadline is None:
                    self._delack_deadline = self._now + self.cfg.delayed_ack
        return True

    def _on_listen(self, seg: Segment, remote_ip: str | None) -> None:
        """§3.10.7.2."""
        if seg.rst:
            return
        if seg.has_ack:
            self._outbox.append(Segment(self.const.local_port, seg.src_port,
                                        seq=seg.ack, flags=RST))
            return
        if not seg.syn:
            return
        self.const.remote_port = seg.src_port
        if remote_ip is not None:
            self.const.remote_ip = remote_ip
        self._init_send_seq()
        self.d.rcv_nxt = seq_add(seg.seq, 1)
        self._negotiate(seg)
        self.d.snd_wnd = seg.window                # never scaled in a SYN (RFC 7323 §2.2)
        self.d.max_snd_wnd = self.d.snd_wnd
        self.d.snd_wl1 = seg.seq
        self._take_timestamp(seg)
        self.d.state = S.SYN_RECEIVED

    def _on_syn_sent(self, seg: Segment) -> None:
        """§3.10.7.3."""
        d = self.d
        if seg.has_ack and (seq_le(seg.ack, self._iss) or seq_gt(seg.ack, d.snd_max)):
            if not seg.rst:
                self._outbox.append(Segment(self.const.local_port, self.const.remote_port,
                                            seq=seg.ack, flags=RST))
            return
        if seg.rst:
            if seg.has_ack:                        # acceptable ACK: refused
                self.reset = True
                self.error = "connection refused"
                self._enter_closed()
            return
        if not seg.syn:
            return
        d.rcv_nxt = seq_add(seg.seq, 1)
        self._negotiate(seg)
        self._take_timestamp(seg)
        d.snd_wnd = seg.window
        d.max_snd_wnd = d.snd_wnd
        d.snd_wl1 = seg.seq
        if seg.has_ack:
            self._ack_advance(seg.ack)
            self._enter_established()
            self._ack_now = True
        else:                                      # simultaneous open
            d.state = S.SYN_RECEIVED
            d.snd_nxt = self._iss                  # send SYN,ACK for the same ISS
            self._rtx_deadline = None

    def _on_synchronized(self, seg: Segment) -> None:
        """§3.10.7.4, SYN-RECEIVED and the synchronized states."""
        d = self.d
        if (seg.syn and not seg.has_ack and not seg.rst and d.state is S.SYN_RECEIVED
                and seg.seq == seq_add(d.rcv_nxt, -1)):
            self._output_syn(retransmit=True)      # the peer repeated its SYN: resend ours
            return
        # PAWS (RFC 7323 §5.3): drop old duplicates by their timestamp -- except a
        # reordered duplicate ACK, which says nothing new but counts for fast
        # retransmit (as Linux's tcp_disordered_ack)
        if (self.const.timestamps and seg.tsval is not None and not seg.rst
                and seq_lt(seg.tsval, d.ts_recent)
                and self._now - self._ts_recent_at < 24 * 86400
                and not self._disordered_ack(seg)):
            self.dropped_paws += 1
            self._ack_unacceptable(seg)
            return
        # first: sequence number acceptable? (§3.10.7.4, the four cases)
        if not self._acceptable(seg):
            self.dropped_unacceptable += 1
            if not seg.rst:
                self._ack_unacceptable(seg)        # ACK and drop
            if (d.state is S.TIME_WAIT and seg.fin and not seg.rst
                    and seq_add(seg.seq, seg.seg_len()) == d.rcv_nxt):
                # the peer's FIN again (§3.10.7.4 TIME-WAIT): restart 2 MSL -- for
                # that exact retransmission only, not for any FIN out of the window
                self._rtx_deadline = self._now + 2 * self.cfg.msl
            # "If the RCV.WND is zero, no segments will be acceptable, but special
            # allowance should be made to accept valid ACKs": take the ACK field only
            # (RFC 5961 range-checked; its window only if in sequence, _process_ack)
            if (d.rcv_wnd == 0 and seg.has_ack and not seg.rst and not seg.syn
                    and d.state in SYNCHRONIZED):
                self._process_ack(seg)
            return
        # second: RST (RFC 5961 §3.2: exact match resets, otherwise challenge ACK)
        if seg.rst:
            if seg.seq == d.rcv_nxt:
                self._on_reset()
            else:
                self._challenge_ack()
            return
        # fourth: SYN in a synchronized state -> challenge ACK (RFC 5961 §4.2)
        if seg.syn:
            self._challenge_ack()
            return
        # fifth: the ACK field
        if not seg.has_ack:
            return
        old_ack = seq_lt(seg.ack, d.snd_una)
        if d.state is S.SYN_RECEIVED:
            if seq_lt(d.snd_una, seg.ack) and seq_le(seg.ack, d.snd_max):
                self._ack_advance(seg.ack)
                if seq_le(seg.seq, d.rcv_nxt):     # in sequence: see _process_ack
                    d.snd_wnd = seg.window << self.const.snd_wscale
                    d.max_snd_wnd = max(d.max_snd_wnd, d.snd_wnd)
                    d.snd_wl1 = seg.seq
                self._enter_established()
                if d.fin_queued:
                    d.state = S.FIN_WAIT_1
            else:
                self._outbox.append(Segment(self.const.local_port, self.const.remote_port,
                                            seq=seg.ack, flags=RST))
                return
        elif not self._process_ack(seg):
            return
        self._restart_keepalive()                  # an acceptable ACK: the peer is there
        # RFC 7323 §4.3 -- and never from an old ACK (SEG.ACK < SND.UNA): it says
        # nothing new, and a TSval taken from it would make PAWS drop the real segments
        if seg.tsval is not None and self.const.timestamps and not old_ack and \
                seq_le(seg.seq, self._last_ack_sent) and seq_ge(seg.tsval, d.ts_recent):
            self._take_timestamp(seg)
        # state-specific ACK consequences (§3.10.7.4, fifth, by state)
        fin_acked = self._fin_acked
        if d.state is S.FIN_WAIT_1 and fin_acked:
            d.state = S.FIN_WAIT_2
            if self.cfg.fin_wait_2_timeout is not None:
                self._rtx_deadline = self._now + self.cfg.fin_wait_2_timeout
        elif d.state is S.CLOSING and fin_acked:
            self._enter_time_wait()
            return
        elif d.state is S.LAST_ACK and fin_acked:
            self._enter_closed()
            return
        elif d.state is S.TIME_WAIT:
            if seg.fin:
                self._ack_now = True
                self._rtx_deadline = self._now + 2 * self.cfg.msl
            return
        # sixth: URG. The host never sends urgent data and the engine does not deliver
        # it out of band; it only flags it (the offload target must then upload).
        if seg.flags & URG:
            self.urgent_received = True
        # seventh: segment text, eighth: FIN
        if d.state in (S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2):
            self._receive_data(seg)
        elif seg.fin and d.state in (S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK):
            self._ack_now = True                   # a retransmitted FIN: ACK it again

    def _disordered_ack(self, seg: Segment) -> bool:
        d = self.d
        return (seg.seg_len() == 0 and seg.has_ack and not seg.syn and seg.seq == d.rcv_nxt
                and seg.ack == d.snd_una and d.snd_una != d.snd_max
                and (seg.window << self.const.snd_wscale) == d.snd_wnd)

    def _ack_unacceptable(self, seg: Segment) -> None:
        """ACK an unacceptable segment -- but answer pure ACKs at most once per
        oow_ack_interval, or two peers that find each other's ACKs unacceptable would
        trade ACKs forever (Linux: tcp_invalid_ratelimit; RFC 5961 §7 in spirit)."""
        if seg.seg_len() == 0:
            if self._now - self._last_oow_ack < self.cfg.oow_ack_interval:
                return
            self._last_oow_ack = self._now
        self._ack_now = True

    def _challenge_ack(self) -> None:
        """RFC 5961 §3.2 / §4.2 challenge ACK, at most one per oow_ack_interval
        (§7: a storm of in-window RSTs or SYNs must not become a storm of ACKs)."""
        if self._now - self._last_challenge_ack >= self.cfg.oow_ack_interval:
            self._last_challenge_ack = self._now
            self._ack_now = True

    def _acceptable(self, seg: Segment) -> bool:
        """§3.10.7.4 first check, the table of four cases."""
        d = self.d
        ln, wnd = seg.seg_len(), d.rcv_wnd
        if ln == 0:
            if wnd == 0:
                return seg.seq == d.rcv_nxt
            return seq_le(d.rcv_nxt, seg.seq) and seq_lt(seg.seq, seq_add(d.rcv_nxt, wnd))
        if wnd == 0:
            return False
        end = seq_add(seg.seq, ln - 1)
        right = seq_add(d.rcv_nxt, wnd)
        return ((seq_le(d.rcv_nxt, seg.seq) and seq_lt(seg.seq, right)) or
                (seq_le(d.rcv_nxt, end) and seq_lt(end, right)))

    def _on_reset(self) -> None:
        """§3.10.7.4 second check, by state."""
        if self.d.state is S.SYN_RECEIVED and self._passive:
            # back to LISTEN (the socket layer keeps listening)
            self.d = TcpDelegated(state=S.LISTEN)
            self._own_buffers()
            self._reset_timers()
            return
        self.reset = True
        if self.d.state not in (S.CLOSING, S.LAST_ACK, S.TIME_WAIT):
            self.error = "connection refused" if self.d.state is S.SYN_RECEIVED \
                else "connection reset"
        self._enter_closed()

    def _process_ack(self, seg: Segment) -> bool:
        """ACK processing in ESTABLISHED and later; False = drop the segment."""
        d = self.d
        ack = seg.ack
        # RFC 5961 §5.2: acceptable iff SND.UNA - MAX.SND.WND =< SEG.ACK =< SND.MAX
        if seq_gt(ack, d.snd_max) or seq_lt(ack, seq_add(d.snd_una, -d.max_snd_wnd)):
            self._ack_now = True
            return False
        wnd = seg.window << self.const.snd_wscale
        if seq_gt(ack, d.snd_una):
            acked = seq_sub(ack, d.snd_una)
            self._ack_advance(ack)
            self._congestion_on_ack(ack, acked)
            self._update_scoreboard(seg.sack_blocks if self.const.sack else [])
        else:
            held = self._sacked_bytes()
            self._update_scoreboard(seg.sack_blocks if self.const.sack else [])
            if (ack == d.snd_una and not seg.syn and not seg.fin and d.snd_una != d.snd_max
                    and d.snd_wnd > 0
                    and ((not seg.payload and wnd == d.snd_wnd) or self._sacked_bytes() > held)):
                # RFC 5681 §2 "duplicate ACK" -- or RFC 6675 §2's DupAck: one that SACKs
                # data not SACKed before, whatever its window (receivers move it). Not
                # with the window shut: those ACKs answer window probes, not a loss, and
                # a fast retransmit would send a segment into a zero window.
                self._on_dup_ack()
        # window update (§3.10.7.4): SND.WL1 < SEG.SEQ, or equal with SND.WL2 =< SEG.ACK
        # (always true here; see state.py) -- from a segment in sequence only: one right
        # of RCV.NXT is acceptable (its text is queued), but the rule orders windows by
        # SEG.SEQ, so a (forged) segment ahead would move SND.WL1 beyond every real
        # segment and freeze SND.WND. SND.WL1 =< RCV.NXT always holds.
        if seq_ge(ack, d.snd_una) and seq_le(seg.seq, d.rcv_nxt) and (
                seq_lt(d.snd_wl1, seg.seq) or d.snd_wl1 == seg.seq):
            opened = d.snd_wnd == 0 and wnd > 0
            d.snd_wnd = wnd
            d.max_snd_wnd = max(d.max_snd_wnd, wnd)
            d.snd_wl1 = seg.seq
            if opened:
                self._persist_deadline = None
                d.window_probe_count = 0
                d.snd_nxt = self._max_seq(d.snd_nxt, d.snd_una)
        return True

    def _update_scoreboard(self, blocks: list[tuple[int, int]]) -> None:
        """Merge the peer's SACK blocks (RFC 2018 §4) into the scoreboard, keeping only
        what lies in (SND.UNA, SND.MAX]."""
        d = self.d
        ranges = []
        for left, right in self._sacked + list(blocks):
            if seq_lt(left, d.snd_una):
                left = d.snd_una
            if seq_gt(right, d.snd_max):
                right = d.snd_max
            if seq_lt(left, right):
                ranges.append((left, right))
        ranges.sort(key=lambda r: seq_sub(r[0], d.snd_una))
        merged: list[tuple[int, int]] = []
        for left, right in ranges:
            if merged and seq_le(left, merged[-1][1]):
                merged[-1] = (merged[-1][0], self._max_seq(merged[-1][1], right))
            else:
                merged.append((left, right))
        self._sacked = merged

    def _sacked_bytes(self) -> int:
        return sum(seq_sub(r, le) for le, r in self._sacked)

    def _ack_advance(self, ack: int) -> None:
        """Drop acknowledged bytes (and SYN / FIN octets) and run the RTO rules."""
        d = self.d
        acked = seq_sub(ack, d.snd_una)
        syn_octet = 1 if d.snd_una == self._iss and d.state in (S.SYN_SENT, S.SYN_RECEIVED) \
            else 0
        data_acked = min(len(d.send_buffer), acked - syn_octet)
        if d.fin_queued and acked - syn_octet > len(d.send_buffer):
            self._fin_acked = True                 # the ACK covers our FIN octet
        if data_acked > 0:
            del d.send_buffer[:data_acked]
        d.snd_una = ack
        if seq_lt(d.snd_nxt, ack):
            d.snd_nxt = ack
        # RFC 6298 §3 (Karn): time only segments sent once
        if self._rtt_seq is not None and seq_ge(ack, self._rtt_seq):
            self._rtt_sample(self._now - self._rtt_start)
            self._rtt_seq = None
        d.retransmit_count = 0
        d.total_rt = 0
        # RFC 6298 §5.2/5.3: stop the timer when all is acked, otherwise restart it
        self._rtx_deadline = None if ack == d.snd_max else self._now + self._rto()

    def _congestion_on_ack(self, ack: int, acked: int) -> None:
        d, smss = self.d, self.smss
        if d.in_recovery:
            if seq_ge(ack, d.recover):
                # RFC 6582 §3.2 step 3, full ACK: deflate to min(ssthresh, flight+SMSS)
                d.cwnd = min(d.ssthresh, max(self._flight(), smss) + smss)
                d.in_recovery = False
                d.dup_ack_count = 0
            else:
                # step 3, partial ACK: resend the first unacked segment, deflate by the
                # amount acked, add back one SMSS if that was at least SMSS
                self._retransmit_first()
                d.cwnd = max(smss, d.cwnd - acked + (smss if acked >= smss else 0))
            return
        d.dup_ack_count = 0
        if d.cwnd < d.ssthresh:
            d.cwnd += min(acked, smss)             # RFC 5681 §3.1 slow start
        else:
            d.cwnd += max(1, smss * smss // max(1, d.cwnd))  # congestion avoidance, eq. 3

    def _on_dup_ack(self) -> None:
        d, smss = self.d, self.smss
        d.dup_ack_count += 1
        if d.in_recovery:
            d.cwnd += smss                         # RFC 6582 §3.2 step 4: inflate
        elif ((d.dup_ack_count == self.cfg.dupack_threshold
               # RFC 6675 §4 IsLost: more than DupThresh-1 segments' worth SACKed above
               # SND.UNA is a loss too, however few dup ACKs made it here
               or self._sacked_bytes() > (self.cfg.dupack_threshold - 1) * smss)
              and (seq_gt(d.snd_una, d.recover)
                   # RFC 6582 §4.1: the careful variant guards against the dup ACKs an
                   # RTO's go-back-N provokes; after a fast recovery's full ACK (SND.UNA
                   # at `recover` exactly) a new loss may start a new one
                   or (d.snd_una == d.recover and not self._recover_from_rto))):
            # RFC 6582 §3.2 step 2 / RFC 5681 §3.2 steps 2-4: fast retransmit
            d.ssthresh = max(self._flight() // 2, 2 * smss)
            d.recover = d.snd_max
            d.in_recovery = True
            self._recover_from_rto = False
            self._retransmit_first()
            d.cwnd = d.ssthresh + 3 * smss

    def _retransmit_first(self) -> None:
        d = self.d
        n = min(self.smss, len(d.send_buffer))
        flags = ACK
        if n == len(d.send_buffer) and d.fin_queued and d.snd_max != d.snd_una:
            flags |= FIN if seq_gt(d.snd_max, self._fin_seq()) else 0
        self._rtt_seq = None                       # Karn
        self._emit(d.snd_una, flags, d.send_buffer[:n])
        self._rtx_deadline = self._now + self._rto()

    def _receive_data(self, seg: Segment) -> None:
        """§3.10.7.4 seventh (text) and eighth (FIN), with a bounded reassembly queue."""
        d = self.d
        payload, fin, seq = seg.payload, seg.fin, seg.seq
        # trim what we already have on the left and what exceeds the window on the right
        if seq_lt(seq, d.rcv_nxt):
            cut = seq_sub(d.rcv_nxt, seq)
            payload, seq = payload[cut:], d.rcv_nxt
        room = seq_sub(seq_add(d.rcv_nxt, d.rcv_wnd), seq)     # up to the right edge
        if len(payload) > room:
            payload, fin = payload[:max(0, room)], False
        if seq != d.rcv_nxt:
            if payload or fin:
                self._queue_out_of_order(seq, payload, fin)
            self._ack_now = True                   # out of order: ACK at once (RFC 5681 §4.2)
            return
        filled_gap = bool(self._ooo)
        self._accept(payload, fin)
        while self._ooo:                           # drain what is now in order
            nxt = None
            for s in list(self._ooo):
                if seq_le(s, d.rcv_nxt):
                    nxt = s
                    break
            if nxt is None:
                break
            data, f = self._ooo.pop(nxt)
            cut = seq_sub(d.rcv_nxt, nxt)
            if cut <= len(data):
                rest = data[cut:cut + d.rcv_wnd]
                self._accept(rest, f and len(rest) == len(data) - cut)
        if filled_gap:
            self._ack_now = True
        if payload and not self._ack_now:
            # delayed ACK (RFC 1122 §4.2.3.2 / RFC 5681 §4.2): every second full segment
            if len(payload) >= self.smss_rcv:
                self._unacked_full_segments += 1
            if self._unacked_full_segments >= self.cfg.ack_frequency:
                self._ack_now = True
            elif self._delack_deadline is None:
                self._delack_deadline = self._now + self.cfg.delayed_ack

    def _queue_out_of_order(self, seq: int, payload: bytes, fin: bool) -> None:
        """Queue an out-of-order piece (inside the window, right of RCV.NXT), merged
        with every block it overlaps or touches. Queued bytes are never given up: the
        peer may have seen them SACKed and will not send them again, so a shorter
        duplicate adds nothing. A new block only while the queue has room."""
        d = self.d
        lo = seq_sub(seq, d.rcv_nxt)                # offsets from RCV.NXT
        hi = lo + len(payload)
        touching = []
        for s, (data, f) in self._ooo.items():
            so = seq_sub(s, d.rcv_nxt)
            if so <= hi and so + len(data) >= lo:
                touching.append((s, so, data, f))
        if not touching and len(self._ooo) >= self.cfg.max_ooo_segments:
            return
        new_lo = min([lo] + [so for _, so, _, _ in touching])
        new_hi = max([hi] + [so + len(data) for _, so, data, _ in touching])
        block = bytearray(new_hi - new_lo)
        block[lo - new_lo:hi - new_lo] = payload
        new_fin = fin and hi == new_hi
        for s, so, data, f in touching:
            del self._ooo[s]
            block[so - new_lo:so - new_lo + len(data)] = data     # queued bytes win
            new_fin = new_fin or (f and so + len(data) == new_hi)
        start = seq_add(d.rcv_nxt, new_lo)
        self._ooo[start] = (bytes(block), new_fin)
        # this block is now the most recent one (one entry per live block)
        end = seq_add(start, len(block) + 1)
        self._sack_recent = [seq] + [x for x in self._sack_recent
                                     if seq_gt(x, d.rcv_nxt) and not (
                                         seq_le(start, x) and seq_lt(x, end))]

    def _accept(self, payload: bytes, fin: bool) -> None:
        d = self.d
        if self._fin_received:
            return
        if payload:
            d.recv_buffer += payload
            d.rcv_nxt = seq_add(d.rcv_nxt, len(payload))
            self._update_rcv_wnd()
        if fin:
            d.rcv_nxt = seq_add(d.rcv_nxt, 1)
            self._fin_received = True
            self._ack_now = True
            self._ooo.clear()
            self._sack_recent.clear()
            if d.state is S.ESTABLISHED:
                d.state = S.CLOSE_WAIT
            elif d.state is S.FIN_WAIT_1:
                if self._fin_acked:
                    self._enter_time_wait()
                else:
                    d.state = S.CLOSING
            elif d.state is S.FIN_WAIT_2:
                self._enter_time_wait()

    # --------------------------------------------------------------------- output ----
    @property
    def smss(self) -> int:
        """Effective send MSS (§3.7.1): peer's MSS, less the timestamp option."""
        m = min(self.const.remote_mss, self.cfg.local_mss)
        return max(1, m - (12 if self.const.timestamps else 0))

    @property
    def smss_rcv(self) -> int:
        return max(1, self.cfg.local_mss - (12 if self.const.timestamps else 0))

    def _flight(self) -> int:
        return seq_sub(self.d.snd_max, self.d.snd_una)

    def _unsent(self) -> int:
        return len(self.d.send_buffer) - seq_sub(self.d.snd_nxt, self.d.snd_una)

    def _fin_seq(self) -> int:
        """Sequence number of our FIN (once queued: right after the last data byte)."""
        return seq_add(self.d.snd_una, len(self.d.send_buffer) - (1 if self._fin_acked else 0))

    def _persist_applies(self) -> bool:
        """Data waits, nothing is in flight, and the window is zero (persist, §3.8.6.1)
        or too small to send into (sender SWS avoidance holds it, §3.8.6.2.1): no ACK
        will come to move things on, so a timer must."""
        d = self.d
        unsent = self._unsent()
        return (d.snd_nxt == d.snd_una and unsent > 0 and d.snd_wnd < min(unsent, self.smss)
                and d.state in (S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING,
                                S.LAST_ACK))

    @staticmethod
    def _max_seq(a: int, b: int) -> int:
        return b if seq_gt(b, a) else a

    def _output(self, force_timer: bool = False) -> None:
        """Send what the windows allow, then a pure ACK if one is due."""
        d = self.d
        sent = False
        if d.state in (S.SYN_SENT, S.SYN_RECEIVED):
            if d.snd_nxt == self._iss:
                self._output_syn(retransmit=force_timer)
                sent = True
        elif d.state in (S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK):
            sent = self._output_data()
        if self._ack_now and not sent and d.state in SYNCHRONIZED | {S.SYN_RECEIVED}:
            self._send_ack()
        self._ack_now = False

    def _output_syn(self, retransmit: bool) -> None:
        d, cfg = self.d, self.cfg
        synack = d.state is S.SYN_RECEIVED
        seg = self._segment(self._iss, SYN | (ACK if synack else 0), b"")
        seg.window = min(d.rcv_wnd, 0xFFFF)       # never scaled in a SYN (RFC 7323 §2.2)
        seg.mss = cfg.local_mss
        peer = self._syn_opts
        if cfg.offer_window_scaling and (not synack or (peer and peer.wscale is not None)):
            seg.wscale = self._our_wscale()
        if cfg.offer_sack and (not synack or (peer and peer.sack_permitted)):
            seg.sack_permitted = True
        if cfg.offer_timestamps and (not synack or (peer and peer.tsval is not None)):
            seg.tsval = self._ts_now()
            seg.tsecr = d.ts_recent if synack else 0
        else:
            seg.tsval = seg.tsecr = None
        seg.sack_blocks = []
        self._push(seg)
        d.snd_nxt = seq_add(self._iss, 1)
        d.snd_max = self._max_seq(d.snd_max, d.snd_nxt)
        if retransmit:
            self._rtt_seq = None                   # Karn: the ACK is ambiguous now
        elif self._rtt_seq is None and d.retransmit_count == 0:
            self._rtt_seq, self._rtt_start = d.snd_nxt, self._now
        self._rtx_deadline = self._now + self._rto()

    def _output_data(self, sws_override: bool = False) -> bool:
        d = self.d
        if (d.snd_nxt == d.snd_max and not d.fin_queued
                and len(d.send_buffer) == seq_sub(d.snd_nxt, d.snd_una)):
            self._persist_deadline = None   # nothing waits (say, the probe byte was the last)
            return False        # nothing unsent, nothing to resend, no FIN: the loop would send nothing
        smss = self.smss
        burst = self.cfg.max_burst
        sent = False
        while True:
            retransmitting = seq_lt(d.snd_nxt, d.snd_max)
            hole = None                               # room before the next SACKed range
            for left, right in self._sacked if retransmitting else ():
                if seq_le(left, d.snd_nxt) and seq_lt(d.snd_nxt, right):
                    hole = 0
                    d.snd_nxt = right                 # the peer has it: skip (RFC 2018)
                    break
                if seq_gt(left, d.snd_nxt):
                    hole = seq_sub(left, d.snd_nxt)
                    break
            if hole == 0:
                continue
            off = seq_sub(d.snd_nxt, d.snd_una)
            avail = max(0, len(d.send_buffer) - off)     # unsent data bytes
            # usable window: min(SND.WND, CWND) less what is in flight (RFC 5681 §3.1);
            # RFC 3042 limited transmit: on the first two dup ACKs, up to that many
            # new segments beyond cwnd
            cwnd = d.cwnd
            if d.dup_ack_count and not d.in_recovery and not retransmitting:
                cwnd += min(d.dup_ack_count, 2) * smss
            wnd = min(d.snd_wnd, cwnd)
            usable = wnd - off
            n = max(0, min(avail, smss, usable))
            if hole is not None:
                n = min(n, hole)
            elif n == smss and burst > 1 and not retransmitting:
                # k full segments at once (see Config.max_burst); the last one
                # stays for the loop when the FIN would ride on it
                k = min(avail, usable, burst * smss) // smss
                if k * smss == avail and d.fin_queued:
                    k -= 1
                if k >= 2:
                    nb = k * smss
                    if self._rtt_seq is None:           # times the first piece
                        self._rtt_seq, self._rtt_start = seq_add(d.snd_nxt, smss), self._now
                    seg = self._segment(d.snd_nxt, ACK | (PSH if nb == avail else 0),
                                        d.send_buffer[off:off + nb])
                    seg.tso = smss
                    self._push(seg)
                    d.snd_nxt = d.snd_max = seq_add(d.snd_nxt, nb)
                    if self._rtx_deadline is None:
                        self._rtx_deadline = self._now + self._rto()
                    sent = True
                    continue
            # FIN goes right after the last data byte, once (again after an RTO)
            fin_now = (d.fin_queued and not self._fin_acked and n == avail and
                       seq_add(d.snd_nxt, n) == self._fin_seq())
            if n <= 0 and not fin_now:
                break
            if retransmitting:
                pass                               # refilling a hole: no SWS or Nagle hold
            elif n < smss and n < avail:
                # sender SWS avoidance (§3.8.6.2.1): a window-limited runt only if it
                # fills at least half the largest window the peer offered -- or once
                # the override timeout expired
                if n < d.max_snd_wnd // 2 and not sws_override:
                    break
            elif n < smss and not fin_now and self.cached.nagle and \
                    d.snd_nxt != d.snd_una:
                break                              # Nagle (RFC 896, §3.7.4)
            flags = ACK | (PSH if n == avail and n else 0) | (FIN if fin_now else 0)
            payload = d.send_buffer[off:off + n]
            if self._rtt_seq is None and seq_ge(d.snd_nxt, d.snd_max) and n:
                self._rtt_seq, self._rtt_start = seq_add(d.snd_nxt, n), self._now
            self._emit(d.snd_nxt, flags, payload)
            d.snd_nxt = seq_add(d.snd_nxt, n + (1 if fin_now else 0))
            d.snd_max = self._max_seq(d.snd_max, d.snd_nxt)
            if self._rtx_deadline is None:
                self._rtx_deadline = self._now + self._rto()   # RFC 6298 §5.1
            sent = True
            if fin_now:
                break
        # zero or unusable window, data waiting, nothing in flight: persist (§3.8.6.1)
        # or the SWS override timer (§3.8.6.2.1), in the one slot
        if not self._persist_applies():
            self._persist_deadline = None
        elif self._rtx_deadline is None and self._persist_deadline is None:
            self._persist_deadline = self._now + (
                self._rto() if d.snd_wnd == 0 else self.cfg.sws_override)
        return sent

    def _send_ack(self) -> None:
        # <SEQ=SND.NXT><ACK=RCV.NXT> (§3.10.7.4), except that after an RTO pulled SND.NXT
        # back (go-back-N) we use SND.MAX: the peer may already hold everything up to
        # there, and it would find a pure ACK left of RCV.NXT unacceptable and ignore it.
        # Not while a zero-window probe is out: SND.MAX then lies beyond the peer's window.
        d = self.d
        self._emit(d.snd_max if d.snd_wnd > 0 else d.snd_nxt, ACK, b"")

    def _emit(self, seq: int, flags: int, payload: bytes) -> None:
        self._push(self._segment(seq, flags, payload))

    def _segment(self, seq: int, flags: int, payload: bytes) -> Segment:
        d = self.d
        seg = Segment(self.const.local_port, self.const.remote_port, seq=seq,
                      ack=d.rcv_nxt if flags & ACK else 0, flags=flags,
                      window=min(d.rcv_wnd >> self.const.rcv_wscale, 0xFFFF),
                      payload=bytes(payload))
        if self.const.timestamps:                  # RFC 7323 §3.2: on every segment
            seg.tsval, seg.tsecr = self._ts_now(), d.ts_recent
        if self.const.sack and self._ooo and flags & ACK and not flags & SYN:
            seg.sack_blocks = self._sack_blocks()
        return seg

    def _push(self, seg: Segment) -> None:
        if seg.flags & ACK:
            self._delack_deadline = None
            self._unacked_full_segments = 0
            self._ack_now = False
            self._last_ack_sent = seg.ack
            edge = seq_add(self.d.rcv_nxt, seg.window << (0 if seg.syn else
                                                           self.const.rcv_wscale))
            self._adv_edge = edge
        self._outbox.append(seg)

    def _sack_blocks(self) -> list[tuple[int, int]]:
        """RFC 2018 §4: up to 3 blocks (4 without timestamps) of queued data. The first
        holds the segment that triggered this ACK (MUST), then the most recently
        reported ones: the order blocks were last received in."""
        blocks = []
        for s in sorted(self._ooo, key=lambda x: seq_sub(x, self.d.rcv_nxt)):
            data, fin = self._ooo[s]
            blocks.append((s, seq_add(s, len(data) + (1 if fin else 0))))
        ordered: list[tuple[int, int]] = []
        for x in self._sack_recent:
            for b in blocks:
                if seq_le(b[0], x) and seq_lt(x, b[1]) and b not in ordered:
                    ordered.append(b)
                    break
        ordered += [b for b in blocks if b not in ordered]
        limit = 3 if self.const.timestamps else 4
        return ordered[:limit]

    # ------------------------------------------------------------------- helpers ----
    def _init_send_seq(self) -> None:
        d = self.d
        self._iss = self.cfg.isn() % MOD           # §3.4.1: ISN from the generator
        d.snd_una = d.snd_nxt = d.snd_max = self._iss
        d.recover = self._iss
        d.rcv_wnd = self.cfg.recv_buffer_size
        d.cwnd = self.cfg.local_mss                # refined once MSS is known
        d.ssthresh = 1 << 30                       # RFC 5681 §3.1: arbitrarily high
        self._ts_offset = self.cfg.ts_offset() % MOD

    def _our_wscale(self) -> int:
        s = 0
        while (self.cfg.recv_buffer_size >> s) > 0xFFFF and s < 14:
            s += 1
        return s

    def _negotiate(self, syn: Segment) -> None:
        """Options from the peer's SYN: each only when both sides offer (RFC 7323 §1.3,
        RFC 2018 §2, §3.7.1)."""
        c, cfg = self.const, self.cfg
        self._syn_opts = syn
        v6 = ":" in c.remote_ip
        c.remote_mss = syn.mss if syn.mss is not None else (1220 if v6 else 536)
        c.window_scaling = cfg.offer_window_scaling and syn.wscale is not None
        c.snd_wscale = min(syn.wscale, 14) if c.window_scaling else 0
        c.rcv_wscale = self._our_wscale() if c.window_scaling else 0
        c.sack = cfg.offer_sack and syn.sack_permitted
        c.timestamps = cfg.offer_timestamps and syn.tsval is not None
        self._update_rcv_wnd()                          # the window our scale can announce

    def _take_timestamp(self, seg: Segment) -> None:
        if seg.tsval is not None:
            self.d.ts_recent = seg.tsval
            self._ts_recent_at = self._now

    def _ts_now(self) -> int:
        return (_ticks(self._now) + self._ts_offset) % MOD

    def _update_rcv_wnd(self) -> None:
        # RCV.WND is what the window field can announce: the free buffer, at most
        # 65535 << our scale (RFC 7323 §2.3).  Data or an RST beyond the edge we
        # announced is outside the window (RFC 9293 §3.10.7.4, RFC 5961 §3.2), and a
        # window that cannot be announced larger needs no window update.
        free = max(0, self.cfg.recv_buffer_size - len(self.d.recv_buffer))
        self.d.rcv_wnd = min(free, 0xFFFF << self.const.rcv_wscale)

    def _enter_established(self) -> None:
        d = self.d
        d.state = S.ESTABLISHED
        self.established = True
        # RFC 5681 §3.1 initial window
        smss = self.smss
        d.cwnd = 2 * smss if smss > 2190 else (3 * smss if smss > 1095 else 4 * smss)
        self._restart_keepalive()

    def _enter_time_wait(self) -> None:
        self.d.state = S.TIME_WAIT
        self._reset_timers()
        self._rtx_deadline = self._now + 2 * self.cfg.msl   # §3.4.2 quiet time

    def _reset_timers(self) -> None:
        self._rtx_deadline = self._persist_deadline = None
        self._delack_deadline = self._ka_deadline = None

    def _enter_closed(self) -> None:
        self.d.state = S.CLOSED
        self._reset_timers()
