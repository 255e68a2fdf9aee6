"""Wire impairment, netem style: `delay=20ms,jitter=5ms,loss=2%,reorder=25%,seed=7,limit=1000`.

The frames are held and released by C (impair.c); this module parses the
spec and owns the memory.  One Impairment per direction of the NIC's port.
"""
from __future__ import annotations

import re

from ._fastpath import ffi, lib

_UNITS = {"us": 1, "ms": 1000, "s": 1_000_000}


class ImpairSpecError(ValueError):
    pass


def _duration_us(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s)", text)
    if not m:
        raise ImpairSpecError(f"not a duration: {text!r} (e.g. 20ms, 500us, 1s)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _percent_ppm(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
    if not m or float(m.group(1)) > 100:
        raise ImpairSpecError(f"not a percentage: {text!r} (e.g. 2%, 0.5%)")
    return int(round(float(m.group(1)) * 10_000))


class Impairment:
    def __init__(self, spec: str):
        self.spec = spec
        fields = {"delay": "0ms", "jitter": "0ms", "loss": "0%", "reorder": "0%", "seed": "1", "limit": "1000"}
        for part in filter(None, spec.split(",")):
            key, sep, val = part.partition("=")
            if not sep or key not in fields:
                raise ImpairSpecError(f"unknown impairment {part!r}: use {', '.join(fields)}")
            fields[key] = val
        limit = int(fields["limit"])
        if not 1 <= limit <= 100_000:
            raise ImpairSpecError("limit must be 1..100000 frames")
        self.c = ffi.new("struct impair *")
        self.c.delay_us = _duration_us(fields["delay"])
        self.c.jitter_us = _duration_us(fields["jitter"])
        self.c.loss_ppm = _percent_ppm(fields["loss"])
        self.c.reorder_ppm = _percent_ppm(fields["reorder"])
        if self.c.reorder_ppm and not self.c.delay_us:
            raise ImpairSpecError("reorder needs a delay (reordered frames skip it)")
        self.c.rng = (int(fields["seed"]) * 0x9E3779B97F4A7C15 | 1) & 0xFFFFFFFFFFFFFFFF
        self._line = ffi.new("struct held_frame[]", limit)
        self.c.line = self._line
        self.c.cap = limit

    def next_due(self) -> float | None:
        """When the next held frame leaves, in time.monotonic() seconds."""
        due = lib.impair_next_due(self.c)
        return due / 1e6 if due else None

    def counters(self) -> dict[str, int]:
        return {k: getattr(self.c, k) for k in ("passed", "lost", "reordered", "delayed", "overflow")}

    def __str__(self) -> str:
        return self.spec
