"""The user's real baseline, in a VM: real iperf3 (Debian's, C) on guest Linux TCP over
virtio-net, beside `chimney iperf3 --offload on` (the chimney NIC, the guest host stack,
the connection offloaded to the NIC's TOE), both against a real `iperf3 -s` in the
Linux peer's namespace (a fresh one-off server per run), time-based, in both
directions (-R: the guest receives).

    iperf3_offload  python3 -m chimney.guest.iperf3 client NIC-PEER --stack chimney
                    --bus vfio --offload on -t S --json [-R]
    iperf3_virtio   iperf3 -c VIRTIO-PEER -t S -J [-R]

Figures per run: the receiver's bytes and seconds (iperf3's end.sum_received), the
guest's CPU seconds per GB and, for the chimney NIC, the device process's CPU seconds
per GB (its /proc/PID/stat on the host).  virtio-net's device work runs inside QEMU,
mixed with TCG's emulation of the guest, so it has no device figure.

Guest CPU is the whole guest's time not idle (chimney.guest.tools.cpu), which counts
the kernel's TCP and softirq work and vCPU time held in device accesses, over the data
phase: for chimney iperf3 its own reading from TEST_START to the results exchange
(Python start-up and the stack's bring-up left out); for real iperf3 the same reading
around the command (its start-up is a C program's, a few ms).  guest_cpu_s_command is
that reading around the command for both.  The process's own CPU (iperf3's
cpu_utilization_percent host_total times the sender's seconds) is kept beside it as
process_cpu_s.  Both ends' byte counts must
agree (chimney iperf3) or be positive with no error (iperf3): the runs are bounded by
-t and a hard timeout; iperf3 does not verify content.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import time

IPERF3_PATHS = ("iperf3_offload", "iperf3_virtio")
LABELS = {"iperf3_offload": "chimney iperf3, offloaded (chimney NIC TOE)",
          "iperf3_virtio": "real iperf3, guest Linux TCP, virtio-net"}
IPERF3_PORT = 5301
DEFAULT_SECONDS = 10


# Runs a command in the guest between two readings of chimney.guest.tools.cpu (the
# whole guest's CPU), printed on stderr: the same reading for both paths.
_CPU_WRAPPER = """\
import json, subprocess, sys
from chimney.guest.tools.cpu import CpuMeter
m = CpuMeter()
rc = subprocess.call(sys.argv[1:])
print("chimney-cpu " + json.dumps(m.result()), file=sys.stderr)
sys.exit(rc)
"""


def start_server(peer, port: int = IPERF3_PORT, wait: float = 15.0):
    """A real one-off iperf3 server (-s -1) in the peer's namespace (both the NIC's and
    virtio-net's addresses are there), returned once it listens: one per run, so no
    test meets a server still finishing the one before."""
    p = peer.popen("iperf3", "-s", "-1", "--forceflush", "-p", str(port), stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT)
    fd = p.stdout.fileno()
    deadline = time.monotonic() + wait
    seen = b""
    while time.monotonic() < deadline and b"Server listening" not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            break
        seen += chunk
    if b"Server listening" in seen:
        return p            # its later output is not read: a pipe holds iperf3's few lines of text
    stop_server(p, grace=0)
    raise RuntimeError(f"iperf3 -s in {peer.name} did not start listening on {port}: "
                       f"{seen.decode(errors='replace').strip()[-300:] or 'no output'}")


def stop_server(p, grace: float = 15.0) -> None:
    """A one-off server exits after its test; one whose client never came is killed."""
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    p.stdout.close()


def client_argv(path: str, peer, seconds: int, reverse: bool, timeout: float, port: int = IPERF3_PORT) -> list[str]:
    if path == "iperf3_virtio":
        argv = ["iperf3", "-c", peer.vnet.peer4, "-p", str(port), "-t", str(seconds), "-J"]
    elif path == "iperf3_offload":
        argv = ["python3", "-m", "chimney.guest.iperf3", "client", peer.nic.peer4, "-p", str(port),
                "--stack", "chimney", "--bus", "vfio", "--ip", f"{peer.nic.guest4}/{peer.nic.prefix4}",
                "--offload", "on", "-t", str(seconds), "--json", "--timeout", f"{timeout:g}"]
    else:
        raise ValueError(f"unknown iperf3 path {path!r}")
    if reverse:
        argv.append("-R")
    return argv


def _wrapper_cpu(err_text: str) -> dict:
    for ln in reversed(err_text.splitlines()):
        if ln.startswith("chimney-cpu "):
            try:
                return json.loads(ln.partition(" ")[2])
            except ValueError:
                break
    return {}


def _report(text: str) -> dict | None:
    """iperf3's -J object: pretty-printed by real iperf3, one line by chimney iperf3."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for ln in reversed(text.splitlines()):
        if ln.startswith("{"):
            try:
                return json.loads(ln)
            except ValueError:
                return None
    return None


def run_one(vm, path: str, seconds: int, reverse: bool, timeout: float, port: int = IPERF3_PORT) -> dict:
    """One time-based iperf3 test in the guest against the peer's iperf3 -s."""
    from ..demo import _pid_cpu
    argv = ["python3", "-c", _CPU_WRAPPER, *client_argv(path, vm.peer, seconds, reverse, timeout, port)]
    dev_pid = vm.device.proc.pid if (vm.device and path == "iperf3_offload") else None
    server = start_server(vm.peer, port)
    try:
        dev0 = _pid_cpu(dev_pid) if dev_pid else 0.0
        t0 = time.monotonic()
        r = vm.run(argv, timeout=timeout + 60)
        wall = time.monotonic() - t0
        dev_cpu = (_pid_cpu(dev_pid) - dev0) if dev_pid else None
    finally:
        stop_server(server)
    out_text, err_text = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    res: dict = {"path": path, "direction": "recv" if reverse else "send", "seconds_asked": seconds,
                 "bytes": 0, "seconds": 0.0, "gbps": 0.0, "ok": False, "wall_s": round(wall, 2),
                 "device_cpu_s": round(dev_cpu, 3) if dev_cpu is not None else None, "error": None}
    command_cpu = _wrapper_cpu(err_text).get("machine_s")
    rep = _report(out_text)
    if rep is None:
        res["error"] = (out_text + err_text).strip()[-1500:] or f"exit {r.rc}"
        return res
    end = rep.get("end") or {}
    rcv, snd = end.get("sum_received") or {}, end.get("sum_sent") or {}
    res["bytes"] = int(rcv.get("bytes") or 0)
    res["seconds"] = float(rcv.get("seconds") or 0.0)
    res["gbps"] = res["bytes"] * 8 / res["seconds"] / 1e9 if res["seconds"] > 0 else 0.0
    res["sender_bytes"] = int(snd.get("bytes") or 0)
    res["retransmits"] = snd.get("retransmits")
    res["intervals"] = [[round(float(i["sum"]["end"]), 3), round(float(i["sum"]["bits_per_second"]) / 1e6, 1)]
                        for i in rep.get("intervals") or [] if isinstance(i.get("sum"), dict)]
    host_total = (end.get("cpu_utilization_percent") or {}).get("host_total")
    if host_total is not None and snd.get("seconds"):
        res["process_cpu_s"] = round(host_total / 100 * float(snd["seconds"]), 3)
    mine = rep.get("chimney") or {}
    res["guest_cpu_s_command"] = command_cpu
    machine = (mine.get("cpu") or {}).get("machine_s")
    res["guest_cpu_s"] = machine if machine is not None else command_cpu
    if path == "iperf3_offload":
        stats = mine.get("stack_stats") or {}
        res["offloaded"] = (stats.get("offload") or {}).get("offloaded", 0) > 0
        dev = stats.get("device") or {}
        if "offload_retransmits" in dev:
            res["retransmits"] = dev["offload_retransmits"]     # done by the NIC
        agree = bool(mine.get("counts_agree"))
    else:
        agree = True                    # real iperf3 reports only; positive counts and no error below
    res["error"] = rep.get("error") or mine.get("error") or (None if r.rc == 0 else f"exit {r.rc}: {err_text[-300:]}")
    if res["error"] is None and not agree:
        res["error"] = (f"byte counts disagree: the sender reports {res['sender_bytes']}, "
                        f"the receiver {res['bytes']}")
    res["ok"] = res["error"] is None and res["bytes"] > 0
    gb = res["bytes"] / 1e9
    if gb:
        if res["guest_cpu_s"] is not None:
            res["guest_cpu_s_per_gb"] = res["guest_cpu_s"] / gb
        if res["device_cpu_s"] is not None:
            res["device_cpu_s_per_gb"] = res["device_cpu_s"] / gb
    return res


def _ratio(a, b):
    return a / b if a and b else None


def summarize(runs: list[dict]) -> dict:
    """{"paths": {path: {send_gbps, recv_gbps, guest_cpu_s_per_gb, device_cpu_s_per_gb, ok, send, recv}},
    "ratios": offloaded / real iperf3 over virtio-net: throughput per direction, guest CPU per GB}."""
    paths = {}
    for p in IPERF3_PATHS:
        mine = {r["direction"]: r for r in runs if r["path"] == p}
        s, rv = mine.get("send", {}), mine.get("recv", {})
        paths[p] = {"send_gbps": s.get("gbps", 0.0), "recv_gbps": rv.get("gbps", 0.0),
                    "guest_cpu_s_per_gb": {"send": s.get("guest_cpu_s_per_gb"), "recv": rv.get("guest_cpu_s_per_gb")},
                    "device_cpu_s_per_gb": {"send": s.get("device_cpu_s_per_gb"),
                                            "recv": rv.get("device_cpu_s_per_gb")},
                    "ok": bool(s.get("ok") and rv.get("ok")), "verified": None,   # iperf3 checks no content
                    "send": s, "recv": rv}
    o, v = paths["iperf3_offload"], paths["iperf3_virtio"]
    ratios = {"offload_vs_iperf3_virtio_send": _ratio(o["send_gbps"], v["send_gbps"]),
              "offload_vs_iperf3_virtio_recv": _ratio(o["recv_gbps"], v["recv_gbps"])}
    for d in ("send", "recv"):
        ratios[f"guest_cpu_per_gb_offload_vs_iperf3_virtio_{d}"] = _ratio(o["guest_cpu_s_per_gb"][d],
                                                                         v["guest_cpu_s_per_gb"][d])
    return {"paths": paths, "ratios": ratios}


def measure(vm, console, seconds: int, timeout: float, log=None) -> dict:
    """Both paths, both directions, each against a fresh real iperf3 -s in the peer's namespace."""
    log = log or console.print
    runs = []
    for path in IPERF3_PATHS:
        for reverse in (False, True):
            what = f"{LABELS[path]}: guest {'receives' if reverse else 'sends'} for {seconds} s"
            with console.status(what):
                r = run_one(vm, path, seconds, reverse, timeout)
            runs.append(r)
            log(f"{what}: {r['gbps'] * 1000:.1f} Mbit/s"
                + ("" if r["ok"] else f" FAILED {str(r.get('error'))[:300]}"))
    out = summarize(runs)
    out["seconds"] = seconds
    return out
