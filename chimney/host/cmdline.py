"""What `chimney vm up` runs, as shell commands to run by hand
(`chimney vm up --print-cmdline`): the network namespace, the `chimney device`
command, the Linux peer's addresses on the NIC's wire and the full QEMU command
line (q35, shared memfd RAM, the virtual IOMMU the guest's VFIO needs, the
vfio-user NIC, the guest agent's port, virtio-net).  Built from the same
settings Vm.start() uses (Vm.device_options, Vm.qemu_config); nothing is
started or built here."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .device import device_options
from .netns import peer_commands
from .vm import NIC_ADDRS, NIC_TAP, VNET_ADDRS, VNET_TAP, Vm

CHECKOUT = Path(__file__).resolve().parent.parent.parent


def manual_netns(name: str) -> str:
    """The namespace name the printed commands use: not of the form the
    harness sweeps ("chimney-<pid>-..."), so a later run leaves it alone."""
    return f"chimney-vm-{name}"[:32]


def vm_up_script(vm: Vm, accel: str, runtime, image) -> str:
    """The commands, one a line with a comment before each step."""
    ns = manual_netns(vm.name) if vm.network else None
    lines = [f"# chimney vm up --name {vm.name}, by hand (nothing was started); as root, in order.",
             f"mkdir -p {shlex.quote(os.fspath(vm.qemu_config(accel).results_dir))}"]
    if ns:
        lines += ["# the network namespace that holds the NIC's TAP and the Linux peer",
                  shlex.join(["ip", "netns", "add", ns]),
                  shlex.join(["ip", "-n", ns, "link", "set", "lo", "up"])]
    # `chimney device`, from this checkout (the one the guest mounts), whatever `chimney` is on PATH
    device = [sys.executable, "-m", "chimney.device", "--socket", os.fspath(vm.nic_socket),
              *device_options(**vm.device_options(ns))]
    lines += [("# the NIC: `chimney device` from this checkout (it makes its TAP in the namespace "
               "and listens on the socket)"),
              (f"PYTHONPATH={shlex.quote(os.fspath(CHECKOUT))} {shlex.join(device)}"
               f" >{shlex.quote(os.fspath(vm.device_log))} 2>&1 &")]
    if ns:
        lines += [(f"# the Linux peer's side of the NIC's wire ({NIC_TAP}, once the device made it): "
                   f"the guest is {NIC_ADDRS.guest4}/{NIC_ADDRS.prefix4}, {NIC_ADDRS.guest6}/{NIC_ADDRS.prefix6}"),
                  *(shlex.join(c) for c in peer_commands(ns, NIC_TAP, NIC_ADDRS))]
    argv = vm.qemu_config(accel).argv(runtime, image)
    if vm.virtio_net:               # QEMU makes the virtio-net TAP in the namespace
        argv = ["ip", "netns", "exec", ns, *argv]
    env = [f"{k}={shlex.quote(v)}" for k, v in runtime.env().items()]
    lines += [f"# QEMU ({accel}; intel-iommu before the NIC: the guest reaches it through VFIO)",
              " ".join([*env, shlex.join(argv), f">{shlex.quote(os.fspath(vm.qemu_log))} 2>&1 &"])]
    if vm.virtio_net:
        lines += [(f"# the peer's side of the virtio-net NIC ({VNET_TAP}, once QEMU made it); in the guest "
                   f"its interface needs {VNET_ADDRS.guest4}/{VNET_ADDRS.prefix4}"),
                  *(shlex.join(c) for c in peer_commands(ns, VNET_TAP, VNET_ADDRS))]
    return "\n".join(lines) + "\n"


def print_vm_up(args) -> int:
    """`chimney vm up --print-cmdline`: the commands on stdout; the runtime
    and image must be built already (nothing is built or probed here)."""
    from chimney import images

    from .accel import resolve_accel
    from .vmcli import EXIT_USAGE, CliError, state_dir

    accel = args.accel or os.environ.get("CHIMNEY_ACCEL", "tcg")
    if accel == "auto":
        raise CliError("--print-cmdline: --accel auto decides by booting a probe VM; "
                       "choose --accel tcg or --accel kvm", EXIT_USAGE)
    try:
        accel = resolve_accel(accel)
    except ValueError as e:
        raise CliError(f"CHIMNEY_ACCEL: {e}", EXIT_USAGE) from None
    try:
        runtime, image = images.qemu_runtime(build=False, quiet=True), images.guest_image(build=False, quiet=True)
    except FileNotFoundError:
        raise CliError("the QEMU runtime or the guest image is not built yet "
                       "(scripts/setup or `python -m chimney.images build` builds them)") from None
    vm = Vm(args.name, workdir=state_dir(args.name), remove_workdir=False, memory_mb=args.memory, smp=args.smp,
            virtio_net=not args.no_virtio_net, network=not args.no_network, impair=args.impair,
            pci_id=args.pci_id, make_workdir=False)
    sys.stdout.write(vm_up_script(vm, accel, runtime, image))
    return 0
