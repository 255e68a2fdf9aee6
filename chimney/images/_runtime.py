"""Recipe: a private Debian trixie root holding QEMU 11 from trixie-backports.

Debian 12's own QEMU (7.2) has no vfio-user client, and backports' QEMU needs
a newer glibc than the host's, so QEMU runs out of this root through the root's
own dynamic loader (no chroot, no installation on the host).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._cache import BuildError, Builder, Stage, debian_mirror, mmdebstrap_common, read_list, require_tools, root_exec

SUITE = "trixie"
BACKPORTS = "trixie-backports"
REQUIRED_MAJOR = 11

# Pin by codename (n=).  The backports Release file says
# "Suite: stable-backports, Codename: trixie-backports", so a pin by
# archive/suite (a=trixie-backports) silently matches nothing.
BACKPORTS_PIN = f"""\
Package: qemu* seabios ipxe-qemu
Pin: release n={BACKPORTS}
Pin-Priority: 990
"""

# Firmware / data directories QEMU is pointed at with -L.
DATA_DIRS = ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")


@dataclass(frozen=True)
class QemuRuntime:
    """QEMU from the cached trixie root, runnable on the host."""

    root: Path
    version: str

    def tool_argv(self, program: str = "qemu-system-x86_64") -> list[str]:
        """argv prefix running ``/usr/bin/<program>`` of the root (e.g. qemu-img)."""
        return root_exec(self.root, f"usr/bin/{program}")

    def argv_prefix(self) -> list[str]:
        """Loader, --library-path, qemu-system-x86_64 and its -L data dirs;
        append machine options to it."""
        argv = self.tool_argv("qemu-system-x86_64")
        for d in DATA_DIRS:
            argv += ["-L", os.fspath(self.root / d)]
        return argv

    def env(self) -> dict[str, str]:
        """Environment additions for running QEMU (merge into os.environ)."""
        return {"QEMU_MODULE_DIR": os.fspath(self.root / "usr/lib/x86_64-linux-gnu/qemu")}


def _check(rt: QemuRuntime) -> str:
    """Verify the runtime: QEMU 11.x with vfio-user-pci and 9p.  Returns the version."""
    env = {**os.environ, **rt.env()}

    def q(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(rt.argv_prefix() + list(args), capture_output=True, text=True,
                              env=env, stdin=subprocess.DEVNULL, timeout=60)

    p = q("--version")
    m = re.search(r"QEMU emulator version (\S+)", p.stdout)
    if p.returncode != 0 or not m:
        raise BuildError(f"qemu-system-x86_64 --version failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
    version = m.group(1)
    if not version.startswith(f"{REQUIRED_MAJOR}."):
        raise BuildError(
            f"QEMU in the runtime root is {version}, expected {REQUIRED_MAJOR}.x from {BACKPORTS} "
            f"(is the apt pin effective?):\n{p.stdout}")
    for dev, prop in (("vfio-user-pci", "socket"), ("virtio-9p-pci", "mount_tag"), ("intel-iommu", "caching-mode")):
        p = q("-device", f"{dev},help")
        if p.returncode != 0 or prop not in p.stdout:
            raise BuildError(f"QEMU {version}: -device {dev},help failed (exit {p.returncode}):\n{p.stdout}{p.stderr}")
    return version


def _build(tmp: Path, b: Builder) -> dict:
    require_tools("mmdebstrap")
    mirror = debian_mirror()
    root = tmp / "root"
    pin = tmp / "backports.pref"
    pin.write_text(BACKPORTS_PIN)
    packages = read_list("qemu-packages.txt")
    with b.step(f"mmdebstrap {SUITE}+{BACKPORTS}: {', '.join(packages)}"):
        b.run(mmdebstrap_common() + [
            "--variant=apt",
            "--include=" + ",".join(packages),
            "--setup-hook=mkdir -p \"$1/etc/apt/preferences.d\" && "
            f"cp {shlex.quote(str(pin))} \"$1/etc/apt/preferences.d/chimney-backports.pref\"",
            SUITE, root,
            f"deb {mirror} {SUITE} main",
            f"deb {mirror} {BACKPORTS} main",
        ])
    with b.step("verify qemu-system-x86_64 (version 11, vfio-user-pci)"):
        version = _check(QemuRuntime(root, ""))
        b.log(f"QEMU {version}")
        pkgs = b.capture(["dpkg-query", "--admindir", root / "var/lib/dpkg", "-W",
                          "-f", "${Package} ${Version}\n", "qemu-system-x86", "seabios", "ipxe-qemu"],
                         check=False).stdout
    return {"qemu_version": version, "packages": pkgs.split("\n")[:-1], "suite": f"{SUITE}+{BACKPORTS}"}


STAGE = Stage(
    name="qemu-runtime",
    inputs=("_runtime.py", "qemu-packages.txt"),
    build=_build,
    summary=lambda m: f"QEMU {m.get('qemu_version', '?')}",
)


def load(*, build: bool = True, force: bool = False, quiet: bool = False) -> QemuRuntime:
    path = STAGE.get(build=build, force=force, quiet=quiet)
    return QemuRuntime(path / "root", STAGE.manifest()["qemu_version"])
