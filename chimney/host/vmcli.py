"""`chimney vm up|run|status|down`: named VMs with the NIC, from the shell.

``vm up`` starts a supervisor process in the background that owns one
:class:`~chimney.host.vm.Vm` (network namespace + Linux peer, device, QEMU)
and returns once the guest answers; the VM's files live in its state
directory, ``$CHIMNEY_VM_DIR/<name>`` (default ``/run/chimney/vms/<name>`` as
root, else ``~/.cache/chimney/vms/<name>``): ``state.json``, serial, device
and QEMU logs, the wire's pcap, the agent and QMP sockets.  ``vm run`` talks
to the guest agent directly, ``vm status`` to QMP and the agent, ``vm down``
stops the supervisor, which powers the guest off and cleans up.  If the
supervisor is killed, its watchdog kills QEMU and the device and deletes the
namespace.

Exit status of ``vm run``: the guest command's; 124 when it timed out (its
output so far is written), 125 when the VM or the agent is not there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

STATE = "state.json"
EXIT = "exit.json"
SUPERVISOR_LOG = "supervisor.log"
DEFAULT_NAME = "default"
EXIT_TIMEOUT, EXIT_INFRA = 124, 125


def vms_root() -> Path:
    env = os.environ.get("CHIMNEY_VM_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/chimney/vms")
    return Path.home() / ".cache/chimney/vms"


def state_dir(name: str) -> Path:
    from .vm import _NAME_RE
    if not _NAME_RE.match(name):
        raise SystemExit(f"chimney vm: bad VM name {name!r} (letters, digits, . _ -; at most 32)")
    return vms_root() / name


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"chimney.host.vmcli" in f.read()
    except OSError:
        return False


def read_state(name: str) -> dict | None:
    try:
        return json.loads((state_dir(name) / STATE).read_text())
    except (OSError, ValueError):
        return None


def _running_state(name: str) -> dict:
    st = read_state(name)
    if st is None or not _pid_alive(st.get("supervisor_pid")):
        print(f"chimney vm: no VM {name!r} is up (chimney vm up --name {name})", file=sys.stderr)
        raise SystemExit(EXIT_INFRA)
    return st


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ up

def cmd_up(args) -> int:
    import subprocess

    d = state_dir(args.name)
    st = read_state(args.name)
    if st is not None and _pid_alive(st.get("supervisor_pid")):
        print(f"chimney vm: VM {args.name!r} is already up ({d})", file=sys.stderr)
        return 1
    if d.exists():
        shutil.rmtree(d)  # left by a VM that is gone
    d.mkdir(parents=True)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "chimney.host.vmcli", "_serve", "--name", args.name, "--ready-fd", str(w),
           "--memory", str(args.memory), "--smp", str(args.smp), "--boot-timeout", str(args.boot_timeout)]
    if args.accel:
        cmd += ["--accel", args.accel]
    if args.no_virtio_net:
        cmd += ["--no-virtio-net"]
    if args.no_network:
        cmd += ["--no-network"]
    if args.impair:
        cmd += ["--impair", args.impair]
    with open(d / SUPERVISOR_LOG, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                pass_fds=(w,), start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        line = ready.read().decode(errors="replace").strip()  # EOF when the supervisor is ready or gone
    if not line.startswith("{"):
        proc.wait(10) if proc.poll() is None else None
        tail = (d / SUPERVISOR_LOG).read_text(errors="replace")[-4000:]
        print(f"chimney vm: VM {args.name!r} did not come up: {line or 'supervisor exited'}\n{tail}",
              file=sys.stderr)
        return 1
    info = json.loads(line)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        boot = info["boots"][-1] if info.get("boots") else {}
        print(f"VM {args.name} up: agent answered {boot.get('agent_ready_s', '?')} s after QEMU started "
              f"({boot.get('accel', '?')})")
        print(f"  state:  {d}")
        if info.get("netns"):
            peer = info["peer"]
            print(f"  peer:   netns {info['netns']} (ip netns exec {info['netns']} ...)")
            print(f"          NIC wire {peer['nic_if']}: peer {peer['nic']['peer4']}, {peer['nic']['peer6']}; "
                  f"guest {peer['nic']['guest4']}, {peer['nic']['guest6']}")
            if peer.get("vnet"):
                print(f"          virtio-net {peer['vnet_if']}: peer {peer['vnet']['peer4']}, {peer['vnet']['peer6']}; "
                      f"guest {peer['vnet']['guest4']}, {peer['vnet']['guest6']} ({info['guest_vnet_if']})")
        print(f"  logs:   {info['serial_log']}, {info['device_log']}, pcap {info['pcap']}")
    return 0


def serve(args) -> int:
    """The supervisor: owns the Vm until SIGTERM or until QEMU exits."""
    from .vm import Vm

    d = state_dir(args.name)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ready = os.fdopen(args.ready_fd, "w")
    vm = Vm(args.name, workdir=d, remove_workdir=False, memory_mb=args.memory, smp=args.smp,
            accel=args.accel, boot_timeout=args.boot_timeout, virtio_net=not args.no_virtio_net,
            network=not args.no_network, impair=args.impair)
    try:
        vm.start()
    except BaseException as e:
        print(f"boot failed: {e}", flush=True)
        ready.write(f"error: {str(e).splitlines()[0]}\n")
        ready.close()
        return 1
    vm._drop_agent()  # `vm run` connects itself; QEMU serves one client at a time
    info = {**vm.describe(), "supervisor_pid": os.getpid(), "started": time.time()}
    _write_json(d / STATE, info)
    print(f"up: {json.dumps(info)}", flush=True)
    ready.write(json.dumps(info) + "\n")
    ready.close()
    reason = None
    while reason is None:
        if stop:
            reason = stop[0]
        elif not vm.alive_qemu():
            reason = f"QEMU exited with status {vm.qemu.returncode}"
        else:
            time.sleep(0.2)
    print(f"stopping: {reason}", flush=True)
    how = vm.close(graceful=True)
    _write_json(d / EXIT, {"reason": reason, "qemu": how, "qemu_status": vm.qemu.returncode})
    print(f"stopped: QEMU {how}", flush=True)
    return 0


# ------------------------------------------------------------------ run

def cmd_run(args) -> int:
    import base64

    from .agent import run_via_agent

    if not args.command:
        print("chimney vm run: no command (chimney vm run -- CMD...)", file=sys.stderr)
        return 2
    st = _running_state(args.name)
    cmd = " ".join(args.command) if args.sh else args.command
    stdin = sys.stdin.buffer.read() if args.stdin else None
    try:
        reply = run_via_agent(st["agent_socket"], cmd, timeout=args.timeout, input=stdin, cwd=args.cwd,
                              alive=lambda: _pid_alive(st["supervisor_pid"]))
    except (OSError, ConnectionError, TimeoutError) as e:
        print(f"chimney vm run: {e}", file=sys.stderr)
        return EXIT_INFRA
    if not reply.get("ok"):
        print(f"chimney vm run: the agent refused: {reply.get('error')}", file=sys.stderr)
        return EXIT_INFRA
    sys.stdout.buffer.write(base64.b64decode(reply["stdout"]))
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(base64.b64decode(reply["stderr"]))
    sys.stderr.buffer.flush()
    if reply["timed_out"]:
        print(f"chimney vm run: timed out after {args.timeout:g} s (process group killed)", file=sys.stderr)
        return EXIT_TIMEOUT
    return reply["rc"] & 0xFF if reply["rc"] >= 0 else EXIT_INFRA


# ------------------------------------------------------------------ status

def _qmp(sock: str, cmd: str, timeout: float = 5.0):
    import asyncio

    from qemu.qmp import QMPClient

    async def go():
        c = QMPClient("chimney-vm-status")
        await c.connect(sock)
        try:
            return await c.execute(cmd)
        finally:
            await c.disconnect()

    return asyncio.run(asyncio.wait_for(go(), timeout))


def vm_status(name: str) -> dict:
    from chimney import hw

    from .agent import AgentClient

    st = read_state(name)
    out: dict = {"name": name, "dir": os.fspath(state_dir(name)), "up": False}
    if st is None:
        out["state"] = "no state"
        return out
    out.update({k: st.get(k) for k in ("supervisor_pid", "qemu_pid", "device_pid", "netns")})
    if not _pid_alive(st.get("supervisor_pid")):
        out["state"] = "supervisor gone"
        return out
    out["up"] = True
    try:
        out["qemu"] = _qmp(st["qmp_socket"], "query-status")["status"]
    except Exception as e:
        out["qemu"] = f"error: {e!r}"
    try:
        pci = _qmp(st["qmp_socket"], "query-pci")
        devs = []

        def walk(ds):
            for x in ds:
                devs.append(x)
                if x.get("pci_bridge"):
                    walk(x["pci_bridge"].get("devices", []))
        for b in pci:
            walk(b["devices"])
        out["nic_in_qemu"] = any(x["id"]["vendor"] == hw.PCI_VENDOR_ID and x["id"]["device"] == hw.PCI_DEVICE_ID
                                 for x in devs)
    except Exception as e:
        out["nic_in_qemu"] = f"error: {e!r}"
    try:
        c = AgentClient(st["agent_socket"])
        try:
            pong = c.request({"op": "ping"}, 5.0)
        finally:
            c.close()
        out["agent"] = "ok" if pong else "no answer (busy?)"
        if pong:
            out["guest_uptime_s"] = pong.get("uptime")
    except OSError as e:
        out["agent"] = f"error: {e}"
    out["device"] = "running" if st.get("device_pid") and os.path.exists(f"/proc/{st['device_pid']}") else "gone"
    return out


def cmd_status(args) -> int:
    if args.name:
        names = [args.name]
    else:
        root = vms_root()
        names = sorted(p.name for p in root.iterdir() if (p / STATE).exists()) if root.is_dir() else []
    results = [vm_status(n) for n in names]
    if args.json:
        print(json.dumps(results if not args.name else results[0], indent=1))
    elif not results:
        print("no VMs")
    else:
        for r in results:
            if not r["up"]:
                print(f"{r['name']}: down ({r.get('state')})")
                continue
            print(f"{r['name']}: up, QEMU {r.get('qemu')}, agent {r.get('agent')}, device {r.get('device')}, "
                  f"NIC {'attached' if r.get('nic_in_qemu') is True else r.get('nic_in_qemu')}, "
                  f"netns {r.get('netns')}, guest uptime {r.get('guest_uptime_s')} s")
    return 0 if all(r["up"] for r in results) and results else 3


# ------------------------------------------------------------------ down

def down(name: str, timeout: float = 60.0, keep: bool = False) -> str:
    """Stop VM ``name``; returns a one-line account."""
    d = state_dir(name)
    st = read_state(name)
    pid = st.get("supervisor_pid") if st else None
    how = "was not up"
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.1)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)  # its watchdog kills QEMU and the device, deletes the netns
            how = "supervisor killed"
        else:
            try:
                ex = json.loads((d / EXIT).read_text())
                how = f"QEMU stopped by {ex['qemu']}"
            except (OSError, ValueError, KeyError):
                how = "stopped"
    from .netns import sweep_stale
    time.sleep(0.1)
    sweep_stale()
    if not keep and d.exists():
        shutil.rmtree(d, ignore_errors=True)
    return how


def cmd_down(args) -> int:
    if args.all:
        root = vms_root()
        names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    else:
        names = [args.name]
    rc = 0
    for n in names:
        if not state_dir(n).exists():
            print(f"chimney vm: no VM {n!r}", file=sys.stderr)
            rc = 1
            continue
        print(f"{n}: {down(n, keep=args.keep)}")
    return rc


# ------------------------------------------------------------------ argparse

def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="vm_cmd", required=True)
    up = sub.add_parser("up", help="start a device and a VM with the NIC (and the Linux peer's netns)")
    up.add_argument("--name", default=DEFAULT_NAME)
    up.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    up.add_argument("--smp", type=int, default=1)
    up.add_argument("--accel", choices=["tcg", "kvm", "auto"], help="default: $CHIMNEY_ACCEL or tcg; "
                    "auto: KVM if a probe boot works")
    up.add_argument("--no-virtio-net", action="store_true", help="no virtio-net NIC for comparisons")
    up.add_argument("--no-network", action="store_true",
                    help="no namespace, no peer, no virtio-net: the NIC has no wire (works without root)")
    up.add_argument("--boot-timeout", type=float, default=180.0)
    up.add_argument("--impair", metavar="SPEC", help="impair the NIC's wire, e.g. "
                    "delay=2ms,loss=2%%,reorder=5%%,seed=3 (chimney device --impair)")
    up.add_argument("--json", action="store_true")
    run = sub.add_parser("run", help="run a command in the guest: its stdout, stderr and exit status",
                         usage="chimney vm run [--name N] [--timeout S] [--sh] [--stdin] -- CMD...")
    run.add_argument("--name", default=DEFAULT_NAME)
    run.add_argument("--timeout", type=float, default=None, help="kill the command after S seconds (exit 124)")
    run.add_argument("--sh", action="store_true", help="join the words and run them with /bin/sh -c")
    run.add_argument("--stdin", action="store_true", help="send our stdin to the command (default /dev/null)")
    run.add_argument("--cwd", help="working directory in the guest (default /chimney)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    st = sub.add_parser("status", help="state of one or all VMs")
    st.add_argument("--name")
    st.add_argument("--json", action="store_true")
    dn = sub.add_parser("down", help="power the guest off, stop the device, clean up")
    dn.add_argument("--name", default=DEFAULT_NAME)
    dn.add_argument("--all", action="store_true")
    dn.add_argument("--keep", action="store_true", help="keep the state directory (logs)")


def run(args) -> int:
    if args.vm_cmd == "run" and args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return {"up": cmd_up, "run": cmd_run, "status": cmd_status, "down": cmd_down}[args.vm_cmd](args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        p = argparse.ArgumentParser(prog="chimney vm _serve")
        p.add_argument("_serve")
        p.add_argument("--name", required=True)
        p.add_argument("--ready-fd", type=int, required=True)
        p.add_argument("--memory", type=int, default=1024)
        p.add_argument("--smp", type=int, default=1)
        p.add_argument("--accel")
        p.add_argument("--boot-timeout", type=float, default=180.0)
        p.add_argument("--no-virtio-net", action="store_true")
        p.add_argument("--no-network", action="store_true")
        p.add_argument("--impair")
        return serve(p.parse_args(argv))
    p = argparse.ArgumentParser(prog="chimney vm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
