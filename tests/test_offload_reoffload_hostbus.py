"""Regression, on the host bus: with the `always` policy a connection uploaded in the
middle of a receive is offloaded again by the manager's poll, which runs inside
Socket.recv.  The offload exports the software TCP's unread bytes to the NIC; recv
must then read from the new path, not the stale software one (it did: those bytes
came twice).  Several short runs, each byte-exact; bounded in bytes and time."""
import hashlib
import json
import random
import subprocess
import sys
import time

import pytest
from test_offload_hostbus import ADDR, PEER, Guest

from chimney.guest.stack.offload import HandoverPath, OffloadPath
from chimney.guest.stack.offload.manager import NIC_SEND_BUFFER
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


def test_no_reoffload_while_the_send_buffer_exceeds_the_nics(wire):
    """An upload while the peer does not read returns the NIC's send buffer and the
    send requests queued behind it: the software TCP holds more than the NIC's send
    buffer.  The connection is not offered to the NIC until the peer took enough
    (INITIATE refused that state, the offload failed and the connection stayed in
    software for good); then it goes, and every byte arrives."""
    dev, ns = wire
    port, n = 6330, 1_000_000
    out = random.Random("big-send").randbytes(n)
    p = ns.popen(sys.executable, "-c", PEER, json.dumps({"listen": True, "port": port, "send": 0,
                                                         "seed": "-", "hold": 3, "timeout": 30}),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    g = Guest(dev, policy="never")
    try:
        assert p.stdout.readline().strip() == b"listening"
        s = g.stack.connect(ADDR.peer4, port, timeout=10)
        assert s.offload()
        off = 0
        while off < n:
            off += s.send(out[off:off + 65536], timeout=5)
        assert s.upload(wait=True) and isinstance(s.path, SoftwarePath)
        conn = s.path.software_conn()
        assert len(conn.d.send_buffer) > NIC_SEND_BUFFER          # the peer is not reading yet
        assert not g.mgr.offloadable(s) and not s.offload()
        assert g.stack.run_until(lambda: len(conn.d.send_buffer) <= NIC_SEND_BUFFER
                                 and not s.path.parked, 20)
        assert s.offload() and s.offloaded
        s.shutdown()
        assert g.stack.run_until(lambda: p.poll() is not None, 30)
        res = json.loads(p.communicate(timeout=5)[0].decode().strip().splitlines()[-1])
        assert res["got"] == n and res["sha256"] == hashlib.sha256(out).hexdigest()
        assert g.mgr.stats["offload_failed"] == 0 and s.offload_count == 2
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
        g.close()
