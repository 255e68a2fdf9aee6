"""`chimney demo`: the main job.

Starts a NIC whose wire is a TAP in a fresh network namespace with the Linux
kernel as the peer, boots a VM with the NIC attached over vfio-user and shows
what the guest sees, then drives the NIC from the host bus: ARP, ping round
trips and plain-frame throughput beside Linux.  Prints tables; --json prints
one object.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from rich.console import Console
from rich.table import Table

from . import hw
from .guest.selftest import BROADCAST, ETH_P_ARP, ETH_P_IP, arp, ether, icmp_echo, ipv4
from .bench import plain
from .guest.bus.vfio_user import VfioUserBus
from .guest.miniport import Miniport
from .host.device import DeviceProcess
from .host.netns import Netns, PeerAddrs


def _arp_request(mac: bytes, sip: str, tip: str) -> bytes:
    return ether(BROADCAST, mac, ETH_P_ARP, arp(1, mac, sip, bytes(6), tip))


def _echo(mac: bytes, peer_mac: bytes, sip: str, dip: str, seq: int, payload: bytes) -> bytes:
    return ether(peer_mac, mac, ETH_P_IP, ipv4(sip, dip, 1, icmp_echo(0xC41E, seq, payload)))


def _wait_frame(mp: Miniport, match, timeout: float) -> bytes | None:
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        f = mp.recv(timeout=left)
        if f is not None and match(f):
            return f
    return None


def host_bus_traffic(sock: str, addrs: PeerAddrs, pings: int = 20) -> dict:
    """ARP for the peer, then ping it; returns what happened."""
    bus = VfioUserBus(sock)
    try:
        mp = Miniport(bus)
        mp.up()
        mp.send(_arp_request(mp.mac, addrs.guest4, addrs.peer4))
        reply = _wait_frame(mp, lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02", 5)
        if reply is None:
            raise RuntimeError("the Linux peer did not answer ARP")
        peer_mac = reply[22:28]
        rtts, lost = [], 0
        for seq in range(pings):
            payload = os.urandom(56)
            t0 = time.perf_counter()
            mp.send(_echo(mp.mac, peer_mac, addrs.guest4, addrs.peer4, seq, payload))
            pong = _wait_frame(mp, lambda f: f[12:14] == b"\x08\x00" and f[34] == 0
                               and int.from_bytes(f[40:42], "big") == seq and f[42:] == payload, 2)
            if pong is None:
                lost += 1
            else:
                rtts.append((time.perf_counter() - t0) * 1e6)
        return {"mac": mp.mac.hex(":"), "peer_mac": peer_mac.hex(":"), "pings": pings, "lost": lost,
                "rtt_us_median": statistics.median(rtts) if rtts else None,
                "rtt_us_min": min(rtts) if rtts else None, "stats": mp.stats()}
    finally:
        bus.close()


def guest_run(sock: str, workdir: str, addrs: PeerAddrs, pings: int = 20) -> dict:
    """Boot a VM with the NIC: show what the guest sees, then let the miniport
    inside it (VFIO behind the vIOMMU, MSI-X) ARP for and ping the Linux peer."""
    from .host.qemu import run_in_guest
    pci = f"{hw.PCI_VENDOR_ID:04x}:{hw.PCI_DEVICE_ID:04x}"
    cmd = (f"lspci -nn -d {pci}; lspci -vv -d {pci} | grep -E 'Region|MSI-X|Express|IOMMU'; uname -r; "
           f"echo ===; python3 -m chimney.guest.selftest arp-ping --peer {addrs.peer4} --ip {addrs.guest4} "
           f"--count {pings} --json")
    t0 = time.monotonic()
    rc, out, err = run_in_guest(cmd, vfio_user_socket=sock, workdir=workdir, timeout=300)
    seen, _, report = out.decode(errors="replace").partition("===\n")
    try:
        selftest = json.loads(report)
    except ValueError:
        selftest = {"ok": False, "error": (report + err.decode(errors="replace"))[-2000:]}
    return {"rc": rc, "lspci": seen, "selftest": selftest, "seconds": time.monotonic() - t0}


def run(as_json: bool = False, seconds: float = 2.0) -> dict:
    console = Console(stderr=as_json)
    addrs = PeerAddrs()
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="chimney-demo-") as tmp, Netns("demo") as ns:
        sock = os.path.join(tmp, "nic.sock")
        with DeviceProcess(sock, tap="chim0", netns=ns.name, pcap=os.path.join(tmp, "wire.pcap")) as dev:
            ns.configure_peer("chim0", addrs)
            with console.status("booting a VM with the NIC; its miniport pings the Linux peer"):
                result["guest"] = guest_run(sock, os.path.join(tmp, "vm"), addrs)
            with console.status("host bus: ARP and ping the Linux peer"):
                result["host_bus"] = host_bus_traffic(sock, addrs)
            if not dev.alive:
                raise RuntimeError("device died:\n" + dev.log_text()[-2000:])
        with console.status("plain-frame throughput beside Linux"):
            result["throughput"] = plain.run(count=200_000, seconds=seconds, as_json=True, quiet=True)
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    g = result["guest"]
    console.rule("In the VM: lspci, then the miniport over VFIO (vIOMMU, MSI-X)")
    console.print(g["lspci"].rstrip())
    st = g["selftest"]
    t = Table(title="Guest miniport -> NIC -> TAP -> Linux peer")
    t.add_column("what")
    t.add_column("result", justify="right")
    if "error" in st:
        t.add_row("error", st["error"])
    else:
        p, irq = st.get("ping", {}), st.get("irq", {})
        t.add_row("ARP: peer MAC", f"{st.get('peer_mac')} ({st.get('arp_rtt_ms')} ms)")
        t.add_row("ICMP echo", f"{p.get('received')}/{p.get('sent')} answered")
        t.add_row("round trip min / avg / max",
                  f"{p.get('rtt_min_ms')} / {p.get('rtt_avg_ms')} / {p.get('rtt_max_ms')} ms")
        t.add_row("MSI-X: sent / miniport woken", f"{irq.get('device_interrupts')} / {irq.get('total_wakeups')}")
        t.add_row("result", "[green]OK[/green]" if st.get("ok") else "[red]FAILED[/red]")
    t.caption = f"VM boot + commands: {g['seconds']:.1f} s under TCG"
    console.print(t)
    h = result["host_bus"]
    t = Table(title="Host bus (guest code on the host) -> device -> TAP -> Linux peer")
    t.add_column("what")
    t.add_column("result", justify="right")
    t.add_row("NIC MAC / peer MAC (learned by ARP)", f"{h['mac']} / {h['peer_mac']}")
    t.add_row("ICMP echo", f"{h['pings'] - h['lost']}/{h['pings']} answered")
    if h["rtt_us_median"] is not None:
        t.add_row("round trip (median / min)", f"{h['rtt_us_median']:.0f} / {h['rtt_us_min']:.0f} µs")
    s = h["stats"]
    t.add_row("device counters", f"tx {s['tx_frames']} rx {s['rx_frames']} irq {s['interrupts']} "
                                 f"dma_errors {s['dma_errors']}")
    console.print(t)
    plain.print_table(console, result["throughput"])
    return result
