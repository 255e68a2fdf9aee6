"""Socket.recv on an offloaded connection steps the stack, then reads: a receive that the
step's chimney poll completes is returned at once.  (A receive completed by a poll the
reader did not see used to be returned as b"": the caller then waited for an interrupt
that the already consumed completion never sent -- a 50 ms stall per lost race in
request/response over an offloaded connection in the VM.)  OffloadPath.recv itself never
polls the chimney."""
from types import SimpleNamespace

import pytest

from chimney import hw
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.offload import OffloadPath
from chimney.guest.stack.socket import Socket


def _path():
    def no_poll():
        raise AssertionError("OffloadPath.recv polled the chimney")

    ch = SimpleNamespace(poll=no_poll)
    mgr = SimpleNamespace(ch=ch, stack=None, dirty=set(), post_depth=0, post_size=0,
                          rx_limit=1 << 20, send_limit=1 << 20, send_chunk=1 << 16, push=True)
    sock = SimpleNamespace(flow=None, path=SimpleNamespace(rx_bytes=0))
    d = SimpleNamespace(rcv_nxt=1000, recv_buffer=b"", snd_una=5000, send_buffer=b"")
    return OffloadPath(mgr, sock, handle=7, ctx=3, pobj=None, d=d)


class _Stack:
    """A stack whose every step is one chimney poll that may complete a receive."""

    run_until = HostStack.run_until

    def __init__(self, on_step):
        self.on_step, self.steps, self.offload = on_step, 0, None

    def clock(self):
        return 0.0

    def step(self, timeout=0.0):
        self.steps += 1
        self.on_step()
        return 0


def _socket(p, on_step):
    stack = _Stack(on_step)
    s = Socket(stack, SimpleNamespace(conn=None, key=None))
    s.path = p
    return s, stack


@pytest.mark.parametrize("timeout", [0, 5.0])
def test_recv_returns_what_the_step_completed(timeout):
    p = _path()
    p.recvs[42] = 256 * 1024
    s, stack = _socket(p, lambda: p.on_recv_done(42, b"answer", hw.OCF_PUSH, hw.ST_SUCCESS))
    assert s.recv(64, timeout=timeout) == b"answer"
    assert stack.steps == 1 and not p.rx_held


def test_recv_nothing_there():
    p = _path()
    assert p.recv(64) == b""
    s, stack = _socket(p, lambda: None)
    with pytest.raises(BlockingIOError):
        s.recv(64, timeout=0)
    assert stack.steps == 1
