"""Guest addresses outside every DMA mapping, on the host bus with the miniport.

An address outside the mappings is a guest error: the device reports it
(descriptor status, dma_errors, DMA_ERR_ADDR/INFO, CAUSE, the misc vector),
stops only what it must, and keeps serving.  Most cases need no wire (a frame
sent without one is counted as a drop); the ones that count frames on the wire
or need a received frame use a TAP in a namespace of their own (root only).
"""
from __future__ import annotations

import mmap
import os
import struct
import time

import pytest
from conftest import check_stopped_cleanly, start_device

from chimney import hw
from chimney import vfio_user as vu
from chimney.guest.bringup import bring_up
from chimney.guest.bus.vfio_user import RAM_IOVA
from chimney.guest.miniport import DESC, RXQ, TXQ

BAD = 0xDEAD_0000_0000          # far from the host bus's RAM at 4 GiB
TAP = "chdma0"
FRAME = bytes.fromhex("ffffffffffff02c41e0000ff88b5") + bytes(range(46))


def can_wire() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


class Nic:
    """A brought-up miniport on the host bus, and its device."""

    def __init__(self, dev, ns=None):
        self.dev, self.ns = dev, ns
        self.g = bring_up(socket=dev.socket, ring_size=16, stack=False)
        self.bus, self.mp = self.g.bus, self.g.mp

    def close(self):
        self.bus.close()
        check_stopped_cleanly(self.dev)
        if self.ns:
            self.ns.delete()

    @property
    def wired(self) -> bool:
        return self.ns is not None

    def stats(self) -> dict[str, int]:
        return self.mp.stats()

    def arm_misc(self):
        self.bus.clear_irq(hw.VECTOR_MISC)
        struct.pack_into("<I", self.mp.db, hw.DB_ARM_BASE + 4 * hw.VECTOR_MISC, 1)

    def qstatus(self, qid: int) -> int:
        return self.mp.rd(hw.qreg(qid, "Q_STATUS"))

    def post_tx(self, descs) -> list[int]:
        """Post raw TX descriptors (addr, len, flags) on queue 0 and ring;
        returns their ring slots."""
        mp, slots = self.mp, []
        for addr, length, flags in descs:
            slot = mp.tx_tail % mp.ring_size
            hw.TxDesc.pack_into(mp.tx_ring.mem, slot * DESC, addr=addr, len=length, flags=flags)
            mp.tx_tail += 1
            slots.append(slot)
        mp._ring(TXQ, mp.tx_tail)
        return slots

    def tx_status(self, slot: int) -> int:
        return hw.TxDesc.unpack_from(self.mp.tx_ring.mem, slot * DESC)["status"]

    def dma_map(self, iova, size, fd, flags=vu.DMA_READ_FLAG | vu.DMA_WRITE_FLAG, offset=0):
        self.bus.client.request(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, flags, offset, iova, size), [fd])

    def dma_unmap(self, iova, size):
        self.bus.client.request(vu.DMA_UNMAP, vu.DMA_UNMAP_MSG.pack(24, 0, iova, size))


def start_nic(tmp_path, wired: bool) -> Nic:
    if not wired:
        return Nic(start_device(tmp_path))
    from chimney.host.netns import Netns
    ns = Netns("dmaerr")
    try:
        # No IPv6 chatter from the namespace's kernel into our RX ring.
        for key in ("all", "default"):
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        dev = start_device(tmp_path, tap=TAP, netns=ns.name)
    except BaseException:
        ns.delete()
        raise
    try:
        return Nic(dev, ns)
    except BaseException:
        check_stopped_cleanly(dev)
        ns.delete()
        raise


@pytest.fixture(params=["nowire", "tap"])
def nic(request, tmp_path):
    wired = request.param == "tap"
    if wired and not can_wire():
        pytest.skip("a TAP in a network namespace needs root")
    n = start_nic(tmp_path, wired)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def wired_nic(tmp_path):
    if not can_wire():
        pytest.skip("a TAP in a network namespace needs root")
    n = start_nic(tmp_path, True)
    try:
        yield n
    finally:
        n.close()


def wait_until(cond, timeout=3.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


def assert_reported(n: Nic, addr: int, qid: int, count: int, cause: int):
    assert n.mp.rd(hw.REG_DMA_ERR_ADDR, 8) == addr
    assert n.mp.rd(hw.REG_DMA_ERR_ADDR) == addr & 0xFFFFFFFF
    assert n.mp.rd(hw.REG_DMA_ERR_ADDR + 4) == addr >> 32
    info = n.mp.rd(hw.REG_DMA_ERR_INFO)
    assert (info & 0xFF, info >> 8) == (qid, count), f"DMA_ERR_INFO {info:#x}"
    assert n.mp.rd(hw.REG_CAUSE) == cause
    assert n.mp.rd(hw.REG_CAUSE) == 0                 # read clears
    assert n.bus.wait_irq(hw.VECTOR_MISC, 2.0), "no misc interrupt for the DMA error"


# ================================================================================
# TX buffers outside the mappings
# ================================================================================
def test_tx_buffer_outside_dma_space(nic):
    n, mp = nic, nic.mp
    assert n.mp.rd(hw.REG_DMA_ERR_INFO) == 0xFF and n.stats()["dma_errors"] == 0
    n.arm_misc()
    (slot,) = n.post_tx([(BAD, 60, hw.TXF_EOP)])
    assert mp.flush_tx(), "the bad descriptor was never completed"
    assert n.tx_status(slot) == hw.DESC_DD | hw.DESC_DMA_ERR
    assert mp.tx_errors == 1
    st = n.stats()
    assert st["dma_errors"] == 1 and st["tx_drops"] == 1 and st["tx_frames"] == 0
    assert_reported(n, BAD, TXQ, 1, hw.CAUSE_DMA_ERROR)       # the queue itself runs on
    assert n.qstatus(TXQ) == hw.QSTATUS_ENABLED and n.qstatus(RXQ) == hw.QSTATUS_ENABLED

    # The device keeps serving: a good frame goes out on the same queue.
    mp.send(FRAME)
    assert mp.flush_tx()
    assert n.tx_status((slot + 1) % mp.ring_size) == hw.DESC_DD
    st = n.stats()
    assert st["dma_errors"] == 1 and mp.tx_errors == 1
    if n.wired:
        assert st["tx_frames"] == 1 and st["tx_bytes"] == len(FRAME) and st["tx_drops"] == 1
    else:
        assert st["tx_frames"] == 0 and st["tx_drops"] == 2      # no wire: dropped, not an error
    assert mp.rd(hw.REG_CAUSE) == 0


def test_tx_frame_partly_outside_dma_space(nic):
    """A frame whose second buffer is bad, and a buffer running off the end of
    RAM: whole frames are refused, every descriptor completed with DMA_ERR."""
    n, mp = nic, nic.mp
    good = mp.tx_bufs.iova
    mp.tx_bufs.mem[:60] = FRAME
    end_of_ram = RAM_IOVA + n.bus.ram_size
    n.arm_misc()
    slots = n.post_tx([(good, 30, 0), (BAD + 0x1000, 30, hw.TXF_EOP),
                       (end_of_ram - 20, 60, hw.TXF_EOP),
                       (good, 60, hw.TXF_EOP)])
    assert mp.flush_tx()
    assert [n.tx_status(s) for s in slots] == [hw.DESC_DD | hw.DESC_DMA_ERR] * 3 + [hw.DESC_DD]
    st = n.stats()
    assert st["dma_errors"] == 2
    assert st["tx_frames"] + st["tx_drops"] == 3 and st["tx_frames"] == (1 if n.wired else 0)
    assert_reported(n, end_of_ram - 20, TXQ, 2, hw.CAUSE_DMA_ERROR)


def test_other_tx_queue_unaffected(nic):
    n, mp = nic, nic.mp
    n.post_tx([(BAD, 60, hw.TXF_EOP)])
    assert mp.flush_tx(), "queue 0 did not complete the bad descriptor"
    # Queue 1 brought up afterwards works; queue 0 still works too.
    ring, buf = n.bus.dma_alloc(8 * DESC), n.bus.dma_alloc(4096)
    buf.mem[:60] = FRAME
    q = TXQ + 1
    for name, val in (("Q_BASE_LO", ring.iova & 0xFFFFFFFF), ("Q_BASE_HI", ring.iova >> 32),
                      ("Q_SIZE", 8), ("Q_VECTOR", 1), ("Q_CTRL", 1)):
        mp.wr(hw.qreg(q, name), val)
    assert n.qstatus(q) == hw.QSTATUS_ENABLED
    hw.TxDesc.pack_into(ring.mem, 0, addr=buf.iova, len=60, flags=hw.TXF_EOP)
    mp._ring(q, 1)
    wait_until(lambda: hw.TxDesc.unpack_from(ring.mem, 0)["status"], what="queue 1 completion")
    status = hw.TxDesc.unpack_from(ring.mem, 0)["status"]
    assert status == hw.DESC_DD, f"status {status:#x}"
    assert mp.rd(hw.qreg(q, "Q_HEAD")) == 1
    mp.send(FRAME)
    assert mp.flush_tx(), "queue 0 did not complete a good frame after the error"
    assert mp.tx_errors == 1
    st = n.stats()
    assert st["dma_errors"] == 1
    assert st["tx_frames"] + st["tx_drops"] == 3, st


# ================================================================================
# Rings outside the mappings
# ================================================================================
def _enable(mp, q, base, size=8):
    mp.wr(hw.qreg(q, "Q_CTRL"), 0)
    mp.wr(hw.qreg(q, "Q_BASE_LO"), base & 0xFFFFFFFF)
    mp.wr(hw.qreg(q, "Q_BASE_HI"), base >> 32)
    mp.wr(hw.qreg(q, "Q_SIZE"), size)
    mp.wr(hw.qreg(q, "Q_CTRL"), 1)
    return mp.rd(hw.qreg(q, "Q_STATUS"))


def test_ring_outside_dma_space_fails_enable(tmp_path):
    n = start_nic(tmp_path, False)
    try:
        mp, q = n.mp, TXQ + 2
        end_of_ram = RAM_IOVA + n.bus.ram_size
        for count, (base, size) in enumerate((
                (BAD, 8),                           # nowhere near RAM
                (RAM_IOVA - 0x1000, 8),             # just below it
                (end_of_ram - 64, 8),               # 128-byte ring, half outside
                (RAM_IOVA + 8, 8),                  # inside but not 16-byte aligned
                (RAM_IOVA, 12),                     # size not a power of two
                (RAM_IOVA, 8192)), start=1):        # too big
            n.arm_misc()
            st = _enable(mp, q, base, size)
            assert st == hw.QSTATUS_ERROR, f"ring {base:#x}/{size}: Q_STATUS {st:#x}"
            assert_reported(n, base, q, count, hw.CAUSE_DMA_ERROR | hw.CAUSE_QUEUE_ERROR)
        assert n.stats()["dma_errors"] == 0        # refused at enable: nothing was accessed
        # The queue can still be set up properly afterwards, and the rest runs on.
        ring = n.bus.dma_alloc(8 * DESC)
        assert _enable(mp, q, ring.iova) == hw.QSTATUS_ENABLED
        mp.wr(hw.qreg(q, "Q_CTRL"), 0)
        assert n.qstatus(q) == 0
        mp.send(FRAME)
        assert mp.flush_tx() and mp.tx_errors == 0
    finally:
        n.close()


def test_ring_in_read_only_or_fdless_mapping_fails_enable(tmp_path):
    """The device writes status into rings: a read-only mapping, or one QEMU
    gave without an fd (ROM), cannot hold one."""
    n = start_nic(tmp_path, False)
    try:
        ro_iova, rom_iova = 0x2_0000_0000, 0x3_0000_0000
        fd = os.memfd_create("ro")
        os.ftruncate(fd, 0x10000)
        n.dma_map(ro_iova, 0x10000, fd, flags=vu.DMA_READ_FLAG)
        n.bus.client.request(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(32, vu.DMA_READ_FLAG, 0, rom_iova, 0x10000))
        assert _enable(n.mp, TXQ + 3, ro_iova) == hw.QSTATUS_ERROR
        assert _enable(n.mp, TXQ + 3, rom_iova) == hw.QSTATUS_ERROR
        assert n.mp.rd(hw.REG_DMA_ERR_ADDR, 8) == rom_iova
        # A read-only mapping still serves as a TX buffer (the device only reads it).
        ram = mmap.mmap(fd, 0x10000)
        ram[:60] = FRAME
        (slot,) = n.post_tx([(ro_iova, 60, hw.TXF_EOP)])
        assert n.mp.flush_tx()
        assert n.tx_status(slot) == hw.DESC_DD
        (slot,) = n.post_tx([(rom_iova, 60, hw.TXF_EOP)])           # but never an fd-less one
        assert n.mp.flush_tx()
        assert n.tx_status(slot) == hw.DESC_DD | hw.DESC_DMA_ERR
        ram.close()
        os.close(fd)
    finally:
        n.close()


def test_ring_running_past_2_64_is_refused(tmp_path):
    """The last page of the address space mapped, a ring starting 16 bytes
    before 2^64: the ring check used to overflow and kill the device."""
    n = start_nic(tmp_path, False)
    try:
        fd = os.memfd_create("top")
        os.ftruncate(fd, 0x1000)
        n.dma_map((1 << 64) - 0x1000, 0x1000, fd)
        os.close(fd)
        assert _enable(n.mp, TXQ + 4, (1 << 64) - 16) == hw.QSTATUS_ERROR
        assert n.mp.rd(hw.REG_DMA_ERR_ADDR, 8) == (1 << 64) - 16
        # A ring that ends exactly at 2^64 is fine.
        assert _enable(n.mp, TXQ + 4, (1 << 64) - 8 * DESC) == hw.QSTATUS_ENABLED
        assert n.mp.rd(hw.REG_ID) == hw.reg("ID").reset
    finally:
        n.close()


def test_ring_unmapped_while_running(nic):
    """DMA_UNMAP of the RAM under a running queue, then a doorbell: the queue
    stops with ERROR, nothing crashes, and RAM mapped back brings it all back."""
    n, mp = nic, nic.mp
    mp.send(FRAME)
    assert mp.flush_tx()
    before = n.stats()
    n.dma_unmap(RAM_IOVA, n.bus.ram_size)
    n.arm_misc()
    (slot,) = n.post_tx([(mp.tx_bufs.iova, 60, hw.TXF_EOP)])
    wait_until(lambda: n.qstatus(TXQ) & hw.QSTATUS_ERROR, what="Q_STATUS.ERROR")
    assert n.qstatus(TXQ) == hw.QSTATUS_ERROR                # and no longer ENABLED
    assert n.tx_status(slot) == 0                            # nothing was written to the ring
    assert mp.rd(hw.qreg(TXQ, "Q_HEAD")) == 1                # the first frame only
    assert_reported(n, mp.tx_ring.iova + slot * DESC, TXQ, 1,
                    hw.CAUSE_DMA_ERROR | hw.CAUSE_QUEUE_ERROR)
    after = n.stats()
    assert after["dma_errors"] == before["dma_errors"] + 1
    assert after["tx_frames"] + after["tx_drops"] == before["tx_frames"] + before["tx_drops"]
    # More doorbells on the stopped queue change nothing.
    n.post_tx([(mp.tx_bufs.iova, 60, hw.TXF_EOP)])
    time.sleep(0.05)
    assert n.stats()["dma_errors"] == after["dma_errors"] and n.qstatus(TXQ) == hw.QSTATUS_ERROR
    assert mp.rd(hw.REG_ID) == hw.reg("ID").reset
    # Map the RAM back, bring the NIC up again: frames flow.
    n.dma_map(RAM_IOVA, n.bus.ram_size, n.bus.ram_fd)
    mp.up()
    assert n.qstatus(TXQ) == hw.QSTATUS_ENABLED
    mp.send(FRAME)
    assert mp.flush_tx()
    st = n.stats()              # the reset in up() cleared the counters
    assert st["dma_errors"] == 0 and st["tx_frames"] + st["tx_drops"] == 1


# ================================================================================
# RX buffers outside the mappings (a frame must arrive: needs the TAP)
# ================================================================================
def inject(n: Nic, frame: bytes) -> None:
    script = ("import socket,sys;s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW);"
              f"s.bind(('{TAP}',0));s.send(bytes.fromhex(sys.argv[1]))")
    n.ns.run("python3", "-c", script, frame.hex())


def test_rx_buffer_outside_dma_space(wired_nic):
    n, mp = wired_nic, wired_nic.mp
    assert mp.rd(hw.qreg(RXQ, "Q_HEAD")) == 0 and n.stats()["rx_frames"] == 0
    slot = mp.rx_next % mp.ring_size
    hw.RxDesc.pack_into(mp.rx_ring.mem, slot * DESC, addr=BAD, buflen=mp.buf_size)
    n.arm_misc()
    first = FRAME[:14] + b"first" + bytes(50)
    inject(n, first)
    wait_until(mp._rx_ready, what="the RX descriptor")
    d = hw.RxDesc.unpack_from(mp.rx_ring.mem, slot * DESC)
    assert d["status"] == hw.DESC_DD | hw.DESC_DMA_ERR
    assert d["flags"] == hw.RXF_EOP and d["len"] == len(first)
    st = n.stats()
    assert st["dma_errors"] == 1
    assert st["rx_frames"] == 0 and st["rx_drops"] == 1, "a frame lost to a DMA error was counted as delivered"
    assert_reported(n, BAD, RXQ, 1, hw.CAUSE_DMA_ERROR)
    assert n.qstatus(RXQ) == hw.QSTATUS_ENABLED
    # The queue runs on: the next frame lands in the next (good) buffer.
    second = FRAME[:14] + b"second" + bytes(50)
    inject(n, second)
    wait_until(lambda: mp.rd(hw.qreg(RXQ, "Q_HEAD")) == 2, what="the second frame")
    frames = mp.poll_rx()
    assert [f for f in frames if f] == [second]
    st = n.stats()
    assert st["dma_errors"] == 1 and st["rx_frames"] == 1 and st["rx_drops"] == 1, st


def test_guest_ram_shrunk_under_the_device(tmp_path):
    """A client that truncates guest RAM after DMA_MAP: the device touches
    pages that no longer exist (SIGBUS), reports a DMA error and lives on."""
    n = start_nic(tmp_path, wired=False)
    try:
        extra = os.memfd_create("shrinking-ram")
        os.ftruncate(extra, 1 << 20)
        iova = 0x2_0000_0000
        n.dma_map(iova, 1 << 20, extra)
        os.ftruncate(extra, 0)          # the pages behind the mapping are gone
        before = n.stats()["dma_errors"]
        n.post_tx([(iova + 4096, len(FRAME), hw.TXF_EOP)])
        wait_until(lambda: n.stats()["dma_errors"] > before, what="a DMA error for the lost page")
        assert n.dev.alive
        # Rings in ordinary RAM still work: a fresh bring-up sends a frame.
        n.mp.up()
        n.mp.send(FRAME)
        assert n.mp.flush_tx(5)
        assert n.mp.rd(hw.REG_ID) == hw.reg("ID").reset
        os.close(extra)
    finally:
        n.close()
