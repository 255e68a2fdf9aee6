"""chimney device: run one emulated NIC as a vfio-user server."""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import stat
import subprocess
import sys

from .. import hw
from . import control
from .dma import DmaTable
from .impair import Impairment, ImpairSpecError
from .nic import Nic
from .pci import ConfigSpace
from .server import Server
from .wire import DEFAULT_SNAPLEN, PcapWriter, Tap


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
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="vfio-user socket path to listen on (refused while another device listens there)")
    p.add_argument("--control", metavar="PATH",
                   help="the NIC's control socket: link up|down, status (default SOCKET.ctl; "
                        "see chimney device-ctl)")
    p.add_argument("--tap", metavar="IFNAME", help="TAP interface for the wire (created if missing)")
    p.add_argument("--netns", metavar="NAME", help="network namespace to create the TAP in (needs --tap)")
    p.add_argument("--mac", type=parse_mac, default=parse_mac("02:c4:1e:00:00:01"),
                   help="the NIC's permanent MAC address (default 02:c4:1e:00:00:01)")
    p.add_argument("--pcap", metavar="FILE",
                   help="write every frame on the wire to this pcapng file (docs/pcap.md)")
    p.add_argument("--snaplen", type=int, default=None, metavar="N",
                   help=f"capture at most N bytes of each frame, keeping its length "
                        f"(1..{SNAPLEN_MAX}, default {DEFAULT_SNAPLEN}; needs --pcap)")
    p.add_argument("--pci-id", metavar="VVVV:DDDD", default=DEFAULT_PCI_ID,
                   help=f"the PCI vendor:device id the NIC presents (default {DEFAULT_PCI_ID}; "
                        f"guest tools then need CHIMNEY_PCI_ID=VVVV:DDDD)")
    p.add_argument("--mtu", type=int, default=1500, help=f"TAP MTU, {MTU_MIN}..{MTU_MAX} (default 1500)")
    p.add_argument("--impair", metavar="SPEC",
                   help="emulate a bad link in both directions, netem style: "
                        "delay=20ms,jitter=5ms,loss=2%%,reorder=25%%,seed=7,limit=1000")
    p.add_argument("--impair-tx", metavar="SPEC", help="the same, NIC -> wire only")
    p.add_argument("--impair-rx", metavar="SPEC", help="the same, wire -> NIC only")
    p.add_argument("--wire-offloads", choices=("on", "off"), default="on",
                   help="segmentation and checksum offload on the TAP (virtio-net header, "
                        "TSO/GSO); off: one frame per write and read (default on)")
    p.add_argument("--log-level", default="INFO", metavar="LEVEL",
                   help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL")


MTU_MIN, MTU_MAX = 68, 9000
DEFAULT_PCI_ID = f"{hw.PCI_VENDOR_ID:04x}:{hw.PCI_DEVICE_ID:04x}"
SNAPLEN_MAX = 262144            # the largest snap length tcpdump and tshark accept
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")     # IFNAMSIZ - 1, no '/' or spaces


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options (one line), before anything is created; None if fine."""
    if args.log_level.upper() not in LOG_LEVELS:
        return f"--log-level {args.log_level!r}: choose one of {', '.join(LOG_LEVELS)}"
    if not MTU_MIN <= args.mtu <= MTU_MAX:
        return f"--mtu {args.mtu}: the MTU must be {MTU_MIN}..{MTU_MAX}"
    if args.netns and not args.tap:
        return "--netns needs --tap"
    try:
        hw.parse_pci_id(args.pci_id)
    except ValueError as e:
        return f"--pci-id: {e}"
    if args.snaplen is not None and not args.pcap:
        return "--snaplen needs --pcap"
    if args.snaplen is not None and not 1 <= args.snaplen <= SNAPLEN_MAX:
        return f"--snaplen {args.snaplen}: the snap length must be 1..{SNAPLEN_MAX}"
    if args.tap and not IFNAME.fullmatch(args.tap):
        return f"--tap {args.tap!r}: an interface name is 1-15 letters, digits, '_', '.' or '-'"
    if args.netns and not os.path.exists(f"/run/netns/{args.netns}"):
        return f"--netns {args.netns}: no such network namespace (/run/netns/{args.netns})"
    for opt, path in (("--socket", args.socket), ("--pcap", args.pcap)):
        if path is None:
            continue
        d = os.path.dirname(os.path.abspath(path)) or "/"
        if not os.path.isdir(d):
            return f"{opt} {path}: {d} is not a directory"
        if not os.access(d, os.W_OK | os.X_OK):
            return f"{opt} {path}: {d} is not writable"
    return check_socket_free(args.socket)


def check_socket_free(path: str) -> str | None:
    """The socket path may be (re)bound: nothing there, or a stale socket nobody listens on."""
    from . import socket_owner
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"--socket {path}: {e.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"--socket {path}: exists and is not a socket (not removing it)"
    if socket_owner.listening(path):
        pids = socket_owner.holders(path)
        who = ", ".join(socket_owner.describe(p) for p in pids) if pids else "a process in another namespace"
        return f"--socket {path}: another device is listening there ({who})"
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"chimney device: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("chimney.device")
    try:
        imp_tx = Impairment(args.impair_tx or args.impair) if (args.impair_tx or args.impair) else None
        imp_rx = Impairment(args.impair_rx or args.impair) if (args.impair_rx or args.impair) else None
    except ImpairSpecError as e:
        print(f"chimney device: --impair: {e}", file=sys.stderr)
        return 2
    try:
        tap = Tap(args.tap, args.netns, args.mtu, offloads=args.wire_offloads == "on") if args.tap else None
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        print(f"chimney device: cannot make TAP {args.tap}: {why}", file=sys.stderr)
        return 1
    try:
        pcap = PcapWriter(args.pcap, args.snaplen or DEFAULT_SNAPLEN) if args.pcap else None
    except OSError as e:
        if tap:
            tap.close()
        print(f"chimney device: cannot write {args.pcap}: {e.strerror or e}", file=sys.stderr)
        return 1
    dma = DmaTable()
    nic = Nic(dma, args.mac, tap.fd if tap else -1, pcap.fd if pcap else -1, link_up=tap is not None,
              impair_tx=imp_tx, impair_rx=imp_rx)
    server = Server(args.socket, nic, dma, ConfigSpace(hw.parse_pci_id(args.pci_id)))
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
