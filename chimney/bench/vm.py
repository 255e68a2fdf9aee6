"""The VM platform, measured: boot to first command, and ping round trips
in the VM through the chimney NIC (the miniport over VFIO, MSI-X) beside the
guest's own Linux ping over virtio-net, same peer, same run."""
from __future__ import annotations

import json
import statistics

from rich.console import Console
from rich.table import Table

from ..host.vm import Vm

# Guest Linux's ICMP echo over virtio-net, through the kernel's stack (a raw socket).
LINUX_PING = r'''
import json, os, socket, struct, sys, time
from chimney.inet import checksum as csum
peer, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(3)
rtts, ident = [], os.getpid() & 0xffff
for seq in range(count):
    payload = os.urandom(56)
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    pkt = hdr[:2] + struct.pack("!H", csum(hdr + payload)) + hdr[4:] + payload
    t = time.perf_counter()
    s.sendto(pkt, (peer, 0))
    while True:
        try:
            data, _ = s.recvfrom(2048)
        except socket.timeout:
            break
        typ, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, 20)
        if typ == 0 and rid == ident and rseq == seq:
            rtts.append((time.perf_counter() - t) * 1e3)
            break
print(json.dumps({"rtt_ms": rtts, "sent": count}))
'''


def _summary(rtts: list[float]) -> dict:
    return {"n": len(rtts), "min_ms": min(rtts), "median_ms": statistics.median(rtts),
            "avg_ms": statistics.fmean(rtts), "max_ms": max(rtts)} if rtts else {"n": 0}


def run(count: int = 50, as_json: bool = False) -> dict:
    console = Console(stderr=as_json)
    with console.status("booting a VM with the NIC and virtio-net (TCG)"):
        vm = Vm(network=True, virtio_net=True)
        vm.start()
    try:
        boot = vm.boots[0]
        peer = vm.peer
        with console.status(f"{count} pings through the chimney NIC (miniport over VFIO)"):
            r = vm.run(f"python3 -m chimney.guest.selftest arp-ping --peer {peer.nic.peer4} "
                       f"--ip {peer.nic.guest4} --count {count} --json", timeout=300)
            chim = json.loads(r.stdout)
        with console.status(f"{count} pings by guest Linux over virtio-net"):
            r = vm.python(LINUX_PING, peer.vnet.peer4, str(count), timeout=300)
            linux = json.loads(r.stdout)
    finally:
        vm.close()
    res = {"boot_to_first_command_s": boot["agent_ready_s"], "accel": boot["accel"],
           "chimney": _summary(chim.get("ping", {}).get("rtt_ms", [])),
           "virtio_net": _summary(linux["rtt_ms"])}
    if chim.get("ping", {}).get("rtt_ms") and linux["rtt_ms"]:
        res["median_ratio_chimney_over_virtio"] = res["chimney"]["median_ms"] / res["virtio_net"]["median_ms"]
    if as_json:
        print(json.dumps(res, indent=2))
        return res
    console.print(f"VM boot to first command ({res['accel']}): [bold]{res['boot_to_first_command_s']:.1f} s[/bold]")
    t = Table(title="Ping round trip in the VM, same Linux peer, same run")
    for col in ("path", "answered", "min ms", "median", "avg", "max"):
        t.add_column(col, justify="left" if col == "path" else "right", no_wrap=True)
    for label, key in (("chimney (VFIO, MSI-X)", "chimney"), ("Linux virtio-net", "virtio_net")):
        s = res[key]
        if not s["n"]:
            t.add_row(label, f"0/{count}", "", "", "", "")
            continue
        t.add_row(label, f"{s['n']}/{count}", f"{s['min_ms']:.3f}", f"{s['median_ms']:.3f}",
                  f"{s['avg_ms']:.3f}", f"{s['max_ms']:.3f}")
    if "median_ratio_chimney_over_virtio" in res:
        t.caption = f"median RTT chimney / virtio-net: {res['median_ratio_chimney_over_virtio']:.2f}x"
    console.print(t)
    return res
