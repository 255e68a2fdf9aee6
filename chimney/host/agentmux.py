"""The ``chimney vm`` supervisor's agent multiplexer.

QEMU serves the guest agent's virtio-serial port to one client at a time;
a second client waits, silently, until the first lets go.  The supervisor
holds that one connection and serves a unix socket of its own that speaks the
same frames (:mod:`chimney.guest.agent`): each client's requests go to the
agent as they come, each reply back to the client whose request it answers
(by id).  So any number of ``chimney vm run`` / ``status`` / ``logs`` talk to
the guest at once, and a limit reached is an "agent busy" reply, not a wait.
"""
from __future__ import annotations

import os
import socket
import threading

from chimney.guest.agent import FrameReader, encode_frame

MAX_CLIENTS = 64


class AgentMux:
    """Serve ``path``; ``client()`` returns the current AgentClient of the
    agent (reconnecting if needed) or raises."""

    def __init__(self, path: str | os.PathLike, client):
        self.path = os.fspath(path)
        self._client = client
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(16)
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="agent-mux").start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= MAX_CLIENTS
                if not full:
                    self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, full), daemon=True).start()

    def _serve(self, conn: socket.socket, full: bool) -> None:
        send_lock = threading.Lock()

        def send(msg: dict) -> None:
            try:
                with send_lock:
                    conn.sendall(encode_frame(msg))
            except OSError:
                pass  # that client went away; its replies are dropped

        # replies go out from the agent's reader thread: a client that does
        # not read must not hold up the others for long
        conn.settimeout(30)
        reader = FrameReader()
        try:
            while True:
                try:
                    data = conn.recv(1 << 20)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not data:
                    break
                for req in reader.feed(data):
                    rid = req.get("id")
                    if full:
                        send({"id": rid, "ok": False, "busy": True,
                              "error": f"agent busy: {MAX_CLIENTS} clients connected (the limit)"})
                        continue
                    self._forward(req, send)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _forward(self, req: dict, send) -> None:
        rid = req.get("id")

        def answer(reply: dict | None) -> None:
            send(reply if reply is not None else
                 {"id": rid, "ok": False, "error": "the agent connection ended (QEMU gone?)"})

        try:
            self._client().submit(req, answer)
        except Exception as e:  # noqa: BLE001 - the client gets one line, the supervisor lives on
            answer({"id": rid, "ok": False, "error": str(e).splitlines()[0]})

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
