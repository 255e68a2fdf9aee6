"""A hostile vfio-user client against a real device process.

What a client can do to the device beyond sending bad messages: shrink the
doorbell page it was handed, pile up DMA mappings, send a long stream of
random and broken messages, attach and detach over and over.  The device
must stay up (no SIGBUS, no traceback), keep its heartbeat, refuse what is
beyond its advertised limits with a clear errno, and hold no file
descriptor or mapping longer than the client's session.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import time

import pytest

from chimney import hw
from chimney import vfio_user as vu
from chimney.guest.bus.vfio_user import (
    VfioUserBus,
    VfioUserClient,
)
from chimney.guest.miniport import Miniport

PAGE = 4096
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)   # linux/fcntl.h
FRAME = bytes.fromhex("ffffffffffff02c41e0000ff88b5") + bytes(range(46))


def fd_count(dev) -> int:
    return len(os.listdir(f"/proc/{dev.proc.pid}/fd"))


def memfd_mappings(dev) -> int:
    """Mappings of memfds in the device (guest RAM, the doorbell page)."""
    with open(f"/proc/{dev.proc.pid}/maps") as f:
        return sum("/memfd:" in line for line in f)


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
    text = json.dumps({"capabilities": {"max_msg_fds": vu.MAX_MSG_FDS}}).encode() + b"\0"
    text += bytes(512)          # room for the device's whole reply
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


