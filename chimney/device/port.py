"""What the TOE (chimney.device.toe) may use of the NIC it sits in: its rings,
guest memory, interrupts and error registers, the wire, a clock and the
counters -- all it gets at construction, so it can be built and tested on its
own (chimney.device.nic builds the real one)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from .dma import DmaTable
from .ring import Rings


class ToeIrq(Protocol):
    """The NIC's interrupts and error registers."""

    def raise_vector(self, v: int) -> None: ...

    def buffer_dma_error(self, qid: int, addr: int) -> None:
        """A request's buffer lies outside the DMA mappings (counted, reported)."""


class ToeWire(Protocol):
    """Where the TOE's frames go; read at each send (the link may be down)."""

    tx_fd: int          # the TAP, or -1 while the link is down (frames count as drops)
    pcap_fd: int        # -1: no capture
    impair: Any         # struct impair * of the transmit direction, or ffi.NULL
    mtu: int            # the NIC's MTU register: no path may use a larger one


@dataclasses.dataclass(frozen=True)
class ToePort:
    rings: Rings                    # every queue; the TOE serves CMD/CMDC, EVENT, OSEND/ORECV/OCOMPL
    dma: DmaTable                   # guest memory: read, write, ctable for the C side
    irq: ToeIrq
    wire: ToeWire
    clock: Callable[[], float]      # monotonic seconds
    stats: Any                      # the NIC's counters (uint64_t[], indexed by hw.STAT_INDEX)
    enabled: Callable[[], bool]     # CTRL.ENABLE has taken effect
