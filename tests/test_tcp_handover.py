"""Export / rebuild of a connection from its (const, cached, delegated) state: timers
travel as tick deltas (-1 = not running), buffers travel with the state."""
from __future__ import annotations

from chimney.tcp import Connection, TcpCached, TcpState as S
from chimney.tcp.segment import ACK, PSH
from test_tcp_helpers import LOCAL_ISS, REMOTE_ISS, config, established, feed, ours, peer

L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1


def test_idle_connection_exports_no_timers():
    c = established()
    const, cached, d = c.export(5.0)
    assert (d.retransmit_delta, d.ka_timeout_delta) == (-1, -1)
    assert d.state is S.ESTABLISHED and d.send_buffer == b"" and d.recv_buffer == b""


def test_retransmit_timer_and_buffers_travel_as_deltas():
    c = established()
    c.send(b"abcdef", 0.0)
    c.take_segments()
    feed(c, peer(ack=L1 + 2, payload=b"xyz"), now=0.3)       # delayed ACK pending
    const, cached, d = c.export(0.5)
    assert c.take_segments() == [ours(seq=L1 + 6, ack=R1 + 3, window=4093)]  # ACK first
    assert d.retransmit_delta == 800                           # restarted at 0.3 + 1 s
    assert d.send_buffer == b"cdef" and d.snd_una == L1 + 2 and d.snd_nxt == L1 + 6
    assert d.recv_buffer == b"xyz" and d.rcv_nxt == R1 + 3
    # rebuilt at another time base: the timer fires 800 ticks later, the data follows
    n = Connection.from_state(const, cached, d, 100.0, config())
    assert n.next_deadline() == 100.8
    assert n.recv(10, 100.0) == b"xyz"
    n.poll(100.8)
    assert n.take_segments() == [ours(seq=L1 + 2, ack=R1 + 3, flags=ACK | PSH,
                                      payload=b"cdef")]


def test_persist_timer_comes_back_as_persist():
    c = established(snd_wnd=0)
    c.send(b"p", 0.0)
    const, cached, d = c.export(0.25)
    assert d.retransmit_delta == 750
    n = Connection.from_state(const, cached, d, 0.0, config())
    n.poll(0.75)
    assert n.take_segments() == [ours(payload=b"p")] and n.d.window_probe_count == 1


def test_keepalive_timer_and_timestamps_travel():
    cached = TcpCached(nagle=False, keepalive=True, ka_timeout=60_000)
    c = established(cached=cached, ka_timeout_delta=60_000, const=dict(timestamps=True),
                    ts_recent=99, ts_time=5000)
    const, cached, d = c.export(10.0)
    assert d.ka_timeout_delta == 50_000
    assert d.ts_time == 15_000 and d.ts_recent_age == 10_000
    n = Connection.from_state(const, cached, d, 1000.0, config())
    n.send(b"t", 1000.0)
    assert n.take_segments() == [ours(flags=ACK | PSH, payload=b"t", tsval=15_000,
                                      tsecr=99)]
    assert n.next_deadline() == 1001.0                         # the RTO, then keep-alive
    assert n._ka_deadline == 1050.0


def test_closing_states_round_trip():
    c = established()
    c.close(0.0)
    c.take_segments()
    feed(c, peer(ack=L1 + 1))
    assert c.state is S.FIN_WAIT_2
    n = Connection.from_state(*c.export(1.0), 1.0, config())
    assert feed(n, peer(ack=L1 + 1, flags=ACK | 0x01), now=2.0) == [
        ours(seq=L1 + 1, ack=R1 + 1)]
    assert n.state is S.TIME_WAIT
    t = Connection.from_state(*n.export(3.0), 3.0, config())
    assert t.next_deadline() == 62.0                           # 2 MSL from 2.0
