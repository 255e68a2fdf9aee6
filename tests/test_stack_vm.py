"""The host stack inside the VM: the Interface on the miniport over Linux VFIO
pings the Linux peer over IPv4 and IPv6, resolving it with ARP and ND.  One
boot for the module."""
import json
import os

import pytest

from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs
from chimney.host.qemu import run_in_guest

pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

ADDR = PeerAddrs()


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("vm-stack")
    with Netns("vmstack") as ns:
        with DeviceProcess(str(d / "nic.sock"), tap="chim0", netns=ns.name, pcap=str(d / "wire.pcap"),
                           log_path=str(d / "device.log")) as dev:
            ns.configure_peer("chim0", ADDR)
            res = run_in_guest(f"python3 -m chimney.guest.stack ping --ip {ADDR.guest4}/{ADDR.prefix4} "
                               f"--ip6 {ADDR.guest6}/{ADDR.prefix6} --peer {ADDR.peer4} "
                               f"--peer {ADDR.peer6} --count 3",
                               vfio_user_socket=dev.socket, workdir=d / "vm", timeout=300)
            peer_mac = ns.run("cat", "/sys/class/net/chim0/address").stdout.strip()
            neigh = ns.run("ip", "neigh", "show", "dev", "chim0").stdout
            alive, log = dev.alive, dev.log_text()
    try:
        report = json.loads(res.stdout)
    except ValueError:
        report = None
    return res, report, peer_mac, neigh, alive, log


def test_guest_stack_pings_peer_v4_and_v6(guest_run):
    res, report, peer_mac, neigh, alive, log = guest_run
    assert res.rc == 0 and report is not None and report["ok"], (res.stdout.decode(), res.stderr.decode())
    assert set(report["pings"]) == {ADDR.peer4, ADDR.peer6}
    assert all(len(rtts) == 3 and all(r is not None for r in rtts) for rtts in report["pings"].values())
    assert alive and "Traceback" not in log, log[-3000:]


def test_guest_stack_neighbours(guest_run):
    _, report, peer_mac, neigh, _, _ = guest_run
    assert report["neighbours"][ADDR.peer4] == ["reachable", peer_mac]
    assert report["neighbours"][ADDR.peer6] == ["reachable", peer_mac]
    assert ADDR.guest4 in neigh and ADDR.guest6 in neigh and report["mac"] in neigh
    assert report["stats"].get("drop_internal_error", 0) == 0
