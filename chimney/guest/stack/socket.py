"""A socket API over the HostStack, driven by the stack's `run_until`.

    s = connect(stack, "10.199.0.1", 5000, timeout=5)     # or stack.connect(...)
    s.sendall(data); s.shutdown(SHUT_WR); s.recv(65536, timeout=5); s.close()
    ls = listen(stack, 5000)                               # or stack.listen_socket(5000)
    c = ls.accept(timeout=5)

Blocking calls take a timeout (None: the socket's default, `settimeout`);
timeout 0 is non-blocking: recv raises BlockingIOError when nothing is
buffered and returns b"" only at EOF; send raises BlockingIOError when the
send buffer is full.  A timeout that runs out raises TimeoutError.

The logical switch (chimney-spec.md, "Roles"): every data operation of a
socket goes through `socket.path`.  Today the only path is `SoftwarePath`,
the host stack's own TCP (a chimney.tcp Connection run by the HostStack).
The seam for the offload path: a path object with the same interface
(send, recv, readable, writable, eof, send_space, shutdown_write, close,
abort, closed, error) that moves data down the chimney to the offload
target instead; offloading a connection swaps `socket.path` (after the
state handover), uploading swaps it back.  The socket never touches the
Connection except through `path`.
"""
from __future__ import annotations

from socket import SHUT_RD, SHUT_RDWR, SHUT_WR
from collections import deque
from typing import Self

from ... import hw

__all__ = [
    "HandoverPath",
    "OffloadPath",
    "SHUT_RD",
    "SHUT_RDWR",
    "SHUT_WR",
    "ListeningSocket",
    "Socket",
    "SoftwarePath",
    "connect",
    "listen",
]

_DEFAULT = object()


class SoftwarePath:
    """The not-offloaded side of the logical switch: the host stack's own TCP."""

    kind = "software"

    def __init__(self, stack, flow):
        self.stack = stack
        self.flow = flow
        self.conn = flow.conn
        self.rx_bytes = 0           # delivered to the application (the auto offload policy reads it)

    def send(self, data) -> int:
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
        return self.conn.writable or self.closed()

    def send_space(self) -> int:
        return self.conn.send_space()

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

    def shutdown_write(self) -> None:
        self.conn.shutdown_write(self.stack.clock())
        self.stack.flush()

    def close(self) -> None:
        self.conn.close(self.stack.clock())
        self.stack.flush()
        self.stack.release(self.flow)

    def abort(self) -> None:
        self.conn.abort(self.stack.clock())
        self.stack.flush()
        self.stack.release(self.flow)


class HandoverPath:
    """While an Initiate is in flight: no data moves (the state is on its way to the
    NIC); shutdown/close/abort are remembered and applied by whichever path follows."""

    kind = "handover"

    def __init__(self, before):
        self.before = before
        self.conn = getattr(before, "conn", None)
        self.rx_bytes = getattr(before, "rx_bytes", 0)
        self.deferred: list[str] = []

    def send(self, data) -> int:
        return 0

    def recv(self, n: int) -> bytes:
        return b""

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return False

    def send_space(self) -> int:
        return 0

    def eof(self) -> bool:
        return False

    def established(self) -> bool:
        return True

    def closed(self) -> bool:
        return False

    def error(self):
        return None

    def reset(self) -> bool:
        return False

    def shutdown_write(self) -> None:
        self.deferred.append("shutdown_write")

    def close(self) -> None:
        self.deferred.append("close")

    def abort(self) -> None:
        self.deferred.append("abort")


class OffloadPath:
    """The offloaded side of the logical switch: data goes down the chimney.

    Sends become send requests (copied into DMA memory, at most `send_limit`
    bytes outstanding); receives come from posted receive buffers (kept
    `post_depth` deep while the host holds less than `rx_limit` unread bytes)
    and from indications (accepted as far as there is room).  DISCONNECT is
    EOF, ABORT a reset; RETRIEVE and TIME_WAIT start an upload.  During an
    upload (`state` "uploading") reads go on from what the host holds and
    writes queue here; the manager swaps in a SoftwarePath when it is done."""

    kind = "offload"

    def __init__(self, mgr, sock, handle: int, ctx: int, pobj, d):
        self.mgr, self.ch, self.sock = mgr, mgr.ch, sock
        self.stack, self.flow = mgr.stack, sock.flow
        self.handle, self.ctx, self.pobj = handle, ctx, pobj
        self.state = "offloaded"
        # sequence bookkeeping for the upload: the host's receive point and send end
        self.rcv_base = (d.rcv_nxt - len(d.recv_buffer)) & 0xFFFFFFFF
        self.rcv_nxt0 = d.rcv_nxt
        self.snd_una0 = d.snd_una
        self.snd_base = (d.snd_una + len(d.send_buffer)) & 0xFFFFFFFF
        self.host_rcvd = 0          # bytes the host got from the NIC (receives + accepted indications)
        self.posted_bytes = 0       # bytes handed to the NIC in send requests
        self.rx: deque = deque()    # received chunks (bytes) not read yet; rx_off into the first
        self.rx_off = 0
        self.rx_held = 0            # their bytes, minus rx_off
        self.rx_bytes = getattr(sock.path, "rx_bytes", 0)
        self.unposted = bytearray()
        self.sends: dict[int, int] = {}         # tag -> bytes (in request order)
        self.send_off: dict[int, int] = {}      # tag -> its offset in the stream, until done
        self.refused: list[tuple[int, bytes]] = []          # sends the NIC returned unsent
        self.outstanding = 0
        self.recvs: dict[int, int] = {}         # tag -> size
        self.fin_requested = False
        self.fin_posted = False
        self.eof_flag = False
        self.reset_flag = False
        self.err: str | None = None
        self.then: str | None = None
        self.uploaded_state = None
        self.upload_error: str | None = None
        self.terminated = False
        self.upload_started = 0.0
        self.send_backlog = None
        self.events: list[tuple] = []           # (kind, reason) as indicated

    # -- helpers for the manager -----------------------------------------------------------
    def io_outstanding(self) -> bool:
        return bool(self.sends or self.recvs)

    def unread(self) -> bytes:
        rx = self.rx
        if rx:
            rx[0] = rx[0][self.rx_off:]
        out = b"".join(rx)
        self.rx, self.rx_off, self.rx_held = deque(), 0, 0
        return out

    def _held(self) -> int:
        return self.rx_held

    def _post_send(self, data) -> bool:
        """Send requests of at most send_chunk bytes for data (bytes-like); False (and
        nothing of the rest queued) once the ring or the arena is full.  Returns True
        when all of it went down; self._sent_now says how much did."""
        mgr, ch = self.mgr, self.ch
        chunk, ctx, handle = mgr.send_chunk, self.ctx, self.handle
        sends, offs = self.sends, self.send_off
        n, off = len(data), 0
        while off < n:
            k = min(chunk, n - off)
            tag = ch.send(ctx, handle, data[off:off + k] if (off or k < n) else data)
            if tag is None:
                self._sent_now = off
                return False
            sends[tag] = k
            offs[tag] = self.posted_bytes
            self.posted_bytes += k
            off += k
        self._sent_now = off
        return True

    def pump(self) -> None:
        """Post what is queued: send requests, the FIN, receive buffers."""
        if self.state != "offloaded" or self.reset_flag:
            self.mgr.dirty.discard(self)
            return
        mgr, ch = self.mgr, self.ch
        blocked = False
        if self.unposted:
            with memoryview(self.unposted) as view:
                ok = self._post_send(view)
            del self.unposted[:self._sent_now]
            blocked = not ok
        if self.fin_requested and not self.fin_posted and not self.unposted:
            tag = ch.disconnect(self.ctx, self.handle)
            if tag is None:
                blocked = True
            else:
                self.sends[tag] = 0
                self.fin_posted = True
        if not self.eof_flag:
            recvs = self.recvs
            depth, size = mgr.post_depth, mgr.post_size
            if len(recvs) < depth:
                posted = sum(recvs.values())
                while len(recvs) < depth and self.rx_held + posted + size <= mgr.rx_limit:
                    tag = ch.post_receive(self.ctx, self.handle, size, push=mgr.push)
                    if tag is None:
                        blocked = True
                        break
                    recvs[tag] = size
                    posted += size
        if blocked:
            mgr.dirty.add(self)
        else:
            mgr.dirty.discard(self)

    # -- chimney handler ---------------------------------------------------------------------
    def on_send_done(self, tag, nbytes, status) -> None:
        n = self.sends.pop(tag, None)
        if n is None:
            return
        self.outstanding -= n
        off = self.send_off.pop(tag, None)
        if status in (hw.ST_UPLOAD_IN_PROGRESS, hw.ST_INVALID_HANDLE):
            self._refused(tag, off, n)
        elif status == hw.ST_ABORTED:
            self.reset_flag = True
            self.err = self.err or "connection reset"
        elif status not in (hw.ST_SUCCESS, hw.ST_UPLOADED):
            self.mgr.stats[f"send_status_{status}"] += 1
        if self.state == "offloaded":
            self.mgr.dirty.add(self)

    def on_recv_done(self, tag, data, flags, status) -> None:
        if self.recvs.pop(tag, None) is None:
            return
        if data:
            self._take(data)
        if flags & hw.OCF_FIN:
            self.eof_flag = True
        if status == hw.ST_ABORTED:
            self.reset_flag = True
            self.err = self.err or "connection reset"
        if self.state == "offloaded":
            self.mgr.dirty.add(self)

    def on_indicate(self, data, flags) -> int:
        room = max(0, self.mgr.rx_limit - self._held())
        if self.state != "offloaded":
            room = 0
        n = min(room, len(data))
        if n:
            self._take(data[:n])
        self.mgr.stats["indications"] += 1
        if n < len(data):
            self.mgr.stats["indications_partial" if n else "indications_refused"] += 1
        elif flags & hw.OCF_FIN:
            self.eof_flag = True
        return n

    def _take(self, data) -> None:
        self.rx.append(data)
        self.rx_held += len(data)
        self.host_rcvd += len(data)

    def on_event(self, kind, reason, value) -> None:
        self.events.append((kind, reason))
        if kind == hw.EV_DISCONNECT:
            self.eof_flag = True
        elif kind == hw.EV_ABORT:
            self.reset_flag = True
            self.err = "connection reset"
            if self.state == "offloaded":
                self.mgr.upload(self)           # frees the NIC's objects; the socket stays reset
        elif kind in (hw.EV_RETRIEVE, hw.EV_TIME_WAIT):
            self.mgr.stats["retrieve" if kind == hw.EV_RETRIEVE else "time_wait"] += 1
            if self.state == "offloaded":
                self.mgr.upload(self)
        elif kind == hw.EV_SEND_BACKLOG:
            self.send_backlog = value

    def on_ocompl_error(self, tag, status) -> None:
        self.mgr.stats[f"ocompl_error_{status}"] += 1
        n = self.sends.pop(tag, None)
        if n is not None:
            self.outstanding -= n
            self._refused(tag, self.send_off.pop(tag, None), n)
        self.recvs.pop(tag, None)

    def _refused(self, tag, off, n) -> None:
        """A request the NIC did not carry (it raced an upload): software sends it.
        Its bytes are read back from its DMA buffer (the Chimney frees it after this)."""
        self.mgr.stats["sends_refused"] += 1
        if off is not None and n:
            self.refused.append((off, self.ch.request_data(tag, n)))
        elif self.fin_posted:
            self.fin_posted = False         # the DISCONNECT: software sends the FIN

    # -- the path interface -------------------------------------------------------------------
    def send(self, data) -> int:
        if self.reset_flag:
            raise ConnectionResetError(self.err or "connection reset")
        n = min(len(data), self.send_space())
        if n:
            self.outstanding += n
            if self.state == "offloaded" and not self.unposted and not self.reset_flag:
                # straight into send requests: one copy, into DMA memory
                part = data[:n] if n < len(data) else data
                if not self._post_send(part):
                    self.unposted += part[self._sent_now:]
                    self.mgr.dirty.add(self)
            else:
                self.unposted += data[:n]
                if self.state == "offloaded":
                    self.pump()
        return n

    def recv(self, n: int) -> bytes:
        if not self.rx_held:
            if self.state == "offloaded":
                # this poll may complete our receive: return its data now, or the caller
                # (seeing b"") waits for an interrupt that the consumed completion never sends
                self.ch.poll()
            if not self.rx_held:
                return b""
        rx = self.rx
        first = rx[0]
        off = self.rx_off
        avail = len(first) - off
        if n >= avail:
            # the rest of the first chunk (whole: no copy)
            data = rx.popleft() if not off else first[off:]
            if off:
                rx.popleft()
            self.rx_off = 0
            k = avail
        else:
            data = first[off:off + n]
            self.rx_off = off + n
            k = n
        self.rx_held -= k
        self.rx_bytes += k
        if self.state == "offloaded" and len(self.recvs) < self.mgr.post_depth:
            self.pump()
        return data

    def readable(self) -> bool:
        return self._held() > 0 or self.eof_flag or self.closed()

    def writable(self) -> bool:
        return (self.send_space() > 0 and not self.fin_requested) or self.closed()

    def send_space(self) -> int:
        # unposted bytes are counted in outstanding too
        return max(0, self.mgr.send_limit - self.outstanding)

    def eof(self) -> bool:
        return self.eof_flag and not self._held()

    def established(self) -> bool:
        return True

    def closed(self) -> bool:
        return self.reset_flag or (self.state == "uploaded" and self.err is not None)

    def error(self):
        return self.err

    def reset(self) -> bool:
        return self.reset_flag

    def shutdown_write(self) -> None:
        if not self.fin_requested:
            self.fin_requested = True
            if self.state == "offloaded":
                self.pump()

    def close(self) -> None:
        """Graceful close: the NIC sends the FIN after the queued data; once the FIN is
        acknowledged (or on TIME_WAIT / RETRIEVE) the connection is uploaded and the host
        stack finishes it in software."""
        if self.reset_flag:
            self.then = None
            if self.state == "offloaded":
                self.mgr.upload(self)
            return
        self.then = "close"
        if self.state != "offloaded":
            return
        self.shutdown_write()
        self.close_started = __import__("time").monotonic()
        self.mgr.closing.add(self)

    def abort(self) -> None:
        if self.state == "offloaded" and not self.reset_flag:
            self.ch.abort(self.ctx, self.handle)
        self.reset_flag = True
        self.err = self.err or "aborted"
        if self.state == "offloaded":
            self.mgr.upload(self)


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
        self.path = SoftwarePath(stack, flow)      # the logical switch
        self.offload_policy: str | None = None     # None: the offload manager's global policy
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
        import time
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
        return self.path.kind == "offload" and self.path.state == "offloaded"

    def offload(self, wait: bool = True) -> bool:
        """Move this connection down the chimney now (True when it is there)."""
        if self.stack.offload is None:
            return False
        self.stack.offload.offload([self], wait=wait)
        return self.offloaded

    def upload(self, wait: bool = True) -> bool:
        """Take the connection back into the host stack's software TCP."""
        if self.stack.offload is None or self.path.kind != "offload":
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

