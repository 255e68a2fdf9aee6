"""Two TCP engines back to back over a simulated network (seeded loss, duplication and
reordering, injected clock): bulk transfer both ways, and a connection exported and
rebuilt from (const, cached, delegated) in the middle of a transfer."""
from __future__ import annotations

import heapq
import random

import pytest

from chimney.tcp.engine import Config, Connection
from chimney.tcp.segment import decode
from chimney.tcp.state import NOT_OFFLOADABLE, TcpState as S

A_ADDR = ("192.0.2.1", 40000)
B_ADDR = ("192.0.2.2", 5001)
MB = 1 << 20


class Net:
    """A lossy, reordering, duplicating link between connections `a` and `b`. Every
    segment crosses as bytes: encoded by the sender, decoded (and checked) by the
    receiver."""

    def __init__(self, seed: int, loss: float, dup: float, delay: float, jitter: float):
        self.rng = random.Random(seed)
        self.loss, self.dup, self.delay, self.jitter = loss, dup, delay, jitter
        self.now = 0.0
        self.queue: list[tuple[float, int, str, bytes]] = []
        self._n = 0
        isn = random.Random(seed + 1)
        cfg_a = Config(isn=lambda: isn.getrandbits(32), rto_min=0.2)
        cfg_b = Config(isn=lambda: isn.getrandbits(32), rto_min=0.2)
        self.a = Connection.client(A_ADDR, B_ADDR, cfg_a)
        self.b = Connection.listener(B_ADDR, cfg_b)
        self.sent = {"a": 0, "b": 0}
        self.dropped = 0

    def conn(self, name: str) -> Connection:
        return self.a if name == "a" else self.b

    def transmit(self) -> None:
        for name, dst, src_ip, dst_ip in (("a", "b", A_ADDR[0], B_ADDR[0]),
                                          ("b", "a", B_ADDR[0], A_ADDR[0])):
            for seg in self.conn(name).take_segments():
                raw = seg.encode(src_ip, dst_ip)
                self.sent[name] += 1
                copies = 0 if self.rng.random() < self.loss else (
                    2 if self.rng.random() < self.dup else 1)
                self.dropped += copies == 0
                for _ in range(copies):
                    t = self.now + self.delay + self.rng.random() * self.jitter
                    self._n += 1
                    heapq.heappush(self.queue, (t, self._n, dst, raw))

    def step(self) -> bool:
        """Advance to the next event; False when nothing is left to happen."""
        self.transmit()
        times = [t for t in (self.a.next_deadline(), self.b.next_deadline()) if t]
        if self.queue:
            times.append(self.queue[0][0])
        if not times:
            return False
        self.now = max(self.now, min(times))
        while self.queue and self.queue[0][0] <= self.now:
            _, _, dst, raw = heapq.heappop(self.queue)
            src_ip, dst_ip = (A_ADDR[0], B_ADDR[0]) if dst == "b" else (B_ADDR[0], A_ADDR[0])
            self.conn(dst).on_segment(decode(raw, src_ip, dst_ip), self.now, src_ip)
        self.a.poll(self.now)
        self.b.poll(self.now)
        self.transmit()
        return True


def run_transfer(net: Net, size: int, rebuild_at: int | None = None,
                 max_time: float = 600.0) -> tuple[bytes, bytes]:
    rng = random.Random(7)
    data_a = rng.randbytes(size)        # a -> b
    data_b = rng.randbytes(size)        # b -> a
    got_a, got_b = bytearray(), bytearray()
    sent_a = sent_b = 0
    net.a.connect(net.now)
    rebuilt = False
    while net.now < max_time:
        if net.a.established and sent_a < size and net.a.writable:
            sent_a += net.a.send(data_a[sent_a:sent_a + 50_000], net.now)
        if net.b.established and sent_b < size and net.b.writable:
            sent_b += net.b.send(data_b[sent_b:sent_b + 50_000], net.now)
        got_b += net.b.recv(30_000, net.now)
        got_a += net.a.recv(30_000, net.now)
        if rebuild_at is not None and not rebuilt and len(got_b) >= rebuild_at:
            # upload/offload: hand the state over, and carry on with a new engine
            assert net.a.state not in NOT_OFFLOADABLE
            const, cached, delegated = net.a.export(net.now)
            assert delegated.send_buffer == data_a[len(data_a[:sent_a]) - len(
                delegated.send_buffer):sent_a]
            net.transmit()      # the pending delayed ACK export sent
            net.a = Connection.from_state(const, cached, delegated, net.now, net.a.cfg)
            rebuilt = True
        if len(got_a) == size and len(got_b) == size:
            break
        if not net.step():
            break
    return bytes(got_a), bytes(got_b), data_a, data_b


def close_both(net: Net) -> None:
    net.a.close(net.now)
    net.b.close(net.now)
    while net.step() and net.now < 10_000:
        if net.a.state is S.CLOSED and net.b.state is S.CLOSED:
            break
    assert net.a.eof and net.b.eof


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_megabyte_each_way_over_a_lossy_reordering_link(seed):
    net = Net(seed, loss=0.02, dup=0.01, delay=0.01, jitter=0.004)
    got_a, got_b, data_a, data_b = run_transfer(net, MB)
    assert got_b == data_a and got_a == data_b
    assert net.dropped > 10                       # the link really was lossy
    # ~725 full segments of data each way, plus ACKs and retransmissions: no ACK war
    assert max(net.sent.values()) < 3000, net.sent
    assert net.a.const.timestamps and net.a.const.sack and net.a.const.window_scaling
    close_both(net)
    assert {net.a.state, net.b.state} == {S.CLOSED}
    assert net.a.error is None and net.b.error is None


def test_clean_link_throughput_is_window_limited_not_timer_limited():
    net = Net(3, loss=0.0, dup=0.0, delay=0.005, jitter=0.0)
    got_a, got_b, data_a, data_b = run_transfer(net, MB)
    assert got_b == data_a and got_a == data_b
    # 1 MB with a 256 KB window over a 10 ms RTT: well under a second of virtual time
    assert net.now < 1.0, net.now


@pytest.mark.parametrize("seed", [4, 5])
def test_export_and_rebuild_mid_transfer_continues_the_stream(seed):
    net = Net(seed, loss=0.02, dup=0.0, delay=0.01, jitter=0.004)
    got_a, got_b, data_a, data_b = run_transfer(net, MB, rebuild_at=300_000)
    assert got_b == data_a and got_a == data_b
    close_both(net)


def test_export_round_trip_is_exact():
    net = Net(6, loss=0.0, dup=0.0, delay=0.01, jitter=0.0)
    net.a.connect(0.0)
    while not (net.a.established and net.b.established):
        net.step()
    net.a.send(b"x" * 100_000, net.now)
    net.b.send(b"y" * 5000, net.now)
    for _ in range(3):
        net.step()
    state = net.a.export(net.now)
    again = Connection.from_state(*state, net.now, net.a.cfg).export(net.now)
    assert again == state
    assert state[2].retransmit_delta >= 0 and state[2].send_buffer
