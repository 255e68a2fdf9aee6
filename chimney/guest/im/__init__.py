"""Intermediate drivers (IMs) between the host stack's offload manager and the
miniport's chimney (docs/im-drivers.md)."""
from .base import ImCommand, ImEntry, ImError, IntermediateDriver
from .chain import ImSpecError, build_chain, chain_of, close_chain, parse_spec, spec_arg
from .trace import TraceIM, read_trace

__all__ = ["ImCommand", "ImEntry", "ImError", "ImSpecError", "IntermediateDriver", "TraceIM",
           "build_chain", "chain_of", "close_chain", "parse_spec", "read_trace", "spec_arg"]
