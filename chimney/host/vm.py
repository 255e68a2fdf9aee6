"""A long-running VM with the NIC attached, driven through a guest agent and QMP.

``Vm`` puts together, in a work directory of its own:

- a network namespace (:class:`~chimney.host.netns.Netns`) with the Linux peer:
  the NIC's TAP ``chim0`` (10.199.0.0/24, fd00:c41e::/64, :class:`PeerAddrs`)
  and, for comparisons, a virtio-net NIC on a second TAP ``vnet0``
  (10.199.1.0/24, fd00:c41e:1::/64), both configured on the peer side and in
  the guest (the virtio-net side; the chimney NIC has no kernel driver);
- the NIC: a ``chimney device`` process (:class:`DeviceProcess`), wire = the
  TAP in the namespace, a pcap of the wire;
- QEMU (run inside the namespace, so that its virtio-net TAP is there),
  booted in agent mode (``chimney.agent=1``): the guest's /init starts
  :mod:`chimney.guest.agent` on the virtio-serial port ``chimney.agent``;
- a watchdog process that kills QEMU and the device and deletes the namespace
  if the owning process dies without cleaning up (SIGKILL, crash).

Commands run through the agent (byte-exact stdout/stderr, exit status,
timeouts that kill the command's process group), several at once:
``run(cmd)`` waits for one, ``start(cmd)`` returns a job whose output arrives
as the guest writes it (:class:`~chimney.host.agent.GuestJob`); QEMU is controlled through
QMP with ``qemu.qmp`` (status, query-pci, device_del/device_add of the NIC,
system_powerdown, quit).

    with Vm("t1") as vm:
        res = vm.run("lspci -n")          # GuestResult(rc, stdout, stderr)
        job = vm.start("dmesg -w")        # job.chunks(), job.wait(), job.kill()
        vm.unplug_nic(); vm.plug_nic()
"""
from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from chimney import hw
from chimney.host.accel import resolve_accel
from chimney.host.agent import (POLL_WAIT, AgentBusy, AgentClient, AgentError, CommandTimeout,  # noqa: F401
                                GuestJob, start_job)
from chimney.host.watchdog import Watchdog
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs, sweep_stale
from chimney.host.qemu import (QEMU_LOG, GuestBootError, GuestError, GuestResult, GuestTimeout,
                               VmConfig, _tail)

PCI_ID = f"{hw.PCI_VENDOR_ID:04x}:{hw.PCI_DEVICE_ID:04x}"
NIC_ID = "nic0"
NIC_TAP = "chim0"
VNET_TAP = "vnet0"
VNET_MAC = "52:54:00:c4:1e:02"
NIC_ADDRS = PeerAddrs()
VNET_ADDRS = PeerAddrs(peer4="10.199.1.1", guest4="10.199.1.2", prefix4=24,
                       peer6="fd00:c41e:1::1", guest6="fd00:c41e:1::2", prefix6=64)
AGENT_SOCKET = "agent.sock"
NIC_SOCKET = "nic.sock"
DEVICE_LOG = "device.log"
PCAP = "wire.pcap"
COMMAND_LOG = "commands.log"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
TAIL_LINES, TAIL_WIDTH = 3, 200  # of each command's output, in the command log


def qemu_reason(qemu_output: str, memory_mb: int | None = None) -> str:
    """The line of QEMU's output that says why it stopped, with what to change."""
    lines = [ln.strip() for ln in qemu_output.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "qemu" in ln.split(":")[0] or "error" in ln.lower()]
    if not errs:
        return ""
    reason = errs[-1].split(": ", 1)[-1] if errs[-1].startswith(("qemu", "/")) else errs[-1]
    if "initrd" in reason and "too large" in reason and memory_mb is not None:
        m = re.search(r"max: (\d+), need (\d+)", reason)
        sizes = f" (it needs {int(m[2]) >> 20} MiB, at most {int(m[1]) >> 20} MiB fit)" if m else ""
        reason = f"initrd too large for --memory {memory_mb}{sizes}: give the guest more RAM"
    return reason


class DeviceStartError(RuntimeError):
    """The NIC's device process did not start; the message says why."""


def device_reason(log: Path) -> str:
    """The device log's last error line, and whether root is what is missing."""
    tail = _tail(log, 40)
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln] or lines[-1:]
    if not errs:
        return "no log"
    line = errs[-1]
    denied = "Operation not permitted" in line or "Permission denied" in line
    if denied and ("/dev/net/tun" in tail or "TUNSETIFF" in tail):
        return f"needs root (CAP_NET_ADMIN) for /dev/net/tun: {line}"
    return line


def _output_tail(data: bytes) -> list[str]:
    text = data.decode(errors="replace").rstrip("\n")
    return [line[-TAIL_WIDTH:] for line in text.splitlines()[-TAIL_LINES:]] if text else []


@dataclass
class Peer:
    """The Linux peer: a network namespace with the NIC's TAP (``nic_if``, the
    ``nic`` addresses) and virtio-net's TAP (``vnet_if``, ``vnet`` addresses)."""
    netns: Netns
    nic: PeerAddrs = field(default_factory=PeerAddrs)
    nic_if: str = NIC_TAP
    vnet: PeerAddrs | None = field(default_factory=lambda: VNET_ADDRS)
    vnet_if: str | None = VNET_TAP
    vm: "Vm | None" = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.netns.name

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return self.netns.run(*cmd, **kw)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return self.netns.popen(*cmd, **kw)


# ------------------------------------------------------------------ the VM

_live: "weakref.WeakSet[Vm]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for vm in list(_live):
        try:
            vm.close()
        except Exception:
            pass


class Vm:
    """A VM with the NIC attached.  ``start()`` (or ``with``) brings up the
    namespace, the device and QEMU and waits for the guest agent; ``close()``
    takes everything down again."""

    _seq = itertools.count(1)

    def __init__(self, name: str | None = None, *, workdir: str | os.PathLike | None = None,
                 network: bool = True, virtio_net: bool = True, memory_mb: int = 1024, smp: int = 1,
                 accel: str | None = None, boot_timeout: float = 180.0, remove_workdir: bool | None = None,
                 device_log_level: str = "INFO", append: str = "", extra_args: Sequence[str] = (),
                 unplug_fix: bool = True, impair: str | None = None, pci_id: str = PCI_ID,
                 make_workdir: bool = True):
        self.name = name or f"{os.getpid()}-{next(Vm._seq)}"
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad VM name {self.name!r}")
        # removed by close(): by default only a directory made here
        self.remove_workdir = workdir is None if remove_workdir is None else remove_workdir
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"chimney-vm-{self.name}-"))
        self.workdir = self.workdir.resolve()
        if make_workdir:                      # False: only to print what start() would run
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.network = network
        self.virtio_net = virtio_net and network
        self.memory_mb, self.smp = memory_mb, smp
        self.accel = accel
        self.boot_timeout = boot_timeout
        self.device_log_level = device_log_level
        self.append, self.extra_args = append, list(extra_args)
        self.unplug_fix = unplug_fix
        # wire impairment of the NIC (chimney.device.impair spec, e.g. "delay=2ms,loss=2%,reorder=5%,seed=3")
        self.impair = impair
        # the NIC's vendor:device (chimney device --pci-id); guest commands get
        # CHIMNEY_PCI_ID when it is not the default, so the guest's tools find it
        self.pci_ids = hw.parse_pci_id(pci_id)
        self.pci_id = f"{self.pci_ids[0]:04x}:{self.pci_ids[1]:04x}"
        self.unplug_fixed = False             # QEMU is the copy that survives device_del (qemufix)
        self.netns: Netns | None = None
        self.peer: Peer | None = None
        self.device: DeviceProcess | None = None
        self.qemu: subprocess.Popen | None = None
        self.config: VmConfig | None = None
        self.guest_vnet_if: str | None = None
        self.boots: list[dict] = []          # one entry per boot: seconds to the first agent reply, ...
        self._agent: AgentClient | None = None
        self._lock = threading.RLock()       # the agent connection (and boot)
        self._qmp_lock = threading.Lock()    # QMP: one client at a time
        self._watchdog: Watchdog | None = None
        self._closed = False
        self._nic_plugged = False
        self.on_phase = None                 # on_phase(name, **details) as start() goes on (chimney vm up)

    def _phase(self, name: str, **details) -> None:
        if self.on_phase is not None:
            self.on_phase(name, **details)

    # -- paths
    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / QEMU_LOG

    @property
    def device_log(self) -> Path:
        return self.workdir / DEVICE_LOG

    @property
    def pcap(self) -> Path:
        return self.workdir / PCAP

    @property
    def agent_socket(self) -> Path:
        return self.workdir / AGENT_SOCKET

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def nic_socket(self) -> Path:
        return self.workdir / NIC_SOCKET

    # -- life cycle
    def __enter__(self) -> "Vm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_vm(self) -> "Vm":
        _live.add(self)
        try:
            sweep_stale()
            self._watchdog = Watchdog()
            if self.remove_workdir:
                self._watchdog.add("rmtree", self.workdir)
            if self.network:
                self._phase("namespace")
                self.netns = Netns(f"vm{self.name}"[:20])
                self._watchdog.add("netns", self.netns.name)
            self._phase("device")
            try:
                self.device = DeviceProcess(os.fspath(self.nic_socket), log_path=os.fspath(self.device_log),
                                            **self.device_options(self.netns.name if self.netns else None))
            except (RuntimeError, TimeoutError) as e:
                raise DeviceStartError(f"{str(e).splitlines()[0].rstrip(':')}: {device_reason(self.device_log)}"
                                       f" (log: {self.device_log})") from None
            self._watchdog.add("pid", self.device.proc.pid)
            if self.netns:
                self.netns.configure_peer(NIC_TAP, NIC_ADDRS)
                self.peer = Peer(self.netns, vnet=VNET_ADDRS if self.virtio_net else None,
                                 vnet_if=VNET_TAP if self.virtio_net else None, vm=self)
            self.boot()
        except BaseException:
            self.close(remove_workdir=False)  # the logs tell why (the error names the directory)
            raise
        return self

    def device_options(self, netns: str | None) -> dict:
        """The NIC's settings (chimney.host.device.device_options) with its TAP in `netns`."""
        return {"log_level": self.device_log_level, "tap": NIC_TAP if self.network else None,
                "netns": netns, "pcap": os.fspath(self.pcap), "impair": self.impair,
                "pci_id": self.pci_id if self.pci_id != PCI_ID else None}

    def qemu_config(self, accel: str) -> VmConfig:
        """QEMU's settings for a boot with `accel` ("tcg" or "kvm")."""
        return VmConfig(
            workdir=self.workdir, vfio_user_socket=self.nic_socket, nic_id=NIC_ID,
            agent_socket=self.agent_socket, vnet_tap=VNET_TAP if self.virtio_net else None,
            vnet_mac=VNET_MAC, memory_mb=self.memory_mb, smp=self.smp, accel=accel,
            append=f"chimney.agent=1 {self.append}".strip(), extra_args=self.extra_args)

    def boot(self) -> float:
        """Start QEMU (the device must be running) and wait for the agent;
        returns the seconds from QEMU's start to the agent's first reply."""
        with self._lock:
            if self.qemu is not None and self.qemu.poll() is None:
                raise RuntimeError("QEMU is already running")
            self._phase("accel")
            accel = resolve_accel(self.accel, report=lambda line: self._phase("accel", found=line))
            self._phase("qemu", accel=accel)
            self.config = self.qemu_config(accel)
            self.config.results_dir.mkdir(parents=True, exist_ok=True)
            for p in (self.serial_log, self.qmp_socket, self.agent_socket):
                p.unlink(missing_ok=True)
            from chimney import images
            runtime, image = images.qemu_runtime(quiet=True), images.guest_image(quiet=True)
            argv = self._with_unplug_fix(self.config.argv(runtime, image))
            if self.virtio_net:  # QEMU creates its TAP in its own namespace
                argv = ["ip", "netns", "exec", self.netns.name] + argv
            (self.workdir / "qemu.argv").write_text(json.dumps(argv, indent=1) + "\n")
            with open(self.qemu_log, "ab") as qlog:
                t0 = time.monotonic()
                self.qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                             env={**os.environ, **runtime.env()},
                                             start_new_session=True)
            self._watchdog.add("pgid", self.qemu.pid)
            self._nic_plugged = True
            if self.virtio_net:
                self.netns.configure_peer(VNET_TAP, VNET_ADDRS)
            self._phase("agent")
            try:
                pong = self._wait_agent(t0)
                seconds = time.monotonic() - t0
                if self.virtio_net:
                    self._configure_guest_vnet()
            except BaseException:
                self.kill_qemu()
                raise
            self.boots.append({"accel": accel, "agent_ready_s": round(seconds, 3),
                               "ready_s": round(time.monotonic() - t0, 3), "guest_uptime_s": pong.get("uptime")})
            self._log_command(f"# boot {len(self.boots)}: agent answered after {seconds:.2f} s "
                              f"(guest uptime {pong.get('uptime')} s, accel {accel})")
            return seconds

    def _with_unplug_fix(self, argv: list[str]) -> list[str]:
        """Use the copy of QEMU that survives device_del of the NIC (see
        :mod:`chimney.host.qemufix`) when it can be made."""
        self.unplug_fixed = False
        if not self.unplug_fix:
            return argv
        from chimney import images
        from chimney.images._cache import cache_root
        from chimney.host.qemufix import patched_qemu
        binary = images.qemu_runtime(quiet=True).root / "usr/bin/qemu-system-x86_64"
        if os.fspath(binary) not in argv:
            return argv
        fixed = patched_qemu(binary, cache_root())
        if fixed is None:
            return argv
        self.unplug_fixed = True
        return [os.fspath(fixed) if a == os.fspath(binary) else a for a in argv]

    def _wait_agent(self, t0: float) -> dict:
        deadline = t0 + self.boot_timeout
        while True:
            if self.qemu.poll() is not None:
                raise self._boot_error(f"QEMU exited with status {self.qemu.returncode} during boot")
            if time.monotonic() > deadline:
                raise self._boot_error(f"the guest agent did not answer within {self.boot_timeout:g} s",
                                       GuestTimeout)
            try:
                client = AgentClient(self.agent_socket)
            except OSError:
                time.sleep(0.05)
                continue
            try:
                reply = client.request({"op": "ping"}, max(0.1, deadline - time.monotonic()), self.alive_qemu)
            except (OSError, ConnectionError):
                client.close()
                continue
            if reply is None:
                client.close()
                continue
            self._agent = client
            return reply

    def _boot_error(self, msg: str, cls=GuestBootError) -> GuestError:
        reason = qemu_reason(_tail(self.qemu_log, 20), self.memory_mb) if not self.alive_qemu() else ""
        if reason:  # QEMU stopped: its own words say why
            msg = f"{msg}: {reason}"
        return cls(msg, workdir=self.workdir, serial_tail=_tail(self.serial_log), qemu_output=_tail(self.qemu_log, 20))

    def _configure_guest_vnet(self) -> None:
        a = VNET_ADDRS
        script = (f'IF=; for d in /sys/class/net/*; do [ "$(cat $d/address)" = "{VNET_MAC}" ] && IF=${{d##*/}}; done; '
                  f'[ -n "$IF" ] || {{ echo "no interface with MAC {VNET_MAC}" >&2; exit 1; }}; '
                  f'ip addr add {a.guest4}/{a.prefix4} dev $IF && '
                  f'ip addr add {a.guest6}/{a.prefix6} dev $IF nodad && ip link set $IF up && echo $IF')
        res = self.run(script, timeout=30)
        if res.rc != 0:
            raise self._boot_error(f"configuring virtio-net in the guest failed: {res.stderr.decode(errors='replace')}")
        self.guest_vnet_if = res.stdout.decode().strip()

    def alive_qemu(self) -> bool:
        return self.qemu is not None and self.qemu.poll() is None

    # -- commands
    def _client(self) -> AgentClient:
        """The agent connection (one, shared by every thread), made on first use."""
        with self._lock:
            if not self.alive_qemu():
                raise AgentError("QEMU is not running", workdir=self.workdir, serial_tail=_tail(self.serial_log))
            if self._agent is None or self._agent.closed:
                self._drop_agent()
                try:
                    self._agent = AgentClient(self.agent_socket)
                except OSError as e:
                    raise AgentError(f"cannot connect to the agent: {e}", workdir=self.workdir) from None
            return self._agent

    def start(self, cmd: str | Sequence[str] | None = None, timeout: float | None = None, *,
              input: bytes | None = None, cwd: str | None = None, env: dict | None = None,
              keep: bool = False) -> "Vm | GuestJob":
        """Without ``cmd``: bring the VM up (namespace + peer, device, QEMU;
        returns once the guest agent answers).  With ``cmd``: start it in the
        guest and return a :class:`~chimney.host.agent.GuestJob` at once
        (``poll()``, ``chunks()``, ``wait()``, ``kill()``), so several
        commands run side by side and their output arrives as they write it.
        ``timeout`` (None: none) kills the job's process group in the guest;
        ``keep`` leaves the finished job in the agent (for ``chimney vm
        logs``) instead of dropping it once its output is read."""
        if cmd is None:
            return self._start_vm()
        client = self._client()
        t0 = time.monotonic()

        def logged(job: GuestJob) -> None:
            self._log_job(job, time.monotonic() - t0)

        env = {**self.guest_env(), **(env or {})} or None
        try:
            return start_job(client, cmd, timeout=timeout, input=input, cwd=cwd, env=env, forget=not keep,
                             alive=self.alive_qemu, workdir=self.workdir, on_end=logged)
        except AgentBusy:
            raise
        except AgentError:
            self._drop_agent()
            raise

    def guest_env(self) -> dict:
        """What every guest command's environment gets: CHIMNEY_PCI_ID for a NIC with another id."""
        return {"CHIMNEY_PCI_ID": self.pci_id} if self.pci_id != PCI_ID else {}

    def run(self, cmd: str | Sequence[str], timeout: float | None = 60, *, input: bytes | None = None,
            cwd: str | None = None, env: dict | None = None, check: bool = False) -> GuestResult:
        """Run ``cmd`` in the guest (a string: with /bin/sh -c; a list: argv),
        in /chimney with PYTHONPATH=/chimney, stdin from ``input`` or /dev/null,
        and wait for it (other threads may run commands meanwhile).

        Returns GuestResult(rc, stdout, stderr), output byte-exact; rc is
        128 + N for a command killed by signal N.  Raises CommandTimeout when
        the command outlives ``timeout`` (its process group is killed; the
        exception holds the output so far), AgentBusy when the agent's limit
        of commands is reached, AgentError when the channel fails, and
        CalledProcessError for rc != 0 with ``check``."""
        job = self.start(cmd, timeout, input=input, cwd=cwd, env=env)
        try:
            while not job.done:
                job.poll(POLL_WAIT)
        except AgentError as e:
            self._drop_agent()
            raise AgentError(str(e).split("\n")[0], workdir=self.workdir,
                             serial_tail=_tail(self.serial_log)) from None
        try:
            res = job.result()
        except CommandTimeout as e:  # with the console's tail: what the guest said meanwhile
            raise CommandTimeout(str(e).split("\n")[0], stdout=e.stdout, stderr=e.stderr, workdir=self.workdir,
                                 serial_tail=_tail(self.serial_log, 10)) from None
        if check and res.rc != 0:
            raise subprocess.CalledProcessError(res.rc, cmd, res.stdout, res.stderr)
        return res

    def python(self, code: str, *args: str, timeout: float | None = 60, input: bytes | None = None,
               check: bool = False) -> GuestResult:
        """Run Python ``code`` in the guest (python3 -c; PYTHONPATH=/chimney)."""
        return self.run(["python3", "-c", code, *args], timeout=timeout, input=input, check=check)

    def ping_agent(self, timeout: float = 10) -> dict:
        try:
            reply = self._client().request({"op": "ping"}, timeout, self.alive_qemu)
        except (OSError, ConnectionError) as e:
            self._drop_agent()
            raise AgentError(f"ping: {e}", workdir=self.workdir) from None
        if reply is None:
            raise AgentError("no pong from the agent", workdir=self.workdir)
        return reply

    def dmesg(self, timeout: float = 20) -> bytes:
        """The guest kernel's log (the console is quiet; this is all of it)."""
        return self.run("dmesg", timeout=timeout).stdout

    def _drop_agent(self) -> None:
        with self._lock:
            if self._agent is not None:
                self._agent.close()
                self._agent = None

    def _log_job(self, job: GuestJob, seconds: float) -> None:
        state = " TIMEOUT" if job.timed_out else ""
        lines = [f"{seconds:8.3f}s rc={job.rc}{state} out={len(job.stdout)} err={len(job.stderr)} {job.cmd!r}"]
        for name, data in (("out", job.stdout), ("err", job.stderr)):
            lines += [f"    {name}| {t}" for t in _output_tail(data)]
        self._log_command("\n".join(lines))

    def command_log_size(self) -> int:
        """Where the command log ends now (a test's slice starts there)."""
        try:
            return (self.workdir / COMMAND_LOG).stat().st_size
        except OSError:
            return 0

    def _log_command(self, line: str) -> None:
        try:
            with open(self.workdir / COMMAND_LOG, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        except OSError:
            pass

    # -- QMP
    def qmp(self, cmd: str, args: dict | None = None, timeout: float = 30) -> object:
        """Execute one QMP command (a fresh connection each time)."""
        return self._qmp_session(lambda c: c.execute(cmd, args), timeout)

    def _qmp_session(self, fn, timeout: float):
        from qemu.qmp import QMPClient

        async def session():
            client = QMPClient(f"chimney-{self.name}")
            await client.connect(os.fspath(self.qmp_socket))
            try:
                return await fn(client)
            finally:
                await client.disconnect()

        async def bounded():
            return await asyncio.wait_for(session(), timeout)

        with self._qmp_lock:
            return asyncio.run(bounded())

    def status(self) -> str:
        """QEMU's run state ("running", "paused", ...)."""
        return self.qmp("query-status")["status"]

    def query_pci(self) -> list:
        return self.qmp("query-pci")

    def pci_devices(self) -> list[dict]:
        """Every device of query-pci, flattened, with its ``bus`` number and qdev ``id``."""
        out = []

        def walk(devs, bus):
            for d in devs:
                out.append({**d, "bus": bus})
                br = d.get("pci_bridge")
                if br:
                    walk(br.get("devices", []), br["bus"]["secondary"])

        for b in self.query_pci():
            walk(b["devices"], b["bus"])
        return out

    def nic_in_qemu(self) -> bool:
        return any((d["id"]["vendor"], d["id"]["device"]) == self.pci_ids
                   for d in self.pci_devices())

    def unplug_nic(self, timeout: float = 60) -> dict:
        """device_del the NIC and wait for its DEVICE_DELETED event (the guest
        must release it: pciehp's attention button, ~5 s); returns the event."""
        async def unplug(c):
            with c.listener("DEVICE_DELETED") as events:
                await c.execute("device_del", {"id": NIC_ID})
                while True:
                    ev = await events.get()
                    if ev.get("data", {}).get("device") == NIC_ID:
                        return dict(ev)

        ev = self._qmp_session(unplug, timeout)
        self._nic_plugged = False
        return ev

    def plug_nic(self) -> None:
        """device_add the NIC again (same id, same vfio-user socket)."""
        self.qmp("device_add", self.config.nic_device())
        self._nic_plugged = True

    def wait_nic_in_guest(self, present: bool = True, timeout: float = 30, rescan_after: float = 5) -> float:
        """Wait until the guest's lspci lists the NIC (or no longer does);
        rescans the PCI bus once after ``rescan_after`` s.  Returns seconds."""
        cond = "grep -q ." if present else "! grep -q ."
        steps = max(1, int(timeout / 0.2))
        rescan = int(rescan_after / 0.2)
        script = (f"i=0; while [ $i -lt {steps} ]; do lspci -n -d {self.pci_id} | {cond} && exit 0; "
                  f"[ $i -eq {rescan} ] && echo 1 > /sys/bus/pci/rescan; sleep 0.2; i=$((i+1)); done; exit 1")
        t0 = time.monotonic()
        res = self.run(script, timeout=timeout + 30)
        if res.rc != 0:
            raise TimeoutError(f"the guest's lspci {'never listed' if present else 'still lists'} the NIC "
                               f"after {timeout:g} s")
        return time.monotonic() - t0

    def guest_lspci(self) -> str:
        return self.run(f"lspci -nn -d {self.pci_id}", timeout=30, check=True).stdout.decode()

    # -- stopping
    def powerdown(self, timeout: float = 30) -> bool:
        """system_powerdown (ACPI power button; the agent powers off); True
        when QEMU exited within ``timeout``."""
        if not self.alive_qemu():
            return True
        self._drop_agent()
        try:
            self.qmp("system_powerdown", timeout=10)
        except Exception:
            return False
        return self._wait_qemu(timeout)

    def quit(self, timeout: float = 10) -> bool:
        """QMP quit; True when QEMU exited."""
        if not self.alive_qemu():
            return True
        self._drop_agent()
        try:
            self.qmp("quit", timeout=5)
        except Exception:
            pass
        return self._wait_qemu(timeout)

    def kill_qemu(self) -> None:
        """SIGKILL QEMU (the device and the namespace stay)."""
        self._drop_agent()
        if self.qemu is not None:
            if self.qemu.poll() is None:
                try:
                    os.killpg(self.qemu.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.qemu.wait()
            if self._watchdog:
                self._watchdog.remove("pgid", self.qemu.pid)

    def _wait_qemu(self, timeout: float) -> bool:
        try:
            self.qemu.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        if self._watchdog:
            self._watchdog.remove("pgid", self.qemu.pid)
        return True

    def stop_qemu(self, graceful: bool = False, timeout: float = 20) -> str:
        """Stop QEMU: powerdown (if ``graceful``), else/then quit, then kill.
        Returns how it ended: "powerdown", "quit", "kill" or "exited"."""
        if not self.alive_qemu():
            return "exited"
        if graceful and self.powerdown(timeout):
            return "powerdown"
        if self.quit():
            return "quit"
        self.kill_qemu()
        return "kill"

    def close(self, graceful: bool = False, remove_workdir: bool | None = None) -> str | None:
        """Stop QEMU (``graceful``: ACPI power button first) and the device,
        delete the namespace, remove the work directory (by default one made
        by us).  Returns how QEMU ended (see stop_qemu)."""
        if self._closed:
            return None
        self._closed = True
        how = None
        try:
            if self.qemu is not None:
                how = self.stop_qemu(graceful)
        finally:
            self._drop_agent()
            if self.device is not None:
                self.device.stop()
                if self._watchdog:
                    self._watchdog.remove("pid", self.device.proc.pid)
            if self.netns is not None:
                self.netns.delete()
                if self._watchdog:
                    self._watchdog.remove("netns", self.netns.name)
            if self.remove_workdir if remove_workdir is None else remove_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif self._watchdog:
                self._watchdog.remove("rmtree", self.workdir)
            if self._watchdog:
                self._watchdog.disarm()
            _live.discard(self)
        return how

    stop = close

    def kill(self) -> None:
        """Kill QEMU and the device at once, then clean up."""
        self.kill_qemu()
        if self.device is not None and self.device.alive:
            self.device.kill()
        self.close()

    # -- artifacts
    def save_artifacts(self, dest: str | os.PathLike, commands_since: int | None = None) -> list[Path]:
        """Copy the serial log, device log, pcap, QEMU log, QEMU argv and the
        command log to ``dest``, and, while the guest runs, its kernel log
        (``dmesg.txt``); ``commands_since``: also the command log from that
        offset on (``commands-test.log``, one test's commands).  Returns the
        copies."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        copied = []
        for src in (self.serial_log, self.device_log, self.pcap, self.qemu_log, self.workdir / "qemu.argv",
                    self.workdir / COMMAND_LOG):
            if src.is_file():
                shutil.copyfile(src, dest / src.name)
                copied.append(dest / src.name)
        if commands_since is not None:
            try:
                with open(self.workdir / COMMAND_LOG, "rb") as f:
                    f.seek(commands_since)
                    (dest / "commands-test.log").write_bytes(f.read())
                copied.append(dest / "commands-test.log")
            except OSError:
                pass
        if self.alive_qemu():
            try:
                (dest / "dmesg.txt").write_bytes(self.dmesg())
                copied.append(dest / "dmesg.txt")
            except GuestError as e:  # a hung or busy guest: say so where the log would be
                (dest / "dmesg.txt").write_text(f"dmesg not available: {str(e).splitlines()[0]}\n")
        return copied

    def describe(self) -> dict:
        return {
            "name": self.name, "workdir": os.fspath(self.workdir),
            "qemu_pid": self.qemu.pid if self.qemu else None,
            "device_pid": self.device.proc.pid if self.device else None,
            "netns": self.netns.name if self.netns else None,
            "agent_socket": os.fspath(self.agent_socket), "qmp_socket": os.fspath(self.qmp_socket),
            "nic_socket": os.fspath(self.nic_socket), "serial_log": os.fspath(self.serial_log),
            "device_log": os.fspath(self.device_log), "pcap": os.fspath(self.pcap),
            "qemu_log": os.fspath(self.qemu_log), "pci_id": self.pci_id,
            "peer": None if not self.peer else {
                "nic_if": NIC_TAP, "nic": vars(NIC_ADDRS),
                "vnet_if": VNET_TAP if self.virtio_net else None,
                "vnet": vars(VNET_ADDRS) if self.virtio_net else None},
            "guest_vnet_if": self.guest_vnet_if, "boots": self.boots,
        }
