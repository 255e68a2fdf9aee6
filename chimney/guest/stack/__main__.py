"""The host stack on the NIC, from the command line (in the guest: the real VFIO bus).

    python3 -m chimney.guest.stack ping --ip 10.199.0.2/24 --ip6 fd00:c41e::2/64 \\
        --peer 10.199.0.1 --peer fd00:c41e::1 [--count N] [--serve S] [--socket PATH]

Brings the miniport up (VfioBus, or the host bus with --socket), puts an
Interface on it, announces itself, pings every --peer `count` times, then
keeps answering (ARP, ND, echo) for --serve seconds.  Prints one JSON object;
exit status 0 when every ping was answered.
"""
from __future__ import annotations

import argparse
import json

from .driver import attach, ping_on_miniport, run_on_miniport


def _addr(text: str, default_prefix: int):
    a, _, p = text.partition("/")
    return a, int(p) if p else default_prefix


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m chimney.guest.stack")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ping", help="bring the interface up and ping peers through the NIC")
    p.add_argument("--ip", required=True, help="our IPv4 address/prefix")
    p.add_argument("--ip6", action="append", default=[], help="a global IPv6 address/prefix")
    p.add_argument("--peer", action="append", default=[], help="an address to ping (IPv4 or IPv6)")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--serve", type=float, default=0.0, help="seconds to keep answering afterwards")
    p.add_argument("--socket", help="a device's vfio-user socket (host bus) instead of VFIO")
    p.add_argument("--pci", help="PCI address for VFIO (default: find the NIC)")
    args = ap.parse_args(argv)

    from ..bringup import bring_up
    out: dict = {"ok": False}
    try:
        g = bring_up(bus="host" if args.socket else "vfio", socket=args.socket, pci=args.pci, stack=False)
    except Exception as e:  # noqa: BLE001 -- reported in the JSON, the exit status says it failed
        out["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out, indent=1))
        return 1
    mp = g.mp
    try:
        iface = attach(mp, ipv4=_addr(args.ip, 24), ipv6=[_addr(a, 64) for a in args.ip6])
        iface.up()
        out.update(mac=mp.mac.hex(":"), link_local=str(iface.ll6), pings={})
        for peer in args.peer:
            replies = ping_on_miniport(iface, mp, peer, count=args.count, payload=b"chimney-stack",
                                       timeout=args.timeout)
            out["pings"][peer] = [None if r is None else round(r.rtt, 6) for r in replies]
        if args.serve:
            run_on_miniport(iface, mp, timeout=args.serve)
        out["neighbours"] = {str(a): [e.state, e.mac and e.mac.hex(":")]
                             for c in (iface.arp_cache, iface.nd_cache) for a, e in c.entries.items()}
        out["stats"] = dict(sorted(iface.stats.items()))
        out["ok"] = all(r is not None for rs in out["pings"].values() for r in rs)
    except Exception as e:  # noqa: BLE001 -- reported in the JSON, the exit status says it failed
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        g.close()
    print(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
