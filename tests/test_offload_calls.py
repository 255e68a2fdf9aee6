"""The miniport's chimney calls (chimney/guest/chimney_calls.py) against a scripted fake
NIC in pure Python: it reads what the driver put on the to-device rings
(CMD, OSEND, ORECV) and writes completions, indications and events on the
to-host rings (CMDC, OCOMPL, EVENT) the way interface 1.1 says; the test
plays the device's part.  No root, no device process."""
from __future__ import annotations

import pytest

from chimney import hw
from chimney.guest.bus import DmaBuffer
from chimney.guest.chimney_calls import Chimney, DmaArena
from chimney.staterec import codec
from chimney.staterec.codec import Neighbor, ObjEntry, Path, Tcp
from chimney.tcp.state import TcpCached, TcpConst, TcpDelegated, TcpState

IOVA = 0x1_0000_0000


class FakeBus:
    def __init__(self, size=64 << 20):
        self.ram = bytearray(size)
        self.next = 0

    def dma_alloc(self, size, align=4096):
        start = (self.next + align - 1) // align * align
        self.next = start + size
        assert self.next <= len(self.ram)
        return DmaBuffer(memoryview(self.ram)[start:start + size], IOVA + start)

    def read(self, iova, n):
        return bytes(self.ram[iova - IOVA:iova - IOVA + n])

    def write(self, iova, data):
        self.ram[iova - IOVA:iova - IOVA + len(data)] = data


class FakeNic:
    """Registers, doorbell page, and the device's ends of the rings."""

    def __init__(self, features=hw.FEATURES):
        self.bus = FakeBus()
        self.regs = {hw.REG_FEATURES: features}
        self.page = bytearray(4096)
        self.dbw = hw.Words(self.page)
        self.consumed = {}          # to-device qid -> device's index
        self.produced = {}          # to-host qid -> device's index
        self.kicks = 0
        self.ready_checks = []
        self.before_wait = []

    # the Miniport surface the Chimney uses
    def rd(self, off, size=4):
        for qid in range(hw.NUM_QIDS):
            if off == hw.qreg(qid, "Q_STATUS"):
                return hw.QSTATUS_ENABLED if self.regs.get(hw.qreg(qid, "Q_CTRL")) else 0
        return self.regs.get(off, 0)

    def wr(self, off, val, size=4):
        self.regs[off] = val

    def _ring(self, qid, tail):
        self.dbw[hw.DB_TAIL_BASE + 4 * qid] = tail

    def add_ready_check(self, fn, vectors=()):
        self.ready_checks.append(fn)

    # the device side
    def _q(self, qid):
        base = self.regs[hw.qreg(qid, "Q_BASE_LO")] | self.regs[hw.qreg(qid, "Q_BASE_HI")] << 32
        return base, self.regs[hw.qreg(qid, "Q_SIZE")], hw.RING_ENTRY[hw.queue_kind(qid).name]

    def take(self, qid):
        """Entries the driver produced on a to-device ring since the last call."""
        base, size, lay = self._q(qid)
        tail = self.dbw[hw.DB_TAIL_BASE + 4 * qid]
        i = self.consumed.get(qid, 0)
        out = []
        while i != tail:
            out.append(lay.unpack_from(self.bus.read(base + (i % size) * lay.size, lay.size)))
            i += 1
        self.consumed[qid] = i
        self.dbw[hw.DB_HEAD_BASE + 4 * qid] = i
        return out

    def put(self, qid, **fields):
        base, size, lay = self._q(qid)
        i = self.produced.get(qid, 0)
        assert i - self.dbw[hw.DB_TAIL_BASE + 4 * qid] < size, "to-host ring full"
        self.bus.write(base + (i % size) * lay.size, lay.pack(**fields))
        self.produced[qid] = i + 1
        self.dbw[hw.DB_HEAD_BASE + 4 * qid] = i + 1


def tcp_state(send=b"", recv=b""):
    const = TcpConst("10.199.0.2", 40000, "10.199.0.1", 5201, timestamps=True, sack=True,
                     window_scaling=True, snd_wscale=7, rcv_wscale=7, remote_mss=1460)
    d = TcpDelegated(state=TcpState.ESTABLISHED, rcv_nxt=1000 + len(recv), rcv_wnd=65535, snd_una=5000,
                     snd_nxt=5000 + len(send), snd_max=5000 + len(send), snd_wnd=65535,
                     cwnd=14600, ssthresh=65535, send_buffer=send, recv_buffer=recv)
    return Tcp(const, TcpCached(), d)


def tree(send=b"", recv=b""):
    return [ObjEntry(hw.OBJ_NEIGHBOR, 11, codec.NONE32, Neighbor(b"\x02" * 6, b"\x04" * 6)),
            ObjEntry(hw.OBJ_PATH, 12, 0, Path("10.199.0.2", "10.199.0.1", 1500)),
            ObjEntry(hw.OBJ_TCP, 13, 1, tcp_state(send, recv))]


@pytest.fixture
def nic():
    n = FakeNic()
    ch = Chimney(n, pool_buffers=4, pool_buf_size=4096, arena_size=8 << 20,
                 cmd_ring=8, event_ring=8, send_ring=8, recv_ring=16, compl_ring=16, vector=2,
                 rss_queues=1)
    ch.up()
    # bring-up: pool buffers on ORECV, SET_PARAMS on CMD
    pool = n.take(hw.ORECVQ_FIRST)
    assert [p["flags"] for p in pool] == [hw.ORF_POOL] * 4 and all(p["len"] == 4096 for p in pool)
    (sp,) = n.take(hw.CMDQ)
    assert sp["opcode"] == hw.CMD_SET_PARAMS and sp["req_len"] == hw.OffloadParams.size
    params = hw.OffloadParams.unpack_from(n.bus.read(sp["req_addr"], sp["req_len"]))
    assert params["ticks_per_second"] == 1000
    n.put(hw.CMDCQ, tag=sp["tag"], opcode=hw.CMD_SET_PARAMS, status=0, resp_bytes=0, count=1)
    assert ch.poll() == 1
    n.pool = pool
    return n, ch


def complete(n, cmd_desc, status, resp=b"", count=1):
    if resp:
        assert len(resp) <= cmd_desc["resp_len"]
        n.bus.write(cmd_desc["resp_addr"], resp)
    n.put(hw.CMDCQ, tag=cmd_desc["tag"], opcode=cmd_desc["opcode"], status=status,
          resp_bytes=len(resp), count=count)


def test_not_supported_without_the_feature_bit():
    ch = Chimney(FakeNic(features=hw.FEAT_PLAIN_FRAMES))
    assert ch.supported is False
    with pytest.raises(Exception, match="does not offer"):
        ch.up()


def test_queues_are_programmed_on_one_vector(nic):
    n, ch = nic
    for qid in (hw.CMDQ, hw.CMDCQ, hw.EVENTQ, hw.OSENDQ_FIRST, hw.ORECVQ_FIRST, hw.OCOMPLQ_FIRST):
        assert n.regs[hw.qreg(qid, "Q_CTRL")] == 1 and n.regs[hw.qreg(qid, "Q_VECTOR")] == 2
    assert n.regs[hw.qreg(hw.OCOMPLQ_FIRST, "Q_SIZE")] == 16


def test_offload_work_wakes_the_miniport_through_its_hooks(nic):
    """The chimney registers with the miniport (a ready check on its to-host rings, the
    owed kick before a wait) instead of replacing the miniport's methods."""
    n, ch = nic
    assert n.ready_checks == [ch.pending] and n.before_wait == [ch.kick_owed]
    assert not any(f() for f in n.ready_checks)
    n.put(hw.EVENTQ, kind=hw.EV_RETRIEVE, reason=hw.RR_TIMEOUT, ctx=102, host_handle=13, value=0)
    assert all(f() for f in n.ready_checks)         # an event waiting: a receiver wakes
    ch.poll()
    assert not any(f() for f in n.ready_checks)


def test_initiate_carries_the_tree_and_returns_contexts(nic):
    n, ch = nic
    done = []
    cmd = ch.initiate(tree(send=b"unsent", recv=b"buffered"), cb=done.append)
    (d,) = n.take(hw.CMDQ)
    assert d["opcode"] == hw.CMD_INITIATE and d["resp_len"] >= 3 * hw.ObjStatus.size
    recs = codec.decode_records(n.bus.read(d["req_addr"], d["req_len"]))
    assert [r.type for r in recs] == [hw.OBJ_NEIGHBOR, hw.OBJ_PATH, hw.OBJ_TCP]
    assert [r.parent for r in recs] == [codec.NONE32, 0, 1]
    t = recs[2].state
    assert t.delegated.send_buffer == b"unsent" and t.delegated.recv_buffer == b"buffered"
    assert t.const.local_ip == "10.199.0.2" and t.const.remote_port == 5201
    assert not cmd.done and ch.pending() is False
    resp = codec.encode_statuses([ObjEntry(r.type, r.host_handle, nic_ctx=100 + i, status=0)
                                  for i, r in enumerate(recs)])
    complete(n, d, hw.ST_SUCCESS, resp, 3)
    assert ch.pending() is True
    ch.poll()
    assert done == [cmd] and cmd.ok
    assert [(e.host_handle, e.nic_ctx) for e in cmd.result] == [(11, 100), (12, 101), (13, 102)]
    assert ch.arena.used == sum(b.size for b in ch.pool.values())      # command buffers freed


def test_send_requests_completions_and_arena(nic):
    n, ch = nic
    got = []

    class H:
        def on_send_done(self, tag, nbytes, status):
            got.append((tag, nbytes, status))
    ch.register(13, H())
    used0 = ch.arena.used
    t1 = ch.send(102, 13, b"a" * 3000)
    t2 = ch.send(102, 13, memoryview(b"bcd"))
    t3 = ch.disconnect(102, 13)
    reqs = n.take(hw.OSENDQ_FIRST)
    assert [(r["ctx"], r["flags"], r["len"], r["tag"]) for r in reqs] == [
        (102, hw.OSF_SEND, 3000, t1), (102, hw.OSF_SEND, 3, t2), (102, hw.OSF_DISCONNECT, 0, t3)]
    assert n.bus.read(reqs[1]["addr"], 3) == b"bcd"
    assert ch.arena.used > used0
    # a batch of completions
    for r, st in zip(reqs, (hw.ST_SUCCESS, hw.ST_SUCCESS, hw.ST_UPLOADED)):
        n.put(hw.OCOMPLQ_FIRST, kind=hw.OC_SEND_DONE, flags=0, status=st, tag=r["tag"],
              host_handle=13, len=r["len"], ctx=102)
    assert ch.poll() == 3
    assert got == [(t1, 3000, 0), (t2, 3, 0), (t3, 0, hw.ST_UPLOADED)]
    assert ch.arena.used == used0
    # the ring holds 8: the ninth request waits for the device to consume
    tags = [ch.send(102, 13, b"x") for _ in range(9)]
    assert tags[-1] is None and None not in tags[:8]
    n.take(hw.OSENDQ_FIRST)
    assert ch.send(102, 13, b"y") is not None


def test_posted_receives_and_indications(nic):
    n, ch = nic
    log = []

    class H:
        def on_recv_done(self, tag, data, flags, status):
            log.append(("recv", tag, data, flags, status))

        def on_indicate(self, data, flags):
            log.append(("ind", data))
            return 3            # partial
    ch.register(13, H())
    tag = ch.post_receive(102, 13, 1000, push=True)
    tag2 = ch.post_receive(102, 13, 500, push=False)
    posts = n.take(hw.ORECVQ_FIRST)
    assert [(p["flags"], p["len"], p["tag"]) for p in posts] == [
        (hw.ORF_POST, 1000, tag), (hw.ORF_POST | hw.ORF_NO_PUSH, 500, tag2)]
    n.bus.write(posts[0]["addr"], b"hello")
    n.put(hw.OCOMPLQ_FIRST, kind=hw.OC_RECV_DONE, flags=hw.OCF_PUSH, status=0, tag=tag,
          host_handle=13, len=5, ctx=102)
    pool = n.pool[0]
    n.bus.write(pool["addr"], b"indicated")
    n.put(hw.OCOMPLQ_FIRST, kind=hw.OC_INDICATE, flags=0, status=0, tag=pool["tag"],
          host_handle=13, len=9, ctx=102)
    ch.poll()
    assert log == [("recv", tag, b"hello", hw.OCF_PUSH, 0), ("ind", b"indicated")]
    # the answer (3 bytes taken) and the pool buffer given back
    ans = n.take(hw.ORECVQ_FIRST)
    assert [(a["flags"], a["ctx"], a["len"]) for a in ans] == [(hw.ORF_ACCEPT, 102, 3),
                                                                (hw.ORF_POOL, 0, 4096)]
    assert ans[1]["addr"] == pool["addr"]
    assert ch.stats["indicate_accepted_bytes"] == 3


def test_events_are_routed_by_host_handle(nic):
    n, ch = nic
    evs, status = [], []

    class H:
        def on_event(self, kind, reason, value):
            evs.append((kind, reason, value))
    ch.register(13, H())
    ch.status_handler = status.append
    n.put(hw.EVENTQ, kind=hw.EV_RETRIEVE, reason=hw.RR_TIMEOUT, ctx=102, host_handle=13, value=0)
    n.put(hw.EVENTQ, kind=hw.EV_SEND_BACKLOG, reason=0, ctx=102, host_handle=13, value=65536)
    n.put(hw.EVENTQ, kind=hw.EV_PAUSE, reason=0, ctx=0, host_handle=0, value=0)
    n.put(hw.EVENTQ, kind=hw.EV_ABORT, reason=0, ctx=7, host_handle=999, value=0)
    ch.poll()
    assert evs == [(hw.EV_RETRIEVE, hw.RR_TIMEOUT, 0), (hw.EV_SEND_BACKLOG, 0, 65536)]
    assert status == [hw.EV_PAUSE] and ch.paused
    assert ch.stats["ev_unknown_handle"] == 1
    assert ch.events[0]["reason_name"] == "TIMEOUT"
    # the driver returned the entries: the device may reuse them
    assert n.dbw[hw.DB_TAIL_BASE + 4 * hw.EVENTQ] == 4


def test_terminate_returns_state_and_data_and_retries_no_space(nic):
    n, ch = nic
    done = []
    ch.terminate([102], cb=done.append, data_room=0)
    (d,) = n.take(hw.CMDQ)
    assert codec.decode_contexts(n.bus.read(d["req_addr"], d["req_len"])) == [102]
    big = b"s" * 9000
    rec = ObjEntry(hw.OBJ_TCP, 13, codec.NONE32, tcp_state(send=big, recv=b"r" * 10), nic_ctx=102)
    resp = codec.encode_records([rec])
    assert len(resp) > d["resp_len"]          # too small: NO_SPACE, nothing changed
    complete(n, d, hw.ST_NO_SPACE)
    ch.poll()
    assert not done and ch.stats["terminate_no_space_retry"] == 1
    (d2,) = n.take(hw.CMDQ)
    assert d2["opcode"] == hw.CMD_TERMINATE and d2["resp_len"] >= len(resp)
    complete(n, d2, hw.ST_SUCCESS, resp)
    ch.poll()
    (c,) = done
    assert c.ok and c.result[0].state.delegated.send_buffer == big
    assert c.result[0].state.delegated.recv_buffer == b"r" * 10


def test_query_and_bad_response(nic):
    n, ch = nic
    cmd = ch.query([102])
    (d,) = n.take(hw.CMDQ)
    rec = ObjEntry(hw.OBJ_TCP, 13, codec.NONE32, tcp_state(send=b"abc"), nic_ctx=102)
    complete(n, d, hw.ST_SUCCESS, codec.encode_records([rec], with_data=False))
    ch.wait(cmd, 1)
    assert cmd.result[0].state.delegated.cwnd == 14600
    cmd = ch.query([5])
    (d,) = n.take(hw.CMDQ)
    complete(n, d, hw.ST_SUCCESS, b"\xff" * 40)       # garbage: reported, not raised
    ch.wait(cmd, 1)
    assert cmd.error and ch.stats["cmd_bad_response"] == 1


def test_dma_arena_first_fit_and_coalescing():
    buf = DmaBuffer(memoryview(bytearray(4096)), IOVA)
    a = DmaArena(buf, align=64)
    x, y, z = a.alloc(100), a.alloc(64), a.alloc(1000)
    assert (x.iova, y.iova, z.iova) == (IOVA, IOVA + 128, IOVA + 192)
    assert a.alloc(4096) is None
    a.free(y)
    assert a.alloc(64).iova == IOVA + 128       # the hole is reused
    a.free(x)
    a.free(z)
    a.free(a.alloc(1))                          # (takes the first hole again)
    assert a.used == 64
