"""Network namespaces for the Linux peer: made per VM or test, removed after.

Names carry the owner's pid ("chimney-<pid>-<tag>"), so a namespace left by a
killed run is recognised and swept by the next one.  Addresses live only
inside namespaces we made.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

PREFIX = "chimney-"
NETNS_DIR = "/var/run/netns"


class IpError(subprocess.CalledProcessError):
    """An ``ip`` command failed; the message is ip's own, and says when root is needed."""

    def __str__(self) -> str:
        said = (self.stderr or "").strip().splitlines()
        text = f"{' '.join(self.cmd)}: {said[-1] if said else f'exit status {self.returncode}'}"
        if any(w in text for w in ("Operation not permitted", "Permission denied")):
            text = f"needs root (CAP_NET_ADMIN): {text}"
        return text


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and res.returncode:
        raise IpError(res.returncode, res.args, res.stdout, res.stderr)
    return res


def sweep_stale() -> list[str]:
    """Remove namespaces whose owning process is gone."""
    removed = []
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class PeerAddrs:
    """The Linux peer's and the guest's addresses on the NIC's wire."""
    peer4: str = "10.199.0.1"
    guest4: str = "10.199.0.2"
    prefix4: int = 24
    peer6: str = "fd00:c41e::1"
    guest6: str = "fd00:c41e::2"
    prefix6: int = 64


def peer_commands(ns: str, ifname: str, addrs: PeerAddrs) -> list[list[str]]:
    """The `ip` commands that give the Linux peer in namespace `ns` its
    addresses on the wire interface `ifname` (IPv6 without duplicate address
    detection, so the address works at once) and bring it up."""
    return [["ip", "-n", ns, "addr", "add", f"{addrs.peer4}/{addrs.prefix4}", "dev", ifname],
            ["ip", "-n", ns, "addr", "add", f"{addrs.peer6}/{addrs.prefix6}", "dev", ifname, "nodad"],
            ["ip", "-n", ns, "link", "set", ifname, "up"]]


class Netns:
    """A network namespace; `with Netns("t") as ns: ns.run("ip", "addr")`."""

    _seq = 0

    def __init__(self, tag: str = "ns"):
        sweep_stale()
        Netns._seq += 1
        self.name = f"{PREFIX}{os.getpid()}-{tag}{Netns._seq}"
        _ip("netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=check,
                              capture_output=True, text=True, timeout=timeout, **kw)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def wait_link(self, ifname: str, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while _ip("-n", self.name, "link", "show", ifname, check=False).returncode:
            if time.monotonic() > end:
                raise TimeoutError(f"{ifname} did not appear in {self.name}")
            time.sleep(0.05)

    def configure_peer(self, ifname: str, addrs: PeerAddrs = PeerAddrs()) -> None:
        """Put the Linux peer's addresses on the wire interface."""
        self.wait_link(ifname)
        for cmd in peer_commands(self.name, ifname, addrs):
            _ip(*cmd[1:])

    def delete(self) -> None:
        _ip("netns", "del", self.name, check=False)

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()
