"""The chimney command: the emulated TCP-offload NIC, VMs with it, and traffic tools.

Sizes take K, M, G suffixes, powers of 2 as iperf3's (1M = 1048576 bytes).
Exit status: 0 success, 1 a run failed or was not verified, 2 bad usage
(a bad option or value, a missing path, a device socket nobody listens on)."""
from __future__ import annotations

import argparse
import subprocess
import sys

from . import __version__
from .guest.tools import values
from .guest.tools.options import EXIT_USAGE, NOTES, Parser


def add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("which", choices=["suite", "plain", "vm", "stack"],
                       help="suite: every measure of the performance table, side by side, with the goals "
                            "(--only a,b,c,d,e,f); "
                            "plain: host bus -> device -> TAP vs Linux raw socket; "
                            "vm: boot time and ping RTT in the VM, chimney vs virtio-net; "
                            "stack: TCP throughput in the VM, the host stack's software TCP vs guest Linux "
                            "over virtio-net")
    bench.add_argument("--count", type=values.count, default=50, metavar="N", help="vm: pings (default 50)")
    bench.add_argument("--frames", type=values.count, default=200_000, metavar="N",
                       help="plain: frames per measurement, a bound (default 200000)")
    bench.add_argument("--seconds", type=values.seconds, metavar="SECONDS",
                       help="plain: time per measurement, a bound (default 5); suite: whole seconds per "
                            "iperf3 run in the VM, each path and direction (default 10; at least 8 keeps "
                            "slow start from dominating)")
    bench.add_argument("--rr-seconds", type=values.seconds, default=5.0, metavar="SECONDS",
                       help="suite: time per request/response run, a bound (default 5)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--bytes", type=values.size, metavar="BYTES",
                       help="stack: bytes per direction on the software path (default 20M; guest Linux moves "
                            "max(this, 100M)); suite: bytes per run, offloaded and Linux, host bus "
                            f"(default 50M). {values.SIZE_HELP}")
    bench.add_argument("--only", default="abcdef",
                       help="suite: the measures to take, e.g. a,b or c,d,e (a: VM offload/software/virtio-net; "
                            "b: host bus offload vs Linux veth; c: host bus offload vs software; "
                            "d: request/response; e: bulk offload of --conns; f: device memory per connection)")
    bench.add_argument("--software-bytes", type=values.size, metavar="BYTES",
                       help="suite: bytes per run on the host bus software path (default --bytes / 10)")
    bench.add_argument("--vm-bytes", type=values.size, metavar="BYTES",
                       help="suite: bytes per run in the VM, offloaded and virtio-net (default 50M)")
    bench.add_argument("--vm-software-bytes", type=values.size, metavar="BYTES",
                       help="suite: bytes per run in the VM, software path (default --vm-bytes / 20)")
    bench.add_argument("--conns", type=values.count, default=1000, metavar="N",
                       help="suite: connections for bulk offload and memory (default 1000)")
    bench.add_argument("--rr-size", type=values.size, default=64, metavar="BYTES",
                       help="suite: request and response size (default 64)")
    bench.add_argument("--rr-count", type=values.count, default=5000, metavar="N",
                       help="suite: at most this many transactions per run (default 5000)")
    bench.add_argument("--timeout", type=values.seconds, default=300.0, metavar="SECONDS",
                       help="suite: hard timeout per transfer (default 300)")
    bench.add_argument("--save", metavar="FILE", type=values.output_file,
                       help="suite: also write the JSON object to FILE")
    bench.add_argument("--profile", metavar="DIR", type=values.output_dir,
                       help="suite: cProfile the device loop and the host-bus guest processes into DIR")
    bench.add_argument("--wire-offloads", choices=("on", "off"), default="on",
                       help="suite: the host-bus device's TAP segmentation offload (default on)")


def run_bench(args) -> int:
    if args.which == "suite":
        from .bench import suite
        if args.seconds is not None and args.seconds != int(args.seconds):
            print(f"chimney bench suite: --seconds {args.seconds:g}: iperf3 runs take whole seconds",
                  file=sys.stderr)
            return EXIT_USAGE
        try:
            res = suite.run(args.only, nbytes=args.bytes or 50_000_000, soft_bytes=args.software_bytes,
                            vm_bytes=args.vm_bytes or 50_000_000, vm_soft_bytes=args.vm_software_bytes,
                            conns=args.conns, rr_size=args.rr_size, rr_count=args.rr_count,
                            rr_seconds=args.rr_seconds, iperf3_seconds=int(args.seconds or 10),
                            timeout=args.timeout, profile_dir=args.profile, as_json=args.json, save=args.save,
                            wire_offloads=args.wire_offloads)
        except ValueError as e:
            print(f"chimney bench suite: {e}", file=sys.stderr)
            return EXIT_USAGE
        return 0 if suite.all_verified(res) else 1
    if args.which == "stack":
        from .bench import stack as stack_bench
        res = stack_bench.run(nbytes=args.bytes or 20_000_000, as_json=args.json)
        return 0 if all(r["verified"] for r in res["runs"]) else 1
    if args.which == "vm":
        from .bench import vm as vm_bench
        vm_bench.run(count=args.count, as_json=args.json)
    else:
        from .bench import plain
        plain.run(count=args.frames, seconds=args.seconds or 5.0, as_json=args.json)
    return 0


def run_demo(args) -> int:
    from . import demo as demo_mod
    res = demo_mod.run(as_json=args.json, nbytes=args.bytes, outdir=args.out, seconds=args.seconds)
    return 0 if demo_mod.all_ok(res) else 1


def _one_line(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        last = err.strip().splitlines()[-1:] or [f"exit status {e.returncode}"]
        cmd = " ".join(map(str, e.cmd)) if isinstance(e.cmd, (list, tuple)) else str(e.cmd)
        return f"{cmd}: {last[0]}"
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return f"{type(e).__name__}: {e}"


def build_parser() -> Parser:
    p = Parser(prog="chimney", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"chimney {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True)

    from .device import main as device_main
    dev = sub.add_parser("device", help="run one emulated NIC (a vfio-user server)",
                         description=device_main.__doc__)
    device_main.add_arguments(dev)

    from .device import control as device_control
    dctl = sub.add_parser("device-ctl", help="a running NIC's control socket: link up|down, status",
                          description=device_control.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    device_control.add_arguments(dctl)

    ds = sub.add_parser("datasheet", help="print the hardware interface datasheet (Markdown)")
    ds.add_argument("-o", "--output", metavar="FILE", type=values.output_file,
                    help="write to this file instead of stdout")

    bench = sub.add_parser("bench", help="benchmarks: figures and ratios, side by side")
    add_bench_arguments(bench)

    demo = sub.add_parser("demo", help="the main job: NIC + VM + Linux peer, traffic, results")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    demo.add_argument("-n", "--bytes", type=values.size, default=50_000_000, metavar="BYTES",
                      help=f"bytes per run, each path and direction (default 50000000; {values.SIZE_HELP})")
    demo.add_argument("--out", default="chimney-demo", metavar="DIR", type=values.output_dir,
                      help="directory for the PNG plots (default chimney-demo)")
    demo.add_argument("--seconds", type=values.count, default=10, metavar="SECONDS",
                      help="seconds per iperf3 run, each path and direction: chimney iperf3 offloaded "
                           "beside real iperf3 over virtio-net (default 10)")

    from .host import vmcli
    vm = sub.add_parser("vm", help="named VMs with the NIC: up, run a command, status, down",
                        description=vmcli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vmcli.add_arguments(vm)

    from .guest.tools import (  # standard library only; the stacks load on use
        iperf3,
        perf,
        rr,
    )
    for name, mod, what in (
            ("perf", perf, "iperf-style throughput test on the host stack (or Linux sockets)"),
            ("iperf3", iperf3, "iperf3-compatible client and server on the host stack (or Linux sockets)"),
            ("rr", rr, "request/response transactions per second on the host stack (or Linux sockets)")):
        tp = sub.add_parser(name, help=what, description=mod.__doc__ + NOTES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(tp)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["iperf3"]:
        from .guest.tools.iperf3 import iperf3_argv
        argv = ["iperf3", *iperf3_argv(argv[1:])]
    args = build_parser().parse_args(argv)
    if args.cmd in ("perf", "iperf3", "rr"):
        from .guest.tools import iperf3, perf, rr
        return {"perf": perf, "iperf3": iperf3, "rr": rr}[args.cmd].run(args)
    if args.cmd == "vm":
        from .host import vmcli
        return vmcli.run(args)
    if args.cmd in ("demo", "bench"):
        try:
            return run_demo(args) if args.cmd == "demo" else run_bench(args)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
            # no root, no namespace, a VM that did not boot: one line, the logs have the rest
            what = f"chimney {args.cmd}" + (f" {args.which}" if args.cmd == "bench" else "")
            print(f"{what}: {_one_line(e)}", file=sys.stderr)
            return 1
    if args.cmd == "device":
        from .device import main as device_main
        return device_main.run(args)
    if args.cmd == "device-ctl":
        from .device import control as device_control
        return device_control.run(args)
    if args.cmd == "datasheet":
        from .datasheet import render
        text = render()
        if args.output:
            try:
                with open(args.output, "w") as f:
                    f.write(text)
            except OSError as e:
                print(f"chimney datasheet: cannot write {args.output}: {e.strerror}", file=sys.stderr)
                return 1
        else:
            sys.stdout.write(text)
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
