"""HostStack.step acknowledges a burst of in-order data once (a stretch ACK,
as Linux's GRO makes) but lets every duplicate ACK out: two stacks on a fake
clock, the receiver fed through a stand-in miniport (no root)."""
import os

from chimney.guest.stack.host import HostStack
from chimney.guest.stack.iface import Interface
from chimney.tcp.segment import decode


class FakeMiniport:
    """Frames in through recv() (what step() takes), out through send_many."""

    def __init__(self):
        self.rx = []
        self.tx = []

    def recv(self, timeout=None):
        return self.rx.pop(0) if self.rx else None

    def send_many(self, frames):
        self.tx += frames


def tcp_of(frame: bytes, fam: str):
    if fam == "ipv4":
        ihl = (frame[14] & 0xF) * 4
        total = int.from_bytes(frame[16:18], "big")
        src, dst = frame[26:30], frame[30:34]
        import ipaddress
        return decode(frame[14 + ihl:14 + total], str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)))
    raise AssertionError(fam)


def setup():
    t = [1000.0]
    clock = lambda: t[0]        # noqa: E731
    q = []
    mp = FakeMiniport()
    a = HostStack(Interface("02:00:00:00:00:0a", ipv4=("10.9.0.1", 24), send_frame=lambda f: q.append(f),
                            clock=clock))
    batch = []
    b = HostStack(Interface("02:00:00:00:00:0b", ipv4=("10.9.0.2", 24), send_frame=batch.append, clock=clock),
                  miniport=mp, tx_batch=batch)

    def pump():
        for _ in range(20):
            mp.rx += q
            q.clear()
            b.step(0)
            for f in mp.tx:
                a.iface.on_frame(f)
            mp.tx.clear()
            a.flush()
            t[0] += 0.001
            a.poll()
            if not q:
                break
    lst = b.listen(7000)
    fa = a.open("10.9.0.2", 7000)
    pump()
    fb = lst.take()
    assert fa.conn.established and fb is not None
    return a, b, fa, fb, q, mp, pump


def test_a_burst_of_in_order_data_is_acked_once():
    a, b, fa, fb, q, mp, pump = setup()
    data = os.urandom(20 * 1448)
    fa.conn.d.cwnd = 64 * 1448
    assert fa.conn.send(data, a.clock()) == len(data)
    a.flush()
    assert len(q) == 20                      # twenty full segments in one burst
    acks_before = fb.segments_out
    mp.rx += q
    q.clear()
    b.step(0)
    acks = [tcp_of(f, "ipv4") for f in mp.tx]
    assert fb.segments_out - acks_before == len(acks) == 1      # not one per two segments
    assert acks[0].ack == fb.conn.d.rcv_nxt == (fa.conn.d.snd_una + len(data)) % (1 << 32)
    assert fb.conn.recv(1 << 20, b.clock()) == data
    # outside a burst nothing is held: the stack's flush sends what the engine emits
    assert not b._held_acks and not b._coalesce


def test_duplicate_acks_are_not_coalesced():
    a, b, fa, fb, q, mp, pump = setup()
    fa.conn.d.cwnd = 64 * 1448
    fa.conn.send(os.urandom(6 * 1448), a.clock())
    a.flush()
    segs = list(q)
    q.clear()
    # the first segment is lost: the other five arrive out of order, in one burst
    mp.rx += segs[1:]
    b.step(0)
    acks = [tcp_of(f, "ipv4") for f in mp.tx]
    mp.tx.clear()
    assert len(acks) == 5 and len({x.ack for x in acks}) == 1        # five duplicate ACKs, all sent
    assert all(x.sack_blocks for x in acks)
    # the hole fills: one ACK for everything
    mp.rx.append(segs[0])
    b.step(0)
    acks = [tcp_of(f, "ipv4") for f in mp.tx]
    assert len(acks) == 1 and acks[0].ack == fb.conn.d.rcv_nxt
    assert len(fb.conn.recv(1 << 20, b.clock())) == 6 * 1448
