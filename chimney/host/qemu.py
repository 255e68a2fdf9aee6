"""QEMU command lines for the chimney guest, and a one-shot ``run_in_guest``.

The VM: q35 with a virtual Intel IOMMU (so the guest can drive a device via
vfio-pci with the type1 IOMMU), guest RAM in a shared memfd (so a vfio-user
device process receives DMA_MAP file descriptors), a PCIe root port ``rp0``
that takes the optional ``vfio-user-pci`` device, two 9p shares (the checkout,
read-only, tag ``chimney``; a results directory, tag ``results``), the command
for the guest's /init in fw_cfg ``opt/chimney/run``, serial console to a file,
and a QMP socket.  QEMU and the guest come from :mod:`chimney.images`.

TCG by default: KVM is only used when asked for (``accel="kvm"``), as it must
first be proven to work on the host by a probe boot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

# Directory holding the ``chimney`` package (the checkout): shared read-only
# with the guest, which finds the package through PYTHONPATH=/chimney.
CHECKOUT = Path(__file__).resolve().parents[2]


def guest_share() -> Path:
    """What the guest mounts at /chimney: a directory holding the chimney package and
    nothing else.  From a checkout (or an editable install), the checkout; from an
    installed package, whose parent is site-packages, a copy of just the package in
    the cache, so that the guest never sees (or imports) the host's other packages."""
    if (CHECKOUT / "pyproject.toml").is_file():
        return CHECKOUT
    import hashlib
    import shutil

    from ..images._cache import cache_root
    pkg = CHECKOUT / "chimney"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.o")
    files = sorted(f for f in pkg.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                   and f.suffix not in (".so", ".o"))
    key = hashlib.sha256("".join(f"{f.relative_to(pkg)}:{f.stat().st_size}:{f.stat().st_mtime_ns}\n"
                                 for f in files).encode()).hexdigest()[:16]
    dest = cache_root() / "guest-share" / key         # one copy per package content, never rewritten
    if not (dest / "chimney").is_dir():
        tmp = dest.with_name(f"{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(pkg, tmp / "chimney", ignore=skip)
        try:
            tmp.rename(dest)
        except OSError:         # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest

SERIAL_LOG = "serial.log"
QEMU_LOG = "qemu.log"
QMP_SOCKET = "qmp.sock"
COMMAND_FILE = "command.sh"
RESULTS_DIR = "results"

_UNIX_PATH_MAX = 107


class GuestError(RuntimeError):
    """The guest did not produce a result.  ``serial_tail`` holds the end of
    its console log, ``workdir`` the run's directory (kept)."""

    def __init__(self, message: str, *, workdir: Path, serial_tail: str = "", qemu_output: str = ""):
        self.workdir = workdir
        self.serial_tail = serial_tail
        self.qemu_output = qemu_output
        text = message + f"\nworkdir: {workdir}"
        if qemu_output.strip():
            text += "\n--- qemu output ---\n" + qemu_output.rstrip()
        text += "\n--- serial console (tail) ---\n" + (serial_tail.rstrip() or "(empty)")
        super().__init__(text)


class GuestTimeout(GuestError):
    """The guest ran longer than the timeout (it was killed)."""


class GuestBootError(GuestError):
    """QEMU exited without the guest writing an exit status."""


class GuestResult(NamedTuple):
    rc: int
    stdout: bytes
    stderr: bytes


def _opt(path: os.PathLike | str) -> str:
    """A path as a QEMU option value (commas doubled)."""
    return os.fspath(path).replace(",", ",,")


@dataclass
class VmConfig:
    """Everything that varies between VMs; ``argv()`` gives the command line.

    ``workdir`` holds the run's files: ``serial.log``, ``qmp.sock`` and (by
    default) the ``results`` share.  ``command_file`` is the script the guest
    runs (None: the guest's /init starts a shell on the console instead).
    """

    workdir: Path
    command_file: Path | None = None
    vfio_user_socket: str | os.PathLike | None = None
    share: Path = field(default_factory=guest_share)
    results: Path | None = None          # default: workdir/results
    memory_mb: int = 1024
    smp: int = 1
    accel: str = "tcg"                   # "tcg" or "kvm"
    serial: str | None = None            # default: file:workdir/serial.log
    append: str = ""                     # extra kernel command line
    extra_args: Sequence[str] = field(default_factory=list)
    nic_id: str | None = None            # qdev id of the vfio-user-pci device (for device_del)
    agent_socket: str | os.PathLike | None = None  # virtio-serial port "chimney.agent" (chardev socket)
    vnet_tap: str | None = None          # virtio-net on this TAP (created by QEMU in its netns)
    vnet_mac: str = "52:54:00:c4:1e:02"

    def nic_device(self) -> dict:
        """The vfio-user-pci device as a JSON -device / QMP device_add argument."""
        dev = {"driver": "vfio-user-pci", "bus": "rp0",
               "socket": {"type": "unix", "path": os.fspath(self.vfio_user_socket)}}
        if self.nic_id:
            dev["id"] = self.nic_id
        return dev

    @property
    def serial_log(self) -> Path:
        return self.workdir / SERIAL_LOG

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / QMP_SOCKET

    @property
    def results_dir(self) -> Path:
        return self.results if self.results is not None else self.workdir / RESULTS_DIR

    def argv(self, runtime=None, image=None) -> list[str]:
        """The full QEMU argv (runtime and image built if needed)."""
        from chimney import images

        runtime = runtime or images.qemu_runtime()
        image = image or images.guest_image()
        if len(os.fspath(self.qmp_socket)) > _UNIX_PATH_MAX:
            raise ValueError(f"workdir path too long for a unix socket: {self.qmp_socket}")
        if self.accel == "tcg":
            accel = ["-accel", "tcg", "-cpu", "max"]
        elif self.accel == "kvm":
            # interrupt remapping of intel-iommu needs the split irqchip under KVM
            accel = ["-accel", "kvm,kernel-irqchip=split", "-cpu", "host"]
        else:
            raise ValueError(f"accel must be 'tcg' or 'kvm', not {self.accel!r}")
        mem = f"{self.memory_mb}M"
        argv = runtime.argv_prefix() + [
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "q35,memory-backend=mem",
            *accel,
            "-smp", str(self.smp),
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            # must come before the PCI devices it translates for
            "-device", "intel-iommu,caching-mode=on",
            "-kernel", _opt(image.kernel),
            "-initrd", _opt(image.initrd),
            "-append", f"{image.cmdline} {self.append}".strip(),
            "-serial", self.serial or f"file:{_opt(self.serial_log)}",
            "-qmp", f"unix:{_opt(self.qmp_socket)},server=on,wait=off",
            "-virtfs", f"local,path={_opt(self.share)},mount_tag=chimney,security_model=none,readonly=on",
            "-virtfs", f"local,path={_opt(self.results_dir)},mount_tag=results,security_model=none",
            "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1",
        ]
        if self.command_file is not None:
            argv += ["-fw_cfg", f"name=opt/chimney/run,file={_opt(self.command_file)}"]
        if self.vfio_user_socket is not None:
            # JSON form: the dotted socket.type=/socket.path= form is rejected.
            argv += ["-device", json.dumps(self.nic_device())]
        if self.agent_socket is not None:
            argv += ["-device", "virtio-serial-pci,id=vser0",
                     "-chardev", f"socket,id=agent,path={_opt(self.agent_socket)},server=on,wait=off",
                     "-device", "virtserialport,bus=vser0.0,chardev=agent,name=chimney.agent"]
        if self.vnet_tap is not None:
            argv += ["-netdev", f"tap,id=vnet,ifname={self.vnet_tap},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=vnet,id=vnet0,mac={self.vnet_mac}"]
        return argv + list(self.extra_args)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_in_guest(cmd: str, *, vfio_user_socket: str | os.PathLike | None = None,
                 workdir: str | os.PathLike | None = None, timeout: float = 180,
                 **config) -> GuestResult:
    """Boot a VM, run ``cmd`` with ``/bin/sh`` in it, return (rc, stdout, stderr).

    In the guest the command runs in /chimney (the checkout, read-only) with
    PYTHONPATH=/chimney and stdin from /dev/null; ``/results`` is writable and
    is ``<workdir>/results`` on the host.  ``workdir`` (default: a temporary
    directory, removed afterwards unless the run fails) also receives
    ``serial.log``, ``qemu.log`` and ``command.sh``.  Further keyword arguments
    go to :class:`VmConfig` (``memory_mb``, ``smp``, ``accel``, ``share``,
    ``append``, ``extra_args``...).

    Raises GuestTimeout (VM killed after ``timeout`` seconds) or GuestBootError
    (QEMU exited without an exit status from the guest), with the tail of the
    serial log.
    """
    from chimney import images

    runtime, image = images.qemu_runtime(), images.guest_image()
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="chimney-vm-") if own_dir else workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    vm = VmConfig(workdir=wd, command_file=wd / COMMAND_FILE, vfio_user_socket=vfio_user_socket, **config)
    results = vm.results_dir
    results.mkdir(parents=True, exist_ok=True)
    for name in ("stdout", "stderr", "rc"):
        (results / name).unlink(missing_ok=True)
    for p in (vm.serial_log, vm.qmp_socket):
        p.unlink(missing_ok=True)
    vm.command_file.write_text(cmd if cmd.endswith("\n") else cmd + "\n")
    argv = vm.argv(runtime, image)
    (wd / "qemu.argv").write_text(json.dumps(argv, indent=1) + "\n")

    with open(wd / QEMU_LOG, "wb") as qlog:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                env={**os.environ, **runtime.env()})
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise GuestTimeout(f"guest command did not finish within {timeout:g} s: {cmd!r}",
                           workdir=wd, serial_tail=_tail(vm.serial_log), qemu_output=_tail(wd / QEMU_LOG, 20))
    finally:
        _stop(proc)  # also on KeyboardInterrupt
    rc_file = results / "rc"
    if not rc_file.is_file():
        raise GuestBootError(f"QEMU exited (status {proc.returncode}) without a result from the guest",
                             workdir=wd, serial_tail=_tail(vm.serial_log), qemu_output=_tail(wd / QEMU_LOG, 20))
    result = GuestResult(int(rc_file.read_text().strip()), (results / "stdout").read_bytes(),
                         (results / "stderr").read_bytes())
    if own_dir:
        shutil.rmtree(wd, ignore_errors=True)
    return result
