"""iperf3 interoperability: iperf3's control protocol (3.x, as in Debian 12's
iperf3 3.12 and trixie's 3.18), TCP tests, on the host stack's sockets or on
kernel sockets (the stacks of chimney.guest.perf).

    python3 -m chimney.guest.iperf3 client HOST [-p 5201] [-t SECONDS | -n BYTES] [-P N] [-R]
                                    [-l LEN] [-i INTERVAL] [--json] [--stack chimney|linux] ...
    python3 -m chimney.guest.iperf3 server [-p 5201] [--one-off] [--json] [--stack ...] ...
    chimney iperf3 ...                  (the same)

The client runs a test against a real `iperf3 -s`; the server serves a real
`iperf3 -c`.  -n takes iperf3's units (K/M/G are powers of 2); without -t or
-n a test lasts 10 seconds, as iperf3's.  Stack options as `chimney perf`'s.

The protocol.  The client opens the control connection and sends a 37-byte
cookie (36 characters of [a-z2-7] and a NUL).  From then on the server
drives the test with one signed byte per state: PARAM_EXCHANGE (9) -> the
client sends its parameters as a JSON object behind a 4-byte big-endian
length; CREATE_STREAMS (10) -> the client opens -P data connections to the
same port, each starting with the cookie (a stranger's cookie gets
ACCESS_DENIED, -1, and is closed); TEST_START (1), TEST_RUNNING (2) -> data
flows (client to server, or server to client with -R) as fast as it goes.
The client ends the test (its -t timer, or -n bytes sent or received) with
TEST_END (4); the server answers EXCHANGE_RESULTS (13): the client sends its
per-stream results (JSON, length-prefixed), the server its own, then
DISPLAY_RESULTS (14); the client closes its streams, sends IPERF_DONE (16)
and closes.  SERVER_ERROR (-2) is followed by two big-endian 32-bit ints
(iperf3's i_errno and errno).  Stream ids are 1, 3, 4, 5, ... at both ends
(iperf3's numbering skips 2, and results are matched by id).

Byte counts: iperf3's server closes its data sockets as soon as TEST_END
arrives, so bytes still in flight are reported as sent but not received.
Here a sender waits (bounded) until the peer has acknowledged everything
before it ends the test, and a receiver keeps reading after TEST_END (to EOF,
or until the stream goes quiet) before it reports, so both ends' counts agree.

Pure standard library (the guest has Python 3.13 and nothing else).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import struct
import sys
import time

from . import perf
from .perf import (
    PerfError,
    connect_retry,
    hard_timeout,
    mbps,
    recv_exactly,
    run_on_stack,
    send_all,
    teardown,
)

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

SETTLE_MAX = 3.0        # seconds a sender waits for its data to be acknowledged before ending
GRACE = 0.1             # then this long, for the peer to read what arrived
QUIET = 0.3             # a receiver drains after TEST_END until a stream is this long silent
DRAIN_MAX = 10.0        # ... or at most this long


class IperfError(PerfError):
    pass


def make_cookie() -> bytes:
    return "".join(secrets.choice(COOKIE_CHARS) for _ in range(COOKIE_SIZE - 1)).encode() + b"\0"


def stream_ids(n: int) -> list[int]:
    """iperf_add_stream: the first stream is 1, the k-th (k >= 2) is k + 1."""
    return [1 if i == 0 else i + 2 for i in range(n)]


def _left(deadline) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("hard timeout")
    return left


def _nodelay(conn) -> None:
    s = getattr(conn, "s", None)
    if isinstance(s, socket.socket):
        with contextlib.suppress(OSError):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def unacked(conn):
    """Bytes sent on conn the peer has not acknowledged yet; None when unknown."""
    f = getattr(conn, "unacked", None)
    if callable(f):
        return f()
    s = getattr(conn, "s", None)
    if isinstance(s, socket.socket):
        import fcntl
        import termios
        try:
            return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return None
    try:        # the host stack's software path: the send buffer holds what is unacknowledged
        return len(conn.sock.path.conn.d.send_buffer)
    except AttributeError:
        return None


class Control:
    """The control connection: state bytes and length-prefixed JSON over a non-blocking conn."""

    def __init__(self, stack, conn):
        self.stack, self.conn = stack, conn
        self.buf = bytearray()
        self.eof = False
        _nodelay(conn)

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
            self.stack.wait(min(0.05, _left(deadline)), (self.conn,))
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
    """Interval reports (the shape chimney perf prints with perf.print_interval)."""

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


def _wait_io(stack, ctl, streams, progress) -> None:
    if progress:
        stack.pump()
    else:
        stack.wait(0.01, [ctl.conn] + [s.conn for s in streams if not s.done and not s.sending],
                   [s.conn for s in streams if not s.done and s.sending])


def settle(stack, streams, deadline) -> bool:
    """Wait until the peer acknowledged everything the sending streams sent (bounded),
    then GRACE seconds for it to read; True if all was acknowledged."""
    end = min(deadline, time.monotonic() + SETTLE_MAX)
    ok = False
    while time.monotonic() < end:
        left = [unacked(s.conn) for s in streams if s.sending and not s.done]
        if any(n is None for n in left):
            break
        if not any(left):
            ok = True
            break
        stack.wait(0.005)
    end = time.monotonic() + GRACE
    while time.monotonic() < end:
        stack.wait(0.01)
    return ok


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


class CpuMeter:
    def __init__(self):
        self.wall, self.t = time.monotonic(), os.times()

    def util(self) -> tuple[float, float, float]:
        wall = max(1e-9, time.monotonic() - self.wall)
        t = os.times()
        user = (t.user - self.t.user) / wall * 100
        system = (t.system - self.t.system) / wall * 100
        return round(user + system, 6), round(user, 6), round(system, 6)


def local_results(streams, cpu: CpuMeter, sending: bool) -> dict:
    """The results object iperf3's get_results() reads (send_results' shape)."""
    total, user, system = cpu.util()
    retr = [s.retransmits if sending else None for s in streams]
    has_retr = sending and all(r is not None for r in retr)
    out = {"cpu_util_total": total, "cpu_util_user": user, "cpu_util_system": system,
           "sender_has_retransmits": (1 if has_retr else 0) if sending else -1, "streams": []}
    for s, r in zip(streams, retr):
        out["streams"].append({"id": s.id, "bytes": s.count, "retransmits": r if has_retr else -1,
                               "jitter": 0, "errors": 0, "packets": 0,
                               "start_time": 0, "end_time": round(s.seconds, 6)})
    return out


def summarize(streams, peer: dict, sending: bool) -> dict:
    """Per stream and summed, the sender's and the receiver's view (iperf3's end.sum_sent /
    end.sum_received); one side is ours, the other what the peer reported."""
    peer_streams = {}
    for ps in peer.get("streams") or []:
        if isinstance(ps, dict) and isinstance(ps.get("id"), int):
            peer_streams[ps["id"]] = ps
    matched = set(peer_streams) == {s.id for s in streams}
    rows = []
    sums = {"sent": {"bytes": 0, "seconds": 0.0, "retransmits": None},
            "received": {"bytes": 0, "seconds": 0.0}}
    for s in streams:
        ps = peer_streams.get(s.id, {})
        mine = {"bytes": s.count, "seconds": round(s.seconds, 6)}
        theirs = {"bytes": int(ps.get("bytes") or 0),
                  "seconds": round(float(ps.get("end_time") or 0) - float(ps.get("start_time") or 0), 6)}
        if sending:
            mine["retransmits"] = s.retransmits
            snd, rcv = mine, theirs
        else:
            r = ps.get("retransmits")
            theirs["retransmits"] = r if isinstance(r, int) and r >= 0 else None
            snd, rcv = theirs, mine
        for role, d in (("sent", snd), ("received", rcv)):
            d["mbps"] = mbps(d["bytes"], d["seconds"])
            sums[role]["bytes"] += d["bytes"]
            sums[role]["seconds"] = max(sums[role]["seconds"], d["seconds"])
        if snd.get("retransmits") is not None:
            sums["sent"]["retransmits"] = (sums["sent"]["retransmits"] or 0) + snd["retransmits"]
        rows.append({"id": s.id, "sender": snd, "receiver": rcv,
                     "sender_is": "local" if sending else "peer"})
    for v in sums.values():
        v["seconds"] = round(v["seconds"], 6)
        v["mbps"] = mbps(v["bytes"], v["seconds"])
    return {"streams": rows, "sum_sent": sums["sent"], "sum_received": sums["received"],
            "peer_streams_matched": matched}


# -- output -------------------------------------------------------------------------------

def _transfer(n: int) -> str:
    for unit, div in (("GBytes", 1 << 30), ("MBytes", 1 << 20), ("KBytes", 1 << 10)):
        if n >= div:
            return f"{n / div:6.2f} {unit}"
    return f"{n:6d} Bytes "


def print_summary(res: dict, out=sys.stdout) -> None:
    print("- - - - - - - - - - - - - - - - - - - - - - - - -", file=out)
    if res.get("error"):
        print(f"iperf3 error: {res['error']}", file=out)
    end = res.get("end")
    if end:
        print("[ ID] Interval           Transfer     Bitrate            Retr", file=out)
        rows = [(f"{s['id']:3d}", s["sender"], s["receiver"]) for s in end["streams"]]
        if len(rows) > 1 or not rows:
            rows.append(("SUM", end["sum_sent"], end["sum_received"]))
        for tag, snd, rcv in rows:
            for role, d in (("sender", snd), ("receiver", rcv)):
                retr = d.get("retransmits")
                retr = f"{retr:5d}" if role == "sender" and retr is not None else "     "
                print(f"[{tag}]   0.00-{d['seconds']:<6.2f} sec  {_transfer(d['bytes'])}  "
                      f"{d['mbps']:10.2f} Mbits/sec  {retr}  {role}", file=out)
        agree = "yes" if res.get("counts_agree") else "no"
        print(f"sent {end['sum_sent']['bytes']} B, received {end['sum_received']['bytes']} B "
              f"(counts agree: {agree})", file=out)
    print("\niperf Done." if not res.get("error") else "", file=out, flush=True)


def emit(res: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res), flush=True)
    else:
        print_summary(res)


def _reporter(res, as_json):
    def report(rep):
        res["intervals"].append(rep)
        if not as_json:
            perf.print_interval(rep)
    return report


def _finish_result(res, streams, peer, sending) -> None:
    res["peer_results"] = peer
    end = summarize(streams, peer, sending)
    res["end"] = end
    res["sent"], res["received"] = end["sum_sent"], end["sum_received"]
    res["counts_agree"] = bool(end["peer_streams_matched"] and all(
        r["sender"]["bytes"] == r["receiver"]["bytes"] > 0 for r in end["streams"]))
    if not end["peer_streams_matched"]:
        ids = [x.get("id") for x in peer.get("streams") or [] if isinstance(x, dict)]
        raise IperfError(f"the peer's results name streams {ids}, ours are {[s.id for s in streams]}")


# -- the client ---------------------------------------------------------------------------

def run_client(stack, host: str, port: int = DEFAULT_PORT, *, duration=None, nbytes=None, streams=1,
               reverse=False, blksize=DEFAULT_LEN, interval=1.0, timeout=None, connect_timeout=10.0,
               as_json=False) -> dict:
    """One test against an iperf3 server; the result dict (res["error"] set on failure)."""
    if duration is None and nbytes is None:
        duration = DEFAULT_TIME
    if duration is not None and (duration <= 0 or duration != int(duration)):
        raise IperfError("-t must be a positive whole number of seconds")
    if nbytes is not None and nbytes <= 0:
        raise IperfError("-n must be positive")
    if not 1 <= streams <= MAX_STREAMS:
        raise IperfError(f"-P must be 1..{MAX_STREAMS}")
    if not 1 <= blksize <= 16 << 20:
        raise IperfError("-l must be 1 byte .. 16 MiB")
    duration = int(duration) if duration is not None else None
    limit = hard_timeout(duration, nbytes, timeout)
    deadline = time.monotonic() + limit
    res = {"tool": "chimney iperf3", "role": "client", "stack": stack.name,
           "remote": {"host": host, "port": port}, "protocol": "tcp", "streams": streams,
           "reverse": reverse, "direction": "server->client" if reverse else "client->server",
           "duration": duration, "bytes": nbytes, "blksize": blksize, "interval": interval,
           "timeout": limit, "intervals": [], "end": None, "sent": None, "received": None,
           "counts_agree": False, "peer_results": None, "error": None}
    report = _reporter(res, as_json)
    sending = not reverse
    conns, data = [], []
    block = memoryview(os.urandom(blksize))
    params = {"tcp": True, "omit": 0, "time": duration or 0, "num": nbytes or 0, "blockcount": 0,
              "parallel": streams, "len": blksize, "pacing_timer": 1000, "client_version": VERSION}
    if reverse:
        params["reverse"] = True
    cpu = CpuMeter()
    t0 = None
    try:
        ctl_conn = connect_retry(stack, host, port, connect_timeout)
        conns.append(ctl_conn)
        ctl = Control(stack, ctl_conn)
        cookie = make_cookie()
        res["cookie"] = cookie[:-1].decode()
        send_all(stack, ctl_conn, cookie, deadline)
        if not as_json:
            print(f"Connecting to host {host}, port {port} (chimney iperf3 client on the {stack.name} stack)",
                  flush=True)
        while True:
            st = ctl.state(deadline)
            if st == PARAM_EXCHANGE:
                ctl.send_json(params, deadline)
            elif st == CREATE_STREAMS:
                for sid in stream_ids(streams):
                    c = stack.connect(host, port, min(10.0, _left(deadline)))
                    conns.append(c)
                    send_all(stack, c, cookie, deadline)
                    data.append(DataStream(sid, c, sending))
                    if not as_json:
                        print(f"[{sid:3d}] connected to {host} port {port}", flush=True)
            elif st == TEST_START:
                t0, cpu = time.monotonic(), CpuMeter()
            elif st == TEST_RUNNING:
                if len(data) != streams:
                    raise IperfError("TEST_RUNNING before the streams were made")
                t0 = t0 or time.monotonic()
                _client_data_phase(stack, ctl, data, block, t0, deadline, duration, nbytes,
                                   Ticker(data, interval, t0, report))
            elif st == EXCHANGE_RESULTS:
                ctl.send_json(local_results(data, cpu, sending), deadline)
                _finish_result(res, data, ctl.json(deadline), sending)
            elif st == DISPLAY_RESULTS:
                for c in conns[1:]:
                    with contextlib.suppress(OSError):
                        c.close()
                del conns[1:]
                ctl.send_state(IPERF_DONE, deadline=deadline)
                break
            elif st == ACCESS_DENIED:
                raise IperfError("the server is busy running a test (ACCESS_DENIED)")
            elif st == SERVER_ERROR:
                ierr, err = struct.unpack(">ii", ctl.take(8, deadline))
                raise IperfError(f"server error: i_errno {ierr} ({IERRNO.get(ierr, 'see iperf_api.h')}), "
                                 f"errno {err} ({os.strerror(err) if err else '-'})")
            elif st == SERVER_TERMINATE:
                raise IperfError("the server has terminated (SERVER_TERMINATE)")
            else:
                raise IperfError(f"unexpected control message {state_name(st)}")
    except (OSError, PerfError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        teardown(stack, conns)
    res["stack_stats"] = stack.stats()
    return res


def _client_data_phase(stack, ctl, data, block, t0, deadline, duration, nbytes, ticker) -> None:
    sending = data[0].sending
    budget = nbytes if sending else None
    while True:
        _left(deadline)
        now = time.monotonic()
        total = sum(s.count for s in data)
        if (duration and now - t0 >= duration) or (nbytes and total >= nbytes):
            break
        st = ctl.poll_state()
        if st is not None:
            if st == SERVER_ERROR:
                ierr, err = struct.unpack(">ii", ctl.take(8, deadline))
                raise IperfError(f"server error during the test: i_errno {ierr}, errno {err}")
            raise IperfError(f"unexpected control message {state_name(st)} during the test")
        bad = [s for s in data if s.done]
        if bad:
            raise IperfError(f"data stream {bad[0].id} ended early: {bad[0].error or 'EOF'}")
        progress, budget = io_round(data, block, budget)
        ticker.tick(time.monotonic())
        _wait_io(stack, ctl, data, progress)
    stop = time.monotonic()
    for s in data:
        s.stopped(t0, stop)
    if sending:
        settle(stack, data, deadline)
        ctl.send_state(TEST_END, deadline=deadline)
    else:
        ctl.send_state(TEST_END, deadline=deadline)
        # the server closes its data sockets on TEST_END: read everything up to their FIN
        drain(stack, data, block, deadline, ticker, to_eof=True)
        for s in data:
            s.seconds = ((s.last or stop) - t0)
    ticker.tick(time.monotonic(), force=True)


# -- the server ---------------------------------------------------------------------------

def _refuse(ctl, ierr: int, why: str, deadline):
    with contextlib.suppress(OSError, PerfError, TimeoutError):
        ctl.send_state(SERVER_ERROR, deadline=deadline)
        send_all(ctl.stack, ctl.conn, struct.pack(">ii", ierr, 0), deadline)
    raise IperfError(why)


def serve_one(stack, *, as_json=False, accept_timeout=None, interval=1.0) -> dict:
    """One iperf3 client's test: control connection, streams, results."""
    res = {"tool": "chimney iperf3", "role": "server", "stack": stack.name, "protocol": "tcp",
           "intervals": [], "end": None, "sent": None, "received": None, "counts_agree": False,
           "peer_results": None, "error": None}
    ctl_conn, peer_addr = stack.accept(accept_timeout)
    conns = [ctl_conn]
    res["remote"] = {"host": peer_addr[0], "port": peer_addr[1]}
    report = _reporter(res, as_json)
    data = []
    try:
        deadline = time.monotonic() + 10.0
        ctl = Control(stack, ctl_conn)
        cookie = ctl.take(COOKIE_SIZE, deadline)
        res["cookie"] = cookie.rstrip(b"\0").decode(errors="replace")
        ctl.send_state(PARAM_EXCHANGE, deadline=deadline)
        params = ctl.json(deadline, MAX_PARAMS_JSON)
        res["peer_params"] = params
        if params.get("udp") or params.get("sctp") or not params.get("tcp", True):
            _refuse(ctl, IEUNIMP, f"only TCP tests (asked: {params})", deadline)
        if params.get("bidirectional"):
            _refuse(ctl, IEUNIMP, "bidirectional tests are not implemented", deadline)
        n = params.get("parallel", 1)
        if not isinstance(n, int) or not 1 <= n <= MAX_STREAMS:
            _refuse(ctl, IENUMSTREAMS, f"bad stream count {n!r}", deadline)
        blksize = params.get("len") or DEFAULT_LEN
        if not isinstance(blksize, int) or not 1 <= blksize <= 16 << 20:
            _refuse(ctl, IEBLOCKSIZE, f"bad block size {blksize!r}", deadline)
        duration = int(params.get("time") or 0) or None
        nbytes = int(params.get("num") or 0) or (int(params.get("blockcount") or 0) * blksize) or None
        reverse = bool(params.get("reverse"))
        sending = reverse
        limit = hard_timeout(duration, nbytes) + 10
        res.update(streams=n, reverse=reverse, direction="server->client" if reverse else "client->server",
                   duration=duration, bytes=nbytes, blksize=blksize, timeout=limit,
                   client_version=params.get("client_version"))
        if not as_json:
            print(f"Accepted connection from {peer_addr[0]}, port {peer_addr[1]} "
                  f"({n} stream(s), {res['direction']}, client {params.get('client_version')})", flush=True)
        ctl.send_state(CREATE_STREAMS, deadline=deadline)
        deadline = time.monotonic() + limit
        for sid in stream_ids(n):
            while True:
                c, _ = stack.accept(min(10.0, _left(deadline)))
                conns.append(c)
                if recv_exactly(stack, c, COOKIE_SIZE, deadline) == cookie:
                    break
                with contextlib.suppress(OSError, PerfError, TimeoutError):
                    send_all(stack, c, struct.pack("b", ACCESS_DENIED), deadline)
                conns.remove(c)
                with contextlib.suppress(OSError):
                    c.close()
            data.append(DataStream(sid, c, sending))
        block = memoryview(os.urandom(blksize))
        cpu = CpuMeter()
        ctl.send_state(TEST_START, TEST_RUNNING, deadline=deadline)
        t0 = time.monotonic()
        ticker = Ticker(data, interval, t0, report)
        budget = nbytes if sending else None
        safety = t0 + (duration + 40 if duration else limit)    # iperf3's server timer: -t + a grace
        while True:
            st = ctl.poll_state()
            if st == TEST_END:
                break
            if st == CLIENT_TERMINATE:
                raise IperfError("the client has terminated (CLIENT_TERMINATE)")
            if st is not None:
                raise IperfError(f"unexpected control message {state_name(st)} during the test")
            if time.monotonic() > safety:
                raise IperfError("no TEST_END from the client in time")
            _left(deadline)
            bad = [s for s in data if s.error]
            if bad:
                raise IperfError(f"data stream {bad[0].id}: {bad[0].error}")
            progress, budget = io_round(data, block, budget)
            ticker.tick(time.monotonic())
            _wait_io(stack, ctl, data, progress)
        stop = time.monotonic()
        for s in data:
            s.stopped(t0, stop)
        if sending:
            settle(stack, data, deadline)
        else:
            drain(stack, data, block, deadline, ticker, to_eof=False)
            for s in data:
                s.seconds = (s.last or stop) - t0
        ticker.tick(time.monotonic(), force=True)
        for s in data:          # iperf3's server closes its data sockets here
            with contextlib.suppress(OSError):
                s.conn.close()
            conns.remove(s.conn)
        ctl.send_state(EXCHANGE_RESULTS, deadline=deadline)
        peer = ctl.json(deadline)
        ctl.send_json(local_results(data, cpu, sending), deadline)
        ctl.send_state(DISPLAY_RESULTS, deadline=deadline)
        _finish_result(res, data, peer, sending)
        try:
            st = ctl.state(min(deadline, time.monotonic() + 5.0))
            res["client_done"] = st == IPERF_DONE
        except (IperfError, TimeoutError):
            res["client_done"] = False
    except (OSError, PerfError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        teardown(stack, conns)
    res["stack_stats"] = stack.stats()
    return res


def run_server(stack, port: int = DEFAULT_PORT, *, one_off=False, as_json=False, accept_timeout=None,
               interval=1.0) -> int:
    stack.listen(port)
    if not as_json:
        print("-----------------------------------------------------------\n"
              f"Server listening on {port} (chimney iperf3 on the {stack.name} stack)\n"
              "-----------------------------------------------------------", flush=True)
    else:
        print(f"chimney iperf3: server on the {stack.name} stack, port {port}", file=sys.stderr, flush=True)
    while True:
        try:
            res = serve_one(stack, as_json=as_json, accept_timeout=accept_timeout, interval=interval)
        except TimeoutError:
            print("chimney iperf3: no client came", file=sys.stderr)
            return 1
        res["port"] = port
        emit(res, as_json)
        rc = 0 if not res["error"] else 1
        if one_off:
            return rc


# -- command line -------------------------------------------------------------------------

def size_arg(text: str) -> int:
    """iperf3's unit_atoi: K, M, G, T are powers of 2 (either case)."""
    t = text.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1].upper() in mult:
        return int(float(t[:-1]) * mult[t[-1].upper()])
    return int(float(t))


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="iperf3_cmd", required=True)
    srv = sub.add_parser("server", help="serve iperf3 clients (iperf3 -s)")
    cli = sub.add_parser("client", help="run a test against an iperf3 server (iperf3 -c)")
    cli.add_argument("host")
    for sp in (srv, cli):
        sp.add_argument("-p", "--port", type=int, default=DEFAULT_PORT)
        sp.add_argument("--json", "-J", action="store_true", help="print one JSON object per test")
        sp.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between reports (0: none)")
        perf.add_stack_arguments(sp)
    srv.add_argument("-1", "--one-off", action="store_true", help="serve one test, then exit")
    srv.add_argument("--accept-timeout", type=float, help="give up when no client comes in time")
    cli.add_argument("-t", "--time", type=int, help=f"seconds to transmit (default {DEFAULT_TIME})")
    cli.add_argument("-n", "--bytes", type=size_arg, help="bytes to transmit (K/M/G: powers of 2, as iperf3)")
    cli.add_argument("-P", "--parallel", type=int, default=1, help="parallel streams")
    cli.add_argument("-R", "--reverse", action="store_true", help="the server sends")
    cli.add_argument("-l", "--length", type=size_arg, default=DEFAULT_LEN, help="block size (128K)")
    cli.add_argument("--timeout", type=float, help="hard timeout in seconds for the whole test")
    cli.add_argument("--connect-timeout", type=float, default=10.0)


def run(args) -> int:
    return run_on_stack(args, "chimney iperf3", lambda stack: _run(stack, args))


def _run(stack, args) -> int:
    if args.iperf3_cmd == "server":
        return run_server(stack, args.port, one_off=args.one_off, as_json=args.json,
                          accept_timeout=args.accept_timeout, interval=args.interval)
    try:
        res = run_client(stack, args.host, args.port, duration=args.time, nbytes=args.bytes,
                         streams=args.parallel, reverse=args.reverse, blksize=args.length,
                         interval=args.interval, timeout=args.timeout,
                         connect_timeout=args.connect_timeout, as_json=args.json)
    except IperfError as e:
        print(f"chimney iperf3: {e}", file=sys.stderr)
        return 2
    emit(res, args.json)
    return 0 if not res["error"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m chimney.guest.iperf3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
