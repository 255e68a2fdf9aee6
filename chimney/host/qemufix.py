"""A copy of QEMU whose vfio-user-pci survives hot-unplug.

QEMU 11.1.3 (trixie-backports) aborts when a ``vfio-user-pci`` device with
MSI-X is unplugged (device_del)::

    system/memory.c:2617: memory_region_del_subregion:
        Assertion `subregion->container == mr' failed.

``vfio_user_instance_finalize()`` calls ``vfio_user_msix_teardown()``, which
removes the PBA memory region from its BAR container; but by then
``object_finalize()`` has already dropped the device's child memory regions
(``object_property_del_all()``), which detached the PBA region.  Upstream
patch: Akihiko Odaki, "vfio-user: Do not delete the subregion", qemu-devel,
2025-10-10 -- it deletes exactly that ``memory_region_del_subregion()`` call.

We do the same to the binary: find vfio-user-pci's ``instance_finalize``
through its TypeInfo (the relocated pointers next to the "vfio-user-pci"
name), find the one ``call memory_region_del_subregion`` near its start, and
replace it with a 5-byte NOP, in a copy kept next to the cache.  The copy is
keyed by the original's sha256; if the code is not as expected (another QEMU
build), nothing is patched and :func:`patched_qemu` returns None.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

NOP5 = bytes.fromhex("0f1f440000")
R_X86_64_RELATIVE = 8
SCAN = 0x100  # bytes of instance_finalize searched for the call


class _Elf:
    def __init__(self, data: bytes):
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError("not a little-endian ELF64 file")
        self.data = data
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names_off = raw[shstrndx][4]
        self.sections = {}
        for name, typ, flags, addr, off, size, link, info, align, entsize in raw:
            end = data.index(b"\0", names_off + name)
            self.sections[data[names_off + name:end].decode()] = (typ, addr, off, size, link, entsize)
        self._raw = raw

    def section(self, name: str):
        return self.sections[name]

    def off_to_va(self, off: int) -> int | None:
        for typ, addr, soff, size, *_ in self.sections.values():
            if addr and typ != 8 and soff <= off < soff + size:
                return addr + off - soff
        return None

    def va_to_off(self, va: int) -> int | None:
        for typ, addr, soff, size, *_ in self.sections.values():
            if addr and typ != 8 and addr <= va < addr + size:
                return soff + va - addr
        return None

    def dynsym(self, name: str) -> int | None:
        _, _, off, size, link, entsize = self.section(".dynsym")
        stroff = self._raw[link][4]
        want = name.encode()
        for i in range(size // entsize):
            st_name, _info, _other, _shndx, value, _size = struct.unpack_from("<IBBHQQ", self.data, off + i * entsize)
            if st_name and value and self.data[stroff + st_name:stroff + st_name + len(want) + 1] == want + b"\0":
                return value
        return None

    def relative_relocs(self) -> dict[int, int]:
        _, _, off, size, _, _ = self.section(".rela.dyn")
        out = {}
        for r_off, r_info, r_add in struct.iter_unpack("<QQq", self.data[off:off + size]):
            if r_info & 0xFFFFFFFF == R_X86_64_RELATIVE:
                out[r_off] = r_add
        return out


def find_patch_offset(data: bytes) -> int:
    """File offset of the ``call memory_region_del_subregion`` in
    vfio-user-pci's instance_finalize; ValueError if not exactly one."""
    elf = _Elf(data)
    target = elf.dynsym("memory_region_del_subregion")
    if target is None:
        raise ValueError("no dynamic symbol memory_region_del_subregion")
    _, _, ro_off, ro_size, _, _ = elf.section(".rodata")
    i = data.find(b"\0vfio-user-pci\0", ro_off, ro_off + ro_size)
    if i < 0:
        raise ValueError('no "vfio-user-pci" string')
    name_va = elf.off_to_va(i + 1)
    relocs = elf.relative_relocs()
    # TypeInfo: name, parent, instance_size, instance_align, instance_init,
    # instance_post_init, instance_finalize, ...
    infos = [va for va, add in relocs.items() if add == name_va and relocs.get(va + 8) and relocs.get(va + 48)]
    if len(infos) != 1:
        raise ValueError(f"{len(infos)} TypeInfo candidates for vfio-user-pci")
    fin = relocs[infos[0] + 48]
    fin_off = elf.va_to_off(fin)
    hits = []
    for k in range(fin_off, fin_off + SCAN - 5):
        if data[k] == 0xE8:
            rel, = struct.unpack_from("<i", data, k + 1)
            if fin + (k - fin_off) + 5 + rel == target:
                hits.append(k)
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} calls to memory_region_del_subregion in instance_finalize")
    return hits[0]


def patched_qemu(original: str | os.PathLike, cache_dir: str | os.PathLike) -> Path | None:
    """Path of the patched copy of ``original`` (made once, under
    ``cache_dir``), or None if the binary does not have the expected code."""
    original = Path(original)
    data = original.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    out = Path(cache_dir) / f"qemu-vfio-user-unplug-fix-{digest}" / original.name
    if out.is_file():
        return out
    try:
        off = find_patch_offset(data)
    except (ValueError, KeyError, struct.error):
        return None
    patched = bytearray(data)
    patched[off:off + 5] = NOP5
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(patched)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    (out.parent / "README").write_text(
        f"{original} with one call NOP'd at file offset {off:#x} (see chimney/host/qemufix.py)\n")
    return out
