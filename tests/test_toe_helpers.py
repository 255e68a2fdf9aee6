"""A minimal offload driver for the TOE tests: raw ring writes against the hw 1.1
offload queues, usable in-process (a Nic over a memfd) and over the host bus."""
from __future__ import annotations

import struct
import time

from chimney import hw
from chimney.staterec import codec

OFFLOAD_QIDS = (hw.CMDQ, hw.CMDCQ, hw.EVENTQ, hw.OSENDQ_FIRST, hw.ORECVQ_FIRST, hw.OCOMPLQ_FIRST)
TO_HOST = (hw.CMDCQ, hw.EVENTQ, hw.OCOMPLQ_FIRST)


class Buf:
    def __init__(self, mem, iova):
        self.mem, self.iova = mem, iova


class ToeDriver:
    """alloc(size) -> Buf (mem: writable memoryview, iova); wr(off, val): BAR0 write;
    db: the doorbell page as hw.Words; pump(): let the device run once (in-process)
    or wait a little (device process)."""

    def __init__(self, alloc, wr, db, pump, ring: int = 256, vector: int = 1):
        self.alloc, self.wr, self.db, self.pump = alloc, wr, db, pump
        self.ring = ring
        self.rings: dict[int, Buf] = {}
        self.tail: dict[int, int] = {}
        self.seen: dict[int, int] = {}
        self.held: dict[int, list] = {q: [] for q in TO_HOST}
        for qid in OFFLOAD_QIDS:
            self.setup_queue(qid, ring, vector)
        self.req = alloc(3 << 20)          # an INITIATE with the most send data it may carry
        self.resp = alloc(4 << 20)
        self.tag = 0

    def setup_queue(self, qid: int, n: int, vector: int = 1) -> None:
        esz = hw.RING_ENTRY[hw.queue_kind(qid).name].size
        b = self.rings.get(qid) or self.alloc(n * esz)
        self.rings[qid] = b
        self.wr(hw.qreg(qid, "Q_BASE_LO"), b.iova & 0xFFFFFFFF)
        self.wr(hw.qreg(qid, "Q_BASE_HI"), b.iova >> 32)
        self.wr(hw.qreg(qid, "Q_SIZE"), n)
        self.wr(hw.qreg(qid, "Q_VECTOR"), vector)
        self.wr(hw.qreg(qid, "Q_CTRL"), 1)
        self.tail[qid] = 0
        self.seen[qid] = 0

    # -- rings ---------------------------------------------------------------------
    def post(self, qid: int, rec: bytes) -> None:
        esz = len(rec)
        slot = self.tail[qid] % self.ring
        self.rings[qid].mem[slot * esz:(slot + 1) * esz] = rec
        self.tail[qid] += 1
        self.ring_db(qid)

    def ring_db(self, qid: int) -> None:
        self.db[hw.DB_TAIL_BASE + 4 * qid] = self.tail[qid]
        if self.db[hw.DB_NEED_KICK]:
            self.wr(hw.REG_KICK, 1)

    def take(self, qid: int) -> list[dict]:
        L = hw.RING_ENTRY[hw.queue_kind(qid).name]
        head = self.db[hw.DB_HEAD_BASE + 4 * qid]
        out = []
        while self.seen[qid] != head:
            slot = self.seen[qid] % self.ring
            out.append(L.unpack_from(self.rings[qid].mem, slot * L.size))
            self.seen[qid] = (self.seen[qid] + 1) & 0xFFFFFFFF
        if out:
            self.db[hw.DB_TAIL_BASE + 4 * qid] = self.seen[qid]
        return out

    def collect(self) -> None:
        for q in TO_HOST:
            self.held[q] += self.take(q)

    def pop(self, qid: int) -> list[dict]:
        self.collect()
        out, self.held[qid] = self.held[qid], []
        return out

    def wait(self, qid: int, pred, timeout: float = 5.0) -> list[dict]:
        """Pump until a record on qid satisfies pred; returns all records taken."""
        end = time.monotonic() + timeout
        got = []
        while True:
            self.pump()
            self.collect()
            keep = []
            found = False
            for r in self.held[qid]:
                got.append(r)
                if pred(r):
                    found = True
            self.held[qid] = keep
            if found:
                return got
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting on queue {qid}; got {got}")

    # -- commands ------------------------------------------------------------------
    def command(self, opcode: int, req: bytes = b"", resp_len: int = 0, *, req_addr=None,
                resp_addr=None, timeout: float = 10.0):
        self.tag += 1
        tag = self.tag
        if req:
            self.req.mem[:len(req)] = req
        self.post(hw.CMDQ, hw.CmdDesc.pack(
            opcode=opcode, tag=tag, req_addr=self.req.iova if req_addr is None else req_addr,
            req_len=len(req), resp_len=resp_len,
            resp_addr=(self.resp.iova if resp_len else 0) if resp_addr is None else resp_addr))
        recs = self.wait(hw.CMDCQ, lambda r: r["tag"] == tag, timeout)
        c = next(r for r in recs if r["tag"] == tag)
        return c, bytes(self.resp.mem[:c["resp_bytes"]])

    def initiate(self, entries):
        c, resp = self.command(hw.CMD_INITIATE, codec.encode_records(entries),
                               hw.ObjStatus.size * len(entries))
        return c, codec.decode_statuses(resp)

    def query(self, ctxs):
        from chimney.device.toe import parse_records
        c, resp = self.command(hw.CMD_QUERY, codec.encode_contexts(ctxs), 4 << 20)
        return c, parse_records(resp, with_data=False) if resp else []

    def terminate(self, ctxs):
        from chimney.device.toe import parse_records
        c, resp = self.command(hw.CMD_TERMINATE, codec.encode_contexts(ctxs), 4 << 20)
        return c, parse_records(resp) if resp else []

    def set_params(self, **kw):
        return self.command(hw.CMD_SET_PARAMS, hw.OffloadParams.pack(**kw))[0]

    # -- data I/O ------------------------------------------------------------------
    def osend(self, ctx: int, addr: int, n: int, tag: int, flags: int = hw.OSF_SEND, q: int = 0):
        self.post(hw.OSENDQ_FIRST + q, hw.OSendDesc.pack(ctx=ctx, flags=flags, addr=addr,
                                                         len=n, tag=tag))

    def orecv(self, ctx: int, addr: int, n: int, tag: int, flags: int = hw.ORF_POST, q: int = 0):
        self.post(hw.ORECVQ_FIRST + q, hw.ORecvDesc.pack(ctx=ctx, flags=flags, addr=addr,
                                                         len=n, tag=tag))


def eth_ipv4_tcp(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, seg) -> bytes:
    """A frame carrying seg (a chimney.tcp.Segment) from src to dst."""
    import ipaddress

    from chimney.inet import checksum
    tcp = seg.encode(src_ip, dst_ip)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                      ipaddress.ip_address(src_ip).packed, ipaddress.ip_address(dst_ip).packed)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return dst_mac + src_mac + b"\x08\x00" + hdr + tcp
