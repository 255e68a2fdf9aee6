"""A process that cleans up after its owner if the owner dies."""
from __future__ import annotations

import subprocess
import sys

_WATCHDOG = r"""
import os, shutil, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
items = {}
for line in sys.stdin:
    op, _, arg = line.rstrip("\n").partition(" ")
    if op == "disarm":
        sys.exit(0)
    if op.startswith("-"):
        items.pop((op[1:], arg), None)
    else:
        items[(op, arg)] = True
for (op, arg) in items:
    try:
        if op == "pgid":
            os.killpg(int(arg), signal.SIGKILL)
        elif op == "pid":
            os.kill(int(arg), signal.SIGKILL)
    except OSError:
        pass
for (op, arg) in items:
    if op == "netns":
        subprocess.run(["ip", "netns", "del", arg], capture_output=True)
    elif op == "rmtree":
        shutil.rmtree(arg, ignore_errors=True)
"""


class Watchdog:
    """A process that cleans up after its owner if the owner dies: it kills
    the registered processes and deletes namespaces and directories when its
    stdin (a pipe from the owner) reaches EOF without "disarm"."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, text=True)

    def _say(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def add(self, kind: str, arg) -> None:
        self._say(f"{kind} {arg}")

    def remove(self, kind: str, arg) -> None:
        self._say(f"-{kind} {arg}")

    def disarm(self) -> None:
        self._say("disarm")
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
