"""The TCP engine: a pure-Python state machine (injected clock, no I/O) whose state is
kept in the chimney's three classes (const, cached, delegated), so the host stack's
software TCP and the NIC's offload engine hand connections over without translation.

    segment.py  Segment, encode/decode with checksum, SegmentError
    state.py    TcpConst, TcpCached, TcpDelegated, TcpState
    engine.py   Connection, Config, validate_state (is an imported state runnable?)
"""
from .engine import Config, Connection, rst_for, validate_state
from .segment import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG, Segment, SegmentError, decode
from .state import (NOT_OFFLOADABLE, SYNCHRONIZED, TICKS_PER_SECOND, TcpCached, TcpConst,
                    TcpDelegated, TcpState)

__all__ = ["Config", "Connection", "rst_for", "validate_state", "Segment", "SegmentError", "decode",
           "FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR",
           "TcpConst", "TcpCached", "TcpDelegated", "TcpState", "SYNCHRONIZED",
           "NOT_OFFLOADABLE", "TICKS_PER_SECOND"]
