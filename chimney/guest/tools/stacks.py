"""The two stacks the tools run on, behind one small interface: our host stack on
the NIC (ChimneyStack: the bring-up of chimney.guest.bringup, sockets of
chimney.guest.stack.socket) and the kernel's sockets (LinuxStack).  Their
connections are non-blocking: send() returns the bytes taken (0: none now),
recv() bytes, b"" at EOF or None when nothing is there; wait() blocks until
something may have changed, pump() does the stack's pending work."""
from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import struct
import termios
import time

from ..im.chain import chain_of
from ..stack.offload import OffloadPath
from ..stack.socket import SoftwarePath

DEFAULT_IP4 = "10.199.0.2/24"       # chimney.host.netns.PeerAddrs: the guest's addresses
DEFAULT_IP6 = "fd00:c41e::2/64"
TCP_INFO = getattr(socket, "TCP_INFO", 11)


class ToolError(Exception):
    """A tool's run failed in a way the user should read (one line)."""


def addresses(sock):
    """((local host, port), (remote host, port)) of a socket with getsockname/getpeername;
    ("", 0) where unknown; IPv4-mapped IPv6 addresses as IPv4."""
    out = []
    for get in (sock.getsockname, sock.getpeername):
        try:
            a = get()
            out.append((str(a[0]).removeprefix("::ffff:"), int(a[1])))
        except (OSError, IndexError, TypeError, AttributeError):
            out.append(("", 0))
    return tuple(out)


class LinuxConn:
    def __init__(self, s: socket.socket):
        s.setblocking(False)
        self.s = s

    def fileno(self):
        return self.s.fileno()

    def send(self, data) -> int:
        try:
            return self.s.send(data)
        except BlockingIOError:
            return 0

    def recv(self, n: int):
        """bytes, b"" at EOF, None when nothing is there."""
        try:
            return self.s.recv(n)
        except BlockingIOError:
            return None

    def shutdown_wr(self) -> None:
        try:
            self.s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.s.close()

    def retransmits(self):
        """tcpi_total_retrans from TCP_INFO (None where unavailable)."""
        try:
            info = self.s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
            return struct.unpack_from("I", info, 100)[0] if len(info) >= 104 else None
        except OSError:
            return None

    def unacked(self):
        """Bytes sent the peer has not acknowledged yet (SIOCOUTQ); None when unknown."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return None

    def addresses(self):
        """((local host, port), (remote host, port)); ("", 0) where unknown."""
        return addresses(self.s)

    def peer_window(self) -> None:
        """Not known: a kernel socket shows SND.WND (tcpi_snd_wnd) but not the largest
        window the peer advertised, and cannot send a probe on demand (keep-alive times
        are whole seconds, and Linux answers its zero-length probes at most twice a second)."""

    def nodelay(self) -> None:
        with contextlib.suppress(OSError):
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def retransmitted_bytes(self, sent: int):
        return None

    def tcp_stats(self) -> dict:
        """cwnd (bytes: tcpi_snd_cwnd x tcpi_snd_mss) and srtt (ms) from TCP_INFO."""
        try:
            info = self.s.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
            mss, = struct.unpack_from("I", info, 16)
            rtt_us, = struct.unpack_from("I", info, 68)
            cwnd, = struct.unpack_from("I", info, 80)
            return {"cwnd": cwnd * mss, "srtt_ms": rtt_us / 1000, "where": "linux"}
        except (OSError, struct.error):
            return {}


class LinuxStack:
    """Kernel sockets.  family: 4 or 6 to use only that family (None: both); window:
    SO_SNDBUF/SO_RCVBUF bytes; mss: TCP_MAXSEG."""
    name = "linux"

    def __init__(self, family=None, window=None, mss=None):
        self.family, self.window, self.mss = family, window, mss
        self.listener = None

    def _tune(self, s: socket.socket) -> None:
        if self.window:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.window)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.window)
        if self.mss:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.mss)

    def connect(self, host, port, timeout):
        fam = {4: socket.AF_INET, 6: socket.AF_INET6}.get(self.family, socket.AF_UNSPEC)
        err = None
        for af, kind, proto, _, addr in socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM):
            s = socket.socket(af, kind, proto)
            try:
                self._tune(s)       # before connect: the window scale and MSS go into the SYN
                s.settimeout(timeout)
                s.connect(addr)
                return LinuxConn(s)
            except OSError as e:
                s.close()
                err = e
        raise err or OSError(f"{host}: no address")

    def listen(self, port):
        v4 = self.family == 4
        ls = socket.socket(socket.AF_INET if v4 else socket.AF_INET6, socket.SOCK_STREAM)
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if not v4:
                ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if self.family == 6 else 0)
            self._tune(ls)          # accepted sockets inherit it
            ls.bind(("0.0.0.0" if v4 else "::", port))
            ls.listen(16)
        except OSError as e:
            ls.close()
            raise ToolError(f"cannot listen on TCP port {port}: {e.strerror or e}") from None
        self.listener = ls

    def accept(self, timeout):
        self.listener.settimeout(timeout)
        try:
            c, a = self.listener.accept()
        except TimeoutError:
            raise TimeoutError("accept timed out") from None
        host = a[0].removeprefix("::ffff:") if a[0].startswith("::ffff:") and "." in a[0] else a[0]
        return LinuxConn(c), (host, a[1])

    def wait(self, timeout, conns_r=(), conns_w=()) -> None:
        if conns_r or conns_w:
            select.select(list(conns_r), list(conns_w), [], timeout)
        elif timeout:
            time.sleep(timeout)

    def pump(self) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def finish(self, timeout=1.0) -> None:
        pass

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


class ChimneyConn:
    def __init__(self, sock, upload_after=None):
        self.sock = sock
        self.app_bytes = 0          # everything the application handed to send (header included)
        self.rx_bytes = 0
        self.upload_after = upload_after
        self.upload_done = False
        self._probing = None        # the NIC's keep-alive settings while it probes the window

    def _maybe_upload(self) -> None:
        if self.upload_after is not None and not self.upload_done and \
                self.app_bytes + self.rx_bytes >= self.upload_after and self.sock.offloaded:
            self.upload_done = True
            self.sock.upload(wait=True)

    def send(self, data) -> int:
        try:
            n = self.sock.send(data, timeout=0)
        except BlockingIOError:
            return 0
        self.app_bytes += n
        self._maybe_upload()
        return n

    def recv(self, n: int):
        try:
            b = self.sock.recv(n, timeout=0)
        except BlockingIOError:
            return None
        self.rx_bytes += len(b)
        self._maybe_upload()
        return b

    def offload_info(self) -> dict:
        """Per-stream offload figures: ever offloaded, uploads, the software TCP's data
        segments, and the NIC's view of the connection (QUERY) if it is offloaded now."""
        s = self.sock
        info = {"offloaded": getattr(s, "offload_count", 0) > 0,
                "uploads": getattr(s, "upload_count", 0),
                "software_data_segments_out": s.flow.data_segments_out, "device": None}
        mgr = s.stack.offload
        if mgr is not None:
            info["rss"] = mgr.rss_info(s)
        if mgr is not None and s.offloaded:
            with contextlib.suppress(Exception):
                q = mgr.query([s])
                for v in q.values():
                    info["device"] = mgr.conn_stats(v["path"], v["state"])
        return info

    def shutdown_wr(self) -> None:
        self.sock.shutdown()

    def close(self) -> None:
        self.sock.close()

    def retransmits(self):
        return None         # the software TCP counts no retransmitted segments per connection

    def unacked(self):
        """Bytes sent the peer has not acknowledged yet; None when unknown (mid-handover).
        Software TCP: its send buffer holds exactly those.  Offloaded: the path's
        outstanding bytes, since the NIC completes a send request only once its last
        byte is acknowledged (docs/chimney-interfaces.md, Data I/O)."""
        path = self.sock.path
        if isinstance(path, OffloadPath):
            return path.outstanding
        if isinstance(path, SoftwarePath):
            return len(path.conn.d.send_buffer)
        return None                 # a handover is under way

    def addresses(self):
        """((local host, port), (remote host, port)); ("", 0) where unknown."""
        return addresses(self.sock)

    def peer_window(self):
        """(SND.WND, MAX.SND.WND, slack) now: the NIC's (QUERY) while offloaded, else the
        software TCP's; None mid-handover.  slack: what the peer's rounding of the window
        it advertises may take off: up to an MSS (Linux announces free space in whole
        segments) plus one unit of its window scale (the SYN's window, the first maximum,
        is unscaled; later ones are multiples of the unit)."""
        path = self.sock.path
        if isinstance(path, OffloadPath):
            # bounded: settle asks every few milliseconds and must end in SETTLE_MAX
            for v in self.sock.stack.offload.query([self.sock], timeout=1.0).values():
                const, d = v["state"].const, v["state"].delegated
                return d.snd_wnd, d.max_snd_wnd, const.remote_mss + (1 << const.snd_wscale)
            return None
        if isinstance(path, SoftwarePath):
            c = path.conn
            return c.d.snd_wnd, c.d.max_snd_wnd, c.smss + (1 << c.const.snd_wscale)
        return None

    def probe_window(self) -> None:
        """Elicit fresh ACKs carrying the peer's window: the software TCP sends one probe
        now; an offloaded connection's NIC is set to probe by itself (keep-alive, UPDATE)
        until end_window_probe."""
        path = self.sock.path
        if isinstance(path, SoftwarePath):
            path.probe_window()
        elif isinstance(path, OffloadPath) and self._probing is None:
            self._probing = self.sock.stack.offload.probe_windows([self.sock])

    def end_window_probe(self) -> None:
        """Put back what probe_window changed on the NIC (its keep-alive settings)."""
        saved, self._probing = self._probing, None
        if saved:
            self.sock.stack.offload.end_window_probes(saved)

    def nodelay(self) -> None:
        pass                # the host stack sends what it is given at once

    def tcp_stats(self) -> dict:
        """cwnd (bytes) and srtt (ms) now: from the NIC (QUERY) while offloaded, else
        from the software TCP."""
        s = self.sock
        mgr = s.stack.offload
        if mgr is not None and s.offloaded:
            with contextlib.suppress(Exception):
                for v in mgr.query([s]).values():
                    st = mgr.conn_stats(v["path"], v["state"])
                    return {"cwnd": st["cwnd"], "srtt_ms": st["srtt_ms"], "where": "nic"}
            return {}
        d = s.flow.conn.d
        return {"cwnd": d.cwnd, "srtt_ms": d.srtt / 8, "where": "software"}

    def retransmitted_bytes(self, sent: int):
        """Payload bytes the software TCP put on the wire beyond what the application sent."""
        return max(0, self.sock.flow.bytes_out - self.app_bytes)


class ChimneyStack:
    """Our host stack on the NIC.  offload: off (software TCP), on (every connection
    offloaded after its handshake; an error if the NIC lacks the feature), auto (after
    1 MB in software); upload_after: take each stream back into software after that many
    bytes; window: the TCP send and receive buffers; mss: the MSS we advertise."""
    name = "chimney"

    def __init__(self, bus: str, socket_path=None, pci=None, ip=DEFAULT_IP4, ip6=(DEFAULT_IP6,),
                 offload="off", upload_after=None, window=None, mss=None, im=None, rss_queues=None):
        from ...tcp.engine import Config
        from ..bringup import bring_up
        cfg = Config()
        if window:
            cfg.send_buffer_size = cfg.recv_buffer_size = window
        if mss:
            cfg.local_mss = mss
        policy = {"off": None, "on": "always", "auto": "auto"}[offload]
        if im and policy is None:
            raise ToolError("--im needs --offload on|auto")
        if rss_queues and policy is None:
            raise ToolError("--rss-queues needs --offload on|auto")
        self.g = bring_up(bus=bus, socket=socket_path, pci=pci, ip=ip or None, ip6=ip6, config=cfg,
                          offload=policy, require_offload=offload == "on", im=im,
                          rss_queues=rss_queues)
        self.bus, self.mp, self.stack, self.mgr = self.g.bus, self.g.mp, self.g.stack, self.g.offload
        self.offload, self.upload_after = offload, upload_after
        self.listener = None

    def connect(self, host, port, timeout):
        from ..stack.socket import connect
        return ChimneyConn(connect(self.stack, host, port, timeout=timeout), self.upload_after)

    def listen(self, port):
        from ..stack.socket import listen
        try:
            self.listener = listen(self.stack, port)
        except OSError as e:
            raise ToolError(f"cannot listen on TCP port {port}: {e}") from None

    def accept(self, timeout):
        s, peer = self.listener.accept(timeout=timeout)
        return ChimneyConn(s, self.upload_after), peer

    def wait(self, timeout, conns_r=(), conns_w=()) -> None:
        self.stack.step(timeout)

    def pump(self) -> None:
        self.stack.step(0)

    def stats(self) -> dict:
        st = self.stack
        out = {"tcp": dict(sorted(st.stats.items())), "iface": dict(sorted(st.iface.stats.items()))}
        if self.mgr is not None:
            out["offload"] = dict(sorted(self.mgr.stats.items()))
            out["chimney"] = dict(sorted(self.g.chimney.stats.items()))
            if self.g.top is not self.g.chimney:
                out["im"] = {i.name: dict(i.stats) for i in chain_of(self.g.top)}
        with contextlib.suppress(Exception):
            # the NIC's offload counters (with a TOE) and its wire's segmentation offload
            keep = ("offload", "wire_") if self.mgr is not None else ("wire_",)
            out["device"] = {k: v for k, v in self.mp.stats().items() if k.startswith(keep)}
        return out

    def finish(self, timeout=1.0) -> None:
        """Let the closing handshakes go out (everything closed or in TIME-WAIT)."""
        self.stack.run_until(lambda: not self.stack.detached and all(
            f.conn.closed or f.conn.state.name == "TIME_WAIT" for f in self.stack.flows.values()),
            timeout)

    def close(self) -> None:
        try:
            if self.listener is not None:
                self.listener.close()
        finally:
            self.g.close()


def make_stack(args):
    """The stack the options in args ask for (chimney.guest.tools.options.add_stack_arguments)."""
    family = getattr(args, "family", None)
    window, mss = getattr(args, "window", None), getattr(args, "mss", None)
    if args.stack == "linux":
        if getattr(args, "im", None):
            raise ToolError("--im needs --stack chimney")
        if getattr(args, "rss_queues", None):
            raise ToolError("--rss-queues needs --stack chimney")
        return LinuxStack(family, window, mss)
    from ..bringup import default_bus
    ip6 = args.ip6 if args.ip6 is not None else [DEFAULT_IP6]
    return ChimneyStack(args.bus or default_bus(), args.socket, args.pci,
                        None if family == 6 else args.ip, [] if family == 4 else ip6,
                        offload=getattr(args, "offload", None) or "off",
                        upload_after=getattr(args, "upload_after", None), window=window, mss=mss,
                        im=getattr(args, "im", None), rss_queues=getattr(args, "rss_queues", None))


def describe_error(e: BaseException) -> str:
    """One line for an exception, naming the file an OSError is about."""
    from ..bringup import BringupError
    if isinstance(e, (BringupError, ToolError)):
        return str(e)
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return f"{type(e).__name__}: {e}"
