"""Cached build products for running chimney's VMs: QEMU 11 and the guest.

Built once with mmdebstrap from the Debian mirror of the host's apt
configuration (or ``$CHIMNEY_DEBIAN_MIRROR``) and kept under
``~/.cache/chimney`` (``$CHIMNEY_CACHE``), in directories named by a hash of
their recipe files, so a changed recipe is rebuilt and an unchanged one is not.

    rt = qemu_runtime()      # QEMU from trixie-backports, run via its root's ld.so
    subprocess.run(rt.argv_prefix() + [...], env={**os.environ, **rt.env()})
    img = guest_image()      # img.kernel, img.initrd, img.cmdline

CLI: ``python -m chimney.images build [--force]`` and ``status``.
Building needs root (mmdebstrap), cpio and zstd on the host.
"""

from __future__ import annotations

from ._cache import BuildError, cache_root, debian_mirror
from ._guest import GuestImage
from ._runtime import QemuRuntime

__all__ = ["QemuRuntime", "GuestImage", "BuildError", "qemu_runtime", "guest_image", "build_all",
           "stages", "cache_root", "debian_mirror"]


def qemu_runtime(*, build: bool = True, force: bool = False, quiet: bool = False) -> QemuRuntime:
    """The QEMU runtime, built first if missing (or if ``force``).
    ``build=False`` raises FileNotFoundError instead of building."""
    from . import _runtime

    return _runtime.load(build=build, force=force, quiet=quiet)


def guest_image(*, build: bool = True, force: bool = False, quiet: bool = False) -> GuestImage:
    """The guest kernel and initramfs, built first if missing (or if ``force``;
    forcing rebuilds only the initramfs stage, not the userland it packs)."""
    from . import _guest

    return _guest.load(build=build, force=force, quiet=quiet)


def stages():
    """All cache stages, in build order."""
    from . import _guest, _guestroot, _runtime

    return [_runtime.STAGE, _guestroot.STAGE, _guest.STAGE]


def build_all(*, force: bool = False, quiet: bool = False) -> tuple[QemuRuntime, GuestImage]:
    """Build (or find cached) everything; ``force`` rebuilds every stage."""
    if force:
        for stage in stages():
            stage.ensure(force=True, quiet=quiet)
    return qemu_runtime(quiet=quiet), guest_image(quiet=quiet)
