"""Render docs/datasheet.md from chimney.hw (`chimney datasheet -o docs/datasheet.md`).

A test compares the committed file with this output, so the datasheet cannot
drift from the code.
"""
from __future__ import annotations

from . import hw


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _bits_table(bits) -> list[str]:
    out = ["| bit | name | meaning |", "|---|---|---|"]
    for b in bits:
        pos = b.mask.bit_length() - 1
        out.append(f"| {pos} | {b.name} | {b.doc} |")
    return out


def render() -> str:
    L: list[str] = []
    add = L.append
    add(f"# chimney NIC datasheet — hardware interface {hw.VERSION_MAJOR}.{hw.VERSION_MINOR}")
    add("")
    add("Generated from `chimney/hw.py` by `chimney datasheet`; do not edit by hand.")
    add("All multi-byte values are little-endian. Addresses are bus addresses (IOVAs).")
    add("")
    add("## Identity")
    add("")
    add("| field | value |")
    add("|---|---|")
    add(f"| vendor:device | `{hw.PCI_VENDOR_ID:04x}:{hw.PCI_DEVICE_ID:04x}` |")
    add(f"| subsystem | `{hw.PCI_SUBSYS_VENDOR_ID:04x}:{hw.PCI_SUBSYS_ID:04x}` |")
    add(f"| class | `{hw.PCI_CLASS_CODE:06x}` (Ethernet controller) |")
    add(f"| revision | `{hw.PCI_REVISION:02x}` |")
    add("| config space | 4 KiB (PCI Express endpoint): MSI-X, PCI Express v2 and power-management capabilities; no INTx |")
    add("")
    add("## BARs")
    add("")
    add("| BAR | size | access | contents |")
    add("|---|---|---|---|")
    add(f"| {hw.BAR_REGS} | {hw.BAR_REGS_SIZE:#x} | trapped (each access is a message to the device) | registers, statistics, queue and vector configuration |")
    add(f"| {hw.BAR_DOORBELL} | {hw.BAR_DOORBELL_SIZE:#x} | mmapped into the guest (no exit) | doorbell page |")
    add(f"| {hw.BAR_MSIX} | {hw.BAR_MSIX_SIZE:#x} | emulated by QEMU | MSI-X table at {hw.MSIX_TABLE_OFFSET:#x}, PBA at {hw.MSIX_PBA_OFFSET:#x}; {hw.MSIX_VECTORS} vectors |")
    add("")
    add("All three are 32-bit non-prefetchable memory BARs. Registers take aligned 4-byte accesses;"
        " 64-bit registers also take one aligned 8-byte access. Other sizes get an error.")
    add("")
    add("## Registers (BAR0)")
    add("")
    add("| offset | name | width | access | reset | description |")
    add("|---|---|---|---|---|---|")
    for r in hw.REGISTERS:
        add(f"| {r.offset:#05x} | {r.name} | {8 * r.width} | {r.access} | {r.reset:#x} | {_cell(r.doc)} |")
    add("")
    for r in hw.REGISTERS:
        if r.bits:
            add(f"### {r.name}")
            add("")
            L.extend(_bits_table(r.bits))
            add("")
    add("### Statistics")
    add("")
    add(f"64-bit counters from {hw.STATS_BASE:#x}, 8 bytes apart, read-only; reset by CTRL.RESET.")
    add("")
    add("| offset | counter | counts |")
    add("|---|---|---|")
    for name, doc in hw.STATS:
        add(f"| {hw.stat_offset(name):#05x} | {name} | {doc} |")
    add("")
    add("### Queue registers")
    add("")
    add(f"Queue `qid` has a block at `{hw.Q_BASE:#x} + qid * {hw.Q_STRIDE:#x}`:")
    add("")
    add("| offset | name | access | description |")
    add("|---|---|---|---|")
    for r in hw.QUEUE_REGISTERS:
        add(f"| {r.offset:#04x} | {r.name} | {r.access} | {r.doc} |")
    add("")
    add("Q_STATUS:")
    add("")
    L.extend(_bits_table(hw.Q_STATUS_BITS))
    add("")
    add("Enabling a queue checks that its size is a power of two in "
        f"[{hw.QUEUE_SIZE_MIN}, {hw.QUEUE_SIZE_MAX}], its base is 16-byte aligned and the whole ring"
        " lies inside DMA mappings; otherwise Q_STATUS.ERROR is set, CAUSE gets DMA_ERROR|QUEUE_ERROR"
        " and the misc vector fires. A running queue whose ring leaves the DMA mappings stops the same way.")
    add("")
    add("### Interrupt moderation")
    add("")
    add(f"Vector `v` has VEC_ITR at `{hw.VEC_ITR_BASE:#x} + v * {hw.VEC_ITR_STRIDE}`: the minimum"
        " interval between two messages on that vector, in microseconds (0: none). An event inside"
        " the interval is delivered when it ends.")
    add("")
    add("## Queues")
    add("")
    add("| qids | kind | entry | direction | status | purpose |")
    add("|---|---|---|---|---|---|")
    for k in hw.QUEUE_KINDS:
        last = k.first + k.count - 1
        q = f"{k.first}" if k.count == 1 else f"{k.first}-{last}"
        add(f"| {q} | {k.name} | {k.entry} | {k.direction} | {'yes' if k.implemented else 'reserved'} | {k.doc} |")
    add("")
    add(f"Plain frames: TX queues {hw.TXQ_FIRST}-{hw.TXQ_FIRST + hw.NUM_TXQ - 1} are all served;"
        f" received frames go to RX queue {hw.RXQ_FIRST} (receive-side scaling of plain frames is not in v1)."
        " Reserved qids ignore register writes and read as zero.")
    add("")
    add("## Doorbell page (BAR2)")
    add("")
    add("| offset | name | written by | meaning |")
    add("|---|---|---|---|")
    add(f"| {hw.DB_TAIL_BASE:#05x} + 4·qid | TAIL | driver | producer index of queue qid (u32, free-running) |")
    add(f"| {hw.DB_HEAD_BASE:#05x} + 4·qid | HEAD | device | consumer index of queue qid (mirror of Q_HEAD) |")
    add(f"| {hw.DB_ARM_BASE:#05x} + 4·v | ARM | driver sets 1, device clears | vector v may fire once |")
    add(f"| {hw.DB_NEED_KICK:#05x} | NEED_KICK | device | 1 while the device sleeps: ring, then write BAR0 KICK |")
    add(f"| {hw.DB_HEARTBEAT:#05x} | HEARTBEAT | device | increments while the device runs; a frozen value means it is gone |")
    add("")
    add("**Ringing a doorbell.** Write the new TAIL; then read NEED_KICK and, if it is 1, write any"
        " value to BAR0 KICK. The device polls the page while busy. Before it sleeps it sets NEED_KICK"
        " and looks at every TAIL once more, and while asleep it still looks every 2 ms, so a"
        " doorbell is never lost, only delayed.")
    add("")
    add("**Interrupts.** A queue's completions raise its Q_VECTOR only while that vector's ARM word is"
        " 1; the device clears ARM when it sends the message. A driver arms, checks its ring once more"
        " (work that landed before the arm), then waits on the vector. Vector"
        f" {hw.VECTOR_MISC} is the misc vector: CAUSE says why it fired.")
    add("")
    add("## Descriptors")
    add("")
    for lay in hw.LAYOUTS:
        add(f"### {lay.name} ({lay.size} bytes)")
        add("")
        add(lay.doc[0].upper() + lay.doc[1:] + ".")
        add("")
        add("| offset | size | field | meaning |")
        add("|---|---|---|---|")
        for f in lay.fields:
            add(f"| {f.offset} | {f.size} | {f.name} | {f.doc} |")
        add("")
    add("TX flags:")
    add("")
    L.extend(_bits_table(hw.TX_FLAGS))
    add("")
    add("RX flags:")
    add("")
    L.extend(_bits_table(hw.RX_FLAGS))
    add("")
    add("Descriptor status (written back by the device; a driver sets it to 0 when posting):")
    add("")
    L.extend(_bits_table(hw.DESC_STATUS))
    add("")
    add(f"A frame is at most MTU + 18 bytes (Ethernet header and one VLAN tag), and never more than"
        f" {hw.MAX_FRAME}. A TX frame whose buffer lies outside the DMA mappings is dropped and its"
        " descriptors complete with DD|DMA_ERR; the dma_errors counter, DMA_ERR_ADDR and DMA_ERR_INFO"
        " record it. RX frames are written into as many posted buffers as they need, EOP on the last;"
        " with too few buffers posted the frame is dropped and counted in rx_no_buffer.")
    add("")
    add("### Ordering between driver and device")
    add("")
    for rule in hw.RING_ORDERING:
        add(f"- {rule}")
    add("")
    add("## TCP chimney offload (interface 1.1)")
    add("")
    add("To-device rings (CMD, OSEND, ORECV) work like TX: the driver writes entries and advances"
        " TAIL; the device consumes them and mirrors its index in HEAD. To-host rings (CMDC, EVENT,"
        " OCOMPL) run the other way: the device writes entry HEAD % size, then advances HEAD; the"
        " driver reads the entries below HEAD and returns them by advancing TAIL. The device never"
        " overwrites an entry the driver has not returned; when a to-host ring is full it holds its"
        " records back, in order. Ring entries are 32 bytes (CmdCompl: 16).")
    add("")
    add("Each offloaded object has the host's handle (u64, in every completion and indication) and"
        " the NIC's context (u32, returned by INITIATE, passed in every request; 0 is never used)."
        " Request and response buffers of commands hold ObjRecord records (each followed by its"
        " state layout and, for TCP, its send and received data, padded to 8 bytes), u32 context"
        " lists or ObjStatus entries, as each opcode says. The byte form is implemented once in"
        " `chimney/staterec/codec.py` for both sides.")
    add("")
    for title, bits in (("Command opcodes (CmdDesc.opcode)", hw.CMD_OPCODES),
                        ("Status codes", hw.STATUS_CODES), ("Object types", hw.OBJ_TYPES),
                        ("Event kinds (EventRec.kind)", hw.EVENT_KINDS),
                        ("Retrieve reasons (EventRec.reason)", hw.RETRIEVE_REASONS),
                        ("OCOMPL kinds (OComplRec.kind)", hw.OCOMPL_KINDS)):
        add(f"### {title}")
        add("")
        add("| value | name | meaning |")
        add("|---|---|---|")
        for b in bits:
            add(f"| {b.mask} | {b.name} | {_cell(b.doc)} |")
        add("")
    for title, bits in (("OSEND flags", hw.OSEND_FLAGS), ("ORECV flags", hw.ORECV_FLAGS),
                        ("OCOMPL flags", hw.OCOMPL_FLAGS), ("Neighbour flags", hw.NEIGH_FLAGS),
                        ("TCP const flags", hw.TCP_CONST_FLAGS),
                        ("TCP cached flags", hw.TCP_CACHED_FLAGS),
                        ("TCP delegated flags", hw.TCP_DELEGATED_FLAGS)):
        add(f"### {title}")
        add("")
        L.extend(_bits_table(bits))
        add("")
    add("TCP states (TcpDelegatedState.state): " +
        ", ".join(f"{i} {n}" for i, n in enumerate(hw.TCP_STATES)) + ".")
    add("")
    add("### Device behaviour")
    add("")
    for rule in hw.OFFLOAD_RULES:
        add(f"- {rule}")
    add("")
    add("## Link")
    add("")
    for rule in hw.LINK_RULES:
        add(f"- {rule}")
    add("")
    add("## Bring-up sequence")
    add("")
    add("1. Check ID, VERSION (major must match) and FEATURES.")
    add("2. Write CTRL.RESET; wait for STATUS.READY.")
    add("3. Read MAC_LO/MAC_HI (or write a new address).")
    add("4. Map BAR2; enable MSI-X vectors (eventfds).")
    add("5. For each queue: Q_BASE_LO/HI, Q_SIZE, Q_VECTOR, then Q_CTRL = 1; check Q_STATUS.ENABLED.")
    add("6. Post RX buffers and write RX TAIL; write CTRL.ENABLE; check STATUS.ENABLED and LINK_UP.")
    add("")
    return "\n".join(L)
