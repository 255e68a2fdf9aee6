"""The wire capture is pcapng, end to end on the host bus: the device process on
a TAP in a namespace, a Linux peer there, chimney perf as the guest.  Plain
traffic (neighbour discovery, a transfer the host stack carries) and offloaded transfers over
IPv4 and IPv6 cross the wire; the capture, read back with scapy, names for
each frame its direction (inbound from the peer, outbound from the NIC) and
who sent it (the peer, the host stack's plain TX ring, the TOE), has
nanosecond time stamps in order, and cuts frames to the snap length while
keeping their length (docs/pcap.md)."""
import json
import os
import subprocess
import sys

import pytest

from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

ADDR = PeerAddrs()
TAP = "chim0"
NIC_MAC = "02:c4:1e:00:00:01"       # the device's default MAC
SNAPLEN = 128
NBYTES = 400_000
TIMEOUT = 90
PEER, HOST, TOE = "wire: peer", "wire: host stack (plain TX ring)", "wire: TOE"
INBOUND, OUTBOUND = 1, 2            # epb_flags direction


def transfer(dev, ns, *, port, offload, ipv6):
    """chimney perf on the host bus sends NBYTES to a Linux perf server in the
    namespace; both verify the stream.  Returns the guest's stream summary."""
    perf = [sys.executable, "-u", "-m", "chimney.guest.perf"]
    srv = ns.popen(*perf, "server", "--stack", "linux", "--once", "--json", "--port", str(port),
                   "--accept-timeout", "60", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cli = subprocess.run([*perf, "client", ADDR.peer6 if ipv6 else ADDR.peer4, "--port", str(port),
                              "-n", str(NBYTES), "--json", "-i", "0", "--timeout", str(TIMEOUT),
                              *(["--ipv6"] if ipv6 else []), "--stack", "chimney", "--bus", "host",
                              "--socket", dev.socket, "--ip", f"{ADDR.guest4}/{ADDR.prefix4}",
                              "--ip6", f"{ADDR.guest6}/{ADDR.prefix6}",
                              "--offload", "on" if offload else "off"],
                             check=False, capture_output=True, timeout=TIMEOUT + 30)
        _, serr = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert cli.returncode == 0 and srv.returncode == 0, (cli.stderr[-2000:], serr[-2000:])
    guest = json.loads(cli.stdout.decode().strip().splitlines()[-1])
    assert guest["error"] is None and guest["verified"] is True
    (s,) = guest["summary"]["streams"]
    assert s["sender"]["bytes"] == s["receiver"]["bytes"] == NBYTES
    return s["sender"]


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """One device with a pcapng capture cut to SNAPLEN; ping, a plain transfer
    and offloaded transfers over IPv4 and IPv6.  Returns the capture's raw
    records (bytes, metadata) and scapy's packets of it."""
    # scapy.all, not scapy.utils: the layers to parse the frames with
    from scapy.all import RawPcapNgReader, rdpcap
    tmp = tmp_path_factory.mktemp("pcapng")
    path = tmp / "wire.pcapng"
    with Netns("pcapng") as ns, DeviceProcess(str(tmp / "nic.sock"), tap=TAP, netns=ns.name,
                                              pcap=str(path), snaplen=SNAPLEN,
                                              log_path=str(tmp / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        plain = transfer(dev, ns, port=7301, offload=False, ipv6=False)
        off4 = transfer(dev, ns, port=7302, offload=True, ipv6=False)
        off6 = transfer(dev, ns, port=7303, offload=True, ipv6=True)
        assert dev.alive and "Traceback" not in dev.log_text(), dev.log_text()[-3000:]
    assert plain["offloaded"] is False and plain["software_data_segments_out"] > 0
    assert off4["offloaded"] is True and off6["offloaded"] is True
    with RawPcapNgReader(str(path)) as r:
        raw = list(r)
    return raw, rdpcap(str(path))


def _tcp(f):
    from scapy.all import TCP
    return f.getlayer(TCP)


def _payload_len(f) -> int:
    """The TCP payload's length from the headers (the capture may hold less)."""
    from scapy.all import IP, IPv6
    t = _tcp(f)
    ip_payload = f[IP].len - 4 * f[IP].ihl if IP in f else f[IPv6].plen
    return ip_payload - 4 * t.dataofs


def _conn(frames, port):
    """The frames of the data connection to the perf server's `port`: the
    guest's (to the port) and the peer's (from it), of the flow carrying the
    most data."""
    flows = {}
    for f in frames:
        t = _tcp(f)
        if t is not None and port in (t.sport, t.dport):
            guest_port = t.sport if t.dport == port else t.dport
            flows.setdefault(guest_port, []).append(f)
    data = max(flows.values(), key=lambda fs: sum(_payload_len(f) for f in fs if _tcp(f).dport == port))
    return [f for f in data if _tcp(f).dport == port], [f for f in data if _tcp(f).sport == port]


def test_direction_follows_the_sender(capture):
    _, frames = capture
    assert {f.sniffed_on for f in frames} == {PEER, HOST, TOE}
    for f in frames:
        assert f.direction == (INBOUND if f.sniffed_on == PEER else OUTBOUND), f.summary()
        # the NIC's frames carry its MAC, the peer's never
        assert (f.src == NIC_MAC) == (f.sniffed_on != PEER), f.summary()


def test_neighbour_discovery_and_plain_transfer_come_from_the_host_stack(capture):
    from scapy.all import ARP, ICMPv6ND_NA, ICMPv6ND_NS
    _, frames = capture
    for kind in (ARP, (ICMPv6ND_NS, ICMPv6ND_NA)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        nd = [f for f in frames if any(k in f for k in kinds)]
        assert {f.sniffed_on for f in nd} == {HOST, PEER}, [(f.summary(), f.sniffed_on) for f in nd]
    out, back = _conn(frames, 7301)
    assert sum(_payload_len(f) for f in out) >= NBYTES
    assert {f.sniffed_on for f in out} == {HOST}
    assert {f.sniffed_on for f in back} == {PEER}


@pytest.mark.parametrize("port,ipv6", [(7302, False), (7303, True)], ids=["ipv4", "ipv6"])
def test_offloaded_connection_handshake_in_software_data_from_the_toe(capture, port, ipv6):
    from scapy.all import IP, IPv6
    _, frames = capture
    out, back = _conn(frames, port)
    assert all((IPv6 if ipv6 else IP) in f for f in out + back)
    syn, ack = out[0], out[1]
    assert _tcp(syn).flags == "S" and syn.sniffed_on == HOST
    assert _tcp(back[0]).flags == "SA" and back[0].sniffed_on == PEER
    assert _tcp(ack).flags == "A" and _payload_len(ack) == 0 and ack.sniffed_on == HOST
    data = [f for f in out if _payload_len(f)]
    assert sum(_payload_len(f) for f in data) >= NBYTES
    assert {f.sniffed_on for f in data} == {TOE}
    assert {f.sniffed_on for f in back} == {PEER}
    if not ipv6:
        # what the IPv4 identification says (the TOE's upper half) agrees
        for f in out:
            assert (f[IP].id >= 0x8000) == (f.sniffed_on == TOE), f.summary()


def test_nanosecond_stamps_in_order(capture):
    raw, _ = capture
    stamps = []
    for _, meta in raw:
        assert meta.tsresol == 10 ** 9
        stamps.append((meta.tshigh << 32) | meta.tslow)
    assert stamps == sorted(stamps)
    assert any(ns % 1000 for ns in stamps)      # finer than microseconds


def test_snaplen_cuts_frames_and_keeps_their_length(capture):
    raw, frames = capture
    assert all(len(data) == min(meta.wirelen, SNAPLEN) for data, meta in raw)
    cut = [(data, meta) for data, meta in raw if meta.wirelen > SNAPLEN]
    assert len(cut) > NBYTES // 1500
    assert max(meta.wirelen for _, meta in raw) == 1514
    # a cut frame's length is its IP datagram's, as the headers say
    for f in frames:
        if f.wirelen > SNAPLEN and _tcp(f) is not None:
            assert f.wirelen == 14 + (f["IP"].len if f.haslayer("IP") else 40 + f["IPv6"].plen)
