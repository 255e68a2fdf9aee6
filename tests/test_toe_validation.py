"""INITIATE, UPDATE and SET_PARAMS refuse inconsistent state up front, with a status
per object, and a bad request in a batch costs only itself (the in-process Rig of
test_toe_engine.py, clock injected)."""
from __future__ import annotations

import pytest
from test_toe_engine import LPORT, OUR_MAC, PEER_MAC, RCV, SND, Rig, data, offload, tree

from chimney import hw
from chimney.device.toe_objects import MAX_INITIATE_SEND
from chimney.staterec import codec
from chimney.staterec.codec import NONE32, ObjEntry
from chimney.tcp.segment import ACK
from chimney.tcp.state import TcpState


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def _set(entry, part, **kw):
    for k, v in kw.items():
        setattr(getattr(entry.state, part), k, v)


# (what, how to spoil the TCP record of tree())
BAD_TCP = [
    ("snd_nxt behind snd_una", lambda t: _set(t, "delegated", snd_nxt=SND - 1)),
    ("snd_max behind snd_nxt", lambda t: _set(t, "delegated", snd_nxt=SND + 10, snd_max=SND + 5,
                                              send_buffer=b"x" * 10)),
    ("more in flight than carried", lambda t: _set(t, "delegated", snd_nxt=SND + 500,
                                                   snd_max=SND + 500, send_buffer=b"x" * 10)),
    ("data in flight, no timer", lambda t: _set(t, "delegated", snd_nxt=SND + 10,
                                                snd_max=SND + 10, send_buffer=b"x" * 10)),
    ("FIN-WAIT-1 without a FIN", lambda t: _set(t, "delegated", state=TcpState.FIN_WAIT_1)),
    ("send window scale 15", lambda t: _set(t, "const", window_scaling=True, snd_wscale=15)),
    ("receive window scale 15", lambda t: _set(t, "const", window_scaling=True, rcv_wscale=15)),
    ("scale without scaling", lambda t: _set(t, "const", snd_wscale=3)),
    ("MSS 0", lambda t: _set(t, "const", remote_mss=0)),
    ("MSS 65535", lambda t: _set(t, "const", remote_mss=65535)),
    ("receive window 1 GiB", lambda t: _set(t, "delegated", rcv_wnd=1 << 30)),
    ("send window beyond the field", lambda t: _set(t, "delegated", snd_wnd=1 << 20,
                                                    max_snd_wnd=1 << 20)),
    ("cwnd 0", lambda t: _set(t, "delegated", cwnd=0)),
    ("TS.Recent without timestamps", lambda t: _set(t, "delegated", ts_recent=12345)),
    ("retransmit count 2^20", lambda t: _set(t, "delegated", retransmit_count=1 << 20)),
    ("window-probe count 2^31", lambda t: _set(t, "delegated", window_probe_count=1 << 31)),
    ("send data past what one record can carry back", lambda t: _set(t, "delegated",
                                                                     send_buffer=b"s" * (MAX_INITIATE_SEND + 1))),
    ("local port 0", lambda t: _set(t, "const", local_port=0)),
    ("remote port 0", lambda t: _set(t, "const", remote_port=0)),
    ("keep-alive every 0 ticks", lambda t: _set(t, "cached", keepalive=True, ka_interval=0)),
    ("keep-alive idle 0 ticks", lambda t: _set(t, "cached", keepalive=True, ka_timeout=0)),
    # refused by the engine's own chimney.tcp.validate_state (codec.check_tcp passes them)
    ("SND.WL1 ahead of RCV.NXT", lambda t: _set(t, "delegated", snd_wl1=RCV + 10)),
    ("FIN-WAIT-2 without a FIN", lambda t: _set(t, "delegated", state=TcpState.FIN_WAIT_2)),
]


def _initiate_raw(rig, buf: bytes, n: int):
    c, resp = rig.drv.command(hw.CMD_INITIATE, buf, hw.ObjStatus.size * n)
    return c, codec.decode_statuses(resp)


@pytest.mark.parametrize("what,spoil", BAD_TCP, ids=[w for w, _ in BAD_TCP])
def test_inconsistent_tcp_state_refused_at_initiate(rig, what, spoil):
    e = tree()
    spoil(e[2])
    c, st = rig.drv.initiate(e)
    assert c["status"] == hw.ST_PARTIAL, what
    assert [s.status for s in st] == [hw.ST_SUCCESS, hw.ST_SUCCESS, hw.ST_INVALID_REQUEST]
    assert st[2].nic_ctx == 0 and st[2].host_handle == 13
    assert rig.stat("offload_conns") == 0
    for _ in range(3):
        rig.advance(1.0)
    assert rig.out() == [] and rig.nic.toe.internal_errors == 0
    # the same 4-tuple, consistent, is taken
    c, st = rig.drv.initiate(tree())
    assert [s.status for s in st] == [0, 0, 0]


def _path_record(entries, mutate) -> bytes:
    buf = bytearray(codec.encode_records(entries))
    rec0 = hw.ObjRecord.size + hw.NeighState.size
    mutate(buf, rec0 + hw.ObjRecord.size)              # start of the PathState
    return bytes(buf)


def test_unknown_family_and_bad_neighbours_fail_their_dependents(rig):
    # path flags with a bit beyond IPv6: unknown family
    buf = _path_record(tree(), lambda b, p: b.__setitem__(slice(p + 36, p + 40),
                                                         (2).to_bytes(4, "little")))
    c, st = _initiate_raw(rig, buf, 3)
    assert c["status"] == hw.ST_PARTIAL
    assert [s.status for s in st] == [hw.ST_SUCCESS, hw.ST_INVALID_REQUEST, hw.ST_FAILURE]
    # a multicast neighbour, an unspecified path address
    e = tree()
    e[0].state = codec.Neighbor(OUR_MAC, b"\x01\x00\x5e\x00\x00\x01")
    c, st = rig.drv.initiate(e)
    assert [s.status for s in st] == [hw.ST_INVALID_REQUEST, hw.ST_FAILURE, hw.ST_FAILURE]
    assert c["status"] == hw.ST_FAILURE
    e = tree()
    e[1].state = codec.Path("0.0.0.0", "10.9.0.1", 1500)
    e[2].state.const.local_ip = "0.0.0.0"
    c, st = rig.drv.initiate(e)
    assert [s.status for s in st] == [hw.ST_SUCCESS, hw.ST_INVALID_REQUEST, hw.ST_FAILURE]
    # a path linked to a neighbour that does not exist (never was, or terminated)
    e = tree()
    links = [ObjEntry(hw.OBJ_NEIGHBOR, 11, NONE32, link=True, nic_ctx=0x4242), e[1], e[2]]
    c, st = rig.drv.initiate(links)
    assert [s.status for s in st] == [hw.ST_INVALID_HANDLE, hw.ST_FAILURE, hw.ST_FAILURE]
    assert rig.stat("offload_conns") == 0


def test_update_refuses_unrunnable_cached_state(rig):
    c, st = rig.drv.initiate(tree())
    n_ctx, ctx = st[0].nic_ctx, st[2].nic_ctx
    t = tree()[2]
    t.nic_ctx = ctx
    t.state.cached.keepalive = True
    t.state.cached.ka_timeout = t.state.cached.ka_interval = 0
    good = tree()[2]
    good.nic_ctx = ctx
    good.state.cached.ttl = 9
    n = ObjEntry(hw.OBJ_NEIGHBOR, 11, NONE32, codec.Neighbor(OUR_MAC, bytes(6)), nic_ctx=n_ctx)
    c, _ = rig.drv.command(hw.CMD_UPDATE, codec.encode_records([good, t, n]))
    assert c["status"] == hw.ST_PARTIAL and c["count"] == 3
    conn = rig.nic.toe.conns[ctx].conn
    assert conn.cached.ttl == 9 and not conn.cached.keepalive     # only the good one taken
    assert rig.nic.toe.objs[n_ctx].st.dst_mac == PEER_MAC
    rig.feed(seq=RCV, ack=SND)                                   # restarts keep-alive
    for _ in range(20):
        rig.pump()
    assert rig.out() == []                                       # no keep-alive storm


def test_set_params_refuses_unbounded_backoff(rig):
    assert rig.drv.set_params(max_retransmits=1 << 20)["status"] == hw.ST_INVALID_REQUEST
    assert rig.drv.set_params(delayed_ack_ticks=5000)["status"] == hw.ST_INVALID_REQUEST
    assert rig.nic.toe.cfg.max_retransmits == 15
    assert rig.drv.set_params(max_retransmits=255)["status"] == hw.ST_SUCCESS


def test_old_timestamps_in_the_state_do_not_storm(rig):
    """TS.Recent far ahead of what the peer sends (its segments look old: PAWS) and a
    TS.Recent 49 days old: the connection answers at most once per segment, and its
    retransmissions back off."""
    for age in (0, 0xFFFFFFFE):
        e = tree(ts_recent=0x80000000, ts_recent_age=age, ts_time=5)
        e[2].state.const.timestamps = True
        e[2].state.const.local_port = LPORT + age % 7
        c, st = rig.drv.initiate(e)
        assert c["status"] == hw.ST_SUCCESS, st
        ctx = st[2].nic_ctx
        buf = rig.alloc(65536)
        rig.drv.osend(ctx, buf.iova, 20000, tag=1)
        rig.pump()
        seen = len(rig.out())
        for i in range(100):
            rig.feed(seq=RCV, ack=SND, payload=b"q" * 100, tsval=1000 + i, tsecr=5)
            rig.feed(seq=RCV, ack=SND, tsval=1000 + i, tsecr=5, flags=ACK)
            seen += len(rig.out())
        assert seen <= 100 + 16
        for _ in range(60):
            rig.advance(0.5)
            seen += len(rig.out())
        assert seen <= 100 + 16 + 6          # backed-off retransmissions in 30 s
        rig.drv.terminate([ctx])


# -- item: a bad request in a batch -----------------------------------------------------
def test_one_bad_record_in_an_initiate_batch_costs_only_itself(rig):
    entries = tree()[:2]
    for i in range(5):
        t = tree()[2]
        t.host_handle = 100 + i
        t.state.const.local_port = 20000 + i
        entries.append(t)
    entries[4].state.const.remote_mss = 0                # handle 102: bad MSS
    buf = bytearray(codec.encode_records(entries))
    # handle 103: a state that does not decode (state index 200) but is framed soundly
    pos = 0
    for i, e in enumerate(entries):
        h = hw.ObjRecord.unpack_from(buf, pos)
        if i == 5:
            off = pos + hw.ObjRecord.size + hw.TcpConstState.size + hw.TcpCachedState.size
            buf[off] = 200
        pos = (pos + hw.ObjRecord.size + h["state_len"] + h["data_len"] + 7) & ~7
    c, st = _initiate_raw(rig, bytes(buf), len(entries))
    assert c["status"] == hw.ST_PARTIAL and c["count"] == 7
    assert [s.status for s in st] == [0, 0, 0, 0, hw.ST_INVALID_REQUEST,
                                      hw.ST_INVALID_REQUEST, 0]
    assert [s.host_handle for s in st[2:]] == [100, 101, 102, 103, 104]
    assert rig.stat("offload_conns") == 3
    # the good ones work
    b = rig.alloc(4096)
    b.mem[:10] = data(10)
    rig.drv.osend(st[6].nic_ctx, b.iova, 10, tag=1)
    rig.pump()
    assert [(s.dst_port, s.src_port, s.payload) for s in rig.out()] == [(5001, 20004, data(10))]


def test_one_bad_command_in_a_ring_batch_costs_only_itself(rig):
    ctx = offload(rig)
    drv = rig.drv
    req = drv.req
    ctxbuf = codec.encode_contexts([ctx])
    req.mem[:4] = ctxbuf
    # five descriptors behind one doorbell: QUERY, bad opcode, QUERY with a wild
    # response address, bad flags, QUERY
    descs = [{"opcode": hw.CMD_QUERY, "resp_len": 4096}, {"opcode": 99},
             {"opcode": hw.CMD_QUERY, "resp_len": 4096, "resp_addr": 0xDEAD0000},
             {"opcode": hw.CMD_QUERY, "flags": 1, "resp_len": 4096},
             {"opcode": hw.CMD_QUERY, "resp_len": 4096}]
    esz = hw.CmdDesc.size
    for i, d in enumerate(descs):
        d.setdefault("resp_addr", drv.resp.iova)
        slot = drv.tail[hw.CMDQ] % drv.ring
        drv.rings[hw.CMDQ].mem[slot * esz:(slot + 1) * esz] = hw.CmdDesc.pack(
            tag=500 + i, req_addr=req.iova, req_len=4, **d)
        drv.tail[hw.CMDQ] += 1
    drv.ring_db(hw.CMDQ)
    rig.pump()
    got = {r["tag"]: r["status"] for r in drv.pop(hw.CMDCQ)}
    assert got == {500: hw.ST_SUCCESS, 501: hw.ST_INVALID_REQUEST, 502: hw.ST_DMA_ERROR,
                   503: hw.ST_INVALID_REQUEST, 504: hw.ST_SUCCESS}


def test_one_bad_send_in_a_ring_batch_costs_only_itself(rig):
    ctx = offload(rig)
    b = rig.alloc(4096)
    b.mem[:30] = data(30)
    rig.drv.osend(ctx, b.iova, 10, tag=1)
    rig.drv.osend(ctx, 0xDEAD0000, 10, tag=2)            # outside the mappings
    rig.drv.osend(ctx, b.iova, 10, tag=3, flags=0x80)    # unknown flag
    rig.drv.osend(ctx, b.iova + 10, 20, tag=4)
    rig.pump()
    assert b"".join(s.payload for s in rig.out()) == data(10) + data(30)[10:30]
    rig.feed(seq=RCV, ack=SND + 30)
    got = sorted((r["tag"], r["kind"], r["status"]) for r in rig.drv.pop(hw.OCOMPLQ_FIRST))
    assert got == [(1, hw.OC_SEND_DONE, 0), (2, hw.OC_ERROR, hw.ST_DMA_ERROR),
                   (3, hw.OC_ERROR, hw.ST_INVALID_REQUEST), (4, hw.OC_SEND_DONE, 0)]


# -- every object can always be terminated ----------------------------------------------
def test_counters_past_32_bits_still_query_and_terminate(rig):
    """TS.Recent 49 days old keeps ageing and a huge cwnd keeps growing: the values
    saturate in the state record instead of making QUERY and TERMINATE fail (the
    connection could otherwise never be uploaded)."""
    e = tree(ts_recent=77, ts_recent_age=0xFFFFFF00, cwnd=0xFFFFFFFF, ssthresh=0xFFFFFF00)
    e[2].state.const.timestamps = True
    c, st = rig.drv.initiate(e)
    assert c["status"] == hw.ST_SUCCESS, st
    ctx = st[2].nic_ctx
    b = rig.alloc(4096)
    rig.drv.osend(ctx, b.iova, 3000, tag=1)
    rig.pump()
    rig.out()
    rig.now += 5.0
    rig.feed(seq=RCV, ack=SND + 3000, tsval=100, tsecr=0)
    assert rig.nic.toe.conns[ctx].conn.d.cwnd > 0xFFFFFFFF
    c, recs = rig.drv.query([ctx])
    assert c["status"] == hw.ST_SUCCESS
    assert recs[0].state.delegated.cwnd == 0xFFFFFFFF
    c, recs = rig.drv.terminate([ctx, st[1].nic_ctx, st[0].nic_ctx])
    assert c["status"] == hw.ST_SUCCESS and [r.status for r in recs] == [0, 0, 0]
    d = recs[0].state.delegated
    assert d.snd_una == SND + 3000 and d.cwnd == 0xFFFFFFFF
    assert not rig.nic.toe.objs


def test_path_mtu_beyond_the_nics_mtu_refused(rig):
    """Segments sized for a path MTU the NIC cannot send would never leave (frames
    past the NIC's limit are not built): refused at INITIATE and UPDATE."""
    for mtu in (9000, 65535):
        e = tree()
        e[1].state = codec.Path("10.9.0.2", "10.9.0.1", mtu)
        c, st = rig.drv.initiate(e)
        assert c["status"] == hw.ST_PARTIAL
        assert [s.status for s in st] == [hw.ST_SUCCESS, hw.ST_INVALID_REQUEST, hw.ST_FAILURE]
    _, st = rig.drv.initiate(tree())
    p_ctx = st[1].nic_ctx
    up = ObjEntry(hw.OBJ_PATH, 12, NONE32, codec.Path("10.9.0.2", "10.9.0.1", 9000),
                  nic_ctx=p_ctx)
    assert rig.drv.command(hw.CMD_UPDATE, codec.encode_records([up]))[0]["status"] == \
        hw.ST_INVALID_HANDLE
    assert rig.nic.toe.objs[p_ctx].st.path_mtu == 1500
    # a jumbo NIC takes a jumbo path
    rig.nic.reg_write(hw.REG_MTU, 4, 9000)
    up.state = codec.Path("10.9.0.2", "10.9.0.1", 9000)
    assert rig.drv.command(hw.CMD_UPDATE, codec.encode_records([up]))[0]["status"] == \
        hw.ST_SUCCESS
