"""Building a stack of IMs from a spec string (the tools' `--im SPEC`).

    top = build_chain("trace:/tmp/t.jsonl,trace", chimney)

SPEC is a comma-separated list of KIND[:ARG], from the host stack down to the
NIC: the first element is the IM the offload manager talks to, the last one
sits on `lower` (the miniport's Chimney).  Kinds: trace[:FILE] (JSON lines to
FILE, else kept in memory in `.records`).  An empty spec gives `lower` itself.
"""
from __future__ import annotations

import argparse

from .base import IntermediateDriver
from .trace import TraceIM


class ImSpecError(ValueError):
    """A malformed --im spec (one line, for the user)."""


def _trace(lower, arg: str | None, name: str):
    try:
        return TraceIM(lower, path=arg or None, name=name)
    except OSError as e:
        raise ImSpecError(f"--im trace:{arg}: cannot write the trace file ({e.strerror})") from None


KINDS = {"trace": _trace}


def parse_spec(spec: str) -> list[tuple[str, str | None]]:
    """[(kind, arg or None), ...] from the top down; ImSpecError when malformed."""
    out = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            if spec and spec.strip():
                raise ImSpecError(f"--im {spec!r}: empty element")
            continue
        kind, _, arg = part.partition(":")
        if kind not in KINDS:
            raise ImSpecError(f"--im {spec!r}: unknown IM {kind!r} (known: {', '.join(sorted(KINDS))})")
        out.append((kind, arg or None))
    return out


def spec_arg(text: str) -> str:
    """argparse type for --im: the spec, checked (a bad one is a usage error, exit 2)."""
    try:
        parse_spec(text)
    except ImSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_chain(spec: str, lower) -> object:
    """The top of the IM stack built on lower (lower itself for an empty spec).
    Names count from the top: trace1 is the one the offload manager talks to."""
    items = parse_spec(spec)
    base = lower
    saved = (getattr(base, "status_handler", None), getattr(base, "neigh_query_handler", None))
    ims: list[IntermediateDriver] = []
    for i, (kind, arg) in reversed(list(enumerate(items))):
        try:
            lower = KINDS[kind](lower, arg, f"{kind}{i + 1}")
        except ImSpecError:
            # leave the layer below as it was: no handlers of IMs that will not be used
            for im in ims:
                close_chain(im)
            if ims:
                base.status_handler, base.neigh_query_handler = saved
            raise
        ims.append(lower)
    return lower


def chain_of(top) -> list[IntermediateDriver]:
    """The IMs under (and including) top, from the top down."""
    out = []
    while isinstance(top, IntermediateDriver):
        out.append(top)
        top = top.lower
    return out


def close_chain(top) -> None:
    """Close every IM of the chain (their trace files)."""
    for im in chain_of(top):
        close = getattr(im, "close", None)
        if close is not None:
            close()
