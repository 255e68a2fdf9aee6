"""The vfio-user server, message by message, over a raw unix socket.

In the style of libvfio-user's Python tests: each test builds headers and
payloads with struct, sends them (with SCM_RIGHTS fds where needed) in
lock-step and checks the reply: id and command echoed, REPLY type, ERROR flag
and the exact errno.  A clean session first, then many kinds of malformed or
invalid messages.  After an error reply the same connection must still answer;
after a broken stream the server must drop the client and serve the next one
from a clean device.  Every error leaves a line in the device's log.
"""
from __future__ import annotations

import array
import contextlib
import errno
import json
import mmap
import os
import random
import re
import select
import socket
import struct
import time
from dataclasses import dataclass

import pytest
from conftest import check_stopped_cleanly, start_device

from chimney import hw
from chimney import vfio_user as vu

IOVA = 0x1_0000_0000
PAGE = 4096
ID_MAGIC = 0x43484D59
CAPS = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096,
                         "max_dma_maps": 65535, "migration": {"pgsize": 4096}}}
EOF = object()


# -- a raw lock-step client -----------------------------------------------------
@dataclass
class Reply:
    id: int
    cmd: int
    size: int
    flags: int
    err: int
    body: bytes
    fds: list


class Raw:
    def __init__(self, dev, timeout: float = 5.0):
        self.dev = dev
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(dev.socket)
        self.next_id = 0x100
        self.received_fds: list[int] = []

    def close(self):
        self.s.close()
        for fd in self.received_fds:
            os.close(fd)
        self.received_fds = []

    def send(self, cmd: int, payload: bytes = b"", fds=(), flags: int = 0,
             size: int | None = None) -> int:
        self.next_id = (self.next_id + 1) & 0xFFFF
        size = vu.HDR_SIZE + len(payload) if size is None else size
        self.send_bytes(vu.HDR.pack(self.next_id, cmd, size, flags, 0) + payload, fds)
        return self.next_id

    def send_bytes(self, data: bytes, fds=()):
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            n = self.s.sendmsg([data], anc)
            data = data[n:]
        if data:
            self.s.sendall(data)

    def _recv_exact(self, n: int, fds: list):
        buf = b""
        while len(buf) < n:
            data, anc, _flags, _ = self.s.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * 16))
            for level, typ, blob in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(blob[: len(blob) - len(blob) % 4])
                    fds.extend(got)
                    self.received_fds.extend(got)
            if not data:
                return EOF
            buf += data
        return buf

    def recv(self):
        fds: list[int] = []
        raw = self._recv_exact(vu.HDR_SIZE, fds)
        if raw is EOF:
            return EOF
        mid, cmd, size, flags, err = vu.HDR.unpack(raw)
        assert vu.HDR_SIZE <= size <= vu.MAX_MSG_SIZE, f"reply size {size}"
        body = self._recv_exact(size - vu.HDR_SIZE, fds) if size > vu.HDR_SIZE else b""
        assert body is not EOF, "server closed mid-reply"
        return Reply(mid, cmd, size, flags, err, body, fds)

    def req(self, cmd: int, payload: bytes = b"", fds=(), **kw) -> Reply:
        mid = self.send(cmd, payload, fds, **kw)
        r = self.recv()
        assert r is not EOF, f"server hung up on command {cmd}"
        assert (r.id, r.cmd) == (mid, cmd), f"reply {r.id}/{r.cmd} to request {mid}/{cmd}"
        assert r.flags & vu.TYPE_MASK == vu.TYPE_REPLY and not r.flags & vu.NO_REPLY
        assert r.size == vu.HDR_SIZE + len(r.body)
        return r

    def ok(self, cmd: int, payload: bytes = b"", fds=(), **kw) -> Reply:
        r = self.req(cmd, payload, fds, **kw)
        assert not r.flags & vu.ERROR and r.err == 0, \
            f"{vu.COMMAND_NAMES.get(cmd, cmd)} failed: {errno.errorcode.get(r.err, r.err)}"
        return r

    def fail(self, cmd: int, payload: bytes, err: int, fds=(), **kw) -> Reply:
        """Expect an error reply with exactly errno `err`, and its log line."""
        r = self.req(cmd, payload, fds, **kw)
        assert r.flags == vu.TYPE_REPLY | vu.ERROR, f"flags {r.flags:#x} (errno {r.err})"
        assert r.err == err, f"errno {errno.errorcode.get(r.err, r.err)}, " \
                             f"expected {errno.errorcode[err]}"
        assert r.body == b"" and r.fds == [], "an error reply is a bare header"
        assert_error_logged(self.dev, cmd, r.id, err)
        return r

    def expect_eof(self, timeout: float = 3.0) -> float:
        """The server closes the connection; returns how long that took."""
        t0 = time.monotonic()
        self.s.settimeout(timeout)
        try:
            while True:
                data = self.s.recv(4096)
                assert not data, f"unexpected data {data[:32]!r} instead of a disconnect"
                return time.monotonic() - t0
        except socket.timeout:
            pytest.fail(f"server did not disconnect within {timeout} s")
        except ConnectionResetError:
            return time.monotonic() - t0

    def nothing_pending(self, wait: float = 0.05) -> bool:
        return not select.select([self.s], [], [], wait)[0]

    # -- conveniences --------------------------------------------------------
    def version(self, caps=CAPS) -> dict:
        text = json.dumps(caps).encode() + b"\0"
        r = self.ok(vu.VERSION, vu.VERSION_HDR.pack(0, 0) + text)
        major, minor = vu.VERSION_HDR.unpack_from(r.body)
        assert (major, minor) == (0, 0)
        reply = r.body[vu.VERSION_HDR.size:]
        assert len(reply) <= len(text), "VERSION reply longer than the client's request"
        assert reply.endswith(b"\0")
        return json.loads(reply[:-1])

    def read(self, region: int, offset: int, count: int) -> bytes:
        r = self.ok(vu.REGION_READ, vu.REGION_RW.pack(offset, region, count))
        assert vu.REGION_RW.unpack_from(r.body) == (offset, region, count)
        assert len(r.body) == vu.REGION_RW.size + count
        return r.body[vu.REGION_RW.size:]

    def write(self, region: int, offset: int, data: bytes) -> None:
        r = self.ok(vu.REGION_WRITE, vu.REGION_RW.pack(offset, region, len(data)) + data)
        assert vu.REGION_RW.unpack_from(r.body) == (offset, region, len(data))

    def rd32(self, off: int, region: int = hw.BAR_REGS) -> int:
        return int.from_bytes(self.read(region, off, 4), "little")

    def wr32(self, off: int, val: int, region: int = hw.BAR_REGS) -> None:
        self.write(region, off, val.to_bytes(4, "little"))

    def cfg(self, off: int, n: int) -> int:
        return int.from_bytes(self.read(vu.PCI_CONFIG_REGION, off, n), "little")

    def region_info(self, index: int, argsz: int = vu.REGION_INFO.size) -> Reply:
        return self.ok(vu.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(argsz, 0, index, 0, 0, 0))

    def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = vu.DMA_READ_FLAG | vu.DMA_WRITE_FLAG) -> Reply:
        return self.ok(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, flags, offset, iova, size),
                       [fd] if fd is not None else ())

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> Reply:
        payload = vu.DMA_UNMAP_MSG.pack(24, flags, iova, size)
        r = self.ok(vu.DMA_UNMAP, payload)
        assert r.body == payload
        return r

    def alive(self) -> None:
        """The connection still answers a valid request."""
        assert self.rd32(hw.REG_ID) == ID_MAGIC


def assert_error_logged(dev, cmd: int, msg_id: int, err: int) -> None:
    name = vu.COMMAND_NAMES.get(cmd, f"command {cmd}")
    pat = re.compile(rf"vfio-user {re.escape(name)} id={msg_id}: .+ -> {errno.errorcode[err]}$", re.M)
    assert pat.search(dev.log_text()), f"no log line for {name} id={msg_id} -> {errno.errorcode[err]}"


def wait_log(dev, text: str, count: int = 1, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while dev.log_text().count(text) < count:
        assert time.monotonic() < end, f"log never had {count}x {text!r}:\n{dev.log_text()[-2000:]}"
        time.sleep(0.01)


def fd_count(dev) -> int:
    return len(os.listdir(f"/proc/{dev.proc.pid}/fd"))


def memfd(size: int) -> int:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def closed_by_peer(read_end: int) -> bool:
    """Our pipe's write end was sent away and our copy closed: EOF means the
    server closed its copy too."""
    r, _, _ = select.select([read_end], [], [], 2.0)
    return bool(r) and os.read(read_end, 1) == b""


def negotiated(dev) -> Raw:
    c = Raw(dev)
    c.version()
    return c


# -- a complete session, as QEMU would run it ------------------------------------
def check_regions(c: Raw) -> mmap.mmap:
    """Every region's info; returns the doorbell page mapped through its fd."""
    expect = {0: hw.BAR_REGS_SIZE, 1: 0, 2: hw.BAR_DOORBELL_SIZE, 3: 0, 4: hw.BAR_MSIX_SIZE,
              5: 0, 6: 0, 7: 4096, 8: 0}
    db = None
    for index, size in expect.items():
        r = c.region_info(index)
        argsz, flags, idx, cap_off, rsize, offset = vu.REGION_INFO.unpack_from(r.body)
        assert (idx, rsize, offset) == (index, size, 0), f"region {index}"
        rw = vu.REGION_FLAG_READ | vu.REGION_FLAG_WRITE
        if index != hw.BAR_DOORBELL:
            assert len(r.body) == vu.REGION_INFO.size and argsz == vu.REGION_INFO.size
            assert flags == (rw if size else 0) and cap_off == 0 and r.fds == []
            continue
        # Doorbell BAR: mmappable with a sparse-mmap capability that does not
        # fit in 32 bytes.  First answer: the size needed, no capability (and
        # no CAPS flag, which QEMU would reject without a cap_offset), no fd.
        need = vu.REGION_INFO.size + vu.CAP_HEADER.size + vu.SPARSE_MMAP_HDR.size + vu.SPARSE_MMAP_AREA.size
        assert argsz == need and cap_off == 0 and len(r.body) == vu.REGION_INFO.size
        assert flags == rw | vu.REGION_FLAG_MMAP and r.fds == []
        # Second step: ask again with room for it.
        r2 = c.region_info(index, argsz=need)
        argsz, flags, idx, cap_off, rsize, offset = vu.REGION_INFO.unpack_from(r2.body)
        assert argsz == need and len(r2.body) == need and cap_off == vu.REGION_INFO.size
        assert flags == rw | vu.REGION_FLAG_MMAP | vu.REGION_FLAG_CAPS
        cid, ver, nxt = vu.CAP_HEADER.unpack_from(r2.body, cap_off)
        assert (cid, ver, nxt) == (vu.REGION_INFO_CAP_SPARSE_MMAP, 1, 0)
        nr, _ = vu.SPARSE_MMAP_HDR.unpack_from(r2.body, cap_off + vu.CAP_HEADER.size)
        area = vu.SPARSE_MMAP_AREA.unpack_from(r2.body, cap_off + vu.CAP_HEADER.size + vu.SPARSE_MMAP_HDR.size)
        assert nr == 1 and area == (0, hw.BAR_DOORBELL_SIZE)
        assert len(r2.fds) == 1
        db = mmap.mmap(r2.fds[0], hw.BAR_DOORBELL_SIZE)
        # The page is the device's: its heartbeat moves.
        beat = struct.unpack_from("<I", db, hw.DB_HEARTBEAT)[0]
        end = time.monotonic() + 2
        while struct.unpack_from("<I", db, hw.DB_HEARTBEAT)[0] == beat:
            assert time.monotonic() < end, "doorbell page heartbeat does not move"
            time.sleep(0.002)
    return db


def full_session(dev, c: Raw | None = None) -> None:
    """VERSION .. DMA_MAP .. SET_IRQS .. a TX completion interrupt .. DMA_UNMAP,
    on a device that must look freshly reset."""
    c = c or Raw(dev)
    try:
        caps = c.version()["capabilities"]
        assert caps["max_data_xfer_size"] == vu.MAX_DATA_XFER and caps["pgsizes"] == 4096
        r = c.ok(vu.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
        assert vu.DEVICE_INFO.unpack(r.body) == (16, vu.DEVICE_FLAGS_PCI | vu.DEVICE_FLAGS_RESET,
                                                 vu.PCI_NUM_REGIONS, vu.PCI_NUM_IRQS)
        db = check_regions(c)
        # Fresh device: no leftovers from an earlier client.
        assert c.cfg(0x10, 4) == 0 and c.cfg(0x04, 2) == 0
        assert c.rd32(hw.REG_MTU) == 1500 and c.rd32(hw.REG_CTRL) == 0
        assert c.rd32(hw.qreg(0, "Q_STATUS")) == 0
        assert c.alive() is None
        tx_completion(c, db)
        db.close()
    finally:
        c.close()


def set_eventfds(c: Raw, efds: list[int]) -> None:
    """Eventfds for vectors 0.., at most max_msg_fds per message, as QEMU does."""
    for start in range(0, len(efds), vu.MAX_MSG_FDS):
        chunk = efds[start:start + vu.MAX_MSG_FDS]
        c.ok(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_TRIGGER,
                                                 vu.PCI_MSIX_IRQ, start, len(chunk)), chunk)


def tx_completion(c: Raw, db: mmap.mmap, vector: int = 1) -> None:
    """Map RAM, give 32 eventfds, run one TX descriptor, get its interrupt."""
    fd = memfd(1 << 20)
    ram = mmap.mmap(fd, 1 << 20)
    c.dma_map(IOVA, 1 << 20, fd)
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(hw.MSIX_VECTORS)]
    try:
        set_eventfds(c, efds)
        q = hw.TXQ_FIRST
        c.wr32(hw.qreg(q, "Q_BASE_LO"), IOVA & 0xFFFFFFFF)
        c.wr32(hw.qreg(q, "Q_BASE_HI"), IOVA >> 32)
        c.wr32(hw.qreg(q, "Q_SIZE"), 8)
        c.wr32(hw.qreg(q, "Q_VECTOR"), vector)
        c.wr32(hw.qreg(q, "Q_CTRL"), 1)
        assert c.rd32(hw.qreg(q, "Q_STATUS")) == hw.QSTATUS_ENABLED
        c.wr32(hw.REG_CTRL, hw.CTRL_ENABLE)
        ram[0x1000:0x1000 + 60] = b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + bytes(46)
        hw.TxDesc.pack_into(ram, 0, addr=IOVA + 0x1000, len=60, flags=hw.TXF_EOP)
        struct.pack_into("<I", db, hw.DB_ARM_BASE + 4 * vector, 1)
        struct.pack_into("<I", db, hw.DB_TAIL_BASE + 4 * q, 1)
        if struct.unpack_from("<I", db, hw.DB_NEED_KICK)[0]:
            c.wr32(hw.REG_KICK, 1)
        r, _, _ = select.select([efds[vector]], [], [], 3.0)
        assert r, "no completion interrupt"
        assert struct.unpack("<Q", os.read(efds[vector], 8))[0] == 1
        assert not select.select([efds[vector + 1]], [], [], 0)[0], "a vector nobody armed fired"
        st = hw.TxDesc.unpack_from(ram, 0)["status"]
        assert st == hw.DESC_DD, f"descriptor status {st:#x}"
        assert struct.unpack_from("<I", db, hw.DB_HEAD_BASE + 4 * q)[0] == 1
        assert c.rd32(hw.qreg(q, "Q_HEAD")) == 1
        # No wire in these tests: the frame is counted as a drop, not an error.
        stats = {n: int.from_bytes(c.read(0, hw.stat_offset(n), 8), "little") for n, _ in hw.STATS}
        assert stats["tx_drops"] == 1 and stats["dma_errors"] == 0 and stats["interrupts"] == 1
        c.dma_unmap(IOVA, 1 << 20)
    finally:
        for e in efds:
            os.close(e)
        ram.close()
        os.close(fd)


# ================================================================================
# The clean session
# ================================================================================
def test_clean_session(device):
    c = Raw(device)
    caps = c.version()
    assert caps == {"capabilities": {"max_msg_fds": vu.MAX_MSG_FDS, "max_data_xfer_size": vu.MAX_DATA_XFER,
                                     "pgsizes": 4096, "max_dma_maps": vu.MAX_DMA_MAPS}}
    r = c.ok(vu.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
    assert len(r.body) == 16
    argsz, flags, nreg, nirq = vu.DEVICE_INFO.unpack(r.body)
    assert (argsz, nreg, nirq) == (16, 9, 5)
    assert flags == vu.DEVICE_FLAGS_PCI | vu.DEVICE_FLAGS_RESET

    db = check_regions(c)

    # IRQs: MSI-X has 32 vectors, the others none.
    for index in range(vu.PCI_NUM_IRQS):
        r = c.ok(vu.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, index, 0))
        assert len(r.body) == 16
        argsz, flags, idx, count = vu.IRQ_INFO.unpack(r.body)
        assert (argsz, idx) == (16, index) and flags & vu.IRQ_INFO_EVENTFD
        assert count == (32 if index == vu.PCI_MSIX_IRQ else 0)

    # Config space: identity.
    assert c.cfg(0x00, 2) == 0x1DE5 and c.cfg(0x02, 2) == 0xC41E
    assert c.cfg(0x09, 3) == 0x020000 and c.cfg(0x08, 1) == hw.PCI_REVISION
    assert c.cfg(0x0E, 1) == 0 and c.cfg(0x2C, 2) == hw.PCI_SUBSYS_VENDOR_ID
    # Capability list: walk it.
    assert c.cfg(0x06, 2) & 0x10
    ptr, seen = c.cfg(0x34, 1), {}
    while ptr:
        assert ptr >= 0x40 and ptr % 4 == 0 and ptr not in seen.values() and len(seen) < 16
        seen[c.cfg(ptr, 1)] = ptr
        ptr = c.cfg(ptr + 1, 1)
    assert 0x11 in seen and 0x10 in seen, f"capabilities {seen}"
    msix = seen[0x11]
    assert c.cfg(msix + 2, 2) & 0x7FF == hw.MSIX_VECTORS - 1
    assert c.cfg(msix + 4, 4) & 7 == hw.BAR_MSIX and c.cfg(msix + 8, 4) == hw.MSIX_PBA_OFFSET | hw.BAR_MSIX
    assert c.cfg(seen[0x10] + 2, 2) & 0xF == 2            # PCIe capability version 2
    # Config space is read-only where hardware is: the vendor ID does not change.
    c.write(vu.PCI_CONFIG_REGION, 0x00, b"\x34\x12")
    assert c.cfg(0x00, 2) == 0x1DE5

    # BAR sizing: all ones in, size mask out; then an address sticks.
    for bar, size in ((0, hw.BAR_REGS_SIZE), (1, 0), (2, hw.BAR_DOORBELL_SIZE), (4, hw.BAR_MSIX_SIZE)):
        off = 0x10 + 4 * bar
        c.write(vu.PCI_CONFIG_REGION, off, b"\xff\xff\xff\xff")
        assert c.cfg(off, 4) == (0xFFFFFFFF & ~(size - 1) if size else 0), f"BAR{bar}"
    c.write(vu.PCI_CONFIG_REGION, 0x10, (0xFE000000).to_bytes(4, "little"))
    assert c.cfg(0x10, 4) == 0xFE000000
    c.write(vu.PCI_CONFIG_REGION, 0x04, (0x0406).to_bytes(2, "little"))
    assert c.cfg(0x04, 2) == 0x0406

    # BAR0 registers.
    assert c.rd32(hw.REG_ID) == ID_MAGIC
    assert c.rd32(hw.REG_VERSION) == (hw.VERSION_MAJOR << 16 | hw.VERSION_MINOR) and c.rd32(hw.REG_NUM_VECTORS) == 32
    assert int.from_bytes(c.read(0, hw.REG_ID, 8), "little") & 0xFFFFFFFF == ID_MAGIC
    # An 8-byte write to two 32-bit registers sets both (it used to kill the device).
    c.write(0, hw.REG_MAC_LO, bytes.fromhex("02aabbccddee0000"))
    assert c.rd32(hw.REG_MAC_LO) == 0xCCBBAA02 and c.rd32(hw.REG_MAC_HI) == 0xEEDD

    # Posted write: no reply; the read that follows gets the only reply.
    c.send(vu.REGION_WRITE, vu.REGION_RW.pack(hw.REG_MTU, 0, 4) + (9000).to_bytes(4, "little"),
           flags=vu.NO_REPLY)
    assert c.rd32(hw.REG_MTU) == 9000
    assert c.nothing_pending()
    # A posted write to the doorbell BAR lands in the shared page.
    c.send(vu.REGION_WRITE, vu.REGION_RW.pack(0x400, 2, 4) + b"\x11\x22\x33\x44", flags=vu.NO_REPLY)
    assert c.read(2, 0x400, 4) == b"\x11\x22\x33\x44" and db[0x400:0x404] == b"\x11\x22\x33\x44"
    assert c.nothing_pending()

    # DMA_MAP of a memfd, DMA_UNMAP (the reply echoes the request), unmap-all.
    fd = memfd(4 * PAGE)
    c.dma_map(IOVA, 4 * PAGE, fd)
    c.dma_map(IOVA + 8 * PAGE, 2 * PAGE)           # fd-less, like QEMU's ROM
    c.dma_unmap(IOVA, 4 * PAGE)
    c.dma_unmap(0, 0, flags=vu.UNMAP_ALL)
    c.dma_map(IOVA, 4 * PAGE, fd)                  # gone: mapping it again works
    c.dma_map(IOVA + 8 * PAGE, 2 * PAGE)
    c.dma_unmap(0, 0, flags=vu.UNMAP_ALL)
    os.close(fd)
    wait_log(device, "DMA map [0x100000000, +0x4000) fd=True", 2)

    # SET_IRQS with eventfds, a queue completion, then software triggers.
    tx_completion(c, db)
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    try:
        c.ok(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_TRIGGER,
                                                 vu.PCI_MSIX_IRQ, 5, 3), efds)
        c.ok(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_TRIGGER,
                                                 vu.PCI_MSIX_IRQ, 5, 1))
        c.ok(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(23, vu.IRQ_SET_DATA_BOOL | vu.IRQ_SET_ACTION_TRIGGER,
                                                 vu.PCI_MSIX_IRQ, 5, 3) + b"\x00\x00\x01")
        fired = [bool(select.select([e], [], [], 0.2)[0]) for e in efds]
        assert fired == [True, False, True]
        # Mask/unmask are accepted (QEMU masks by swapping eventfds).
        c.ok(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_MASK,
                                                 vu.PCI_MSIX_IRQ, 0, 1))
        c.ok(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_UNMASK,
                                                 vu.PCI_MSIX_IRQ, 0, 1))
        # Disable the whole index: a later trigger reaches no fd.
        for e in (efds[0], efds[2]):
            os.read(e, 8)
        c.ok(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_TRIGGER,
                                                 vu.PCI_MSIX_IRQ, 0, 0))
        c.ok(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_TRIGGER,
                                                 vu.PCI_MSIX_IRQ, 5, 1))
        assert not select.select(efds, [], [], 0.1)[0]
    finally:
        for e in efds:
            os.close(e)

    # DEVICE_RESET: registers and config space back to their reset values.
    assert c.rd32(hw.REG_CTRL) == hw.CTRL_ENABLE
    c.ok(vu.DEVICE_RESET)
    assert c.rd32(hw.REG_MTU) == 1500 and c.rd32(hw.REG_CTRL) == 0
    assert c.rd32(hw.REG_MAC_LO) == 0x001EC402 and c.cfg(0x10, 4) == 0 and c.cfg(0x04, 2) == 0
    assert c.rd32(hw.qreg(0, "Q_STATUS")) == 0
    assert "device reset by client" in device.log_text()
    # Leave state behind: the next client must not see it.
    c.write(vu.PCI_CONFIG_REGION, 0x10, b"\xff\xff\xff\xff")
    c.write(vu.PCI_CONFIG_REGION, 0x04, b"\x06\x00")
    c.wr32(hw.REG_MTU, 9000)
    db.close()
    c.close()

    # The next client gets the same clean session.
    wait_log(device, "client detached", 1)
    full_session(device)


def test_pci_id_is_configurable(tmp_path):
    """`chimney device --pci-id`: config space presents that vendor:device, and
    keeps it (read-only) through a write and a device reset."""
    dev = start_device(tmp_path, pci_id="c41e:0a01")
    try:
        c = Raw(dev)
        c.version()
        assert (c.cfg(0x00, 2), c.cfg(0x02, 2)) == (0xC41E, 0x0A01)
        assert c.cfg(0x09, 3) == 0x020000               # the rest of its identity as before
        c.write(vu.PCI_CONFIG_REGION, 0x00, b"\x34\x12")
        c.ok(vu.DEVICE_RESET, b"")
        assert c.cfg(0x00, 4) == 0x0A01C41E
        c.close()
    finally:
        check_stopped_cleanly(dev)


def test_short_version_request_gets_a_reply_that_fits(device):
    """QEMU reads the VERSION reply into a buffer the size of its request."""
    c = Raw(device)
    for text in (b'{"capabilities":{}}\0', b""):
        r = c.ok(vu.VERSION, vu.VERSION_HDR.pack(0, 0) + text)
        reply = r.body[vu.VERSION_HDR.size:]
        assert len(reply) <= len(text)
        if reply:
            assert json.loads(reply[:-1]) is not None and reply.endswith(b"\0")
        c.close()
        wait_log(device, "client detached", 1 if text else 2)
        c = Raw(device)
    c.close()


# ================================================================================
# Invalid messages that get an error reply; the connection goes on
# ================================================================================
# Each case gets a fresh device and a negotiated connection, sends something
# invalid and checks the exact errno (Raw.fail also checks the log line).
ERROR_CASES = {}


def case(fn):
    ERROR_CASES[fn.__name__] = fn
    return fn


@case
def unknown_command_99(c):
    c.fail(99, b"", errno.ENOSYS)
    c.fail(0, b"\0" * 8, errno.ENOSYS)


@case
def unsupported_commands(c):
    c.fail(vu.DMA_READ, struct.pack("<QQ", IOVA, 8), errno.ENOTSUP)
    c.fail(vu.DMA_WRITE, struct.pack("<QQ", IOVA, 4) + b"abcd", errno.ENOTSUP)
    c.fail(vu.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 16, 0, 0, 0), errno.ENOTSUP)
    c.fail(vu.DIRTY_PAGES, struct.pack("<II", 8, 0), errno.ENOTSUP)
    c.fail(vu.REGION_WRITE_MULTI, b"\0" * 24, errno.ENOTSUP)


@case
def version_twice(c):
    c.fail(vu.VERSION, vu.VERSION_HDR.pack(0, 0) + json.dumps(CAPS).encode() + b"\0", errno.EINVAL)


@case
def dma_map_payload_short_and_long(c):
    good = vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA, PAGE)
    c.fail(vu.DMA_MAP, good[:24], errno.EINVAL)
    c.fail(vu.DMA_MAP, good + b"\0" * 8, errno.EINVAL)
    c.fail(vu.DMA_MAP, b"", errno.EINVAL)


@case
def dma_map_bad_argsz(c):
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(16, 3, 0, IOVA, PAGE), errno.EINVAL)
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(0xFFFFFFFF, 3, 0, IOVA, PAGE), errno.EINVAL)


@case
def dma_map_bad_flags(c):
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 4, 0, IOVA, PAGE), errno.EINVAL)


@case
def dma_map_unaligned(c):
    fd = memfd(4 * PAGE)
    try:
        for offset, iova, size in ((0, IOVA + 0x800, PAGE), (0, IOVA, PAGE + 1), (0, IOVA, 0),
                                   (0x200, IOVA, PAGE)):
            c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, offset, iova, size), errno.EINVAL,
                   fds=[fd])
    finally:
        os.close(fd)
    c.dma_map(IOVA, PAGE)           # nothing was recorded: the range is free


@case
def dma_map_overlap(c):
    fd = memfd(16 * PAGE)
    try:
        c.dma_map(IOVA, 8 * PAGE, fd)
        for iova, size in ((IOVA, 8 * PAGE), (IOVA - PAGE, 2 * PAGE), (IOVA + 7 * PAGE, 2 * PAGE),
                           (IOVA + 2 * PAGE, PAGE), (IOVA - PAGE, 10 * PAGE)):
            c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, iova, size), errno.EEXIST, fds=[fd])
        c.dma_map(IOVA + 8 * PAGE, 8 * PAGE, fd, offset=8 * PAGE)     # adjacent is fine
        c.dma_map(IOVA - PAGE, PAGE)
    finally:
        os.close(fd)


@case
def dma_map_beyond_fd_size(c):
    """offset+size beyond the memfd: refused (an access there would SIGBUS the
    device), nothing recorded, and a valid map + queue work afterwards."""
    fd = memfd(4 * PAGE)
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA, 8 * PAGE), errno.EINVAL, fds=[fd])
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 2 * PAGE, IOVA, 4 * PAGE), errno.EINVAL, fds=[fd])
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 1 << 62, IOVA, PAGE), errno.EINVAL, fds=[fd])
    os.close(fd)
    db = c.region_info(hw.BAR_DOORBELL, 64)
    page = mmap.mmap(db.fds[0], hw.BAR_DOORBELL_SIZE)
    try:
        tx_completion(c, page)      # maps 1 MiB at the same IOVA and runs a queue on it
    finally:
        page.close()


@case
def dma_map_not_mappable_fd(c):
    r, w = os.pipe()
    try:
        c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA, PAGE), errno.EINVAL, fds=[r])
        ro = os.open("/proc/self/cmdline", os.O_RDONLY)
        c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA, PAGE), errno.EINVAL, fds=[ro])
        os.close(ro)
    finally:
        os.close(r)
        os.close(w)


@case
def dma_map_two_fds(c):
    fd1, fd2 = memfd(PAGE), memfd(PAGE)
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA, PAGE), errno.EINVAL, fds=[fd1, fd2])
    os.close(fd1)
    os.close(fd2)


@case
def dma_map_wraps_past_2_64(c):
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, (1 << 64) - PAGE, 2 * PAGE), errno.EINVAL)
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 1, 0, 1 << 63, 1 << 63 | PAGE), errno.EINVAL)
    # Ending exactly at 2^64 is fine (QEMU's sweeps and ROM ranges do).
    c.dma_map(0xFEF00000, (1 << 64) - 0xFEF00000, flags=vu.DMA_READ_FLAG)
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 1, 0, (1 << 64) - PAGE, PAGE), errno.EEXIST)
    c.dma_unmap(0xFEF00000, 0xFFFFFFFF01100000)


@case
def dma_unmap_splits_a_mapping(c):
    fd = memfd(8 * PAGE)
    c.dma_map(IOVA, 8 * PAGE, fd)
    os.close(fd)
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, 0, IOVA, 4 * PAGE), errno.EINVAL)
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, 0, IOVA + PAGE, 8 * PAGE), errno.EINVAL)
    # Still mapped whole: mapping over it is refused, unmapping it works.
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA + 4 * PAGE, PAGE), errno.EEXIST)
    c.dma_unmap(IOVA - PAGE, 10 * PAGE)
    c.dma_map(IOVA + 4 * PAGE, PAGE)


@case
def dma_unmap_dirty_bitmap(c):
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, vu.UNMAP_GET_DIRTY_BITMAP, IOVA, PAGE), errno.ENOTSUP)


@case
def dma_unmap_bad_flags_and_sizes(c):
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, 4, IOVA, PAGE), errno.EINVAL)
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, vu.UNMAP_ALL, IOVA, PAGE), errno.EINVAL)
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(16, 0, IOVA, PAGE), errno.EINVAL)
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, 0, IOVA, PAGE)[:20], errno.EINVAL)
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, 0, IOVA + 1, PAGE), errno.EINVAL)
    c.fail(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, 0, (1 << 64) - PAGE, 2 * PAGE), errno.EINVAL)


@case
def region_info_bad_index_and_argsz(c):
    for index in (9, 200, 0xFFFFFFFF):
        c.fail(vu.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, index, 0, 0, 0), errno.EINVAL)
    c.fail(vu.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(16, 0, 0, 0, 0, 0), errno.EINVAL)
    c.fail(vu.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, 0, 0, 0, 0)[:16], errno.EINVAL)


@case
def device_and_irq_info_bad(c):
    c.fail(vu.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(8, 0, 0, 0), errno.EINVAL)
    c.fail(vu.DEVICE_GET_INFO, b"", errno.EINVAL)
    c.fail(vu.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, 5, 0), errno.EINVAL)
    c.fail(vu.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(4, 0, 2, 0), errno.EINVAL)
    c.fail(vu.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, 2, 0) + b"\0", errno.EINVAL)


@case
def region_rw_bad_region(c):
    for region in (9, 200, 0xFFFFFFFF, 1, 6, 8):     # nonexistent, or present with size 0
        c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, region, 4), errno.EINVAL)
        c.fail(vu.REGION_WRITE, vu.REGION_RW.pack(0, region, 4) + b"abcd", errno.EINVAL)


@case
def region_rw_beyond_end(c):
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(hw.BAR_REGS_SIZE - 4, 0, 8), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(hw.BAR_REGS_SIZE, 0, 4), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(4094, 7, 4), errno.EINVAL)
    c.fail(vu.REGION_WRITE, vu.REGION_RW.pack(0xFFC, 2, 8) + bytes(8), errno.EINVAL)
    assert c.read(7, 4092, 4) == bytes(4)            # the last dword is fine


@case
def region_rw_offset_overflow(c):
    for region in (0, 2, 7):
        c.fail(vu.REGION_READ, vu.REGION_RW.pack((1 << 64) - 4, region, 8), errno.EINVAL)
        c.fail(vu.REGION_WRITE, vu.REGION_RW.pack((1 << 64) - 4, region, 8) + bytes(8), errno.EINVAL)


@case
def region_rw_count_zero_or_huge(c):
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 7, 0), errno.EINVAL)
    c.fail(vu.REGION_WRITE, vu.REGION_RW.pack(0, 7, 0), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 7, vu.MAX_DATA_XFER + 1), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 7, 0xFFFFFFFF), errno.EINVAL)


@case
def region_rw_length_mismatch(c):
    c.fail(vu.REGION_WRITE, vu.REGION_RW.pack(hw.REG_MTU, 0, 4) + b"\x00\x10", errno.EINVAL)
    c.fail(vu.REGION_WRITE, vu.REGION_RW.pack(hw.REG_MTU, 0, 4) + bytes(8), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(hw.REG_MTU, 0, 4) + bytes(4), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 4)[:12], errno.EINVAL)
    assert c.rd32(hw.REG_MTU) == 1500                 # no half-done write


@case
def bar0_unaligned_or_narrow(c):
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(2, 0, 4), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 2), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 1), errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(4, 0, 8), errno.EINVAL)
    c.fail(vu.REGION_WRITE, vu.REGION_RW.pack(hw.REG_MTU + 1, 0, 4) + bytes(4), errno.EINVAL)
    c.fail(vu.REGION_WRITE, vu.REGION_RW.pack(hw.REG_MTU, 0, 2) + b"\x00\x10", errno.EINVAL)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 16), errno.EINVAL)
    assert c.rd32(hw.REG_MTU) == 1500


def _irq_set(flags, index, start, count, data=b""):
    return vu.IRQ_SET.pack(20 + len(data), flags, index, start, count) + data


EVT_TRIG = vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_TRIGGER
NONE_TRIG = vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_TRIGGER


@case
def set_irqs_bad_index(c):
    for index in (9, 5, 0xFFFFFFFF):
        c.fail(vu.DEVICE_SET_IRQS, _irq_set(NONE_TRIG, index, 0, 0), errno.EINVAL)
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(NONE_TRIG, vu.PCI_INTX_IRQ, 0, 1), errno.EINVAL)


@case
def set_irqs_beyond_32_vectors(c):
    for start, count in ((30, 3), (33, 0), (0, 33), (1, 0xFFFFFFFF), (0xFFFFFFFF, 2)):
        c.fail(vu.DEVICE_SET_IRQS, _irq_set(NONE_TRIG, vu.PCI_MSIX_IRQ, start, count), errno.EINVAL)
    c.ok(vu.DEVICE_SET_IRQS, _irq_set(NONE_TRIG, vu.PCI_MSIX_IRQ, 31, 1))


@case
def set_irqs_bad_flag_combinations(c):
    for flags in (vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_DATA_BOOL | vu.IRQ_SET_ACTION_TRIGGER,
                  vu.IRQ_SET_DATA_NONE | vu.IRQ_SET_ACTION_MASK | vu.IRQ_SET_ACTION_TRIGGER,
                  vu.IRQ_SET_DATA_NONE, vu.IRQ_SET_ACTION_TRIGGER, 0, NONE_TRIG | 0x40):
        c.fail(vu.DEVICE_SET_IRQS, _irq_set(flags, vu.PCI_MSIX_IRQ, 0, 1), errno.EINVAL)


@case
def set_irqs_eventfd_with_mask_action(c):
    e = os.eventfd(0)
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_MASK,
                                        vu.PCI_MSIX_IRQ, 0, 1), errno.EINVAL, fds=[e])
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_UNMASK,
                                        vu.PCI_MSIX_IRQ, 0, 1), errno.EINVAL, fds=[e])
    os.close(e)


@case
def set_irqs_fd_count_mismatch(c):
    efds = [os.eventfd(0) for _ in range(3)]
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, vu.PCI_MSIX_IRQ, 0, 3), errno.EINVAL, fds=efds[:2])
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, vu.PCI_MSIX_IRQ, 0, 1), errno.EINVAL, fds=efds)
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(NONE_TRIG, vu.PCI_MSIX_IRQ, 0, 1), errno.EINVAL, fds=efds[:1])
    for e in efds:
        os.close(e)


@case
def set_irqs_bad_argsz_and_data(c):
    c.fail(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(24, NONE_TRIG, vu.PCI_MSIX_IRQ, 0, 1), errno.EINVAL)
    c.fail(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20, NONE_TRIG, vu.PCI_MSIX_IRQ, 0, 1)[:16], errno.EINVAL)
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(NONE_TRIG, vu.PCI_MSIX_IRQ, 0, 1, b"\x01"), errno.EINVAL)
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(vu.IRQ_SET_DATA_BOOL | vu.IRQ_SET_ACTION_TRIGGER,
                                        vu.PCI_MSIX_IRQ, 0, 3, b"\x01\x01"), errno.EINVAL)
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, vu.PCI_MSIX_IRQ, 0, 1, struct.pack("<i", 5)),
           errno.EINVAL)


@case
def set_irqs_fd_not_an_eventfd(c):
    """A pipe as a vector's 'eventfd' used to kill the device on the next trigger."""
    r, w = os.pipe()
    c.fail(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, vu.PCI_MSIX_IRQ, 0, 1), errno.EINVAL, fds=[r])
    c.ok(vu.DEVICE_SET_IRQS, _irq_set(NONE_TRIG, vu.PCI_MSIX_IRQ, 0, 1))
    os.close(r)
    os.close(w)


@case
def device_reset_with_payload(c):
    c.fail(vu.DEVICE_RESET, b"\0\0\0\0", errno.EINVAL)


@case
def posted_invalid_write_is_logged_not_answered(c):
    mid = c.send(vu.REGION_WRITE, vu.REGION_RW.pack(2, 0, 4) + bytes(4), flags=vu.NO_REPLY)
    assert c.rd32(hw.REG_MTU) == 1500
    assert c.nothing_pending()
    assert_error_logged(c.dev, vu.REGION_WRITE, mid, errno.EINVAL)


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_error_reply(device, name):
    c = negotiated(device)
    ERROR_CASES[name](c)
    c.alive()
    c.close()


def test_command_before_version(device):
    c = Raw(device)
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 4), errno.EINVAL)
    c.fail(vu.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0), errno.EINVAL)
    c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA, PAGE), errno.EINVAL)
    full_session(device, c)         # and then VERSION works on the same connection


BAD_VERSIONS = {
    "major_1": (vu.VERSION_HDR.pack(1, 0) + b"{}\0", errno.ENOTSUP),
    "major_0xffff": (vu.VERSION_HDR.pack(0xFFFF, 0), errno.ENOTSUP),
    "too_short": (b"\0\0", errno.EINVAL),
    "json_not_nul_terminated": (vu.VERSION_HDR.pack(0, 0) + b'{"capabilities":{}}', errno.EINVAL),
    "json_invalid": (vu.VERSION_HDR.pack(0, 0) + b'{"capabilities":\0', errno.EINVAL),
    "json_not_utf8": (vu.VERSION_HDR.pack(0, 0) + b'{"\xff\xfe":1}\0', errno.EINVAL),
    "json_array": (vu.VERSION_HDR.pack(0, 0) + b"[1, 2]\0", errno.EINVAL),
    "capabilities_not_object": (vu.VERSION_HDR.pack(0, 0) + b'{"capabilities":[]}\0', errno.EINVAL),
    "capability_wrong_type": (vu.VERSION_HDR.pack(0, 0) + b'{"capabilities":{"max_msg_fds":"8"}}\0',
                              errno.EINVAL),
    "capability_bool": (vu.VERSION_HDR.pack(0, 0) + b'{"capabilities":{"pgsizes":true}}\0', errno.EINVAL),
    "capability_negative": (vu.VERSION_HDR.pack(0, 0) + b'{"capabilities":{"max_data_xfer_size":-1}}\0',
                            errno.EINVAL),
    # Used to kill the device with RecursionError.
    "json_nested_too_deep": (vu.VERSION_HDR.pack(0, 0) + b"[" * 100_000 + b"\0", errno.EINVAL),
}


@pytest.mark.parametrize("name", list(BAD_VERSIONS))
def test_bad_version(device, name):
    payload, err = BAD_VERSIONS[name]
    c = Raw(device)
    c.fail(vu.VERSION, payload, err)
    # Not negotiated: other commands are still refused, then a good VERSION works.
    c.fail(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 4), errno.EINVAL)
    full_session(device, c)


# ================================================================================
# Broken streams: the server disconnects and is ready for the next client
# ================================================================================
def _detached(device, n=1):
    wait_log(device, "client detached: broken stream", n)


FRAMING_CASES = {
    "size_below_header": lambda c: c.send(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 4), size=8),
    "size_zero": lambda c: c.send(vu.DEVICE_GET_INFO, b"", size=0),
    "size_huge": lambda c: c.send(vu.REGION_WRITE, vu.REGION_RW.pack(0, 7, 4) + bytes(4),
                                  size=vu.MAX_MSG_SIZE + 1),
    "size_4g": lambda c: c.send(vu.REGION_WRITE, b"", size=0xFFFFFFFF),
    "type_reply": lambda c: c.send(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 4), flags=vu.TYPE_REPLY),
    "type_reply_with_error": lambda c: c.send(vu.VERSION, b"", flags=vu.TYPE_REPLY | vu.ERROR),
    "type_unknown": lambda c: c.send(vu.REGION_READ, vu.REGION_RW.pack(0, 0, 4), flags=0x7),
}


@pytest.mark.parametrize("name", list(FRAMING_CASES))
def test_framing_error_disconnects(device, name):
    c = negotiated(device)
    FRAMING_CASES[name](c)
    c.expect_eof()
    c.close()
    _detached(device)
    full_session(device)


def test_too_many_fds_disconnects_without_leaking(device):
    c = negotiated(device)
    c.alive()
    before = fd_count(device)
    efds = [os.eventfd(0) for _ in range(vu.MAX_MSG_FDS + 1)]
    r, w = os.pipe()
    c.send(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, vu.PCI_MSIX_IRQ, 0, len(efds) + 1), fds=efds + [w])
    os.close(w)
    c.expect_eof()
    c.close()
    _detached(device)
    wait_log(device, "device reset for the next client")      # logged after the fds are closed
    for e in efds:
        os.close(e)
    assert closed_by_peer(r), "the device kept an fd of a refused message"
    os.close(r)
    assert fd_count(device) <= before - 1      # the client's socket is gone too
    full_session(device)


def test_cut_off_mid_body_then_close(device):
    c = negotiated(device)
    c.send_bytes(vu.HDR.pack(7, vu.REGION_WRITE, 16 + 16 + 4, 0, 0) + vu.REGION_RW.pack(0, 7, 4)[:10])
    c.close()
    wait_log(device, "client detached: broken stream: client closed the socket mid-message")
    full_session(device)


def test_cut_off_mid_header_then_close(device):
    c = negotiated(device)
    c.send_bytes(vu.HDR.pack(7, vu.REGION_READ, 32, 0, 0)[:9])
    c.close()
    wait_log(device, "client detached: client closed the socket")
    full_session(device)


def test_stall_mid_body_times_out(device):
    """A client that stops mid-message is cut off after the body timeout (5 s)."""
    c = negotiated(device)
    c.send_bytes(vu.HDR.pack(7, vu.REGION_WRITE, 16 + 16 + 4, 0, 0) + vu.REGION_RW.pack(0, 7, 4))
    took = c.expect_eof(timeout=10.0)
    assert 4.0 <= took <= 8.0, f"disconnected after {took:.1f} s"
    c.close()
    _detached(device)
    assert "timed out" in device.log_text()
    full_session(device)


def test_second_client_refused_while_one_is_attached(device):
    c = negotiated(device)
    other = Raw(device)
    # the device may hang up before our VERSION is written: that is the refusal too
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        other.send(vu.VERSION, vu.VERSION_HDR.pack(0, 0))
    other.expect_eof()
    other.close()
    c.alive()                       # the first client is undisturbed
    assert "second client refused" in device.log_text()
    c.close()
    wait_log(device, "client detached")
    full_session(device)


# ================================================================================
# File descriptors on messages that take none are closed, never leaked
# ================================================================================
def test_fds_on_fdless_messages_are_closed(device):
    c = negotiated(device)
    c.alive()
    before = fd_count(device)
    pipes = []
    for i, (cmd, payload) in enumerate((
            (vu.REGION_READ, vu.REGION_RW.pack(0, 0, 4)),
            (vu.REGION_WRITE, vu.REGION_RW.pack(hw.REG_MTU, 0, 4) + (1400).to_bytes(4, "little")),
            (vu.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0)),
            (vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, vu.UNMAP_ALL, 0, 0)),
            (vu.DEVICE_RESET, b""),
            (99, b""))):
        for _ in range(5):
            extra = [memfd(PAGE) for _ in range(3)]
            r, w = os.pipe()
            pipes.append(r)
            c.fail(cmd, payload, errno.EINVAL, fds=extra + [w])
            for fd in extra + [w]:
                os.close(fd)
    assert c.rd32(hw.REG_MTU) == 1500          # the write carrying fds was not done
    c.alive()
    assert all(closed_by_peer(r) for r in pipes)
    for r in pipes:
        os.close(r)
    assert fd_count(device) == before
    # Error paths of fd-taking commands close theirs too.
    for _ in range(5):
        fd = memfd(PAGE)
        c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA + 1, PAGE), errno.EINVAL, fds=[fd])
        c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, 3, 0, IOVA, 2 * PAGE), errno.EINVAL, fds=[fd])
        c.fail(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(16, 3, 0, IOVA, PAGE), errno.EINVAL, fds=[fd])
        c.fail(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, 9, 0, 1), errno.EINVAL, fds=[fd])
        os.close(fd)
    assert fd_count(device) == before
    # Replaced eventfds are closed, and a disconnect closes the rest.
    e1 = [os.eventfd(0) for _ in range(4)]
    c.ok(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, vu.PCI_MSIX_IRQ, 0, 4), e1)
    assert fd_count(device) == before + 4
    e2 = [os.eventfd(0) for _ in range(4)]
    c.ok(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, vu.PCI_MSIX_IRQ, 0, 4), e2)
    assert fd_count(device) == before + 4
    c.ok(vu.DEVICE_SET_IRQS, _irq_set(EVT_TRIG, vu.PCI_MSIX_IRQ, 2, 2))     # no fds: vectors off
    assert fd_count(device) == before + 2
    c.close()
    wait_log(device, "device reset for the next client")      # logged after the fds are closed
    for e in e1 + e2:
        os.close(e)
    assert fd_count(device) == before - 1      # the client's socket, and its vectors, gone


# ================================================================================
# Fuzz: random messages never kill the device
# ================================================================================
INTERESTING = (0, 1, 2, 3, 4, 7, 8, 16, 0x20, 0x1000, 0xFFF, 0x4000, 0x7FFFFFFF, 0xFFFFFFFF,
               1 << 32, IOVA, (1 << 63), (1 << 64) - 1, (1 << 64) - PAGE)


def _templates(rnd: random.Random):
    """Semi-valid payloads with random fields, to get past the first checks."""
    def v(bits):
        x = rnd.choice(INTERESTING) if rnd.random() < 0.6 else rnd.getrandbits(bits)
        return x & ((1 << bits) - 1)
    return {
        vu.DMA_MAP: lambda: vu.DMA_MAP_MSG.pack(32, v(2), v(64) & ~0xFFF, IOVA + (v(20) << 12), v(24) << 12),
        vu.DMA_UNMAP: lambda: vu.DMA_UNMAP_MSG.pack(24, v(2), v(64), v(64)),
        vu.DEVICE_GET_INFO: lambda: vu.DEVICE_INFO.pack(v(32), 0, 0, 0),
        vu.DEVICE_GET_REGION_INFO: lambda: vu.REGION_INFO.pack(v(8), 0, v(4), 0, 0, 0),
        vu.DEVICE_GET_IRQ_INFO: lambda: vu.IRQ_INFO.pack(16, 0, v(3), 0),
        vu.DEVICE_SET_IRQS: lambda: vu.IRQ_SET.pack(20, v(6), v(2) + 1, v(6), v(6)),
        vu.REGION_READ: lambda: vu.REGION_RW.pack(v(14) & ~3, rnd.choice((0, 2, 4, 7, 9)), rnd.choice((1, 2, 4, 8))),
        vu.REGION_WRITE: lambda: (lambda off, reg, n: vu.REGION_RW.pack(off, reg, n) + rnd.randbytes(n))(
            rnd.choice((v(14) & ~3, hw.Q_BASE + rnd.randrange(0x200), hw.REG_CTRL, hw.REG_MAC_LO)),
            rnd.choice((0, 0, 2, 7)), rnd.choice((4, 8))),
    }


def test_fuzz_random_messages(device):
    rnd = random.Random(0xC41E)
    c = negotiated(device)
    # Give the data path something to chew on: RAM, a doorbell page, vectors.
    fd = memfd(1 << 20)
    c.dma_map(IOVA, 1 << 20, fd)
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(hw.MSIX_VECTORS)]
    set_eventfds(c, efds)
    templates = _templates(rnd)
    errors = 0
    for i in range(300):
        cmd = rnd.randrange(21)
        if cmd == vu.VERSION:
            cmd = vu.DEVICE_RESET if rnd.random() < 0.5 else cmd
        if cmd in templates and rnd.random() < 0.7:
            payload = templates[cmd]()
        else:
            payload = rnd.randbytes(rnd.randrange(257))
        r = c.req(cmd, payload)
        if r.flags & vu.ERROR:
            errors += 1
            assert r.err in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EEXIST, errno.ENOSPC), \
                f"message {i}: cmd {cmd} errno {r.err}"
            assert r.body == b""
        if i % 50 == 49:            # doorbells at random too
            db = c.region_info(hw.BAR_DOORBELL, 64)
            page = mmap.mmap(db.fds[0], hw.BAR_DOORBELL_SIZE)
            page[0:0x40] = rnd.randbytes(0x40)
            page.close()
            c.wr32(hw.REG_CTRL, hw.CTRL_ENABLE)
        assert device.proc.poll() is None, f"device died at message {i}:\n{device.log_text()[-3000:]}"
    assert errors > 100, "the fuzz hardly reached the error paths"
    assert len(re.findall(r"^.* vfio-user .* id=\d+: .* -> E[A-Z]+$", device.log_text(), re.M)) == errors
    c.alive()
    c.close()
    for e in efds:
        os.close(e)
    os.close(fd)
    wait_log(device, "client detached")
    full_session(device)
