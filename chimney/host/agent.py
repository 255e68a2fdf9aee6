"""The host side of the guest agent's command channel (a virtio-serial port
that QEMU serves as a unix socket): one request, its reply, byte-exact."""
from __future__ import annotations

import base64
import os
import socket
import time
import uuid
from typing import Sequence

from chimney.guest.agent import FrameReader, encode_frame
from chimney.host.qemu import GuestError, GuestTimeout


class AgentError(GuestError):
    """The agent connection broke or the agent refused a request."""


class CommandTimeout(GuestTimeout):
    """A guest command ran past its timeout; its process group was killed.
    ``stdout``/``stderr`` hold what it wrote before."""

    def __init__(self, message: str, *, stdout: bytes = b"", stderr: bytes = b"", **kw):
        self.stdout, self.stderr = stdout, stderr
        super().__init__(message, **kw)


class AgentClient:
    """One connection to the agent's chardev socket (QEMU serves one client
    at a time).  Requests carry a random id; replies that are not ours (left
    over from an earlier client) are dropped."""

    def __init__(self, path: str | os.PathLike, timeout: float = 5.0):
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            raise
        self.reader = FrameReader()

    def send(self, msg: dict) -> str:
        msg = dict(msg)
        msg.setdefault("id", uuid.uuid4().hex)
        self.sock.settimeout(30)
        self.sock.sendall(encode_frame(msg))
        return msg["id"]

    def receive(self, rid: str, deadline: float | None, alive=None) -> dict | None:
        """Wait for the reply with id ``rid``; None when ``deadline`` passes.
        ``alive()`` returning False (QEMU gone) ends the wait with an error."""
        pending: list[dict] = []
        while True:
            for msg in pending:
                if msg.get("id") == rid:
                    return msg
            slice_ = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if slice_ <= 0:
                return None
            self.sock.settimeout(slice_)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                if alive is not None and not alive():
                    raise ConnectionError("QEMU exited")
                pending = []
                continue
            if not data:
                raise ConnectionError("agent socket closed")
            pending = self.reader.feed(data)

    def request(self, msg: dict, timeout: float | None, alive=None) -> dict | None:
        rid = self.send(msg)
        return self.receive(rid, None if timeout is None else time.monotonic() + timeout, alive)

    def close(self) -> None:
        self.sock.close()


def run_via_agent(agent_socket: str | os.PathLike, cmd: str | Sequence[str], *, timeout: float | None = 60,
                  input: bytes | None = None, cwd: str | None = None, env: dict | None = None,
                  client: AgentClient | None = None, alive=None, grace: float = 30.0) -> dict:
    """Send one run request; the agent's reply (raw: base64 output, ``timed_out``).
    Raises TimeoutError when no reply comes within ``timeout + grace``."""
    req: dict = {"op": "run", "timeout": timeout}
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
    own = client is None
    c = client or AgentClient(agent_socket)
    try:
        reply = c.request(req, None if timeout is None else timeout + grace, alive)
    finally:
        if own:
            c.close()
    if reply is None:
        raise TimeoutError(f"no reply from the guest agent within {timeout}+{grace} s")
    return reply
