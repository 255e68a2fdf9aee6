"""The datasheet and the C header are generated from chimney/hw.py and must match it."""
import pathlib
import re

from chimney import hw, hwgen
from chimney.datasheet import render

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICE = ROOT / "chimney" / "device"


def test_committed_datasheet_is_current():
    committed = (ROOT / "docs" / "datasheet.md").read_text()
    assert committed == render(), "docs/datasheet.md is stale: run `chimney datasheet -o docs/datasheet.md`"


def test_every_register_and_counter_is_documented():
    text = render()
    for r in hw.REGISTERS + hw.QUEUE_REGISTERS:
        assert f"| {r.name} |" in text
    for name, _ in hw.STATS:
        assert f"| {name} |" in text


def test_registers_do_not_overlap():
    spans = sorted((r.offset, r.offset + r.width, r.name) for r in hw.REGISTERS)
    spans.append((hw.STATS_BASE, hw.STATS_BASE + 8 * len(hw.STATS), "stats"))
    spans.append((hw.Q_BASE, hw.Q_BASE + hw.NUM_QIDS * hw.Q_STRIDE, "queues"))
    spans.append((hw.VEC_ITR_BASE, hw.VEC_ITR_BASE + hw.VEC_ITR_STRIDE * hw.MSIX_VECTORS, "itr"))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{an} overlaps {bn}"
    assert spans[-1][1] <= hw.BAR_REGS_SIZE


def test_queue_numbers_are_disjoint_and_fit():
    seen = set()
    for k in hw.QUEUE_KINDS:
        ids = set(range(k.first, k.first + k.count))
        assert not ids & seen, k.name
        seen |= ids
    assert max(seen) < hw.NUM_QIDS
    assert hw.DB_TAIL_BASE + 4 * hw.NUM_QIDS <= hw.DB_HEAD_BASE
    assert hw.DB_HEAD_BASE + 4 * hw.NUM_QIDS <= hw.DB_ARM_BASE
    assert hw.DB_ARM_BASE + 4 * hw.MSIX_VECTORS <= hw.DB_NEED_KICK


def test_c_header_matches_layouts():
    header = hw.c_header()
    for lay in hw.LAYOUTS:
        for f in lay.fields:
            m = re.search(rf"#define {lay.name.upper()}_{f.name.upper()} (\d+)", header)
            assert m and int(m.group(1)) == f.offset
    # The C files must take their layout from the generated header, not define their own.
    for name in ("fastpath.c", "toe.c", "impair.c", "fastpath.h"):
        src = (DEVICE / name).read_text()
        assert "#define TXDESC_" not in src and "#define DESC_" not in src, name


def test_committed_c_header_is_current():
    committed = (DEVICE / "hw.h").read_text()
    assert committed == hw.c_header(), \
        "chimney/device/hw.h is stale: run `python -m chimney.device.fastpath_build`"


def test_c_units_share_one_header_and_paste_nothing():
    """Each C file is its own compilation unit: it includes fastpath.h (which
    includes hw.h) and no other C file; the cffi cdef is fastpath.h's cdef section."""
    from chimney.device import fastpath_build
    for name in fastpath_build.UNITS:
        src = (DEVICE / name).read_text()
        assert '#include "fastpath.h"' in src, name
        assert not re.search(r'#include\s+"[^"]+\.c"', src), name
    header = (DEVICE / "fastpath.h").read_text()
    assert '#include "hw.h"' in header
    cdef = fastpath_build.cdef_text(hw)
    for struct in ("dma_region", "dma_table", "fp_queue", "toe_slot", "toe", "held_frame", "impair"):
        assert f"struct {struct} {{" in cdef, struct
        assert header.count(f"struct {struct} {{") == 1, struct
        assert f"struct {struct} {{" not in (DEVICE / "fastpath_build.py").read_text()


def test_layout_pack_roundtrip():
    raw = hw.TxDesc.pack(addr=0x1122334455667788, len=1514, flags=hw.TXF_EOP, status=hw.DESC_DD)
    assert len(raw) == 16
    assert hw.TxDesc.unpack_from(raw) == {"addr": 0x1122334455667788, "len": 1514,
                                          "flags": hw.TXF_EOP, "status": hw.DESC_DD}


def test_hw_names_block_is_current():
    """hw.py spells its names out (REG_CTRL = 0x10, ...): the block matches the tables."""
    text = (ROOT / "chimney" / "hw.py").read_text()
    assert hwgen.names_block() in text, "chimney/hw.py's names are stale: run `python -m chimney.hw`"
    for name, value in hwgen.names():
        assert getattr(hw, name) == value, name


def test_c_code_names_its_stop_codes():
    header = hw.c_header()
    for b in hw.QUEUE_STOP_CODES:
        assert f"#define QSTOP_{b.name} {b.mask:#x}" in header
    for r in hw.REGISTERS:
        assert f"#define REG_{r.name} {r.offset:#x}" in header
    for name in ("fastpath.c", "toe.c", "impair.c"):
        src = (DEVICE / name).read_text()
        assert not re.search(r"error = \d", src), f"{name}: a queue stop code as a literal"
