"""chimney rr: request/response transactions per second over one TCP
connection, on the host stack's socket API (offloaded or software TCP) or on
plain Linux sockets -- the same stacks and stack options as chimney perf.

    python3 -m chimney.guest.rr server [--port 5301] [--once] [--stack ...] ...
    python3 -m chimney.guest.rr client HOST [--port 5301] [--size 64] [--count N] [--time S]
                                      [--json] [--stack chimney|linux] [--bus vfio|host] [--offload on|off] ...

The client connects (retrying until the server listens), sends an 8-byte
header b"CHRR" + request size (big-endian u32), then runs transactions: a
size-byte request, the server answers with size bytes (the request with
its first byte incremented, so that an answer is checked, not just counted),
the client waits for the whole answer before the next request.  It stops
after --count transactions or --time seconds, whichever comes first, shuts
its write side and prints transactions/s and latency percentiles (one JSON
line with --json).  Every run is bounded by --count, --time and --timeout.

Pure standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import time

from . import values
from .conn import connect_retry, recv_exactly, send_all, session
from .options import EXIT_FAILED, EXIT_OK, add_tool_commands, run_on_stack, tool_main
from .server import serve
from .stacks import ToolError

DEFAULT_PORT = 5301
HEADER = b"CHRR"
MAX_SIZE = 1 << 20


def _answer(req: bytes) -> bytes:
    return bytes([(req[0] + 1) & 0xFF]) + req[1:]


def serve_one(stack, *, accept_timeout=None, timeout=120.0) -> dict:
    """Answer one client's requests until it shuts its write side."""
    conn, peer = stack.accept(accept_timeout)
    deadline = time.monotonic() + timeout
    res = {"tool": "chimney rr", "role": "server", "stack": stack.name,
           "remote": {"host": peer[0], "port": peer[1]}, "transactions": 0, "error": None}
    conns = [conn]
    with session(stack, conns, res):
        hdr = recv_exactly(stack, conn, 8, deadline)
        size = struct.unpack(">I", hdr[4:])[0]
        if hdr[:4] != HEADER or not 1 <= size <= MAX_SIZE:
            raise ToolError(f"bad rr header {hdr!r}")
        res["size"] = size
        while True:
            try:
                req = recv_exactly(stack, conn, size, deadline)
            except ToolError:           # the client shut its side: the end of the run
                break
            send_all(stack, conn, _answer(req), deadline)
            res["transactions"] += 1
    return res


def run_client(stack, host: str, port: int, *, size=64, count=10_000, duration=10.0, timeout=None,
               connect_timeout=10.0) -> dict:
    if not 1 <= size <= MAX_SIZE:
        raise ToolError(f"--size must be 1..{MAX_SIZE}")
    limit = float(timeout or (duration + 30.0))
    deadline = time.monotonic() + limit
    res = {"tool": "chimney rr", "role": "client", "stack": stack.name, "remote": {"host": host, "port": port},
           "size": size, "count": count, "duration": duration, "transactions": 0, "seconds": 0.0,
           "tps": 0.0, "latency_us": None, "verified": False, "error": None}
    conns = []
    lat = []
    with session(stack, conns, res):
        conn = connect_retry(stack, host, port, connect_timeout)
        conns.append(conn)
        info = getattr(conn, "offload_info", None)
        send_all(stack, conn, HEADER + struct.pack(">I", size), deadline)
        req = os.urandom(size)
        ok = True
        t0 = time.perf_counter()
        end = t0 + duration
        n = 0
        while n < count:
            t = time.perf_counter()
            if t >= end:
                break
            send_all(stack, conn, req, deadline)
            ans = recv_exactly(stack, conn, size, deadline)
            lat.append(time.perf_counter() - t)
            ok = ok and ans == _answer(req)
            n += 1
        secs = time.perf_counter() - t0
        res.update(transactions=n, seconds=round(secs, 4), tps=round(n / secs, 1) if secs > 0 else 0.0,
                   verified=ok and n > 0)
        if info is not None:
            res["offload"] = info()
        conn.shutdown_wr()
        # the server sees EOF and closes; give it a moment (best effort)
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            b = conn.recv(65536)
            if b == b"":
                break
            if b is None:
                stack.wait(0.05, (conn,))
    if lat:
        lat.sort()
        us = [x * 1e6 for x in lat]
        res["latency_us"] = {"min": round(us[0], 1), "median": round(statistics.median(us), 1),
                             "p99": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1),
                             "max": round(us[-1], 1), "mean": round(statistics.fmean(us), 1)}
    return res


def _request_size(text: str) -> int:
    n = values.parse_size(text)
    if n > MAX_SIZE:
        raise ValueError(f"--size {text!r}: at most {MAX_SIZE} bytes (1M)")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    _, cli = add_tool_commands(p, dest="rr_cmd", port=DEFAULT_PORT, server_help="answer requests",
                               client_help="send requests, count transactions",
                               json_help="print one JSON line per run", interval=False)
    cli.add_argument("--size", type=values.argparse_type(_request_size), default=64, metavar="BYTES",
                     help=f"request and response size (default 64, at most 1M; {values.SIZE_HELP})")
    cli.add_argument("--count", type=values.count, default=10_000, metavar="N",
                     help="at most this many transactions (default 10000)")
    cli.add_argument("-t", "--time", type=values.seconds, default=10.0, metavar="SECONDS",
                     help="at most this many seconds (default 10)")


def _print(res: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res), flush=True)
        return
    if res["role"] == "server":
        print(f"chimney rr: served {res['transactions']} transactions"
              + (f" ({res['error']})" if res["error"] else ""), flush=True)
        return
    lat = res.get("latency_us") or {}
    print(f"chimney rr: {res['transactions']} x {res['size']} B in {res['seconds']:.2f} s on the "
          f"{res['stack']} stack: {res['tps']:,.0f} transactions/s, latency median "
          f"{lat.get('median', 0):.0f} us, p99 {lat.get('p99', 0):.0f} us"
          + ("" if res["verified"] else " NOT VERIFIED") + (f" ({res['error']})" if res["error"] else ""),
          flush=True)


def run(args) -> int:
    return run_on_stack(args, "chimney rr", lambda stack: _run(stack, args))


def _run(stack, args) -> int:
    if args.rr_cmd == "server":
        return serve(stack, args.port, tool="chimney rr", once=args.once,
                     serve_one=lambda: serve_one(stack, accept_timeout=args.accept_timeout,
                                                 timeout=args.timeout or 600.0),
                     emit=lambda res: _print(res, args.json), ok=lambda res: not res["error"])
    res = run_client(stack, args.host, args.port, size=args.size, count=args.count, duration=args.time,
                     timeout=args.timeout, connect_timeout=args.connect_timeout)
    _print(res, args.json)
    return EXIT_OK if res["verified"] and not res["error"] else EXIT_FAILED


def main(argv=None) -> int:
    return tool_main("python3 -m chimney.guest.rr", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
