"""Regression, on the host bus: with the `always` policy a connection uploaded in the
middle of a receive is offloaded again by the manager's poll, which runs inside
Socket.recv.  The offload exports the software TCP's unread bytes to the NIC; recv
must then read from the new path, not the stale software one (it did: those bytes
came twice).  Several short runs, each byte-exact; bounded in bytes and time."""
import json
import random
import subprocess
import sys
import time

import pytest
from test_offload_hostbus import ADDR, PEER, Guest

from chimney.guest.stack.offload import HandoverPath, OffloadPath
from chimney.guest.stack.socket import SoftwarePath

pytestmark = [pytest.mark.netns]
N = 6_000_000


@pytest.mark.parametrize("run", range(6))
def test_upload_then_policy_reoffload_receive_exact(wire, run):
    dev, ns = wire
    port = 6300 + run
    p = ns.popen(sys.executable, "-c", PEER, json.dumps({"listen": True, "port": port, "send": N,
                                                         "seed": f"re{run}", "timeout": 60}),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    g = Guest(dev, policy="always")
    try:
        assert p.stdout.readline().strip() == b"listening"
        s = g.stack.connect(ADDR.peer4, port, timeout=10)
        assert s.offloaded
        rx, uploaded = bytearray(), False
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                b = s.recv(1 << 16, timeout=0)
            except BlockingIOError:
                g.stack.step(0.001)
                continue
            if not b:
                break
            rx += b
            if len(rx) >= N // 3 and not uploaded:
                uploaded = True
                # the `always` policy may already be offloading it again (handover) when
                # upload() returns: that is the very path this test exercises
                assert s.upload(wait=True) and isinstance(s.path, (SoftwarePath, HandoverPath, OffloadPath))
        assert len(rx) == N and bytes(rx) == random.Random(f"re{run}").randbytes(N)
        assert s.offload_count == 2 and s.upload_count >= 1      # offloaded again by the policy
        assert g.mgr.stats.get("upload_rx_gap", 0) == 0
        s.close()
        g.stack.run_until(lambda: False, 0.2)
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
        g.close()


def test_reoffload_when_the_upload_returned_every_byte(wire):
    """The `always` policy offloads an uploaded connection again even when the upload
    hands the software TCP every byte still to come (here: all of it, and the FIN), so
    the application reads to EOF without the stack ever stepping.  It used to wait for
    the policy's next periodic look (50 ms later), which then never came: offloaded once
    only (the cause of a rare `offload_count == 1` in the test above)."""
    dev, ns = wire
    port, n = 6320, 3_000_000          # under the host's receive limit: all of it is held
    p = ns.popen(sys.executable, "-c", PEER, json.dumps({"listen": True, "port": port, "send": n,
                                                         "seed": "held", "timeout": 60}),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    g = Guest(dev, policy="always")
    try:
        assert p.stdout.readline().strip() == b"listening"
        s = g.stack.connect(ADDR.peer4, port, timeout=10)
        assert s.offloaded
        assert g.stack.run_until(lambda: s.path.rx_held == n and s.path.eof_flag, 30)
        assert s.upload(wait=True)
        rx = bytearray()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                b = s.recv(1 << 16, timeout=0)
            except BlockingIOError:
                g.stack.step(0.001)
                continue
            if not b:
                break
            rx += b
        assert len(rx) == n and bytes(rx) == random.Random("held").randbytes(n)
        assert s.upload_count == 1 and s.offload_count == 2
        s.close()
        g.stack.run_until(lambda: False, 0.2)
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
        g.close()
