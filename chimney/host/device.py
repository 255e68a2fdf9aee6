"""Start and stop a `chimney device` process, as the harness and scripts do."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ..device import control


def device_options(*, tap: str | None = None, netns: str | None = None, pcap: str | None = None,
                   mac: str | None = None, log_level: str = "INFO", impair: str | None = None,
                   wire_offloads: str | None = None, control_path: str | None = None,
                   snaplen: int | None = None, pci_id: str | None = None) -> list[str]:
    """The `chimney device` options for these settings (after --socket)."""
    opts = ["--log-level", log_level]
    for flag, val in (("--tap", tap), ("--netns", netns), ("--pcap", pcap), ("--mac", mac),
                      ("--impair", impair), ("--wire-offloads", wire_offloads),
                      ("--control", control_path),
                      ("--snaplen", str(snaplen) if snaplen is not None else None),
                      ("--pci-id", pci_id)):
        if val:
            opts += [flag, val]
    return opts


class DeviceProcess:
    """One emulated NIC in its own process; its log goes to a file."""

    def __init__(self, socket_path: str, *, log_path: str | None = None, control_path: str | None = None,
                 **options):
        self.socket = socket_path
        self.control = control_path or control.default_path(socket_path)
        self.log_path = log_path or socket_path + ".log"
        cmd = [sys.executable, "-m", "chimney.device", "--socket", socket_path,
               *device_options(control_path=control_path, **options)]
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()     # a reused log: readiness is this run's line
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while b"listening on" not in self.log_bytes()[self._log_start:]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"device exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > end:
                raise TimeoutError(f"device not ready after {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)

    def log_bytes(self) -> bytes:
        with open(self.log_path, "rb") as f:
            return f.read()

    def log_text(self) -> str:
        return self.log_bytes().decode(errors="replace")

    # -- the NIC's management (chimney.device.control) -------------------------------
    def link(self, up: bool) -> bool:
        """Take the NIC's wire link down or bring it back; False if it already was so.
        Raises control.ControlError (one clear line) if the device refuses or is gone."""
        return control.request(self.control, f"link {'up' if up else 'down'}")["changed"]

    def status(self) -> dict:
        """Link state and counters: link, wire, link_changes, link_drops_tx/rx, enabled, stats."""
        rep = control.request(self.control, "status")
        rep.pop("ok", None)
        return rep

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "DeviceProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if os.path.exists(self.socket):
            os.unlink(self.socket)
