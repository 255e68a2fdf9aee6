"""Wire backends: a TAP interface (optionally inside a network namespace) and
a pcapng writer that records both directions.

With offloads on (the default) the TAP carries a virtio-net header in front of
every frame, as QEMU's virtio NIC does: the device writes TCP super-segments
of up to 64 KB that the kernel segments (TSO) and reads the peer's segments
whole (the kernel's GSO/GRO), with checksums the kernel vouches for or leaves
to complete.  chimney/device/wire.c does the per-frame work."""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
import subprocess

from ._fastpath import lib

log = logging.getLogger("chimney.device.wire")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# What the device can take from the kernel: partial checksums (CSUM) and TCP
# super-segments over IPv4 and IPv6 (TSO4/TSO6; they need CSUM).  The kernel
# takes the device's super-segments whatever these say.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
WIRE_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
# The legacy virtio_net_hdr (10 bytes): the 12-byte v1 header only adds
# num_buffers, for mergeable receive buffers, which a TAP read never uses.
VNET_HDR_LEN = 10
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


class Tap:
    """A TAP interface; frames in and out through a non-blocking fd.

    offloads: open it with the virtio-net header and ask for TUNSETOFFLOAD;
    if the kernel refuses, the TAP is opened again without them (logged once)
    and `offloads` says which one the device got."""

    def __init__(self, ifname: str, netns: str | None = None, mtu: int = 1500,
                 offloads: bool = True):
        self.ifname = ifname
        self.netns = netns
        self.fd = -1
        if len(ifname.encode()) >= 16:
            raise ValueError(f"interface name too long: {ifname!r}")
        own = None
        if netns:
            target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
            own = os.open("/proc/self/ns/net", os.O_RDONLY)
            _setns(target)
            os.close(target)
        try:
            self.offloads = False
            if offloads:
                self.fd = self._open(IFF_VNET_HDR)       # no rights: that error is the user's
                try:
                    fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                    fcntl.ioctl(self.fd, TUNSETOFFLOAD, WIRE_OFFLOADS)
                    self.offloads = True
                except OSError as e:
                    log.warning("TAP %s: the kernel refused segmentation offload (%s); "
                                "running without it", ifname, e.strerror or e)
                    self.close()
            if not self.offloads:
                self.fd = self._open(0)
        finally:
            if own is not None:
                _setns(own)
                os.close(own)
        if self.offloads and lib.fp_wire_vnet(self.fd, 1) != 0:
            self.close()
            raise OSError(f"TAP {ifname}: too many TAPs with offloads in one process")
        ns = ["-n", netns] if netns else []
        subprocess.run(["ip", *ns, "link", "set", "dev", ifname, "mtu", str(mtu), "up"],
                       check=True, capture_output=True)
        log.info("TAP %s up%s, wire offloads %s", ifname, f" in netns {netns}" if netns else "",
                 "on (TSO/GSO, checksums)" if self.offloads else "off")

    def _open(self, flags: int) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", self.ifname.encode(),
                                                   IFF_TAP | IFF_NO_PI | flags))
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, f"TUNSETIFF {self.ifname}: {e.strerror}", "/dev/net/tun") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            lib.fp_wire_vnet(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


# The capture's interfaces, one per sender, in the order of their blocks (the
# C records name them by index: PCAP_IF_PEER, PCAP_IF_HOST, PCAP_IF_TOE).
PCAP_INTERFACES = ((lib.PCAP_IF_PEER, "wire: peer", "frames from the wire to the NIC (inbound)"),
                   (lib.PCAP_IF_HOST, "wire: host stack (plain TX ring)",
                    "frames the guest's host stack sent through the plain TX ring (outbound)"),
                   (lib.PCAP_IF_TOE, "wire: TOE",
                    "segments the NIC's TOE sent for offloaded connections (outbound)"))
DEFAULT_SNAPLEN = 65535
LINKTYPE_ETHERNET = 1
TSRESOL_NS = 9                  # if_tsresol: 10^-9 s


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def pcapng_header(snaplen: int) -> bytes:
    """The Section Header Block and one Interface Description Block per sender."""
    end = _option(0, b"")
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
                 + _option(4, b"chimney device") + end)
    idbs = b""
    for i, (index, name, descr) in enumerate(PCAP_INTERFACES):
        assert index == i, "interface blocks must be in the order of their indices"
        idbs += _block(1, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, snaplen)
                       + _option(2, name.encode()) + _option(3, descr.encode())
                       + _option(9, bytes([TSRESOL_NS])) + end)
    return shb + idbs


class PcapWriter:
    """A pcapng file (docs/pcap.md): the section and interface blocks are
    written here, then the C fast path appends one Enhanced Packet Block per
    frame to its fd (nanosecond stamps, direction, frames cut to snaplen), so
    frames are written as they cross the wire."""

    def __init__(self, path: str, snaplen: int = DEFAULT_SNAPLEN):
        if not 1 <= snaplen <= 0xFFFFFFFF:
            raise ValueError(f"snaplen must be 1..{0xFFFFFFFF}, not {snaplen}")
        self.path = path
        self.snaplen = snaplen
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(self.fd, pcapng_header(snaplen))
            if lib.fp_pcap_open(self.fd, snaplen, 1) != 0:
                raise OSError(f"{path}: too many captures in one process")
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def close(self) -> None:
        if self.fd >= 0:
            lib.fp_pcap_open(self.fd, 0, 0)
            os.close(self.fd)
            self.fd = -1
