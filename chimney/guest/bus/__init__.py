"""The miniport's view of its PCI function: the small interface both buses offer.

    bus.config_read(offset, size) / bus.config_write(offset, size, value)
    bus.reg_read(bar, offset, size) / bus.reg_write(bar, offset, size, value)
        trapped register access (slow path)
    bus.map_bar(bar) -> writable buffer over an mmappable BAR (the doorbell page)
    bus.dma_alloc(size, align=4096) -> DmaBuffer(mem, iova)
        memory the device can reach, and the bus address to give it
    bus.enable_msix(nvectors); bus.irq_fd(vector) -> fd; bus.wait_irq(vector, timeout) -> bool
    bus.close()

Implementations: VfioUserBus (host: a vfio-user client straight to the device
process) and, inside a VM, the Linux VFIO bus.
"""
from __future__ import annotations

import os
import select
from dataclasses import dataclass


@dataclass
class DmaBuffer:
    mem: memoryview     # CPU view of the buffer
    iova: int           # the address the device uses

    def __len__(self) -> int:
        return len(self.mem)


class DeviceGone(Exception):
    """The device stopped answering: its process died or closed the bus."""


class EventfdIrqs:
    """MSI-X vectors delivered as eventfds (both buses use them)."""

    def __init__(self):
        self.fds: list[int] = []

    def create(self, n: int) -> list[int]:
        self.close_irqs()
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
        return self.fds

    def irq_fd(self, vector: int) -> int:
        return self.fds[vector]

    def wait_irq(self, vector: int, timeout: float | None) -> bool:
        """Wait for the vector to fire; consumes the event."""
        fd = self.fds[vector]
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return False
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return False
        return True

    def clear_irq(self, vector: int) -> None:
        try:
            os.read(self.fds[vector], 8)
        except BlockingIOError:
            pass

    def close_irqs(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def unmap_all(maps: dict) -> None:
    """Close a bus's BAR mappings and forget them."""
    for m in maps.values():
        try:
            m.close()
        except BufferError:
            pass        # a driver still holds a view; the mapping goes with it
    maps.clear()


def u32(buf, off: int) -> int:
    """One 32-bit word of a shared page, read in one access."""
    with memoryview(buf) as m, m.cast("I") as words:
        return words[off >> 2]
