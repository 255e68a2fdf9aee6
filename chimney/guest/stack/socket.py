"""A socket API over the HostStack, driven by the stack's `run_until`.

    s = connect(stack, "10.199.0.1", 5000, timeout=5)     # or stack.connect(...)
    s.sendall(data); s.shutdown(SHUT_WR); s.recv(65536, timeout=5); s.close()
    ls = listen(stack, 5000)                               # or stack.listen_socket(5000)
    c = ls.accept(timeout=5)

Blocking calls take a timeout (None: the socket's default, `settimeout`);
timeout 0 is non-blocking: recv raises BlockingIOError when nothing is
buffered and returns b"" only at EOF; send raises BlockingIOError when the
send buffer is full.  A timeout that runs out raises TimeoutError.

The logical switch: every data operation of a socket goes through
`socket.path`, a `SocketPath`.  `SoftwarePath` is the host stack's own TCP (a
chimney.tcp Connection run by the HostStack); the offload manager
(stack/offload/) swaps in a `HandoverPath` while a connection's state is on
its way to the NIC and an `OffloadPath` while the NIC carries it, and a
SoftwarePath again after the upload.  The socket never touches the
Connection except through `path`.
"""
from __future__ import annotations

import time
from socket import SHUT_RD, SHUT_RDWR, SHUT_WR
from typing import Protocol, Self

__all__ = [
    "SHUT_RD",
    "SHUT_RDWR",
    "SHUT_WR",
    "ListeningSocket",
    "Socket",
    "SocketPath",
    "SoftwarePath",
    "connect",
    "listen",
]

_DEFAULT = object()


class SocketPath(Protocol):
    """What a socket's logical switch needs of a path, whoever carries the connection."""

    rx_bytes: int               # delivered to the application (the auto offload policy reads it)

    def send(self, data) -> int: ...
    def recv(self, n: int) -> bytes: ...
    def readable(self) -> bool: ...
    def writable(self) -> bool: ...
    def send_space(self) -> int: ...
    def eof(self) -> bool: ...
    def established(self) -> bool: ...
    def closed(self) -> bool: ...
    def error(self) -> str | None: ...
    def reset(self) -> bool: ...
    def offloaded(self) -> bool:
        """The NIC carries the connection now."""
    def software_conn(self):
        """The host stack's Connection when it carries the connection, else None."""
    def shutdown_write(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class SoftwarePath:
    """The not-offloaded side of the logical switch: the host stack's own TCP.

    After an upload it may start with `parked` bytes: accepted from the application
    while the connection was on its way back, beyond what the send buffer holds.  They
    go into the send buffer as it drains (`drain`, run by the offload manager's poll),
    before anything written later; a FIN or close asked for meanwhile waits behind them."""

    def __init__(self, stack, flow, parked=b""):
        self.stack = stack
        self.flow = flow
        self.conn = flow.conn
        self.rx_bytes = 0           # delivered to the application (the auto offload policy reads it)
        self.parked = bytearray(parked)
        self._fin_after_parked = False          # shutdown_write, once they are in
        self._close_after_parked = False        # close, once they are in
        self.drain()

    def drain(self) -> bool:
        """Parked bytes into the send buffer as far as it has room (the connection's
        send runs its output and arms its retransmission timer), then a FIN or close that
        waited behind them.  True when nothing waits any more."""
        conn = self.conn
        if self.parked:
            if conn.writable:
                n = conn.send(self.parked, self.stack.clock())
                del self.parked[:n]
            elif conn.closed:
                self.parked.clear()     # reset or aborted: nothing can carry them
            if self.parked:
                return False
        if self._close_after_parked:
            self._fin_after_parked = self._close_after_parked = False
            self.close()
        elif self._fin_after_parked:
            self._fin_after_parked = False
            self.shutdown_write()
        return True

    def send(self, data) -> int:
        if self.parked:
            return 0
        n = self.conn.send(data, self.stack.clock())
        self.stack.flush()
        return n

    def recv(self, n: int) -> bytes:
        data = self.conn.recv(n, self.stack.clock())
        if data:
            self.rx_bytes += len(data)
            self.stack.flush()      # a window update may be due
        return data

    def readable(self) -> bool:
        return self.conn.readable or self.closed()

    def writable(self) -> bool:
        return (self.conn.writable and not self.parked) or self.closed()

    def send_space(self) -> int:
        return 0 if self.parked else self.conn.send_space()

    def eof(self) -> bool:
        return self.conn.eof

    def established(self) -> bool:
        return self.conn.established

    def closed(self) -> bool:
        return self.conn.closed

    def error(self):
        return self.conn.error

    def reset(self) -> bool:
        return self.conn.reset

    def offloaded(self) -> bool:
        return False

    def software_conn(self):
        return self.conn

    def probe_window(self) -> bool:
        """One probe for the peer's current window (Connection.probe_window), sent now."""
        sent = self.conn.probe_window(self.stack.clock())
        self.stack.flush()
        return sent

    def shutdown_write(self) -> None:
        if self.parked:
            self._fin_after_parked = True
            return
        self.conn.shutdown_write(self.stack.clock())
        self.stack.flush()

    def close(self) -> None:
        if self.parked:
            self._close_after_parked = True
            return
        self.conn.close(self.stack.clock())
        self.stack.flush()
        self.stack.release(self.flow)

    def abort(self) -> None:
        self.parked.clear()
        self._fin_after_parked = self._close_after_parked = False
        self.conn.abort(self.stack.clock())
        self.stack.flush()
        self.stack.release(self.flow)


def _raise_for(path) -> None:
    err = path.error()
    if err == "connection refused":
        raise ConnectionRefusedError(err)
    if path.reset() or err == "connection reset":
        raise ConnectionResetError(err or "connection reset")
    if err:
        raise ConnectionError(err)


class Socket:
    """A connected TCP socket."""

    def __init__(self, stack, flow, timeout: float | None = 30.0):
        self.stack = stack
        self.flow = flow
        self.path: SocketPath = SoftwarePath(stack, flow)      # the logical switch
        self.offload_policy: str | None = None     # None: the offload manager's global policy
        self.born = stack.clock()                  # the auto policy's age
        self.no_reoffload = False                  # an Initiate of it failed: stays in software
        self.offload_count = 0
        self.upload_count = 0
        self.timeout = timeout
        self._closed = False
        self._wr_shut = False

    @classmethod
    def connect(cls, stack, addr, port: int, timeout: float | None = 10.0) -> Socket:
        s = cls(stack, stack.open(addr, port), timeout=timeout)
        ok = stack.run_until(lambda: s.path.established() or s.path.closed(), timeout)
        if s.path.established() and not s.path.closed():
            if stack.offload is not None:
                stack.offload.register(s)
            return s
        if not ok:
            s.path.abort()
            raise TimeoutError(f"connect to {addr}:{port} timed out")
        s.path.close()
        _raise_for(s.path)
        raise ConnectionError("connection closed during the handshake")

    # -- addresses ---------------------------------------------------------------------
    def getsockname(self):
        return str(self.flow.key[0]), self.flow.key[1]

    def getpeername(self):
        return str(self.flow.key[2]), self.flow.key[3]

    def settimeout(self, t: float | None) -> None:
        self.timeout = t

    def _timeout(self, t):
        return self.timeout if t is _DEFAULT else t

    @property
    def is_closed(self) -> bool:
        """close() or abort() was called."""
        return self._closed

    def _check(self) -> None:
        if self._closed:
            raise OSError("socket closed")

    # -- data --------------------------------------------------------------------------
    def send(self, data, timeout=_DEFAULT) -> int:
        """Queue what fits (at least one byte, waiting for room up to timeout)."""
        self._check()
        if self._wr_shut:
            raise BrokenPipeError("shut down for writing")
        if not data:
            return 0
        t = self._timeout(timeout)
        if not self.path.writable():
            if t == 0:
                raise BlockingIOError("send buffer full")
            # the path is looked up again: running the stack may switch it (offload, upload)
            if not self.stack.run_until(lambda: self.path.writable(), t):
                raise TimeoutError("send timed out")
        p = self.path
        if p.closed():
            _raise_for(p)
            raise BrokenPipeError("connection closed")
        return p.send(data)

    def sendall(self, data, timeout=_DEFAULT) -> None:
        """Send all of data; timeout bounds the whole call."""
        t = self._timeout(timeout)
        end = None if t is None else time.monotonic() + t
        view = memoryview(bytes(data) if not isinstance(data, (bytes, bytearray)) else data)
        off = 0
        while off < len(view):
            left = None if end is None else max(0.0, end - time.monotonic())
            if left == 0 and not self.path.writable():
                raise TimeoutError(f"sendall timed out after {off} bytes")
            chunk = view[off:off + max(1, self.path.send_space())]
            off += self.send(bytes(chunk), timeout=left if left is not None else None)

    def recv(self, n: int, timeout=_DEFAULT) -> bytes:
        """Up to n bytes; b"" at EOF.  Timeout 0: BlockingIOError when nothing is there."""
        self._check()
        t = self._timeout(timeout)
        if not self.path.readable():
            if t == 0:
                self.stack.step(0)      # take what already arrived
            elif not self.stack.run_until(lambda: self.path.readable(), t):
                raise TimeoutError("recv timed out")
        # looked up after running the stack, which may have switched the path (an offload
        # exports the software TCP's unread bytes to the NIC: reading them from the old
        # path as well would deliver them twice)
        p = self.path
        data = p.recv(n)
        if data:
            return data
        if p.eof():
            return b""
        if p.closed():
            _raise_for(p)
            return b""
        if t == 0:
            raise BlockingIOError("no data")
        raise TimeoutError("recv timed out")

    def recv_exactly(self, n: int, timeout=_DEFAULT) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = self.recv(n - len(out), timeout)
            if not b:
                break
            out += b
        return bytes(out)

    # -- closing -----------------------------------------------------------------------
    def shutdown(self, how: int = SHUT_WR) -> None:
        self._check()
        if how in (SHUT_WR, SHUT_RDWR) and not self._wr_shut:
            self._wr_shut = True
            self.path.shutdown_write()

    # -- offload ------------------------------------------------------------------------
    @property
    def offloaded(self) -> bool:
        return self.path.offloaded()

    def offload(self, wait: bool = True) -> bool:
        """Move this connection down the chimney now (True when it is there)."""
        if self.stack.offload is None:
            return False
        self.stack.offload.offload([self], wait=wait)
        return self.offloaded

    def upload(self, wait: bool = True) -> bool:
        """Take the connection back into the host stack's software TCP."""
        if self.stack.offload is None:
            return False
        return bool(self.stack.offload.upload(self, wait=wait))

    def close(self) -> None:
        """Graceful close: FIN after queued data; the stack finishes the connection."""
        if not self._closed:
            self._closed = True
            self.path.close()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self.path.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ListeningSocket:
    def __init__(self, stack, port: int, addr=None, backlog: int = 16, timeout: float | None = 30.0):
        self.stack = stack
        self.listener = stack.listen(port, addr, backlog)
        self.timeout = timeout

    def getsockname(self):
        lip = self.listener.local_ip
        return (None if lip is None else str(lip)), self.listener.port

    def accept(self, timeout=_DEFAULT):
        """(Socket, (peer address, port)) once a connection is established."""
        t = self.timeout if timeout is _DEFAULT else timeout
        if self.listener.closed:
            raise OSError("listening socket closed")
        if self.listener.ready() is None:
            if t == 0:
                self.stack.step(0)
                if self.listener.ready() is None:
                    raise BlockingIOError("no connection pending")
            elif not self.stack.run_until(lambda: self.listener.ready() is not None, t):
                raise TimeoutError("accept timed out")
        flow = self.listener.take()
        s = Socket(self.stack, flow, timeout=self.timeout)
        if self.stack.offload is not None:
            self.stack.offload.register(s)
        return s, (str(flow.key[2]), flow.key[3])

    def close(self) -> None:
        self.stack.unlisten(self.listener)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(stack, addr, port: int, timeout: float | None = 10.0) -> Socket:
    return Socket.connect(stack, addr, port, timeout)


def listen(stack, port: int, addr=None, backlog: int = 16) -> ListeningSocket:
    return ListeningSocket(stack, port, addr, backlog)

