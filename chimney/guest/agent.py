"""The guest agent: runs commands for the host over a virtio-serial port.

Started by the guest's /init when the kernel command line has
``chimney.agent=1`` (see chimney/images/guest-init.sh); the host side is
:mod:`chimney.host.vm`.  Standard library only (the guest's Python 3.13); it
also imports nothing from the chimney package, so the host imports the
framing from here without side effects.

Wire format, both directions: frames of ``MAGIC`` (8 bytes), a big-endian
u32 length, and that many bytes of JSON (ASCII).  JSON text never contains
a NUL byte, so a reader that lost its place (a peer that went away mid-frame:
the guest's writes block while no host is connected, and go out to the next
one) finds the next frame by scanning for ``MAGIC``.  Every request carries an
``id``; its reply repeats it, and readers drop replies that are not theirs.

Requests (one at a time, in order):

``{"op": "ping", "id": ...}``
    -> ``{"id", "ok": true, "pong": true, "pid", "python", "uptime"}``
``{"op": "run", "id": ..., "argv": [...] | "sh": "...", "timeout": s, "stdin": b64, "cwd": dir, "env": {...}}``
    -> ``{"id", "ok": true, "rc", "signal", "timed_out", "stdout": b64, "stderr": b64, "seconds"}``.
    The command runs in a session (process group) of its own, with stdin from
    /dev/null unless ``stdin`` is given; on timeout the whole group is
    killed (SIGKILL) and the reply has ``timed_out`` and whatever output
    came before.  ``rc`` is the exit status, or 128 + signal number.
``{"op": "poweroff", "id": ...}``
    -> ``{"id", "ok": true}``, then the guest syncs and powers off.

A bad request gets ``{"id", "ok": false, "error": "..."}``.  The agent also
powers the guest off on the ACPI power button (QMP ``system_powerdown``).
"""
from __future__ import annotations

import base64
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

MAGIC = b"\x00CHIMNEY"
HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30
PORT_NAME = "chimney.agent"
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
    "PYTHONPATH": "/chimney", "PYTHONDONTWRITEBYTECODE": "1",
}
DEFAULT_CWD = "/chimney"


def encode_frame(msg: dict) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode("ascii")
    return MAGIC + HEADER.pack(len(body)) + body


class FrameReader:
    """Collects bytes and yields the complete, well-formed frames in them,
    skipping whatever is not a frame."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.skipped = 0

    def feed(self, data: bytes) -> list[dict]:
        self.buf += data
        out = []
        while True:
            i = self.buf.find(MAGIC)
            if i < 0:
                keep = len(MAGIC) - 1  # a magic split over two reads
                if len(self.buf) > keep:
                    self.skipped += len(self.buf) - keep
                    del self.buf[:len(self.buf) - keep]
                return out
            if i:
                self.skipped += i
                del self.buf[:i]
            head = len(MAGIC) + HEADER.size
            if len(self.buf) < head:
                return out
            n, = HEADER.unpack_from(self.buf, len(MAGIC))
            if n > MAX_FRAME:
                self._drop_magic()
                continue
            if len(self.buf) < head + n:
                return out
            body = bytes(self.buf[head:head + n])
            try:
                msg = json.loads(body)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._drop_magic()
                continue
            del self.buf[:head + n]
            out.append(msg)

    def _drop_magic(self) -> None:
        self.skipped += 1
        del self.buf[:1]


# ---------------------------------------------------------------- guest side

def log(msg: str) -> None:
    try:
        with open("/proc/uptime") as f:
            up = f.read().split()[0]
    except OSError:
        up = "?"
    sys.stderr.write(f"chimney-agent: {msg} (uptime {up} s)\n")
    sys.stderr.flush()


def find_port(name: str = PORT_NAME, timeout: float = 30.0) -> str:
    """The /dev node of the virtio-serial port called ``name``."""
    end = time.monotonic() + timeout
    while True:
        link = f"/dev/virtio-ports/{name}"
        if os.path.exists(link):
            return link
        for d in glob.glob("/sys/class/virtio-ports/*"):
            try:
                with open(os.path.join(d, "name")) as f:
                    if f.read().strip() == name:
                        dev = "/dev/" + os.path.basename(d)
                        if os.path.exists(dev):
                            return dev
            except OSError:
                pass
        if time.monotonic() > end:
            raise SystemExit(f"chimney-agent: no virtio-serial port named {name!r}")
        time.sleep(0.1)


def poweroff() -> None:
    log("powering off")
    os.sync()
    subprocess.run(["umount", "-l", "/results"], stderr=subprocess.DEVNULL, check=False)
    try:
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("o")
    except OSError as e:
        log(f"sysrq poweroff failed: {e}")
    time.sleep(10)
    os._exit(1)


def watch_power_button() -> None:
    """ACPI power button (QMP system_powerdown) -> power off."""
    ev = struct.Struct("llHHi")  # struct input_event on 64-bit
    EV_KEY, KEY_POWER = 1, 116
    end = time.monotonic() + 20
    paths: list[str] = []
    while not paths and time.monotonic() < end:
        for d in glob.glob("/sys/class/input/event*"):
            try:
                with open(os.path.join(d, "device/name")) as f:
                    if f.read().strip() == "Power Button":
                        paths.append("/dev/input/" + os.path.basename(d))
            except OSError:
                pass
        if not paths:
            time.sleep(0.5)
    if not paths:
        log("no ACPI power button: system_powerdown will not work")
        return

    def watch(path: str) -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                while True:
                    data = f.read(ev.size * 16)
                    for off in range(0, len(data) - ev.size + 1, ev.size):
                        _, _, typ, code, value = ev.unpack_from(data, off)
                        if typ == EV_KEY and code == KEY_POWER and value == 1:
                            log("power button pressed")
                            poweroff()
        except OSError as e:
            log(f"power button {path}: {e}")

    for p in paths:
        threading.Thread(target=watch, args=(p,), daemon=True).start()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def run_command(req: dict) -> dict:
    if "argv" in req:
        argv = req["argv"]
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise ValueError("argv must be a non-empty list of strings")
    elif isinstance(req.get("sh"), str):
        argv = ["/bin/sh", "-c", req["sh"]]
    else:
        raise ValueError("run needs 'argv' or 'sh'")
    timeout = req.get("timeout")
    timeout = None if timeout is None else float(timeout)
    env = dict(DEFAULT_ENV)
    env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
    cwd = req.get("cwd") or (DEFAULT_CWD if os.path.isdir(DEFAULT_CWD) else "/")
    stdin_data = base64.b64decode(req["stdin"]) if req.get("stdin") is not None else None
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                                start_new_session=True)
    except OSError as e:  # like a shell: 127 not found, 126 not executable
        rc = 127 if isinstance(e, FileNotFoundError) else 126
        return {"rc": rc, "signal": None, "timed_out": False, "stdout": "",
                "stderr": _b64(f"{argv[0]}: {e.strerror}\n".encode()), "seconds": 0.0}
    timed_out = False
    try:
        out, err = proc.communicate(stdin_data, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _killpg(proc.pid)
        try:  # what the group wrote before; a stray that left the group may hold the pipes
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = b"", b""
            for f in (proc.stdout, proc.stderr):
                f.close()
            proc.wait()
    finally:
        _killpg(proc.pid)  # leftovers of a command that exited before its children
    rc = proc.returncode
    sig = -rc if rc < 0 else None
    return {"rc": 128 + sig if sig else rc, "signal": sig, "timed_out": timed_out,
            "stdout": _b64(out or b""), "stderr": _b64(err or b""),
            "seconds": round(time.monotonic() - t0, 6)}


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def handle(req: dict) -> tuple[dict, bool]:
    """The reply to one request, and whether to power off after sending it."""
    op = req.get("op")
    base = {"id": req.get("id")}
    try:
        if op == "ping":
            with open("/proc/uptime") as f:
                up = float(f.read().split()[0])
            return {**base, "ok": True, "pong": True, "pid": os.getpid(),
                    "python": sys.version.split()[0], "uptime": up}, False
        if op == "run":
            return {**base, "ok": True, **run_command(req)}, False
        if op == "poweroff":
            return {**base, "ok": True}, True
        raise ValueError(f"unknown op {op!r}")
    except Exception as e:  # the agent must outlive any bad request
        return {**base, "ok": False, "error": f"{type(e).__name__}: {e}"}, False


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)  # blocks while no host is connected
        view = view[n:]


def serve(path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    log(f"ready on {path}")
    reader = FrameReader()
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        if not data:
            # No host connected: read() returns 0 at once (and poll() says
            # HUP), so wait for one by polling slowly.  A request the last
            # host left unfinished is dropped.
            reader = FrameReader()
            time.sleep(0.05)
            continue
        for req in reader.feed(data):
            reply, off = handle(req)
            try:
                write_all(fd, encode_frame(reply))
            except OSError as e:  # the host went away; the next one may come
                log(f"reply to {req.get('id')} lost: {e}")
            if off:
                poweroff()


def main() -> int:
    threading.Thread(target=watch_power_button, daemon=True).start()
    serve(find_port())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
