"""The command-line options the tools share, their checks, and how a tool's
command runs on its stack (one clear line and exit status 2 for bad input,
before anything touches the NIC)."""
from __future__ import annotations

import argparse
import os
import sys

from ... import hw
from ..im.chain import spec_arg
from . import values
from .stacks import DEFAULT_IP4, DEFAULT_IP6, ToolError, describe_error, make_stack

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# the end of every tool's --help
NOTES = """
Sizes (-n, -l, -w, --upload-after, --size) take K, M, G suffixes, powers of 2
as iperf3's: 1K = 1024, 1M = 1048576, 1G = 1073741824 bytes.
Exit status: 0 the run succeeded (verified), 1 it failed or was not
verified, 2 bad usage (a bad option, no device at --socket, the stack could
not come up)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2);
    its subcommands' parsers are of the same kind."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (try {self.prog} --help)\n")


def _parse_rss_queues(text: str) -> int:
    n = values.parse_count(text)
    if n > hw.NUM_OFFLOAD_QUEUES:
        raise ValueError(f"{text!r}: the NIC has {hw.NUM_OFFLOAD_QUEUES} offload queue sets")
    return n


rss_queues = values.argparse_type(_parse_rss_queues)


def add_stack_arguments(sp: argparse.ArgumentParser) -> None:
    """The stack-selection options make_stack(args) reads."""
    sp.add_argument("--stack", choices=["chimney", "linux"], default="chimney",
                    help="chimney: our host stack on the NIC (default); linux: kernel sockets")
    sp.add_argument("--bus", choices=["vfio", "host"],
                    help="chimney stack: vfio (in the VM; the default where /dev/vfio exists) "
                         "or host (the host bus: a device's socket, --socket)")
    sp.add_argument("--socket", metavar="PATH", help="chimney stack: the device's vfio-user socket (--bus host)")
    sp.add_argument("--pci", metavar="ADDR", help="chimney stack: the NIC's PCI address for VFIO "
                                                  "(default: find it by vendor:device)")
    sp.add_argument("--ip", default=DEFAULT_IP4, metavar="A/P",
                    help=f"chimney stack: our IPv4 address/prefix (default {DEFAULT_IP4})")
    sp.add_argument("--ip6", action="append", metavar="A/P",
                    help=f"chimney stack: our IPv6 address/prefix, repeatable (default {DEFAULT_IP6})")
    sp.add_argument("--offload", choices=["on", "off", "auto"], default="off",
                    help="chimney stack: TCP chimney offload of the connections (default off: "
                         "software TCP; on: right after the handshake; auto: after 1 MB)")
    sp.add_argument("--im", type=spec_arg, metavar="SPEC",
                    help="chimney stack with --offload on|auto: offload through intermediate drivers, "
                         "listed from the host stack down, e.g. trace:/tmp/t.jsonl (a JSON-lines trace "
                         "of every call and indication) or trace,trace (two stacked, traced in memory)")
    sp.add_argument("--rss-queues", type=rss_queues, metavar="N",
                    help="chimney stack with --offload on|auto: offload queue sets for receive side "
                         f"scaling, 1..{hw.NUM_OFFLOAD_QUEUES}, each on its own interrupt vector "
                         "(default: one per CPU)")
    sp.add_argument("--upload-after", type=values.size, metavar="BYTES",
                    help="chimney stack: upload each data stream to software TCP after BYTES moved "
                         f"({values.SIZE_HELP})")


def add_tool_commands(p: argparse.ArgumentParser, *, dest: str, port: int, server_help: str,
                      client_help: str, once_flags=("--once",), json_flags=("--json",),
                      json_help="print one JSON object per run", interval=True):
    """The `server` and `client HOST` subcommands with the options every tool has;
    -> (server parser, client parser) for the tool's own options."""
    sub = p.add_subparsers(dest=dest, required=True, metavar="{server,client}")
    srv = sub.add_parser("server", help=server_help, description=server_help)
    cli = sub.add_parser("client", help=client_help, description=client_help)
    cli.add_argument("host", help="the server's address (IPv4 or IPv6)")
    for sp in (srv, cli):
        sp.add_argument("-p", "--port", type=values.port, default=port,
                        help=f"TCP port (default {port})")
        sp.add_argument(*json_flags, dest="json", action="store_true", help=json_help)
        if interval:
            sp.add_argument("-i", "--interval", type=values.interval, default=1.0, metavar="SECONDS",
                            help="seconds between interval reports (default 1; 0: none)")
        add_stack_arguments(sp)
        sp.add_argument("--timeout", type=values.seconds, metavar="SECONDS",
                        help="hard timeout in seconds for one run (default: from -t/-n)")
    srv.add_argument(*once_flags, dest="once", action="store_true", help="serve one client, then exit")
    srv.add_argument("--accept-timeout", type=values.seconds, metavar="SECONDS",
                     help="give up (exit 1) when no client comes in this many seconds")
    cli.add_argument("--connect-timeout", type=values.seconds, default=10.0, metavar="SECONDS",
                     help="keep retrying the first connection this long (default 10)")
    return srv, cli


def check_stack_args(args) -> None:
    """What can be checked before the NIC is touched; ValueError with one line."""
    if getattr(args, "rss_queues", None):
        if args.stack == "linux":
            raise ValueError("--rss-queues needs --stack chimney")
        if getattr(args, "offload", "off") == "off":
            raise ValueError("--rss-queues needs --offload on|auto")
    if args.stack == "linux":
        return
    from ..bringup import BringupError, check_device_socket, parse_addr
    host = getattr(args, "host", None)
    if host is not None and not getattr(args, "ipv6", False):     # perf --ipv6 resolves names itself
        import ipaddress
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r}: the chimney stack has no name resolution; give the server's "
                             "IPv4 or IPv6 address") from None
    try:
        if args.ip:
            parse_addr(args.ip, 24, 4)
        for a in args.ip6 or ():
            parse_addr(a, 64, 6)
        bus = args.bus or ("host" if args.socket else None)
        if bus == "host" or (bus is None and not os.path.exists("/dev/vfio")):
            if not args.socket:
                raise BringupError("the host bus needs --socket PATH (a device's vfio-user socket)")
            check_device_socket(args.socket)
    except BringupError as e:
        raise ValueError(str(e)) from None


def run_on_stack(args, tool: str, body) -> int:
    """Check the options (exit 2 on bad ones), bring the chosen stack up (exit 2 with one
    line if it cannot), run body(stack) for the exit status, close the stack whatever
    happens."""
    try:
        check_stack_args(args)
    except ValueError as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        stack = make_stack(args)
    except Exception as e:  # noqa: BLE001 -- no NIC, no bus, device busy: say so in one line
        print(f"{tool}: cannot bring the {args.stack} stack up: {describe_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return body(stack)
    except ToolError as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    finally:
        stack.close()


def tool_main(prog: str, doc: str, add_arguments, run, argv=None) -> int:
    """`python3 -m PROG`: parse argv with the tool's options, run it, its exit status."""
    p = Parser(prog=prog, description=doc + NOTES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
