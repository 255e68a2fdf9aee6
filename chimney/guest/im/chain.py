"""Building a stack of IMs from a spec string (the tools' `--im SPEC`).

    top = build_chain("trace:/tmp/t.jsonl,trace", chimney)

SPEC is a comma-separated list of KIND[:ARG], from the host stack down to the
NIC: the first element is the IM the offload manager talks to, the last one
sits on `lower` (the miniport's Chimney).  Kinds: trace[:FILE] (JSON lines to
FILE, else kept in memory in `.records`).  An empty spec gives `lower` itself.
"""
from __future__ import annotations

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


def build_chain(spec: str, lower) -> object:
    """The top of the IM stack built on lower (lower itself for an empty spec).
    Names count from the top: trace1 is the one the offload manager talks to."""
    items = parse_spec(spec)
    ims: list[IntermediateDriver] = []
    for i, (kind, arg) in reversed(list(enumerate(items))):
        try:
            lower = KINDS[kind](lower, arg, f"{kind}{i + 1}")
        except ImSpecError:
            for im in ims:
                close_chain(im)
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
