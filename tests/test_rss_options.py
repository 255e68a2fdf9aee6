"""`--rss-queues N` on the tools: bad input is one line and exit status 2, before
anything touches a NIC."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,says", [
    (["--rss-queues", "9", "--offload", "on"], "the NIC has 8 offload queue sets"),
    (["--rss-queues", "0", "--offload", "on"], "must be at least 1"),
    (["--rss-queues", "four", "--offload", "on"], "is not a whole number"),
    (["--rss-queues", "2"], "--rss-queues needs --offload on|auto"),
    (["--rss-queues", "2", "--offload", "on", "--stack", "linux"], "--rss-queues needs --stack chimney"),
])
def test_bad_rss_queues_is_a_usage_error(args, says):
    p = subprocess.run([sys.executable, "-m", "chimney.guest.perf", "client", "10.199.0.1", "-n", "1K",
                        "--bus", "host", "--socket", "/nonexistent/nic.sock", *args],
                       check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert says in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
