"""The cached QEMU runtime and guest image, and chimney.host.qemu.run_in_guest.

The VM tests use the image cache (~/.cache/chimney or $CHIMNEY_CACHE) and
build it first if it is missing: ~1.5 min once (root, mmdebstrap, network
access to the Debian mirror of the host's apt config), then each boot takes
~10 s under TCG.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chimney import images
from chimney.host import qemu
from chimney.images import _cache

BOOT_TIMEOUT = 300  # generous: TCG on a busy 2-core machine


# ---------------------------------------------------------------------------
# no VM


def _apt_etc(tmp_path: Path, sources: str | None = None, sources_list: str | None = None) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    if sources is not None:
        (etc / "sources.list.d" / "debian.sources").write_text(sources)
    if sources_list is not None:
        (etc / "sources.list").write_text(sources_list)
    return etc


def test_mirror_from_deb822(tmp_path, monkeypatch):
    monkeypatch.delenv("CHIMNEY_DEBIAN_MIRROR", raising=False)
    etc = _apt_etc(tmp_path, sources=(
        "Types: deb\n# a comment\nURIs: http://security.invalid/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb deb-src\nURIs: http://apt.invalid/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"))
    assert _cache.debian_mirror(etc) == "http://apt.invalid/debian"


def test_mirror_from_sources_list_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("CHIMNEY_DEBIAN_MIRROR", raising=False)
    etc = _apt_etc(tmp_path, sources_list=(
        "# deb http://commented.invalid/debian bookworm main\n"
        "deb-src http://src.invalid/debian bookworm main\n"
        "deb http://apt.invalid/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://apt.invalid/debian bookworm main\n"))
    assert _cache.debian_mirror(etc) == "http://apt.invalid/debian"
    monkeypatch.setenv("CHIMNEY_DEBIAN_MIRROR", "file:///srv/mirror/debian/")
    assert _cache.debian_mirror(etc) == "file:///srv/mirror/debian"


def test_mirror_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("CHIMNEY_DEBIAN_MIRROR", raising=False)
    with pytest.raises(images.BuildError, match="CHIMNEY_DEBIAN_MIRROR"):
        _cache.debian_mirror(_apt_etc(tmp_path))


def test_stage_key_follows_recipe_inputs(monkeypatch, tmp_path):
    monkeypatch.setenv("CHIMNEY_CACHE", str(tmp_path))
    runtime, root, guest = images.stages()
    assert guest.deps == (root,)
    assert runtime.path.parent == tmp_path and runtime.path.name == f"qemu-runtime-{runtime.key()}"
    assert len({runtime.key(), root.key(), guest.key()}) == 3
    # a guest stage on a different userland gets a different key
    other = _cache.Stage(name="guest", inputs=guest.inputs, build=guest.build, deps=(runtime,))
    assert other.key() != guest.key()


def test_qemu_argv(tmp_path):
    rt = images.QemuRuntime(root=Path("/rt"), version="11.1.3")
    img = images.GuestImage(kernel=Path("/g/vmlinux"), initrd=Path("/g/initrd"), cmdline="console=ttyS0",
                            kernel_version="6.12.0", python_version="3.13.0", vmlinuz=Path("/g/vmlinuz"))
    vm = qemu.VmConfig(workdir=tmp_path, command_file=tmp_path / "cmd,1.sh", vfio_user_socket="/run/nic.sock")
    argv = vm.argv(rt, img)
    assert argv[:4] == ["/rt/lib64/ld-linux-x86-64.so.2", "--library-path",
                        "/rt/usr/lib/x86_64-linux-gnu:/rt/lib/x86_64-linux-gnu", "/rt/usr/bin/qemu-system-x86_64"]
    assert "-L" in argv and "-no-reboot" in argv
    joined = " ".join(argv)
    assert "-accel tcg -cpu max" in joined
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in joined
    assert f"name=opt/chimney/run,file={tmp_path}/cmd,,1.sh" in joined  # commas escaped
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "intel-iommu,caching-mode=on"
    assert json.loads(devices[-1]) == {"driver": "vfio-user-pci", "bus": "rp0",
                                       "socket": {"type": "unix", "path": "/run/nic.sock"}}
    assert any(d.startswith("pcie-root-port,id=rp0") for d in devices)
    assert "vfio-user-pci" not in " ".join(qemu.VmConfig(workdir=tmp_path).argv(rt, img))


# ---------------------------------------------------------------------------
# VM


@pytest.fixture(scope="module")
def built():
    """Runtime and guest image, from the cache (built now if missing)."""
    if not (all(s.is_built() for s in images.stages()) or shutil.which("mmdebstrap")):
        pytest.skip("image cache not built and mmdebstrap not installed")
    return images.build_all()


@pytest.mark.vm
def test_runtime_is_qemu_11(built):
    rt, _ = built
    assert rt.version.startswith("11.")


@pytest.mark.vm
def test_guest_kernel_python_and_checkout(built, tmp_path):
    rc, out, err = qemu.run_in_guest(
        "uname -r; python3 --version; python3 -c 'import chimney.host; print(chimney.host.__file__)'; "
        "cat /proc/cmdline",
        workdir=tmp_path, timeout=BOOT_TIMEOUT)
    assert (rc, err) == (0, b"")
    kernel, python, module, cmdline = out.decode().splitlines()
    assert kernel.startswith("6.12")
    assert python.startswith("Python 3.13")
    assert module == "/chimney/chimney/host/__init__.py"  # guest code comes from this checkout
    assert "intel_iommu=on" in cmdline.split() and "console=ttyS0" in cmdline.split()


@pytest.mark.vm
def test_guest_exit_status(built, tmp_path):
    rc, out, err = qemu.run_in_guest("false", workdir=tmp_path, timeout=BOOT_TIMEOUT)
    assert rc != 0
    assert (out, err) == (b"", b"")


@pytest.mark.vm
def test_guest_binary_output(built, tmp_path):
    rc, out, err = qemu.run_in_guest(
        "head -c 4096 /dev/urandom | tee /results/x; printf 'err\\000\\377' >&2; exit 7",
        workdir=tmp_path, timeout=BOOT_TIMEOUT)
    assert rc == 7
    assert len(out) == 4096
    assert out == (tmp_path / "results" / "x").read_bytes()
    assert err == b"err\x00\xff"


@pytest.mark.vm
def test_guest_timeout_reports_serial_log(built, tmp_path):
    with pytest.raises(qemu.GuestTimeout) as e:
        qemu.run_in_guest("sleep 600", workdir=tmp_path, timeout=40)
    assert "chimney-init: running command" in e.value.serial_tail
    assert "chimney-init: running command" in str(e.value)
    assert e.value.workdir == tmp_path.resolve()
    assert not (tmp_path / "results" / "rc").exists()
