"""The register file (chimney.device.nic) in process: every register of
chimney.hw behaves as its access kind and reset value say, through the same
reg_read/reg_write the vfio-user server calls."""
from __future__ import annotations

import pytest

from chimney import hw
from chimney.device.dma import DmaTable
from chimney.device.nic import Nic

MAC = bytes.fromhex("02c41e000001")


@pytest.fixture
def nic():
    n = Nic(DmaTable(), MAC, link_up=True)
    yield n
    n.close()


def _live(nic: Nic, r: hw.Register) -> int | None:
    """Registers whose value is state, not a reset constant."""
    return {"STATUS": hw.STATUS_READY | hw.STATUS_LINK_UP,
            "MAC_LO": int.from_bytes(MAC[:4], "little"),
            "MAC_HI": int.from_bytes(MAC[4:], "little"),
            "DMA_ERR_INFO": hw.DMA_ERR_QID_NONE}.get(r.name)


def test_every_register_reads_its_reset_value(nic):
    for r in hw.REGISTERS:
        want = _live(nic, r)
        want = (0 if r.access == "WO" else r.reset) if want is None else want
        assert nic.reg_read(r.offset, r.width) == want, r.name
        if r.width == 8:
            assert nic.reg_read(r.offset + 4, 4) == want >> 32, r.name
    for r in hw.STAT_REGISTERS:
        assert nic.reg_read(r.offset, 8) == 0, r.name
    for qid in range(hw.NUM_QIDS):
        for r in hw.QUEUE_REGISTERS:
            assert nic.reg_read(hw.qreg(qid, r.name), 4) == r.reset, (qid, r.name)


def test_read_only_registers_ignore_writes(nic):
    for r in hw.REGISTERS:
        if r.access in ("RO", "RC"):
            before = nic.reg_read(r.offset, r.width)
            nic.reg_write(r.offset, 4, 0x5A5A5A5A)
            assert nic.reg_read(r.offset, r.width) == before, r.name
    q = hw.TXQ_FIRST
    nic.reg_write(hw.qreg(q, "Q_HEAD"), 4, 7)
    nic.reg_write(hw.qreg(q, "Q_STATUS"), 4, hw.QSTATUS_ENABLED)
    assert nic.reg_read(hw.qreg(q, "Q_HEAD"), 4) == 0
    assert nic.reg_read(hw.qreg(q, "Q_STATUS"), 4) == 0


def test_read_write_and_write_only_and_read_clear(nic):
    nic.reg_write(hw.REG_MTU, 4, 9000)
    assert nic.reg_read(hw.REG_MTU, 4) == 9000
    nic.reg_write(hw.REG_MTU, 4, hw.MTU_MIN - 1)            # out of range: kept
    assert nic.reg_read(hw.REG_MTU, 4) == 9000
    kicks = nic.stat("kicks")
    nic.reg_write(hw.REG_KICK, 4, 1)
    assert nic.stat("kicks") == kicks + 1 and nic.reg_read(hw.REG_KICK, 4) == 0
    assert nic.reg_read(hw.stat_offset("kicks"), 8) == kicks + 1
    nic.cause = hw.CAUSE_LINK | hw.CAUSE_QUEUE_ERROR
    assert nic.reg_read(hw.REG_CAUSE, 4) == hw.CAUSE_LINK | hw.CAUSE_QUEUE_ERROR
    assert nic.reg_read(hw.REG_CAUSE, 4) == 0
    # an 8-byte write is two 4-byte writes, low half first
    q = hw.RXQ_FIRST
    nic.reg_write(hw.qreg(q, "Q_BASE_LO"), 8, 0x0000_0001_2345_6780)
    assert nic.reg_read(hw.qreg(q, "Q_BASE_LO"), 4) == 0x2345_6780
    assert nic.reg_read(hw.qreg(q, "Q_BASE_HI"), 4) == 1
    nic.reg_write(hw.VEC_ITR_BASE + 3 * hw.VEC_ITR_STRIDE, 4, 2 * hw.VEC_ITR_MAX_US)
    assert nic.reg_read(hw.VEC_ITR_BASE + 3 * hw.VEC_ITR_STRIDE, 4) == hw.VEC_ITR_MAX_US


def test_reserved_queues_ignore_writes_and_reset_restores(nic):
    reserved = next(q for q in range(hw.NUM_QIDS) if hw.queue_kind(q) is None)
    nic.reg_write(hw.qreg(reserved, "Q_SIZE"), 4, 64)
    assert nic.reg_read(hw.qreg(reserved, "Q_SIZE"), 4) == 0
    nic.reg_write(hw.qreg(hw.TXQ_FIRST, "Q_SIZE"), 4, 64)
    nic.reg_write(hw.REG_MTU, 4, 2000)
    nic.reg_write(hw.REG_CTRL, 4, hw.CTRL_ENABLE | hw.CTRL_PROMISC)
    assert nic.reg_read(hw.REG_CTRL, 4) == hw.CTRL_ENABLE | hw.CTRL_PROMISC
    nic.reg_write(hw.REG_CTRL, 4, hw.CTRL_RESET)
    assert nic.reg_read(hw.qreg(hw.TXQ_FIRST, "Q_SIZE"), 4) == 0
    assert nic.reg_read(hw.REG_MTU, 4) == hw.reg("MTU").reset
    assert nic.reg_read(hw.REG_CTRL, 4) == hw.reg("CTRL").reset


def test_unassigned_offsets_read_zero(nic):
    taken = set()
    for r in hw.REGISTERS + hw.STAT_REGISTERS:
        taken |= set(range(r.offset, r.offset + r.width, 4))
    for qid in range(hw.NUM_QIDS):
        taken |= {hw.qreg(qid, r.name) for r in hw.QUEUE_REGISTERS}
    taken |= {hw.VEC_ITR_BASE + v * hw.VEC_ITR_STRIDE for v in range(hw.MSIX_VECTORS)}
    nic.reg_write(hw.REG_CTRL, 4, hw.CTRL_ENABLE)
    for off in range(0, hw.BAR_REGS_SIZE, 4):
        if off not in taken:
            assert nic.reg_read(off, 4) == 0, hex(off)
            nic.reg_write(off, 4, 0xFFFFFFFF)           # ignored, no exception
    assert nic.reg_read(hw.REG_CTRL, 4) == hw.CTRL_ENABLE and nic.reg_read(hw.REG_MTU, 4) == 1500
