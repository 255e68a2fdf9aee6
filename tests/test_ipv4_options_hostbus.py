"""A real Linux client whose every segment carries IPv4 options (setsockopt
IP_OPTIONS: Linux fills the record-route or timestamp option in as it sends)
connects to the host stack over the host bus and exchanges data both ways,
sha256-verified at both ends."""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from chimney.guest.bus.vfio_user import VfioUserBus
from chimney.guest.miniport import Miniport
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.socket import listen
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

ADDR = PeerAddrs()
TAP = "chim0"
N = 300_000
IO_TIMEOUT = 60

OPTIONS = {
    "nop-padded record route": "01070b04" + "00" * 8,
    "timestamp": "440c0500" + "00" * 8,
}

# The client: IP_OPTIONS on its socket, sends n random bytes, shuts down its write
# side, reads ours to EOF; prints both hashes.
PEER_CLIENT = r"""
import hashlib, json, os, socket, sys
host, port, n, opts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
c = socket.socket()
c.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, opts)
c.settimeout(60)
c.connect((host, port))
data = os.urandom(n)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
h, got = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); got += len(b)
c.close()
print(json.dumps({"sent_sha": hashlib.sha256(data).hexdigest(), "got": got, "got_sha": h.hexdigest()}))
"""


@pytest.fixture
def stack(tmp_path):
    with Netns("ipopt") as ns, DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=ns.name,
                                             log_path=str(tmp_path / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        bus = VfioUserBus(dev.socket)
        mp = Miniport(bus)
        mp.up()
        try:
            st = HostStack.on_miniport(mp, ipv4=(ADDR.guest4, ADDR.prefix4))
            st.up()
            yield st, ns
        finally:
            bus.close()
        assert dev.alive, dev.log_text()


@needs_root
@pytest.mark.parametrize("opts", list(OPTIONS.values()), ids=list(OPTIONS))
def test_linux_client_with_ip_options_exchanges_data(stack, opts):
    st, ns = stack
    ls = listen(st, 6201)
    proc = ns.popen(sys.executable, "-u", "-c", PEER_CLIENT, ADDR.guest4, "6201", str(N), opts,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        s, peer = ls.accept(timeout=10)
        assert peer[0] == ADDR.peer4
        h, got, t0 = hashlib.sha256(), 0, time.monotonic()
        while time.monotonic() - t0 < IO_TIMEOUT:
            b = s.recv(1 << 16, timeout=IO_TIMEOUT)
            if not b:
                break
            h.update(b)
            got += len(b)
        data = os.urandom(N)
        s.sendall(data, timeout=IO_TIMEOUT)
        s.close()
        st.run_until(lambda: proc.poll() is not None, IO_TIMEOUT)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    ls.close()
    assert proc.returncode == 0, err.decode()
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert got == N and h.hexdigest() == res["sent_sha"]
    assert res["got"] == N and res["got_sha"] == hashlib.sha256(data).hexdigest()
    stats = st.iface.stats
    # the options were on the wire (every data segment of the client's), and none was refused
    assert stats["ipv4_options_in"] >= N // 1460, dict(stats)
    assert stats["drop_ipv4_bad_option"] == 0 and stats["drop_ipv4_source_route"] == 0
