"""The software TCP's receive window follows what the miniport can buffer.

At a small MTU every segment takes one RX slot for a few hundred bytes, so a
window sized in bytes alone (256 KiB) lets the peer put more segments in flight
than the RX ring has slots: the NIC drops them (rx_no_buffer) and the peer
retransmits.  Here a Linux peer sends to the host stack over a 576-byte link; the
bytes must arrive exact and the NIC must never run out of posted buffers."""
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest

from chimney import hw
from chimney.guest.bus.vfio_user import VfioUserBus
from chimney.guest.miniport import Miniport
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.iface import Interface
from chimney.guest.stack.socket import listen
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs, _ip

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

ADDR = PeerAddrs()
TAP = "chim0"
MTU = 576
N = 3_000_000
IO_TIMEOUT = 120

# The peer as client: connects, sends n random bytes, closes; prints their sha256.
PEER_SENDER = r"""
import hashlib, json, os, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port), timeout=60)
data = os.urandom(n)
c.sendall(data)
c.close()
print(json.dumps({"sent_sha": hashlib.sha256(data).hexdigest()}))
"""


@pytest.fixture
def small_mtu_stack(tmp_path):
    with Netns("rxwnd") as ns, DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=ns.name,
                                             log_path=str(tmp_path / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        _ip("-n", ns.name, "link", "set", TAP, "mtu", str(MTU))
        bus = VfioUserBus(dev.socket)
        mp = Miniport(bus)
        mp.up()
        mp.wr(hw.REG_MTU, MTU)
        try:
            st = HostStack.on_miniport(mp, ipv4=(ADDR.guest4, ADDR.prefix4), mtu=MTU)
            st.up()
            yield st, mp, ns
        finally:
            bus.close()
        assert dev.alive, dev.log_text()


@needs_root
def test_small_mss_transfer_never_overruns_the_rx_ring(small_mtu_stack):
    st, mp, ns = small_mtu_stack
    ls = listen(st, 6101)
    proc = ns.popen(sys.executable, "-u", "-c", PEER_SENDER, ADDR.guest4, "6101", str(N),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        s, _ = ls.accept(timeout=10)
        conn = s.flow.conn
        assert conn.const.remote_mss <= MTU - 40 and conn.cfg.local_mss == MTU - 40
        h, got, t0 = hashlib.sha256(), 0, time.monotonic()
        while time.monotonic() - t0 < IO_TIMEOUT:
            b = s.recv(1 << 16, timeout=IO_TIMEOUT)
            if not b:
                break
            h.update(b)
            got += len(b)
        s.close()
        st.run_until(lambda: proc.poll() is not None, 30)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    ls.close()
    assert proc.returncode == 0, err.decode()
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert got == N and h.hexdigest() == res["sent_sha"]
    stats = mp.stats()
    assert stats["rx_no_buffer"] == 0, stats
    assert stats["rx_drops"] == 0, stats
    # why: the whole window, in segments of the least payload a full frame carries, fits the ring
    assert conn.cfg.recv_buffer_size <= mp.rx_capacity(MTU + 14, MTU - 40 - 40)


def test_window_derived_from_ring_capacity():
    """The bound itself: slots per full frame, payload per frame; the constant
    256 KiB stays where the ring holds more."""
    mp = Miniport(None, ring_size=256, buf_size=2048)
    assert mp.rx_capacity(MTU + 14, MTU - 80) == 256 * (MTU - 80)
    assert mp.rx_capacity(9014, 8920) == 256 // 5 * 8920          # a jumbo frame takes 5 buffers
    for mtu, want in ((MTU, 256 * (MTU - 80)), (1500, 256 * 1024), (68, 256)):
        st = HostStack(Interface(b"\x02" * 6, ipv4=(ADDR.guest4, ADDR.prefix4), mtu=mtu,
                                 send_frame=lambda f: None), mp)
        cfg = st._config_for(ipaddress.ip_address(ADDR.guest4))
        assert cfg.recv_buffer_size == want and cfg.local_mss == mtu - 40
    assert HostStack(Interface(b"\x02" * 6, ipv4=(ADDR.guest4, ADDR.prefix4), mtu=MTU,
                               send_frame=lambda f: None))._config_for(
        ipaddress.ip_address(ADDR.guest4)).recv_buffer_size == 256 * 1024   # no miniport: no ring
