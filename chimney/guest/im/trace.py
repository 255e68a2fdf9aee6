"""The tracing IM: a pass-through intermediate driver that records every call
and indication crossing it, with the handle chain at its level, as JSON lines
(to a file, or to an in-memory list).

    im = TraceIM(lower, path="/tmp/t.jsonl")    # or TraceIM(lower) -> im.records
    ...
    im.close()

One record per crossing:
    t            seconds since the trace started (monotonic)
    im           the IM's name (trace1, trace2, ... from the top of the chain down)
    op, way      the call ("send", "initiate", ...) or indication ("indicate", "event", ...);
                 "down" towards the NIC, "up" towards the host stack
    upper_handle the overlying driver's handle for the object
    upper_ctx    the IM's reference, the context the overlying driver uses
    own_handle   the IM's handle, the one the layer below returns
    lower_ctx    the context of the layer below
    bytes, tag, status, flags, kind, reason, accepted ...  as the crossing has them
State operations carry "objects": one such chain (and type, status) per object.
The file spells the four handle fields in hex ("0x3"); `records` and
read_trace() give them as ints.
"""
from __future__ import annotations

import json
import time

from .base import IntermediateDriver

HANDLE_KEYS = ("upper_handle", "upper_ctx", "own_handle", "lower_ctx")


def _spell(rec: dict, conv) -> dict:
    out = {k: conv(v) if k in HANDLE_KEYS and v is not None else v for k, v in rec.items()}
    if "objects" in out:
        out["objects"] = [_spell(o, conv) for o in out["objects"]]
    return out


class TraceIM(IntermediateDriver):
    kind = "trace"

    def __init__(self, lower, path: str | None = None, name: str | None = None):
        super().__init__(lower, name)
        self.path = path
        self.records: list[dict] = []       # kept when there is no file
        self._t0 = time.monotonic()
        # line-buffered: a run that ends without close() still leaves whole lines
        self._file = open(path, "w", buffering=1) if path else None  # noqa: SIM115 -- held open

    def crossing(self, op: str, way: str, entry, **info) -> None:
        rec = {"t": round(time.monotonic() - self._t0, 6), "im": self.name, "op": op, "way": way}
        if entry is not None:
            rec.update(entry.chain())
        rec.update(info)
        if self._file is not None:
            self._file.write(json.dumps(_spell(rec, hex), default=str) + "\n")
        else:
            self.records.append(rec)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_trace(path: str) -> list[dict]:
    """The records of a trace file (one JSON object a line)."""
    with open(path) as f:
        return [_spell(json.loads(line), lambda v: int(v, 16)) for line in f if line.strip()]
