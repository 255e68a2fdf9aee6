"""The server loop every tool shares: listen, serve one client at a time, print
each run's result; with once, stop after the first."""
from __future__ import annotations

import sys


def serve(stack, port: int, *, tool: str, serve_one, emit, ok, once: bool, banner=None) -> int:
    """serve_one() -> a result dict (TimeoutError: no client came in time); emit(result)
    prints it; ok(result) says whether the run succeeded.  banner() is printed once
    the port listens (default: one line on stderr).  -> the exit status."""
    stack.listen(port)
    if banner is not None:
        banner()
    else:
        print(f"{tool}: server on the {stack.name} stack, port {port}", file=sys.stderr, flush=True)
    while True:
        try:
            res = serve_one()
        except TimeoutError:
            print(f"{tool}: no client came", file=sys.stderr)
            return 1
        res["port"] = port
        emit(res)
        rc = 0 if ok(res) else 1
        if once:
            return rc
