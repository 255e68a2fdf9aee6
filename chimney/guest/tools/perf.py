"""chimney perf: an iperf-style throughput test on the host stack's socket API
(or on plain Linux sockets, for the peer and the baseline).

    chimney perf server [--port 5201] [--once] [--stack chimney|linux] ...
    chimney perf client HOST [--port 5201] (-t SECONDS | -n BYTES) [-P STREAMS] [-R]
                             [-i INTERVAL] [--json] [--ipv6] [--stack chimney|linux] ...
    python3 -m chimney.guest.perf ...       (the same, where the console script is missing)

--stack chimney (default): the guest host stack on the NIC; --bus vfio inside
the VM (the default when /dev/vfio exists), --bus host --socket PATH on the
host bus; our addresses --ip A/P and --ip6 B/P.  --stack linux: kernel sockets.

TCP chimney offload (--stack chimney): --offload off (the default, so that a
run means the host stack's software TCP unless asked otherwise), on (every
connection is offloaded right after its handshake, before its first data
byte; an error if the NIC lacks the feature) or auto (offloaded once 1 MB
moved in software).  --upload-after BYTES takes each data stream back into
software TCP after BYTES of it (sent or received) moved.  The JSON gains per
stream offloaded, uploads, software_data_segments_out (data segments
the software TCP sent for that connection), device (the NIC's delegated
state from a QUERY at the end of the data phase: cwnd, srtt, bytes...) and rss
(the offload queue set that served it last and the records each set carried;
--rss-queues N sets how many sets there are).

Protocol (version 1).  The client opens a control connection and sends one
JSON line {"perf": 1, "reverse", "streams", "bytes", "duration", "seed",
"timeout"}; the server answers {"ok": true} (or {"ok": false, "error"}).  The
client opens streams data connections, each starting with an 8-byte header
b"CHPD" + stream index (big-endian u32).  The sender of each stream (client,
or server with -R) writes a deterministic pseudo-random stream seeded by
(seed, index) until its byte share (-n, split over the streams) is sent or
the duration (-t) is up, then shuts its write side; the receiver reads to
EOF.  Both ends hash (sha256) what they sent and received per stream and
exchange one JSON result line each over the control connection; verified
is true only if for every stream the sender's and the receiver's byte counts
and digests match.  Every run is bounded by -t/-n and a hard timeout.

Pure standard library (the guest has Python 3.13 and nothing else).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import socket
import struct
import sys
import time

from . import values
from .conn import (
    LineReader,
    connect_retry,
    recv_exactly,
    send_all,
    send_line,
    session,
    time_left,
)
from .cpu import CpuMeter
from .options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_tool_commands,
    run_on_stack,
    tool_main,
)
from .server import serve
from .stacks import ToolError
from .values import mbps

PerfError = ToolError       # the name older code and tests import

PROTO = 1
DEFAULT_PORT = 5201
CHUNK = 256 * 1024          # bytes per send call and per receive call
POOL_BITS = 20              # the data: CHUNK-sized windows into a 1 MiB random pool
HEADER = b"CHPD"


def hard_timeout(duration, nbytes, given=None) -> float:
    if given:
        return float(given)
    if duration:
        return float(duration) + 30.0
    return 120.0 + (nbytes or 0) / 1e6


# -- the data phase -----------------------------------------------------------------------

def stream_chunks(seed, idx: int):
    """A stream's data, deterministic in (seed, idx): CHUNK-byte windows at pseudo-random
    offsets into a pseudo-random pool (random.randbytes of every byte cost more guest CPU
    than the rest of the offloaded send path).  Yields memoryviews (no copies)."""
    rng = random.Random(f"{seed}:{idx}")
    pool = memoryview(rng.randbytes((1 << POOL_BITS) + CHUNK))
    bits = rng.getrandbits
    while True:
        off = bits(POOL_BITS)
        yield pool[off:off + CHUNK]


def stream_data(seed, idx: int, n: int) -> bytes:
    """The first n bytes of a stream (for tests)."""
    out, gen = bytearray(), stream_chunks(seed, idx)
    while len(out) < n:
        out += next(gen)[:n - len(out)]
    return bytes(out)


class Stream:
    def __init__(self, idx: int, conn, sending: bool, seed: int, nbytes, duration):
        self.idx, self.conn, self.sending = idx, conn, sending
        self.limit = nbytes
        self.duration = duration
        self.chunks = stream_chunks(seed, idx) if sending else None
        self.hash = hashlib.sha256()
        self.count = 0
        self.interval_count = 0
        self.done = False
        self.seconds = 0.0
        self.pending = memoryview(b"")
        self.queued = 0             # bytes taken into pending so far

    def next_chunk(self, elapsed: float) -> bool:
        if self.duration is not None and elapsed >= self.duration:
            return False
        n = CHUNK
        if self.limit is not None:
            n = min(n, self.limit - self.queued)
            if n <= 0:
                return False
        c = next(self.chunks)
        self.pending = c if n == CHUNK else c[:n]
        self.queued += n
        return True


def split_bytes(total: int, streams: int) -> list[int]:
    return [total // streams + (1 if i < total % streams else 0) for i in range(streams)]


def run_streams(stack, streams: list[Stream], deadline, interval, report) -> float:
    """Move the data until every stream is done; interval reports go to report(dict)."""
    t0 = time.monotonic()
    next_tick = t0 + interval if interval else None
    last_tick = t0
    while not all(s.done for s in streams):
        time_left(deadline)
        now = time.monotonic()
        progress = False
        for s in streams:
            if s.done:
                continue
            if s.sending:
                for _ in range(8):
                    if not s.pending and not s.next_chunk(now - t0):
                        s.conn.shutdown_wr()
                        s.done, s.seconds = True, time.monotonic() - t0
                        progress = True
                        break
                    n = s.conn.send(s.pending)
                    if not n:
                        break
                    s.hash.update(s.pending[:n])
                    s.pending = s.pending[n:]
                    s.count += n
                    s.interval_count += n
                    progress = True
            else:
                for _ in range(16):
                    b = s.conn.recv(CHUNK)
                    if b is None:
                        break
                    progress = True
                    if not b:
                        s.done, s.seconds = True, time.monotonic() - t0
                        break
                    s.hash.update(b)
                    s.count += len(b)
                    s.interval_count += len(b)
        now = time.monotonic()
        if next_tick is not None and (now >= next_tick or all(s.done for s in streams)):
            dt = now - last_tick
            rep = {"start": round(last_tick - t0, 3), "end": round(now - t0, 3),
                   "streams": [{"id": s.idx, "bytes": s.interval_count,
                                "mbps": mbps(s.interval_count, dt), **s.conn.tcp_stats()}
                               for s in streams]}
            rep["bytes"] = sum(x["bytes"] for x in rep["streams"])
            rep["mbps"] = mbps(rep["bytes"], dt)
            report(rep)
            for s in streams:
                s.interval_count = 0
            last_tick = now
            next_tick = now + interval
        if progress:
            stack.pump()
        else:
            stack.wait(0.01, [s.conn for s in streams if not s.done and not s.sending],
                       [s.conn for s in streams if not s.done and s.sending])
    return time.monotonic() - t0


def local_result(streams: list[Stream]) -> dict:
    out = []
    for s in streams:
        r = {"id": s.idx, "role": "sender" if s.sending else "receiver", "bytes": s.count,
             "seconds": round(s.seconds, 6), "sha256": s.hash.hexdigest()}
        if s.sending:
            r["retransmits"] = s.conn.retransmits()
            r["retransmitted_bytes"] = s.conn.retransmitted_bytes(s.count)
        if hasattr(s.conn, "offload_info"):
            r.update(s.conn.offload_info())
        out.append(r)
    return {"streams": out}


def summarize(mine: dict, peer: dict, nstreams: int) -> dict:
    """Per stream and summed, the sender's and the receiver's view; verified."""
    by_id = {}
    for side in (mine, peer):
        for r in side.get("streams", []):
            by_id.setdefault(r["id"], {})[r["role"]] = r
    streams, verified = [], len(by_id) == nstreams
    sums = {"sender": {"bytes": 0, "seconds": 0.0, "retransmits": None, "retransmitted_bytes": None},
            "receiver": {"bytes": 0, "seconds": 0.0}}
    for i in sorted(by_id):
        d = by_id[i]
        snd, rcv = d.get("sender"), d.get("receiver")
        ok = bool(snd and rcv and snd["bytes"] == rcv["bytes"] and snd["bytes"] > 0
                  and snd["sha256"] == rcv["sha256"])
        verified = verified and ok
        entry = {"id": i, "verified": ok}
        for role, r in (("sender", snd), ("receiver", rcv)):
            if r is None:
                entry[role] = None
                continue
            e = {"bytes": r["bytes"], "seconds": r["seconds"], "mbps": mbps(r["bytes"], r["seconds"]),
                 "sha256": r["sha256"]}
            sums[role]["bytes"] += r["bytes"]
            sums[role]["seconds"] = max(sums[role]["seconds"], r["seconds"])
            for k in ("offloaded", "uploads", "software_data_segments_out", "device", "rss"):
                if k in r:
                    e[k] = r[k]
            if role == "sender":
                for k in ("retransmits", "retransmitted_bytes"):
                    e[k] = r.get(k)
                    if r.get(k) is not None:
                        sums["sender"][k] = (sums["sender"][k] or 0) + r[k]
            entry[role] = e
        streams.append(entry)
    for v in sums.values():
        v["mbps"] = mbps(v["bytes"], v["seconds"])
    return {"streams": streams, "sum": sums, "verified": verified}


# -- output -------------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / 1e6:8.2f} MB"


def print_interval(rep: dict, out=sys.stdout) -> None:
    rng = f"{rep['start']:6.2f}-{rep['end']:6.2f} sec"
    if len(rep["streams"]) > 1:
        for s in rep["streams"]:
            print(f"[{s['id']:3d}] {rng} {_size(s['bytes'])} {s['mbps']:10.2f} Mbit/s", file=out)
    print(f"[SUM] {rng} {_size(rep['bytes'])} {rep['mbps']:10.2f} Mbit/s", file=out, flush=True)


def print_summary(res: dict, out=sys.stdout) -> None:
    print("- - - - - - - - - - - - - - - - - - - - - - - - -", file=out)
    if res.get("error"):
        print(f"error: {res['error']}", file=out)
    summ = res.get("summary")
    if summ:
        rows = [(f"{s['id']:3d}", s) for s in summ["streams"]] + [("SUM", summ["sum"])]
        for tag, s in rows:
            for role in ("sender", "receiver"):
                r = s.get(role)
                if not r:
                    continue
                extra = ""
                if role == "sender" and r.get("retransmits") is not None:
                    extra = f"  retransmits {r['retransmits']}"
                elif role == "sender" and r.get("retransmitted_bytes") is not None:
                    extra = f"  retransmitted {r['retransmitted_bytes']} B"
                print(f"[{tag}]   0.00-{r['seconds']:6.2f} sec {_size(r['bytes'])} "
                      f"{r['mbps']:10.2f} Mbit/s  {role}{extra}", file=out)
        print(f"verified: {'yes' if summ['verified'] else 'NO'} "
              f"(sha256 of every stream at both ends)", file=out)
    out.flush()


def emit(res: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res), flush=True)
    else:
        print_summary(res)


# -- client and server --------------------------------------------------------------------

def run_client(stack, host: str, port: int, *, duration=None, nbytes=None, streams=1,
               reverse=False, interval=1.0, timeout=None, seed=None, connect_timeout=10.0,
               as_json=False) -> dict:
    if (duration is None) == (nbytes is None):
        raise PerfError("give exactly one of -t SECONDS or -n BYTES")
    if nbytes is not None and nbytes < streams:
        raise PerfError("-n must be at least one byte per stream")
    if duration is not None and duration <= 0:
        raise PerfError("-t must be positive")
    seed = random.getrandbits(32) if seed is None else seed
    limit = hard_timeout(duration, nbytes, timeout)
    deadline = time.monotonic() + limit
    res = {"tool": "chimney perf", "protocol": PROTO, "role": "client", "stack": stack.name,
           "remote": {"host": host, "port": port}, "reverse": reverse,
           "direction": "server->client" if reverse else "client->server", "streams": streams,
           "bytes": nbytes, "duration": duration, "interval": interval, "seed": seed,
           "timeout": limit, "intervals": [], "summary": None, "verified": False, "error": None}

    def report(rep):
        res["intervals"].append(rep)
        if not as_json:
            print_interval(rep)

    conns = []
    with session(stack, conns, res):
        ctl = connect_retry(stack, host, port, connect_timeout)
        conns.append(ctl)
        reader = LineReader(stack, ctl)
        send_line(stack, ctl, {"perf": PROTO, "reverse": reverse, "streams": streams, "bytes": nbytes,
                               "duration": duration, "seed": seed, "timeout": limit}, deadline)
        ans = reader.line(deadline)
        if not ans.get("ok"):
            raise PerfError(f"server refused: {ans.get('error')}")
        if not as_json:
            print(f"chimney perf: client on the {stack.name} stack -> {host}:{port}, "
                  f"{streams} stream(s), {f'{nbytes} bytes' if nbytes else f'{duration} s'}, "
                  f"{res['direction']}", flush=True)
        data = []
        for i in range(streams):
            c = stack.connect(host, port, min(10.0, time_left(deadline)))
            conns.append(c)
            send_all(stack, c, HEADER + struct.pack(">I", i), deadline)
            data.append(c)
        shares = split_bytes(nbytes, streams) if nbytes is not None else [None] * streams
        ss = [Stream(i, c, not reverse, seed, shares[i], duration) for i, c in enumerate(data)]
        cpu = CpuMeter()
        run_streams(stack, ss, deadline, interval, report)
        res["cpu"] = cpu.result()
        mine = local_result(ss)
        send_line(stack, ctl, mine, deadline)
        peer = reader.line(deadline)
        if peer.get("error"):
            raise PerfError(f"server: {peer['error']}")
        res["summary"] = summarize(mine, peer, streams)
        res["verified"] = res["summary"]["verified"]
    return res


def serve_one(stack, *, as_json=False, accept_timeout=None, interval=1.0) -> dict:
    """One client session: control connection, data streams, results."""
    res = {"tool": "chimney perf", "protocol": PROTO, "role": "server", "stack": stack.name,
           "intervals": [], "summary": None, "verified": False, "error": None}
    ctl, peer_addr = stack.accept(accept_timeout)
    conns = [ctl]
    res["remote"] = {"host": peer_addr[0], "port": peer_addr[1]}

    def report(rep):
        res["intervals"].append(rep)
        if not as_json:
            print_interval(rep)

    with session(stack, conns, res):
        deadline = time.monotonic() + 10.0
        reader = LineReader(stack, ctl)
        req = reader.line(deadline)
        n = req.get("streams")
        if req.get("perf") != PROTO or not isinstance(n, int) or not 1 <= n <= 128:
            send_line(stack, ctl, {"ok": False, "error": f"bad request {req!r}"}, deadline)
            raise PerfError(f"bad request {req!r}")
        nbytes, duration = req.get("bytes"), req.get("duration")
        limit = min(float(req.get("timeout") or hard_timeout(duration, nbytes)),
                    hard_timeout(duration, nbytes) * 2)
        deadline = time.monotonic() + limit
        reverse = bool(req.get("reverse"))
        res.update(reverse=reverse, streams=n, bytes=nbytes, duration=duration, seed=req.get("seed"),
                   timeout=limit, direction="server->client" if reverse else "client->server")
        send_line(stack, ctl, {"ok": True}, deadline)
        if not as_json:
            print(f"chimney perf: accepted {peer_addr[0]}:{peer_addr[1]} ({n} stream(s), "
                  f"{res['direction']})", flush=True)
        data = {}
        while len(data) < n:
            c, _ = stack.accept(min(10.0, time_left(deadline)))
            conns.append(c)
            hdr = recv_exactly(stack, c, 8, deadline)
            idx = struct.unpack(">I", hdr[4:])[0]
            if hdr[:4] != HEADER or idx >= n or idx in data:
                raise PerfError(f"bad data stream header {hdr!r}")
            data[idx] = c
        shares = split_bytes(nbytes, n) if nbytes is not None else [None] * n
        ss = [Stream(i, data[i], reverse, req.get("seed"), shares[i], duration) for i in range(n)]
        cpu = CpuMeter()
        run_streams(stack, ss, deadline, interval, report)
        res["cpu"] = cpu.result()
        mine = local_result(ss)
        peer = reader.line(deadline)
        send_line(stack, ctl, mine, deadline)
        res["summary"] = summarize(mine, peer, n)
        res["verified"] = res["summary"]["verified"]
    return res


# -- command line -------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    _, cli = add_tool_commands(p, dest="perf_cmd", port=DEFAULT_PORT, server_help="wait for clients",
                               client_help="run a test against a server")
    g = cli.add_mutually_exclusive_group(required=True)
    g.add_argument("-t", "--time", type=values.seconds, metavar="SECONDS", help="seconds to send")
    g.add_argument("-n", "--bytes", type=values.size, metavar="BYTES",
                   help=f"bytes to send, split over the streams ({values.SIZE_HELP})")
    cli.add_argument("-P", "--parallel", type=values.count, default=1, metavar="N",
                     help="parallel data streams (default 1)")
    cli.add_argument("-R", "--reverse", action="store_true", help="the server sends, the client receives")
    cli.add_argument("--ipv6", action="store_true", help="HOST is (or resolve it as) IPv6")
    cli.add_argument("--seed", type=int, help="data seed (default: random)")


def run(args) -> int:
    return run_on_stack(args, "chimney perf", lambda stack: _run(stack, args))


def _run(stack, args) -> int:
    if args.perf_cmd == "server":
        return serve(stack, args.port, tool="chimney perf", once=args.once,
                     serve_one=lambda: serve_one(stack, as_json=args.json, accept_timeout=args.accept_timeout,
                                                 interval=args.interval),
                     emit=lambda res: emit(res, args.json),
                     ok=lambda res: res["verified"] and not res["error"])
    host = args.host
    if args.ipv6 and ":" not in host:
        try:
            host = socket.getaddrinfo(host, None, socket.AF_INET6)[0][4][0]
        except socket.gaierror as e:
            print(f"chimney perf: {host}: {e.strerror}", file=sys.stderr)
            return EXIT_USAGE
    res = run_client(stack, host, args.port, duration=args.time, nbytes=args.bytes,
                     streams=args.parallel, reverse=args.reverse, interval=args.interval,
                     timeout=args.timeout, seed=args.seed, connect_timeout=args.connect_timeout,
                     as_json=args.json)
    res["stack"] = stack.name
    emit(res, args.json)
    return EXIT_OK if res["verified"] and not res["error"] else EXIT_FAILED


def tune_malloc() -> None:
    """Keep the data path's large buffers (every recv returns a fresh bytes object of up to
    CHUNK bytes) on the heap: glibc gives allocations over 128 KiB their own mmap, and
    mapping, faulting in and unmapping 64 pages per call cost 4x the copy itself in the
    VM.  Same for every stack (kernel sockets' recv allocates alike).  glibc only."""
    import ctypes
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)     # M_TRIM_THRESHOLD


def main(argv=None) -> int:
    tune_malloc()
    return tool_main("python3 -m chimney.guest.perf", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
