"""Sender silly-window-syndrome avoidance and its override timeout (RFC 9293
§3.8.6.2.1): a window-limited runt waits for the window to reach half the largest
window the peer offered -- but not forever: when the override timer expires, the
usable window is sent."""
from __future__ import annotations

from chimney.tcp import Connection
from chimney.tcp.segment import ACK, PSH
from test_tcp_helpers import LOCAL_ISS, REMOTE_ISS, config, established, feed, ours, peer

L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1
DATA = bytes(range(256)) * 12                     # 3072 bytes


def small_window() -> Connection:
    """The peer once offered 10,000 bytes; now it offers 500 (< MSS, < 10,000 / 2)."""
    c = established()
    feed(c, peer(window=500))
    assert (c.d.snd_wnd, c.d.max_snd_wnd) == (500, 10_000)
    return c


def test_peer_offering_a_small_window_forever_still_gets_the_data():
    c = small_window()
    c.send(DATA, 0.0)
    assert c.take_segments() == []                # held: a runt below half the max window
    got, now = bytearray(), 0.0
    for _ in range(50):
        dl = c.next_deadline()
        assert dl is not None and 0.1 <= dl - now <= 1.0      # the override timeout
        now = dl
        c.poll(now)
        out = c.take_segments()
        while out:                                # the peer ACKs at once, window 500
            seg = out.pop(0)
            assert 0 < len(seg.payload) <= 500
            assert seg.seq == (L1 + len(got)) % (1 << 32)
            got += seg.payload
            out += feed(c, peer(ack=L1 + len(got), window=500), now=now)
        if len(got) == len(DATA):
            break
    assert bytes(got) == DATA and c.next_deadline() is None


def test_override_sends_the_usable_window_once():
    c = small_window()
    c.send(DATA, 0.0)
    c.poll(c.next_deadline())
    assert c.take_segments() == [ours(payload=DATA[:500])]
    assert c._rtx_deadline is not None and c._persist_deadline is None
    c.poll(c._rtx_deadline - 0.001)
    assert c.take_segments() == []                # nothing more while it is in flight


def test_a_window_that_opens_cancels_the_override_and_sends_at_once():
    c = small_window()
    c.send(DATA, 0.0)
    assert c._persist_deadline is not None
    out = feed(c, peer(window=8000), now=0.05)
    assert [len(s.payload) for s in out] == [1000, 1000, 1000, 72]
    assert out[-1].flags == ACK | PSH
    assert c._persist_deadline is None


def test_override_timer_travels_at_handover():
    c = small_window()
    c.send(DATA, 0.0)
    const, cached, d = c.export(0.05)
    assert d.retransmit_delta == 150              # the override timer (0.2 s) in the one slot
    n = Connection.from_state(const, cached, d, 10.0, config())
    assert n.next_deadline() == 10.15
    n.poll(10.15)
    assert n.take_segments() == [ours(payload=DATA[:500])]


def test_zero_window_still_probes_on_the_rto_schedule():
    c = established(snd_wnd=0)
    c.send(b"p" * 10, 0.0)
    assert c.next_deadline() == 1.0               # persist: RTO, not the override timeout
    c.poll(1.0)
    assert c.take_segments() == [ours(payload=b"p")]


def test_no_persist_timer_left_once_the_probe_byte_was_the_last():
    """The probe byte acknowledged and nothing left to send: no timer is left to
    travel at handover (a stale one would come back as a retransmission timer)."""
    c = established(snd_wnd=0)
    c.send(b"p", 0.0)
    c.poll(1.0)
    assert c.take_segments() == [ours(payload=b"p")]
    feed(c, peer(ack=L1 + 1, window=0), now=1.1)
    assert c.next_deadline() is None
    const, cached, d = c.export(1.5)
    assert d.retransmit_delta == -1
