"""Moving frames between an Interface and a Miniport, in the caller's thread."""
from __future__ import annotations

import time

from .iface import Interface


def attach(miniport, ipv4=None, ipv6=(), clock=time.monotonic, **kw) -> Interface:
    """An Interface on an up miniport: its MAC, frames out through miniport.send."""
    return Interface(miniport.mac, ipv4=ipv4, ipv6=ipv6, send_frame=miniport.send, clock=clock, **kw)


def run_on_miniport(iface: Interface, miniport, until=None, timeout: float = 1.0,
                    tick: float = 0.05) -> bool:
    """Receive frames into iface.on_frame and run iface.poll until `until()` is
    true or `timeout` seconds pass (by time.monotonic).  Returns until()'s last
    value (True when no predicate was given and the time ran out)."""
    end = time.monotonic() + timeout
    while True:
        if until is not None and until():
            return True
        left = end - time.monotonic()
        if left <= 0:
            return until is None
        frame = miniport.recv(timeout=min(left, tick))
        while frame is not None:
            iface.on_frame(frame)
            frame = miniport.recv(timeout=0)
        iface.poll()


def ping_on_miniport(iface: Interface, miniport, dst, count: int = 1, payload: bytes = b"",
                     timeout: float = 2.0, interval: float = 0.0) -> list:
    """Ping dst `count` times, one after another; returns the PingReply of each
    (None for those unanswered within timeout)."""
    out = []
    for i in range(count):
        if i and interval:
            run_on_miniport(iface, miniport, timeout=interval)
        seq = iface.ping(dst, payload)
        run_on_miniport(iface, miniport, lambda seq=seq: iface.ping_reply(dst, seq) is not None, timeout)
        out.append(iface.ping_reply(dst, seq))
    return out
