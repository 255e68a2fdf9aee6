"""The NIC's own management: a control socket beside its vfio-user socket.

chimney device listens on a Unix stream socket (--control PATH, default
<socket>.ctl).  The protocol is one request per line, one JSON object per
reply line:

    link down   -> {"ok": true, "link": "down", "changed": true}
    link up     -> {"ok": true, "link": "up", "changed": true}
    status      -> {"ok": true, "link": "up", "wire": true, "link_changes": 2,
                    "link_drops_tx": 17, "link_drops_rx": 40, "enabled": true,
                    "stats": {"tx_frames": ..., ...}}

A bad request gets {"ok": false, "error": "..."} and changes nothing.  The
socket is served by a thread that only parses and answers: the request itself
runs in the device loop (Nic.call_soon), which owns every piece of NIC state.

chimney device-ctl --control PATH link up|down|status is the command line
client; request() is the same for Python callers (chimney.host.device).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading

log = logging.getLogger("chimney.device.control")

MAX_LINE = 256              # longest request line accepted
CLIENT_TIMEOUT = 5.0        # a client that sends no full line in this long is cut off
LOOP_TIMEOUT = 5.0          # the device loop answers within this long (it polls every 2 ms)


class ControlError(Exception):
    """The control socket could not be reached or refused a request (one clear line)."""


def default_path(vfio_socket: str) -> str:
    return vfio_socket + ".ctl"


class ControlServer:
    """Serves the control socket of one NIC from a daemon thread."""

    def __init__(self, path: str, nic):
        self.path = path
        self.nic = nic
        self._stop = threading.Event()
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)       # it can pull the NIC's cable
        self.sock.listen(4)
        self.sock.settimeout(0.2)   # so close() is noticed
        self.thread = threading.Thread(target=self._serve, name="chimney-control", daemon=True)
        self.thread.start()
        log.info("control socket %s", path)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2.0)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    # -- the thread ------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    self._client(conn)
                except OSError as e:
                    log.info("control client gone: %s", e)

    def _client(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        buf = b""
        while not self._stop.is_set():
            while b"\n" not in buf:
                if len(buf) > MAX_LINE:
                    conn.sendall(_reply({"ok": False, "error": f"request longer than {MAX_LINE} bytes"}))
                    return
                chunk = conn.recv(MAX_LINE + 1)
                if not chunk:
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            conn.sendall(_reply(self.handle(line)))

    def handle(self, line: bytes) -> dict:
        """One request line -> its reply, the work done in the device loop."""
        try:
            words = line.decode("ascii").split()
        except UnicodeDecodeError:
            return {"ok": False, "error": "requests are ASCII"}
        if words == ["status"]:
            action = self.nic.link_status
        elif len(words) == 2 and words[0] == "link" and words[1] in ("up", "down"):
            up = words[1] == "up"

            def action():
                changed = self.nic.set_link(up)
                return {"link": words[1], "changed": changed}
        else:
            return {"ok": False, "error": f"unknown request {line[:64].decode(errors='replace')!r} "
                                          "(link up | link down | status)"}
        return self._in_loop(action)

    def _in_loop(self, action) -> dict:
        done = threading.Event()
        out: dict = {}

        def run():
            try:
                out.update(ok=True, **action())
            except ValueError as e:             # refused (no wire)
                out.update(ok=False, error=str(e))
            except Exception as e:              # a bug of ours: say so, keep serving
                log.exception("control request failed")
                out.update(ok=False, error=f"internal error: {e}")
            finally:
                done.set()

        self.nic.call_soon(run)
        if not done.wait(LOOP_TIMEOUT):
            return {"ok": False, "error": f"the device loop did not answer in {LOOP_TIMEOUT:.0f} s"}
        return out


def _reply(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# -- the client ----------------------------------------------------------------------
def request(path: str, line: str, timeout: float = LOOP_TIMEOUT + 2) -> dict:
    """Send one request line to a NIC's control socket; its reply.  ControlError if
    the socket cannot be reached or the device refused the request."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise ControlError(f"cannot reach the control socket {path}: {e.strerror or e}") from None
        try:
            s.sendall(line.encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise ControlError(f"{path}: the device closed the connection without a reply")
                buf += chunk
        except TimeoutError:
            raise ControlError(f"{path}: no reply in {timeout:.0f} s") from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        rep = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise ControlError(f"{path}: not a chimney control socket (reply is not JSON)") from None
    if not isinstance(rep, dict) or not rep.get("ok"):
        raise ControlError(str(rep.get("error") if isinstance(rep, dict) else rep))
    return rep


# -- `chimney device-ctl` -----------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--control", metavar="PATH", help="the NIC's control socket")
    where.add_argument("--socket", metavar="PATH",
                       help="the NIC's vfio-user socket (its control socket is PATH.ctl)")
    p.add_argument("what", choices=["link", "status"], help="link up|down, or status (JSON)")
    p.add_argument("state", nargs="?", choices=["up", "down"], help="for link: up or down")


def run(args: argparse.Namespace) -> int:
    """0: done; 1: the device could not be reached or refused; 2: usage."""
    prog = "chimney device-ctl"
    if (args.what == "link") != (args.state is not None):
        print(f"{prog}: usage: link up | link down | status", file=sys.stderr)
        return 2
    path = args.control or default_path(args.socket)
    try:
        rep = request(path, "status" if args.what == "status" else f"link {args.state}")
    except ControlError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    if args.what == "status":
        rep.pop("ok", None)
        print(json.dumps(rep, indent=2, sort_keys=True))
    else:
        print(f"link {rep['link']}" + ("" if rep["changed"] else f" (it was {rep['link']} already)"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="chimney device-ctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
