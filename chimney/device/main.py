"""`chimney device`: run one emulated NIC as a vfio-user server."""
from __future__ import annotations

import argparse
import logging
import os
import signal

from . import control
from .dma import DmaTable
from .impair import Impairment, ImpairSpecError
from .nic import Nic
from .server import Server
from .wire import PcapWriter, Tap


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise argparse.ArgumentTypeError(f"not a MAC address: {text!r}")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a MAC address: {text!r}") from None
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address")
    return mac


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, help="vfio-user socket path to listen on")
    p.add_argument("--control", metavar="PATH",
                   help="the NIC's control socket: link up|down, status (default SOCKET.ctl; "
                        "see `chimney device-ctl`)")
    p.add_argument("--tap", help="TAP interface for the wire (created if missing)")
    p.add_argument("--netns", help="network namespace to create the TAP in")
    p.add_argument("--mac", type=parse_mac, default=parse_mac("02:c4:1e:00:00:01"),
                   help="the NIC's permanent MAC address (default 02:c4:1e:00:00:01)")
    p.add_argument("--pcap", help="write every frame on the wire to this pcap file")
    p.add_argument("--mtu", type=int, default=1500, help="TAP MTU (default 1500)")
    p.add_argument("--impair", metavar="SPEC",
                   help="emulate a bad link in both directions, netem style: "
                        "delay=20ms,jitter=5ms,loss=2%%,reorder=25%%,seed=7,limit=1000")
    p.add_argument("--impair-tx", metavar="SPEC", help="the same, NIC -> wire only")
    p.add_argument("--impair-rx", metavar="SPEC", help="the same, wire -> NIC only")
    p.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("chimney.device")
    if args.netns and not args.tap:
        raise SystemExit("--netns needs --tap")
    tap = Tap(args.tap, args.netns, args.mtu) if args.tap else None
    pcap = PcapWriter(args.pcap) if args.pcap else None
    try:
        imp_tx = Impairment(args.impair_tx or args.impair) if (args.impair_tx or args.impair) else None
        imp_rx = Impairment(args.impair_rx or args.impair) if (args.impair_rx or args.impair) else None
    except ImpairSpecError as e:
        raise SystemExit(f"chimney device: --impair: {e}") from None
    dma = DmaTable()
    nic = Nic(dma, args.mac, tap.fd if tap else -1, pcap.fd if pcap else -1, link_up=tap is not None,
              impair_tx=imp_tx, impair_rx=imp_rx)
    server = Server(args.socket, nic, dma)
    ctl_path = args.control or control.default_path(args.socket)
    try:
        ctl = control.ControlServer(ctl_path, nic)
    except OSError as e:
        if args.control:
            server.close()
            raise SystemExit(f"chimney device: --control {ctl_path}: {e}") from None
        # the default path may not fit where the vfio-user socket just did: run without
        log.warning("no control socket at %s: %s (give --control PATH)", ctl_path, e)
        ctl = None
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    log.info("chimney NIC %s, pid %d, wire %s", args.mac.hex(":"), os.getpid(),
             f"tap {args.tap}" + (f" in netns {args.netns}" if args.netns else "") if tap else "none")
    if imp_tx or imp_rx:
        log.info("impaired link: tx %s, rx %s", imp_tx or "clean", imp_rx or "clean")
    prof_path = os.environ.get("CHIMNEY_DEVICE_PROFILE")     # cProfile the device loop
    try:
        if prof_path:
            import cProfile
            cProfile.runctx("server.serve_forever()", globals(), {"server": server}, prof_path)
        else:
            server.serve_forever()
    finally:
        if ctl is not None:
            ctl.close()
        nic.close()
        if tap:
            tap.close()
        if pcap:
            pcap.close()
    for name, imp in (("tx", imp_tx), ("rx", imp_rx)):
        if imp is not None:
            log.info("impairment %s (%s): %s", name, imp, imp.counters())
    log.info("stopped")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="chimney device", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
