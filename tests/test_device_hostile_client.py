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
import socket
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


def vm_rss(dev) -> int:
    with open(f"/proc/{dev.proc.pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def fd_targets(dev) -> list[str]:
    """What the device's fds are (for failure messages)."""
    out = []
    for fd in os.listdir(f"/proc/{dev.proc.pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{dev.proc.pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


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


# ================================================================================
# A long seeded stream of random, malformed and broken messages, fds included
# ================================================================================
REGION_SIZES = {0: hw.BAR_REGS_SIZE, 2: hw.BAR_DOORBELL_SIZE, 4: hw.BAR_MSIX_SIZE, 7: 4096}
EDGES = (0, 1, 2, 3, 4, 7, 8, 16, 0xFFF, 0x1000, 0x3FFC, 0x4000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32,
         (1 << 63), (1 << 64) - 1, (1 << 64) - PAGE)
REPLY_ERRNOS = {errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EEXIST, errno.ENOSPC}


class Fuzzer:
    """Builds one message at a time: its bytes, the fds to attach, and what the
    device must do with it (reply, stay silent, or hang up)."""

    def __init__(self, rnd: random.Random):
        self.rnd = rnd
        self.msg_id = 0

    def field(self, bits: int) -> int:
        x = self.rnd.choice(EDGES) if self.rnd.random() < 0.5 else self.rnd.getrandbits(bits)
        return x & ((1 << bits) - 1)

    def fds(self) -> list[int]:
        """0..3 fds of kinds a client might attach, right or wrong."""
        out = []
        for _ in range(self.rnd.choice((0, 0, 0, 1, 1, 2, 3))):
            kind = self.rnd.randrange(4)
            if kind == 0:
                fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
                os.ftruncate(fd, self.rnd.choice((0, 1, 4, 16)) * PAGE)
            elif kind == 1:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            elif kind == 2:
                r, fd = os.pipe()
                os.close(r)
            else:
                fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            out.append(fd)
        return out

    def payload(self, cmd: int, nfds: int) -> bytes:
        rnd, f = self.rnd, self.field
        if rnd.random() < 0.25:
            return rnd.randbytes(rnd.choice((0, 1, 4, 15, 16, 24, 31, 32, 33, rnd.randrange(300))))
        if cmd == vu.DMA_MAP:
            return vu.DMA_MAP_MSG.pack(rnd.choice((32, 32, f(32))), f(3), rnd.choice((0, PAGE, f(64))),
                                       rnd.choice((0x50_0000_0000 + (rnd.randrange(64) << 12), f(64))),
                                       rnd.choice((PAGE, 4 * PAGE, f(64))))
        if cmd == vu.DMA_UNMAP:
            return vu.DMA_UNMAP_MSG.pack(rnd.choice((24, f(32))), f(2),
                                         rnd.choice((0x50_0000_0000, f(64))), rnd.choice((PAGE, f(64))))
        if cmd == vu.DEVICE_SET_IRQS:
            count = nfds if rnd.random() < 0.6 else f(6)
            flags = rnd.choice((vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_TRIGGER, f(8)))
            return vu.IRQ_SET.pack(20, flags, rnd.choice((vu.PCI_MSIX_IRQ, f(3))), f(6) if rnd.random() < 0.3 else 0,
                                   count)
        if cmd in (vu.REGION_READ, vu.REGION_WRITE):
            region = rnd.choice((0, 2, 4, 7, 1, 6, 8, 9, f(32)))
            size = REGION_SIZES.get(region, PAGE)
            count = rnd.choice((1, 2, 4, 8, 4, 8, f(32) & 0x1FFFFF))
            offset = rnd.choice((rnd.randrange(size) & ~3, size - 4, size - 2, size, f(64)))
            data = rnd.randbytes(min(count, 64)) if cmd == vu.REGION_WRITE else b""
            if cmd == vu.REGION_WRITE and rnd.random() < 0.8:
                data = rnd.randbytes(count) if count <= 4096 else data
            return vu.REGION_RW.pack(offset, region, count) + data
        if cmd == vu.DEVICE_GET_REGION_INFO:
            return vu.REGION_INFO.pack(rnd.choice((32, 64, f(32))), 0, f(4), 0, 0, 0)
        if cmd == vu.DEVICE_GET_IRQ_INFO:
            return vu.IRQ_INFO.pack(rnd.choice((16, f(32))), 0, f(3), 0)
        if cmd == vu.DEVICE_GET_INFO:
            return vu.DEVICE_INFO.pack(rnd.choice((16, f(32))), 0, 0, 0)
        if cmd == vu.VERSION:
            return vu.VERSION_HDR.pack(rnd.choice((0, 0, 1)), f(16)) + rnd.choice(
                (b"{}\0", b'{"capabilities":{"max_msg_fds":8}}\0', rnd.randbytes(20)))
        return rnd.randbytes(rnd.randrange(64))

    def message(self) -> tuple[bytes, list[int], str]:
        """(bytes, fds, expect): expect is "reply", "silent" or "hangup"."""
        rnd = self.rnd
        cmd = rnd.choice((*range(1, 16), *range(1, 16), 0, 16, 99, 0xFFFF))
        fds = self.fds()
        body = self.payload(cmd, len(fds))
        self.msg_id = (self.msg_id + 1) & 0xFFFF
        flags, size, expect = 0, vu.HDR_SIZE + len(body), "reply"
        roll = rnd.random()
        if roll < 0.08:
            flags, expect = vu.NO_REPLY, "silent"
        elif roll < 0.10:
            flags, expect = rnd.choice((vu.TYPE_REPLY, 0x7, vu.TYPE_REPLY | vu.ERROR)), "hangup"
        elif roll < 0.12:
            size, body, expect = rnd.randrange(vu.HDR_SIZE), b"", "hangup"
        elif roll < 0.13:
            size, body, expect = rnd.choice((vu.MAX_MSG_SIZE + 1, 0xFFFFFFFF)), b"", "hangup"
        return vu.HDR.pack(self.msg_id, cmd, size, flags, 0) + body, fds, expect


class FuzzClient:
    """A raw connection: send bytes with fds, read one reply or the hang-up."""

    def __init__(self, dev):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(dev.socket)

    def send(self, data: bytes, fds=()) -> None:
        vu.send_msg(self.s, data, fds)

    def recv(self):
        """(header tuple, body) of one reply, or None on hang-up.  Fds are closed."""
        fds: list[int] = []
        try:
            raw = vu.recv_exact(self.s, vu.HDR_SIZE, fds)
            hdr = vu.HDR.unpack(raw) if raw else None
            body = vu.recv_exact(self.s, hdr[2] - vu.HDR_SIZE, fds) if hdr and hdr[2] > vu.HDR_SIZE else b""
        except ConnectionResetError:
            hdr = None
        finally:
            for fd in fds:
                os.close(fd)
        return None if hdr is None else (hdr, body)

    def close(self):
        self.s.close()


def test_fuzz_stream_with_fds_and_broken_framing(device):
    """3,000 seeded messages: random commands (known, unknown, unsupported),
    semi-valid and random payloads, wrong sizes and argsz, out-of-range region
    accesses, fds of every kind attached to any command, NO_REPLY, bad types,
    sizes outside the framing, and connections cut mid-message.  Each gets an
    error reply with an errno, silence (NO_REPLY) or a clean hang-up, as it
    should; afterwards the device answers VERSION and region reads, its
    heartbeat runs and every fd it was given is closed."""
    rnd = random.Random(0xF0221E)
    fz = Fuzzer(rnd)
    fd_base, mem_base = fd_count(device), memfd_bytes(device)
    seen = {"reply": 0, "error": 0, "silent": 0, "hangup": 0, "cut": 0, "fds": 0}
    detaches = 0
    c = None
    for i in range(3000):
        if c is None:
            c = FuzzClient(device)
            if rnd.random() < 0.9:          # sometimes stay un-negotiated for a while
                c.send(vu.HDR.pack(0, vu.VERSION, vu.HDR_SIZE + 7, 0, 0) + vu.VERSION_HDR.pack(0, 0) + b"{}\0")
                (hdr, _) = c.recv()
                assert not hdr[3] & vu.ERROR, f"VERSION refused on a fresh connection: {hdr}"
        data, fds, expect = fz.message()
        seen["fds"] += len(fds)
        if rnd.random() < 0.01:             # cut off mid-message, then gone
            c.send(data[:rnd.randrange(1, max(2, len(data)))], fds)
            expect = "cut"
        else:
            c.send(data, fds)
        for fd in fds:
            os.close(fd)
        what = f"message {i} ({vu.HDR.unpack_from(data)}, {len(fds)} fds, expect {expect})"
        if expect == "silent":              # a request that must be answered shows it was consumed
            c.send(vu.HDR.pack(0xFFFF, vu.DEVICE_GET_INFO, 32, 0, 0) + vu.DEVICE_INFO.pack(16, 0, 0, 0))
        if expect in ("reply", "silent"):
            got = c.recv()
            assert got is not None, f"device hung up on {what}:\n{device.log_text()[-2000:]}"
            (mid, cmd, size, flags, err), body = got
            want = vu.HDR.unpack_from(data) if expect == "reply" else (0xFFFF, vu.DEVICE_GET_INFO)
            assert (mid, cmd) == want[:2], f"reply {mid}/{cmd} to {what}"
            assert flags & vu.TYPE_MASK == vu.TYPE_REPLY and size == vu.HDR_SIZE + len(body)
            if flags & vu.ERROR and expect == "reply":
                assert err in REPLY_ERRNOS and body == b"", f"errno {err} for {what}"
                seen["error"] += 1
            else:
                seen[expect if expect == "silent" else "reply"] += 1
            continue
        if expect == "hangup":
            assert c.recv() is None, f"no hang-up after {what}"
        c.close()
        c = None
        seen["hangup" if expect == "hangup" else "cut"] += 1
        detaches += 1
        wait_log(device, "client detached", detaches)
        assert device.alive, f"device died after {what}:\n{device.log_text()[-3000:]}"
    assert all(seen[k] >= 10 for k in seen), f"the fuzz missed some paths: {seen}"
    if c is not None:
        c.close()
        detaches += 1
        wait_log(device, "client detached", detaches)
    wait_log(device, "device reset for the next client", detaches)
    # Still the device it was: VERSION, region reads, a running heartbeat.
    bus = VfioUserBus(device.socket)
    try:
        assert bus.reg_read(hw.BAR_REGS, hw.REG_ID) == hw.reg("ID").reset
        assert bus.config_read(0, 2) == hw.PCI_VENDOR_ID
        assert heartbeat_moves(bus.map_bar(hw.BAR_DOORBELL))
    finally:
        bus.close()
    wait_log(device, "device reset for the next client", detaches + 1)
    assert fd_count(device) == fd_base, f"the device kept fds it was given: {fd_targets(device)}"
    assert memfd_bytes(device) == mem_base, "the device kept memory it was given"


# ================================================================================
# Attach and detach, over and over: nothing accumulates
# ================================================================================
def test_attach_detach_cycles_leave_nothing_behind(device):
    """200 full host-bus sessions (VERSION, region infos with the doorbell fd,
    guest RAM, eventfd vectors, now and then a brought-up miniport), each detached: the
    device's fds and mapped memory come back to the same figures every time,
    and its resident memory does not grow."""
    fd_base, mem_base = fd_count(device), memfd_bytes(device)
    rss_warm = None
    for i in range(200):
        bus = VfioUserBus(device.socket, ram_size=1 << 20)
        try:
            if i % 20 == 0:             # now and then the whole driver, and a frame
                mp = Miniport(bus, ring_size=16)
                mp.up()
                mp.send(FRAME)
                assert mp.flush_tx(5)
            else:
                bus.enable_msix(vu.MAX_MSG_FDS)
                assert bus.reg_read(hw.BAR_REGS, hw.REG_ID) == hw.reg("ID").reset
        finally:
            bus.close()
        wait_log(device, "device reset for the next client", i + 1)
        assert (fd_count(device), memfd_bytes(device)) == (fd_base, mem_base), f"after session {i + 1}"
        if i == 19:                     # warmed up: every code path has run
            rss_warm = vm_rss(device)
    # Resident memory does not grow with sessions (slack: allocator pages, not sessions).
    assert vm_rss(device) <= rss_warm + (512 << 10), (rss_warm, vm_rss(device))
    assert device.alive
