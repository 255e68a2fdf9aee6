"""DmaTable on its own: covers(), the C table it keeps, and the fds it is given.

Random map/unmap sequences against a plain model: after every change the C
table is sorted, disjoint and the same as the model, and covers() and the C
lookup (dma_ptr) answer as the model does.
"""
from __future__ import annotations

import errno
import gc
import os
import random

import pytest

from chimney.device.dma import DmaError, DmaTable, ffi, lib

PAGE = 4096
TOP = 1 << 64


@pytest.fixture
def ram():
    fd = os.memfd_create("dma-table-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * PAGE)
    yield fd
    os.close(fd)


def open_fds() -> int:
    # Earlier tests' garbage may still hold fds: collect it, so only this test's count.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def c_regions(t: DmaTable) -> list[tuple[int, int, bool]]:
    return [(t.ctable.r[i].iova, t.ctable.r[i].len, bool(t.ctable.r[i].writable)) for i in range(t.ctable.n)]


def model_covers(model: dict, addr: int, n: int, write: bool) -> bool:
    """Walk [addr, addr+n) mapping by mapping, as covers() must."""
    end = addr + n
    while addr < end:
        hit = [(i, s) for i, (s, host, w) in model.items() if i <= addr < i + s and host and (w or not write)]
        if not hit:
            return False
        addr = hit[0][0] + hit[0][1]
    return True


def test_covers(ram):
    t = DmaTable()
    t.map(0x1000, 0x1000, 0, True, True, os.dup(ram))
    t.map(0x2000, 0x2000, 0x1000, True, False, os.dup(ram))     # adjacent, read-only
    t.map(0x8000, 0x1000, 0, True, True, None)                  # no fd: nothing to touch
    t.map(TOP - PAGE, PAGE, 0, True, True, os.dup(ram))         # the last page there is
    assert t.covers(0x1000, 1) and t.covers(0x1FFF, 1, write=True)
    assert t.covers(0x1800, 0x2000)                  # across two adjacent mappings
    assert not t.covers(0x1800, 0x1000, write=True)  # ... the second is read-only
    assert t.covers(0x1000, 0x1000, write=True)
    assert not t.covers(0x1800, 0x3000)              # runs past the end into the hole
    assert not t.covers(0x0, 0x1001) and not t.covers(0x4000, 1)
    assert not t.covers(0x8000, 1)                   # fd-less mapping
    assert not t.covers(0x1000, 0) and not t.covers(0x1000, -1)
    assert t.covers(TOP - PAGE, PAGE, write=True)
    assert not t.covers(TOP - PAGE, PAGE + 1)        # past 2^64
    assert not t.covers(TOP - 1, 2)


def test_random_maps_and_unmaps_keep_the_c_table_right(ram):
    rnd = random.Random(0x7AB1E)
    t = DmaTable(max_maps=40)
    model: dict[int, tuple[int, bool, bool]] = {}   # iova -> (size, has host memory, writable)
    fds = open_fds()
    for _ in range(3000):
        iova = rnd.randrange(128) * PAGE
        size = rnd.choice((1, 1, 2, 3, 8)) * PAGE
        if rnd.random() < 0.55:
            w, with_fd = rnd.random() < 0.7, rnd.random() < 0.9
            clash = any(i < iova + size and iova < i + s for i, (s, _, _) in model.items())
            try:
                t.map(iova, size, rnd.randrange(8) * PAGE, True, w, os.dup(ram) if with_fd else None)
                assert not clash and len(model) < 40
                model[iova] = (size, with_fd, w and with_fd)
            except DmaError as e:
                assert e.errno == (errno.ENOSPC if len(model) >= 40 else errno.EEXIST) and (clash or len(model) >= 40)
        else:
            end = iova + size
            inside = [i for i, (s, _, _) in model.items() if iova <= i and i + s <= end]
            split = any(i < end and iova < i + s and i not in inside for i, (s, _, _) in model.items())
            try:
                assert t.unmap(iova, size) == len(inside) and not split
                for i in inside:
                    del model[i]
            except DmaError as e:
                assert split and e.errno == errno.EINVAL
        expect = sorted((i, s, w) for i, (s, host, w) in model.items() if host)
        assert c_regions(t) == expect
        assert len(t) == len(model)
        for _ in range(4):
            a, n, w = rnd.randrange(130 * PAGE), rnd.choice((1, 16, PAGE, 3 * PAGE)), rnd.random() < 0.5
            assert t.covers(a, n, w) == model_covers(model, a, n, w), (a, n, w)
            one = any(i <= a and a + n <= i + s and host and (cw or not w) for i, (s, host, cw) in model.items())
            assert (lib.dma_ptr(t.ctable, a, n, int(w)) != ffi.NULL) == one, (a, n, w)
    assert open_fds() == fds                 # every fd handed over was closed, none kept
    assert t.unmap_all() == len(model) and t.ctable.n == 0 and len(t) == 0
    assert open_fds() == fds


def test_fd_closed_on_every_error(ram):
    t = DmaTable(max_maps=1)
    fds = open_fds()
    t.map(0x1000, PAGE, 0, True, True, os.dup(ram))
    for iova, size, offset in ((0x1000, PAGE, 0),            # overlap
                               (0x3000, PAGE, 0),            # over the limit
                               (0x3001, PAGE, 0),            # unaligned
                               (0x3000, 128 * PAGE, 0),      # beyond the fd's size
                               (0x3000, PAGE, 1 << 62)):
        with pytest.raises(DmaError):
            t.map(iova, size, offset, True, True, os.dup(ram))
    assert open_fds() == fds


def test_toe_ring_unmapped_is_reported_like_every_dma_error(ram):
    """The TOE reads its command ring through the DMA table: unmapped under
    it, the queue stops and the error is reported the one way (statistic,
    DMA_ERR_ADDR of the entry that failed, DMA_ERR_INFO, CAUSE)."""
    from chimney import hw
    from chimney.device.nic import Nic

    t = DmaTable()
    ring = 0x1_0000_0000
    t.map(ring, 16 * PAGE, 0, True, True, os.dup(ram))
    nic = Nic(t, bytes.fromhex("02c41e000001"))
    try:
        nic.reg_write(hw.REG_CTRL, 4, hw.CTRL_ENABLE)
        q = hw.CMDQ
        for name, val in (("Q_BASE_LO", ring & 0xFFFFFFFF), ("Q_BASE_HI", ring >> 32), ("Q_SIZE", 16),
                          ("Q_CTRL", 1)):
            nic.reg_write(hw.qreg(q, name), 4, val)
        assert nic.reg_read(hw.qreg(q, "Q_STATUS"), 4) == hw.QSTATUS_ENABLED
        assert t.unmap(ring, 16 * PAGE) == 1
        nic.dbw[hw.DB_TAIL_BASE + 4 * q] = 1
        nic.poll_offload()
        assert nic.reg_read(hw.qreg(q, "Q_STATUS"), 4) & hw.QSTATUS_ERROR
        assert nic.stat("dma_errors") == 1
        assert nic.reg_read(hw.REG_DMA_ERR_ADDR, 8) == ring
        assert nic.reg_read(hw.REG_DMA_ERR_INFO, 4) == q | 1 << 8
        assert nic.reg_read(hw.REG_CAUSE, 4) == hw.CAUSE_DMA_ERROR | hw.CAUSE_QUEUE_ERROR
    finally:
        nic.close()
