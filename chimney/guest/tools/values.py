"""Parsing and checking what users type: sizes with units, seconds, counts, ports.

Sizes: a number with an optional unit K, M, G or T (either case, an optional
trailing B), powers of 2 as iperf3 reads them: 1K = 1024, 1M = 1048576,
1G = 1073741824 bytes; "1.5M" is 1572864.  Every parser raises ValueError with
a message that quotes what was given; argparse_type() turns one into an
argparse type (a one-line usage error, exit status 2)."""
from __future__ import annotations

import argparse
import math
import os

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE_HELP = "K/M/G suffixes are powers of 2, as iperf3's: 1K = 1024, 1M = 1048576 bytes"
MAX_PORT = 65535


def parse_size(text: str) -> int:
    """"100M" -> 104857600; a positive whole number of bytes."""
    t = str(text).strip()
    num = t.upper().removesuffix("B") if t.upper().endswith(("KB", "MB", "GB", "TB")) else t
    mult = 1
    if num and num[-1].upper() in UNITS:
        mult, num = UNITS[num[-1].upper()], num[:-1]
    try:
        v = float(num) if mult > 1 else int(num)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (a number of bytes, {SIZE_HELP})") from None
    if not math.isfinite(v):
        raise ValueError(f"{text!r} is not a size")
    n = int(v * mult)
    if n <= 0:
        raise ValueError(f"size {text!r} must be at least 1 byte")
    return n


def _number(text: str, conv, what: str):
    """conv(text), finite, or a ValueError naming what was expected."""
    try:
        v = conv(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {what}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{text!r} is not {what}")
    return v


def _at_least(text: str, conv, what: str, low, why: str):
    v = _number(text, conv, what)
    if v < low:
        raise ValueError(f"{text!r}: {why}")
    return v


def parse_seconds(text: str) -> float:
    """A positive number of seconds."""
    v = _number(text, float, "a number of seconds")
    if v <= 0:
        raise ValueError(f"{text!r}: seconds must be a positive number")
    return v


def parse_interval(text: str) -> float:
    """Seconds between reports; 0 turns them off."""
    return _at_least(text, float, "a number of seconds", 0,
                     "the interval must be 0 (none) or a positive number of seconds")


def parse_count(text: str) -> int:
    """A whole number, at least 1."""
    return _at_least(text, int, "a whole number", 1, "must be at least 1")


def parse_omit(text: str) -> int:
    """Whole seconds, 0 or more."""
    return _at_least(text, int, "a whole number of seconds", 0, "must be 0 or more")


def parse_port(text: str) -> int:
    v = _at_least(text, int, "a port number", 1, f"a port is 1..{MAX_PORT}")
    if v > MAX_PORT:
        raise ValueError(f"{text!r}: a port is 1..{MAX_PORT}")
    return v


def parse_mss(text: str) -> int:
    """A TCP maximum segment size: 88..9000 bytes (no units)."""
    v = _at_least(text, int, "a whole number of bytes", 88, "an MSS is 88..9000 bytes")
    if v > 9000:
        raise ValueError(f"{text!r}: an MSS is 88..9000 bytes")
    return v


def mbps(nbytes: int, secs: float) -> float:
    """Megabits per second (10^6 bits, as iperf3's Mbits/sec)."""
    return round(nbytes * 8 / 1e6 / secs, 3) if secs > 0 else 0.0


def argparse_type(parse):
    """parse (text -> value, ValueError) as an argparse type: a ValueError becomes a usage error."""
    def conv(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = parse.__name__.removeprefix("parse_")
    return conv


size = argparse_type(parse_size)
seconds = argparse_type(parse_seconds)
interval = argparse_type(parse_interval)
count = argparse_type(parse_count)
omit = argparse_type(parse_omit)
port = argparse_type(parse_port)
mss = argparse_type(parse_mss)


def _writable_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{what}: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {path} is not writable")


def parse_output_file(text: str) -> str:
    """A file we may create or overwrite: its directory exists and is writable."""
    if not text or text.endswith("/") or os.path.isdir(text):
        raise ValueError(f"{text!r} is a directory, not a file")
    _writable_dir(os.path.dirname(os.path.abspath(text)), f"cannot write {text}")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise ValueError(f"cannot write {text}: permission denied")
    return text


def parse_output_dir(text: str) -> str:
    """A directory we may write into: it exists, or its parent does (we make it)."""
    if not text:
        raise ValueError("an empty directory name")
    if os.path.exists(text):
        _writable_dir(text, f"cannot write into {text}")
    else:
        _writable_dir(os.path.dirname(os.path.abspath(text)), f"cannot make {text}")
    return text


output_file = argparse_type(parse_output_file)
output_dir = argparse_type(parse_output_dir)
