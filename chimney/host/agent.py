"""The host side of the guest agent's command channel (a virtio-serial port
that QEMU serves as a unix socket, or the ``chimney vm`` supervisor's
multiplexer socket, which speaks the same frames): requests from any number
of threads on one connection, replies matched by id, and guest commands as
jobs (:class:`GuestJob`) whose output arrives while they run."""
from __future__ import annotations

import base64
import os
import signal as signals
import socket
import threading
import time
import uuid
from typing import Callable, Iterator, Sequence

from chimney.guest.agent import FrameReader, encode_frame
from chimney.host.qemu import GuestError, GuestResult, GuestTimeout

POLL_WAIT = 1.0     # seconds one exec-status may wait in the guest for output
REPLY_GRACE = 30.0  # how much longer than that a reply may take (a loaded TCG guest)


class AgentError(GuestError):
    """The agent connection broke or the agent refused a request."""


class AgentBusy(AgentError):
    """A limit of the agent was reached (commands running, requests in
    progress); nothing was started."""


class CommandTimeout(GuestTimeout):
    """A guest command ran past its timeout; its process group was killed.
    ``stdout``/``stderr`` hold what it wrote before."""

    def __init__(self, message: str, *, stdout: bytes = b"", stderr: bytes = b"", **kw):
        self.stdout, self.stderr = stdout, stderr
        super().__init__(message, **kw)


class _Pending:
    __slots__ = ("event", "reply", "callback")

    def __init__(self, callback=None):
        self.event = threading.Event()
        self.reply: dict | None = None
        self.callback = callback


class AgentClient:
    """One connection to the agent's socket, shared by threads: a reader
    thread hands each reply to the request with its id (replies that are not
    ours, left over from an earlier client, are dropped)."""

    def __init__(self, path: str | os.PathLike, timeout: float = 5.0):
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self.closed: str | None = None  # why the connection ended
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="agent-reader")
        self._reader.start()

    def _read_loop(self) -> None:
        reader = FrameReader()
        why = "agent socket closed"
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                for msg in reader.feed(data):
                    with self._lock:
                        p = self._pending.pop(msg.get("id"), None)
                    if p is not None:
                        self._deliver(p, msg)
        except OSError as e:
            why = f"agent socket: {e}"
        with self._lock:
            self.closed = self.closed or why
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            self._deliver(p, None)

    @staticmethod
    def _deliver(p: _Pending, msg: dict | None) -> None:
        p.reply = msg
        p.event.set()
        if p.callback is not None:
            p.callback(msg)

    def submit(self, msg: dict, callback: Callable[[dict | None], None] | None = None) -> tuple[str, _Pending]:
        """Send ``msg``; ``callback(reply)`` runs in the reader thread (None:
        the connection ended first)."""
        msg = dict(msg)
        msg.setdefault("id", uuid.uuid4().hex)
        p = _Pending(callback)
        with self._lock:
            if self.closed:
                raise ConnectionError(self.closed)
            self._pending[msg["id"]] = p
        try:
            with self._send_lock:
                self.sock.sendall(encode_frame(msg))
        except OSError:
            with self._lock:
                self._pending.pop(msg["id"], None)
            raise
        return msg["id"], p

    def request(self, msg: dict, timeout: float | None, alive=None) -> dict | None:
        """Send ``msg`` and wait for its reply; None when ``timeout`` passes.
        ``alive()`` returning False (QEMU gone) ends the wait with an error."""
        rid, p = self.submit(msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not p.event.is_set():
            slice_ = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if slice_ <= 0:
                with self._lock:
                    self._pending.pop(rid, None)
                return None
            if p.event.wait(slice_):
                break
            if alive is not None and not alive():
                raise ConnectionError("QEMU exited")
        if p.reply is None:
            raise ConnectionError(self.closed or "agent connection closed")
        return p.reply

    def close(self) -> None:
        with self._lock:
            self.closed = self.closed or "closed by us"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def exec_request(cmd: str | Sequence[str], *, timeout: float | None, input: bytes | None = None,
                 cwd: str | None = None, env: dict | None = None, op: str = "exec", flow: bool = False) -> dict:
    """The agent request that starts ``cmd`` (a string: /bin/sh -c; a list:
    argv); ``flow``: we read all its output (the agent holds the command
    back rather than drop any)."""
    req: dict = {"op": op, "timeout": timeout}
    if flow:
        req["flow"] = True
    if isinstance(cmd, str):
        req["sh"] = cmd
    else:
        req["argv"] = list(cmd)
    if input is not None:
        req["stdin"] = base64.b64encode(input).decode()
    if cwd:
        req["cwd"] = cwd
    if env:
        req["env"] = env
    return req


class GuestJob:
    """A command running in the guest (``Vm.start(cmd)``, ``chimney vm run
    --detach``): poll it, read its output as it comes, wait for it, kill it.

    ``call(msg, timeout)`` sends one agent request and returns the reply
    (raising AgentError).  ``stdout``/``stderr`` hold the output read so far;
    ``rc`` is None while the command runs."""

    def __init__(self, call: Callable[[dict, float], dict], number: int | None, pid: int | None,
                 cmd: str | Sequence[str], timeout: float | None, *, forget: bool = True,
                 finished: dict | None = None, on_end: Callable[["GuestJob"], None] | None = None,
                 error_context: dict | None = None):
        self._call, self.number, self.pid, self.cmd, self.timeout = call, number, pid, cmd, timeout
        self.forget = forget
        self.offsets = [0, 0]
        self.stdout, self.stderr = b"", b""
        self.rc: int | None = None
        self.signal: int | None = None
        self.timed_out = False
        self.seconds: float | None = None
        self.complete = False
        self.dropped = 0
        self._on_end = on_end
        self._ctx = error_context or {}
        self.t0 = time.monotonic()
        if finished is not None:  # not started (program not found): already a result
            self._absorb({**finished, "complete": True, "offsets": [0, 0]})

    def __repr__(self) -> str:
        state = "running" if self.rc is None else f"rc={self.rc}"
        return f"<GuestJob {self.number} pid {self.pid} {state} {self.cmd!r}>"

    @property
    def done(self) -> bool:
        return self.complete

    def _absorb(self, reply: dict) -> list[tuple[str, bytes]]:
        got = []
        for stream in ("stdout", "stderr"):
            data = base64.b64decode(reply.get(stream) or "")
            if data:
                setattr(self, stream, getattr(self, stream) + data)
                got.append((stream, data))
        self.offsets = list(reply.get("offsets", self.offsets))
        self.dropped += reply.get("dropped", 0)
        if "rc" in reply:
            self.rc, self.signal = reply["rc"], reply.get("signal")
            self.timed_out, self.seconds = bool(reply.get("timed_out")), reply.get("seconds")
        if reply.get("complete") and not self.complete:
            self.complete = True
            if self._on_end is not None:
                self._on_end(self)
        return got

    def poll(self, wait: float = 0.0) -> list[tuple[str, bytes]]:
        """New output as ``[(stream, bytes)]``, waiting up to ``wait`` s for
        some or for the end (``done`` is then True)."""
        if self.complete:
            return []
        wait = max(0.0, min(wait, 60.0))
        reply = self._call({"op": "exec-status", "job": self.number, "offsets": self.offsets,
                            "wait": wait, "forget": self.forget}, wait + REPLY_GRACE)
        return self._absorb(reply)

    def chunks(self, poll_wait: float = POLL_WAIT) -> Iterator[tuple[str, bytes]]:
        """The output as it arrives, ``(stream, bytes)``, until the command ends."""
        while not self.complete:
            yield from self.poll(poll_wait)

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for the end; GuestResult(rc, stdout, stderr).  Raises
        CommandTimeout when the guest killed it after its own timeout, and
        TimeoutError when ``timeout`` passes here first (it keeps running)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.complete:
            left = POLL_WAIT if end is None else min(POLL_WAIT, end - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"guest job {self.number} still runs after {timeout:g} s: {self.cmd!r}")
            self.poll(left)
        return self.result()

    def result(self) -> GuestResult:
        if not self.complete:
            raise RuntimeError(f"guest job {self.number} has not ended")
        if self.timed_out:
            raise CommandTimeout(f"guest command did not finish within {self.timeout:g} s: {self.cmd!r}",
                                 stdout=self.stdout, stderr=self.stderr, **self._ctx)
        return GuestResult(self.rc, self.stdout, self.stderr)

    def kill(self, sig: int = signals.SIGKILL) -> None:
        """Send ``sig`` to the command's process group (no-op once it ended)."""
        if self.number is None or self.complete:
            return
        self._call({"op": "exec-kill", "job": self.number, "signal": int(sig)}, REPLY_GRACE)


def call_checked(client: AgentClient, msg: dict, timeout: float | None, *, alive=None,
                 workdir=None, what: str = "") -> dict:
    """One request; the reply when ``ok``, else AgentBusy / AgentError."""
    ctx = {"workdir": workdir} if workdir is not None else {"workdir": client.path}
    label = f"{what}: " if what else ""
    try:
        reply = client.request(msg, timeout, alive)
    except (OSError, ConnectionError) as e:
        raise AgentError(f"{label}{e}", **ctx) from None
    if reply is None:
        raise AgentError(f"{label}no reply from the guest agent within {timeout:g} s", **ctx)
    if not reply.get("ok"):
        cls = AgentBusy if reply.get("busy") else AgentError
        raise cls(f"{label}{reply.get('error')}", **ctx)
    return reply


def start_job(client: AgentClient, cmd: str | Sequence[str], *, timeout: float | None = None,
              input: bytes | None = None, cwd: str | None = None, env: dict | None = None,
              forget: bool = True, alive=None, workdir=None, on_end=None) -> GuestJob:
    """Start ``cmd`` in the guest; the job returns at once."""
    ctx = {"workdir": workdir} if workdir is not None else {"workdir": client.path}

    def call(msg: dict, t: float) -> dict:
        return call_checked(client, msg, t, alive=alive, workdir=workdir, what=f"guest command {cmd!r}")

    reply = call(exec_request(cmd, timeout=timeout, input=input, cwd=cwd, env=env, flow=forget), REPLY_GRACE)
    return GuestJob(call, reply.get("job"), reply.get("pid"), cmd, timeout, forget=forget,
                    finished=reply.get("not_started"), on_end=on_end, error_context=ctx)


def run_via_agent(agent_socket: str | os.PathLike, cmd: str | Sequence[str], *, timeout: float | None = 60,
                  input: bytes | None = None, cwd: str | None = None, env: dict | None = None,
                  client: AgentClient | None = None, alive=None, grace: float = REPLY_GRACE) -> dict:
    """Send one blocking ``run`` request; the agent's reply (raw: base64
    output, ``timed_out``).  Raises TimeoutError when no reply comes within
    ``timeout + grace``."""
    own = client is None
    c = client or AgentClient(agent_socket)
    try:
        reply = c.request(exec_request(cmd, timeout=timeout, input=input, cwd=cwd, env=env, op="run"),
                          None if timeout is None else timeout + grace, alive)
    finally:
        if own:
            c.close()
    if reply is None:
        raise TimeoutError(f"no reply from the guest agent within {timeout}+{grace} s")
    return reply
