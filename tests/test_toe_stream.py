"""A seeded random stream of commands and data requests -- valid, stale and bogus
handles, bad fields, batches behind one doorbell -- against the in-process TOE with a
peer that acknowledges, sends and garbles.  Every request gets exactly one completion,
and at the end every live object can be terminated."""
from __future__ import annotations

import collections
import random

import pytest
from test_toe_engine import LPORT, OUR_MAC, PEER_MAC, SND, Rig, tree
from test_toe_helpers import eth_ipv4_tcp

from chimney import hw
from chimney.device.toe import parse_records
from chimney.staterec import codec
from chimney.staterec.codec import NONE32, ObjEntry
from chimney.tcp.segment import ACK, FIN, PSH, RST, Segment

COMMANDS = 10_000
SLOTS = 8                       # command request/response buffers in flight
BAD = 0xDEAD_0000


class Stream:
    def __init__(self, rig: Rig, seed: int):
        self.rig, self.drv = rig, rig.drv
        self.rnd = random.Random(seed)
        self.tag = 1 << 20
        self.cmd_slots = [(rig.alloc(64 << 10), rig.alloc(256 << 10)) for _ in range(SLOTS)]
        self.free_slots = list(range(SLOTS))
        self.cmds: dict[int, tuple[int, int, list]] = {}   # tag -> (opcode, slot, ctxs)
        self.reqs: dict[int, str] = {}          # OSEND / POST tags awaiting completion
        self.pool_tags: set[int] = set()
        self.done: collections.Counter = collections.Counter()
        self.late: list = []                    # completions for unknown / finished tags
        self.live: dict[int, int] = {}          # ctx -> object type
        self.children: dict[int, set[int]] = collections.defaultdict(set)
        self.parent: dict[int, int] = {}
        self.stale: list[int] = []
        self.ports = iter(range(20000, 60000))
        self.data = rig.alloc(1 << 16)

    def next_tag(self) -> int:
        self.tag += 1
        return self.tag

    # -- picking handles -------------------------------------------------------------
    def any_ctx(self, typ=None) -> int:
        r = self.rnd.random()
        live = [c for c, t in self.live.items() if typ is None or t == typ]
        if r < 0.7 and live:
            return self.rnd.choice(live)
        if r < 0.85 and self.stale:
            return self.rnd.choice(self.stale)
        return self.rnd.choice([0, 1, NONE32, self.rnd.getrandbits(32)])

    # -- commands -------------------------------------------------------------------
    def post_cmd(self, opcode: int, req: bytes, ctxs=(), resp_len: int = 256 << 10,
                 **over) -> None:
        slot = self.free_slots.pop()
        rq, rs = self.cmd_slots[slot]
        rq.mem[:len(req)] = req
        tag = self.next_tag()
        self.cmds[tag] = (opcode, slot, list(ctxs))
        d = {"opcode": opcode, "tag": tag, "req_addr": rq.iova, "req_len": len(req),
             "resp_addr": rs.iova, "resp_len": resp_len}
        d.update(over)
        drv = self.drv
        esz = hw.CmdDesc.size
        s = drv.tail[hw.CMDQ] % drv.ring
        drv.rings[hw.CMDQ].mem[s * esz:(s + 1) * esz] = hw.CmdDesc.pack(**d)
        drv.tail[hw.CMDQ] += 1

    def random_tree(self) -> list[ObjEntry]:
        rnd = self.rnd
        e = tree()
        e[2].state.const.local_port = next(self.ports)
        e[2].host_handle = self.next_tag()
        neighs = [c for c, t in self.live.items() if t == hw.OBJ_NEIGHBOR]
        paths = [c for c, t in self.live.items() if t == hw.OBJ_PATH]
        r = rnd.random()
        if r < 0.4 and paths:
            e = [ObjEntry(hw.OBJ_PATH, 12, NONE32, link=True, nic_ctx=rnd.choice(paths)), e[2]]
            e[1].parent = 0
        elif r < 0.6 and neighs:
            e = [ObjEntry(hw.OBJ_NEIGHBOR, 11, NONE32, link=True,
                          nic_ctx=rnd.choice(neighs)), e[1], e[2]]
        elif r < 0.7:
            e[0] = ObjEntry(hw.OBJ_NEIGHBOR, 11, NONE32, link=True, nic_ctx=self.any_ctx())
        t = e[-1].state
        r = rnd.random()
        if r < 0.1:
            t.delegated.snd_nxt = SND - 5                  # inconsistent
        elif r < 0.15:
            t.const.remote_mss = 0
        elif r < 0.2:
            t.delegated.send_buffer = b"u" * rnd.randint(1, 3000)
            t.delegated.snd_nxt = t.delegated.snd_max = SND + len(t.delegated.send_buffer) // 2
        elif r < 0.25:
            t.cached.keepalive, t.cached.ka_timeout, t.cached.ka_interval = True, 300, 200
        elif r < 0.3:                                      # old timestamps, huge counters
            t.const.timestamps = True
            t.delegated.ts_recent, t.delegated.ts_recent_age = 5, 0xFFFFFFF0
            t.delegated.cwnd = 0xFFFFFFFF
        return e

    def command(self) -> None:
        rnd = self.rnd
        r = rnd.random()
        if r < 0.3:
            self.post_cmd(hw.CMD_INITIATE, codec.encode_records(self.random_tree()))
        elif r < 0.4:
            ctx = self.any_ctx(hw.OBJ_TCP)
            t = tree()[2]
            t.nic_ctx = ctx
            t.state.cached.ttl = rnd.randint(1, 255)
            self.post_cmd(hw.CMD_UPDATE, codec.encode_records([t]))
        elif r < 0.6:
            ctxs = [self.any_ctx() for _ in range(rnd.randint(1, 4))]
            self.post_cmd(hw.CMD_QUERY, codec.encode_contexts(ctxs),
                          resp_len=rnd.choice([256 << 10, 256 << 10, 8]))
        elif r < 0.65:
            self.post_cmd(hw.CMD_INVALIDATE, codec.encode_contexts([self.any_ctx()]))
        elif r < 0.9:
            ctxs = [self.any_ctx() for _ in range(rnd.randint(1, 3))]
            self.post_cmd(hw.CMD_TERMINATE, codec.encode_contexts(ctxs), ctxs)
        elif r < 0.93:
            self.post_cmd(hw.CMD_QUERY, b"\x01\x02\x03")
        elif r < 0.96:
            self.post_cmd(hw.CMD_QUERY, codec.encode_contexts([1]), req_addr=BAD)
        else:
            self.post_cmd(rnd.choice([0, 8, 99]), b"")

    # -- data requests --------------------------------------------------------------
    def data_request(self) -> None:
        rnd, drv = self.rnd, self.drv
        ctx = self.any_ctx(hw.OBJ_TCP)
        r = rnd.random()
        tag = self.next_tag()
        if r < 0.35:
            addr = self.data.iova if rnd.random() < 0.9 else BAD
            drv.osend(ctx, addr, rnd.choice([1, 100, 1460, 5000, 60000]), tag=tag)
            self.reqs[tag] = "send"
        elif r < 0.4:
            drv.osend(ctx, 0, 0, tag=tag, flags=rnd.choice([hw.OSF_DISCONNECT, hw.OSF_ABORT, 0,
                                                             0x40]))
            self.reqs[tag] = "ctl"
        elif r < 0.7:
            addr = self.data.iova if rnd.random() < 0.9 else BAD
            drv.orecv(ctx, addr, rnd.choice([10, 1000, 65536]), tag=tag,
                      flags=rnd.choice([hw.ORF_POST, hw.ORF_POST | hw.ORF_NO_PUSH]))
            self.reqs[tag] = "recv"
        elif r < 0.8:
            drv.orecv(0, self.data.iova, 4096, tag=tag, flags=hw.ORF_POOL)
            self.pool_tags.add(tag)
        else:
            drv.orecv(ctx, 0, rnd.choice([0, 10, 1 << 20]), tag=0, flags=hw.ORF_ACCEPT)

    # -- the peer ---------------------------------------------------------------------
    def peer(self) -> None:
        rnd, rig = self.rnd, self.rig
        rig.out()
        tcp = [c for c, t in self.live.items() if t == hw.OBJ_TCP]
        if not tcp:
            return
        o = rig.nic.toe.conns.get(rnd.choice(tcp))
        if o is None:
            return
        port = o.conn.const.local_port
        r = rnd.random()
        d = o.conn.d
        if r < 0.5:
            seg = Segment(5001, port, seq=d.rcv_nxt, ack=d.snd_max, flags=ACK, window=65535,
                          payload=b"d" * rnd.choice([0, 0, 100, 1400]))
        elif r < 0.6:
            seg = Segment(5001, port, seq=d.rcv_nxt, ack=d.snd_max, flags=ACK | FIN, window=0)
        elif r < 0.65:
            seg = Segment(5001, port, seq=d.rcv_nxt, flags=RST, window=0)
        else:
            seg = Segment(5001, port, seq=rnd.getrandbits(32), ack=rnd.getrandbits(32),
                          flags=rnd.getrandbits(6) | ACK, window=rnd.getrandbits(16),
                          payload=b"g" * rnd.choice([0, 50]))
        seg.flags |= PSH if seg.payload else 0
        rig.peer.send(eth_ipv4_tcp(PEER_MAC, OUR_MAC, "10.9.0.1", "10.9.0.2", seg))

    # -- completions ------------------------------------------------------------------
    def collect(self) -> None:
        drv = self.drv
        for c in drv.pop(hw.CMDCQ):
            self.on_cmd(c)
        for c in drv.pop(hw.OCOMPLQ_FIRST):
            k, tag = c["kind"], c["tag"]
            if k == hw.OC_INDICATE:
                assert tag in self.pool_tags, c
                self.pool_tags.discard(tag)
                if self.rnd.random() < 0.7:       # answer it, or leave it hanging for a while
                    drv.orecv(c["ctx"], 0, self.rnd.choice([0, c["len"]]), tag=0,
                              flags=hw.ORF_ACCEPT)
                continue
            if k == hw.OC_POOL_RETURN:
                self.pool_tags.discard(tag)
                continue
            if k == hw.OC_ERROR and tag in self.pool_tags:
                self.pool_tags.discard(tag)
                continue
            if tag == 0:
                continue                          # an ACCEPT refused (tag 0: ours)
            self.done[tag] += 1
            if tag not in self.reqs:
                self.late.append(c)
            self.reqs.pop(tag, None)
        for _ in drv.pop(hw.EVENTQ):
            pass

    def on_cmd(self, c: dict) -> None:
        tag = c["tag"]
        self.done[tag] += 1
        if tag not in self.cmds:
            self.late.append(c)
            return
        opcode, slot, _ = self.cmds.pop(tag)
        self.free_slots.append(slot)
        rs = self.cmd_slots[slot][1]
        resp = bytes(rs.mem[:c["resp_bytes"]])
        if opcode == hw.CMD_INITIATE and resp:
            statuses = codec.decode_statuses(resp)
            for st in statuses:
                if st.status == hw.ST_SUCCESS and st.nic_ctx not in self.live:
                    self.live[st.nic_ctx] = st.type
            self._relink(statuses)
        elif opcode == hw.CMD_TERMINATE and resp:
            for rec in parse_records(resp):
                if rec.status == hw.ST_SUCCESS:
                    self._gone(rec.nic_ctx)

    def _relink(self, statuses) -> None:
        toe = self.rig.nic.toe
        for st in statuses:
            o = toe.objs.get(st.nic_ctx)
            if st.status == hw.ST_SUCCESS and o is not None and o.parent is not None:
                self.parent[o.ctx] = o.parent.ctx
                self.children[o.parent.ctx].add(o.ctx)

    def _gone(self, ctx: int) -> None:
        self.live.pop(ctx, None)
        self.stale.append(ctx)
        p = self.parent.pop(ctx, None)
        if p is not None:
            self.children[p].discard(ctx)

    # -- the run ------------------------------------------------------------------------
    def run(self, n: int) -> None:
        rnd, rig = self.rnd, self.rig
        issued = 0
        while issued < n:
            batch = rnd.randint(1, 6)
            for _ in range(batch):
                if rnd.random() < 0.5 and self.free_slots:
                    self.command()
                else:
                    self.data_request()
                issued += 1
            self.drv.ring_db(hw.CMDQ)
            for _ in range(rnd.randint(0, 2)):
                self.peer()
            rig.now += rnd.choice([0.0, 0.001, 0.05, 0.3])
            rig.pump()
            self.collect()
            for tag, k in self.done.items():
                assert k == 1, f"request {tag} completed {k} times"

    def terminate_all(self) -> None:
        """Children first, a few at a time: every live object terminates with SUCCESS."""
        for typ in (hw.OBJ_TCP, hw.OBJ_PATH, hw.OBJ_NEIGHBOR):
            ctxs = [c for c, t in self.live.items() if t == typ]
            for i in range(0, len(ctxs), 16):
                part = ctxs[i:i + 16]
                c, resp = self.drv.command(hw.CMD_TERMINATE, codec.encode_contexts(part),
                                           4 << 20)
                recs = parse_records(resp)
                assert c["status"] == hw.ST_SUCCESS, (c, [(r.nic_ctx, r.status) for r in recs])
                for r in recs:
                    self._gone(r.nic_ctx)
                self.rig.pump()
                self.collect()


@pytest.mark.parametrize("seed", [1, 2])
def test_random_command_stream_one_completion_each_and_all_terminable(seed):
    rig = Rig()
    try:
        s = Stream(rig, seed)
        s.run(COMMANDS)
        for _ in range(5):
            rig.pump()
            s.collect()
        assert not s.cmds, f"{len(s.cmds)} commands never completed"
        s.terminate_all()
        assert not s.live
        toe = rig.nic.toe
        assert not toe.objs and not toe.conns and rig.stat("offload_conns") == 0
        assert not s.reqs, f"{len(s.reqs)} data requests never completed: {list(s.reqs)[:10]}"
        assert all(k == 1 for k in s.done.values())
        assert toe.internal_errors == 0
        # stale handles are answered, and the TOE still takes a fresh offload
        rig.out()
        e = tree()
        e[2].state.const.local_port = LPORT
        c, st = rig.drv.initiate(e)
        assert c["status"] == hw.ST_SUCCESS
        rig.drv.osend(st[2].nic_ctx, s.data.iova, 10, tag=7)
        rig.pump()
        assert [len(x.payload) for x in rig.out()] == [10]
    finally:
        rig.close()
