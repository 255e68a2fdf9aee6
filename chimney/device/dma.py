"""Guest memory as the device sees it: the DMA mappings QEMU gives us.

Each DMA_MAP brings an fd (guest RAM, a memfd) that we mmap and close at once:
the mapping keeps the file, and libc's mmap (unlike Python's, which keeps a
dup of the fd per mapping) leaves no fd behind, so the number of mappings is
not bounded by the fd limit.  The C fast path gets a sorted table of
(iova, len, host pointer) and checks every access against it by binary
search.  A map without an fd (ROM) is recorded but never touched.

The client decides how many mappings there are (under a vIOMMU, one per
IOMMU page-table entry), so nothing here is linear in their number per
request: lookups bisect, a map or unmap moves the C table's tail with one
memmove, a disconnect drops them all in one pass.  The number is capped at
max_maps (advertised as max_dma_maps); each mapping costs the process one
of its vm.max_map_count memory areas.

A guest address that fails, wherever it is found, is reported through
report_dma_error: the dma_errors statistic, DMA_ERR_ADDR/INFO, CAUSE, the
misc vector and one log line.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from .. import hw
from .. import vfio_user as vu
from ._fastpath import ffi, lib

log = logging.getLogger("chimney.device.dma")

PAGE = 4096
TOP = 1 << 64
REGION_SIZE = ffi.sizeof("struct dma_region")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int64)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap_shared(fd: int, size: int, offset: int, prot: int) -> int:
    """libc mmap of fd; the host address.  Raises OSError."""
    addr = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, offset)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return addr


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
    addr: int | None            # where it is mapped in this process (None: no host memory)
    ptr: object = None          # the same as a cffi uint8_t *, for the C table

    @property
    def end(self) -> int:
        return self.iova + self.size

    def release(self) -> None:
        if self.addr is not None:
            _libc.munmap(self.addr, self.size)
            self.addr = self.ptr = None


def _iova(m: Mapping) -> int:
    return m.iova


class DmaTable:
    def __init__(self, max_maps: int = vu.MAX_DMA_MAPS):
        # A client that shrinks guest RAM under us must cost a DMA error, not the process.
        if lib.fp_install_guard():
            raise OSError("cannot install the SIGBUS guard")
        self.max_maps = max_maps
        self.maps: list[Mapping] = []       # every mapping, sorted by iova, disjoint
        self._host: list[Mapping] = []      # those with host memory: the C table, same order
        self.ctable = ffi.new("struct dma_table *")
        self._carray = None
        self._grow(16)

    # -- changes -----------------------------------------------------------
    def map(self, iova: int, size: int, offset: int, readable: bool, writable: bool,
            fd: int | None) -> None:
        """Add a mapping.  Takes ownership of fd (closed before returning)."""
        try:
            self._check_range(iova, size)
            if offset % PAGE:
                raise DmaError(errno.EINVAL, f"offset {offset:#x} not page aligned")
            if len(self.maps) >= self.max_maps:
                raise DmaError(errno.ENOSPC, f"too many DMA mappings (the limit is {self.max_maps})")
            i = bisect_right(self.maps, iova, key=_iova)
            if (i and self.maps[i - 1].end > iova) or (i < len(self.maps) and self.maps[i].iova < iova + size):
                raise DmaError(errno.EEXIST, f"[{iova:#x}, +{size:#x}) overlaps a mapping")
            addr = None
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
                    addr = _mmap_shared(fd, size, offset, prot)
                except OSError as e:        # ENOMEM: out of vm.max_map_count areas, or of memory
                    raise DmaError(errno.ENOMEM if e.errno == errno.ENOMEM else errno.EINVAL,
                                   f"mmap: {e}") from None
            m = Mapping(iova, size, writable and addr is not None, readable, addr)
            if addr is not None:
                m.ptr = ffi.cast("uint8_t *", addr)
            self.maps.insert(i, m)
            if m.ptr is not None:
                self._c_insert(m)
        finally:
            if fd is not None:
                os.close(fd)

    def unmap(self, iova: int, size: int) -> int:
        """Remove every mapping inside [iova, iova+size); returns how many."""
        self._check_range(iova, size)
        end = iova + size
        lo = bisect_left(self.maps, iova, key=_iova)
        hi = bisect_left(self.maps, end, key=_iova)
        if (lo and self.maps[lo - 1].end > iova) or (hi > lo and self.maps[hi - 1].end > end):
            raise DmaError(errno.EINVAL, f"unmap [{iova:#x}, +{size:#x}) splits a mapping")
        gone = self.maps[lo:hi]
        del self.maps[lo:hi]
        # The C table must stop pointing at them before their memory goes.
        self._c_remove(bisect_left(self._host, iova, key=_iova), bisect_left(self._host, end, key=_iova))
        for m in gone:
            m.release()
        return len(gone)

    def unmap_all(self) -> int:
        gone, self.maps = self.maps, []
        self._c_remove(0, len(self._host))
        for m in gone:
            m.release()
        self._grow(16)          # give back a big table's memory
        return len(gone)

    @staticmethod
    def _check_range(iova: int, size: int) -> None:
        if size == 0 or iova % PAGE or size % PAGE:
            raise DmaError(errno.EINVAL, f"range [{iova:#x}, +{size:#x}) empty or not page aligned")
        if iova + size > TOP:   # ending exactly at 2^64 is fine
            raise DmaError(errno.EINVAL, f"range [{iova:#x}, +{size:#x}) wraps past 2^64")

    # -- the C table: struct dma_region[] mirroring self._host -----------------
    def _grow(self, capacity: int) -> None:
        arr = ffi.new("struct dma_region[]", capacity)
        if self._host:
            ffi.memmove(arr, self.ctable.r, len(self._host) * REGION_SIZE)
        self.ctable.r = arr
        self._carray = arr          # keeps it alive while C points at it
        self._capacity = capacity

    def _c_insert(self, m: Mapping) -> None:
        n = len(self._host)
        if n == self._capacity:
            self._grow(2 * n)
        j = bisect_left(self._host, m.iova, key=_iova)
        arr = self._carray
        if j < n:
            ffi.memmove(arr + j + 1, arr + j, (n - j) * REGION_SIZE)
        arr[j].iova, arr[j].len, arr[j].host, arr[j].writable = m.iova, m.size, m.ptr, int(m.writable)
        self._host.insert(j, m)
        self.ctable.n = n + 1

    def _c_remove(self, lo: int, hi: int) -> None:
        n = len(self._host)
        if hi <= lo:
            return
        arr = self._carray
        if hi < n:
            ffi.memmove(arr + lo, arr + hi, (n - hi) * REGION_SIZE)
        del self._host[lo:hi]
        self.ctable.n = n - (hi - lo)

    # -- questions ---------------------------------------------------------
    def covers(self, addr: int, length: int, write: bool = False) -> bool:
        """Whether [addr, addr+length) lies in mappings the device can touch
        (adjacent ones may share it), all writable if `write`: exactly what
        the C fast path and dma_copy would accept."""
        end = addr + length
        if length <= 0 or addr < 0 or end > TOP:
            return False
        i = bisect_right(self._host, addr, key=_iova) - 1
        while addr < end:
            if i < 0 or i >= len(self._host):
                return False
            m = self._host[i]
            if not m.iova <= addr < m.end or (write and not m.writable):
                return False
            addr = m.end
            i += 1
        return True

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


def report_dma_error(nic, qid: int, addr: int, what: str, *, errors: int = 1,
                     counted: bool = False, stopped: bool = False) -> None:
    """The one way a failed guest address is reported, wherever it was found.

    `errors` failed accesses on queue `qid`, the last at `addr`: DMA_ERR_ADDR
    and DMA_ERR_INFO, CAUSE.DMA_ERROR (and QUEUE_ERROR when the queue
    `stopped`), the misc vector, a log line, and the dma_errors statistic
    unless `counted` (the C fast path counts its own; a ring refused at
    enable was never accessed).
    """
    if not counted:
        nic.stats[hw.STAT_INDEX["dma_errors"]] += errors
    nic.dma_err_addr = addr % TOP
    nic.dma_err_qid = qid
    nic.dma_err_count += errors
    nic.cause |= hw.CAUSE_DMA_ERROR | (hw.CAUSE_QUEUE_ERROR if stopped else 0)
    log.warning("queue %d: DMA error at %#x (%s)%s", qid, addr, what, ", queue stopped" if stopped else "")
    nic.raise_vector(hw.VECTOR_MISC)
