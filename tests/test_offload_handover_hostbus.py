"""Handovers on the host bus against a Linux peer: what the application wrote while an
upload ran reaches the peer, and neither an offload nor an upload loses or repeats a
segment on the wire.  Bounded in bytes and time."""
import hashlib
import random

import pytest
from test_offload_hostbus import ADDR, TAP, Guest, peer, peer_result

from chimney.guest.stack.socket import SoftwarePath
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns

pytestmark = [pytest.mark.netns]


@pytest.fixture(scope="module")
def wire(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("handover")
    with Netns("hndo") as ns, DeviceProcess(str(tmp / "nic.sock"), tap=TAP, netns=ns.name,
                                            log_path=str(tmp / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        yield dev, ns
        assert dev.alive, dev.log_text()[-3000:]


@pytest.mark.parametrize("policy", ["never", "always"])
def test_data_written_during_an_upload_is_sent(wire, policy):
    """The application writes while TERMINATE is on its way (upload(wait=False)) after the
    NIC had every earlier byte acknowledged: those bytes are held by the path, then go to
    the software TCP no faster than its send buffer takes them, and are sent (the rebuilt
    connection had no timer running and nothing to make it send: they waited forever,
    through a re-offload by the `always` policy too)."""
    dev, ns = wire
    port = 6400 + (policy == "always")
    first, parked = 1_000_000, 1_500_000
    out = random.Random(f"park-{policy}").randbytes(first + parked)
    p = peer(ns, listen=True, port=port, send=0, timeout=60)
    g = Guest(dev, policy=policy)
    try:
        s = g.stack.connect(ADDR.peer4, port, timeout=10)
        if policy == "never":
            assert s.offload()
        assert s.offloaded
        s.sendall(out[:first], timeout=20)
        assert g.stack.run_until(lambda: s.path.outstanding == 0, 20)     # all acknowledged
        s.upload(wait=False)
        off = first
        while off < len(out):
            off += s.send(out[off:off + 65536], timeout=0)
        assert g.stack.run_until(lambda: isinstance(s.path, SoftwarePath), 20)
        conn = s.path.conn
        assert len(conn.d.send_buffer) <= conn.cfg.send_buffer_size     # the send buffer holds
        if policy == "always":      # offloaded again (after the FIN it could not be)
            assert g.stack.run_until(lambda: s.offloaded, 20)
        s.shutdown()
        res = peer_result(p, timeout=30, g=g)
        assert res["got"] == len(out) and res["sha256"] == hashlib.sha256(out).hexdigest()
        # (offloaded again, the connection comes back once more when its FIN is acknowledged)
        assert s.upload_count >= 1 and s.offload_count == (2 if policy == "always" else 1)
        s.close()
        g.stack.run_until(lambda: not g.stack.detached, 5)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        g.close()
