"""Which accelerator to use: TCG, or KVM where a probe boot proves it works."""
from __future__ import annotations

import json
import os
import shutil

from chimney.host.qemu import GuestError


def probe_kvm(*, force: bool = False) -> bool:
    """True when a KVM guest boots and runs a command here (cached per host
    kernel, QEMU runtime and guest image)."""
    from chimney import images
    from chimney.host.qemu import run_in_guest
    from chimney.images._cache import cache_root

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    rt, img = images.qemu_runtime(quiet=True), images.guest_image(quiet=True)
    key = f"{os.uname().release} {rt.root} {img.kernel}"
    cache = cache_root() / "kvm-probe.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not force and key in known:
        return bool(known[key])
    try:
        ok = run_in_guest("true", accel="kvm", timeout=30).rc == 0
    except GuestError as e:
        ok = False
        shutil.rmtree(e.workdir, ignore_errors=True)
    known[key] = ok
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1) + "\n")
    except OSError:
        pass
    return ok


def resolve_accel(accel: str | None) -> str:
    """"tcg", "kvm", or "auto" (KVM if a probe boot proves it works);
    default: $CHIMNEY_ACCEL or "tcg"."""
    accel = accel or os.environ.get("CHIMNEY_ACCEL", "tcg")
    if accel == "auto":
        return "kvm" if probe_kvm() else "tcg"
    if accel not in ("tcg", "kvm"):
        raise ValueError(f"accel must be tcg, kvm or auto, not {accel!r}")
    return accel
