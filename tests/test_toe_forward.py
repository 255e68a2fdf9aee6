"""OSEND FORWARD: the host hands the TOE a received segment of an offloaded connection
(one the NIC could not take off the wire: IP options, fragments, IPv6 extension
headers, or held during a handover); the TOE processes it exactly as a received
segment and completes the request (the in-process Rig of test_toe_engine.py)."""
from __future__ import annotations

import pytest
from test_toe_engine import LPORT, OUR_IP, PEER_IP, RCV, RPORT, SND, Rig, data, offload

from chimney import hw
from chimney.tcp.segment import ACK, PSH, Segment


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def forward(rig, ctx, raw: bytes, tag: int, flags: int = hw.OSF_FORWARD):
    b = rig.alloc(max(len(raw), 1))
    b.mem[:len(raw)] = raw
    rig.drv.osend(ctx, b.iova, len(raw), tag=tag, flags=flags)
    rig.pump()


def seg_bytes(**kw) -> bytes:
    kw.setdefault("flags", ACK)
    kw.setdefault("window", 65535)
    ports = kw.pop("ports", (RPORT, LPORT))
    # a wrong checksum on purpose: the host checked it, the NIC does not again
    raw = bytearray(Segment(*ports, **kw).encode(PEER_IP, OUR_IP))
    raw[16] ^= 0xFF
    return bytes(raw)


def test_forwarded_segment_is_received_acknowledged_and_completed(rig):
    ctx = offload(rig)
    buf = rig.alloc(4096)
    rig.drv.orecv(ctx, buf.iova, 1000, tag=21)
    rig.pump()
    raw = seg_bytes(seq=RCV, ack=SND, payload=data(600, 4), flags=ACK | PSH)
    forward(rig, ctx, raw, tag=5)
    done = {r["tag"]: r for r in rig.drv.pop(hw.OCOMPLQ_FIRST)}
    assert (done[5]["kind"], done[5]["status"], done[5]["len"]) == (
        hw.OC_SEND_DONE, hw.ST_SUCCESS, len(raw))
    assert (done[21]["kind"], done[21]["len"]) == (hw.OC_RECV_DONE, 600)    # pushed
    assert bytes(buf.mem[:600]) == data(600, 4)
    rig.advance(0.5)                                   # the delayed ACK
    assert rig.out()[-1].ack == RCV + 600
    assert rig.nic.toe.forwarded == 1


def test_forwarded_ack_completes_a_send(rig):
    ctx = offload(rig)
    buf = rig.alloc(4096)
    buf.mem[:100] = data(100)
    rig.drv.osend(ctx, buf.iova, 100, tag=1)
    rig.pump()
    assert [len(s.payload) for s in rig.out()] == [100]
    forward(rig, ctx, seg_bytes(seq=RCV, ack=SND + 100), tag=2)
    got = sorted((r["tag"], r["kind"], r["status"], r["len"]) for r in rig.drv.pop(hw.OCOMPLQ_FIRST))
    assert got == [(1, hw.OC_SEND_DONE, hw.ST_SUCCESS, 100), (2, hw.OC_SEND_DONE, hw.ST_SUCCESS, 20)]


@pytest.mark.parametrize("what", ["short", "wrong ports", "bad data offset", "with SEND"])
def test_malformed_forward_refused_and_nothing_processed(rig, what):
    ctx = offload(rig)
    raw = seg_bytes(seq=RCV, ack=SND, payload=data(50))
    flags = hw.OSF_FORWARD
    if what == "short":
        raw = raw[:19]
    elif what == "wrong ports":
        raw = seg_bytes(seq=RCV, ack=SND, payload=data(50), ports=(RPORT + 1, LPORT))
    elif what == "bad data offset":
        raw = raw[:12] + bytes([0xF0]) + raw[13:]       # 60 bytes of header in 70: options junk
        raw = raw[:40]
    else:
        flags |= hw.OSF_SEND
    forward(rig, ctx, raw, tag=9, flags=flags)
    got = [(r["tag"], r["kind"], r["status"]) for r in rig.drv.pop(hw.OCOMPLQ_FIRST)]
    assert got == [(9, hw.OC_ERROR, hw.ST_INVALID_REQUEST)]
    _, recs = rig.drv.query([ctx])
    assert recs[0].state.delegated.rcv_nxt == RCV                     # nothing taken
    assert rig.nic.toe.forwarded == 0


def test_forward_for_a_stale_context_is_refused(rig):
    ctx = offload(rig)
    rig.drv.terminate([ctx])
    forward(rig, ctx, seg_bytes(seq=RCV, ack=SND), tag=3)
    got = [(r["tag"], r["status"]) for r in rig.drv.pop(hw.OCOMPLQ_FIRST)]
    assert got == [(3, hw.ST_UPLOAD_IN_PROGRESS)]
