"""Segmentation offload on the wire (the TAP's virtio-net header), end to end on
the host bus: the device process on a TAP in a namespace, a Linux peer there,
chimney perf on the host bus.  An offloaded transfer leaves as super-segments
the kernel cuts (wire_tso_out) and arrives as the peer's super-segments whole
(wire_gso_in), sha256-verified both ways; the software path gets the peer's
super-segments cut into MTU-sized frames in C (wire_segmented); the pcap shows
the MSS-sized segments the wire carries, with valid checksums; --wire-offloads
off and a kernel that refuses TUNSETOFFLOAD fall back to one frame per
read/write."""
import ast
import errno
import fcntl
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

ADDR = PeerAddrs()
TAP = "chim0"
MB20 = 20_000_000
PCAP_BYTES = 1_500_000
TIMEOUT = 150


def perf(*args):
    return [sys.executable, "-u", "-m", "chimney.guest.perf", *map(str, args)]


def run(dev, ns, *, nbytes, port, reverse, offload=True, ipv6=False):
    """The guest (chimney perf on the host bus) as client, the Linux peer as
    server; reverse: the peer sends.  Returns the guest's and the peer's results."""
    srv = ns.popen(*perf("server", "--stack", "linux", "--once", "--json", "--port", port,
                         "--accept-timeout", 60), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cli_cmd = perf("client", ADDR.peer6 if ipv6 else ADDR.peer4, "--port", port, "-n", nbytes, "--json",
                   "-i", 0, "--timeout", TIMEOUT, *(["-R"] if reverse else []), *(["--ipv6"] if ipv6 else []),
                   "--stack", "chimney", "--bus", "host", "--socket", dev.socket,
                   "--ip", f"{ADDR.guest4}/{ADDR.prefix4}", "--ip6", f"{ADDR.guest6}/{ADDR.prefix6}",
                   "--offload", "on" if offload else "off")
    try:
        cli = subprocess.run(cli_cmd, check=False, capture_output=True, timeout=TIMEOUT + 30)
        sout, serr = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert cli.returncode == 0 and srv.returncode == 0, (cli.stdout[-2000:], cli.stderr[-2000:], serr[-2000:])
    guest = json.loads(cli.stdout.decode().strip().splitlines()[-1])
    linux = json.loads(sout.decode().strip().splitlines()[-1])
    for res in (guest, linux):
        assert res["error"] is None and res["verified"] is True
        (s,) = res["summary"]["streams"]
        assert s["sender"]["bytes"] == s["receiver"]["bytes"] == nbytes
        assert s["sender"]["sha256"] == s["receiver"]["sha256"]
    assert guest["summary"]["streams"][0]["sender"]["sha256"] == linux["summary"]["streams"][0]["sender"]["sha256"]
    return guest, linux


@pytest.fixture(scope="module")
def wire(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tso")
    with Netns("tso") as ns, DeviceProcess(str(tmp / "nic.sock"), tap=TAP, netns=ns.name,
                                           log_path=str(tmp / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        yield dev, ns
        assert dev.alive, dev.log_text()[-3000:]
        assert "Traceback" not in dev.log_text(), dev.log_text()[-3000:]
        assert "wire offloads on" in dev.log_text()


@pytest.mark.parametrize("reverse", [False, True], ids=["guest-sends", "guest-receives"])
def test_offloaded_20mb_through_tso_and_gso(wire, reverse):
    dev, ns = wire
    guest, _ = run(dev, ns, nbytes=MB20, port=7101 + reverse, reverse=reverse)
    (s,) = guest["summary"]["streams"]
    mine = s["receiver"] if reverse else s["sender"]
    assert mine["offloaded"] is True and mine["software_data_segments_out"] == 0
    d = guest["stack_stats"]["device"]
    if reverse:
        # the peer's segments came whole: far fewer reads than MSS-sized segments
        assert d["offload_bytes_in"] >= MB20 - (1 << 20), d
        assert d["wire_gso_in"] > 0, d
        assert d["offload_segs_in"] < MB20 // 1448 // 2, d
    else:
        # the TOE's bursts left as super-segments, each several segments long
        assert d["offload_bytes_out"] >= MB20, d
        assert d["wire_tso_out"] > 0, d
        assert d["offload_segs_out"] > 4 * d["wire_tso_out"], d
    print(f"\nwire offloads on, offloaded, guest {'receives' if reverse else 'sends'}: "
          f"{mine['mbps']:.1f} Mbit/s; device {d}")


@pytest.mark.parametrize("reverse", [False, True], ids=["guest-sends", "guest-receives"])
def test_offloaded_ipv6_through_tso6_and_gso(wire, reverse):
    dev, ns = wire
    guest, _ = run(dev, ns, nbytes=5_000_000, port=7105 + reverse, reverse=reverse, ipv6=True)
    (s,) = guest["summary"]["streams"]
    assert ":" in guest["remote"]["host"]
    assert (s["receiver"] if reverse else s["sender"])["offloaded"] is True
    d = guest["stack_stats"]["device"]
    assert d["wire_gso_in" if reverse else "wire_tso_out"] > 0, d


def test_impaired_link_segments_before_the_impairment(tmp_path):
    """An impaired link: the TOE's bursts leave one segment per write and the
    peer's super-segments are cut before the impairment, so loss, delay and
    reordering act per segment; the transfer still verifies both ways."""
    from scapy.all import rdpcap
    pcap = tmp_path / "wire.pcap"
    with Netns("tsoi") as ns, DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=ns.name,
                                            pcap=str(pcap), impair="delay=2ms,loss=1%,reorder=5%,seed=3",
                                            log_path=str(tmp_path / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        out, _ = run(dev, ns, nbytes=2_000_000, port=7141, reverse=False)
        back, _ = run(dev, ns, nbytes=2_000_000, port=7142, reverse=True)
    assert out["stack_stats"]["device"]["wire_tso_out"] == 0
    assert out["stack_stats"]["device"]["offload_segs_out"] > 2_000_000 // 1460
    d = back["stack_stats"]["device"]
    assert d["wire_gso_in"] > 0 and d["wire_segmented"] > 2 * d["wire_gso_in"], d
    assert max(len(f) for f in rdpcap(str(pcap))) <= 1514
    log = dev.log_text()
    assert "Traceback" not in log
    for side in ("tx", "rx"):
        m = re.search(rf"impairment {side} \(.*?\): (\{{.*?\}})", log)
        assert m and ast.literal_eval(m.group(1))["lost"] > 0, log[-2000:]


def test_software_path_gets_super_segments_cut_to_mtu(wire):
    """The host stack (no TOE) receives the peer's super-segments as MTU-sized
    frames in its RX ring, cut and checksummed in C; what it sends goes as
    plain frames."""
    dev, ns = wire
    guest, _ = run(dev, ns, nbytes=5_000_000, port=7111, reverse=True, offload=False)
    d = guest["stack_stats"]["device"]
    assert d["wire_gso_in"] > 0 and d["wire_segmented"] > 4 * d["wire_gso_in"], d
    assert d["wire_tso_out"] == 0, d
    tcp = guest["stack_stats"]["tcp"]
    assert tcp.get("tcp_internal_error", 0) == 0
    assert guest["stack_stats"]["iface"].get("drop_bad_checksum", 0) == 0, guest["stack_stats"]["iface"]


def _tcp_checksum_ok(pkt) -> bool:
    from scapy.all import IP, TCP, IPv6
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    again = ip.__class__(bytes(ip))
    got = again[TCP].chksum
    del again[TCP].chksum
    return again.__class__(bytes(again))[TCP].chksum == got


def test_pcap_shows_the_mss_segments_the_wire_carries(tmp_path):
    """Both directions super-segmented on the TAP; the capture holds the
    MSS-sized segments (valid IP and TCP checksums, every byte of the stream
    once in order on a clean link), never a super-frame."""
    from scapy.all import IP, TCP, rdpcap
    pcap = tmp_path / "wire.pcap"
    with Netns("tsop") as ns, DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=ns.name,
                                            pcap=str(pcap), log_path=str(tmp_path / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        out, _ = run(dev, ns, nbytes=PCAP_BYTES, port=7121, reverse=False)
        back, _ = run(dev, ns, nbytes=PCAP_BYTES, port=7122, reverse=True)
    assert out["stack_stats"]["device"]["wire_tso_out"] > 0
    assert back["stack_stats"]["device"]["wire_gso_in"] > 0
    frames = rdpcap(str(pcap))
    assert max(len(f) for f in frames) <= 1514
    for port, guest_sends in ((7121, True), (7122, False)):
        # the run's data connection: the flow to or from `port` carrying the most bytes
        flows = {}
        for f in frames:
            if TCP in f and IP in f and port in (f[TCP].sport, f[TCP].dport) and len(f[TCP].payload) \
                    and (f[IP].src == ADDR.guest4) == guest_sends:
                flows.setdefault((f[TCP].sport, f[TCP].dport), []).append(f)
        data = max(flows.values(), key=lambda fs: sum(len(f[TCP].payload) for f in fs), default=None)
        assert data, port
        sizes = [len(f[TCP].payload) for f in data]
        mss = max(sizes)
        assert mss <= 1460 and sizes.count(mss) > len(sizes) // 2, sizes[:50]
        for f in data:
            ip = f[IP]
            assert IP(bytes(ip)).chksum == ip.chksum
            assert ip.len == len(bytes(ip))
            assert _tcp_checksum_ok(f), f.summary()
            if guest_sends:
                assert ip.id >= 0x8000          # the TOE's segments: the upper half
        # the perf header and the stream's bytes, each once, in order
        seqs = [f[TCP].seq for f in data]
        for a, b, n in zip(seqs, seqs[1:], sizes):
            assert (b - a) % (1 << 32) == n, (a, b, n)
        assert sum(sizes) >= PCAP_BYTES


def test_wire_offloads_off(tmp_path):
    with Netns("tsoo") as ns, DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=ns.name,
                                            wire_offloads="off", log_path=str(tmp_path / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        flags = int(ns.run("cat", f"/sys/class/net/{TAP}/tun_flags").stdout, 16)
        assert not flags & 0x4000                   # no IFF_VNET_HDR
        for reverse in (False, True):
            guest, _ = run(dev, ns, nbytes=3_000_000, port=7131 + reverse, reverse=reverse)
            d = guest["stack_stats"]["device"]
            assert d["wire_tso_out"] == d["wire_gso_in"] == d["wire_segmented"] == 0, d
        assert "wire offloads off" in dev.log_text()


def test_refused_offload_falls_back_and_logs_once(monkeypatch, caplog):
    """A kernel that refuses TUNSETOFFLOAD: the TAP is opened again without the
    header, one warning says so, and frames still pass."""
    from chimney.device import wire
    real = fcntl.ioctl

    def refusing(fd, req, *a):
        if req == wire.TUNSETOFFLOAD:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, req, *a)

    monkeypatch.setattr(wire.fcntl, "ioctl", refusing)
    with Netns("tsof") as ns:
        caplog.set_level(logging.INFO, logger="chimney.device.wire")
        tap = wire.Tap(TAP, ns.name)
        try:
            assert tap.offloads is False
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "refused segmentation offload" in warnings[0].getMessage()
            flags = int(ns.run("cat", f"/sys/class/net/{TAP}/tun_flags").stdout, 16)
            assert not flags & 0x4000
            # a frame written now is a plain frame: the namespace's interface counts it
            frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(46)
            before = int(ns.run("cat", f"/sys/class/net/{TAP}/statistics/rx_packets").stdout)
            assert os.write(tap.fd, frame) == len(frame)
            after = int(ns.run("cat", f"/sys/class/net/{TAP}/statistics/rx_packets").stdout)
            assert after == before + 1
        finally:
            tap.close()


def test_bad_tap_is_one_line_and_an_exit_code(tmp_path):
    res = subprocess.run([sys.executable, "-m", "chimney.device", "--socket", str(tmp_path / "s"),
                          "--tap", "x" * 20], check=False, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2                     # a usage error (README: exit codes)
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("chimney device: --tap ")
