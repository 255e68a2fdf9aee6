"""The TCP engine, segment by segment (in the style of smoltcp's socket tests): put a
connection in a state, feed one segment, check the exact segments it emits and its new
state. Section references are to RFC 9293 unless another RFC is named."""
from __future__ import annotations

import pytest

from chimney.tcp.engine import Connection
from chimney.tcp.segment import ACK, FIN, PSH, RST, SYN
from chimney.tcp.state import TcpCached, TcpState as S
from test_tcp_helpers import (BUF, LOCAL, LOCAL_ISS, MSS, REMOTE, REMOTE_ISS, config,
                              established, feed, ours, peer)

L1, R1 = LOCAL_ISS + 1, REMOTE_ISS + 1


# ------------------------------------------------------------------------- CLOSED ----
def test_closed_answers_ack_with_rst():
    c = Connection.client(LOCAL, REMOTE, config())
    assert feed(c, peer(seq=5, ack=77, flags=ACK)) == [ours(seq=77, ack=0, flags=RST,
                                                            window=0)]
    assert c.state is S.CLOSED


def test_closed_answers_syn_with_rst_ack():
    c = Connection.client(LOCAL, REMOTE, config())
    assert feed(c, peer(seq=5, ack=0, flags=SYN, payload=b"ab")) == [
        ours(seq=0, ack=5 + 3, flags=RST | ACK, window=0)]


def test_closed_ignores_rst():
    c = Connection.client(LOCAL, REMOTE, config())
    assert feed(c, peer(flags=RST)) == []


# ------------------------------------------------------------------------- LISTEN ----
def test_listen_syn_to_syn_received():
    c = Connection.listener(LOCAL, config())
    out = feed(c, peer(seq=REMOTE_ISS, ack=0, flags=SYN, window=3000, mss=MSS))
    assert out == [ours(seq=LOCAL_ISS, ack=R1, flags=SYN | ACK, mss=1460)]
    assert c.state is S.SYN_RECEIVED
    assert c.const.remote_port == REMOTE[1] and c.const.remote_mss == MSS
    assert c.d.snd_wnd == 3000


def test_listen_negotiates_options_offered_by_both():
    cfg = config(offer_timestamps=True, offer_sack=True, offer_window_scaling=True,
                 recv_buffer_size=1 << 20)
    c = Connection.listener(LOCAL, cfg)
    out = feed(c, peer(seq=REMOTE_ISS, ack=0, flags=SYN, mss=MSS, wscale=9,
                       sack_permitted=True, tsval=777, tsecr=0), now=1.5)
    assert out == [ours(seq=LOCAL_ISS, ack=R1, flags=SYN | ACK, window=0xFFFF, mss=1460,
                        wscale=5, sack_permitted=True, tsval=1500, tsecr=777)]
    k = c.const
    assert (k.window_scaling, k.snd_wscale, k.rcv_wscale, k.sack, k.timestamps) == \
        (True, 9, 5, True, True)


def test_listen_does_not_offer_what_the_peer_did_not():
    cfg = config(offer_timestamps=True, offer_sack=True, offer_window_scaling=True)
    c = Connection.listener(LOCAL, cfg)
    out = feed(c, peer(seq=REMOTE_ISS, ack=0, flags=SYN))
    assert out == [ours(seq=LOCAL_ISS, ack=R1, flags=SYN | ACK, mss=1460)]
    k = c.const
    assert not (k.window_scaling or k.sack or k.timestamps)
    assert k.remote_mss == 536                                   # §3.7.1 default


def test_listen_rejects_ack_and_ignores_rst():
    c = Connection.listener(LOCAL, config())
    assert feed(c, peer(seq=1, ack=999)) == [ours(seq=999, ack=0, flags=RST, window=0)]
    assert feed(c, peer(flags=RST)) == []
    assert feed(c, peer(flags=0)) == []
    assert c.state is S.LISTEN


# ----------------------------------------------------------------------- SYN-SENT ----
def syn_sent(**cfg) -> Connection:
    c = Connection.client(LOCAL, REMOTE, config(**cfg))
    c.connect(0.0)
    return c


def test_connect_sends_syn_with_options():
    c = Connection.client(LOCAL, REMOTE, config(offer_timestamps=True, offer_sack=True,
                                                offer_window_scaling=True))
    c.connect(2.0)
    assert c.take_segments() == [ours(seq=LOCAL_ISS, ack=0, flags=SYN, mss=1460,
                                      wscale=0, sack_permitted=True, tsval=2000, tsecr=0)]
    assert c.state is S.SYN_SENT and c.next_deadline() == 3.0


def test_syn_sent_syn_ack_to_established():
    c = syn_sent()
    c.take_segments()
    out = feed(c, peer(seq=REMOTE_ISS, ack=L1, flags=SYN | ACK, window=5000, mss=MSS),
               now=0.25)
    assert out == [ours()]
    assert c.state is S.ESTABLISHED and c.established
    assert (c.d.snd_una, c.d.rcv_nxt, c.d.snd_wnd) == (L1, R1, 5000)
    assert c.d.srtt == 250 * 8 and c.d.rttvar == 125 * 4          # RFC 6298 §2.2
    assert c.d.cwnd == 4 * MSS                                     # RFC 5681 §3.1 IW
    assert c.next_deadline() is None


def test_syn_sent_unacceptable_ack_gets_rst():
    c = syn_sent()
    c.take_segments()
    assert feed(c, peer(seq=REMOTE_ISS, ack=LOCAL_ISS + 5, flags=SYN | ACK)) == [
        ours(seq=LOCAL_ISS + 5, ack=0, flags=RST, window=0)]
    assert c.state is S.SYN_SENT


def test_syn_sent_rst_with_acceptable_ack_is_refused():
    c = syn_sent()
    c.take_segments()
    assert feed(c, peer(seq=0, ack=L1, flags=RST | ACK)) == []
    assert c.state is S.CLOSED and c.reset and c.error == "connection refused"


def test_syn_sent_rst_without_ack_is_ignored():
    c = syn_sent()
    c.take_segments()
    assert feed(c, peer(seq=0, ack=0, flags=RST)) == []
    assert c.state is S.SYN_SENT


def test_simultaneous_open():
    c = syn_sent()
    c.take_segments()
    out = feed(c, peer(seq=REMOTE_ISS, ack=0, flags=SYN, mss=MSS))
    assert out == [ours(seq=LOCAL_ISS, ack=R1, flags=SYN | ACK, mss=1460)]
    assert c.state is S.SYN_RECEIVED
    assert feed(c, peer()) == []
    assert c.state is S.ESTABLISHED


def test_syn_retransmitted_with_backoff():
    c = syn_sent()
    c.take_segments()
    times = []
    for _ in range(4):
        t = c.next_deadline()
        times.append(t)
        c.poll(t)
        assert c.take_segments() == [ours(seq=LOCAL_ISS, ack=0, flags=SYN, mss=1460)]
    assert times == [1.0, 3.0, 7.0, 15.0]                         # RFC 6298 §5.5


def test_syn_gives_up_after_max_retransmits():
    c = syn_sent(max_retransmits=2)
    c.take_segments()
    for _ in range(3):
        c.poll(c.next_deadline())
    assert c.state is S.CLOSED and c.error == "timeout"


# ------------------------------------------------------------------- SYN-RECEIVED ----
def syn_received() -> Connection:
    c = Connection.listener(LOCAL, config())
    feed(c, peer(seq=REMOTE_ISS, ack=0, flags=SYN, mss=MSS))
    return c


def test_syn_received_ack_to_established():
    c = syn_received()
    assert feed(c, peer(window=7000)) == []
    assert c.state is S.ESTABLISHED and c.d.snd_wnd == 7000


def test_syn_received_ack_with_data():
    c = syn_received()
    assert feed(c, peer(payload=b"hi", flags=ACK | PSH)) == []   # delayed ACK
    assert c.recv(10, 0.0) == b"hi"


def test_syn_received_bad_ack_gets_rst():
    c = syn_received()
    assert feed(c, peer(ack=LOCAL_ISS + 7)) == [ours(seq=LOCAL_ISS + 7, ack=0, flags=RST,
                                                     window=0)]
    assert c.state is S.SYN_RECEIVED


def test_syn_received_rst_returns_to_listen():
    c = syn_received()
    assert feed(c, peer(flags=RST)) == []
    assert c.state is S.LISTEN and not c.reset


def test_syn_received_retransmits_syn_ack():
    c = syn_received()
    c.poll(1.0)
    assert c.take_segments() == [ours(seq=LOCAL_ISS, ack=R1, flags=SYN | ACK, mss=1460)]


def test_syn_received_close_sends_fin_after_handshake():
    c = syn_received()
    c.close(0.0)
    assert c.take_segments() == []
    assert feed(c, peer()) == [ours(flags=FIN | ACK)]
    assert c.state is S.FIN_WAIT_1


# -------------------------------------------------------------------- ESTABLISHED ----
def test_data_in_order_is_acked_delayed():
    c = established()
    assert feed(c, peer(payload=b"x" * 100)) == []
    assert c.next_deadline() == pytest.approx(0.2)              # RFC 1122 §4.2.3.2
    c.poll(0.2)
    assert c.take_segments() == [ours(ack=R1 + 100, window=BUF - 100)]
    assert c.recv(1000, 0.2) == b"x" * 100


def test_every_second_full_segment_is_acked_at_once():
    c = established()
    assert feed(c, peer(payload=b"a" * 1460)) == []
    assert feed(c, peer(seq=R1 + 1460, payload=b"b" * 1460)) == [
        ours(ack=R1 + 2920, window=BUF - 2920)]


def test_out_of_order_is_queued_and_dup_acked():
    c = established()
    assert feed(c, peer(seq=R1 + 100, payload=b"b" * 100)) == [ours()]
    assert c.recv(1000, 0.0) == b""
    assert feed(c, peer(seq=R1, payload=b"a" * 100)) == [ours(ack=R1 + 200, window=BUF - 200)]
    assert c.recv(1000, 0.0) == b"a" * 100 + b"b" * 100


def test_out_of_order_sack_blocks():
    c = established(const=dict(sack=True))
    assert feed(c, peer(seq=R1 + 100, payload=b"b" * 100)) == [
        ours(sack_blocks=[(R1 + 100, R1 + 200)])]


def test_out_of_window_data_acked_and_dropped():
    c = established()
    assert feed(c, peer(seq=R1 + BUF, payload=b"z")) == [ours()]
    assert feed(c, peer(seq=R1 - 10, payload=b"z" * 10)) == [ours()]   # old duplicate
    assert c.recv(100, 0.0) == b""


def test_data_beyond_window_is_trimmed():
    c = established()
    feed(c, peer(payload=b"q" * (BUF + 50)))
    assert c.d.rcv_nxt == R1 + BUF and c.d.rcv_wnd == 0
    c.poll(1)
    assert c.take_segments() == [ours(ack=R1 + BUF, window=0)]


def test_overlapping_retransmission_delivers_only_new_bytes():
    c = established()
    feed(c, peer(payload=b"abc"))
    feed(c, peer(payload=b"abcdef"))
    assert c.recv(100, 0.0) == b"abcdef"


def test_send_within_window_and_psh_at_end():
    c = established(snd_wnd=2500, max_snd_wnd=2500)
    assert c.send(b"d" * 4000, 0.0) == 4000
    assert c.take_segments() == [ours(payload=b"d" * 1000),
                                 ours(seq=L1 + 1000, payload=b"d" * 1000)]
    # 500 usable bytes: less than half the peer's largest window, so SWS avoidance waits
    assert c.d.snd_nxt == L1 + 2000
    assert feed(c, peer(ack=L1 + 2000, window=1500)) == [
        ours(seq=L1 + 2000, payload=b"d" * 1000)]
    assert c.d.snd_nxt == L1 + 3000
    # a window that covers the rest lets the last (PSH) segment go
    assert feed(c, peer(ack=L1 + 3000, window=1000)) == [
        ours(seq=L1 + 3000, flags=ACK | PSH, payload=b"d" * 1000)]


def test_send_rest_and_psh_on_last_segment():
    c = established()
    c.send(b"e" * 1500, 0.0)
    assert c.take_segments() == [ours(payload=b"e" * 1000),
                                 ours(seq=L1 + 1000, flags=ACK | PSH, payload=b"e" * 500)]


def test_scaled_peer_window():
    c = established(const=dict(window_scaling=True, snd_wscale=4))
    feed(c, peer(window=100))
    assert c.d.snd_wnd == 1600
    c.send(b"s" * 3000, 0.0)
    assert [len(s.payload) for s in c.take_segments()] == [1000]  # SWS: 600 held back
    out = feed(c, peer(ack=L1 + 1000, window=200))                # 3200 bytes
    assert [len(s.payload) for s in out] == [1000, 1000]


def test_our_window_is_scaled():
    c = established(const=dict(window_scaling=True, rcv_wscale=2))
    feed(c, peer(payload=b"x" * 10, flags=ACK | PSH))
    c.poll(1)
    assert c.take_segments() == [ours(ack=R1 + 10, window=(BUF - 10) >> 2)]


def test_bounded_send_buffer():
    c = established(snd_wnd=0, max_snd_wnd=0, cfg=config(send_buffer_size=3000))
    assert c.send(b"x" * 5000, 0.0) == 3000
    assert c.send(b"y", 0.0) == 0 and not c.writable


def test_nagle_holds_small_segments_while_data_is_in_flight():
    c = established(cached=TcpCached(nagle=True))
    c.send(b"a", 0.0)
    assert c.take_segments() == [ours(flags=ACK | PSH, payload=b"a")]
    c.send(b"b", 0.0)
    assert c.take_segments() == []
    assert feed(c, peer(ack=L1 + 1)) == [ours(seq=L1 + 1, flags=ACK | PSH, payload=b"b")]


def test_window_update_rules():
    """§3.10.7.4: update SND.WND only from a segment newer than SND.WL1 (or equal)."""
    c = established(snd_wl1=R1 + 100, rcv_nxt=R1 + 100)
    feed(c, peer(seq=R1 + 50, window=1))          # older than SND.WL1: ignored
    assert c.d.snd_wnd == 10_000
    feed(c, peer(seq=R1 + 100, window=2000))      # same SND.WL1: taken
    assert (c.d.snd_wnd, c.d.snd_wl1) == (2000, R1 + 100)
    assert c.d.max_snd_wnd == 10_000


def test_ack_of_unsent_data_is_acked_and_dropped():
    c = established()
    assert feed(c, peer(ack=L1 + 5, payload=b"zz")) == [ours()]   # RFC 5961 §5.2
    assert c.recv(10, 0.0) == b""


def test_very_old_ack_is_dropped_with_an_ack():
    c = established(snd_una=L1 + 20_000, snd_nxt=L1 + 20_000, snd_max=L1 + 20_000,
                    max_snd_wnd=10_000)
    assert feed(c, peer(ack=L1, payload=b"zz")) == [ours(seq=L1 + 20_000)]
    assert c.recv(10, 0.0) == b""


# -------------------------------------------------------------- RST / SYN (RFC 5961) ----
def test_exact_rst_resets():
    c = established()
    assert feed(c, peer(flags=RST)) == []
    assert c.state is S.CLOSED and c.reset and c.error == "connection reset"


def test_in_window_rst_gets_challenge_ack():
    c = established()
    assert feed(c, peer(seq=R1 + 10, flags=RST)) == [ours()]     # RFC 5961 §3.2
    assert c.state is S.ESTABLISHED


def test_out_of_window_rst_is_dropped_silently():
    c = established()
    assert feed(c, peer(seq=R1 + BUF + 10, flags=RST)) == []
    assert feed(c, peer(seq=R1 - 10, flags=RST)) == []
    assert c.state is S.ESTABLISHED


def test_syn_in_established_gets_challenge_ack():
    c = established()
    assert feed(c, peer(seq=R1, flags=SYN)) == [ours()]          # RFC 5961 §4.2
    assert feed(c, peer(seq=123, ack=0, flags=SYN)) == [ours()]
    assert c.state is S.ESTABLISHED


def test_abort_sends_rst():
    c = established(snd_nxt=L1, send_buffer=b"")
    c.abort(0.0)
    assert c.take_segments() == [ours(ack=0, flags=RST, window=0)]
    assert c.state is S.CLOSED


# -------------------------------------------------------------- closing states ----
def test_active_close_fin_wait_1_2_time_wait():
    c = established()
    c.close(0.0)
    assert c.take_segments() == [ours(flags=FIN | ACK)]
    assert c.state is S.FIN_WAIT_1
    assert feed(c, peer(ack=L1 + 1)) == []
    assert c.state is S.FIN_WAIT_2
    assert feed(c, peer(ack=L1 + 1, flags=FIN | ACK), now=5) == [ours(seq=L1 + 1, ack=R1 + 1)]
    assert c.state is S.TIME_WAIT and c.eof
    assert c.next_deadline() == 5 + 60                             # 2 MSL, §3.4.2
    c.poll(64.9)
    assert c.state is S.TIME_WAIT
    c.poll(65)
    assert c.state is S.CLOSED and c.error is None


def test_fin_after_data_is_sent_after_the_data():
    c = established()
    c.send(b"abc", 0.0)
    c.close(0.0)
    assert c.take_segments() == [ours(flags=ACK | PSH, payload=b"abc"),
                                 ours(seq=L1 + 3, flags=FIN | ACK)]
    assert c.d.snd_nxt == L1 + 4
    with pytest.raises(ConnectionError):
        c.send(b"more", 0.0)


def test_fin_wait_1_fin_and_ack_to_time_wait():
    c = established()
    c.close(0.0)
    c.take_segments()
    assert feed(c, peer(ack=L1 + 1, flags=FIN | ACK)) == [ours(seq=L1 + 1, ack=R1 + 1)]
    assert c.state is S.TIME_WAIT


def test_simultaneous_close_through_closing():
    c = established()
    c.close(0.0)
    c.take_segments()
    assert feed(c, peer(ack=L1, flags=FIN | ACK)) == [ours(seq=L1 + 1, ack=R1 + 1)]
    assert c.state is S.CLOSING
    assert feed(c, peer(seq=R1 + 1, ack=L1 + 1)) == []
    assert c.state is S.TIME_WAIT


def test_fin_retransmitted_in_fin_wait_1():
    c = established()
    c.close(0.0)
    c.take_segments()
    c.poll(1.0)
    assert c.take_segments() == [ours(flags=FIN | ACK)]


def test_half_close_fin_wait_2_still_receives():
    c = established(state=S.FIN_WAIT_2, snd_una=L1 + 1, snd_nxt=L1 + 1, snd_max=L1 + 1,
                    fin_queued=True)
    feed(c, peer(ack=L1 + 1, payload=b"late data"))
    assert c.recv(100, 0.0) == b"late data"
    assert c.state is S.FIN_WAIT_2


def test_passive_close_close_wait_last_ack():
    c = established()
    assert feed(c, peer(flags=FIN | ACK, payload=b"bye")) == [
        ours(ack=R1 + 4, window=BUF - 3)]
    assert c.state is S.CLOSE_WAIT and c.readable and not c.eof
    assert c.recv(10, 0.0) == b"bye" and c.eof
    # half-close: we can still send in CLOSE-WAIT
    c.send(b"reply", 0.0)
    assert c.take_segments() == [ours(ack=R1 + 4, flags=ACK | PSH, payload=b"reply")]
    c.close(0.0)
    assert c.take_segments() == [ours(seq=L1 + 5, ack=R1 + 4, flags=FIN | ACK)]
    assert c.state is S.LAST_ACK
    assert feed(c, peer(seq=R1 + 4, ack=L1 + 6)) == []
    assert c.state is S.CLOSED and not c.reset


def test_last_ack_retransmits_fin():
    c = established()
    feed(c, peer(flags=FIN | ACK))
    c.close(0.0)
    c.take_segments()
    c.poll(1.0)
    assert c.take_segments() == [ours(ack=R1 + 1, flags=FIN | ACK)]


def test_close_wait_acks_retransmitted_fin():
    c = established()
    feed(c, peer(flags=FIN | ACK))
    assert feed(c, peer(flags=FIN | ACK)) == [ours(ack=R1 + 1)]
    assert c.state is S.CLOSE_WAIT


def test_time_wait_acks_retransmitted_fin_and_restarts_timer():
    c = established()
    c.close(0.0)
    c.take_segments()
    feed(c, peer(ack=L1 + 1, flags=FIN | ACK))
    assert feed(c, peer(ack=L1 + 1, flags=FIN | ACK), now=30) == [
        ours(seq=L1 + 1, ack=R1 + 1)]
    assert c.next_deadline() == 90


def test_rst_in_time_wait_closes():
    c = established()
    c.close(0.0)
    c.take_segments()
    feed(c, peer(ack=L1 + 1, flags=FIN | ACK))
    feed(c, peer(seq=R1 + 1, flags=RST))
    assert c.state is S.CLOSED and c.error is None


def test_close_in_listen_and_syn_sent():
    c = Connection.listener(LOCAL, config())
    c.close(0.0)
    assert c.state is S.CLOSED
    c = syn_sent()
    c.take_segments()
    c.close(0.0)
    assert c.state is S.CLOSED and c.take_segments() == []


# ------------------------------------------------------------- more edge cases ----
def test_syn_sent_learns_options_from_syn_ack():
    c = Connection.client(LOCAL, REMOTE, config(offer_timestamps=True, offer_sack=True,
                                                offer_window_scaling=True,
                                                recv_buffer_size=1 << 18))
    c.connect(0.0)
    [syn] = c.take_segments()
    assert syn.window == 0xFFFF and syn.wscale == 3           # unscaled in a SYN
    out = feed(c, peer(seq=REMOTE_ISS, ack=L1, flags=SYN | ACK, window=1000, mss=MSS,
                       wscale=3, sack_permitted=True, tsval=42, tsecr=0), now=0.1)
    assert out == [ours(window=(1 << 18) >> 3, tsval=100, tsecr=42)]
    k = c.const
    assert (k.snd_wscale, k.rcv_wscale, k.sack, k.timestamps) == (3, 3, True, True)
    assert c.d.snd_wnd == 1000                                # SYN window: not scaled
    feed(c, peer(window=1000, tsval=43, tsecr=100))
    assert c.d.snd_wnd == 8000                                # later ones are


def test_syn_ack_without_options_disables_them():
    c = Connection.client(LOCAL, REMOTE, config(offer_timestamps=True, offer_sack=True,
                                                offer_window_scaling=True))
    c.connect(0.0)
    c.take_segments()
    feed(c, peer(seq=REMOTE_ISS, ack=L1, flags=SYN | ACK))
    k = c.const
    assert not (k.timestamps or k.sack or k.window_scaling) and k.rcv_wscale == 0


def test_ipv6_default_mss():
    c = Connection.listener(("2001:db8::1", 80), config())
    c.on_segment(peer(seq=REMOTE_ISS, ack=0, flags=SYN), 0.0, remote_ip="2001:db8::2")
    assert c.const.remote_mss == 1220 and c.const.remote_ip == "2001:db8::2"


def test_pure_ack_after_go_back_n_uses_snd_max():
    """After an RTO pulls SND.NXT back, a pure ACK must still be acceptable to a peer
    that already holds everything up to SND.MAX."""
    c = established()
    c.send(b"g" * 3000, 0.0)
    c.take_segments()
    c.poll(1.0)
    c.take_segments()
    assert c.d.snd_nxt == L1 + 1000
    assert feed(c, peer(seq=R1 + 100, flags=RST), now=1.1) == [ours(seq=L1 + 3000)]


def test_out_of_order_fin_is_kept_until_the_gap_fills():
    c = established()
    assert feed(c, peer(seq=R1 + 3, flags=FIN | ACK, payload=b"def")) == [ours()]
    assert c.state is S.ESTABLISHED
    assert feed(c, peer(payload=b"abc")) == [ours(ack=R1 + 7, window=BUF - 6)]
    assert c.state is S.CLOSE_WAIT and c.recv(10, 0.0) == b"abcdef" and c.eof


def test_reassembly_queue_is_bounded():
    """The bound counts blocks (pieces that touch merge into one): with gaps between
    them, only the first two are kept."""
    c = established(cfg=config(max_ooo_segments=2))
    for i in range(1, 5):
        feed(c, peer(seq=R1 + 20 * i, payload=bytes([i]) * 10))
    feed(c, peer(payload=b"\0" * 20))
    assert c.d.rcv_nxt == R1 + 30                             # only 2 were kept
    feed(c, peer(seq=R1 + 30, payload=b"\7" * 10))
    assert c.d.rcv_nxt == R1 + 50
    assert c.recv(100, 0.0) == b"\0" * 20 + b"\1" * 10 + b"\7" * 10 + b"\2" * 10


def test_sequence_numbers_wrap():
    top = (1 << 32) - 500
    c = established(snd_una=top, snd_nxt=top, snd_max=top, rcv_nxt=(1 << 32) - 10,
                    snd_wl1=(1 << 32) - 10)
    c.send(b"w" * 1000, 0.0)
    assert [(s.seq, len(s.payload)) for s in c.take_segments()] == [(top, 1000)]
    feed(c, peer(seq=(1 << 32) - 10, ack=top + 1000, payload=b"v" * 30))
    assert c.d.snd_una == 500 and c.d.rcv_nxt == 20
    assert c.recv(100, 0.0) == b"v" * 30 and c.next_deadline() == pytest.approx(0.2)


def test_delayed_ack_is_cancelled_by_outgoing_data():
    c = established()
    feed(c, peer(payload=b"req"))
    c.send(b"resp", 0.0)
    assert c.take_segments() == [ours(ack=R1 + 3, window=BUF - 3, flags=ACK | PSH,
                                      payload=b"resp")]
    c.recv(3, 0.0)
    assert c.next_deadline() == 1.0                           # only the RTO is left


def test_event_flags():
    c = established()
    assert c.established and c.writable and not c.readable and not c.closed
    feed(c, peer(payload=b"x"))
    assert c.readable and not c.eof
    c.abort(0.0)
    assert c.closed and c.error == "aborted" and not c.writable


CLOSING_STATES = {
    # state: delegated overrides putting the connection there (our FIN, if any, at L1)
    S.ESTABLISHED: {},
    S.FIN_WAIT_1: dict(fin_queued=True, snd_nxt=L1 + 1, snd_max=L1 + 1),
    S.FIN_WAIT_2: dict(fin_queued=True, snd_una=L1 + 1, snd_nxt=L1 + 1, snd_max=L1 + 1),
    S.CLOSE_WAIT: dict(rcv_nxt=R1 + 1),
    S.CLOSING: dict(fin_queued=True, snd_nxt=L1 + 1, snd_max=L1 + 1, rcv_nxt=R1 + 1),
    S.LAST_ACK: dict(fin_queued=True, snd_nxt=L1 + 1, snd_max=L1 + 1, rcv_nxt=R1 + 1),
}


@pytest.mark.parametrize("state", list(CLOSING_STATES), ids=str)
def test_exact_rst_in_every_synchronized_state(state):
    o = CLOSING_STATES[state]
    c = established(state=state, **o)
    assert feed(c, peer(seq=o.get("rcv_nxt", R1), flags=RST)) == []
    assert c.state is S.CLOSED and c.reset
    # RFC 9293 §3.10.7.4: in CLOSING and LAST-ACK a reset is no error, just the end
    assert (c.error is None) == (state in (S.CLOSING, S.LAST_ACK))


@pytest.mark.parametrize("state", list(CLOSING_STATES), ids=str)
def test_syn_gets_challenge_ack_in_every_synchronized_state(state):
    o = CLOSING_STATES[state]
    c = established(state=state, **o)
    out = feed(c, peer(seq=o.get("rcv_nxt", R1), ack=0, flags=SYN))
    assert out == [ours(seq=o.get("snd_max", L1), ack=o.get("rcv_nxt", R1))]
    assert c.state is state


def test_syn_received_answers_a_repeated_syn_with_syn_ack():
    c = syn_received()
    assert feed(c, peer(seq=REMOTE_ISS, ack=0, flags=SYN, mss=MSS)) == [
        ours(seq=LOCAL_ISS, ack=R1, flags=SYN | ACK, mss=1460)]
    assert c.state is S.SYN_RECEIVED


def test_out_of_order_data_is_trimmed_to_the_window():
    c = established()
    feed(c, peer(seq=R1 + BUF - 10, flags=FIN | ACK, payload=b"t" * 20))
    feed(c, peer(payload=b"h" * (BUF - 10)))
    assert c.d.rcv_nxt == R1 + BUF and c.state is S.ESTABLISHED   # FIN was cut off
    assert c.recv(BUF, 0.0) == b"h" * (BUF - 10) + b"t" * 10


def test_fin_wait_2_timer():
    c = established(cfg=config(fin_wait_2_timeout=10.0))
    c.close(0.0)
    c.take_segments()
    feed(c, peer(ack=L1 + 1), now=1.0)
    assert c.state is S.FIN_WAIT_2 and c.next_deadline() == 11.0
    n = Connection.from_state(*c.export(2.0), 2.0, config(fin_wait_2_timeout=10.0))
    n.poll(11.0)
    assert n.state is S.CLOSED and n.error == "FIN-WAIT-2 timeout"


def test_urgent_data_is_flagged_and_delivered_inline():
    from chimney.tcp.segment import URG
    c = established()
    feed(c, peer(flags=ACK | URG, urgent=1, payload=b"!"))
    assert c.urgent_received and c.recv(5, 0.0) == b"!"
