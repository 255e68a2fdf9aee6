"""iperf3's control protocol (iperf_api.h) and the data streams of a TCP test:
state bytes and length-prefixed JSON on the control connection, non-blocking
rounds of sends and receives, interval ticks, and the end of a test (a sender
waits until its data is acknowledged, a receiver reads what is still coming)
so that both ends count the same bytes.  chimney.guest.tools.iperf3 runs the
client and the server on top of it."""
from __future__ import annotations

import contextlib
import json
import secrets
import struct
import time

from .conn import send_all, time_left
from .stacks import ToolError
from .values import mbps

# -- the protocol (iperf_api.h) -----------------------------------------------------------

TEST_START = 1
TEST_RUNNING = 2
TEST_END = 4
PARAM_EXCHANGE = 9
CREATE_STREAMS = 10
SERVER_TERMINATE = 11
CLIENT_TERMINATE = 12
EXCHANGE_RESULTS = 13
DISPLAY_RESULTS = 14
IPERF_START = 15
IPERF_DONE = 16
ACCESS_DENIED = -1
SERVER_ERROR = -2
STATE_NAMES = {TEST_START: "TEST_START", TEST_RUNNING: "TEST_RUNNING", TEST_END: "TEST_END",
               PARAM_EXCHANGE: "PARAM_EXCHANGE", CREATE_STREAMS: "CREATE_STREAMS",
               SERVER_TERMINATE: "SERVER_TERMINATE", CLIENT_TERMINATE: "CLIENT_TERMINATE",
               EXCHANGE_RESULTS: "EXCHANGE_RESULTS", DISPLAY_RESULTS: "DISPLAY_RESULTS",
               IPERF_START: "IPERF_START", IPERF_DONE: "IPERF_DONE", ACCESS_DENIED: "ACCESS_DENIED",
               SERVER_ERROR: "SERVER_ERROR"}

COOKIE_SIZE = 37
COOKIE_CHARS = "abcdefghijklmnopqrstuvwxyz234567"
DEFAULT_PORT = 5201
DEFAULT_LEN = 128 * 1024            # iperf3's TCP block size
DEFAULT_TIME = 10
MAX_STREAMS = 128
MAX_PARAMS_JSON = 8 * 1024          # iperf3 3.18 refuses larger parameter objects
MAX_RESULTS_JSON = 1 << 20
VERSION = "3.12"                    # what we tell a server we speak (client_version)

# i_errno values a peer may send with SERVER_ERROR (iperf_api.h), for messages
IERRNO = {13: "not implemented", 6: "number of parallel streams too large",
          7: "block size too large", 100: "unable to create a new test",
          109: "control socket has closed unexpectedly", 110: "received an unknown control message",
          111: "unable to send control message", 112: "unable to receive control message",
          113: "unable to send parameters", 114: "unable to receive parameters",
          131: "protocol does not exist", 204: "unable to accept stream connection"}
IEUNIMP = 13
IENUMSTREAMS = 6
IEBLOCKSIZE = 7

SETTLE_MAX = 3.0        # seconds a sender waits for its data to be acknowledged and read
PROBE_INTERVAL = 0.01   # ... probing the peer's window this often once it is acknowledged
GRACE = 0.1             # where the window is not known: this long, for the peer to read
QUIET = 0.3             # a receiver drains after TEST_END until a stream is this long silent
DRAIN_MAX = 10.0        # ... or at most this long


class IperfError(ToolError):
    pass


def make_cookie() -> bytes:
    return "".join(secrets.choice(COOKIE_CHARS) for _ in range(COOKIE_SIZE - 1)).encode() + b"\0"


def stream_ids(n: int) -> list[int]:
    """iperf_add_stream: the first stream is 1, the k-th (k >= 2) is k + 1."""
    return [1 if i == 0 else i + 2 for i in range(n)]


class Control:
    """The control connection: state bytes and length-prefixed JSON over a non-blocking conn."""

    def __init__(self, stack, conn):
        self.stack, self.conn = stack, conn
        self.buf = bytearray()
        self.eof = False
        conn.nodelay()

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            b = self.conn.recv(65536)
        except OSError as e:
            raise IperfError(f"control connection: {type(e).__name__}: {e}") from None
        if b is None:
            return False
        if not b:
            self.eof = True
            return False
        self.buf += b
        return True

    def take(self, n: int, deadline) -> bytes:
        while len(self.buf) < n:
            if self._fill():
                continue
            if self.eof:
                raise IperfError("the peer closed the control connection")
            self.stack.wait(min(0.05, time_left(deadline)), (self.conn,))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def state(self, deadline) -> int:
        return struct.unpack("b", self.take(1, deadline))[0]

    def poll_state(self):
        """A state byte if one is there, else None (raises once the peer closed)."""
        while self._fill():
            pass
        if self.buf:
            return struct.unpack("b", self.take(1, 0))[0]
        if self.eof:
            raise IperfError("the peer closed the control connection")
        return None

    def json(self, deadline, max_size=MAX_RESULTS_JSON) -> dict:
        n = struct.unpack(">I", self.take(4, deadline))[0]
        if not 0 < n <= max_size:
            raise IperfError(f"JSON of {n} bytes on the control connection")
        obj = json.loads(self.take(n, deadline))
        if not isinstance(obj, dict):
            raise IperfError("JSON on the control connection is not an object")
        return obj

    def send_state(self, *states: int, deadline) -> None:
        send_all(self.stack, self.conn, struct.pack(f"{len(states)}b", *states), deadline)

    def send_json(self, obj: dict, deadline) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        send_all(self.stack, self.conn, struct.pack(">I", len(data)) + data, deadline)


def state_name(st) -> str:
    return STATE_NAMES.get(st, str(st))


# -- the data streams ---------------------------------------------------------------------

class DataStream:
    def __init__(self, sid: int, conn, sending: bool):
        self.id, self.conn, self.sending = sid, conn, sending
        self.count = 0
        self.interval_count = 0
        self.off = 0                # where in the block the next send starts
        self.eof = False
        self.error = None
        self.last = None            # monotonic time of the last byte moved
        self.seconds = 0.0
        self.retransmits = None     # the sender's count, taken when the test ends

    def stopped(self, t0: float, at: float) -> None:
        self.seconds = at - t0
        if self.sending:
            with contextlib.suppress(OSError):
                self.retransmits = self.conn.retransmits()

    @property
    def done(self) -> bool:
        return self.eof or self.error is not None


def io_round(streams, block: memoryview, budget=None, passes: int = 8):
    """One round of non-blocking sends and receives, stream by stream in turn.
    budget: bytes the senders may still send (None: no limit).  -> (progress, budget)."""
    progress = False
    blen = len(block)
    for _ in range(passes):
        moved = False
        for s in streams:
            if s.done:
                continue
            try:
                if s.sending:
                    if budget is not None and budget <= 0:
                        continue
                    view = block[s.off:]
                    if budget is not None:
                        view = view[:budget]
                    n = s.conn.send(view)
                    if not n:
                        continue
                    s.off = (s.off + n) % blen
                    if budget is not None:
                        budget -= n
                else:
                    b = s.conn.recv(blen)
                    if b is None:
                        continue
                    if not b:
                        s.eof = True
                        moved = True
                        continue
                    n = len(b)
            except OSError as e:
                s.error = f"{type(e).__name__}: {e}"
                moved = True
                continue
            s.count += n
            s.interval_count += n
            s.last = time.monotonic()
            moved = True
        if not moved:
            break
        progress = True
    return progress, budget


class Ticker:
    """Interval reports (the shape chimney perf prints with print_interval)."""

    def __init__(self, streams, interval, t0, report):
        self.streams, self.interval, self.t0, self.report = streams, interval, t0, report
        self.last = t0
        self.next = t0 + interval if interval else None

    def tick(self, now, force=False) -> None:
        if self.next is None or (now < self.next and not force) or now <= self.last:
            return
        dt = now - self.last
        rep = {"start": round(self.last - self.t0, 3), "end": round(now - self.t0, 3),
               "streams": [{"id": s.id, "bytes": s.interval_count, "mbps": mbps(s.interval_count, dt)}
                           for s in self.streams]}
        rep["bytes"] = sum(x["bytes"] for x in rep["streams"])
        rep["mbps"] = mbps(rep["bytes"], dt)
        self.report(rep)
        for s in self.streams:
            s.interval_count = 0
        self.last = now
        self.next = now + self.interval


def wait_io(stack, ctl, streams, progress) -> None:
    if progress:
        stack.pump()
    else:
        stack.wait(0.01, [ctl.conn] + [s.conn for s in streams if not s.done and not s.sending],
                   [s.conn for s in streams if not s.done and s.sending])


def settle(stack, streams, deadline) -> dict:
    """The end of a sender's test, before TEST_END: a real iperf3 server closes its data
    sockets when TEST_END arrives and never counts what its kernel still holds unread.
    So wait (all of it bounded by SETTLE_MAX) until the peer acknowledged everything,
    then until its application read it all: the window a receiver advertises is its
    free receive space, back to (about) the largest it advertised once its buffer is
    empty.  A receiver announces a reopened window by itself only if it had shrunk
    below half, so the window is probed every PROBE_INTERVAL (conn.probe_window) until
    it is back.  Connections that cannot tell their peer's window (kernel sockets:
    conn.peer_window() is None) get GRACE seconds instead.
    -> {"acked", "read" (None: not known), "probe_rounds", "seconds"}."""
    t0 = time.monotonic()
    end = min(deadline, t0 + SETTLE_MAX)
    senders = [s for s in streams if s.sending and not s.done]
    out = {"acked": False, "read": None, "probe_rounds": 0, "seconds": 0.0}
    while time.monotonic() < end:
        left = [s.conn.unacked() for s in senders]
        if any(n is None for n in left):
            break
        if not any(left):
            out["acked"] = True
            break
        stack.wait(0.005)
    if out["acked"] and senders and all(s.conn.peer_window() is not None for s in senders):
        out["read"] = _await_windows(stack, senders, end, out)
    else:
        grace = time.monotonic() + GRACE
        while time.monotonic() < grace:
            stack.wait(0.01)
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def window_reopened(win) -> bool:
    """(SND.WND, MAX.SND.WND, slack) of conn.peer_window(): back to the largest, give
    or take the peer's rounding?"""
    wnd, max_wnd, slack = win
    return wnd + slack >= max_wnd


def _await_windows(stack, senders, end, out) -> bool:
    """Probe each sender's peer until its window reopened (or end): True if all did."""
    waiting = list(senders)
    last_probe = {}
    try:
        while True:
            waiting = [s for s in waiting if not window_reopened(s.conn.peer_window() or (0, 1, 0))]
            now = time.monotonic()
            if not waiting or now >= end:
                return not waiting
            for s in waiting:
                if now - last_probe.get(s.id, -1.0) >= PROBE_INTERVAL:
                    last_probe[s.id] = now
                    s.conn.probe_window()
                    out["probe_rounds"] += 1
            stack.wait(min(PROBE_INTERVAL / 2, max(0.0, end - now)))
    finally:
        for s in senders:
            s.conn.end_window_probe()


def drain(stack, streams, block, deadline, ticker, *, to_eof: bool) -> None:
    """After TEST_END: read what is still coming, to EOF (to_eof) or until quiet."""
    end = min(deadline, time.monotonic() + DRAIN_MAX)
    quiet_since = time.monotonic()
    while time.monotonic() < end:
        rx = [s for s in streams if not s.sending and not s.done]
        if not rx:
            return
        progress, _ = io_round(rx, block)
        now = time.monotonic()
        if progress:
            quiet_since = now
            stack.pump()
        elif not to_eof and now - quiet_since >= QUIET:
            return
        else:
            stack.wait(0.01, [s.conn for s in rx])
        ticker.tick(now)


def move_data(stack, ctl, data, block, budget, ticker):
    """One round of a data phase: move what can move, report an interval when one is
    due, wait a little when nothing moved.  -> what is left of the senders' budget."""
    progress, budget = io_round(data, block, budget)
    ticker.tick(time.monotonic())
    wait_io(stack, ctl, data, progress)
    return budget


def stop_streams(data, t0: float) -> float:
    """The end of the timed part of a test, for every stream: -> the time it stopped."""
    stop = time.monotonic()
    for s in data:
        s.stopped(t0, stop)
    return stop


def drain_streams(stack, data, block, deadline, ticker, t0: float, stop: float, *, to_eof: bool) -> None:
    """Read what is still coming after TEST_END; a stream's time runs to its last byte."""
    drain(stack, data, block, deadline, ticker, to_eof=to_eof)
    for s in data:
        s.seconds = (s.last or stop) - t0
