"""Commands read and hand back state without transmitting from inside the command
handler: QUERY has no effect on the wire or the timers (monitoring every 0.1 s must
not change a connection's behaviour); TERMINATE's pending ACK leaves through the
connection's normal output path in the device loop, before the completion."""
from __future__ import annotations

import pytest
from test_toe_engine import RCV, SND, Rig, data, offload

from chimney import hw
from chimney.tcp.segment import ACK


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def no_send_inside_commands(rig, monkeypatch):
    """Fail the test if anything is transmitted while a command is being handled."""
    toe = rig.nic.toe
    inside = []
    real_cmd, real_send = toe._command, toe._send

    def command(*a):
        inside.append(True)
        try:
            return real_cmd(*a)
        finally:
            inside.pop()

    def send(o, segs):
        assert not inside, f"transmitted {segs} from inside a command"
        return real_send(o, segs)
    monkeypatch.setattr(toe, "_command", command)
    monkeypatch.setattr(toe, "_send", send)


def test_query_leaves_the_delayed_ack_alone_and_sends_nothing(rig, monkeypatch):
    no_send_inside_commands(rig, monkeypatch)
    ctx = offload(rig)
    rig.drv.set_params(delayed_ack_ticks=200)
    rig.feed(seq=RCV, ack=SND, payload=data(100))          # one small segment: ACK delayed
    assert rig.out() == []
    conn = rig.nic.toe.conns[ctx].conn
    due = conn._delack_deadline
    assert due == pytest.approx(rig.now + 0.2)
    for _ in range(10):                                     # "perf" polling every 10 ms
        rig.now += 0.01
        c, recs = rig.drv.query([ctx])
        assert c["status"] == hw.ST_SUCCESS
        assert recs[0].state.delegated.rcv_nxt == RCV + 100
        assert rig.out() == []
        assert conn._delack_deadline == due
    rig.advance(0.1)                                        # 0.2 s after the data
    acks = rig.out()
    assert [(s.flags, s.ack, len(s.payload)) for s in acks] == [(ACK, RCV + 100, 0)]


def test_terminate_sends_the_pending_ack_from_the_loop_before_completing(rig, monkeypatch):
    no_send_inside_commands(rig, monkeypatch)
    ctx = offload(rig)
    rig.feed(seq=RCV, ack=SND, payload=data(10))
    assert rig.out() == []
    c, recs = rig.drv.terminate([ctx])
    assert c["status"] == hw.ST_SUCCESS
    assert recs[0].state.delegated.rcv_nxt == RCV + 10
    assert recs[0].state.delegated.recv_buffer == data(10)
    assert [(s.flags, s.ack) for s in rig.out()] == [(ACK, RCV + 10)]


def test_terminate_of_an_invalidated_connection_sends_nothing(rig):
    from chimney.staterec import codec
    ctx = offload(rig)
    rig.feed(seq=RCV, ack=SND, payload=data(10))
    assert rig.drv.command(hw.CMD_INVALIDATE, codec.encode_contexts([ctx]))[0]["status"] == 0
    c, _ = rig.drv.terminate([ctx])
    assert c["status"] == hw.ST_SUCCESS
    assert rig.out() == []              # the NIC stopped sending; the host sends the ACK
