"""Recipe: the guest's userland (trixie minbase + Python 3.13) and kernel package.

The kernel package is downloaded (not installed: installing would pull
initramfs-tools) in mmdebstrap's customize hook, against the same package
lists as the userland, and unpacked with ``dpkg -x``.  The whole module tree is
kept here, with ``modules.dep``; the initramfs stage (``_guest.py``) picks the
modules it needs from it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ._cache import BuildError, Builder, Stage, debian_mirror, mmdebstrap_common, read_list, require_tools, root_exec

SUITE = "trixie"
KERNEL_META = "linux-image-amd64"
KERNEL_SERIES = "6.12."

# Finds the versioned kernel package the meta package depends on and downloads it.
_DOWNLOAD_KERNEL = r"""
set -e
cd {debdir}
export APT_CONFIG="$MMDEBSTRAP_APT_CONFIG"
pkg=$(apt-cache depends {meta} | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
test -n "$pkg" || {{ echo "no versioned dependency of {meta}" >&2; exit 1; }}
echo "kernel package: $pkg"
apt-get download "$pkg"
"""


def _build(tmp: Path, b: Builder) -> dict:
    require_tools("mmdebstrap", "dpkg")
    mirror = debian_mirror()
    root = tmp / "root"
    debdir = tmp / "deb"
    debdir.mkdir()
    packages = read_list("guest-packages.txt")
    hook = _DOWNLOAD_KERNEL.format(debdir=shlex.quote(str(debdir)), meta=KERNEL_META)
    with b.step(f"mmdebstrap {SUITE} minbase: {', '.join(packages)} (+ kernel .deb)"):
        b.run(mmdebstrap_common() + [
            "--variant=minbase",
            "--include=" + ",".join(packages),
            # no translations in the guest (keep locale.alias, which glibc reads)
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            "--customize-hook=" + hook,
            SUITE, root, f"deb {mirror} {SUITE} main",
        ])
    debs = sorted(debdir.glob("linux-image-*.deb"))
    if len(debs) != 1:
        raise BuildError(f"expected one kernel .deb, found {[d.name for d in debs]}")
    deb = debs[0]
    kernel = tmp / "kernel"
    with b.step(f"unpack {deb.name}"):
        b.run(["dpkg-deb", "-x", deb, kernel])
        vmlinuz = sorted((kernel / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise BuildError(f"no single vmlinuz in {deb.name}: {vmlinuz}")
        kver = vmlinuz[0].name.removeprefix("vmlinuz-")
        if not kver.startswith(KERNEL_SERIES):
            raise BuildError(f"kernel {kver} is not {KERNEL_SERIES}x")
        if not (kernel / "lib").exists():
            os.symlink("usr/lib", kernel / "lib")  # merged /usr, as in the root
        if not (kernel / "lib/modules" / kver).is_dir():
            raise BuildError(f"no modules for {kver} in {deb.name}")
        deb.unlink()
        debdir.rmdir()
    with b.step(f"depmod {kver}"):
        b.run(root_exec(root, "usr/sbin/depmod") + ["-b", kernel, kver])
    py = b.capture(root_exec(root, "usr/bin/python3") + ["-c", "import sys; print(sys.version.split()[0])"],
                   env={"PYTHONHOME": str(root / "usr")}).stdout.strip()
    return {"kernel_version": kver, "kernel_package": deb.name, "python_version": py,
            "packages": packages}


STAGE = Stage(
    name="guest-root",
    inputs=("_guestroot.py", "guest-packages.txt"),
    build=_build,
    summary=lambda m: f"kernel {m.get('kernel_version', '?')}, Python {m.get('python_version', '?')}",
)
