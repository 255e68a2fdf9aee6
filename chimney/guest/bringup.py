"""One guest bring-up: bus -> miniport -> host stack -> chimney calls -> offload manager.

    g = bring_up(socket="/tmp/nic.sock", ip="10.199.0.2/24", offload="always")
    try:
        s = g.stack.connect(...)
    finally:
        g.close()

Every tool and test that puts the guest side on a NIC goes through here, so the
order (and what is undone when a step fails) is written once.  Each layer is
optional from the top down: stack=False stops at the miniport (for tools that
put their own Interface on it), offload=None stops at the host stack.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Self

from .im.chain import ImSpecError, build_chain, close_chain


class BringupError(Exception):
    """The guest side could not be brought up; the message says which step and why."""


def default_bus() -> str:
    """vfio inside the VM (where /dev/vfio exists), else the host bus."""
    return "vfio" if os.path.exists("/dev/vfio") else "host"


def parse_addr(text: str, default_prefix: int, family: int | None = None) -> tuple[str, int]:
    """"A[/P]" -> (A, P), checked: a valid address of the family (4 or 6), a prefix in range."""
    a, slash, p = text.strip().partition("/")
    try:
        ip = ipaddress.ip_address(a)
    except ValueError:
        raise BringupError(f"{text!r} is not an IP address (A or A/PREFIX)") from None
    if family is not None and ip.version != family:
        raise BringupError(f"{text!r} is not an IPv{family} address")
    maxlen = 32 if ip.version == 4 else 128
    if slash:
        if not p.isdigit() or not 0 <= int(p) <= maxlen:
            raise BringupError(f"{text!r}: the prefix must be 0..{maxlen}")
        return str(ip), int(p)
    return str(ip), default_prefix


@dataclass
class Bringup:
    """What bring_up() made; close() takes it all down (the bus last)."""
    bus: object
    mp: object = None
    stack: object = None            # HostStack, or None (stack=False)
    chimney: object = None          # Chimney, or None (no offload asked, or the NIC lacks it)
    top: object = None              # what the offload manager talks to: the top IM, or chimney
    offload: object = None          # OffloadManager, or None
    timings: dict = field(default_factory=dict)     # open_s, up_s: seconds per step

    def close(self) -> None:
        try:
            if self.top is not None and self.top is not self.chimney:
                close_chain(self.top)
        finally:
            self.bus.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_device_socket(path: str) -> None:
    """A BringupError unless path is a Unix socket (something may listen on it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BringupError(f"no device listening at {path} (no such file)") from None
    except OSError as e:
        raise BringupError(f"{path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BringupError(f"{path} is not a socket (a device's vfio-user socket, from chimney device)")


def _open_host_bus(path: str, ram_size: int | None = None):
    """The host bus on the device at path, its failures said in one line: nobody
    listening, or the device already serving another client (it closes a second
    connection at once, so the first request sees the connection end)."""
    from .bus import DeviceGone
    from .bus.vfio_user import VfioUserBus
    check_device_socket(path)
    try:
        return VfioUserBus(path) if ram_size is None else VfioUserBus(path, ram_size=ram_size)
    except (ConnectionRefusedError, FileNotFoundError):
        raise BringupError(f"no device listening at {path}") from None
    except DeviceGone as e:
        if "closed the connection" in str(e) or "connection lost" in str(e):
            raise BringupError(f"device busy: another client is attached to {path}") from None
        raise BringupError(f"device at {path}: {e}") from None
    except OSError as e:
        if e.errno == errno.EACCES:
            raise BringupError(f"{path}: permission denied") from None
        raise BringupError(f"device at {path}: {e.strerror or e}") from None


def open_bus(bus: str | None = None, socket: str | None = None, pci: str | None = None,
             ram_size: int | None = None):
    """The bus object: "host" (a device's vfio-user socket; ram_size: bytes of its
    "guest RAM") or "vfio" (Linux VFIO in the VM)."""
    bus = bus or ("host" if socket else default_bus())
    if bus == "host":
        if not socket:
            raise BringupError("the host bus needs a device socket (--socket PATH)")
        return _open_host_bus(socket, ram_size)
    if bus != "vfio":
        raise BringupError(f"unknown bus {bus!r} (vfio or host)")
    from .bus.vfio import VfioBus
    return VfioBus(pci)


def bring_up(*, bus: str | None = None, socket: str | None = None, pci: str | None = None,
             ram_size: int | None = None, ring_size: int | None = None, stack: bool = True, ip=None, ip6=(), config=None,
             offload: str | None = None, require_offload: bool = False, im: str | None = None,
             rss_queues: int | None = None, **manager_kw) -> Bringup:
    """Open the bus and bring the miniport up; with stack, a HostStack on it (ip: an
    (addr, prefix) pair or "A/P" text; ip6: a list of them; config: its
    chimney.tcp.engine.Config); with offload (a policy:
    "always", "never", "auto"), the chimney calls and an OffloadManager when the NIC
    offers TCP offload (require_offload: a BringupError when it does not); im: a chain
    of intermediate drivers between the manager and the chimney calls
    (chimney.guest.im.build_chain's spec, e.g. "trace:/tmp/t.jsonl"); rss_queues: the
    chimney's offload queue sets (default one per CPU).
    manager_kw go to OffloadManager.  On any failure the bus is closed again."""
    t0 = time.monotonic()
    g = Bringup(open_bus(bus, socket, pci, ram_size))
    g.timings["open_s"] = round(time.monotonic() - t0, 3)
    try:
        from .miniport import Miniport
        g.mp = Miniport(g.bus) if ring_size is None else Miniport(g.bus, ring_size=ring_size)
        t1 = time.monotonic()
        g.mp.up()
        g.timings["up_s"] = round(time.monotonic() - t1, 3)
        if not stack:
            return g
        from .stack.host import HostStack
        v4 = parse_addr(ip, 24, 4) if isinstance(ip, str) else ip
        v6 = [parse_addr(a, 64, 6) if isinstance(a, str) else a for a in ip6 if a]
        g.stack = HostStack.on_miniport(g.mp, ipv4=v4, ipv6=v6, config=config)
        g.stack.up()
        if offload is None:
            return g
        from .chimney_calls import Chimney
        from .stack.offload import OffloadManager
        ch = Chimney(g.mp, rss_queues=rss_queues)
        if not ch.supported:
            if require_offload:
                raise BringupError("the NIC does not offer TCP offload")
            return g
        ch.up()
        g.chimney = ch
        try:
            g.top = build_chain(im or "", ch)
        except ImSpecError as e:
            raise BringupError(str(e)) from None
        g.offload = OffloadManager(g.stack, g.top, offload, **manager_kw)
        return g
    except BaseException:
        g.close()
        raise
