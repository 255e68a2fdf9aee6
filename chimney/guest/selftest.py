"""Guest self-tests of the NIC through the real Linux VFIO bus.

    python3 -m chimney.guest.selftest arp-ping --peer 10.199.0.1 --ip 10.199.0.2 [--count N] [--json]

``arp-ping`` brings the miniport up on VfioBus (vfio-pci behind the virtual
IOMMU), ARPs for the peer, pings it ``count`` times and reports the peer's
MAC, the replies, their round-trip times, the device's statistics and how
the miniport was woken: ``irq_wakeups`` counts waits that ended because an
MSI-X eventfd fired, ``irq_timeouts`` waits that ran out (the miniport waits
in slices of 0.5 s, so a missing interrupt shows as timeouts and RTTs of
about 500 ms).  Frames are built by hand (no scapy in the guest).  Exit
status 0 when the peer answered the ARP and every ping.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time

from .. import hw
from ..inet import checksum

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
BROADCAST = b"\xff" * 6
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0


# -- frames ------------------------------------------------------------------------
def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    frame = dst + src + struct.pack("!H", ethertype) + payload
    return frame + b"\0" * (60 - len(frame)) if len(frame) < 60 else frame


def arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sha, socket.inet_aton(spa),
                       tha, socket.inet_aton(tpa))


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 0, ttl: int = 64) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def icmp_echo(ident: int, seq: int, payload: bytes, typ: int = ICMP_ECHO_REQUEST) -> bytes:
    hdr = struct.pack("!BBHHH", typ, 0, 0, ident, seq)
    return hdr[:2] + struct.pack("!H", checksum(hdr + payload)) + hdr[4:] + payload


def parse(frame: bytes) -> dict:
    """The fields we care about: ARP and ICMP echo over IPv4."""
    if len(frame) < 14:
        return {"kind": "runt"}
    dst, src, etype = frame[:6], frame[6:12], struct.unpack_from("!H", frame, 12)[0]
    out = {"kind": "other", "dst": dst, "src": src, "ethertype": etype}
    if etype == ETH_P_ARP and len(frame) >= 42:
        _htype, _ptype, _hl, _pl, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
        out.update(kind="arp", op=op, sha=sha, spa=socket.inet_ntoa(spa), tha=tha, tpa=socket.inet_ntoa(tpa))
    elif etype == ETH_P_IP and len(frame) >= 34:
        vihl, proto = frame[14], frame[23]
        ihl = (vihl & 0xF) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        ip = frame[14:14 + total]
        out.update(kind="ipv4", proto=proto, src_ip=socket.inet_ntoa(frame[26:30]),
                   dst_ip=socket.inet_ntoa(frame[30:34]), ip_ok=checksum(ip[:ihl]) == 0)
        if proto == 1 and len(ip) >= ihl + 8:
            typ, _code, _ck, ident, seq = struct.unpack_from("!BBHHH", ip, ihl)
            out.update(kind="icmp", type=typ, id=ident, seq=seq, payload=ip[ihl + 8:],
                       icmp_ok=checksum(ip[ihl:]) == 0)
    return out


# -- arp-ping ------------------------------------------------------------------------
class _Station:
    """The miniport with an address: answers ARP for itself while it waits."""

    def __init__(self, mp, ip: str):
        self.mp, self.ip = mp, ip
        self.arp_answered = 0
        self.other_frames = 0

    def wait_for(self, match, timeout: float):
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            raw = self.mp.recv(timeout=left)
            if raw is None:
                return None
            p = parse(raw)
            if match(p):
                return p
            if p["kind"] == "arp" and p["op"] == 1 and p["tpa"] == self.ip:
                self.mp.send(ether(p["sha"], self.mp.mac, ETH_P_ARP,
                                   arp(2, self.mp.mac, self.ip, p["sha"], p["spa"])))
                self.arp_answered += 1
            else:
                self.other_frames += 1


def arp_ping(peer: str, ip: str, count: int = 4, pci: str | None = None, timeout: float = 3.0,
             interval: float = 0.0, size: int = 56) -> dict:
    from .bringup import bring_up

    result: dict = {"peer_ip": peer, "ip": ip, "ok": False}
    t0 = time.monotonic()
    g = bring_up(bus="vfio", pci=pci, stack=False)
    bus, mp = g.bus, g.mp
    result.update(pci=bus.addr, iommu_group=bus.group, open_s=g.timings["open_s"])
    try:
        result.update(up_s=g.timings["up_s"], mac=mp.mac.hex(":"), link_up=mp.link_up,
                      dma_chunks=[{"iova": hex(c.iova), "size": c.size} for c in bus._chunks],
                      doorbell_mmapped=hw.BAR_DOORBELL in bus._bars)
        st = _Station(mp, ip)

        # ARP for the peer (three tries).
        peer_mac = None
        for attempt in range(3):
            t = time.perf_counter()
            mp.send(ether(BROADCAST, mp.mac, ETH_P_ARP, arp(1, mp.mac, ip, b"\0" * 6, peer)))
            rep = st.wait_for(lambda p: p["kind"] == "arp" and p["op"] == 2 and p["spa"] == peer, timeout)
            if rep is not None:
                peer_mac = rep["sha"]
                result.update(arp_rtt_ms=round((time.perf_counter() - t) * 1e3, 3), arp_tries=attempt + 1,
                              arp_reply_to_us=rep["tpa"] == ip and rep["dst"] == mp.mac)
                break
        result["peer_mac"] = peer_mac.hex(":") if peer_mac else None

        # Ping it.
        rtts, lost, bad = [], [], 0
        ident = os.getpid() & 0xFFFF
        if peer_mac:
            for seq in range(1, count + 1):
                payload = os.urandom(size)
                frame = ether(peer_mac, mp.mac, ETH_P_IP,
                              ipv4(ip, peer, 1, icmp_echo(ident, seq, payload), ident=seq))
                t = time.perf_counter()
                mp.send(frame)
                rep = st.wait_for(lambda p, s=seq: p["kind"] == "icmp" and p["type"] == ICMP_ECHO_REPLY
                                  and p["id"] == ident and p["seq"] == s, timeout)
                if rep is None:
                    lost.append(seq)
                else:
                    rtts.append((time.perf_counter() - t) * 1e3)
                    if rep["payload"] != payload or not rep["icmp_ok"] or not rep["ip_ok"] \
                            or rep["src_ip"] != peer:
                        bad += 1
                if interval:
                    time.sleep(interval)
        result["ping"] = {
            "sent": count if peer_mac else 0, "received": len(rtts), "lost": lost, "bad": bad,
            "rtt_ms": [round(r, 3) for r in rtts],
            "rtt_min_ms": round(min(rtts), 3) if rtts else None,
            "rtt_avg_ms": round(sum(rtts) / len(rtts), 3) if rtts else None,
            "rtt_max_ms": round(max(rtts), 3) if rtts else None,
        }
        mp.flush_tx(1.0)
        stats = mp.stats()
        err_info = mp.rd(hw.reg("DMA_ERR_INFO").offset)
        result["stats"] = stats
        result["dma_err_info"] = err_info
        result["miniport"] = {"tx_errors": mp.tx_errors, "rx_errors": mp.rx_errors,
                              "arp_answered": st.arp_answered, "other_frames": st.other_frames}
        result["irq"] = {"device_interrupts": stats["interrupts"],
                         "wakeups": {str(v): n for v, n in bus.irq_wakeups.items()},
                         "timeouts": {str(v): n for v, n in bus.irq_timeouts.items()},
                         "total_wakeups": sum(bus.irq_wakeups.values())}
        result["ok"] = bool(peer_mac) and len(rtts) == count and not bad and stats["dma_errors"] == 0
        mp.down()
    finally:
        g.close()
    result["total_s"] = round(time.monotonic() - t0, 3)
    return result


def _print_human(r: dict) -> None:
    print(f"NIC {r.get('pci')} (IOMMU group {r.get('iommu_group')}) mac {r.get('mac')} "
          f"link {'up' if r.get('link_up') else 'down'}; open {r.get('open_s')} s, up {r.get('up_s')} s")
    if r.get("peer_mac"):
        print(f"ARP: {r['peer_ip']} is at {r['peer_mac']} ({r['arp_rtt_ms']} ms)")
    else:
        print(f"ARP: no reply from {r['peer_ip']}")
    p = r.get("ping", {})
    print(f"ping: {p.get('sent')} sent, {p.get('received')} received, rtt min/avg/max "
          f"{p.get('rtt_min_ms')}/{p.get('rtt_avg_ms')}/{p.get('rtt_max_ms')} ms")
    irq = r.get("irq", {})
    print(f"interrupts: device sent {irq.get('device_interrupts')}, miniport woken "
          f"{irq.get('total_wakeups')} times, wait timeouts {irq.get('timeouts')}")
    print("stats: " + " ".join(f"{k}={v}" for k, v in r.get("stats", {}).items()))
    print("OK" if r.get("ok") else "FAILED")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m chimney.guest.selftest", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("arp-ping", help="ARP for the peer and ping it through the NIC")
    p.add_argument("--peer", required=True, help="the peer's IPv4 address")
    p.add_argument("--ip", required=True, help="our IPv4 address")
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--size", type=int, default=56, help="ICMP payload bytes")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between pings")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each reply")
    p.add_argument("--pci", help="PCI address (default: find the NIC by vendor:device)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    from .bus import DeviceGone
    from .bus.vfio import VfioBusError
    from .miniport import MiniportError
    try:
        r = arp_ping(args.peer, args.ip, args.count, args.pci, args.timeout, args.interval, args.size)
    except (VfioBusError, MiniportError, DeviceGone) as e:
        r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if args.json:
        print(json.dumps(r, indent=1))
    elif "error" in r:
        print(r["error"], file=sys.stderr)
    else:
        _print_human(r)
    return 0 if r.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
