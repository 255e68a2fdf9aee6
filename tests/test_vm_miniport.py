"""The miniport inside the VM: vfio-pci behind the virtual IOMMU, DMA from
2 MiB huge pages, MSI-X through eventfds.  It ARPs for and pings a Linux
peer in a network namespace, on the device's TAP, and the device's pcap
shows the exchanges.  One boot for the module."""
import json
import os

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP
from scapy.utils import rdpcap

from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs
from chimney.host.qemu import run_in_guest

pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

ADDR = PeerAddrs()
COUNT = 5


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("vm-miniport")
    pcap = d / "wire.pcap"
    with Netns("vmmp") as ns:
        with DeviceProcess(str(d / "nic.sock"), tap="chim0", netns=ns.name, pcap=str(pcap),
                           log_path=str(d / "device.log")) as dev:
            ns.configure_peer("chim0", ADDR)
            res = run_in_guest(f"python3 -m chimney.guest.selftest arp-ping --peer {ADDR.peer4} "
                               f"--ip {ADDR.guest4} --count {COUNT} --json",
                               vfio_user_socket=dev.socket, workdir=d / "vm", timeout=300)
            peer_mac = ns.run("cat", "/sys/class/net/chim0/address").stdout.strip()
            alive = dev.alive
            log = dev.log_text()
    try:
        report = json.loads(res.stdout)
    except ValueError:
        report = None
    return res, report, peer_mac, pcap, alive, log


def test_selftest_succeeds(guest_run):
    res, report, _, _, alive, log = guest_run
    assert res.rc == 0, (res.stdout.decode(), res.stderr.decode())
    assert report is not None and report["ok"], res.stdout.decode()
    assert report["link_up"]
    assert alive and "Traceback" not in log, log[-3000:]


def test_arp_reply_from_the_peer(guest_run):
    _, report, peer_mac, _, _, _ = guest_run
    assert report["peer_mac"] == peer_mac
    assert report["arp_reply_to_us"]


def test_every_ping_answered(guest_run):
    _, report, _, _, _, _ = guest_run
    ping = report["ping"]
    assert ping["sent"] == COUNT and ping["received"] == COUNT, ping
    assert ping["lost"] == [] and ping["bad"] == 0
    assert report["miniport"]["tx_errors"] == report["miniport"]["rx_errors"] == 0


def test_woken_by_msix_not_by_polling(guest_run):
    _, report, _, _, _, _ = guest_run
    irq, stats = report["irq"], report["stats"]
    assert stats["interrupts"] > 0
    # Replies woke the waiting miniport through the RX vector's eventfd (a
    # reply that lands before the wait needs none); no wait ran out.
    assert irq["wakeups"]["2"] >= 1, irq
    assert irq["timeouts"]["2"] == 0, irq
    # A missed interrupt costs the miniport a 0.5 s wait slice.
    assert report["ping"]["rtt_max_ms"] < 400, report["ping"]


def test_no_dma_errors(guest_run):
    _, report, _, _, _, _ = guest_run
    stats = report["stats"]
    assert stats["dma_errors"] == 0 and stats["desc_errors"] == 0, stats
    assert report["dma_err_info"] >> 8 == 0, hex(report["dma_err_info"])
    assert stats["tx_frames"] >= 1 + COUNT and stats["rx_frames"] >= 1 + COUNT, stats
    # DMA memory sits above 4 GiB in IOVA space, one huge-page chunk.
    assert [c["size"] for c in report["dma_chunks"]] == [2 << 20]
    assert int(report["dma_chunks"][0]["iova"], 16) >= 1 << 32


def test_pcap_has_arp_and_icmp(guest_run):
    _, report, peer_mac, pcap, _, _ = guest_run
    mac = report["mac"]
    kinds = []
    for f in rdpcap(str(pcap)):
        if ARP in f and {f[ARP].psrc, f[ARP].pdst} == {ADDR.guest4, ADDR.peer4}:
            kinds.append(("arp", f[ARP].op, f.src))
        elif ICMP in f and IP in f and {f[IP].src, f[IP].dst} == {ADDR.guest4, ADDR.peer4}:
            kinds.append(("icmp", f[ICMP].type, f.src))
    assert ("arp", 1, mac) in kinds and ("arp", 2, peer_mac) in kinds, kinds
    assert kinds.index(("arp", 1, mac)) < kinds.index(("arp", 2, peer_mac))
    assert kinds.count(("icmp", 8, mac)) == COUNT, kinds
    assert kinds.count(("icmp", 0, peer_mac)) == COUNT, kinds
    assert kinds.index(("arp", 2, peer_mac)) < kinds.index(("icmp", 8, mac)) < kinds.index(("icmp", 0, peer_mac))
