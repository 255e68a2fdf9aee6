"""A hostile vfio-user client against a real device process.

What a client can do to the device beyond sending bad messages: shrink the
doorbell page it was handed, pile up DMA mappings, send a long stream of
random and broken messages, attach and detach over and over.  The device
must stay up (no SIGBUS, no traceback), keep its heartbeat, refuse what is
beyond its advertised limits with a clear errno, and hold no file
descriptor or mapping longer than the client's session.
"""
from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import random
import struct
import time

import pytest

from chimney import hw
from chimney import vfio_user as vu
from chimney.guest.bus.vfio_user import VfioUserBus, VfioUserClient, VfioUserError
from chimney.guest.miniport import DESC, TXQ, Miniport

PAGE = 4096
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)   # linux/fcntl.h
FRAME = bytes.fromhex("ffffffffffff02c41e0000ff88b5") + bytes(range(46))


def fd_count(dev) -> int:
    return len(os.listdir(f"/proc/{dev.proc.pid}/fd"))


def memfd_bytes(dev, name: str = "") -> int:
    """Bytes of memfds (named name...) the device has mapped: guest RAM, the
    doorbell page.  Bytes, not areas: the kernel merges neighbouring ones."""
    total = 0
    with open(f"/proc/{dev.proc.pid}/maps") as f:
        for line in f:
            if f"/memfd:{name}" in line:
                lo, hi = line.split()[0].split("-")
                total += int(hi, 16) - int(lo, 16)
    return total


def wait_log(dev, text: str, count: int = 1, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while dev.log_text().count(text) < count:
        assert dev.alive, f"device died:\n{dev.log_text()[-3000:]}"
        assert time.monotonic() < end, f"log never had {count}x {text!r}:\n{dev.log_text()[-2000:]}"
        time.sleep(0.01)


def heartbeat_moves(db: mmap.mmap, timeout: float = 5.0) -> bool:
    beat = struct.unpack_from("<I", db, hw.DB_HEARTBEAT)[0]
    end = time.monotonic() + timeout
    while struct.unpack_from("<I", db, hw.DB_HEARTBEAT)[0] == beat:
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


def version(c: VfioUserClient) -> dict:
    # Trailing blanks make room for the device's whole reply (as long as the request).
    text = json.dumps({"capabilities": {"max_msg_fds": vu.MAX_MSG_FDS}}).encode() + b" " * 512 + b"\0"
    body, _ = c.request(vu.VERSION, vu.VERSION_HDR.pack(0, 0) + text)
    reply = body[vu.VERSION_HDR.size:]
    return json.loads(reply[:reply.index(b"\0")])["capabilities"]


def dma_map(c: VfioUserClient, iova: int, size: int, fd: int | None, offset: int = 0,
            flags: int = vu.DMA_READ_FLAG | vu.DMA_WRITE_FLAG) -> None:
    c.request(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, flags, offset, iova, size),
              [fd] if fd is not None else [])


def dma_unmap(c: VfioUserClient, iova: int, size: int) -> None:
    c.request(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, 0, iova, size))


# ================================================================================
# The doorbell page is the device's: a client cannot shrink it
# ================================================================================
def test_doorbell_page_cannot_be_shrunk_by_the_client(device):
    """The client maps the doorbell page, truncates its fd to 0 and rings
    doorbells.  The truncate must fail (the device sealed the memfd against
    shrinking), the page keep its size and the device keep serving."""
    bus = VfioUserBus(device.socket)
    try:
        fd = bus.regions[hw.BAR_DOORBELL]["fd"]
        db = bus.map_bar(hw.BAR_DOORBELL)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL, f"seals {seals:#x}"
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.truncate(f"/proc/self/fd/{fd}", PAGE // 2)
        # Nor may it add a seal that would stop the next client mapping the page.
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        assert os.fstat(fd).st_size == hw.BAR_DOORBELL_SIZE
        # Doorbells still work: a frame goes out (counted as a drop, no wire).
        mp = Miniport(bus, ring_size=16)
        mp.up()
        mp.send(FRAME)
        assert mp.flush_tx(5)
        assert mp.stats()["tx_drops"] == 1
        assert heartbeat_moves(db)
        assert bus.reg_read(hw.BAR_REGS, hw.REG_ID) == hw.reg("ID").reset
    finally:
        bus.close()
    assert device.alive
    # The next client gets the same whole page.
    bus = VfioUserBus(device.socket)
    try:
        fd = bus.regions[hw.BAR_DOORBELL]["fd"]
        assert os.fstat(fd).st_size == hw.BAR_DOORBELL_SIZE
        assert heartbeat_moves(bus.map_bar(hw.BAR_DOORBELL))
    finally:
        bus.close()


# ================================================================================
# DMA mappings: the advertised limit, lookups among many, nothing left behind
# ================================================================================
def _tx(mp: Miniport, addr: int, length: int) -> int:
    """Post one raw TX descriptor, ring, and return its status once done."""
    slot = mp.tx_tail % mp.ring_size
    hw.TxDesc.pack_into(mp.tx_ring.mem, slot * DESC, addr=addr, len=length, flags=hw.TXF_EOP)
    mp.tx_tail += 1
    mp._ring(TXQ, mp.tx_tail)
    end = time.monotonic() + 5
    while not (st := hw.TxDesc.unpack_from(mp.tx_ring.mem, slot * DESC)["status"]) & hw.DESC_DD:
        assert time.monotonic() < end, "TX descriptor never completed"
        time.sleep(0.002)
    return st


def test_dma_maps_up_to_the_advertised_limit(device):
    """As many one-page mappings as the device advertises in max_dma_maps,
    made in random order: one more is refused with ENOSPC, lookups among all
    of them are right, and the disconnect drops them all at once, with no fd
    or mapping left behind and the next client served at once."""
    fd_base, mem_base = fd_count(device), memfd_bytes(device)
    probe = VfioUserClient(device.socket)
    limit = version(probe)["max_dma_maps"]
    probe.close()
    wait_log(device, "client detached")
    assert 2 <= limit <= 1 << 16
    bus = VfioUserBus(device.socket, timeout=30)      # its guest RAM is mapping number 1
    n = limit - 1
    ram_fd = os.memfd_create("many-maps", os.MFD_CLOEXEC)
    os.ftruncate(ram_fd, (n + 16) * PAGE)
    ram = mmap.mmap(ram_fd, (n + 16) * PAGE)
    base = 0x40_0000_0000
    page = lambda k: base + 2 * k * PAGE
    try:
        mp = Miniport(bus, ring_size=16)
        mp.up()
        fds_attached = fd_count(device)
        order = list(range(n))
        random.Random(0xD3A).shuffle(order)
        deadline = time.monotonic() + 300               # bounds the loop, not a speed test
        for k in order:
            dma_map(bus.client, page(k), PAGE, ram_fd, offset=k * PAGE)
            assert time.monotonic() < deadline, f"{order.index(k)} of {n} maps after 300 s"
        # The device kept no fd of the maps, and mapped each page once.
        assert fd_count(device) == fds_attached
        assert memfd_bytes(device, "many-maps") == n * PAGE
        # One more is refused with ENOSPC, and its fd is closed all the same.
        with pytest.raises(VfioUserError) as e:
            dma_map(bus.client, page(n), PAGE, ram_fd, offset=n * PAGE)
        assert e.value.errno == errno.ENOSPC
        assert fd_count(device) == fds_attached
        # Lookups: every probed page is found, holes and spills are not.
        for k in (0, 1, n // 3, n // 2, n - 2, n - 1):
            ram[k * PAGE:k * PAGE + len(FRAME)] = FRAME
            assert _tx(mp, page(k), len(FRAME)) == hw.DESC_DD, f"page {k}"
            assert _tx(mp, page(k) + PAGE, len(FRAME)) == hw.DESC_DD | hw.DESC_DMA_ERR
            assert _tx(mp, page(k) + PAGE - 8, len(FRAME)) == hw.DESC_DD | hw.DESC_DMA_ERR
        assert _tx(mp, base - PAGE, len(FRAME)) == hw.DESC_DD | hw.DESC_DMA_ERR
        # Unmap ten pages in one range; they are gone, and ten new ones fit.
        k0 = n // 2
        dma_unmap(bus.client, page(k0), 20 * PAGE)
        assert memfd_bytes(device, "many-maps") == (n - 10) * PAGE
        assert _tx(mp, page(k0), len(FRAME)) == hw.DESC_DD | hw.DESC_DMA_ERR
        assert _tx(mp, page(k0 + 10), len(FRAME)) == hw.DESC_DD
        for k in range(n, n + 10):
            dma_map(bus.client, page(k), PAGE, ram_fd, offset=k * PAGE)
        with pytest.raises(VfioUserError) as e:
            dma_map(bus.client, page(n + 10), PAGE, ram_fd, offset=(n + 10) * PAGE)
        assert e.value.errno == errno.ENOSPC
        assert mp.rd(hw.REG_ID) == hw.reg("ID").reset
    finally:
        bus.close()
        ram.close()
        os.close(ram_fd)
    # The disconnect drops every mapping at once; the next client is served.
    wait_log(device, f"device reset for the next client ({limit} DMA mappings dropped)")
    bus = VfioUserBus(device.socket)
    try:
        assert heartbeat_moves(bus.map_bar(hw.BAR_DOORBELL))
    finally:
        bus.close()
    wait_log(device, "client detached", 3)
    wait_log(device, "device reset for the next client", 3)
    assert fd_count(device) == fd_base
    assert memfd_bytes(device) == mem_base
