"""Recipe: the guest kernel and initramfs booted by chimney.host.qemu.

From the ``guest-root`` stage: the kernel as an ELF ``vmlinux`` (QEMU boots it
through PVH, skipping the bzImage decompressor, which is slow under TCG), and
an initramfs made of the whole userland, the modules listed in
``guest-modules.txt`` with their dependencies, and ``guest-init.sh`` as /init,
packed as one newc cpio, uncompressed.

Why uncompressed (initramfs and modules): under TCG the guest kernel spends
seconds decompressing.  Measured for this ~105 MB initramfs (1 vCPU, QEMU
start to the command running, busy 2-core host): uncompressed 7.8-8.9 s, lz4
8.2-9.5 s, zstd 9.6-12 s (+1.5-2 s), gzip +5 s.  The cost of no compression
is disk space in the cache (105 MB instead of 31 MB with zstd) and no tool
is needed.  Debian ships modules xz-compressed; they are stored as plain .ko.
See INITRD_COMPRESSION to change it.
"""

from __future__ import annotations

import os
import shutil
import lzma
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import _guestroot
from ._cache import BuildError, Builder, Stage, read_list, require_tools, root_exec

# Kernel options the image relies on that are built in, not modules.
REQUIRED_CONFIG = {
    "CONFIG_PVH": "y",             # ELF vmlinux boot
    "CONFIG_DEVTMPFS": "y",
    "CONFIG_TMPFS": "y",
    "CONFIG_HUGETLBFS": "y",
    "CONFIG_VIRTIO_PCI": "y",
    "CONFIG_SERIAL_8250_CONSOLE": "y",
    "CONFIG_INTEL_IOMMU": "y",     # -device intel-iommu + intel_iommu=on
    "CONFIG_IRQ_REMAP": "y",
    "CONFIG_MAGIC_SYSRQ": "y",     # /init powers off through /proc/sysrq-trigger
}

# Kernel command line.  panic=-1: a panic (e.g. /init dying) reboots at once,
# which QEMU's -no-reboot turns into an exit.  Under TCG: cryptomgr.notests
# skips the crypto self-tests (~1.5 s of boot), mitigations=off the
# retpolines etc. (10-20 % off syscall-heavy guest code); this is a test VM.
# Compression of the initramfs: None, or one of COMPRESSORS (the kernel must
# have the matching CONFIG_RD_*).
INITRD_COMPRESSION: str | None = None
COMPRESSORS = {  # name: (kernel option, filter command, file suffix)
    "lz4": ("CONFIG_RD_LZ4", "lz4 -l -9 -q", ".lz4"),  # -l: the legacy frame format the kernel reads
    "zstd": ("CONFIG_RD_ZSTD", "zstd -q -T0 -9", ".zst"),
    "gzip": ("CONFIG_RD_GZIP", "gzip -6", ".gz"),
}

CMDLINE = "console=ttyS0 intel_iommu=on panic=-1 quiet cryptomgr.notests mitigations=off"



@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: ``-kernel kernel -initrd initrd -append cmdline``."""

    kernel: Path           # ELF vmlinux (PVH), or the bzImage if PVH was not available
    initrd: Path           # newc cpio (see INITRD_COMPRESSION)
    cmdline: str
    kernel_version: str
    python_version: str
    vmlinuz: Path          # the original bzImage


def _config(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("CONFIG_"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def _extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Decompress the ELF kernel from a bzImage (boot protocol >= 2.08,
    zstd payload) and check it has a PVH entry point (Xen ELF note 18)."""
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        raise BuildError(f"{bzimage.name}: not a bzImage with boot protocol >= 2.08")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    if payload[:4] != b"\x28\xb5\x2f\xfd":
        raise BuildError(f"{bzimage.name}: payload is not zstd (magic {payload[:4].hex()})")
    # The kernel build appends the decompressed size (le32) after the zstd frame.
    expected = struct.unpack("<I", payload[-4:])[0]
    with open(out, "wb") as f:
        subprocess.run(["zstd", "-q", "-d", "-c"], input=payload[:-4], stdout=f, check=True)
    elf = out.read_bytes()
    if len(elf) != expected or elf[:4] != b"\x7fELF":
        raise BuildError(f"{bzimage.name}: extracted kernel is not the expected ELF")
    if not _has_pvh_note(elf):
        raise BuildError(f"{bzimage.name}: vmlinux has no PVH entry note")


def _has_pvh_note(elf: bytes) -> bool:
    # ELF64 little endian: walk PT_NOTE program headers for ("Xen", type 18).
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _module_closure(b: Builder, root: Path, kernel: Path, kver: str, names: list[str]) -> list[str]:
    """Module files (relative to lib/modules/<kver>) needed to load ``names``."""
    modprobe = root_exec(root, "usr/sbin/modprobe")
    moddir = f"/lib/modules/{kver}/"
    files: list[str] = []
    for name in names:
        p = b.capture(modprobe + ["-d", kernel, "-S", kver, "--show-depends", name], check=False)
        if p.returncode != 0:
            raise BuildError(f"guest-modules.txt: module {name!r} not found in {kver}:\n{p.stderr}")
        for line in p.stdout.splitlines():
            words = line.split()
            if words and words[0] == "insmod":
                rel = words[1].removeprefix(os.fspath(kernel)).removeprefix(moddir)
                if rel not in files:
                    files.append(rel)
    return files


def _build(tmp: Path, b: Builder) -> dict:
    require_tools("cpio", "zstd", "bash", "find", "sort")  # zstd: the kernel's payload
    src = _guestroot.STAGE.path
    rootm = _guestroot.STAGE.manifest()
    kver = rootm["kernel_version"]
    kernel = src / "kernel"
    config = _config(kernel / f"boot/config-{kver}")
    bad = {k: config.get(k, "not set") for k, v in REQUIRED_CONFIG.items() if config.get(k) != v}
    if bad:
        raise BuildError(f"kernel {kver} lacks required built-in options: {bad}")

    with b.step(f"kernel {kver}: extract vmlinux for PVH boot"):
        shutil.copyfile(kernel / f"boot/vmlinuz-{kver}", tmp / "vmlinuz")
        _extract_vmlinux(tmp / "vmlinuz", tmp / "vmlinux")

    staging = tmp / "staging"
    with b.step("assemble initramfs tree (userland, modules, /init)"):
        b.run(["cp", "-a", src / "root", staging])
        names = read_list("guest-modules.txt")
        files = _module_closure(b, src / "root", kernel, kver, names)
        srcmods = kernel / "lib/modules" / kver
        dstmods = staging / "usr/lib/modules" / kver
        for rel in files:
            dst = dstmods / rel.removesuffix(".xz")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".xz"):  # store decompressed: faster to load under TCG
                dst.write_bytes(lzma.decompress((srcmods / rel).read_bytes()))
            else:
                shutil.copy2(srcmods / rel, dst)
        for rel in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            shutil.copy2(srcmods / rel, dstmods / rel)
        b.run(root_exec(staging, "usr/sbin/depmod") + ["-b", staging, kver])
        shutil.copy2(Path(__file__).with_name("guest-init.sh"), staging / "init")
        os.chmod(staging / "init", 0o755)
        (staging / "etc/chimney").mkdir(exist_ok=True)
        (staging / "etc/chimney/modules").write_text("\n".join(names) + "\n")
        (staging / "etc/hostname").write_text("chimney-guest\n")
        for d in ("chimney", "results"):
            (staging / d).mkdir(exist_ok=True)
        removed = 0
        for pattern in read_list("guest-exclude.txt"):
            for p in staging.glob(pattern):
                removed += 1
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        b.log(f"excluded {removed} paths (guest-exclude.txt)")

    initrd = "initrd.cpio"
    pipeline = 'cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0'
    if INITRD_COMPRESSION:
        option, command, suffix = COMPRESSORS[INITRD_COMPRESSION]
        if config.get(option) != "y":
            raise BuildError(f"kernel {kver} cannot unpack a {INITRD_COMPRESSION} initramfs ({option})")
        require_tools(command.split()[0])
        initrd += suffix
        pipeline += f" | {command}"
    with b.step(f"pack initramfs: newc cpio{' | ' + INITRD_COMPRESSION if INITRD_COMPRESSION else ''}"):
        tree_bytes = int(b.capture(["du", "-sb", "--apparent-size", staging]).stdout.split()[0])
        b.run(["bash", "-o", "pipefail", "-c", pipeline + ' > "$2"', "pack", staging, tmp / initrd])
        shutil.rmtree(staging)
    return {
        "kernel_version": kver, "python_version": rootm["python_version"],
        "kernel": "vmlinux", "initrd": initrd, "cmdline": CMDLINE,
        "modules": names, "module_files": len(files), "initramfs_tree_bytes": tree_bytes,
        "initrd_bytes": (tmp / initrd).stat().st_size,
        "vmlinux_bytes": (tmp / "vmlinux").stat().st_size,
    }


STAGE = Stage(
    name="guest",
    inputs=("_guest.py", "guest-init.sh", "guest-modules.txt", "guest-exclude.txt"),
    deps=(_guestroot.STAGE,),
    build=_build,
    summary=lambda m: f"kernel {m.get('kernel_version', '?')}, initrd {m.get('initrd_bytes', 0) / 2**20:.0f} MiB",
)


def load(*, build: bool = True, force: bool = False, quiet: bool = False) -> GuestImage:
    path = STAGE.get(build=build, force=force, quiet=quiet)
    m = STAGE.manifest()
    return GuestImage(kernel=path / m["kernel"], initrd=path / m["initrd"], cmdline=m["cmdline"],
                      kernel_version=m["kernel_version"], python_version=m["python_version"],
                      vmlinuz=path / "vmlinuz")
