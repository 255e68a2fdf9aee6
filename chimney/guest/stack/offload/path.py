"""The offloaded sides of a socket's logical switch: `HandoverPath` while an
Initiate is in flight, `OffloadPath` while the NIC carries the connection (and
while it is being uploaded).  Both implement `socket.SocketPath`.

An OffloadPath owns what the host holds of an offloaded connection: the bytes
received from the NIC and not read yet, the bytes the application wrote that
were not handed to the NIC, the requests outstanding.  `software_state(st)`
merges them into the state TERMINATE returned, for the software TCP to carry
on from exactly there.
"""
from __future__ import annotations

from collections import deque

from .... import hw
from ....tcp.engine import seq_add, seq_sub
from ....tcp.state import TcpState

__all__ = ["HandoverPath", "OffloadPath", "data_rcv_end", "data_snd_una"]

_FIN_IN = (TcpState.CLOSE_WAIT, TcpState.CLOSING, TcpState.LAST_ACK, TcpState.TIME_WAIT,
           TcpState.CLOSED)      # CLOSED here: uploaded after both FINs (LAST-ACK acknowledged)
_FIN_ACKED = (TcpState.FIN_WAIT_2, TcpState.TIME_WAIT, TcpState.CLOSED)


def data_rcv_end(d) -> int:
    """RCV.NXT without the peer's FIN (which takes a sequence number, not a byte)."""
    return seq_add(d.rcv_nxt, -1) if d.state in _FIN_IN else d.rcv_nxt


def data_snd_una(d) -> int:
    """SND.UNA without our FIN once it is acknowledged."""
    return seq_add(d.snd_una, -1) if d.state in _FIN_ACKED else d.snd_una


class HandoverPath:
    """While an Initiate is in flight: no data moves (the state is on its way to the
    NIC); shutdown/close/abort are remembered and applied by whichever path follows."""

    def __init__(self, before):
        self.before = before
        self.rx_bytes = before.rx_bytes
        self.deferred: list = []        # f(path) for each, in the order asked

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

    def offloaded(self) -> bool:
        return False

    def software_conn(self):
        return None

    def shutdown_write(self) -> None:
        self.deferred.append(lambda p: p.shutdown_write())

    def close(self) -> None:
        self.deferred.append(lambda p: p.close())

    def abort(self) -> None:
        self.deferred.append(lambda p: p.abort())

    def apply_deferred(self, path) -> None:
        """What the application asked for during the handover, on the path that follows."""
        for op in self.deferred:
            op(path)


class OffloadPath:
    """The offloaded side of the logical switch: data goes down the chimney.

    Sends become send requests (copied into DMA memory, at most `send_limit`
    bytes outstanding); receives come from posted receive buffers (kept
    `post_depth` deep while the host holds less than `rx_limit` unread bytes)
    and from indications (accepted as far as there is room).  DISCONNECT is
    EOF, ABORT a reset; RETRIEVE and TIME_WAIT start an upload.  During an
    upload (`state` "uploading") reads go on from what the host holds and
    writes queue here; the manager swaps in a SoftwarePath when it is done.
    recv reads what the host holds and never polls the chimney: the stack's step does
    (Socket.recv steps the stack, then reads)."""

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
        self.rx_bytes = sock.path.rx_bytes
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
        self.close_started = 0.0
        self.send_backlog = None
        self.no_route = False           # invalidated because no route is left
        self.send_limit = mgr.send_limit        # outstanding send bytes allowed (SEND_BACKLOG moves it)
        self.events: list[tuple] = []           # (kind, reason) as indicated
        self._sent_now = 0

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
        room = max(0, self.mgr.rx_limit - self.rx_held)
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
            self.mgr.on_send_backlog(self, value)

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

    # -- the upload merge ---------------------------------------------------------------------
    def software_state(self, st):
        """The delegated state TERMINATE returned (`st`), with what the host holds merged
        in: the receive data the host got from the NIC but the application did not read
        yet goes in front of the returned buffered receive data (minus any overlap, found
        by sequence number); the sends the NIC refused and the bytes never handed to it
        are parked: the software path feeds them to the rebuilt connection as its send
        buffer takes them, and a FIN asked for and never posted after them.
        Returns (delegated state, parked bytes, whether a FIN is still to be sent)."""
        mgr, key = self.mgr, self.flow.key
        d = st.delegated
        host_seq = seq_add(self.rcv_base, self.host_rcvd)
        start = seq_sub(data_rcv_end(d), len(d.recv_buffer))
        overlap = seq_sub(host_seq, start)
        rb = bytes(d.recv_buffer)
        if overlap < 0:
            mgr.stats["upload_rx_gap"] += 1
            mgr.last_errors.append(f"upload {key}: {-overlap} received bytes missing")
        elif overlap > 0:
            mgr.stats["upload_rx_overlap_bytes"] += min(overlap, len(rb))
            rb = rb[overlap:]
        d.recv_buffer = self.unread() + rb
        refused = sorted(self.refused)
        expect_end = seq_add(self.snd_base, self.posted_bytes - sum(len(x) for _, x in refused))
        got_end = seq_add(data_snd_una(d), len(d.send_buffer))
        if seq_sub(expect_end, got_end) != 0:
            mgr.stats["upload_tx_mismatch"] += 1
            mgr.last_errors.append(f"upload {key}: send data ends at {got_end}, expected {expect_end}")
        parked = b"".join(x for _, x in refused) + bytes(self.unposted)
        self.unposted = bytearray()
        return d, parked, self.fin_requested and not self.fin_posted

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
        return self.rx_held > 0 or self.eof_flag or self.closed()

    def writable(self) -> bool:
        return (self.send_space() > 0 and not self.fin_requested) or self.closed()

    def send_space(self) -> int:
        # unposted bytes are counted in outstanding too
        return max(0, self.send_limit - self.outstanding)

    def eof(self) -> bool:
        return self.eof_flag and not self.rx_held

    def established(self) -> bool:
        return True

    def closed(self) -> bool:
        return self.reset_flag or (self.state == "uploaded" and self.err is not None)

    def error(self):
        return self.err

    def reset(self) -> bool:
        return self.reset_flag

    def offloaded(self) -> bool:
        return self.state == "offloaded"

    def software_conn(self):
        return None

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
        self.close_started = self.mgr.clock()
        self.mgr.closing.add(self)

    def abort(self) -> None:
        if self.state == "offloaded" and not self.reset_flag:
            self.ch.abort(self.ctx, self.handle)
        self.reset_flag = True
        self.err = self.err or "aborted"
        if self.state == "offloaded":
            self.mgr.upload(self)
