"""OffloadPath.recv polls the chimney when it holds nothing: a receive completed by that
poll is returned at once.  (It used to return b"": the caller then waited for an
interrupt that the already consumed completion never sent -- a 50 ms stall per lost
race in request/response over an offloaded connection in the VM.)"""
from types import SimpleNamespace

from chimney import hw
from chimney.guest.stack.offload import OffloadPath


def _path():
    ch = SimpleNamespace(poll=lambda: 0)
    mgr = SimpleNamespace(ch=ch, stack=None, dirty=set(), post_depth=0, post_size=0,
                          rx_limit=1 << 20, send_limit=1 << 20, send_chunk=1 << 16, push=True)
    sock = SimpleNamespace(flow=None, path=SimpleNamespace(rx_bytes=0))
    d = SimpleNamespace(rcv_nxt=1000, recv_buffer=b"", snd_una=5000, send_buffer=b"")
    return OffloadPath(mgr, sock, handle=7, ctx=3, pobj=None, d=d), ch


def test_recv_returns_data_its_own_poll_completed():
    p, ch = _path()
    p.recvs[42] = 256 * 1024

    def poll():     # the completion lands between the caller's step and this recv
        p.on_recv_done(42, b"answer", hw.OCF_PUSH, hw.ST_SUCCESS)
        return 1

    ch.poll = poll
    assert p.recv(64) == b"answer"
    assert not p.rx_held


def test_recv_nothing_there():
    p, _ = _path()
    assert p.recv(64) == b""
