"""The host bus against a real Linux peer: the miniport ARPs and pings a
namespace's kernel through the device's TAP, and the pcap shows it all."""
import os
import time

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from chimney.guest.bringup import bring_up
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

ADDR = PeerAddrs()


@pytest.fixture
def wired(tmp_path):
    with Netns("wire") as ns:
        pcap = tmp_path / "wire.pcap"
        with DeviceProcess(str(tmp_path / "nic.sock"), tap="chim0", netns=ns.name,
                           pcap=str(pcap)) as dev:
            ns.configure_peer("chim0", ADDR)
            g = bring_up(socket=dev.socket, stack=False)
            mp = g.mp
            try:
                yield mp, ns, pcap, dev
            finally:
                g.close()
            assert dev.alive, dev.log_text()


def wait_for(mp, match, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw = mp.recv(timeout=max(0.0, end - time.monotonic()))
        if raw is None:
            break
        pkt = Ether(raw)
        if match(pkt):
            return pkt
    return None


def test_arp_and_ping_linux_peer(wired):
    mp, ns, pcap, dev = wired
    mac = mp.mac.hex(":")
    assert mp.link_up
    arp = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op="who-has", hwsrc=mac, psrc=ADDR.guest4, pdst=ADDR.peer4)
    mp.send(bytes(arp))
    reply = wait_for(mp, lambda p: ARP in p and p[ARP].op == 2 and p[ARP].psrc == ADDR.peer4)
    assert reply is not None, "no ARP reply from the Linux peer"
    assert reply[ARP].pdst == ADDR.guest4 and reply.dst == mac
    peer_mac = reply[ARP].hwsrc

    payload = os.urandom(56)
    echo = Ether(src=mac, dst=peer_mac) / IP(src=ADDR.guest4, dst=ADDR.peer4) / \
        ICMP(type=8, id=0x4321, seq=7) / payload
    mp.send(bytes(echo))
    pong = wait_for(mp, lambda p: ICMP in p and p[ICMP].type == 0)
    assert pong is not None, "no ICMP echo reply"
    assert pong[ICMP].id == 0x4321 and pong[ICMP].seq == 7 and bytes(pong[ICMP].payload) == payload
    assert pong[IP].src == ADDR.peer4

    # The Linux side saw it too.
    assert "chim0" in ns.run("ip", "-s", "link", "show", "chim0").stdout
    stats = mp.stats()
    assert stats["tx_frames"] >= 2 and stats["rx_frames"] >= 2 and stats["dma_errors"] == 0

    # Both exchanges are on the wire, in order, in the device's pcap.
    frames = rdpcap(str(pcap))
    kinds = []
    for f in frames:
        if ARP in f and f[ARP].psrc in (ADDR.guest4, ADDR.peer4):
            kinds.append(("arp", f[ARP].op))
        elif ICMP in f:
            kinds.append(("icmp", f[ICMP].type))
    for want in [("arp", 1), ("arp", 2), ("icmp", 8), ("icmp", 0)]:
        assert want in kinds, f"{want} missing from pcap: {kinds}"
    assert kinds.index(("arp", 1)) < kinds.index(("arp", 2)) < kinds.index(("icmp", 8)) \
        < kinds.index(("icmp", 0))


def test_mac_filter_and_rx_counters(wired):
    """Frames to other unicast MACs are filtered; broadcast gets through."""
    mp, ns, pcap, dev = wired
    # The peer sends a datagram to our address: its ARP broadcast reaches us.
    ns.run("python3", "-c", "import socket;socket.socket(socket.AF_INET,socket.SOCK_DGRAM)"
           f".sendto(b'x',('{ADDR.guest4}',9))")
    got = wait_for(mp, lambda p: ARP in p and p[ARP].op == 1 and p[ARP].pdst == ADDR.guest4)
    assert got is not None, "the peer's ARP broadcast did not arrive"
    before = mp.stats()["rx_filtered"]
    # A frame for someone else, injected on the peer side with a packet socket.
    script = ("import socket;s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW);s.bind(('chim0',0));"
              "s.send(bytes.fromhex('02aabbccddee'+'02aabbccddef'+'88b5')+bytes(50))")
    ns.run("python3", "-c", script)
    end = time.monotonic() + 3
    while mp.stats()["rx_filtered"] == before and time.monotonic() < end:
        time.sleep(0.05)
    assert mp.stats()["rx_filtered"] == before + 1
