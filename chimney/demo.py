"""`chimney demo`: the main job.

Provisions what is missing (the QEMU 11 runtime and the guest image), boots a
VM with the chimney NIC (vfio-user) and a virtio-net NIC, both wired to a
Linux peer in a fresh network namespace, and moves the same bulk traffic
three ways, in both directions, verifying every byte (sha256 at both ends):

    offload   chimney perf on the guest host stack, connection offloaded to the NIC
    software  chimney perf on the guest host stack, its own software TCP (same NIC)
    virtio    the same program on guest Linux's kernel TCP over virtio-net

and then, against the user's real baseline (chimney.bench.baseline), for
--seconds each way against a real iperf3 -s in the peer's namespace:

    iperf3_offload  chimney iperf3 --offload on (the chimney NIC, offloaded)
    iperf3_virtio   real iperf3 (Debian's, C) on guest Linux TCP over virtio-net

It prints tables (throughput, CPU seconds per GB in the guest and in the
device process, retransmissions) with the ratios, writes PNG plots (throughput
over time for every run; cwnd and srtt over time for the offloaded run, when
the run reports them) and tears everything down.  `--json` prints one object:
{"paths": {"offload": {...}, "software": {...}, "virtio": {...},
"iperf3_offload": {...}, "iperf3_virtio": {...}}, "ratios": {...}, ...}; the
iperf3 paths carry send_gbps, recv_gbps, guest_cpu_s_per_gb and
device_cpu_s_per_gb ({"send", "recv"}), and "ok" (iperf3 verifies no content,
so their "verified" is null).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .bench import baseline

PATHS = ("offload", "software", "virtio")
LABELS = {"offload": "offloaded (chimney NIC TOE)", "software": "host stack software TCP",
          "virtio": "guest Linux TCP, virtio-net", **baseline.LABELS}
PORT = 5201


def _proc_stat_busy(line: str) -> tuple[int, int] | None:
    """(busy, total) jiffies from /proc/stat's first line."""
    parts = line.split()
    if not parts or parts[0] != "cpu":
        return None
    v = [int(x) for x in parts[1:9]]
    total = sum(v)
    return total - v[3] - v[4], total


def _pid_cpu(pid: int) -> float:
    """user + system CPU seconds of a host process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def client_argv(path: str, peer, nbytes: int, reverse: bool, timeout: float) -> list[str]:
    argv = ["python3", "-m", "chimney.guest.perf", "client"]
    if path == "virtio":
        argv += [peer.vnet.peer4, "--stack", "linux"]
    else:
        argv += [peer.nic.peer4, "--stack", "chimney", "--bus", "vfio",
                 "--ip", f"{peer.nic.guest4}/{peer.nic.prefix4}",
                 "--offload", "on" if path == "offload" else "off"]
    argv += ["-n", str(nbytes), "--json", "-i", "0.1", "--timeout", str(int(timeout))]
    if reverse:
        argv.append("-R")
    return argv


def run_one(vm, path: str, nbytes: int, reverse: bool, timeout: float) -> dict:
    """One verified transfer in the guest, with the guest's and the device's CPU time."""
    cmd = shlex.join(client_argv(path, vm.peer, nbytes, reverse, timeout))
    script = f"head -1 /proc/stat; {cmd}; echo \"rc=$?\"; head -1 /proc/stat"
    dev_pid = vm.device.proc.pid if vm.device else None
    dev0 = _pid_cpu(dev_pid) if dev_pid else 0.0
    t0 = time.monotonic()
    r = vm.run(["sh", "-c", script], timeout=timeout + 60)
    wall = time.monotonic() - t0
    dev_cpu = (_pid_cpu(dev_pid) - dev0) if dev_pid else 0.0
    lines = r.stdout.decode(errors="replace").splitlines()
    res: dict = {"path": path, "direction": "recv" if reverse else "send", "bytes": 0, "gbps": 0.0,
                 "verified": False, "wall_s": round(wall, 2), "error": None}
    report = None
    for ln in lines:
        if ln.startswith("{"):
            try:
                report = json.loads(ln)
            except ValueError:
                pass
    stats = [s for s in (_proc_stat_busy(ln) for ln in lines) if s]
    if len(stats) == 2:
        hz = 100                        # USER_HZ of the guest kernel
        res["guest_cpu_s"] = (stats[1][0] - stats[0][0]) / hz
    res["device_cpu_s"] = round(dev_cpu, 3) if path != "virtio" else None
    if report is None:
        res["error"] = (r.stdout + r.stderr).decode(errors="replace")[-1500:] or f"exit {r.rc}"
        return res
    res["report"] = report
    summ = report.get("summary") or {}
    rcv = (summ.get("sum") or {}).get("receiver") or {}
    snd = (summ.get("sum") or {}).get("sender") or {}
    res["bytes"] = rcv.get("bytes", 0)
    res["seconds"] = rcv.get("seconds", 0.0)
    res["gbps"] = (rcv.get("mbps") or 0.0) / 1000
    res["retransmits"] = snd.get("retransmits")
    dev = (report.get("stack_stats") or {}).get("device") or {}
    if path == "offload" and "offload_retransmits" in dev:
        res["retransmits"] = dev["offload_retransmits"]     # done by the NIC
    cpu = report.get("cpu") or {}
    if cpu.get("machine_s") is not None:
        # the guest's CPU during the data phase only (the command's start-up left out)
        res["guest_cpu_s_command"] = res.get("guest_cpu_s")
        res["guest_cpu_s"] = cpu["machine_s"]
    res["verified"] = bool(summ.get("verified")) and report.get("error") is None
    res["error"] = report.get("error")
    gb = res["bytes"] / 1e9
    if gb:
        if res.get("guest_cpu_s") is not None:
            res["guest_cpu_s_per_gb"] = res["guest_cpu_s"] / gb
        if res["device_cpu_s"] is not None:
            res["device_cpu_s_per_gb"] = res["device_cpu_s"] / gb
    return res


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(runs: list[dict]) -> dict:
    paths = {}
    for p in PATHS:
        mine = {r["direction"]: r for r in runs if r["path"] == p}
        s, rv = mine.get("send", {}), mine.get("recv", {})
        paths[p] = {"send_gbps": s.get("gbps", 0.0), "recv_gbps": rv.get("gbps", 0.0),
                    "verified": bool(s.get("verified") and rv.get("verified")),
                    "send": {k: v for k, v in s.items() if k != "report"},
                    "recv": {k: v for k, v in rv.items() if k != "report"}}
    o, sw, v = paths["offload"], paths["software"], paths["virtio"]
    ratios = {"offload_vs_virtio_send": _ratio(o["send_gbps"], v["send_gbps"]),
              "offload_vs_virtio_recv": _ratio(o["recv_gbps"], v["recv_gbps"]),
              "offload_vs_software_send": _ratio(o["send_gbps"], sw["send_gbps"]),
              "offload_vs_software_recv": _ratio(o["recv_gbps"], sw["recv_gbps"]),
              "software_vs_virtio_send": _ratio(sw["send_gbps"], v["send_gbps"]),
              "software_vs_virtio_recv": _ratio(sw["recv_gbps"], v["recv_gbps"])}
    return {"paths": paths, "ratios": ratios}


def plot(runs: list[dict], outdir: Path) -> list[str]:
    """PNG plots: throughput over time per run; cwnd/srtt over time for the
    offloaded runs when their interval reports carry them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, direction in zip(axes, ("send", "recv")):
        for r in runs:
            if r["direction"] != direction:
                continue
            if "report" in r:
                pts = [(i["end"], i["mbps"]) for i in r["report"].get("intervals") or []]
            else:                   # an iperf3 run: [end, Mbit/s] pairs
                pts = [tuple(i) for i in r.get("intervals") or []]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=LABELS[r["path"]],
                        linestyle="--" if r["path"].startswith("iperf3") else "-")
        ax.set_title(f"guest {'sends' if direction == 'send' else 'receives'}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("Mbit/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("chimney demo: throughput over time (TCG VM, Linux peer)")
    fig.tight_layout()
    f = outdir / "throughput.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(str(f))
    for r in runs:
        if r["path"] != "offload" or "report" not in r:
            continue
        pts = [(i["end"], s.get("cwnd"), s.get("srtt_ms")) for i in r["report"].get("intervals") or []
               for s in i.get("streams", []) if s.get("cwnd") is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], color="tab:blue", marker=".", label="cwnd (KiB)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("cwnd (KiB)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], color="tab:red", marker=".", label="srtt (ms)")
        ax2.set_ylabel("srtt (ms)", color="tab:red")
        ax.set_title(f"offloaded connection, guest {r['direction']}s: cwnd and srtt (from the NIC)")
        fig.tight_layout()
        f = outdir / f"offload-{r['direction']}-cwnd-srtt.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(str(f))
    return files


SHORT = {"offload": "offload", "software": "software", "virtio": "virtio-net",
         "iperf3_offload": "iperf3 offload", "iperf3_virtio": "iperf3 virtio-net"}


def all_ok(res: dict) -> bool:
    """Every chimney perf run verified (sha256) and every iperf3 run complete."""
    return all(p["ok"] if p.get("verified") is None else p["verified"] for p in res["paths"].values())


def _iperf3_table(res: dict) -> Table:
    t = Table(title=f"Against the real baseline: iperf3, {res['iperf3_seconds']} s each way, "
                    "real iperf3 -s in the peer's namespace, same VM, same run")
    for col in ("path", "dir", "Mbit/s", "ok", "guest CPU s/GB", "device CPU s/GB", "retrans"):
        t.add_column(col, justify="left" if col in ("path", "dir") else "right", no_wrap=True)
    for p in baseline.IPERF3_PATHS:
        for d in ("send", "recv"):
            r = res["paths"][p][d]
            g, dv = r.get("guest_cpu_s_per_gb"), r.get("device_cpu_s_per_gb")
            t.add_row(SHORT[p], d, f"{r.get('gbps', 0) * 1000:.1f}",
                      "[green]yes[/green]" if r.get("ok") else "[red]NO[/red]",
                      f"{g:.1f}" if g is not None else "", f"{dv:.1f}" if dv is not None else "-",
                      str(r.get("retransmits")) if r.get("retransmits") is not None else "")
    t.caption = ("iperf3 offload: " + LABELS["iperf3_offload"] + "; iperf3 virtio-net: " + LABELS["iperf3_virtio"]
                 + ". Guest CPU: the whole guest, time not idle, over the data phase. Device CPU: the chimney "
                 "device process; virtio-net's device work runs inside QEMU (no separate figure).")
    return t


def print_tables(console: Console, res: dict) -> None:
    t = Table(title=f"Bulk TCP in the VM ({res['bytes_per_run'] / 1e6:.0f} MB per run, {res['accel']}), "
                    "same Linux peer, same run")
    for col in ("path", "dir", "Mbit/s", "verified", "guest CPU s/GB", "device CPU s/GB", "retrans"):
        t.add_column(col, justify="left" if col in ("path", "dir") else "right", no_wrap=True)
    errors = []
    for p in PATHS:
        for d in ("send", "recv"):
            r = res["paths"][p][d]
            if not r:
                continue
            g = r.get("guest_cpu_s_per_gb")
            dv = r.get("device_cpu_s_per_gb")
            if not r.get("verified"):
                errors.append(f"{SHORT[p]} {d}: {(r.get('error') or 'not verified').strip()[-300:]}")
            t.add_row(SHORT[p], d, f"{r.get('gbps', 0) * 1000:.1f}",
                      "[green]yes[/green]" if r.get("verified") else "[red]NO[/red]",
                      f"{g:.0f}" if g is not None else "", f"{dv:.0f}" if dv is not None else "-",
                      str(r.get("retransmits")) if r.get("retransmits") is not None else "")
    t.caption = ("offload: " + LABELS["offload"] + "; software: " + LABELS["software"]
                 + "; virtio-net: " + LABELS["virtio"] + ". Guest CPU: the whole guest during the "
                 "data phase. Device CPU: the chimney device process over the run (virtio-net's device "
                 "work runs inside QEMU). Retransmissions: by the NIC (offload), by the sending "
                 "Linux kernel (virtio-net).")
    console.print(t)
    for e in errors:
        console.print(f"[red]{e}[/red]")
    if "iperf3_seconds" in res:
        console.print(_iperf3_table(res))
        for p in baseline.IPERF3_PATHS:
            for d in ("send", "recv"):
                r = res["paths"][p][d]
                if not r.get("ok"):
                    console.print(f"[red]{SHORT[p]} {d}: {(r.get('error') or 'failed').strip()[-300:]}[/red]")
    rt = Table(title="Ratios (throughput; guest CPU per GB)")
    rt.add_column("comparison")
    rt.add_column("send", justify="right")
    rt.add_column("recv", justify="right")
    for a, b in (("offload", "virtio"), ("offload", "software"), ("software", "virtio")):
        s, r = res["ratios"][f"{a}_vs_{b}_send"], res["ratios"][f"{a}_vs_{b}_recv"]
        rt.add_row(f"{a} / {b}", f"{s:.2f}x" if s else "—", f"{r:.2f}x" if r else "—")
    if "iperf3_seconds" in res:
        for name, key in (("iperf3: offload / real iperf3 virtio-net", "offload_vs_iperf3_virtio_{}"),
                          ("guest CPU/GB: offload / real iperf3 virtio-net",
                           "guest_cpu_per_gb_offload_vs_iperf3_virtio_{}")):
            s, r = res["ratios"].get(key.format("send")), res["ratios"].get(key.format("recv"))
            rt.add_row(name, f"{s:.2f}x" if s else "—", f"{r:.2f}x" if r else "—")
    console.print(rt)
    if res.get("plots"):
        console.print("plots: " + ", ".join(res["plots"]))


def run(as_json: bool = False, nbytes: int = 50_000_000, outdir: str = "chimney-demo",
        timeout: float = 600.0, seconds: int = baseline.DEFAULT_SECONDS) -> dict:
    from .host.vm import Vm
    from .images import build_all

    console = Console(stderr=as_json)
    if not console.is_terminal:
        console.width = max(console.width, 120)     # tables in logs and pipes stay whole
    console.rule("chimney demo: provisioning (QEMU 11 runtime, guest image)")
    build_all(quiet=as_json)
    runs: list[dict] = []
    with console.status("booting a VM with the chimney NIC and virtio-net, Linux peer in a namespace"):
        vm = Vm(network=True, virtio_net=True)
        vm.start()
    server = None
    try:
        accel = vm.boots[0]["accel"]
        server = vm.peer.popen(sys.executable, "-m", "chimney.guest.perf", "server", "--stack", "linux",
                               "--port", str(PORT), "-i", "0", cwd=str(Path(__file__).resolve().parent.parent),
                               # its per-run reports would mix with ours (and break --json's one object)
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        for path in PATHS:
            for reverse in (False, True):
                what = f"{LABELS[path]}: guest {'receives' if reverse else 'sends'} {nbytes / 1e6:.0f} MB"
                with console.status(what):
                    r = run_one(vm, path, nbytes, reverse, timeout)
                runs.append(r)
                mark = "[green]verified[/green]" if r["verified"] else f"[red]FAILED[/red] {r['error'] or ''}"[:200]
                console.print(f"{what}: {r['gbps'] * 1000:.1f} Mbit/s {mark}")
        server.kill()
        server.wait()
        server = None
        base = baseline.measure(vm, console, seconds, timeout)
        alive = vm.device.alive if vm.device else False
    finally:
        if server is not None:
            server.kill()
            server.wait()
        vm.close()
    res = summarize(runs)
    res["paths"].update(base["paths"])
    res["ratios"].update(base["ratios"])
    res.update({"bytes_per_run": nbytes, "iperf3_seconds": seconds, "accel": accel, "device_alive": alive})
    try:
        res["plots"] = plot(runs + [r for p in baseline.IPERF3_PATHS for r in (res["paths"][p]["send"],
                                                                          res["paths"][p]["recv"]) if r],
                            Path(outdir))
    except Exception as e:          # plots are a convenience; the figures are in the table
        res["plots"] = []
        res["plot_error"] = str(e)
    if as_json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print_tables(console, res)
    return res
