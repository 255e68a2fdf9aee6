"""The TOE's object table entries -- neighbours, paths, TCP connections -- and what
the TOE and its command handlers share: limits, record parsing and the state checks
of INITIATE and UPDATE (chimney/device/toe.py, toe_commands.py)."""
from __future__ import annotations

import collections
import dataclasses

from .. import hw
from ..staterec import codec
from ..tcp.engine import Connection, validate_state
from ..tcp.state import NOT_OFFLOADABLE, TICKS_PER_SECOND

MASK32 = 0xFFFFFFFF
MAX_OBJECTS = 1 << 16
MAX_REQ = 64 << 20
# A TERMINATE record carries at most codec.MAX_DATA bytes of data (more would not
# decode, and the connection could never be uploaded): half for the receive side
# (window plus buffered bytes), half for the send side (engine buffer plus held sends).
MAX_RECV = codec.MAX_DATA // 2
MAX_SEND = codec.MAX_DATA - MAX_RECV
# Send data an INITIATE may carry (the host's send buffer and what it holds back
# during a handover); the connection's send buffer grows to hold it.
MAX_INITIATE_SEND = 2 << 20
NONE32_TICKS = MASK32 - 1                      # the largest reach delta (not "none")
# delegated fields that only grow (ages, counters, windows): saturated at 32 bits in a
# state record, where a sequence number would wrap
SATURATING = ("cwnd", "ssthresh", "srtt", "rttvar", "ts_recent_age", "total_rt",
              "dup_ack_count", "window_probe_count", "ka_probe_count", "retransmit_count",
              "snd_backlog", "rcv_backlog", "rcv_wnd", "snd_wnd", "max_snd_wnd")


# --------------------------------------------------------------------------------------
# Lenient per-record parsing (responses and UPDATE requests)
# --------------------------------------------------------------------------------------
def parse_records(buf, with_data: bool = True) -> list[codec.ObjEntry]:
    """Records one by one, parents not checked (QUERY/TERMINATE responses, UPDATE
    requests).  Raises CodecError on malformed input."""
    return codec.decode_records(buf, with_data=with_data, tree=False)


def state_problem(e: codec.ObjEntry, max_send: int) -> str | None:
    """Why the state of an INITIATE record is refused, or None (a TCP state must pass
    both codec.check_tcp and the engine's validate_state)."""
    if e.state is None:
        return e.extra.get("error", "no state")
    if e.type == hw.OBJ_NEIGHBOR:
        return codec.check_neighbor(e.state)
    if e.type == hw.OBJ_PATH:
        return codec.check_path(e.state)
    t = e.state
    why = codec.check_tcp(t, max_send, MAX_RECV)
    if why or t.delegated.state in NOT_OFFLOADABLE:
        return why          # a state the target declines is FAILURE, not malformed
    # beyond the TOE's own limits: what the engine itself needs to run the state
    return validate_state(t.const, t.cached, t.delegated)


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
        self.acks_ahead = 0                       # pure ACKs from beyond RCV.NXT


