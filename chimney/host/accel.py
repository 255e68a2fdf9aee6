"""Which accelerator to use: TCG, or KVM where a probe boot proves it works."""
from __future__ import annotations

import json
import os
import shutil

from chimney.host.qemu import GuestError


def probe_kvm(*, force: bool = False) -> bool:
    """True when a KVM guest boots and runs a command here (cached per host
    kernel, QEMU runtime and guest image)."""
    return kvm_probe(force=force)["ok"]


def kvm_probe(*, force: bool = False) -> dict:
    """The KVM probe's finding: ``ok``, ``found`` (one line saying what it
    found), ``cache`` (the file its result is kept in), ``cached``."""
    from chimney import images
    from chimney.host.qemu import run_in_guest
    from chimney.images._cache import cache_root

    cache = cache_root() / "kvm-probe.json"
    if not os.path.exists("/dev/kvm"):
        return {"ok": False, "found": "no /dev/kvm", "cache": None, "cached": False}
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return {"ok": False, "found": "/dev/kvm is not read-writable by us", "cache": None, "cached": False}
    rt, img = images.qemu_runtime(quiet=True), images.guest_image(quiet=True)
    key = f"{os.uname().release} {rt.root} {img.kernel}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    cached = not force and key in known
    if cached:
        ok = bool(known[key])
    else:
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
    found = "a KVM probe boot worked" if ok else "/dev/kvm is there but a KVM probe boot failed"
    return {"ok": ok, "found": found, "cache": os.fspath(cache), "cached": cached}


def resolve_accel(accel: str | None, report=None) -> str:
    """"tcg", "kvm", or "auto" (KVM if a probe boot proves it works);
    default: $CHIMNEY_ACCEL or "tcg".  ``report(line)`` hears what the
    probe found and where its result is cached."""
    accel = accel or os.environ.get("CHIMNEY_ACCEL", "tcg")
    if accel == "auto":
        probe = kvm_probe()
        use = "kvm" if probe["ok"] else "tcg"
        if report is not None:
            where = ""
            if probe["cache"]:
                where = f"; {'cached result from' if probe['cached'] else 'result cached in'} {probe['cache']}"
            report(f"KVM probe: {probe['found']}{where}: using {use.upper()}")
        return use
    if accel not in ("tcg", "kvm"):
        raise ValueError(f"accel must be tcg, kvm or auto, not {accel!r}")
    return accel
