"""The benchmark suite: every measure of the performance table,
each taken side by side in one run, printed as figures and ratios beside the
performance goals (or one JSON object with --json).

    a  in the VM (TCG), one VM boot: the user's real baseline first --
       `chimney iperf3 --offload on` beside real iperf3 (C) on guest Linux TCP
       over virtio-net, against a real iperf3 -s in the peer's namespace,
       time-based (--seconds each way), with guest and device CPU per GB
       (chimney.bench.baseline) -- and the same-program comparisons: chimney
       perf offloaded vs the host stack's software TCP vs the same program on
       guest Linux TCP over virtio-net, send and receive (chimney.demo's
       run_one and summarize), plus request/response in the VM when d is on
    b  on the host bus (device level): offloaded vs Linux TCP over a veth
       between two namespaces, send and receive
    c  on the host bus: offloaded vs the software path, same run
    d  request/response transactions per second (chimney.guest.rr):
       offloaded vs software vs Linux (veth on the host bus; virtio-net in the VM)
    e  bulk offload of N connections (default 1,000): set up in software,
       INITIATE in one state tree, QUERY, TERMINATE all
    f  device memory per idle offloaded connection: the device process's
       VmRSS before and after offloading the N connections of e

Every chimney perf throughput run is a client/server pair, sha256-verified
and bounded in bytes and time; every iperf3 run is bounded by -t and a hard
timeout (iperf3 verifies no content: both ends' counts, no error); the request/response runs are bounded by a
count and a time.  Host-bus measures share one device process (TAP in a
namespace with the Linux peer) and one second namespace for the veth.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..host.netns import Netns, PeerAddrs

MEASURES = "abcdef"
ADDR = PeerAddrs()
TAP = "chim0"
VETH4 = ("10.198.0.1", "10.198.0.2", 24)     # the peer namespace's end, the client namespace's end
ROOT = str(Path(__file__).resolve().parent.parent.parent)


# The performance goals: (key, what, measure, ">=" or "<=", target ratio).  In the VM they
# are against the user's real baseline, real iperf3 over virtio-net (chimney.bench.baseline).
GOALS = (
    ("vm_offload_vs_iperf3_virtio_send", "VM: offloaded send >= 3x real iperf3 over virtio-net", "a", ">=", 3.0),
    ("vm_offload_vs_iperf3_virtio_recv", "VM: offloaded receive >= 2x real iperf3 over virtio-net", "a", ">=", 2.0),
    ("vm_guest_cpu_per_gb_offload_vs_iperf3_virtio_send",
     "VM: guest CPU per GB offloaded <= 0.2x virtio-net's (send)", "a", "<=", 0.2),
    ("vm_guest_cpu_per_gb_offload_vs_iperf3_virtio_recv",
     "VM: guest CPU per GB offloaded <= 0.2x virtio-net's (receive)", "a", "<=", 0.2),
    ("hostbus_offload_vs_software_send", "host bus: offload send >= 20x software path", "c", ">=", 20.0),
    ("hostbus_offload_vs_software_recv", "host bus: offload receive >= 20x software path", "c", ">=", 20.0),
    ("hostbus_offload_vs_linux_send", "host bus: offload send >= 0.5x Linux veth", "b", ">=", 0.5),
)


def _ratio(a, b):
    return a / b if a and b else None


def _last_json(text: str) -> dict | None:
    for ln in reversed(text.strip().splitlines()):
        if ln.startswith("{"):
            try:
                return json.loads(ln)
            except ValueError:
                return None
    return None


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    return 0


def _pid_cpu(pid: int) -> float:
    from ..demo import _pid_cpu as cpu
    return cpu(pid)


# -- the host bus: one device process, the Linux peer, a veth namespace ---------------------

class HostBus:
    """A device process on a TAP in the peer namespace (chimney's wire), and a
    client namespace joined to the peer namespace by a veth (Linux's wire)."""

    def __init__(self, tmp: str, profile_dir: str | None = None, wire_offloads: str = "on"):
        self.tmp, self.profile_dir = tmp, profile_dir
        self.ns = Netns("suite")
        self.cns = None
        self.dev = None
        try:
            env_prof = None
            if profile_dir:
                env_prof = os.path.join(profile_dir, "device.prof")
                os.environ["CHIMNEY_DEVICE_PROFILE"] = env_prof
            from ..host.device import DeviceProcess
            try:
                self.dev = DeviceProcess(os.path.join(tmp, "nic.sock"), tap=TAP, netns=self.ns.name,
                                         log_path=os.path.join(tmp, "device.log"),
                                         wire_offloads=wire_offloads)
            finally:
                if env_prof:
                    os.environ.pop("CHIMNEY_DEVICE_PROFILE", None)
            self.ns.configure_peer(TAP, ADDR)
            self.cns = Netns("suitecli")
            peer, mine, plen = VETH4
            self.ns.run("ip", "link", "add", "sva", "type", "veth", "peer", "name", "svb", "netns", self.cns.name)
            self.ns.run("ip", "addr", "add", f"{peer}/{plen}", "dev", "sva")
            self.ns.run("ip", "link", "set", "sva", "up")
            self.cns.run("ip", "addr", "add", f"{mine}/{plen}", "dev", "svb")
            self.cns.run("ip", "link", "set", "svb", "up")
            self.port = 5400
        except BaseException:
            self.close()
            raise

    def next_port(self) -> int:
        self.port += 1
        return self.port

    def chimney_args(self, offload: str) -> list[str]:
        return ["--stack", "chimney", "--bus", "host", "--socket", self.dev.socket,
                "--ip", f"{ADDR.guest4}/{ADDR.prefix4}", "--offload", offload]

    def guest_argv(self, module: str, args: list[str], prof_name: str | None = None) -> list[str]:
        argv = [sys.executable, "-u"]
        if self.profile_dir and prof_name:
            argv += ["-m", "cProfile", "-o", os.path.join(self.profile_dir, f"guest-{prof_name}.prof")]
        return argv + ["-m", module, *args]

    def pair(self, module: str, server_args: list[str], client: str, client_args: list[str],
             timeout: float, prof_name: str | None = None) -> tuple[dict | None, str, float, float]:
        """A Linux server in the peer namespace, a client on the host bus (client="chimney") or in
        the veth namespace (client="linux").  (client JSON, error text, wall s, device CPU s)."""
        srv = self.ns.popen(sys.executable, "-m", module, "server", *server_args, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        dev_cpu0 = _pid_cpu(self.dev.proc.pid)
        t0 = time.monotonic()
        try:
            if client == "chimney":
                argv = self.guest_argv(module, ["client", *client_args], prof_name)
                cli = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            else:
                cli = self.cns.popen(sys.executable, "-m", module, "client", *client_args, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out, err = cli.communicate(timeout=timeout + 60)
            except subprocess.TimeoutExpired:
                cli.kill()
                out, err = cli.communicate()
            wall = time.monotonic() - t0
            dev_cpu = _pid_cpu(self.dev.proc.pid) - dev_cpu0
        finally:
            try:
                srv.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.communicate()
        res = _last_json(out.decode(errors="replace"))
        return res, (err.decode(errors="replace")[-800:] if res is None else ""), wall, dev_cpu

    def close(self) -> None:
        if self.dev is not None:
            with contextlib.suppress(Exception):
                self.dev.stop()
        for ns in (self.cns, self.ns):
            if ns is not None:
                ns.delete()


def hostbus_perf(hb: HostBus, path: str, nbytes: int, reverse: bool, timeout: float) -> dict:
    """One verified `chimney perf` transfer on the host bus.  path: offload | software | linux."""
    port = hb.next_port()
    server = ["--stack", "linux", "--once", "--json", "-i", "0", "--port", str(port), "--accept-timeout", "60"]
    client = ["-n", str(nbytes), "--json", "-i", "0", "--port", str(port), "--timeout", f"{timeout:g}"]
    if reverse:
        client.append("-R")
    if path == "linux":
        res, err, wall, dev_cpu = hb.pair("chimney.guest.perf", server, "linux",
                                          [VETH4[0], "--stack", "linux", *client], timeout)
    else:
        res, err, wall, dev_cpu = hb.pair(
            "chimney.guest.perf", server, "chimney",
            [ADDR.peer4, *hb.chimney_args("on" if path == "offload" else "off"), *client], timeout,
            prof_name=f"perf-{path}-{'recv' if reverse else 'send'}")
    out = {"path": path, "direction": "recv" if reverse else "send", "bytes": 0, "gbps": 0.0,
           "verified": False, "wall_s": round(wall, 2), "device_cpu_s": round(dev_cpu, 3) if path != "linux"
           else None, "error": None}
    if res is None:
        out["error"] = err or "no result"
        return out
    summ = res.get("summary") or {}
    rcv = (summ.get("sum") or {}).get("receiver") or {}
    out["bytes"] = rcv.get("bytes", 0)
    out["seconds"] = rcv.get("seconds", 0.0)
    out["gbps"] = (rcv.get("mbps") or 0.0) / 1000
    out["verified"] = bool(res.get("verified")) and res.get("error") is None
    out["error"] = res.get("error")
    if path == "offload":
        flags = [e.get("offloaded") for st in summ.get("streams") or [] for e in (st.get("sender"), st.get("receiver"))
                 if isinstance(e, dict) and "offloaded" in e]
        out["offloaded"] = all(flags) if flags else None
    if out["bytes"] and out["device_cpu_s"] is not None:
        out["device_cpu_s_per_gb"] = round(out["device_cpu_s"] / (out["bytes"] / 1e9), 2)
    return out


def _pair_table(runs: dict) -> dict:
    return {p: {"send_gbps": r["send"]["gbps"], "recv_gbps": r["recv"]["gbps"],
                "verified": r["send"]["verified"] and r["recv"]["verified"], **r} for p, r in runs.items()}


def hostbus_rr(hb: HostBus, path: str, size: int, count: int, seconds: float) -> dict:
    port = hb.next_port()
    server = ["--stack", "linux", "--once", "--json", "--port", str(port), "--accept-timeout", "60",
              "--timeout", f"{seconds + 60:g}"]
    client = ["--json", "--port", str(port), "--size", str(size), "--count", str(count), "-t", f"{seconds:g}",
              "--timeout", f"{seconds + 60:g}"]
    if path == "linux":
        res, err, _, _ = hb.pair("chimney.guest.rr", server, "linux",
                                 [VETH4[0], "--stack", "linux", *client], seconds)
        return _rr_result(path, res, err)
    else:
        res, err, _, dev_cpu = hb.pair("chimney.guest.rr", server, "chimney",
                                       [ADDR.peer4, *hb.chimney_args("on" if path == "offload" else "off"),
                                        *client], seconds, prof_name=f"rr-{path}")
    out = _rr_result(path, res, err)
    out["device_cpu_s"] = round(dev_cpu, 3)
    return out


def _rr_result(path: str, res: dict | None, err: str) -> dict:
    if res is None:
        return {"path": path, "tps": 0.0, "transactions": 0, "verified": False, "error": err or "no result"}
    out = {k: res.get(k) for k in ("transactions", "seconds", "tps", "latency_us", "verified", "error")}
    out["path"] = path
    if isinstance(res.get("offload"), dict):
        out["offloaded"] = res["offload"].get("offloaded")
    return out


# -- bulk offload and device memory (in this process, on the host bus) ----------------------

BULK_PEER = r'''
import resource, socket, select, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ls = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=4096)
print("listening", flush=True)
conns = []
while True:
    r, _, _ = select.select([ls, sys.stdin], [], [], 1)
    if sys.stdin in r:
        break
    if ls in r:
        c, _ = ls.accept()
        conns.append(c)
print(len(conns), flush=True)
'''


def bulk(hb: HostBus, n: int, timeout: float = 120.0) -> dict:
    """Set up n connections in software, offload them in one INITIATE tree, QUERY them,
    TERMINATE (upload) them all; the device's VmRSS before and after the offload."""
    from .. import hw
    from ..guest.bringup import bring_up

    port = hb.next_port()
    res: dict = {"connections": n, "error": None}
    peer = hb.ns.popen(sys.executable, "-c", BULK_PEER, str(port), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    g = None
    socks = []
    try:
        if peer.stdout.readline().strip() != b"listening":
            raise RuntimeError("bulk peer did not start: " + peer.stderr.read().decode()[-500:])
        # idle connections: no posted receive buffers
        g = bring_up(socket=hb.dev.socket, ip=(ADDR.guest4, ADDR.prefix4), offload="never",
                     require_offload=True, post_depth=0)
        stack, mgr = g.stack, g.offload
        pid = hb.dev.proc.pid
        t0 = time.monotonic()
        for _ in range(n):
            socks.append(stack.connect(ADDR.peer4, port, timeout=10))
        res["setup_software_s"] = round(time.monotonic() - t0, 3)
        stack.step(0.2)
        rss0 = _rss_kib(pid)
        cpu0 = _pid_cpu(pid)
        t0 = time.monotonic()
        cmd = mgr.offload(socks, wait=True, timeout=timeout)
        res["initiate_s"] = round(time.monotonic() - t0, 4)
        if cmd is None or not cmd.done or cmd.status != hw.ST_SUCCESS:
            raise RuntimeError(f"INITIATE failed: {cmd!r} {getattr(mgr, 'last_errors', '')}")
        res["initiate_objects"] = len(cmd.result) if cmd.result is not None else None
        res["offloaded"] = sum(1 for s in socks if s.offloaded)
        stack.step(0.5)
        rss1 = _rss_kib(pid)
        t0 = time.monotonic()
        q = mgr.query(socks, timeout=timeout)
        res["query_s"] = round(time.monotonic() - t0, 4)
        res["queried"] = len(q)
        t0 = time.monotonic()
        res["terminated"] = mgr.upload_all(wait=True, timeout=timeout)
        res["terminate_s"] = round(time.monotonic() - t0, 4)
        res["device_cpu_s"] = round(_pid_cpu(pid) - cpu0, 3)
        stack.step(0.2)
        rss2 = _rss_kib(pid)
        res["memory"] = {"rss_before_kib": rss0, "rss_offloaded_kib": rss1, "rss_after_terminate_kib": rss2,
                         "delta_kib": rss1 - rss0,
                         "bytes_per_connection": round((rss1 - rss0) * 1024 / n, 1) if n else None,
                         "released_kib": rss1 - rss2}
        for s in socks:
            with contextlib.suppress(Exception):
                s.abort()
        stack.step(0.1)
        with contextlib.suppress(Exception):
            g.mp.down()
    except Exception as e:      # noqa: BLE001 -- reported in the result
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        if g is not None:
            g.close()
        with contextlib.suppress(Exception):
            peer.stdin.write(b"x\n")
            peer.stdin.flush()
        with contextlib.suppress(Exception):
            peer.communicate(timeout=10)
        if peer.poll() is None:
            peer.kill()
            peer.communicate()
    return res


# -- the VM ---------------------------------------------------------------------------------

def vm_measures(console: Console, *, do_a: bool, do_rr: bool, nbytes: int, soft_bytes: int, rr_size: int,
                rr_count: int, rr_seconds: float, timeout: float, profile_dir: str | None = None,
                iperf3_seconds: int = 10) -> dict:
    from ..demo import PATHS, PORT, run_one, summarize
    from ..host.vm import Vm
    from ..images import build_all
    from . import baseline

    out: dict = {}
    build_all(quiet=True)
    with console.status("booting a VM with the chimney NIC and virtio-net (TCG), Linux peer in a namespace"):
        t0 = time.monotonic()
        if profile_dir:         # the VM's device process inherits it: cProfile of its loop
            os.environ["CHIMNEY_DEVICE_PROFILE"] = os.path.join(profile_dir, "vm-device.prof")
        try:
            vm = Vm(network=True, virtio_net=True)
            vm.start()
        finally:
            os.environ.pop("CHIMNEY_DEVICE_PROFILE", None)
        out["boot_s"] = round(time.monotonic() - t0, 1)
    server = None
    runs = []
    try:
        out["accel"] = vm.boots[0]["accel"]
        peer = vm.peer
        if do_a:
            out["iperf3"] = baseline.measure(vm, console, iperf3_seconds, timeout, log=console.log)
            server = peer.popen(sys.executable, "-m", "chimney.guest.perf", "server", "--stack", "linux",
                                "--port", str(PORT), "-i", "0", cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            for path in PATHS:
                n = soft_bytes if path == "software" else nbytes
                for reverse in (False, True):
                    what = f"VM {path}: guest {'receives' if reverse else 'sends'} {n / 1e6:g} MB"
                    with console.status(what):
                        r = run_one(vm, path, n, reverse, timeout)
                    runs.append(r)
                    console.log(f"{what}: {r['gbps'] * 1000:.1f} Mbit/s"
                                + ("" if r["verified"] else f" NOT VERIFIED {str(r.get('error'))[:200]}"))
            s = summarize(runs)
            out["bytes"] = {p: (soft_bytes if p == "software" else nbytes) for p in PATHS}
            out["paths"], out["ratios"] = s["paths"], s["ratios"]
        if do_rr:
            out["rr"] = {}
            port = PORT + 100
            for path in PATHS:
                port += 1
                srv = peer.popen(sys.executable, "-m", "chimney.guest.rr", "server", "--stack", "linux", "--once",
                                 "--json", "--port", str(port), "--accept-timeout", "60",
                                 "--timeout", f"{rr_seconds + 120:g}", cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                argv = ["python3", "-m", "chimney.guest.rr", "client"]
                if path == "virtio":
                    argv += [peer.vnet.peer4, "--stack", "linux"]
                else:
                    argv += [peer.nic.peer4, "--stack", "chimney", "--bus", "vfio",
                             "--ip", f"{peer.nic.guest4}/{peer.nic.prefix4}",
                             "--offload", "on" if path == "offload" else "off"]
                argv += ["--json", "--port", str(port), "--size", str(rr_size), "--count", str(rr_count),
                         "-t", f"{rr_seconds:g}", "--timeout", f"{rr_seconds + 90:g}"]
                with console.status(f"VM request/response, {path}"):
                    try:
                        r = vm.run(argv, timeout=rr_seconds + 150)
                        text = r.stdout.decode(errors="replace")
                        res = _last_json(text)
                        err = "" if res else (text + r.stderr.decode(errors="replace"))[-800:]
                    finally:
                        try:
                            srv.communicate(timeout=30)
                        except subprocess.TimeoutExpired:
                            srv.kill()
                            srv.communicate()
                out["rr"][path] = _rr_result(path, res, err)
                console.log(f"VM rr {path}: {out['rr'][path]['tps'] or 0:,.0f} transactions/s")
        out["device_alive"] = vm.device.alive if vm.device else None
    finally:
        if server is not None:
            server.kill()
            server.wait()
        vm.close()
    return out


# -- the suite ------------------------------------------------------------------------------

def run(only: str = MEASURES, *, nbytes: int = 20_000_000, soft_bytes: int | None = None,
        vm_bytes: int | None = None, vm_soft_bytes: int | None = None, conns: int = 1000,
        rr_size: int = 64, rr_count: int = 5000, rr_seconds: float = 5.0, iperf3_seconds: int = 10,
        timeout: float = 300.0,
        profile_dir: str | None = None, as_json: bool = False, quiet: bool = False,
        save: str | None = None, wire_offloads: str = "on") -> dict:
    sel = {m.strip().lower() for m in only.split(",") if m.strip()} if "," in only or len(only) == 1 \
        else set(only.lower())
    bad = sel - set(MEASURES)
    if bad:
        raise ValueError(f"unknown measure(s) {sorted(bad)}: choose from {','.join(MEASURES)}")
    soft_bytes = soft_bytes or max(nbytes // 10, 100_000)
    vm_bytes = vm_bytes or nbytes
    vm_soft_bytes = vm_soft_bytes or max(vm_bytes // 20, 100_000)
    tty = (sys.stderr if as_json else sys.stdout).isatty()
    console = Console(stderr=as_json, quiet=quiet, width=None if tty else 132)
    t_start = time.monotonic()
    res: dict = {"suite": 1, "measures": sorted(sel),
                 "config": {"bytes": nbytes, "software_bytes": soft_bytes, "vm_bytes": vm_bytes,
                            "vm_software_bytes": vm_soft_bytes, "conns": conns, "rr_size": rr_size,
                            "rr_count": rr_count, "rr_seconds": rr_seconds, "iperf3_seconds": iperf3_seconds,
                            "timeout": timeout, "wire_offloads": wire_offloads}}
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        res["config"]["profile_dir"] = os.path.abspath(profile_dir)

    if sel & set("bcdef"):
        with tempfile.TemporaryDirectory(prefix="chimney-suite-") as tmp:
            with console.status("host bus: device process, Linux peer, veth"):
                hb = HostBus(tmp, profile_dir, wire_offloads)
            try:
                hb_runs: dict = {}

                def perf_pair(path, n):
                    hb_runs[path] = {}
                    for reverse in (False, True):
                        what = f"host bus {path}: {'receive' if reverse else 'send'} {n / 1e6:g} MB"
                        with console.status(what):
                            r = hostbus_perf(hb, path, n, reverse, timeout)
                        hb_runs[path][r["direction"]] = r
                        console.log(f"{what}: {r['gbps'] * 1000:.1f} Mbit/s"
                                    + ("" if r["verified"] else f" NOT VERIFIED {str(r['error'])[:300]}"))

                if sel & set("bc"):
                    perf_pair("offload", nbytes)
                if "b" in sel:
                    perf_pair("linux", nbytes)
                if "c" in sel:
                    perf_pair("software", soft_bytes)
                if sel & set("bc"):
                    runs = _pair_table(hb_runs)
                    o = runs["offload"]
                    if "b" in sel:
                        lx = runs["linux"]
                        res["hostbus_veth"] = {"bytes": nbytes, "paths": {"offload": o, "linux": lx}, "ratios": {
                            "offload_vs_linux_send": _ratio(o["send_gbps"], lx["send_gbps"]),
                            "offload_vs_linux_recv": _ratio(o["recv_gbps"], lx["recv_gbps"])}}
                    if "c" in sel:
                        sw = runs["software"]
                        res["hostbus_software"] = {
                            "bytes": {"offload": nbytes, "software": soft_bytes},
                            "paths": {"offload": o, "software": sw}, "ratios": {
                                "offload_vs_software_send": _ratio(o["send_gbps"], sw["send_gbps"]),
                                "offload_vs_software_recv": _ratio(o["recv_gbps"], sw["recv_gbps"])}}
                if "d" in sel:
                    rr = {}
                    for path in ("offload", "software", "linux"):
                        with console.status(f"host bus request/response, {path}"):
                            rr[path] = hostbus_rr(hb, path, rr_size, rr_count, rr_seconds)
                        console.log(f"host bus rr {path}: {rr[path]['tps'] or 0:,.0f} transactions/s"
                                    + ("" if rr[path]["verified"] else f" NOT VERIFIED {rr[path]['error']}"))
                    res["rr"] = {"size": rr_size, "count": rr_count, "seconds": rr_seconds,
                                 "hostbus": {"paths": rr, "ratios": {
                                     "offload_vs_software": _ratio(rr["offload"]["tps"], rr["software"]["tps"]),
                                     "offload_vs_linux": _ratio(rr["offload"]["tps"], rr["linux"]["tps"])}}}
                if sel & set("ef"):
                    with console.status(f"bulk offload of {conns:,} connections"):
                        b = bulk(hb, conns)
                    console.log(f"bulk offload of {conns:,}: " + (b["error"] or (
                        f"setup {b['setup_software_s']:.2f} s, INITIATE {b['initiate_s'] * 1000:.0f} ms, QUERY "
                        f"{b['query_s'] * 1000:.0f} ms, TERMINATE {b['terminate_s'] * 1000:.0f} ms")))
                    mem = b.pop("memory", None)
                    if "e" in sel:
                        res["bulk"] = b
                    if "f" in sel:
                        res["memory"] = {"connections": conns, "error": b.get("error"), **(mem or {})}
                res["hostbus_device_alive"] = hb.dev.alive
            finally:
                hb.close()
    if "a" in sel:
        v = vm_measures(console, do_a=True, do_rr="d" in sel, nbytes=vm_bytes, soft_bytes=vm_soft_bytes,
                        rr_size=rr_size, rr_count=rr_count, rr_seconds=rr_seconds, timeout=timeout,
                        profile_dir=profile_dir, iperf3_seconds=iperf3_seconds)
        rr_vm = v.pop("rr", None)
        res["vm"] = v
        if rr_vm is not None:
            res.setdefault("rr", {"size": rr_size, "count": rr_count, "seconds": rr_seconds})
            res["rr"]["vm"] = {"paths": rr_vm, "ratios": {
                "offload_vs_software": _ratio(rr_vm["offload"]["tps"], rr_vm["software"]["tps"]),
                "offload_vs_virtio": _ratio(rr_vm["offload"]["tps"], rr_vm["virtio"]["tps"])}}
    res["goals"] = goals(res)
    res["wall_s"] = round(time.monotonic() - t_start, 1)
    if profile_dir:
        res["profiles"] = sorted(str(p) for p in Path(profile_dir).glob("*.prof"))
    if save:
        with open(save, "w") as f:
            json.dump(res, f, indent=2, default=str)
    if quiet:
        return res
    if as_json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print_tables(console, res)
    return res


def goals(res: dict) -> list[dict]:
    have = {}
    vm = res.get("vm") or {}
    for k, v in (vm.get("ratios") or {}).items():
        have[f"vm_{k}"] = v
    for k, v in ((vm.get("iperf3") or {}).get("ratios") or {}).items():
        have[f"vm_{k}"] = v
    for sect in ("hostbus_software", "hostbus_veth"):
        for k, v in ((res.get(sect) or {}).get("ratios") or {}).items():
            have[f"hostbus_{k}"] = v
    out = []
    for key, what, measure, op, need in GOALS:
        if measure not in res["measures"]:
            continue
        got = have.get(key)
        met = got is not None and (got >= need if op == ">=" else got <= need)
        out.append({"goal": key, "what": what, "measure": measure, "at_least" if op == ">=" else "at_most": need,
                    "measured": got, "met": met})
    return out


# -- tables ---------------------------------------------------------------------------------

def _x(v) -> str:
    return f"{v:.2f}x" if v else "—"


def _mbps(r: dict) -> str:
    return f"{r.get('gbps', 0) * 1000:,.1f}" if r else ""


def _ok(r: dict) -> str:
    return "[green]yes[/green]" if r and r.get("verified") else "[red]NO[/red]"


def _throughput_table(title: str, paths: dict, labels: dict, caption: str = "") -> Table:
    t = Table(title=title, caption=caption or None)
    for col in ("path", "send Mbit/s", "recv Mbit/s", "verified", "MB per run", "device CPU s/GB send/recv"):
        t.add_column(col, justify="left" if col == "path" else "right", no_wrap=col == "path")
    for p, r in paths.items():
        s, rv = r.get("send") or {}, r.get("recv") or {}
        cpu = [x.get("device_cpu_s_per_gb") for x in (s, rv)]
        t.add_row(labels.get(p, p), _mbps(s), _mbps(rv), _ok(s) if rv.get("verified") else _ok(rv),
                  f"{max(s.get('bytes', 0), rv.get('bytes', 0)) / 1e6:g}",
                  " / ".join(f"{c:.0f}" if c is not None else "-" for c in cpu))
    return t


def _iperf3_table(base: dict, accel) -> Table:
    from .baseline import LABELS
    t = Table(title=f"a. against the real baseline, in the VM ({accel}): iperf3 for {base['seconds']} s each way, "
                    "a real iperf3 -s (one-off, per run) in the peer's namespace, same run",
              caption="guest CPU: the whole guest, time not idle, over the data phase; device CPU: the chimney "
                      "device process (virtio-net's device work is inside QEMU, no separate figure)")
    for col in ("path", "send Mbit/s", "recv Mbit/s", "ok", "guest CPU s/GB send/recv",
                "device CPU s/GB send/recv"):
        t.add_column(col, justify="left" if col == "path" else "right", no_wrap=col == "path")
    for p, d in base["paths"].items():
        s, rv = d.get("send") or {}, d.get("recv") or {}
        cpu = [[x.get(k) for x in (s, rv)] for k in ("guest_cpu_s_per_gb", "device_cpu_s_per_gb")]
        t.add_row(LABELS.get(p, p), _mbps(s), _mbps(rv),
                  "[green]yes[/green]" if d.get("ok") else "[red]NO[/red]",
                  *(" / ".join(f"{c:.1f}" if c is not None else "-" for c in pair) for pair in cpu))
    return t


def _ratio_table(title: str, rows: list[tuple[str, object, object]]) -> Table:
    t = Table(title=title)
    t.add_column("comparison")
    t.add_column("send", justify="right")
    t.add_column("recv", justify="right")
    for name, s, r in rows:
        t.add_row(name, _x(s), _x(r))
    return t


def print_tables(console: Console, res: dict) -> None:
    labels = {"offload": "offloaded (TOE)", "software": "host stack software TCP",
              "virtio": "guest Linux TCP, virtio-net", "linux": "Linux TCP, veth (2 namespaces)"}
    if "vm" in res:
        v = res["vm"]
        errs = []
        if v.get("iperf3"):
            console.print(_iperf3_table(v["iperf3"], v.get("accel")))
            r = v["iperf3"]["ratios"]
            console.print(_ratio_table("a. ratios against the real baseline", [
                ("offloaded / real iperf3 virtio-net", r["offload_vs_iperf3_virtio_send"],
                 r["offload_vs_iperf3_virtio_recv"]),
                ("guest CPU per GB: offloaded / real iperf3 virtio-net",
                 r["guest_cpu_per_gb_offload_vs_iperf3_virtio_send"],
                 r["guest_cpu_per_gb_offload_vs_iperf3_virtio_recv"])]))
            for p, d in v["iperf3"]["paths"].items():
                for dr in ("send", "recv"):
                    if not (d.get(dr) or {}).get("ok"):
                        errs.append(f"VM {p} {dr}: {str((d.get(dr) or {}).get('error'))[-300:]}")
        if v.get("paths"):
            paths = {p: {"send": d["send"], "recv": d["recv"]} for p, d in v["paths"].items()}
            console.print(_throughput_table(
                f"a. TCP in the VM ({v.get('accel')}), same Linux peer, same run (MB per run: "
                + ", ".join(f"{p} {n / 1e6:g}" for p, n in v["bytes"].items()) + ")", paths, labels,
                "device CPU: the chimney device process (virtio-net's device work is inside QEMU)"))
            r = v["ratios"]
            console.print(_ratio_table("a. ratios in the VM", [
                ("offload / virtio-net", r["offload_vs_virtio_send"], r["offload_vs_virtio_recv"]),
                ("offload / software", r["offload_vs_software_send"], r["offload_vs_software_recv"]),
                ("software / virtio-net", r["software_vs_virtio_send"], r["software_vs_virtio_recv"])]))
            for p, d in paths.items():
                for dr, x in d.items():
                    if x and not x.get("verified"):
                        errs.append(f"VM {p} {dr}: {str(x.get('error'))[-300:]}")
        for e in errs:
            console.print(f"[red]{e}[/red]")
    if "hostbus_veth" in res or "hostbus_software" in res:
        paths = {}
        for sect in ("hostbus_veth", "hostbus_software"):
            paths.update((res.get(sect) or {}).get("paths") or {})
        console.print(_throughput_table(
            "b/c. TCP on the host bus (device level), same Linux peer namespace, same run", paths, labels,
            "offloaded and software: chimney perf --stack chimney --bus host; Linux: chimney perf "
            "--stack linux in a second namespace over a veth; all Python applications"))
        rows = []
        if "hostbus_veth" in res:
            r = res["hostbus_veth"]["ratios"]
            rows.append(("b. offload / Linux veth", r["offload_vs_linux_send"], r["offload_vs_linux_recv"]))
        if "hostbus_software" in res:
            r = res["hostbus_software"]["ratios"]
            rows.append(("c. offload / software", r["offload_vs_software_send"], r["offload_vs_software_recv"]))
        console.print(_ratio_table("b/c. ratios on the host bus", rows))
        for p, d in paths.items():
            for dr in ("send", "recv"):
                x = d.get(dr) or {}
                if not x.get("verified"):
                    console.print(f"[red]host bus {p} {dr}: {str(x.get('error'))[-300:]}[/red]")
    if "rr" in res:
        rr = res["rr"]
        t = Table(title=f"d. request/response, {rr['size']} B each way, one connection "
                        f"(at most {rr['count']:,} transactions or {rr['seconds']:g} s)")
        for col in ("where", "path", "transactions", "trans/s", "median us", "p99 us", "verified", "ratio"):
            t.add_column(col, justify="left" if col in ("where", "path") else "right", no_wrap=True)
        for where in ("hostbus", "vm"):
            if where not in rr:
                continue
            base = "linux" if where == "hostbus" else "virtio"
            for p, r in rr[where]["paths"].items():
                lat = r.get("latency_us") or {}
                ratio = ""
                if p == "offload":
                    ratio = (f"{_x(rr[where]['ratios']['offload_vs_software'])} sw, "
                             f"{_x(rr[where]['ratios'][f'offload_vs_{base}'])} {'veth' if base == 'linux' else 'virtio'}")
                t.add_row("host bus" if where == "hostbus" else "VM", labels.get(p, p),
                          f"{r.get('transactions') or 0:,}", f"{r.get('tps') or 0:,.0f}",
                          f"{lat.get('median', 0):,.0f}", f"{lat.get('p99', 0):,.0f}", _ok(r), ratio)
        console.print(t)
    if "bulk" in res:
        b = res["bulk"]
        t = Table(title=f"e. bulk offload of {b['connections']:,} connections (host bus)")
        t.add_column("step")
        t.add_column("time", justify="right")
        t.add_column("per connection", justify="right")
        n = b["connections"] or 1
        for key, what in (("setup_software_s", "set up in software (handshakes)"),
                          ("initiate_s", "INITIATE, one state tree"), ("query_s", "QUERY all"),
                          ("terminate_s", "TERMINATE all (upload)")):
            v = b.get(key)
            t.add_row(what, f"{v * 1000:,.1f} ms" if v is not None else "—",
                      f"{v * 1e6 / n:,.1f} us" if v is not None else "—")
        if b.get("error"):
            t.caption = f"[red]{b['error']}[/red]"
        else:
            t.caption = (f"{b.get('offloaded')} offloaded, {b.get('queried')} queried, {b.get('terminated')} "
                         f"terminated; device CPU {b.get('device_cpu_s')} s")
        console.print(t)
    if "memory" in res:
        m = res["memory"]
        t = Table(title=f"f. device memory per idle offloaded connection ({m['connections']:,} connections)")
        for col in ("device VmRSS before", "offloaded", "after TERMINATE", "delta", "per connection"):
            t.add_column(col, justify="right")
        if m.get("rss_before_kib") is not None:
            t.add_row(f"{m['rss_before_kib']:,} KiB", f"{m['rss_offloaded_kib']:,} KiB",
                      f"{m['rss_after_terminate_kib']:,} KiB", f"{m['delta_kib']:,} KiB",
                      f"{m['bytes_per_connection']:,.0f} B")
        else:
            t.add_row("—", "—", "—", "—", "—")
        t.caption = "RSS delta of the device process across the INITIATE (Python heap; pages, not bytes)"
        console.print(t)
    if res.get("goals"):
        t = Table(title="Performance goals (benchmarks, not tests)")
        for col in ("goal", "target", "measured", "met"):
            t.add_column(col, justify="left" if col == "goal" else "right")
        for g in res["goals"]:
            target = f">= {g['at_least']:g}x" if "at_least" in g else f"<= {g['at_most']:g}x"
            t.add_row(g["what"], target, _x(g["measured"]),
                      "[green]met[/green]" if g["met"] else "[red]not met[/red]")
        t.caption = ("VM goals: against real iperf3 (C) on guest Linux TCP over virtio-net, the same VM and peer. "
                     "Host-bus baselines (veth, software) run the same Python program (chimney perf).")
        console.print(t)
    console.print(f"suite wall time {res['wall_s']:.0f} s")


def all_verified(res: dict) -> bool:
    """Every chimney perf transfer verified, every iperf3 run complete, every request/response run
    checked, bulk and memory without error."""
    ok = True
    for sect in ("vm", "hostbus_veth", "hostbus_software"):
        for p in ((res.get(sect) or {}).get("paths") or {}).values():
            ok = ok and bool(p.get("verified"))
    for p in (((res.get("vm") or {}).get("iperf3") or {}).get("paths") or {}).values():
        ok = ok and bool(p.get("ok"))
    for where in ("hostbus", "vm"):
        for r in (((res.get("rr") or {}).get(where) or {}).get("paths") or {}).values():
            ok = ok and bool(r.get("verified"))
    for sect in ("bulk", "memory"):
        if sect in res:
            ok = ok and not res[sect].get("error")
    return ok
