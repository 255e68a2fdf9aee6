"""A TCP connection's state in the chimney's three classes (docs/chimney-model.md, "State
objects"): const (never changes while offloaded), cached (host-owned, changed only by
Update) and delegated (owned by whoever runs the connection). The engine keeps its live
state in exactly these objects, so offload and upload hand them over without translation.

Units: times are in ticks (TICKS_PER_SECOND per second). Timer deltas are ticks until
expiry, -1 = not running, 0 = expire now. SRTT is kept x8 and RTTVAR x4, as in the spec.

Beyond the spec's table (documented here, as the spec asks):
- `TcpDelegated.recover` (RFC 6582 NewReno recovery point) and the `in_recovery` /
  `fin_queued` flags live in the delegated flags area.
- SND.WL2 is not kept: an accepted ACK always satisfies SND.WL2 =< SND.UNA =< SEG.ACK,
  so the RFC 9293 §3.10.7.4 window-update test reduces to SND.WL1 alone.
- The window is taken only from segments in sequence (SEG.SEQ =< RCV.NXT), so
  SND.WL1 =< RCV.NXT always holds.
- `ts_time` is the connection's own timestamp clock (ticks plus a random
  per-connection offset, RFC 7323 §5.4): the offset travels in it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

TICKS_PER_SECOND = 1000      # global parameter "ticks per second": 1 tick = 1 ms


class TcpState(enum.Enum):
    """RFC 9293 §3.3.2."""
    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"

    def __str__(self) -> str:
        return self.value


# states in which the connection is synchronized (RFC 9293 §3.5.2)
SYNCHRONIZED = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2,
                          TcpState.CLOSE_WAIT, TcpState.CLOSING, TcpState.LAST_ACK,
                          TcpState.TIME_WAIT})
# docs/chimney-model.md, Initiate: offload is refused in these states
NOT_OFFLOADABLE = frozenset({TcpState.CLOSED, TcpState.LISTEN, TcpState.SYN_SENT,
                             TcpState.SYN_RECEIVED, TcpState.TIME_WAIT})


@dataclass
class TcpConst:
    """Never changes while offloaded; never returned."""
    local_ip: str = "0.0.0.0"
    local_port: int = 0
    remote_ip: str = "0.0.0.0"
    remote_port: int = 0
    timestamps: bool = False        # flags: negotiated options
    sack: bool = False
    window_scaling: bool = False
    snd_wscale: int = 0             # shift applied to the peer's window field
    rcv_wscale: int = 0             # shift applied to our advertised window
    remote_mss: int = 536           # RFC 9293 §3.7.1 default when no MSS option
    rss_hash: int = 0


@dataclass
class TcpCached:
    """Owned by the host; changed only by Update."""
    keepalive: bool = False
    nagle: bool = True
    keepalive_restart: bool = False
    maxrt_restart: bool = False
    update_rcv_wnd: bool = False
    initial_rcv_wnd: int = 65535
    rcv_indicate_size: int = 0
    ka_probe_count: int = 9                         # RFC 1122 §4.2.3.6 style defaults
    ka_timeout: int = 7200 * TICKS_PER_SECOND       # idle time before the first probe
    ka_interval: int = 75 * TICKS_PER_SECOND
    max_rt: int = 100 * TICKS_PER_SECOND            # max time retransmitting one segment
    flow_label: int = 0
    ttl: int = 64                                   # TTL / hop limit
    tos: int = 0                                    # TOS / traffic class
    user_priority: int = 0


@dataclass
class TcpDelegated:
    """Initial values from the host, then owned by whoever runs the connection."""
    state: TcpState = TcpState.CLOSED
    # flags
    fin_queued: bool = False        # the application shut down writing (FIN after data)
    in_recovery: bool = False       # NewReno fast recovery (RFC 6582)
    rcv_nxt: int = 0
    rcv_wnd: int = 0
    snd_una: int = 0
    snd_nxt: int = 0
    snd_max: int = 0
    snd_wnd: int = 0                # scaled (bytes)
    max_snd_wnd: int = 0
    snd_wl1: int = 0
    cwnd: int = 0
    ssthresh: int = 0
    srtt: int = 0                   # SRTT x8, ticks; 0 with rttvar 0 = no sample yet
    rttvar: int = 0                 # RTTVAR x4, ticks
    ts_recent: int = 0
    ts_recent_age: int = 0          # ticks since ts_recent was recorded
    ts_time: int = 0                # our timestamp clock's value (TSval now)
    total_rt: int = 0               # ticks spent retransmitting the current segment
    dup_ack_count: int = 0
    window_probe_count: int = 0
    ka_probe_count: int = 0
    ka_timeout_delta: int = -1
    retransmit_count: int = 0
    retransmit_delta: int = -1      # one slot: retransmit, or persist (zero window,
    #                                 data waiting), FIN-WAIT-2, or 2MSL in TIME-WAIT
    recover: int = 0                # RFC 6582 "recover" (beyond the spec's table)
    send_buffer: bytes = b""        # from SND.UNA: unacknowledged, then unsent bytes
    recv_buffer: bytes = b""        # received, acknowledged, not delivered; ends at RCV.NXT
    snd_backlog: int = 0
    rcv_backlog: int = 0
