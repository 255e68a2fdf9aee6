"""Blocking helpers over the stacks' non-blocking connections, each bounded by a
deadline (time.monotonic()): send all, receive exactly n bytes, JSON lines,
connect with retries, close everything."""
from __future__ import annotations

import contextlib
import json
import time

from .stacks import ToolError

CHUNK = 256 * 1024          # bytes per send call


def time_left(deadline) -> float:
    """Seconds to the deadline; TimeoutError once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("hard timeout")
    return left


def send_all(stack, conn, data: bytes, deadline) -> None:
    view = memoryview(data)
    while view:
        n = conn.send(view[:CHUNK])
        if n:
            view = view[n:]
            stack.pump()
        else:
            stack.wait(min(0.05, time_left(deadline)), (), (conn,))


def recv_exactly(stack, conn, n: int, deadline) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = conn.recv(n - len(out))
        if b is None:
            stack.wait(min(0.05, time_left(deadline)), (conn,))
        elif not b:
            raise ToolError(f"connection closed after {len(out)} of {n} bytes")
        else:
            out += b
    return bytes(out)


class LineReader:
    def __init__(self, stack, conn):
        self.stack, self.conn, self.buf = stack, conn, bytearray()

    def line(self, deadline) -> dict:
        while b"\n" not in self.buf:
            if len(self.buf) > 1 << 20:
                raise ToolError("control line too long")
            b = self.conn.recv(65536)
            if b is None:
                self.stack.wait(min(0.05, time_left(deadline)), (self.conn,))
            elif not b:
                raise ToolError("control connection closed by the peer")
            else:
                self.buf += b
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return json.loads(line)


def send_line(stack, conn, obj, deadline) -> None:
    send_all(stack, conn, json.dumps(obj).encode() + b"\n", deadline)


def teardown(stack, conns) -> None:
    """Close every connection and let the closing handshakes go out (best effort)."""
    for c in conns:
        with contextlib.suppress(OSError):
            c.close()
    with contextlib.suppress(Exception):
        stack.finish()


def connect_retry(stack, host, port, timeout):
    """Connect, retrying a refused or timed-out attempt until `timeout` seconds pass."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        try:
            return stack.connect(host, port, min(3.0, max(0.1, left)))
        except (ConnectionRefusedError, TimeoutError):
            if time.monotonic() + 0.2 >= end:
                raise
            stack.wait(0.2)




@contextlib.contextmanager
def session(stack, conns: list, res: dict):
    """One client's or server's run: a failure of the run (a socket error, a protocol
    error, a timeout) goes into res["error"]; whatever happens the connections are
    closed; then res["stack_stats"] is taken."""
    try:
        yield
    except (OSError, ToolError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        teardown(stack, conns)
    res["stack_stats"] = stack.stats()
