"""The host stack's software TCP in the VM, beside guest Linux TCP over
virtio-net: chimney perf inside the guest, once on our host stack over the
chimney NIC (miniport on VFIO, --stack chimney) and once on the guest
kernel's sockets over virtio-net (--stack linux), against the same Linux
peer (chimney perf --stack linux in the VM's namespace), in the same run,
both directions.  Every run is sha256-verified and bounded in bytes and
time; the table gives Mbit/s and the ratio software / virtio-net."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from ..host.vm import Vm


def _last_json(text: bytes) -> dict | None:
    try:
        return json.loads(text.decode(errors="replace").strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


def one_run(vm: Vm, *, stack: str, peer_ip: str, nbytes: int, reverse: bool, port: int,
            timeout: float) -> dict:
    """chimney perf client in the guest -> server on the peer; the guest's figures."""
    srv = vm.peer.popen(sys.executable, "-m", "chimney.guest.perf", "server", "--stack", "linux", "--once",
                        "--json", "--port", str(port), "--accept-timeout", "60",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    bus = "--bus vfio" if stack == "chimney" else ""
    t0 = time.monotonic()
    try:
        r = vm.run(f"python3 -m chimney.guest.perf client {peer_ip} --port {port} -n {nbytes} --json -i 0 "
                   f"--stack {stack} {bus} --timeout {timeout:g} {'-R' if reverse else ''}", timeout=timeout + 60)
    finally:
        try:
            srv.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.communicate()
    wall = time.monotonic() - t0
    res = _last_json(r.stdout) or {"error": f"no result (rc {r.rc}): {r.stderr.decode(errors='replace')[-500:]}"}
    out = {"stack": stack, "direction": "peer->guest" if reverse else "guest->peer", "bytes": nbytes,
           "wall_s": round(wall, 2), "verified": bool(res.get("verified")), "error": res.get("error"),
           "mbps": None}
    if res.get("summary"):
        out["mbps"] = res["summary"]["sum"]["receiver"]["mbps"]
    return out


def run(nbytes: int = 20_000_000, linux_bytes: int | None = None, as_json: bool = False,
        timeout: float = 600.0) -> dict:
    linux_bytes = linux_bytes or max(nbytes, 100_000_000)
    console = Console(stderr=as_json, width=max(100, Console().width))
    with console.status("booting a VM with the NIC and virtio-net (TCG)"):
        vm = Vm(network=True, virtio_net=True)
        vm.start()
    runs = []
    try:
        boot = vm.boots[0]
        peer = vm.peer
        port = 5301
        for reverse in (False, True):
            for stack, ip, n in (("chimney", peer.nic.peer4, nbytes), ("linux", peer.vnet.peer4, linux_bytes)):
                what = f"{stack}: {n / 1e6:g} MB {'peer -> guest' if reverse else 'guest -> peer'}"
                with console.status(what):
                    runs.append(one_run(vm, stack=stack, peer_ip=ip, nbytes=n, reverse=reverse, port=port,
                                        timeout=timeout))
                port += 1
    finally:
        vm.close()
    res = {"accel": boot["accel"], "runs": runs, "ratios": {}}
    for direction in ("guest->peer", "peer->guest"):
        c = next((r for r in runs if r["stack"] == "chimney" and r["direction"] == direction), None)
        v = next((r for r in runs if r["stack"] == "linux" and r["direction"] == direction), None)
        if c and v and c["mbps"] and v["mbps"]:
            res["ratios"][direction] = c["mbps"] / v["mbps"]
    if as_json:
        print(json.dumps(res, indent=2))
        return res
    t = Table(title=f"TCP throughput in the VM ({res['accel']}), same Linux peer, same run",
              caption="software TCP: the host stack in the guest (chimney perf --stack chimney, miniport "
                      "on VFIO); Linux TCP: the guest kernel's sockets")
    for col in ("path", "direction", "bytes", "Mbit/s", "verified", "wall s"):
        t.add_column(col, justify="left" if col in ("path", "direction") else "right", no_wrap=True)
    label = {"chimney": "software TCP, chimney NIC", "linux": "Linux TCP, virtio-net"}
    for r in runs:
        t.add_row(label[r["stack"]], r["direction"], f"{r['bytes'] / 1e6:g} MB",
                  f"{r['mbps']:.1f}" if r["mbps"] else "-", "yes" if r["verified"] else f"NO {r['error'] or ''}",
                  f"{r['wall_s']:.1f}")
    console.print(t)
    t2 = Table(title="software path / guest Linux over virtio-net")
    t2.add_column("direction")
    t2.add_column("ratio", justify="right")
    for d, ratio in res["ratios"].items():
        t2.add_row(d, f"{ratio:.3f}x")
    console.print(t2)
    return res
