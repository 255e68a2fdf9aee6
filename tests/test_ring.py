"""chimney.device.ring in process: the one place the device's Python code reads
a ring's indices, checks them against the ring size, reports a bad one, and
moves entries -- over a memfd of "guest RAM", with a recording irq.  And the TOE
built from a ToePort alone, no Nic."""
from __future__ import annotations

import collections
import mmap
import os

import pytest

from chimney import hw
from chimney.device.dma import DmaTable
from chimney.device.port import ToePort
from chimney.device.ring import Rings
from chimney.device.toe import Toe

IOVA = 0x1_0000_0000
RAM = 1 << 20
RING = IOVA + 0x1000


class Irq:
    def __init__(self):
        self.log: list = []

    def raise_vector(self, v):
        self.log.append(("vector", v))

    def queue_error(self):
        self.log.append(("queue_error",))

    def ring_stopped(self, qid, addr, msg):
        self.log.append(("stopped", qid, addr))

    def buffer_dma_error(self, qid, addr):
        self.log.append(("buffer", qid, addr))


class Rig:
    def __init__(self):
        self.dma = DmaTable()
        fd = os.memfd_create("ram")
        os.ftruncate(fd, RAM)
        self.mm = mmap.mmap(fd, RAM)
        self.dma.map(IOVA, RAM, 0, True, True, fd)
        self.page = bytearray(hw.BAR_DOORBELL_SIZE)
        self.dbw = hw.Words(self.page)
        self.irq = Irq()
        self.rings = Rings(self.dbw, self.dma, self.irq)
        self.bad: list = []

    def enable(self, qid: int, size: int = 8, base: int = RING):
        q = self.rings[qid]
        q.base, q.size, q.vector = base, size, 3
        self.rings.restart(q)
        assert self.rings.geometry_ok(q)
        q.enabled = True
        return q

    def entry(self, q, i: int, data: bytes):
        off = q.base - IOVA + (i % q.size) * q.entry_size
        self.mm[off:off + len(data)] = data

    def read_entry(self, q, i: int) -> bytes:
        off = q.base - IOVA + (i % q.size) * q.entry_size
        return bytes(self.mm[off:off + q.entry_size])

    def on_bad(self, qid, tail):
        self.bad.append((qid, tail))


@pytest.fixture
def rig():
    return Rig()


def test_consume_takes_posted_entries_in_order_across_the_wrap(rig):
    q = rig.enable(hw.CMDQ)
    for i in range(6):
        rig.entry(q, i, bytes([i]) * 32)
    rig.dbw[hw.DB_TAIL_BASE + 4 * hw.CMDQ] = 6
    assert [e[0] for e in rig.rings.consume(hw.CMDQ, 64, rig.on_bad)] == list(range(6))
    rig.dbw[hw.DB_TAIL_BASE + 4 * hw.CMDQ] = 12               # entries 6..11: slots 6, 7, 0..3
    for i in range(6, 12):
        rig.entry(q, i, bytes([i]) * 32)
    got = rig.rings.consume(hw.CMDQ, 4, rig.on_bad)           # the budget holds
    got += rig.rings.consume(hw.CMDQ, 64, rig.on_bad)
    assert [e[0] for e in got] == list(range(6, 12))
    assert rig.dbw[hw.DB_HEAD_BASE + 4 * hw.CMDQ] == 12 and q.fp.completed == 12
    assert not rig.rings.busy(hw.CMDQ) and not rig.bad and not rig.irq.log


def test_a_bad_index_is_ignored_and_reported_once_per_value(rig):
    q = rig.enable(hw.OSENDQ_FIRST)
    rig.dbw[hw.DB_TAIL_BASE + 4 * q.qid] = 9                  # 9 posted on a ring of 8
    for _ in range(3):
        assert rig.rings.consume(q.qid, 64, rig.on_bad) == []
    assert rig.bad == [(q.qid, 9)] and rig.irq.log == [("queue_error",)]
    rig.dbw[hw.DB_TAIL_BASE + 4 * q.qid] = 10                 # another bad value: reported again
    assert rig.rings.consume(q.qid, 64, rig.on_bad) == []
    assert rig.bad == [(q.qid, 9), (q.qid, 10)]
    rig.dbw[hw.DB_TAIL_BASE + 4 * q.qid] = 2                  # sane again: the queue runs on
    assert len(rig.rings.consume(q.qid, 64, rig.on_bad)) == 2 and q.enabled
    assert q.fp.head == 2


def test_produce_never_overwrites_what_the_driver_has_not_returned(rig):
    q = rig.enable(hw.OCOMPLQ_FIRST)
    pend = collections.deque(bytes([i]) * 32 for i in range(11))
    assert rig.rings.produce(q.qid, pend, rig.on_bad) == 8    # the ring is full
    assert len(pend) == 3 and rig.irq.log == [("vector", 3)]
    assert rig.rings.produce(q.qid, pend, rig.on_bad) == 0
    rig.dbw[hw.DB_TAIL_BASE + 4 * q.qid] = 2                  # the driver returned two
    assert rig.rings.produce(q.qid, pend, rig.on_bad) == 2
    assert [rig.read_entry(q, i)[0] for i in (8, 9)] == [8, 9]
    assert rig.read_entry(q, 2)[0] == 2                       # not overwritten
    assert rig.dbw[hw.DB_HEAD_BASE + 4 * q.qid] == 10
    rig.dbw[hw.DB_TAIL_BASE + 4 * q.qid] = 0xFFFF_0000        # HEAD - TAIL beyond the ring
    assert rig.rings.produce(q.qid, pend, rig.on_bad) == 0 and rig.bad == [(q.qid, 0xFFFF_0000)]


def test_a_ring_outside_the_mappings_stops_the_queue(rig):
    q = rig.enable(hw.EVENTQ, base=IOVA + RAM - 8 * 32)
    rig.dma.unmap(IOVA, RAM)
    pend = collections.deque([bytes(32)])
    assert rig.rings.produce(q.qid, pend, rig.on_bad) == 0
    assert list(pend) == [bytes(32)]          # held for the restarted ring, not dropped
    assert not q.enabled and q.fp.error == hw.QSTOP_FAULT
    assert q.status == hw.QSTATUS_ERROR
    assert rig.irq.log == [("stopped", hw.EVENTQ, q.base)]


def test_geometry_is_checked_at_enable(rig):
    q = rig.rings[hw.CMDQ]
    for base, size in ((RING, 12), (RING + 8, 8), (RING, 4), (IOVA + RAM - 16, 8), (RING, 8192)):
        q.base, q.size = base, size
        assert not rig.rings.geometry_ok(q), (hex(base), size)
    q.base, q.size = RING, 8
    assert rig.rings.geometry_ok(q)


def test_the_toe_runs_on_its_port_alone(rig):
    """No Nic: a ToePort of rings, memory, irq, wire, clock, counters."""
    class Wire:
        tx_fd, pcap_fd = -1, -1
        impair = None

    stats = [0] * len(hw.STATS)
    enabled = [True]
    from chimney.device._fastpath import ffi
    Wire.impair = ffi.NULL
    toe = Toe(ToePort(rings=rig.rings, dma=rig.dma, irq=rig.irq, wire=Wire(), clock=lambda: 5.0,
                      stats=stats, enabled=lambda: enabled[0]))
    cmd = rig.enable(hw.CMDQ)
    cmdc = rig.enable(hw.CMDCQ, base=RING + 0x1000)
    assert not toe.has_work()
    rig.dbw[hw.DB_TAIL_BASE + 4 * hw.CMDQ] = 100              # a bad CMD index
    assert toe.has_work()
    toe.poll()
    rec = hw.CmdCompl.unpack_from(rig.read_entry(cmdc, 0))
    assert rec["status"] == hw.ST_INVALID_REQUEST and rec["tag"] == 0xFFFFFFFF
    assert stats[hw.STAT_INDEX["offload_cmd_errors"]] == 1
    assert ("queue_error",) in rig.irq.log and ("vector", cmdc.vector) in rig.irq.log
    assert cmd.enabled and cmd.fp.head == 0
    enabled[0] = False
    assert not toe.has_work()
