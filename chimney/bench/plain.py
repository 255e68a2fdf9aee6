"""Plain frames: host bus -> device -> TAP, beside Linux sending the same
frames from a raw socket on a veth, in the same run.

Both senders are Python loops over one frame at a time, so the ratio
compares the paths below the driver: our rings, doorbells and C fast path
against the kernel's packet socket and veth.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from rich.console import Console
from rich.table import Table

from ..guest.bringup import bring_up
from ..host.device import DeviceProcess
from ..host.netns import Netns

ETHERTYPE = b"\x88\xb5"     # local experimental: the kernel drops it unprocessed


def _frame(size: int, src: bytes) -> bytes:
    return b"\x02\xaa\xbb\xcc\xdd\xee" + src + ETHERTYPE + bytes(size - 14)


def _rx_packets(ns: Netns, ifname: str) -> int:
    out = ns.run("cat", f"/sys/class/net/{ifname}/statistics/rx_packets").stdout
    return int(out.strip())


def bench_device(ns: Netns, size: int, count: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        with DeviceProcess(os.path.join(tmp, "nic.sock"), tap="bench0", netns=ns.name) as dev:
            ns.wait_link("bench0")
            with bring_up(socket=dev.socket, ring_size=1024, stack=False) as g:
                mp = g.mp
                frame = _frame(size, mp.mac)
                rx0 = _rx_packets(ns, "bench0")
                batch = [frame] * 256
                sent, t0 = 0, time.perf_counter()
                end = t0 + seconds
                while sent < count and time.perf_counter() < end:
                    mp.send_many(batch)
                    sent += len(batch)
                mp.flush_tx(10)
                dt = time.perf_counter() - t0
                stats = mp.stats()
                got = _rx_packets(ns, "bench0") - rx0
    return {"path": "device", "size": size, "frames": stats["tx_frames"],
            "seconds": dt, "pps": stats["tx_frames"] / dt, "gbps": stats["tx_frames"] * size * 8 / dt / 1e9,
            "peer_rx": got, "drops": stats["tx_drops"]}


def bench_linux(ns: Netns, size: int, count: int, seconds: float) -> dict:
    ns.run("ip", "link", "add", "bva", "type", "veth", "peer", "name", "bvb")
    ns.run("ip", "link", "set", "bva", "up")
    ns.run("ip", "link", "set", "bvb", "up")
    frame = _frame(size, bytes.fromhex("020000000001"))
    script = f"""
import socket, time, json
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("bva", 0))
frame = {frame!r}
sent, t0 = 0, time.perf_counter()
end = t0 + {seconds}
while sent < {count} and time.perf_counter() < end:
    for _ in range(256):
        s.send(frame)
    sent += 256
print(json.dumps({{"frames": sent, "seconds": time.perf_counter() - t0}}))
"""
    try:
        rx0 = _rx_packets(ns, "bvb")
        res = json.loads(ns.run("python3", "-c", script, timeout=seconds + 60).stdout)
        got = _rx_packets(ns, "bvb") - rx0
    finally:
        ns.run("ip", "link", "del", "bva", check=False)
    dt = res["seconds"]
    return {"path": "Linux", "size": size, "frames": res["frames"], "seconds": dt,
            "pps": res["frames"] / dt, "gbps": res["frames"] * size * 8 / dt / 1e9, "peer_rx": got, "drops": 0}


def run(sizes=(64, 1500), count: int = 200_000, seconds: float = 5.0, as_json: bool = False,
        quiet: bool = False) -> list[dict]:
    console = Console(stderr=as_json, quiet=quiet)
    rows = []
    with Netns("bench") as ns:
        for size in sizes:
            with console.status(f"{size}-byte frames through the device"):
                rows.append(bench_device(ns, size, count, seconds))
            with console.status(f"{size}-byte frames through Linux"):
                rows.append(bench_linux(ns, size, count, seconds))
    if quiet:
        return rows
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(console, rows)
    return rows


def print_table(console: Console, rows: list[dict]) -> None:
    t = Table(title="Plain frames: host bus -> device -> TAP  vs  Linux raw socket -> veth",
              caption="same frames, same run; both senders are Python loops")
    for col in ("frame", "path", "frames", "peer got", "pkt/s", "Gbit/s", "ratio"):
        t.add_column(col, justify="left" if col == "path" else "right", no_wrap=True)
    for size in sorted({r["size"] for r in rows}):
        dev, lin = [r for r in rows if r["size"] == size]
        for r in (dev, lin):
            ratio = f"{dev['pps'] / lin['pps']:.2f}x" if r is dev else ""
            t.add_row(f"{size} B", r["path"], f"{r['frames']:,}", f"{r['peer_rx']:,}",
                      f"{r['pps']:,.0f}", f"{r['gbps']:.2f}", ratio)
    console.print(t)
