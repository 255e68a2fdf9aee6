"""Wire backends: a TAP interface (optionally inside a network namespace) and
a pcap writer that records both directions."""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
import subprocess

log = logging.getLogger("chimney.device.wire")

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


class Tap:
    """A TAP interface; frames in and out through a non-blocking fd."""

    def __init__(self, ifname: str, netns: str | None = None, mtu: int = 1500):
        self.ifname = ifname
        self.netns = netns
        if len(ifname.encode()) >= 16:
            raise ValueError(f"interface name too long: {ifname!r}")
        own = None
        if netns:
            target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            own = os.open("/proc/self/ns/net", os.O_RDONLY)
            _setns(target)
            os.close(target)
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            ifr = struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        finally:
            if own is not None:
                _setns(own)
                os.close(own)
        ns = ["-n", netns] if netns else []
        subprocess.run(["ip", *ns, "link", "set", "dev", ifname, "mtu", str(mtu), "up"],
                       check=True, capture_output=True)
        log.info("TAP %s up%s", ifname, f" in netns {netns}" if netns else "")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PcapWriter:
    """A classic pcap file (microsecond stamps, Ethernet); the C fast path
    appends records to its fd, so frames are written as they cross the wire."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.write(self.fd, struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
