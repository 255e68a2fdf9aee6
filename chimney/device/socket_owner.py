"""Who listens on a Unix socket path: so that `chimney device` refuses to take over
(unlink and rebind) a socket another live device is serving, and says which
process holds it."""
from __future__ import annotations

import os
import socket

SO_ACCEPTCON = 0x10000          # /proc/net/unix Flags: a listening socket


def listening(path: str) -> bool:
    """True if something accepts connections at path (a connect attempt succeeds)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def _listening_inodes(path: str) -> set[int]:
    """Inodes of the listening sockets bound to path (this network namespace's view)."""
    found = set()
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & SO_ACCEPTCON:
                    found.add(int(parts[6]))
    except (OSError, ValueError):
        pass
    return found


def holders(path: str) -> list[int]:
    """PIDs of the processes holding a listening socket bound to path (best effort)."""
    want = {f"socket:[{i}]" for i in _listening_inodes(os.path.abspath(path)) | _listening_inodes(path)}
    pids = []
    if not want:
        return pids
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in want:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return sorted(pids)


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"pid {pid}" + (f" ({cmd[:120]})" if cmd else "")
