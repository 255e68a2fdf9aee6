"""The device's emulated bad link (netem's delay, loss and reordering: the
test hosts have no sch_netem): frames numbered by the sender are captured on
the other side of the wire, and what arrives, when and in which order is
checked."""
import json
import os
import struct
import subprocess
import time

import pytest

from chimney.device.impair import Impairment, ImpairSpecError
from chimney.guest.bringup import bring_up
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns

ETHERTYPE = 0x88B5
TAP = "chimp0"

CAPTURE = r'''
import json, socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)   # a burst must not overflow it
s.bind((sys.argv[1], 0))
s.settimeout(0.5)
want, end, seen = int(sys.argv[2]), time.monotonic() + float(sys.argv[3]), []
print("ready", flush=True)
while len(seen) < want and time.monotonic() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    seen.append([struct.unpack_from("!I", f, 14)[0], time.monotonic()])
print(json.dumps(seen), flush=True)
'''

SEND = r'''
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
dst = bytes.fromhex(sys.argv[2].replace(":", ""))
for i in range(int(sys.argv[3])):
    s.send(dst + bytes.fromhex("02aabbccddee") + struct.pack("!HI", 0x88b5, i) + bytes(46))
'''


def test_spec_parsing():
    imp = Impairment("delay=20ms,jitter=1ms,loss=2.5%,reorder=25%,seed=3,limit=50")
    assert (imp.c.delay_us, imp.c.jitter_us, imp.c.loss_ppm, imp.c.reorder_ppm, imp.c.cap) == \
        (20_000, 1_000, 25_000, 250_000, 50)
    for bad in ("delay=20", "loss=120%", "colour=red", "reorder=10%", "limit=0", "delay"):
        with pytest.raises(ImpairSpecError):
            Impairment(bad)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def overtaken(seq):
    """Frames that arrived after a higher-numbered one (netem's reordering
    of a burst gives 'all jumpers, then all delayed': one adjacent
    inversion, but many overtaken frames)."""
    top, n = -1, 0
    for x in seq:
        n += x < top
        top = max(top, x)
    return n


class Link:
    def __init__(self, tmp_path, impair):
        self.ns = Netns("imp")
        self.dev = DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=self.ns.name,
                                 impair=impair, log_path=str(tmp_path / "device.log"))
        self.ns.wait_link(TAP)
        self.ns.run("sysctl", "-qw", f"net.ipv6.conf.{TAP}.disable_ipv6=1")
        self.ns.run("ip", "link", "set", TAP, "up")
        self.g = bring_up(socket=self.dev.socket, ring_size=512, stack=False)
        self.bus, self.mp = self.g.bus, self.g.mp

    def capture(self, count, seconds):
        p = self.ns.popen("python3", "-c", CAPTURE, TAP, str(count), str(seconds),
                          stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        return p

    def send_numbered(self, n):
        frames = [b"\x02\xaa\xbb\xcc\xdd\xee" + self.mp.mac + struct.pack("!HI", ETHERTYPE, i) + bytes(46)
                  for i in range(n)]
        t0 = time.monotonic()
        self.mp.send_many(frames)
        assert self.mp.flush_tx(5)
        return t0

    def close(self):
        self.bus.close()
        self.dev.stop()
        log = self.dev.log_text()
        self.ns.delete()
        assert "Traceback" not in log, log[-3000:]
        return log


@pytest.fixture
def link(tmp_path, request):
    lk = Link(tmp_path, request.param)
    yield lk
    lk.close()


@needs_root
@pytest.mark.parametrize("link", ["delay=40ms"], indirect=True)
def test_delay(link):
    cap = link.capture(50, 5)
    t0 = link.send_numbered(50)
    seen = json.loads(cap.communicate(timeout=10)[0])
    assert [s for s, _ in seen] == list(range(50)), "delay alone must neither lose nor reorder"
    first = seen[0][1] - t0
    assert 0.035 <= first < 1.0, f"first frame after {first * 1e3:.1f} ms, delay is 40 ms"


@needs_root
@pytest.mark.parametrize("link", ["loss=20%,seed=11"], indirect=True)
def test_loss(link):
    cap = link.capture(1000, 3)
    link.send_numbered(1000)
    got = [s for s, _ in json.loads(cap.communicate(timeout=10)[0])]
    assert got == sorted(got), "loss alone must not reorder"
    assert 700 <= len(got) <= 900, f"{len(got)} of 1000 arrived with 20% loss"
    assert link.mp.stats()["tx_frames"] == 1000, "the NIC sent them all; the link lost some"


@needs_root
@pytest.mark.parametrize("link", ["delay=20ms,reorder=30%,seed=5"], indirect=True)
def test_reorder(link):
    cap = link.capture(300, 5)
    link.send_numbered(300)
    got = [s for s, _ in json.loads(cap.communicate(timeout=10)[0])]
    assert sorted(got) == list(range(300)), "reordering must not lose frames"
    assert overtaken(got) >= 20, f"only {overtaken(got)} frames overtaken with 30% reordering"


@needs_root
@pytest.mark.parametrize("link", ["delay=20ms,reorder=30%,loss=10%,seed=9"], indirect=True)
def test_receive_direction(link):
    link.ns.run("python3", "-c", SEND, TAP, link.mp.mac.hex(":"), "300")
    got, end = [], time.monotonic() + 5
    while time.monotonic() < end and len(got) < 300:
        f = link.mp.recv(timeout=0.3)
        if f is None:
            if got:
                break
            continue
        if f[12:14] == struct.pack("!H", ETHERTYPE):
            got.append(struct.unpack_from("!I", f, 14)[0])
    assert 230 <= len(got) < 300 and len(set(got)) == len(got), len(got)
    assert overtaken(got) >= 10
