"""The `chimney` command."""
from __future__ import annotations

import argparse
import sys


def _size_arg(text: str) -> int:
    from .guest.perf import _size_arg as size
    return size(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="chimney", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    from .device import main as device_main
    dev = sub.add_parser("device", help="run one emulated NIC (a vfio-user server)")
    device_main.add_arguments(dev)

    from .device import control as device_control
    dctl = sub.add_parser("device-ctl", help="a running NIC's control socket: link up|down, status",
                          description=device_control.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    device_control.add_arguments(dctl)

    ds = sub.add_parser("datasheet", help="print the hardware interface datasheet (Markdown)")
    ds.add_argument("-o", "--output", help="write to this file instead of stdout")

    bench = sub.add_parser("bench", help="benchmarks: figures and ratios, side by side")
    bench.add_argument("which", choices=["suite", "plain", "vm", "stack"],
                       help="suite: every measure of the performance table, side by side, with the goals "
                            "(--only a,b,c,d,e,f); "
                            "plain: host bus -> device -> TAP vs Linux raw socket; "
                            "vm: boot time and ping RTT in the VM, chimney vs virtio-net; "
                            "stack: TCP throughput in the VM, the host stack's software TCP vs guest Linux "
                            "over virtio-net")
    bench.add_argument("--count", type=int, default=50, help="pings (vm)")
    bench.add_argument("--frames", type=int, default=200_000, help="frames per measurement (bound)")
    bench.add_argument("--seconds", type=float, default=5.0, help="time per measurement (bound)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--bytes", type=_size_arg,
                       help="stack: bytes per direction on the software path (default 20 MB; guest Linux moves "
                            "max(this, 100 MB)); suite: bytes per run, offloaded and Linux, host bus "
                            "(default 50 MB)")
    bench.add_argument("--only", default="abcdef",
                       help="suite: the measures to take, e.g. a,b or c,d,e (a: VM offload/software/virtio-net; "
                            "b: host bus offload vs Linux veth; c: host bus offload vs software; "
                            "d: request/response; e: bulk offload of --conns; f: device memory per connection)")
    bench.add_argument("--software-bytes", type=_size_arg,
                       help="suite: bytes per run on the host bus software path (default --bytes / 10)")
    bench.add_argument("--vm-bytes", type=_size_arg,
                       help="suite: bytes per run in the VM, offloaded and virtio-net (default 50 MB)")
    bench.add_argument("--vm-software-bytes", type=_size_arg,
                       help="suite: bytes per run in the VM, software path (default --vm-bytes / 20)")
    bench.add_argument("--conns", type=int, default=1000, help="suite: connections for bulk offload and memory")
    bench.add_argument("--rr-size", type=int, default=64, help="suite: request and response size in bytes")
    bench.add_argument("--rr-count", type=int, default=5000, help="suite: at most this many transactions per run")
    bench.add_argument("--timeout", type=float, default=300.0, help="suite: hard timeout per transfer (s)")
    bench.add_argument("--save", metavar="FILE", help="suite: also write the JSON object to FILE")
    bench.add_argument("--profile", metavar="DIR",
                       help="suite: cProfile the device loop and the host-bus guest processes into DIR")

    demo = sub.add_parser("demo", help="the main job: NIC + VM + Linux peer, traffic, results")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    demo.add_argument("-n", "--bytes", type=int, default=50_000_000,
                      help="bytes per run (each path, each direction; default 50 MB)")
    demo.add_argument("--out", default="chimney-demo", help="directory for the PNG plots")

    from .host import vmcli
    vm = sub.add_parser("vm", help="named VMs with the NIC: up, run a command, status, down",
                        description=vmcli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vmcli.add_arguments(vm)

    from .guest import perf  # standard library only; the stacks load on use
    pf = sub.add_parser("perf", help="iperf-style throughput test on the host stack (or Linux sockets)",
                        description=perf.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    perf.add_arguments(pf)

    from .guest import iperf3
    ip3 = sub.add_parser("iperf3", help="iperf3-compatible client and server on the host stack (or Linux sockets)",
                         description=iperf3.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    iperf3.add_arguments(ip3)

    args = p.parse_args(argv)
    if args.cmd == "perf":
        return perf.run(args)
    if args.cmd == "iperf3":
        return iperf3.run(args)
    if args.cmd == "vm":
        return vmcli.run(args)
    if args.cmd == "demo":
        from . import demo as demo_mod
        res = demo_mod.run(as_json=args.json, nbytes=args.bytes, outdir=args.out)
        return 0 if all(p["verified"] for p in res["paths"].values()) else 1
    if args.cmd == "bench":
        if args.which == "suite":
            from .bench import suite
            try:
                res = suite.run(args.only, nbytes=args.bytes or 50_000_000, soft_bytes=args.software_bytes,
                                vm_bytes=args.vm_bytes or 50_000_000, vm_soft_bytes=args.vm_software_bytes,
                                conns=args.conns, rr_size=args.rr_size, rr_count=args.rr_count,
                                rr_seconds=args.seconds, timeout=args.timeout, profile_dir=args.profile,
                                as_json=args.json, save=args.save)
            except ValueError as e:
                print(f"chimney bench suite: {e}", file=sys.stderr)
                return 2
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
            plain.run(count=args.frames, seconds=args.seconds, as_json=args.json)
        return 0
    if args.cmd == "device":
        return device_main.run(args)
    if args.cmd == "device-ctl":
        return device_control.run(args)
    if args.cmd == "datasheet":
        from .datasheet import render
        text = render()
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
