"""Helpers for the segment-by-segment TCP engine tests (tests/test_tcp_*.py)."""
from __future__ import annotations

from chimney.tcp.engine import Config, Connection
from chimney.tcp.segment import ACK, Segment
from chimney.tcp.state import TcpCached, TcpConst, TcpDelegated, TcpState

LOCAL = ("10.0.0.1", 1000)
REMOTE = ("10.0.0.2", 2000)
LOCAL_ISS = 10_000           # our ISN
REMOTE_ISS = 50_000          # the peer's ISN
BUF = 4096                   # receive buffer: the window we advertise (no scaling)
MSS = 1000                   # the peer's MSS, so our SMSS is 1000 without timestamps


def config(**kw) -> Config:
    base = dict(isn=lambda: LOCAL_ISS, ts_offset=lambda: 0, recv_buffer_size=BUF, send_buffer_size=64 * 1024,
                offer_timestamps=False, offer_sack=False, offer_window_scaling=False)
    base.update(kw)
    return Config(**base)


def peer(seq: int = REMOTE_ISS + 1, ack: int = LOCAL_ISS + 1, flags: int = ACK,
         window: int = 10_000, payload: bytes = b"", **kw) -> Segment:
    """A segment from the peer to us."""
    return Segment(REMOTE[1], LOCAL[1], seq=seq % (1 << 32), ack=ack % (1 << 32),
                   flags=flags, window=window, payload=payload, **kw)


def ours(seq: int = LOCAL_ISS + 1, ack: int = REMOTE_ISS + 1, flags: int = ACK,
         window: int = BUF, payload: bytes = b"", **kw) -> Segment:
    """A segment we expect to send."""
    return Segment(LOCAL[1], REMOTE[1], seq=seq % (1 << 32), ack=ack % (1 << 32),
                   flags=flags, window=window, payload=payload, **kw)


def established(state: TcpState = TcpState.ESTABLISHED, now: float = 0.0,
                cfg: Config | None = None, cached: TcpCached | None = None,
                const: dict | None = None, **delegated) -> Connection:
    """A synchronized connection built from its three state objects."""
    c = TcpConst(local_ip=LOCAL[0], local_port=LOCAL[1], remote_ip=REMOTE[0],
                 remote_port=REMOTE[1], remote_mss=MSS, **(const or {}))
    d = dict(state=state, snd_una=LOCAL_ISS + 1, snd_nxt=LOCAL_ISS + 1,
             snd_max=LOCAL_ISS + 1, snd_wnd=10_000, max_snd_wnd=10_000,
             snd_wl1=REMOTE_ISS + 1, rcv_nxt=REMOTE_ISS + 1, rcv_wnd=BUF,
             cwnd=100_000, ssthresh=1 << 30, recover=LOCAL_ISS)
    d.update(delegated)
    return Connection.from_state(c, cached or TcpCached(nagle=False), TcpDelegated(**d),
                                 now, cfg or config())


def feed(conn: Connection, seg: Segment, now: float = 0.0) -> list[Segment]:
    conn.on_segment(seg, now)
    return conn.take_segments()
