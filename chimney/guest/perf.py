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
stream `offloaded`, `uploads`, `software_data_segments_out` (data segments
the software TCP sent for that connection) and `device` (the NIC's delegated
state from a QUERY at the end of the data phase: cwnd, srtt, bytes...).

Protocol (version 1).  The client opens a control connection and sends one
JSON line {"perf": 1, "reverse", "streams", "bytes", "duration", "seed",
"timeout"}; the server answers {"ok": true} (or {"ok": false, "error"}).  The
client opens `streams` data connections, each starting with an 8-byte header
b"CHPD" + stream index (big-endian u32).  The sender of each stream (client,
or server with -R) writes a deterministic pseudo-random stream seeded by
(seed, index) until its byte share (-n, split over the streams) is sent or
the duration (-t) is up, then shuts its write side; the receiver reads to
EOF.  Both ends hash (sha256) what they sent and received per stream and
exchange one JSON result line each over the control connection; `verified`
is true only if for every stream the sender's and the receiver's byte counts
and digests match.  Every run is bounded by -t/-n and a hard timeout.

Pure standard library (the guest has Python 3.13 and nothing else).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import select
import socket
import struct
import sys
import time

PROTO = 1
DEFAULT_PORT = 5201
CHUNK = 256 * 1024          # bytes per send call and per receive call
POOL_BITS = 20              # the data: CHUNK-sized windows into a 1 MiB random pool
HEADER = b"CHPD"
DEFAULT_IP4 = "10.199.0.2/24"       # chimney.host.netns.PeerAddrs: the guest's addresses
DEFAULT_IP6 = "fd00:c41e::2/64"


class PerfError(Exception):
    pass


def mbps(nbytes: int, secs: float) -> float:
    return round(nbytes * 8 / 1e6 / secs, 3) if secs > 0 else 0.0


def hard_timeout(duration, nbytes, given=None) -> float:
    if given:
        return float(given)
    if duration:
        return float(duration) + 30.0
    return 120.0 + (nbytes or 0) / 1e6


# -- the two stacks ----------------------------------------------------------------------

class LinuxConn:
    def __init__(self, s: socket.socket):
        s.setblocking(False)
        self.s = s

    def fileno(self):
        return self.s.fileno()

    def send(self, data) -> int:
        try:
            return self.s.send(data)
        except BlockingIOError:
            return 0

    def recv(self, n: int):
        """bytes, b"" at EOF, None when nothing is there."""
        try:
            return self.s.recv(n)
        except BlockingIOError:
            return None

    def shutdown_wr(self) -> None:
        try:
            self.s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.s.close()

    def retransmits(self):
        """tcpi_total_retrans from TCP_INFO (None where unavailable)."""
        try:
            info = self.s.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 104)
            return struct.unpack_from("I", info, 100)[0] if len(info) >= 104 else None
        except OSError:
            return None

    def retransmitted_bytes(self, sent: int):
        return None

    def tcp_stats(self) -> dict:
        """cwnd (bytes: tcpi_snd_cwnd x tcpi_snd_mss) and srtt (ms) from TCP_INFO."""
        try:
            info = self.s.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 104)
            mss, = struct.unpack_from("I", info, 16)
            rtt_us, = struct.unpack_from("I", info, 68)
            cwnd, = struct.unpack_from("I", info, 80)
            return {"cwnd": cwnd * mss, "srtt_ms": rtt_us / 1000, "where": "linux"}
        except (OSError, struct.error):
            return {}


class LinuxStack:
    name = "linux"

    def __init__(self):
        self.listener = None

    def connect(self, host, port, timeout):
        return LinuxConn(socket.create_connection((host, port), timeout=timeout))

    def listen(self, port):
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind(("::", port))
        ls.listen(16)
        self.listener = ls

    def accept(self, timeout):
        self.listener.settimeout(timeout)
        try:
            c, a = self.listener.accept()
        except TimeoutError:
            raise TimeoutError("accept timed out") from None
        host = a[0].removeprefix("::ffff:") if a[0].startswith("::ffff:") and "." in a[0] else a[0]
        return LinuxConn(c), (host, a[1])

    def wait(self, timeout, conns_r=(), conns_w=()) -> None:
        if conns_r or conns_w:
            select.select(list(conns_r), list(conns_w), [], timeout)
        elif timeout:
            time.sleep(timeout)

    def pump(self) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def finish(self, timeout=1.0) -> None:
        pass

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


class ChimneyConn:
    def __init__(self, sock, upload_after=None):
        self.sock = sock
        self.app_bytes = 0          # everything the application handed to send (header included)
        self.rx_bytes = 0
        self.upload_after = upload_after
        self.upload_done = False

    def _maybe_upload(self) -> None:
        if self.upload_after is not None and not self.upload_done and \
                self.app_bytes + self.rx_bytes >= self.upload_after and self.sock.offloaded:
            self.upload_done = True
            self.sock.upload(wait=True)

    def send(self, data) -> int:
        try:
            n = self.sock.send(data, timeout=0)
        except BlockingIOError:
            return 0
        self.app_bytes += n
        self._maybe_upload()
        return n

    def recv(self, n: int):
        try:
            b = self.sock.recv(n, timeout=0)
        except BlockingIOError:
            return None
        self.rx_bytes += len(b)
        self._maybe_upload()
        return b

    def offload_info(self) -> dict:
        """Per-stream offload figures: ever offloaded, uploads, the software TCP's data
        segments, and the NIC's view of the connection (QUERY) if it is offloaded now."""
        s = self.sock
        info = {"offloaded": getattr(s, "offload_count", 0) > 0,
                "uploads": getattr(s, "upload_count", 0),
                "software_data_segments_out": s.flow.data_segments_out, "device": None}
        mgr = s.stack.offload
        if mgr is not None and s.offloaded:
            with contextlib.suppress(Exception):
                q = mgr.query([s])
                for v in q.values():
                    info["device"] = mgr.conn_stats(v["path"], v["state"])
        return info

    def shutdown_wr(self) -> None:
        self.sock.shutdown()

    def close(self) -> None:
        self.sock.close()

    def retransmits(self):
        return None         # the software TCP counts no retransmitted segments per connection

    def tcp_stats(self) -> dict:
        """cwnd (bytes) and srtt (ms) now: from the NIC (QUERY) while offloaded, else
        from the software TCP."""
        s = self.sock
        mgr = s.stack.offload
        if mgr is not None and s.offloaded:
            with contextlib.suppress(Exception):
                for v in mgr.query([s]).values():
                    st = mgr.conn_stats(v["path"], v["state"])
                    return {"cwnd": st["cwnd"], "srtt_ms": st["srtt_ms"], "where": "nic"}
            return {}
        d = s.flow.conn.d
        return {"cwnd": d.cwnd, "srtt_ms": d.srtt / 8, "where": "software"}

    def retransmitted_bytes(self, sent: int):
        """Payload bytes the software TCP put on the wire beyond what the application sent."""
        return max(0, self.sock.flow.bytes_out - self.app_bytes)


def _addr(text: str, default_prefix: int):
    a, _, p = text.partition("/")
    return a, int(p) if p else default_prefix


class ChimneyStack:
    name = "chimney"

    def __init__(self, bus: str, socket_path=None, pci=None, ip=DEFAULT_IP4, ip6=(DEFAULT_IP6,),
                 offload="off", upload_after=None):
        from .miniport import Miniport
        from .stack.host import HostStack
        if bus == "host":
            if not socket_path:
                raise PerfError("--bus host needs --socket PATH (a device's vfio-user socket)")
            from .bus.vfio_user import VfioUserBus
            self.bus = VfioUserBus(socket_path)
        else:
            from .bus.vfio import VfioBus
            self.bus = VfioBus(pci)
        try:
            self.mp = Miniport(self.bus)
            self.mp.up()
            self.stack = HostStack.on_miniport(self.mp, ipv4=_addr(ip, 24) if ip else None,
                                               ipv6=[_addr(a, 64) for a in ip6 if a])
            self.stack.up()
            self.offload, self.mgr, self.upload_after = offload, None, upload_after
            if offload != "off":
                from .offload import Chimney
                from .stack.offload import OffloadManager
                ch = Chimney(self.mp)
                if ch.supported:
                    ch.up()
                    self.mgr = OffloadManager(self.stack, ch, "always" if offload == "on" else "auto")
                elif offload == "on":
                    raise PerfError("--offload on: the NIC does not offer TCP offload")
        except BaseException:
            self.bus.close()
            raise
        self.listener = None

    def connect(self, host, port, timeout):
        from .stack.socket import connect
        return ChimneyConn(connect(self.stack, host, port, timeout=timeout), self.upload_after)

    def listen(self, port):
        from .stack.socket import listen
        self.listener = listen(self.stack, port)

    def accept(self, timeout):
        s, peer = self.listener.accept(timeout=timeout)
        return ChimneyConn(s, self.upload_after), peer

    def wait(self, timeout, conns_r=(), conns_w=()) -> None:
        self.stack.step(timeout)

    def pump(self) -> None:
        self.stack.step(0)

    def stats(self) -> dict:
        st = self.stack
        out = {"tcp": dict(sorted(st.stats.items())), "iface": dict(sorted(st.iface.stats.items()))}
        if self.mgr is not None:
            out["offload"] = dict(sorted(self.mgr.stats.items()))
            out["chimney"] = dict(sorted(self.mgr.ch.stats.items()))
        with contextlib.suppress(Exception):
            # the NIC's offload counters (with a TOE) and its wire's segmentation offload
            keep = ("offload", "wire_") if self.mgr is not None else ("wire_",)
            out["device"] = {k: v for k, v in self.mp.stats().items() if k.startswith(keep)}
        return out

    def finish(self, timeout=1.0) -> None:
        """Let the closing handshakes go out (everything closed or in TIME-WAIT)."""
        self.stack.run_until(lambda: not self.stack.detached and all(
            f.conn.closed or f.conn.state.name == "TIME_WAIT" for f in self.stack.flows.values()),
            timeout)

    def close(self) -> None:
        try:
            if self.listener is not None:
                self.listener.close()
        finally:
            self.bus.close()


def make_stack(args):
    if args.stack == "linux":
        return LinuxStack()
    bus = args.bus or ("vfio" if os.path.exists("/dev/vfio") else "host")
    ip6 = args.ip6 if args.ip6 is not None else [DEFAULT_IP6]
    return ChimneyStack(bus, args.socket, args.pci, args.ip, ip6,
                        offload=getattr(args, "offload", None) or "off",
                        upload_after=getattr(args, "upload_after", None))


# -- blocking helpers over the non-blocking conns -----------------------------------------

def _left(deadline) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("hard timeout")
    return left


def send_all(stack, conn, data: bytes, deadline) -> None:
    view = memoryview(data)
    while view:
        n = conn.send(view[:CHUNK])
        if n:
            view = view[n:]
            stack.pump()
        else:
            stack.wait(min(0.05, _left(deadline)), (), (conn,))


def recv_exactly(stack, conn, n: int, deadline) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = conn.recv(n - len(out))
        if b is None:
            stack.wait(min(0.05, _left(deadline)), (conn,))
        elif not b:
            raise PerfError(f"connection closed after {len(out)} of {n} bytes")
        else:
            out += b
    return bytes(out)


class LineReader:
    def __init__(self, stack, conn):
        self.stack, self.conn, self.buf = stack, conn, bytearray()

    def line(self, deadline) -> dict:
        while b"\n" not in self.buf:
            if len(self.buf) > 1 << 20:
                raise PerfError("control line too long")
            b = self.conn.recv(65536)
            if b is None:
                self.stack.wait(min(0.05, _left(deadline)), (self.conn,))
            elif not b:
                raise PerfError("control connection closed by the peer")
            else:
                self.buf += b
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return json.loads(line)


def send_line(stack, conn, obj, deadline) -> None:
    send_all(stack, conn, json.dumps(obj).encode() + b"\n", deadline)


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


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine (the guest, in a VM) spent busy so far."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU spent during the data phase only (no start-up): this process's, and
    the whole machine's (which includes the kernel's TCP for kernel sockets)."""

    def __init__(self):
        self.p0, self.m0, self.t0 = time.process_time(), _machine_busy_s(), time.monotonic()

    def result(self) -> dict:
        m1 = _machine_busy_s()
        return {"process_s": round(time.process_time() - self.p0, 3),
                "machine_s": round(m1 - self.m0, 3) if m1 is not None and self.m0 is not None else None,
                "wall_s": round(time.monotonic() - self.t0, 3)}


def run_streams(stack, streams: list[Stream], deadline, interval, report) -> float:
    """Move the data until every stream is done; interval reports go to report(dict)."""
    t0 = time.monotonic()
    next_tick = t0 + interval if interval else None
    last_tick = t0
    while not all(s.done for s in streams):
        _left(deadline)
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
            for k in ("offloaded", "uploads", "software_data_segments_out", "device"):
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

def teardown(stack, conns) -> None:
    """Close every connection and let the closing handshakes go out (best effort)."""
    for c in conns:
        with contextlib.suppress(OSError):
            c.close()
    with contextlib.suppress(Exception):
        stack.finish()


def connect_retry(stack, host, port, timeout):
    """Connect, retrying a refused or timed-out attempt until `timeout` seconds pass."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        try:
            return stack.connect(host, port, min(3.0, max(0.1, left)))
        except (ConnectionRefusedError, TimeoutError):
            if time.monotonic() + 0.2 >= end:
                raise
            stack.wait(0.2)


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
    try:
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
            c = stack.connect(host, port, min(10.0, _left(deadline)))
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
    except (OSError, PerfError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        teardown(stack, conns)
    res["stack_stats"] = stack.stats()
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

    try:
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
            c, _ = stack.accept(min(10.0, _left(deadline)))
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
    except (OSError, PerfError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        teardown(stack, conns)
    res["stack_stats"] = stack.stats()
    return res


def run_server(stack, port: int, *, once=False, as_json=False, accept_timeout=None, interval=1.0) -> int:
    stack.listen(port)
    print(f"chimney perf: server on the {stack.name} stack, port {port}", file=sys.stderr, flush=True)
    rc = 0
    while True:
        try:
            res = serve_one(stack, as_json=as_json, accept_timeout=accept_timeout, interval=interval)
        except TimeoutError:
            print("chimney perf: no client came", file=sys.stderr)
            return 1
        res["port"] = port
        emit(res, as_json)
        rc = 0 if res["verified"] and not res["error"] else 1
        if once:
            return rc


# -- command line -------------------------------------------------------------------------

def _size_arg(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def add_stack_arguments(sp: argparse.ArgumentParser) -> None:
    """The stack-selection options make_stack(args) reads (shared with chimney.guest.iperf3)."""
    sp.add_argument("--stack", choices=["chimney", "linux"], default="chimney",
                    help="chimney: our host stack on the NIC (default); linux: kernel sockets")
    sp.add_argument("--bus", choices=["vfio", "host"],
                    help="chimney stack: vfio (in the VM; default when /dev/vfio exists) "
                         "or host (the host bus, --socket)")
    sp.add_argument("--socket", help="the device's vfio-user socket (--bus host)")
    sp.add_argument("--pci", help="PCI address for VFIO (default: find the NIC)")
    sp.add_argument("--ip", default=DEFAULT_IP4, help=f"our IPv4 address/prefix ({DEFAULT_IP4})")
    sp.add_argument("--ip6", action="append", help=f"our IPv6 address/prefix ({DEFAULT_IP6})")
    sp.add_argument("--offload", choices=["on", "off", "auto"], default="off",
                    help="chimney stack: TCP chimney offload of the connections (default off: "
                         "software TCP; on: right after the handshake; auto: after 1 MB)")
    sp.add_argument("--upload-after", type=_size_arg, metavar="BYTES",
                    help="chimney stack: upload each data stream to software TCP after BYTES moved")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="perf_cmd", required=True)
    srv = sub.add_parser("server", help="wait for clients")
    cli = sub.add_parser("client", help="run a test against a server")
    cli.add_argument("host")
    for sp in (srv, cli):
        sp.add_argument("--port", "-p", type=int, default=DEFAULT_PORT)
        sp.add_argument("--json", action="store_true", help="print one JSON object per run")
        add_stack_arguments(sp)
        sp.add_argument("--timeout", type=float, help="hard timeout in seconds for one run")
        sp.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between reports (0: none)")
    srv.add_argument("--once", action="store_true", help="serve one client, then exit")
    srv.add_argument("--accept-timeout", type=float, help="give up when no client comes in time")
    g = cli.add_mutually_exclusive_group(required=True)
    g.add_argument("-t", "--time", type=float, help="seconds to send")
    g.add_argument("-n", "--bytes", type=_size_arg, help="bytes to send (K/M/G suffixes: powers of 10)")
    cli.add_argument("-P", "--parallel", type=int, default=1, help="parallel streams")
    cli.add_argument("-R", "--reverse", action="store_true", help="the server sends")
    cli.add_argument("--ipv6", action="store_true", help="HOST is (or resolve it as) IPv6")
    cli.add_argument("--seed", type=int, help="data seed (default: random)")
    cli.add_argument("--connect-timeout", type=float, default=10.0)


def run_on_stack(args, tool: str, body) -> int:
    """Bring the chosen stack up (a clear error and exit 2 if it cannot), run
    body(stack) for the exit status, and close the stack whatever happens."""
    try:
        stack = make_stack(args)
    except Exception as e:  # noqa: BLE001 -- no NIC, no bus: say so
        print(f"{tool}: cannot bring the {args.stack} stack up: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 2
    try:
        return body(stack)
    except KeyboardInterrupt:
        return 130
    finally:
        stack.close()


def run(args) -> int:
    return run_on_stack(args, "chimney perf", lambda stack: _run(stack, args))


def _run(stack, args) -> int:
    if args.perf_cmd == "server":
        return run_server(stack, args.port, once=args.once, as_json=args.json,
                          accept_timeout=args.accept_timeout, interval=args.interval)
    host = args.host
    if args.ipv6 and ":" not in host:
        host = socket.getaddrinfo(host, None, socket.AF_INET6)[0][4][0]
    if args.parallel < 1:
        print("chimney perf: -P must be at least 1", file=sys.stderr)
        return 2
    res = run_client(stack, host, args.port, duration=args.time, nbytes=args.bytes,
                     streams=args.parallel, reverse=args.reverse, interval=args.interval,
                     timeout=args.timeout, seed=args.seed, connect_timeout=args.connect_timeout,
                     as_json=args.json)
    res["stack"] = stack.name
    emit(res, args.json)
    return 0 if res["verified"] and not res["error"] else 1


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
    p = argparse.ArgumentParser(prog="python3 -m chimney.guest.perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
