"""The byte form of offload state (chimney.staterec.codec): round trips for
every object type and both address families, and malformed buffers rejected
with CodecError (the device parses these from guest memory)."""
import pytest

from chimney import hw
from chimney.staterec.codec import (NONE32, CodecError, Neighbor, ObjEntry, Path, Tcp,
                                    decode_contexts, decode_records, decode_statuses,
                                    encode_contexts, encode_records, encode_statuses)
from chimney.tcp.state import TcpCached, TcpConst, TcpDelegated, TcpState


def tree(v6=False, send=b"unacked+unsent", recv=b"buffered"):
    src, dst = ("fd00::1", "fd00::2") if v6 else ("10.0.0.1", "10.0.0.2")
    d = TcpDelegated(state=TcpState.ESTABLISHED, rcv_nxt=0xFFFFFFF0, rcv_wnd=65535, snd_una=7,
                     snd_nxt=20, snd_max=21, cwnd=14600, ssthresh=0xFFFFFFFF, srtt=80, rttvar=40,
                     retransmit_delta=-1, ka_timeout_delta=123, fin_queued=True,
                     send_buffer=send, recv_buffer=recv)
    t = Tcp(TcpConst(src, 40000, dst, 5201, timestamps=True, sack=True, window_scaling=True,
                     snd_wscale=7, rcv_wscale=9, remote_mss=1460, rss_hash=0xDEADBEEF),
            TcpCached(keepalive=True, nagle=False, ttl=33), d)
    return [ObjEntry(hw.OBJ_NEIGHBOR, 11, state=Neighbor(b"\x02" * 6, b"\x04\x05\x06\x07\x08\x09", 5)),
            ObjEntry(hw.OBJ_PATH, 12, 0, state=Path(src, dst, 1400)),
            ObjEntry(hw.OBJ_TCP, 13, 1, state=t)]


@pytest.mark.parametrize("v6", [False, True])
def test_tree_round_trip(v6):
    entries = tree(v6)
    buf = encode_records(entries)
    assert len(buf) % 8 == 0
    back = decode_records(buf)
    assert [(e.type, e.host_handle, e.parent) for e in back] == \
        [(e.type, e.host_handle, e.parent) for e in entries]
    assert back[0].state == entries[0].state and back[1].state == entries[1].state
    assert back[2].state == entries[2].state     # addresses come back from the path


def test_query_form_leaves_data_out_but_keeps_lengths():
    buf = encode_records(tree(), with_data=False)
    back = decode_records(buf, with_data=False)
    d = back[2].state.delegated
    assert len(d.send_buffer) == len(b"unacked+unsent") and len(d.recv_buffer) == len(b"buffered")
    assert back[2].extra["data_omitted"]
    assert len(buf) < len(encode_records(tree()))


def test_links_statuses_and_contexts():
    e = [ObjEntry(hw.OBJ_PATH, 5, NONE32, link=True, nic_ctx=9)]
    assert decode_records(encode_records(e))[0].nic_ctx == 9
    st = [ObjEntry(hw.OBJ_TCP, 1 << 60, status=hw.ST_FAILURE, nic_ctx=0)]
    assert decode_statuses(encode_statuses(st))[0].host_handle == 1 << 60
    assert decode_contexts(encode_contexts([1, 2, NONE32])) == [1, 2, NONE32]


def _mutate(buf, off, raw):
    b = bytearray(buf)
    b[off:off + len(raw)] = raw
    return bytes(b)


def test_malformed_buffers_raise_codec_error():
    good = encode_records(tree())
    rec0 = hw.ObjRecord.size + hw.NeighState.size
    bad = {
        "truncated header": good[:10],
        "truncated state": good[:hw.ObjRecord.size + 4],
        "unknown type": _mutate(good, 0, b"\x09"),
        "link flag 2": _mutate(good, 1, b"\x02"),
        "neighbour with a parent": _mutate(good, 4, b"\x00\x00\x00\x00"),
        "path whose parent is itself": _mutate(good, rec0 + 4, b"\x01\x00\x00\x00"),
        "state_len wrong": _mutate(good, 20, b"\x10\x00\x00\x00"),
        "data on a neighbour": _mutate(good, 24, b"\x08\x00\x00\x00"),
        "huge data_len": _mutate(good, 24, b"\xff\xff\xff\x7f"),
    }
    for what, buf in bad.items():
        with pytest.raises(CodecError):
            decode_records(buf)
            pytest.fail(what)
    with pytest.raises(CodecError):
        decode_contexts(b"\x01\x02\x03")
    with pytest.raises(CodecError):
        decode_statuses(b"\x00" * 15)


def test_fuzzed_buffers_never_raise_anything_but_codec_error():
    import random
    rnd = random.Random(7)
    good = encode_records(tree())
    for _ in range(3000):
        b = bytearray(good)
        for _ in range(rnd.randint(1, 6)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        try:
            decode_records(bytes(b[:rnd.randint(0, len(b))]))
        except CodecError:
            pass
