"""Guest memory as the device sees it: the DMA mappings QEMU gives us.

Each DMA_MAP brings an fd (guest RAM, a memfd) that we mmap; the C fast path
gets a sorted table of (iova, len, host pointer) and checks every access
against it.  A map without an fd (ROM) is recorded but never touched.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
from dataclasses import dataclass

from ._fastpath import ffi, lib

log = logging.getLogger("chimney.device.dma")

PAGE = 4096
TOP = 1 << 64


class DmaError(Exception):
    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


@dataclass
class Mapping:
    iova: int
    size: int
    writable: bool
    readable: bool
    mm: mmap.mmap | None
    ptr: object = None          # cffi buffer over mm (released before mm closes)

    @property
    def end(self) -> int:
        return self.iova + self.size


class DmaTable:
    def __init__(self, max_maps: int = 65535):
        # A client that shrinks guest RAM under us must cost a DMA error, not the process.
        if lib.fp_install_guard():
            raise OSError("cannot install the SIGBUS guard")
        self.max_maps = max_maps
        self.maps: list[Mapping] = []      # sorted by iova, disjoint
        self.ctable = ffi.new("struct dma_table *")
        self._carray = None

    # -- changes -----------------------------------------------------------
    def map(self, iova: int, size: int, offset: int, readable: bool, writable: bool,
            fd: int | None) -> None:
        """Add a mapping.  Takes ownership of fd (closed before returning)."""
        try:
            self._check_range(iova, size)
            if offset % PAGE:
                raise DmaError(errno.EINVAL, f"offset {offset:#x} not page aligned")
            if len(self.maps) >= self.max_maps:
                raise DmaError(errno.ENOSPC, "too many DMA mappings")
            if any(m.iova < iova + size and iova < m.end for m in self.maps):
                raise DmaError(errno.EEXIST, f"[{iova:#x}, +{size:#x}) overlaps a mapping")
            mm = None
            if fd is not None and (readable or writable):
                try:
                    st = os.fstat(fd)
                except OSError as e:
                    raise DmaError(errno.EBADF, f"fstat: {e}") from None
                # Beyond the file's end an access would die of SIGBUS.
                if offset + size > st.st_size:
                    raise DmaError(errno.EINVAL,
                                   f"offset+size {offset + size:#x} beyond the fd's {st.st_size:#x} bytes")
                prot = (mmap.PROT_READ if readable else 0) | (mmap.PROT_WRITE if writable else 0)
                try:
                    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
                except (OSError, ValueError, OverflowError) as e:
                    raise DmaError(errno.EINVAL, f"mmap: {e}") from None
            m = Mapping(iova, size, writable and mm is not None, readable, mm)
            if mm is not None:
                m.ptr = ffi.from_buffer("uint8_t[]", mm)
            self.maps.append(m)
            self.maps.sort(key=lambda x: x.iova)
            self._rebuild()
        finally:
            if fd is not None:
                os.close(fd)

    def unmap(self, iova: int, size: int) -> int:
        """Remove every mapping inside [iova, iova+size); returns how many."""
        self._check_range(iova, size)
        end = iova + size
        inside = [m for m in self.maps if iova <= m.iova and m.end <= end]
        partial = [m for m in self.maps if m.iova < end and iova < m.end and m not in inside]
        if partial:
            raise DmaError(errno.EINVAL, f"unmap [{iova:#x}, +{size:#x}) splits a mapping")
        for m in inside:
            self._drop(m)
        return len(inside)

    def unmap_all(self) -> int:
        n = len(self.maps)
        for m in list(self.maps):
            self._drop(m)
        return n

    def _drop(self, m: Mapping) -> None:
        self.maps.remove(m)
        self._rebuild()         # the C table must stop pointing at it first
        if m.ptr is not None:
            ffi.release(m.ptr)
        if m.mm is not None:
            m.mm.close()

    @staticmethod
    def _check_range(iova: int, size: int) -> None:
        if size == 0 or iova % PAGE or size % PAGE:
            raise DmaError(errno.EINVAL, f"range [{iova:#x}, +{size:#x}) empty or not page aligned")
        if iova + size > TOP:   # ending exactly at 2^64 is fine
            raise DmaError(errno.EINVAL, f"range [{iova:#x}, +{size:#x}) wraps past 2^64")

    def _rebuild(self) -> None:
        usable = [m for m in self.maps if m.ptr is not None]
        arr = ffi.new("struct dma_region[]", max(1, len(usable)))
        for i, m in enumerate(usable):
            arr[i].iova = m.iova
            arr[i].len = m.size
            arr[i].host = m.ptr
            arr[i].writable = int(m.writable)
        self.ctable.r = arr
        self.ctable.n = len(usable)
        self._carray = arr

    # -- access (control path; the data path is in C) ----------------------
    def read(self, addr: int, n: int) -> bytes | None:
        buf = ffi.new("uint8_t[]", n)
        if lib.dma_copy(self.ctable, addr, buf, n, 0):
            return None
        return bytes(ffi.buffer(buf, n))

    def write(self, addr: int, data: bytes) -> bool:
        buf = ffi.from_buffer("uint8_t[]", data)
        return lib.dma_copy(self.ctable, addr, buf, len(data), 1) == 0

    def __len__(self) -> int:
        return len(self.maps)
