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

Requests (each answered from a thread of its own, so several run at once):

``{"op": "ping", "id": ...}``
    -> ``{"id", "ok": true, "pong": true, "pid", "python", "uptime", "jobs"}``
``{"op": "exec", "id": ..., "argv": [...] | "sh": "...", "timeout": s, "stdin": b64, "cwd": dir, "env": {...}, "flow": bool}``
    -> ``{"id", "ok": true, "job": N, "pid"}`` at once (the asynchronous
    model of qemu-guest-agent's guest-exec).  The command runs in a session
    (process group) of its own, with stdin from /dev/null unless ``stdin``
    is given; after ``timeout`` s the whole group is killed (SIGKILL).  A
    program that cannot be started gives ``"job": null`` and
    ``"not_started"``: a finished result like a shell's (rc 127 / 126).
``{"op": "exec-status", "id": ..., "job": N, "offsets": [o_out, o_err], "wait": s, "forget": bool}``
    -> ``{"id", "ok": true, "job", "pid", "running", "stdout": b64, "stderr": b64, "offsets",
    "complete"}``, plus ``"rc", "signal", "timed_out", "seconds"`` once the
    command has ended.  The output is the bytes from ``offsets`` on; the
    reply's ``offsets`` is where the next call starts.  It waits up to
    ``wait`` s (at most 60) for new output or the end, so a host polling in
    a loop sees output as the command writes it.  ``complete``: ended and
    all output delivered; with ``forget`` the agent then drops the job.
    ``rc`` is the exit status, or 128 + signal number.  A ``flow`` job is
    one a host reads to the end: what it has (the bytes before its offsets)
    is freed, and the command's pipes wait while 16 MiB of a stream are
    unread, so nothing is lost (one nobody polls for 60 s is treated as
    detached from then on).  Other jobs (detached) keep the last 16 MiB
    of each stream (``dropped`` counts bytes lost before an offset).  The
    agent keeps the last 64 finished jobs.
``{"op": "exec-kill", "id": ..., "job": N, "signal": 15}`` -> ``{"id", "ok": true, "job", "running"}``
``{"op": "exec-list", "id": ...}`` -> ``{"id", "ok": true, "jobs": [{"job", "pid", "argv", "running", "rc", "seconds"}]}``
``{"op": "run", "id": ..., <as exec>}``
    -> ``{"id", "ok": true, "rc", "signal", "timed_out", "stdout": b64, "stderr": b64, "seconds"}``
    when the command has ended (exec and exec-status in one).
``{"op": "poweroff", "id": ...}``
    -> ``{"id", "ok": true}``, then the guest syncs and powers off.

A bad request gets ``{"id", "ok": false, "error": "..."}``; one over a limit
(32 commands running, 128 requests in progress) ``{"id", "ok": false,
"busy": true, "error": "agent busy: ..."}``.  The agent also powers the guest
off on the ACPI power button (QMP ``system_powerdown``).
"""
from __future__ import annotations

import base64
import glob
import json
import os
import select
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
    "PYTHONUNBUFFERED": "1",  # the host sees a guest program's output as it prints it
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


MAX_RUNNING = 32          # commands running at once; one more is refused "agent busy"
MAX_REQUESTS = 128        # requests in progress at once (each has a thread)
MAX_FINISHED = 64         # finished jobs kept for exec-status; the oldest go first
KEEP_BYTES = 16 << 20     # output kept per stream and job; older bytes are dropped
REPLY_BYTES = 4 << 20     # output per stream in one exec-status reply
STRAY_GRACE = 5.0         # after a timeout kill: how long strays may hold the pipes
FLOW_ABANDON = 60.0       # a flow job whose host has not asked for this long: keep its tail, go on


class Busy(Exception):
    """A limit of the agent is reached; the request was not carried out."""


class NoSuchJob(LookupError):
    """exec-status / exec-kill of a job the agent does not have (any more)."""


class Job:
    """One command: its process group, its output (kept from ``base`` on,
    per stream) and, once finished, its exit status."""

    def __init__(self, number: int, argv: list[str], proc: subprocess.Popen, timeout: float | None,
                 stdin_data: bytes | None, *, flow: bool = False, keep_bytes: int | None = KEEP_BYTES):
        self.number, self.argv, self.proc, self.timeout = number, argv, proc, timeout
        # flow: a host reads it all (exec-status offsets say how far): what it has is
        # freed, and the pipes wait while KEEP_BYTES are unread; else the oldest
        # bytes past keep_bytes go (None: keep everything)
        self.flow, self.keep_bytes = flow, keep_bytes
        self.last_poll = time.monotonic()
        self.pid = proc.pid
        self.t0 = time.monotonic()
        self.cond = threading.Condition()
        self.data = {"stdout": bytearray(), "stderr": bytearray()}
        self.base = {"stdout": 0, "stderr": 0}   # offset of data[...][0] in the whole stream
        self.done = False
        self.rc: int | None = None
        self.signal: int | None = None
        self.timed_out = False
        self.seconds = 0.0
        self.finished_at = 0.0
        if stdin_data is not None:
            threading.Thread(target=self._feed, args=(stdin_data,), daemon=True).start()
        threading.Thread(target=self._supervise, daemon=True, name=f"job{number}").start()

    def _feed(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
        except OSError:  # the command exited without reading it all
            pass
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _append(self, stream: str, chunk: bytes) -> None:
        with self.cond:
            buf = self.data[stream]
            buf += chunk
            if not self.flow and self.keep_bytes is not None and len(buf) > self.keep_bytes:
                drop = len(buf) - self.keep_bytes
                del buf[:drop]
                self.base[stream] += drop
            self.cond.notify_all()

    def _supervise(self) -> None:
        """Read both pipes until EOF and reap the process, like
        communicate(); on timeout kill the whole group."""
        pipes = {"stdout": self.proc.stdout, "stderr": self.proc.stderr}
        for pipe in pipes.values():
            os.set_blocking(pipe.fileno(), False)
        deadline = None if self.timeout is None else self.t0 + self.timeout
        give_up = None  # after a timeout kill: stop waiting for strays holding the pipes
        while pipes:
            now = time.monotonic()
            if deadline is not None and now >= deadline and not self.timed_out:
                self.timed_out = True
                _killpg(self.pid)
                give_up = now + STRAY_GRACE
            if give_up is not None and now >= give_up:
                break
            limit = give_up if give_up is not None else deadline
            wait = None if limit is None else max(0.0, limit - now)
            with self.cond:
                readable = [s for s in pipes if not self.flow or len(self.data[s]) < KEEP_BYTES]
                if len(readable) < len(pipes) and now - self.last_poll > FLOW_ABANDON:
                    self.flow = False  # its host is gone: keep the tail, as for a detached job
                    continue
                if not readable:  # the host has not read what is there: wait for it
                    self.cond.wait(0.5 if wait is None else min(wait, 0.5))
                    continue
            if len(readable) < len(pipes):
                wait = 0.2 if wait is None else min(wait, 0.2)
            fds = {pipes[s].fileno(): s for s in readable}
            ready, _, _ = select.select(list(fds), [], [], wait)
            for fd in ready:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if chunk:
                    self._append(fds[fd], chunk)
                else:
                    del pipes[fds[fd]]
        while True:  # the pipes are closed; the process may still run
            remaining = None if deadline is None or self.timed_out else deadline - time.monotonic()
            try:
                self.proc.wait(remaining if remaining is None else max(0.0, remaining))
                break
            except subprocess.TimeoutExpired:
                self.timed_out = True
                _killpg(self.pid)
        _killpg(self.pid)  # leftovers of a command that exited before its children
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        rc = self.proc.returncode
        with self.cond:
            self.signal = -rc if rc < 0 else None
            self.rc = 128 + self.signal if self.signal else rc
            self.seconds = round(time.monotonic() - self.t0, 6)
            self.finished_at = time.monotonic()
            self.done = True
            self.cond.notify_all()

    def status(self, offsets, wait: float) -> dict:
        """Output from ``offsets`` (stdout, stderr) on, waiting up to ``wait``
        s for some (or for the end); ``offsets`` in the reply is where the
        next call starts."""
        offsets = [int(o) for o in (offsets or (0, 0))]
        end = time.monotonic() + max(0.0, min(float(wait), 60.0))
        with self.cond:
            self.last_poll = time.monotonic()
            if self.flow:
                self._release(offsets)
            while not self.done and not self._has_news(offsets):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            reply: dict = {"job": self.number, "pid": self.pid, "running": not self.done}
            dropped = 0
            complete = True
            for i, stream in enumerate(("stdout", "stderr")):
                base, buf = self.base[stream], self.data[stream]
                start = min(max(offsets[i], base), base + len(buf))  # past the end: from the end
                dropped += max(0, start - offsets[i])
                chunk = bytes(buf[start - base:start - base + REPLY_BYTES])
                reply[stream] = _b64(chunk)
                offsets[i] = start + len(chunk)
                complete = complete and offsets[i] == base + len(buf)
            reply["offsets"] = offsets
            if dropped:
                reply["dropped"] = dropped
            if self.done:
                reply.update(rc=self.rc, signal=self.signal, timed_out=self.timed_out, seconds=self.seconds)
            reply["complete"] = self.done and complete  # nothing more will come
            return reply

    def _release(self, offsets) -> None:
        """Free what the host has (the bytes before its offsets); the pipes may go on."""
        for i, stream in enumerate(("stdout", "stderr")):
            n = min(offsets[i] - self.base[stream], len(self.data[stream]))
            if n > 0:
                del self.data[stream][:n]
                self.base[stream] += n
                self.cond.notify_all()

    def _has_news(self, offsets) -> bool:
        return any(offsets[i] < self.base[s] + len(self.data[s]) for i, s in enumerate(("stdout", "stderr")))

    def describe(self) -> dict:
        return {"job": self.number, "pid": self.pid, "argv": self.argv, "running": not self.done,
                "rc": self.rc, "seconds": self.seconds if self.done else round(time.monotonic() - self.t0, 3)}


class Jobs:
    """The agent's commands, by job number."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[int, Job] = {}
        self.next = 1

    def start(self, req: dict, keep_bytes: int | None = KEEP_BYTES) -> Job:
        argv = _argv(req)
        timeout = req.get("timeout")
        timeout = None if timeout is None else float(timeout)
        env = dict(DEFAULT_ENV)
        env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
        cwd = req.get("cwd") or (DEFAULT_CWD if os.path.isdir(DEFAULT_CWD) else "/")
        stdin_data = base64.b64decode(req["stdin"]) if req.get("stdin") is not None else None
        with self.lock:
            running = sum(1 for j in self.jobs.values() if not j.done)
            if running >= MAX_RUNNING:
                raise Busy(f"agent busy: {running} commands running (the limit is {MAX_RUNNING})")
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                                    start_new_session=True)
            job = Job(self.next, argv, proc, timeout, stdin_data, flow=bool(req.get("flow")),
                      keep_bytes=keep_bytes)
            self.jobs[job.number] = job
            self.next += 1
            self._evict()
        return job

    def _evict(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.done), key=lambda j: j.finished_at)
        for j in finished[:max(0, len(finished) - MAX_FINISHED)]:
            del self.jobs[j.number]

    def get(self, number) -> Job:
        try:
            number = int(number)
        except (TypeError, ValueError):
            raise NoSuchJob(f"bad job number {number!r}") from None
        with self.lock:
            job = self.jobs.get(number)
        if job is None:
            raise NoSuchJob(f"no job {number} in the guest (finished jobs are kept until {MAX_FINISHED} "
                            "newer ones finish)")
        return job

    def forget(self, number: int) -> None:
        with self.lock:
            self.jobs.pop(number, None)

    def list(self) -> list[dict]:
        with self.lock:
            return [j.describe() for j in sorted(self.jobs.values(), key=lambda j: j.number)]


JOBS = Jobs()


def _argv(req: dict) -> list[str]:
    if "argv" in req:
        argv = req["argv"]
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise ValueError("argv must be a non-empty list of strings")
        return argv
    if isinstance(req.get("sh"), str):
        return ["/bin/sh", "-c", req["sh"]]
    raise ValueError("run needs 'argv' or 'sh'")


def _not_started(argv: list[str], e: OSError) -> dict:
    """Like a shell: 127 not found, 126 not executable."""
    rc = 127 if isinstance(e, FileNotFoundError) else 126
    return {"rc": rc, "signal": None, "timed_out": False, "stdout": "",
            "stderr": _b64(f"{argv[0]}: {e.strerror}\n".encode()), "seconds": 0.0}


def exec_start(req: dict) -> dict:
    try:
        job = JOBS.start(req)
    except OSError as e:
        return {"job": None, "pid": None, "not_started": _not_started(_argv(req), e)}
    return {"job": job.number, "pid": job.pid}


def exec_status(req: dict) -> dict:
    job = JOBS.get(req.get("job"))
    reply = job.status(req.get("offsets"), req.get("wait") or 0)
    if reply["complete"] and req.get("forget"):
        JOBS.forget(job.number)
    return reply


def exec_kill(req: dict) -> dict:
    job = JOBS.get(req.get("job"))
    sig = int(req.get("signal") or signal.SIGTERM)
    if not job.done:
        try:
            os.killpg(job.pid, sig)
        except ProcessLookupError:
            pass
    return {"job": job.number, "running": not job.done}


def run_command(req: dict) -> dict:
    """The blocking ``run``: a job, waited for, all its output in one reply."""
    try:
        job = JOBS.start({**req, "flow": False}, keep_bytes=None)
    except OSError as e:
        return _not_started(_argv(req), e)
    with job.cond:
        while not job.done:
            job.cond.wait()
    out = {"stdout": _b64(bytes(job.data["stdout"])), "stderr": _b64(bytes(job.data["stderr"]))}
    JOBS.forget(job.number)
    return {"rc": job.rc, "signal": job.signal, "timed_out": job.timed_out, **out, "seconds": job.seconds}


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
                    "python": sys.version.split()[0], "uptime": up, "jobs": len(JOBS.list())}, False
        if op == "run":
            return {**base, "ok": True, **run_command(req)}, False
        if op == "exec":
            return {**base, "ok": True, **exec_start(req)}, False
        if op == "exec-status":
            return {**base, "ok": True, **exec_status(req)}, False
        if op == "exec-kill":
            return {**base, "ok": True, **exec_kill(req)}, False
        if op == "exec-list":
            return {**base, "ok": True, "jobs": JOBS.list()}, False
        if op == "poweroff":
            return {**base, "ok": True}, True
        raise ValueError(f"unknown op {op!r}")
    except Busy as e:
        return {**base, "ok": False, "busy": True, "error": str(e)}, False
    except NoSuchJob as e:
        return {**base, "ok": False, "no_job": True, "error": str(e)}, False
    except Exception as e:  # the agent must outlive any bad request
        return {**base, "ok": False, "error": f"{type(e).__name__}: {e}"}, False


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)  # blocks while no host is connected
        view = view[n:]


class Server:
    """Reads requests from the port and answers each from a thread of its
    own, so a long command or a waiting exec-status holds up nothing else."""

    def __init__(self, fd: int):
        self.fd = fd
        self.write_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_REQUESTS)

    def reply(self, msg: dict, req_id) -> None:
        try:
            with self.write_lock:
                write_all(self.fd, encode_frame(msg))
        except OSError as e:  # the host went away; the next one may come
            log(f"reply to {req_id} lost: {e}")

    def dispatch(self, req: dict) -> None:
        if not self.slots.acquire(blocking=False):
            self.reply({"id": req.get("id"), "ok": False, "busy": True,
                        "error": f"agent busy: {MAX_REQUESTS} requests in progress (the limit)"}, req.get("id"))
            return
        threading.Thread(target=self._answer, args=(req,), daemon=True).start()

    def _answer(self, req: dict) -> None:
        try:
            reply, off = handle(req)
            self.reply(reply, req.get("id"))
        finally:
            self.slots.release()
        if off:
            poweroff()


def serve(path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    log(f"ready on {path}")
    server = Server(fd)
    reader = FrameReader()
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        if not data:
            # No host connected: read() returns 0 at once (and poll() says
            # HUP), so wait for one by polling slowly.  A partial request
            # the last host left is dropped; running jobs go on.
            reader = FrameReader()
            time.sleep(0.05)
            continue
        for req in reader.feed(data):
            server.dispatch(req)


def main() -> int:
    threading.Thread(target=watch_power_button, daemon=True).start()
    serve(find_port())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
