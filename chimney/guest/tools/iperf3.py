"""iperf3 interoperability: iperf3's control protocol (3.x, as in Debian 12's
iperf3 3.12 and trixie's 3.18), TCP tests, on the host stack's sockets or on
kernel sockets (the stacks of chimney.guest.tools.stacks).

    python3 -m chimney.guest.iperf3 client HOST [-p 5201] [-t SECONDS | -n BYTES] [-P N] [-R]
                                    [-l LEN] [-i INTERVAL] [--json] [--stack chimney|linux] ...
    python3 -m chimney.guest.iperf3 server [-p 5201] [--one-off] [--json] [--stack ...] ...
    chimney iperf3 ...                  (the same)

The client runs a test against a real iperf3 -s; the server serves a real
iperf3 -c.  -n takes iperf3's units (K/M/G are powers of 2); without -t or
-n a test lasts 10 seconds, as iperf3's.  Stack options as chimney perf's.

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
import os
import struct
import sys
import time

from . import values
from .conn import connect_retry, recv_exactly, send_all, session, time_left
from .cpu import CpuMeter
from .iperf3_proto import (
    ACCESS_DENIED,
    CLIENT_TERMINATE,
    COOKIE_SIZE,
    CREATE_STREAMS,
    DEFAULT_LEN,
    DEFAULT_PORT,
    DEFAULT_TIME,
    DISPLAY_RESULTS,
    EXCHANGE_RESULTS,
    IEBLOCKSIZE,
    IENUMSTREAMS,
    IERRNO,
    IEUNIMP,
    IPERF_DONE,
    MAX_PARAMS_JSON,
    MAX_STREAMS,
    PARAM_EXCHANGE,
    SERVER_ERROR,
    SERVER_TERMINATE,
    TEST_END,
    TEST_RUNNING,
    TEST_START,
    VERSION,
    Control,
    DataStream,
    IperfError,
    Ticker,
    drain_streams,
    make_cookie,
    move_data,
    settle,
    state_name,
    stop_streams,
    stream_ids,
)
from .iperf3_report import FORMATS, emit, print_interval
from .options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_tool_commands,
    run_on_stack,
    tool_main,
)
from .perf import hard_timeout
from .server import serve
from .stacks import ToolError
from .values import mbps


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


# -- results -----------------------------------------------------------------------------

def _reporter(res, as_json, fmt="m", out=None, omit=0):
    """Interval reports into res (those inside the first `omit` seconds marked omitted),
    printed as text unless as_json."""
    def report(rep):
        rep["omitted"] = rep["start"] + 1e-3 < omit   # started inside the warm-up
        res["intervals"].append(rep)
        if not as_json:
            print_interval(rep, fmt, out)
    return report


def _connected(res, data) -> None:
    res["connected"] = []
    for s in data:
        local, remote = s.conn.addresses()
        res["connected"].append({"id": s.id, "local": local, "remote": remote})


def _finish_result(res, streams, peer, sending, mine: dict) -> None:
    res["peer_results"] = peer
    res["cpu_util"] = {"total": mine["cpu_util_total"], "user": mine["cpu_util_user"],
                       "system": mine["cpu_util_system"]}
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
               as_json=False, omit=0, fmt="m", out=None) -> dict:
    """One test against an iperf3 server; the result dict (res["error"] set on failure).
    omit: the first seconds' interval reports are marked omitted and the test runs that
    much longer (the totals still count every byte, so both ends' counts stay comparable;
    the server is told omit 0).  fmt, out: the text output's bitrate unit and file."""
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
    duration = int(duration) + omit if duration is not None else None
    limit = hard_timeout(duration, nbytes, timeout)
    out = out or sys.stdout
    deadline = time.monotonic() + limit
    res = {"tool": "chimney iperf3", "role": "client", "stack": stack.name,
           "remote": {"host": host, "port": port}, "protocol": "tcp", "streams": streams,
           "reverse": reverse, "direction": "server->client" if reverse else "client->server",
           "duration": duration, "bytes": nbytes, "blksize": blksize, "interval": interval,
           "timeout": limit, "intervals": [], "end": None, "sent": None, "received": None,
           "counts_agree": False, "peer_results": None, "error": None, "omit": omit,
           "version": VERSION, "started_at": time.time()}
    report = _reporter(res, as_json, fmt, out, omit)
    sending = not reverse
    conns, data = [], []
    block = memoryview(os.urandom(blksize))
    params = {"tcp": True, "omit": 0, "time": duration or 0, "num": nbytes or 0, "blockcount": 0,
              "parallel": streams, "len": blksize, "pacing_timer": 1000, "client_version": VERSION}
    if reverse:
        params["reverse"] = True
    cpu = CpuMeter()
    t0 = None
    with session(stack, conns, res):
        ctl_conn = connect_retry(stack, host, port, connect_timeout)
        conns.append(ctl_conn)
        ctl = Control(stack, ctl_conn)
        cookie = make_cookie()
        res["cookie"] = cookie[:-1].decode()
        send_all(stack, ctl_conn, cookie, deadline)
        if not as_json:
            print(f"Connecting to host {host}, port {port} (chimney iperf3 client on the {stack.name} stack)",
                  file=out, flush=True)
        while True:
            st = ctl.state(deadline)
            if st == PARAM_EXCHANGE:
                ctl.send_json(params, deadline)
            elif st == CREATE_STREAMS:
                for sid in stream_ids(streams):
                    c = stack.connect(host, port, min(10.0, time_left(deadline)))
                    conns.append(c)
                    send_all(stack, c, cookie, deadline)
                    data.append(DataStream(sid, c, sending))
                    if not as_json:
                        print(f"[{sid:3d}] connected to {host} port {port}", file=out, flush=True)
            elif st == TEST_START:
                t0, cpu = time.monotonic(), CpuMeter()
            elif st == TEST_RUNNING:
                if len(data) != streams:
                    raise IperfError("TEST_RUNNING before the streams were made")
                _connected(res, data)
                t0 = t0 or time.monotonic()
                res["settle"] = _client_data_phase(stack, ctl, data, block, t0, deadline, duration,
                                                   nbytes, Ticker(data, interval, t0, report))
            elif st == EXCHANGE_RESULTS:
                mine = local_results(data, cpu, sending)
                res["cpu"] = cpu.result()   # this process's and the whole machine's, data phase only
                ctl.send_json(mine, deadline)
                _finish_result(res, data, ctl.json(deadline), sending, mine)
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
    return res


def _client_data_phase(stack, ctl, data, block, t0, deadline, duration, nbytes, ticker):
    """-> the sender's settle figures (None when receiving)."""
    sending = data[0].sending
    budget = nbytes if sending else None
    while True:
        time_left(deadline)
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
        budget = move_data(stack, ctl, data, block, budget, ticker)
    stop = stop_streams(data, t0)
    settled = None
    if sending:
        settled = settle(stack, data, deadline)
        ctl.send_state(TEST_END, deadline=deadline)
    else:
        ctl.send_state(TEST_END, deadline=deadline)
        # the server closes its data sockets on TEST_END: read everything up to their FIN
        drain_streams(stack, data, block, deadline, ticker, t0, stop, to_eof=True)
    ticker.tick(time.monotonic(), force=True)
    return settled


# -- the server ---------------------------------------------------------------------------

def _refuse(ctl, ierr: int, why: str, deadline):
    with contextlib.suppress(OSError, ToolError, TimeoutError):
        ctl.send_state(SERVER_ERROR, deadline=deadline)
        send_all(ctl.stack, ctl.conn, struct.pack(">ii", ierr, 0), deadline)
    raise IperfError(why)


def serve_one(stack, *, as_json=False, accept_timeout=None, interval=1.0, fmt="m", out=None) -> dict:
    """One iperf3 client's test: control connection, streams, results."""
    res = {"tool": "chimney iperf3", "role": "server", "stack": stack.name, "protocol": "tcp",
           "intervals": [], "end": None, "sent": None, "received": None, "counts_agree": False,
           "peer_results": None, "error": None, "interval": interval}
    out = out or sys.stdout
    ctl_conn, peer_addr = stack.accept(accept_timeout)
    conns = [ctl_conn]
    res["remote"] = {"host": peer_addr[0], "port": peer_addr[1]}
    report = _reporter(res, as_json, fmt, out)
    data = []
    with session(stack, conns, res):
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
                   client_version=params.get("client_version"), version=VERSION, started_at=time.time())
        if not as_json:
            print(f"Accepted connection from {peer_addr[0]}, port {peer_addr[1]} "
                  f"({n} stream(s), {res['direction']}, client {params.get('client_version')})",
                  file=out, flush=True)
        ctl.send_state(CREATE_STREAMS, deadline=deadline)
        deadline = time.monotonic() + limit
        for sid in stream_ids(n):
            while True:
                c, _ = stack.accept(min(10.0, time_left(deadline)))
                conns.append(c)
                if recv_exactly(stack, c, COOKIE_SIZE, deadline) == cookie:
                    break
                with contextlib.suppress(OSError, ToolError, TimeoutError):
                    send_all(stack, c, struct.pack("b", ACCESS_DENIED), deadline)
                conns.remove(c)
                with contextlib.suppress(OSError):
                    c.close()
            data.append(DataStream(sid, c, sending))
        _connected(res, data)
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
            time_left(deadline)
            bad = [s for s in data if s.error]
            if bad:
                raise IperfError(f"data stream {bad[0].id}: {bad[0].error}")
            budget = move_data(stack, ctl, data, block, budget, ticker)
        stop = stop_streams(data, t0)
        if sending:
            res["settle"] = settle(stack, data, deadline)
        else:
            drain_streams(stack, data, block, deadline, ticker, t0, stop, to_eof=False)
        ticker.tick(time.monotonic(), force=True)
        for s in data:          # iperf3's server closes its data sockets here
            with contextlib.suppress(OSError):
                s.conn.close()
            conns.remove(s.conn)
        ctl.send_state(EXCHANGE_RESULTS, deadline=deadline)
        peer = ctl.json(deadline)
        mine = local_results(data, cpu, sending)
        ctl.send_json(mine, deadline)
        ctl.send_state(DISPLAY_RESULTS, deadline=deadline)
        _finish_result(res, data, peer, sending, mine)
        try:
            st = ctl.state(min(deadline, time.monotonic() + 5.0))
            res["client_done"] = st == IPERF_DONE
        except (IperfError, TimeoutError):
            res["client_done"] = False
    return res


# -- command line -------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    srv, cli = add_tool_commands(p, dest="iperf3_cmd", port=DEFAULT_PORT,
                                 server_help="serve iperf3 clients (iperf3 -s; also: -s)",
                                 client_help="run a test against an iperf3 server (iperf3 -c; also: -c HOST)",
                                 once_flags=("-1", "--one-off"), json_flags=("-J", "--json"),
                                 json_help="print one JSON object per test, in iperf3's -J schema "
                                           "(chimney's own fields under the key chimney)")
    for sp in (srv, cli):
        sp.add_argument("-f", "--format", choices=sorted(FORMATS, key=str.lower), default="m",
                        help="bitrate unit of the text output: k/m/g/t bits per second, K/M/G/T bytes "
                             "per second (default m)")
        sp.add_argument("--logfile", metavar="FILE", type=values.output_file,
                        help="write the output (text or -J JSON) to FILE instead of stdout, appending")
        fam = sp.add_mutually_exclusive_group()
        fam.add_argument("-4", "--version4", dest="family", action="store_const", const=4,
                         help="IPv4 only (linux stack: IPv4 sockets; chimney stack: no IPv6 address)")
        fam.add_argument("-6", "--version6", dest="family", action="store_const", const=6,
                         help="IPv6 only (linux stack: IPv6 sockets; chimney stack: no IPv4 address)")
        sp.add_argument("-w", "--window", type=values.size, metavar="BYTES",
                        help="our side's socket buffers: SO_SNDBUF/SO_RCVBUF on the linux stack, the host "
                             "stack's TCP send and receive buffers on chimney (the peer keeps its own)")
        sp.add_argument("-M", "--set-mss", dest="mss", type=values.mss, metavar="BYTES",
                        help="the MSS our side uses: TCP_MAXSEG on the linux stack, the MSS the host stack "
                             "advertises on chimney")
    cli.add_argument("-t", "--time", type=values.count, metavar="SECONDS",
                     help=f"whole seconds to transmit (default {DEFAULT_TIME} when -n is not given)")
    cli.add_argument("-n", "--bytes", type=values.size, metavar="BYTES",
                     help=f"bytes to transmit, all streams together ({values.SIZE_HELP})")
    cli.add_argument("-P", "--parallel", type=values.count, default=1, metavar="N",
                     help=f"parallel data streams (default 1, at most {MAX_STREAMS})")
    cli.add_argument("-R", "--reverse", action="store_true", help="the server sends, the client receives")
    cli.add_argument("-l", "--length", type=values.size, default=DEFAULT_LEN, metavar="BYTES",
                     help=f"block size: bytes per send (default 128K; {values.SIZE_HELP})")
    cli.add_argument("-O", "--omit", type=values.omit, default=0, metavar="SECONDS",
                     help="warm-up: mark the first SECONDS of interval reports omitted and run that "
                          "much longer; the totals still count every byte (both ends must agree)")


def run(args) -> int:
    return run_on_stack(args, "chimney iperf3", lambda stack: _with_output(stack, args))


def _with_output(stack, args) -> int:
    if not args.logfile:
        return _run(stack, args, sys.stdout)
    try:
        f = open(args.logfile, "a")     # noqa: SIM115 -- closed below, the run in between
    except OSError as e:
        raise ToolError(f"cannot write {args.logfile}: {e.strerror}") from None
    with f:
        return _run(stack, args, f)


def _run(stack, args, out) -> int:
    if args.iperf3_cmd == "server":
        def banner():
            if args.json:
                print(f"chimney iperf3: server on the {stack.name} stack, port {args.port}",
                      file=sys.stderr, flush=True)
            else:
                print("-----------------------------------------------------------\n"
                      f"Server listening on {args.port} (chimney iperf3 on the {stack.name} stack)\n"
                      "-----------------------------------------------------------", file=out, flush=True)
        return serve(stack, args.port, tool="chimney iperf3", once=args.once, banner=banner,
                     serve_one=lambda: serve_one(stack, as_json=args.json, accept_timeout=args.accept_timeout,
                                                 interval=args.interval, fmt=args.format, out=out),
                     emit=lambda res: emit(res, args.json, args.format, out), ok=lambda res: not res["error"])
    try:
        res = run_client(stack, args.host, args.port, duration=args.time, nbytes=args.bytes,
                         streams=args.parallel, reverse=args.reverse, blksize=args.length,
                         interval=args.interval, timeout=args.timeout, connect_timeout=args.connect_timeout,
                         as_json=args.json, omit=args.omit, fmt=args.format, out=out)
    except IperfError as e:
        print(f"chimney iperf3: {e}", file=sys.stderr)
        return EXIT_USAGE
    emit(res, args.json, args.format, out)
    return EXIT_OK if not res["error"] else EXIT_FAILED


def iperf3_argv(argv: list[str]) -> list[str]:
    """iperf3's own forms as subcommands: -s [OPTS] -> server [OPTS]; -c HOST [OPTS] ->
    client HOST [OPTS] (also --server, --client HOST, --client=HOST, -cHOST)."""
    argv = list(argv)
    if argv[:1] in (["server"], ["client"]):
        return argv
    for i, a in enumerate(argv):
        if a in ("-s", "--server"):
            return ["server", *argv[:i], *argv[i + 1:]]
        if a in ("-c", "--client") and i + 1 < len(argv):
            return ["client", argv[i + 1], *argv[:i], *argv[i + 2:]]
        if a.startswith("--client="):
            return ["client", a.partition("=")[2], *argv[:i], *argv[i + 1:]]
        if a.startswith("-c") and len(a) > 2 and not a.startswith("--"):
            return ["client", a[2:], *argv[:i], *argv[i + 1:]]
    return argv


def main(argv=None) -> int:
    argv = iperf3_argv(sys.argv[1:] if argv is None else argv)
    return tool_main("python3 -m chimney.guest.iperf3", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
