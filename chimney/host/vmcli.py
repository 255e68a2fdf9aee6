"""`chimney vm up|run|wait|logs|kill|jobs|peer|qmp|status|down`: named VMs with the NIC, from the shell.

``vm up`` starts a supervisor process in the background that owns one
:class:`~chimney.host.vm.Vm` (network namespace + Linux peer, device, QEMU)
and returns once the guest answers, showing its phases on stderr.  The VM's
files live in its state directory, ``$CHIMNEY_VM_DIR/<name>`` (default
``/run/chimney/vms/<name>`` as root, else ``~/.cache/chimney/vms/<name>``):
``state.json``, serial, device and QEMU logs, the wire's pcap, the QMP
socket and ``agent-mux.sock``.  The supervisor holds QEMU's one agent
connection and shares it (:mod:`chimney.host.agentmux`), so any number of
``vm run`` work at once and their output arrives as the guest writes it.
``vm run --detach`` prints a job number for ``vm wait``, ``vm logs
[--follow]`` and ``vm kill``.  ``vm down`` stops the supervisor, which
powers the guest off and cleans up; the pcap and logs are kept in
``<state root>/_saved/`` (it prints where).  If the supervisor is killed,
its watchdog kills QEMU and the device and deletes the namespace.

Exit status: 2 for bad usage, 1 for a failure (one line on stderr, never a
traceback); ``vm run`` and ``vm wait`` exit with the guest command's status,
124 when it timed out, 125 when the VM or its agent is not there (or busy);
``vm peer`` with the command's; ``vm status`` 3 when a VM is not up.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path

from chimney import hw

STATE = "state.json"
EXIT = "exit.json"
SUPERVISOR_LOG = "supervisor.log"
MUX_SOCKET = "agent-mux.sock"
SAVED = "_saved"          # never a VM name (those start with a letter or digit)
KEEP_SAVED = 3            # saved pcaps and logs kept per VM name
DEFAULT_NAME = "default"
EXIT_FAIL, EXIT_USAGE, EXIT_TIMEOUT, EXIT_INFRA = 1, 2, 124, 125
CAP_NET_ADMIN, CAP_SYS_ADMIN = 12, 21
NEEDS_ROOT = "needs root (CAP_NET_ADMIN)"
DEFAULT_PCI_ID = f"{hw.PCI_VENDOR_ID:04x}:{hw.PCI_DEVICE_ID:04x}"


class CliError(Exception):
    """One line for the user, and the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


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
        raise CliError(f"bad VM name {name!r} (letters, digits, . _ -; at most 32)", EXIT_USAGE)
    return vms_root() / name


def vm_names() -> list[str]:
    from .vm import _NAME_RE
    root = vms_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME_RE.match(p.name)) if root.is_dir() else []


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


def _up_names() -> list[str]:
    return [n for n in vm_names() if _pid_alive((read_state(n) or {}).get("supervisor_pid"))]


def _running_state(name: str, code: int = EXIT_FAIL) -> dict:
    st = read_state(name)
    if st is None or not _pid_alive(st.get("supervisor_pid")):
        up = _up_names()
        hint = f"; up: {', '.join(up)} (--name N)" if up else f" (chimney vm up --name {name})"
        raise CliError(f"no VM {name!r} is up{hint}", code)
    return st


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def has_capability(cap: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def caller_uid() -> int:
    """Who is asking: the user behind sudo, else our uid."""
    sudo = os.environ.get("SUDO_UID")
    return int(sudo) if os.geteuid() == 0 and sudo and sudo.isdigit() else os.getuid()


def owner_uid(name: str) -> int | None:
    st = read_state(name)
    if st and isinstance(st.get("owner_uid"), int):
        return st["owner_uid"]
    try:
        return state_dir(name).stat().st_uid
    except OSError:
        return None


# ------------------------------------------------------------------ up

PHASES = {"namespace": "network namespace and Linux peer", "device": "NIC device process",
          "accel": "accelerator", "qemu": "QEMU", "agent": "guest agent"}


def _console_progress(serial_log: Path) -> str:
    """The guest's last progress line on its console (the kernel boots quiet)."""
    try:
        with open(serial_log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    marks = [ln.split(": ", 1)[1] for ln in lines if ln.startswith(("chimney-init: ", "chimney-agent: "))]
    return marks[-1] if marks else "kernel booting"


def cmd_up(args) -> int:
    import subprocess

    from rich.console import Console

    d = state_dir(args.name)
    if args.memory < 1:
        raise CliError(f"--memory {args.memory}: must be a positive number of MiB", EXIT_USAGE)
    try:
        hw.parse_pci_id(args.pci_id)
    except ValueError as e:
        raise CliError(f"--pci-id: {e}", EXIT_USAGE) from None
    if args.print_cmdline:
        from .cmdline import print_vm_up
        return print_vm_up(args)
    network = not args.no_network
    if network and not has_capability(CAP_NET_ADMIN):
        raise CliError(f"{NEEDS_ROOT}: the network namespace and TAPs need it (ip netns, /dev/net/tun); "
                       "run as root, or --no-network")
    st = read_state(args.name)
    if st is not None and _pid_alive(st.get("supervisor_pid")):
        raise CliError(f"VM {args.name!r} is already up ({d}); chimney vm down --name {args.name} first")
    if d.exists():
        shutil.rmtree(d)  # left by a VM that is gone
    d.mkdir(parents=True)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "chimney.host.vmcli", "_serve", "--name", args.name, "--ready-fd", str(w),
           "--memory", str(args.memory), "--smp", str(args.smp), "--boot-timeout", str(args.boot_timeout),
           "--owner-uid", str(caller_uid())]
    if args.accel:
        cmd += ["--accel", args.accel]
    if args.no_virtio_net:
        cmd += ["--no-virtio-net"]
    if args.no_network:
        cmd += ["--no-network"]
    if args.impair:
        cmd += ["--impair", args.impair]
    cmd += ["--pci-id", args.pci_id]
    with open(d / SUPERVISOR_LOG, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                pass_fds=(w,), start_new_session=True)
    os.close(w)
    console = Console(stderr=True, highlight=False)
    info = error = None
    t0 = last = time.monotonic()
    current = None
    def on_event(ev: dict) -> None:
        nonlocal current, last, info, error
        now = time.monotonic()
        if "phase" in ev:
            if ev.get("found"):
                console.print(f"  {ev['found']}")
            if ev["phase"] == current:
                return
            if current is not None:
                console.print(f"  [green]done[/] {PHASES.get(current, current)} ({now - last:.1f} s)")
            current, last = ev["phase"], now
            label = PHASES.get(current, current) + (f" ({ev['accel']})" if ev.get("accel") else "")
            status.update(f"vm {args.name}: {label}")
        elif "ready" in ev:
            info = ev["ready"]
            if current is not None:
                console.print(f"  [green]done[/] {PHASES.get(current, current)} ({now - last:.1f} s)")
        elif "error" in ev:
            error = ev["error"]

    buf = b""
    with os.fdopen(r, "rb", buffering=0) as ready, \
            console.status(f"vm {args.name}: starting", spinner="dots") as status:
        while True:  # one JSON object a line; EOF when the supervisor is ready or gone
            if not select.select([ready], [], [], 0.5)[0]:
                if current == "agent":  # how far the guest is, from its console
                    status.update(f"vm {args.name}: guest agent ({_console_progress(d / 'serial.log')})")
                continue
            chunk = ready.read(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                try:
                    on_event(json.loads(raw))
                except ValueError:
                    continue
    if info is None:
        if proc.poll() is None:
            proc.wait(10)
        if error is None:
            tail = (d / SUPERVISOR_LOG).read_text(errors="replace").strip().splitlines()
            error = tail[-1] if tail else "the supervisor exited"
        raise CliError(f"VM {args.name!r} did not come up: {error} (logs: {d})")
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    boot = info["boots"][-1] if info.get("boots") else {}
    print(f"VM {args.name} up in {time.monotonic() - t0:.1f} s: agent answered "
          f"{boot.get('agent_ready_s', '?')} s after QEMU started ({boot.get('accel', '?')})")
    print(f"  state:  {d}")
    if info.get("netns"):
        peer = info["peer"]
        print(f"  peer:   netns {info['netns']} (chimney vm peer --name {args.name} -- CMD)")
        print(f"          NIC wire {peer['nic_if']}: peer {peer['nic']['peer4']}, {peer['nic']['peer6']}; "
              f"guest {peer['nic']['guest4']}, {peer['nic']['guest6']}")
        if peer.get("vnet"):
            print(f"          virtio-net {peer['vnet_if']}: peer {peer['vnet']['peer4']}, {peer['vnet']['peer6']}; "
                  f"guest {peer['vnet']['guest4']}, {peer['vnet']['guest6']} ({info['guest_vnet_if']})")
    print(f"  logs:   {info['serial_log']}, {info['device_log']}, pcap {info['pcap']}")
    return 0


def serve(args) -> int:
    """The supervisor: owns the Vm and shares its agent until SIGTERM or until QEMU exits."""
    from .agentmux import AgentMux
    from .vm import Vm

    d = state_dir(args.name)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ready = os.fdopen(args.ready_fd, "w")

    def tell(obj: dict) -> None:
        try:
            ready.write(json.dumps(obj) + "\n")
            ready.flush()
        except OSError:  # `vm up` went away (Ctrl-C); the VM comes up all the same
            pass

    vm = Vm(args.name, workdir=d, remove_workdir=False, memory_mb=args.memory, smp=args.smp,
            accel=args.accel, boot_timeout=args.boot_timeout, virtio_net=not args.no_virtio_net,
            network=not args.no_network, impair=args.impair, pci_id=args.pci_id)
    vm.on_phase = lambda name, **details: tell({"phase": name, **details})
    try:
        vm.start()
    except BaseException as e:
        print(f"boot failed: {e}", flush=True)
        tell({"error": str(e).splitlines()[0]})
        ready.close()
        return 1
    mux = AgentMux(d / MUX_SOCKET, vm._client)
    info = {**vm.describe(), "supervisor_pid": os.getpid(), "started": time.time(),
            "mux_socket": mux.path, "owner_uid": args.owner_uid}
    _write_json(d / STATE, info)
    print(f"up: {json.dumps(info)}", flush=True)
    tell({"ready": info})
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
    mux.close()
    how = vm.close(graceful=True)
    _write_json(d / EXIT, {"reason": reason, "qemu": how, "qemu_status": vm.qemu.returncode})
    print(f"stopped: QEMU {how}", flush=True)
    return 0


# ------------------------------------------------------------------ jobs

def _mux_client(st: dict, code: int = EXIT_INFRA):
    from .agent import AgentClient
    path = st.get("mux_socket")
    if not path:
        raise CliError("this VM's supervisor shares no agent socket (started by an older chimney); "
                       "chimney vm down and up again", code)
    try:
        return AgentClient(path)
    except OSError as e:
        raise CliError(f"cannot reach the VM's agent at {path}: {e.strerror or e}", code) from None


def _agent_call(client, code: int = EXIT_INFRA):
    from .agent import AgentError, call_checked

    def call(msg: dict, timeout: float) -> dict:
        try:
            return call_checked(client, msg, timeout)
        except AgentError as e:
            raise CliError(str(e).splitlines()[0], code) from None
    return call


def _job(client, number: int, code: int = EXIT_INFRA):
    from .agent import GuestJob
    return GuestJob(_agent_call(client, code), number, None, f"job {number}", None, forget=False)


def _write(stream: str, data: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


def _exit_of(job, what: str) -> int:
    if job.timed_out:
        print(f"chimney vm {what}: timed out after {job.timeout:g} s (process group killed)"
              if job.timeout else f"chimney vm {what}: timed out (process group killed)", file=sys.stderr)
        return EXIT_TIMEOUT
    return job.rc & 0xFF


def cmd_run(args) -> int:
    from .agent import AgentBusy, AgentError, start_job

    if not args.command:
        raise CliError("no command (chimney vm run -- CMD...)", EXIT_USAGE)
    if args.timeout is not None and args.timeout <= 0:
        raise CliError(f"--timeout {args.timeout:g}: must be positive", EXIT_USAGE)
    st = _running_state(args.name, EXIT_INFRA)
    cmd = " ".join(args.command) if args.sh else args.command
    stdin = sys.stdin.buffer.read() if args.stdin else None
    client = _mux_client(st)
    try:
        try:
            # a NIC with another PCI id: the guest's tools look for that one
            env = {"CHIMNEY_PCI_ID": st["pci_id"]} if st.get("pci_id", DEFAULT_PCI_ID) != DEFAULT_PCI_ID else None
            job = start_job(client, cmd, timeout=args.timeout, input=stdin, cwd=args.cwd, env=env,
                            forget=not args.detach)
        except (AgentBusy, AgentError) as e:
            raise CliError(str(e).splitlines()[0], EXIT_INFRA) from None
        if args.detach:
            if job.number is None:  # could not be started: report like a finished command
                _write("stderr", job.stderr)
                return job.rc
            print(job.number)
            if sys.stderr.isatty():
                print(f"job {job.number} started: chimney vm logs {job.number} --follow | wait {job.number} | "
                      f"kill {job.number}", file=sys.stderr)
            return 0
        try:
            if job.number is None:
                _write("stderr", job.stderr)
            for stream, data in job.chunks():
                _write(stream, data)
        except KeyboardInterrupt:
            job.kill(signal.SIGKILL)
            print(f"chimney vm run: interrupted; killed guest job {job.number}", file=sys.stderr)
            return 130
        except AgentError as e:  # the VM went away meanwhile
            raise CliError(str(e).splitlines()[0], EXIT_INFRA) from None
        return _exit_of(job, "run")
    finally:
        client.close()


def _job_number(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise CliError(f"bad job {text!r}: a job number, as `chimney vm run --detach` printed", EXIT_USAGE) from None
    if n < 1:
        raise CliError(f"bad job {text!r}: job numbers start at 1", EXIT_USAGE)
    return n


def cmd_wait(args) -> int:
    number = _job_number(args.job)
    client = _mux_client(_running_state(args.name, EXIT_INFRA))
    try:
        job = _job(client, number)
        job.offsets = [1 << 62, 1 << 62]  # the exit status only: the output stays for `vm logs`
        end = None if args.timeout is None else time.monotonic() + args.timeout
        while not job.done:
            left = 1.0 if end is None else min(1.0, end - time.monotonic())
            if left <= 0:
                print(f"chimney vm wait: job {number} still runs after {args.timeout:g} s", file=sys.stderr)
                return EXIT_TIMEOUT
            job.poll(left)
        return _exit_of(job, "wait")
    finally:
        client.close()


def cmd_logs(args) -> int:
    number = _job_number(args.job)
    client = _mux_client(_running_state(args.name), EXIT_FAIL)
    try:
        job = _job(client, number, EXIT_FAIL)
        try:
            if args.follow:
                for stream, data in job.chunks():
                    _write(stream, data)
            else:  # what is there now: until a reply is not cut at REPLY_BYTES
                from chimney.guest.agent import REPLY_BYTES
                while True:
                    got = job.poll(0)
                    for stream, data in got:
                        _write(stream, data)
                    if not any(len(data) >= REPLY_BYTES for _, data in got):
                        break
        except KeyboardInterrupt:
            return 130
        if job.dropped:
            print(f"chimney vm logs: the first {job.dropped} bytes are gone (the agent keeps the last 16 MiB)",
                  file=sys.stderr)
        return 0
    finally:
        client.close()


def _signal_arg(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        return int(t)
    name = t if t.startswith("SIG") else "SIG" + t
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise CliError(f"bad signal {text!r} (e.g. TERM, KILL, INT, 9)", EXIT_USAGE) from None


def cmd_kill(args) -> int:
    number = _job_number(args.job)
    sig = _signal_arg(args.signal)
    client = _mux_client(_running_state(args.name), EXIT_FAIL)
    try:
        reply = _agent_call(client, EXIT_FAIL)({"op": "exec-kill", "job": number, "signal": sig}, 30)
        if not reply.get("running"):
            print(f"job {number} had already ended", file=sys.stderr)
        return 0
    finally:
        client.close()


def cmd_jobs(args) -> int:
    client = _mux_client(_running_state(args.name), EXIT_FAIL)
    try:
        jobs = _agent_call(client, EXIT_FAIL)({"op": "exec-list"}, 30)["jobs"]
    finally:
        client.close()
    if args.json:
        print(json.dumps(jobs, indent=1))
    elif not jobs:
        print("no jobs")
    for j in jobs if not args.json else []:
        state = "running" if j["running"] else f"exit {j['rc']}"
        print(f"{j['job']:>4}  pid {j['pid']:<6} {state:<9} {j['seconds']:8.1f} s  {' '.join(j['argv'])}")
    return 0


# ------------------------------------------------------------------ peer, qmp

def cmd_peer(args) -> int:
    from .netns import NETNS_DIR

    if not args.command:
        raise CliError("no command (chimney vm peer -- CMD...)", EXIT_USAGE)
    st = _running_state(args.name)
    ns = st.get("netns")
    if not ns:
        raise CliError(f"VM {args.name!r} has no network namespace (it was started with --no-network)")
    if not os.path.exists(os.path.join(NETNS_DIR, ns)):
        raise CliError(f"the namespace {ns} of VM {args.name!r} is gone (chimney vm down, then up)")
    if not has_capability(CAP_SYS_ADMIN):
        raise CliError("needs root (CAP_SYS_ADMIN) for ip netns exec")
    if shutil.which(args.command[0]) is None:
        raise CliError(f"{args.command[0]}: command not found", 127)
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", ns, *args.command])
    return 0  # not reached


def _qmp(sock: str, cmd: str, arguments: dict | None = None, timeout: float = 5.0):
    import asyncio

    from qemu.qmp import QMPClient

    async def go():
        c = QMPClient("chimney-vm-cli")
        await c.connect(sock)
        try:
            return await c.execute(cmd, arguments)
        finally:
            await c.disconnect()

    return asyncio.run(asyncio.wait_for(go(), timeout))


def cmd_qmp(args) -> int:
    from qemu.qmp import ExecuteError

    arguments = None
    if args.arguments is not None:
        try:
            arguments = json.loads(args.arguments)
        except ValueError as e:
            raise CliError(f"JSON-ARGS is not JSON: {e}", EXIT_USAGE) from None
        if not isinstance(arguments, dict):
            raise CliError("JSON-ARGS must be a JSON object, e.g. '{\"id\": \"nic0\"}'", EXIT_USAGE)
    st = _running_state(args.name)
    try:
        reply = _qmp(st["qmp_socket"], args.qmp_command, arguments, args.timeout)
    except ExecuteError as e:
        raise CliError(f"QMP {args.qmp_command}: {e.error_class}: {e}") from None
    except TimeoutError:
        raise CliError(f"QMP {args.qmp_command}: no reply within {args.timeout:g} s") from None
    except OSError as e:
        raise CliError(f"cannot reach QMP at {st['qmp_socket']}: {e.strerror or e}") from None
    print(json.dumps(reply, indent=1))
    return 0


# ------------------------------------------------------------------ status

def vm_status(name: str) -> dict:
    st = read_state(name)
    out: dict = {"name": name, "dir": os.fspath(state_dir(name)), "up": False}
    if st is None:
        out["state"] = "no state (boot failed or in progress)"
        return out
    out.update({k: st.get(k) for k in ("supervisor_pid", "qemu_pid", "device_pid", "netns", "owner_uid")
                if st.get(k) is not None})
    if not _pid_alive(st.get("supervisor_pid")):
        out["state"] = "supervisor gone"
        return out
    out["up"] = True
    try:
        out["qemu"] = _qmp(st["qmp_socket"], "query-status")["status"]
    except Exception as e:  # noqa: BLE001 - status reports, it does not fail
        out["qemu"] = f"error: {str(e) or type(e).__name__}"
    try:
        devs = []

        def walk(ds):
            for x in ds:
                devs.append(x)
                if x.get("pci_bridge"):
                    walk(x["pci_bridge"].get("devices", []))
        for b in _qmp(st["qmp_socket"], "query-pci"):
            walk(b["devices"])
        ids = hw.parse_pci_id(st.get("pci_id", DEFAULT_PCI_ID))
        out["nic_in_qemu"] = any((x["id"]["vendor"], x["id"]["device"]) == ids for x in devs)
    except Exception as e:  # noqa: BLE001
        out["nic_in_qemu"] = f"error: {str(e) or type(e).__name__}"
    try:
        client = _mux_client(st)
        try:
            pong = _agent_call(client)({"op": "ping"}, 10.0)
        finally:
            client.close()
        out["agent"] = "ok"
        out["guest_uptime_s"] = pong.get("uptime")
        out["jobs"] = pong.get("jobs", 0)
    except CliError as e:
        out["agent"] = f"error: {e}"
    out["device"] = "running" if st.get("device_pid") and os.path.exists(f"/proc/{st['device_pid']}") else "gone"
    return out


def _status_line(r: dict) -> str:
    if not r["up"]:
        return f"{r['name']}: down ({r.get('state')})"
    nic = r.get("nic_in_qemu")
    parts = [f"QEMU {r.get('qemu')}", f"agent {r.get('agent')}", f"device {r.get('device')}",
             "NIC attached" if nic is True else "NIC detached" if nic is False else f"NIC {nic}",
             f"netns {r['netns']}" if r.get("netns") else "no network"]
    if r.get("guest_uptime_s") is not None:
        parts.append(f"guest uptime {r['guest_uptime_s']:.0f} s")
    if r.get("jobs"):
        parts.append(f"{r['jobs']} jobs")
    return f"{r['name']}: up, " + ", ".join(parts)


def cmd_status(args) -> int:
    if args.name:
        if not state_dir(args.name).exists():
            up = _up_names()
            raise CliError(f"no VM {args.name!r}" + (f"; up: {', '.join(up)}" if up else ""), 3)
        names = [args.name]
    else:
        names = vm_names()
    results = [vm_status(n) for n in names]
    if args.json:
        print(json.dumps(results if not args.name else results[0], indent=1))
    elif not results:
        print("no VMs")
    else:
        for r in results:
            print(_status_line(r))
    return 0 if all(r["up"] for r in results) and results else 3


# ------------------------------------------------------------------ down

def _save_leftovers(name: str, d: Path) -> Path | None:
    """Keep the wire's pcap and the logs of a VM going down (the newest
    KEEP_SAVED per name); returns where."""
    files = [d / f for f in ("wire.pcap", "serial.log", "device.log", "qemu.log", "commands.log",
                             SUPERVISOR_LOG, EXIT) if (d / f).is_file()]
    if not files:
        return None
    saved_root = vms_root() / SAVED
    dest = saved_root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.move(os.fspath(f), dest / f.name)
        old = sorted(saved_root.glob(f"{name}-[0-9]*"))
        for o in old[:max(0, len(old) - KEEP_SAVED)]:
            shutil.rmtree(o, ignore_errors=True)
    except OSError:
        return None
    return dest


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
    if keep:
        return f"{how}; files kept in {d}"
    saved = _save_leftovers(name, d)
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
    return f"{how}; pcap and logs kept in {saved}" if saved else how


def _user(uid: int | None) -> str:
    import pwd
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, TypeError):
        return f"uid {uid}"


def cmd_down(args) -> int:
    if args.all:
        me = caller_uid()
        names = [n for n in vm_names() if owner_uid(n) == me]
        others = [n for n in vm_names() if owner_uid(n) != me]
        if others:
            listing = ", ".join(f"{n} of {_user(owner_uid(n))}" for n in others)
            if args.yes or (sys.stdin.isatty() and
                            input(f"VMs of other users: {listing}. Stop them too? [y/N] ").strip().lower() in ("y", "yes")):
                names += others
            else:
                print(f"not stopping VMs of other users: {listing} (chimney vm down --name N stops one)",
                      file=sys.stderr)
        if not names and not others:
            print("no VMs")
    else:
        names = [args.name]
    rc = 0
    for n in names:
        if not state_dir(n).exists():
            up = _up_names()
            print(f"chimney vm down: no VM {n!r}" + (f"; up: {', '.join(up)}" if up else ""), file=sys.stderr)
            rc = EXIT_FAIL
            continue
        print(f"{n}: {down(n, keep=args.keep)}")
    return rc


# ------------------------------------------------------------------ argparse

class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), not a usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # here, not in `chimney`'s own parser, which would print its usage block
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def _one_line_errors(p: argparse.ArgumentParser) -> None:
    p.error = lambda message: p.exit(EXIT_USAGE, f"{p.prog}: {message} (see {p.prog} --help)\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    _one_line_errors(p)
    sub = p.add_subparsers(dest="vm_cmd", required=True, parser_class=OneLineParser,
                           metavar="{up,run,wait,logs,kill,jobs,peer,qmp,status,down}")
    up = sub.add_parser("up", help="start a device and a VM with the NIC (and the Linux peer's netns)")
    up.add_argument("--name", default=DEFAULT_NAME)
    up.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB (default 1024)")
    up.add_argument("--smp", type=int, default=1)
    up.add_argument("--accel", choices=["tcg", "kvm", "auto"], help="default: $CHIMNEY_ACCEL or tcg; "
                    "auto: KVM if a probe boot works (it says what it found)")
    up.add_argument("--no-virtio-net", action="store_true", help="no virtio-net NIC for comparisons")
    up.add_argument("--no-network", action="store_true",
                    help="no namespace, no peer, no virtio-net: the NIC has no wire (works without root)")
    up.add_argument("--boot-timeout", type=float, default=180.0)
    up.add_argument("--impair", metavar="SPEC", help="impair the NIC's wire, e.g. "
                    "delay=2ms,loss=2%%,reorder=5%%,seed=3 (chimney device --impair)")
    up.add_argument("--pci-id", metavar="VVVV:DDDD", default=DEFAULT_PCI_ID,
                    help=f"the NIC's PCI vendor:device (default {DEFAULT_PCI_ID}; chimney device --pci-id); "
                         "`vm run` commands get CHIMNEY_PCI_ID so the guest's tools find it")
    up.add_argument("--print-cmdline", action="store_true",
                    help="print the commands `vm up` would run (namespace, chimney device, the peer's "
                         "addresses, QEMU) and start nothing")
    up.add_argument("--json", action="store_true")
    run = sub.add_parser("run", help="run a command in the guest: its output as it comes, its exit status",
                         usage="chimney vm run [--name N] [--timeout S] [--sh] [--stdin] [--detach] -- CMD...")
    run.add_argument("--name", default=DEFAULT_NAME)
    run.add_argument("--timeout", type=float, default=None, help="kill the command after S seconds (exit 124)")
    run.add_argument("--sh", action="store_true", help="join the words and run them with /bin/sh -c")
    run.add_argument("--stdin", action="store_true", help="send our stdin to the command (default /dev/null)")
    run.add_argument("--cwd", help="working directory in the guest (default /chimney)")
    run.add_argument("--detach", "-d", action="store_true",
                     help="print a job number and return at once (vm wait / logs / kill JOB)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    wt = sub.add_parser("wait", help="wait for a detached job; exit with its status")
    wt.add_argument("job")
    wt.add_argument("--name", default=DEFAULT_NAME)
    wt.add_argument("--timeout", type=float, default=None, help="give up after S seconds (exit 124)")
    lg = sub.add_parser("logs", help="a detached job's output so far (--follow: until it ends)")
    lg.add_argument("job")
    lg.add_argument("--name", default=DEFAULT_NAME)
    lg.add_argument("--follow", "-f", action="store_true")
    kl = sub.add_parser("kill", help="signal a job's process group (default TERM)")
    kl.add_argument("job")
    kl.add_argument("--name", default=DEFAULT_NAME)
    kl.add_argument("--signal", "-s", default="TERM")
    jb = sub.add_parser("jobs", help="the guest agent's jobs, running and finished")
    jb.add_argument("--name", default=DEFAULT_NAME)
    jb.add_argument("--json", action="store_true")
    pe = sub.add_parser("peer", help="run a command in the VM's network namespace (the Linux peer)",
                        usage="chimney vm peer [--name N] -- CMD...")
    pe.add_argument("--name", default=DEFAULT_NAME)
    pe.add_argument("command", nargs=argparse.REMAINDER)
    qm = sub.add_parser("qmp", help="one QMP command on the VM's monitor; prints the JSON reply",
                        usage="chimney vm qmp [--name N] CMD [JSON-ARGS]")
    qm.add_argument("qmp_command", metavar="CMD")
    qm.add_argument("arguments", metavar="JSON-ARGS", nargs="?")
    qm.add_argument("--name", default=DEFAULT_NAME)
    qm.add_argument("--timeout", type=float, default=10.0)
    st = sub.add_parser("status", help="state of one or all VMs")
    st.add_argument("--name")
    st.add_argument("--json", action="store_true")
    dn = sub.add_parser("down", help="power the guest off, stop the device, clean up (pcap and logs kept)")
    dn.add_argument("--name", default=DEFAULT_NAME)
    dn.add_argument("--all", action="store_true", help="every VM of ours (asks before others' VMs)")
    dn.add_argument("--yes", action="store_true", help="with --all: other users' VMs too, without asking")
    dn.add_argument("--keep", action="store_true", help="keep the whole state directory")


COMMANDS = {"up": cmd_up, "run": cmd_run, "wait": cmd_wait, "logs": cmd_logs, "kill": cmd_kill, "jobs": cmd_jobs,
            "peer": cmd_peer, "qmp": cmd_qmp, "status": cmd_status, "down": cmd_down}


def run(args) -> int:
    if args.vm_cmd in ("run", "peer") and args.command and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        return COMMANDS[args.vm_cmd](args)
    except CliError as e:
        print(f"chimney vm {args.vm_cmd}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"chimney vm {args.vm_cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        first = (str(e).splitlines() or [""])[0]
        print(f"chimney vm {args.vm_cmd}: {type(e).__name__}: {first}", file=sys.stderr)
        return EXIT_FAIL


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
        p.add_argument("--pci-id", default=DEFAULT_PCI_ID)
        p.add_argument("--owner-uid", type=int, default=os.getuid())
        return serve(p.parse_args(argv))
    p = OneLineParser(prog="chimney vm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
