"""The NIC's link taken down and up while it runs (the device's control socket,
chimney.device.control), on the host bus: the guest's miniport, chimney calls,
offload manager and host stack in this process, the device process on a TAP
in a namespace, a Linux peer in that namespace.

Link down drops frames both ways (counted), clears STATUS.LINK_UP, raises
CAUSE.LINK on the misc vector and sends PAUSE + UPLOAD_ALL: the offload manager
uploads every connection and carries on in software; link up sends RESUME and
the connections are offloaded again; the transfers finish sha256-verified."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time

import pytest

from chimney import hw
from chimney.device.control import ControlError, request
from chimney.guest.bus.vfio_user import VfioUserBus
from chimney.guest.miniport import Miniport
from chimney.guest.chimney_calls import Chimney
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.offload import OffloadManager
from chimney.host.device import DeviceProcess
from chimney.host.netns import PeerAddrs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

ADDR = PeerAddrs()
NBYTES = 6_000_000          # per connection and direction
DOWN_SECONDS = 1.0


class Guest:
    """Miniport + chimney + host stack + offload manager on a device's socket."""

    def __init__(self, dev, policy="never"):
        self.bus = VfioUserBus(dev.socket)
        self.mp = Miniport(self.bus)
        self.mp.up()
        self.stack = HostStack.on_miniport(self.mp, ipv4=(ADDR.guest4, ADDR.prefix4))
        self.stack.up()
        self.ch = Chimney(self.mp)
        assert self.ch.supported
        self.ch.up()
        self.mgr = OffloadManager(self.stack, self.ch, policy)

    def arm_misc(self):
        self.bus.clear_irq(hw.VECTOR_MISC)
        struct.pack_into("<I", self.mp.db, hw.DB_ARM_BASE + 4 * hw.VECTOR_MISC, 1)

    def close(self):
        with contextlib.suppress(Exception):
            self.mp.down()
        self.bus.close()


def pattern(seed: str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# A Linux peer: accepts one connection, sends `send` bytes of pattern(seed) while reading to
# EOF, shuts its side down; prints one JSON line with what it received.
PEER = r'''
import hashlib, json, random, select, socket, sys, time
a = json.loads(sys.argv[1])
ls = socket.create_server(("0.0.0.0", a["port"]))
print("listening", flush=True)
c, _ = ls.accept()
data = random.Random(a["seed"]).randbytes(a["send"])
c.setblocking(False)
h, got, off, shut, eof = hashlib.sha256(), 0, 0, False, False
end = time.monotonic() + a["timeout"]
while time.monotonic() < end and not (eof and shut):
    r, w, _ = select.select([c], [c] if off < len(data) else [], [], 0.2)
    if w:
        try:
            off += c.send(data[off:off + 65536])
        except BlockingIOError:
            pass
    if off >= len(data) and not shut:
        c.shutdown(socket.SHUT_WR)
        shut = True
    if r:
        try:
            b = c.recv(1 << 20)
        except BlockingIOError:
            b = None
        if b == b"":
            eof = True
        elif b:
            h.update(b)
            got += len(b)
print(json.dumps({"got": got, "sha256": h.hexdigest(), "sent": off}), flush=True)
'''


def start_peer(ns, port, seed, send, timeout=120):
    p = ns.popen(sys.executable, "-c", PEER, json.dumps({"port": port, "seed": seed, "send": send,
                                                         "timeout": timeout}),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"listening"
    return p


class Stream:
    """One guest connection: sends its pattern, keeps what it receives."""

    def __init__(self, sock, out: bytes):
        self.sock, self.out, self.off, self.rx, self.eof = sock, out, 0, bytearray(), False

    def step(self) -> bool:
        moved = False
        if self.off < len(self.out) and self.sock.path.writable():
            n = self.sock.send(self.out[self.off:self.off + 65536], timeout=0)
            self.off += n
            moved = n > 0
        if not self.eof:
            try:
                b = self.sock.recv(1 << 20, timeout=0)
                if b:
                    self.rx += b
                    moved = True
                elif b == b"":
                    self.eof = True
            except BlockingIOError:
                pass
        return moved


def run(g, streams, until, timeout, what):
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, f"{what}: timed out at " + \
            ", ".join(f"sent {s.off} received {len(s.rx)}" for s in streams)
        moved = [s.step() for s in streams]        # every stream, each round
        if not any(moved):
            g.stack.step(0.005)


def test_link_down_mid_transfer_uploads_all_then_finishes(wire):
    dev, ns = wire
    g = Guest(dev, policy="always")     # offloaded right after the handshake, and again when welcome
    peers = []
    try:
        peers = [start_peer(ns, 6300 + i, f"peer{i}", NBYTES) for i in range(2)]
        streams = [Stream(g.stack.connect(ADDR.peer4, 6300 + i, timeout=10), pattern(f"guest{i}", NBYTES))
                   for i in range(2)]
        assert all(s.sock.offloaded for s in streams)
        run(g, streams, lambda: any(s.off >= NBYTES // 4 and len(s.rx) >= NBYTES // 4 for s in streams),
            60, "before the link went down")
        assert all(s.off < NBYTES and len(s.rx) < NBYTES for s in streams)    # mid-transfer, both ways
        assert g.mp.link_up and g.mp.rd(hw.REG_CAUSE) == 0
        before = dev.status()
        assert before["link"] == "up" and before["stats"]["offload_conns"] == 2

        g.arm_misc()
        assert dev.link(False) is True
        assert dev.link(False) is False                 # already down: nothing changes
        assert g.bus.wait_irq(hw.VECTOR_MISC, 2.0), "no misc interrupt for the link change"
        assert not g.mp.link_up
        assert g.mp.rd(hw.REG_CAUSE) == hw.CAUSE_LINK
        assert g.mp.rd(hw.REG_CAUSE) == 0               # read clears
        t_down = time.monotonic()
        run(g, streams, lambda: time.monotonic() - t_down >= DOWN_SECONDS, 10, "link down")
        # the status indication arrived and every connection went back to software
        assert g.ch.stats["ev_upload_all"] == 1 and g.mgr.stats["upload_all"] == 1
        assert g.ch.stats["ev_pause"] == 1 and g.ch.paused
        assert g.mgr.stats["uploaded"] == 2
        assert all(not s.sock.path.offloaded() and s.sock.upload_count == 1 for s in streams)
        down = dev.status()
        assert down["link"] == "down" and down["stats"]["offload_conns"] == 0
        # both ways the wire lost frames: our software retransmissions, the peer's
        assert down["link_drops_tx"] > 0 and down["link_drops_rx"] > 0
        moved_down = [(s.off, len(s.rx)) for s in streams]

        g.arm_misc()
        assert dev.link(True) is True
        assert g.bus.wait_irq(hw.VECTOR_MISC, 2.0), "no misc interrupt for the link change"
        assert g.mp.link_up and g.mp.rd(hw.REG_CAUSE) == hw.CAUSE_LINK
        run(g, streams, lambda: all(s.off >= NBYTES and len(s.rx) >= NBYTES for s in streams),
            90, "after the link came back")
        # RESUME: offloads welcome again, the always policy offloaded both connections again
        assert g.ch.stats["ev_resume"] == 1 and not g.ch.paused
        assert all(s.sock.offload_count == 2 for s in streams), [s.sock.offload_count for s in streams]
        for s in streams:
            s.sock.shutdown()
        run(g, streams, lambda: all(s.eof for s in streams), 30, "the peers' FINs")
        results = [json.loads(p.communicate(timeout=30)[0].decode().strip().splitlines()[-1]) for p in peers]
        for i, (s, res) in enumerate(zip(streams, results)):
            assert bytes(s.rx) == pattern(f"peer{i}", NBYTES)                  # exact, in order
            assert res["got"] == NBYTES and res["sha256"] == hashlib.sha256(s.out).hexdigest()
        assert g.mgr.stats.get("upload_rx_gap", 0) == 0 and g.mgr.stats.get("upload_tx_mismatch", 0) == 0
        after = dev.status()
        assert after["link"] == "up" and after["link_changes"] == before["link_changes"] + 2
        assert after["link_drops_tx"] >= down["link_drops_tx"]      # only counts while down
        print(f"\nlink down {DOWN_SECONDS} s mid-transfer at {moved_down}: UPLOAD_ALL, 2 uploads, "
              f"dropped tx {after['link_drops_tx']} rx {after['link_drops_rx']}, re-offloaded, verified")
        for s in streams:
            s.sock.close()
        g.stack.run_until(lambda: not g.stack.detached, 5)
    finally:
        for p in peers:
            if p.poll() is None:
                p.kill()
                p.communicate()
        g.close()
        with contextlib.suppress(ControlError):
            dev.link(True)


def test_link_down_stops_frames_both_ways(wire):
    """No offload, plain frames: while the link is down the peer's datagrams never reach
    the RX ring and our pings never reach the wire (both counted); after link up our
    pings are answered again."""
    dev, ns = wire
    g = Guest(dev)
    iface = g.stack.iface
    try:
        def we_ping(timeout: float) -> bool:
            seq = iface.ping(ADDR.peer4)
            return g.stack.run_until(lambda: iface.ping_reply(ADDR.peer4, seq) is not None, timeout)

        assert we_ping(5)
        assert dev.link(False)
        st0 = dev.status()
        ns.run(sys.executable, "-c", "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
               f"for _ in range(5): s.sendto(b'lost', ('{ADDR.guest4}', 9))")
        g.stack.step(0.2)
        assert not we_ping(0.5)
        st1 = dev.status()
        assert st1["link_drops_rx"] >= st0["link_drops_rx"] + 5
        assert st1["stats"]["rx_frames"] == st0["stats"]["rx_frames"]      # nothing reached the ring
        assert st1["stats"]["tx_frames"] == st0["stats"]["tx_frames"]      # nothing reached the wire
        assert st1["link_drops_tx"] > st0["link_drops_tx"]
        assert dev.link(True)
        assert we_ping(5)
    finally:
        g.close()
        with contextlib.suppress(ControlError):
            dev.link(True)


# -- the control socket and `chimney device-ctl` -------------------------------------------

def ctl(*args):
    return subprocess.run([sys.executable, "-m", "chimney.cli", "device-ctl", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def test_device_ctl_cli(wire, tmp_path):
    dev, _ = wire
    r = ctl("--control", dev.control, "status")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["link"] == "up" and st["wire"] is True and set(st["stats"]) == {n for n, _ in hw.STATS}
    r = ctl("--socket", dev.socket, "link", "down")
    assert (r.returncode, r.stdout.strip()) == (0, "link down")
    r = ctl("--socket", dev.socket, "link", "down")
    assert r.returncode == 0 and "already" in r.stdout
    assert json.loads(ctl("--control", dev.control, "status").stdout)["link"] == "down"
    r = ctl("--control", dev.control, "link", "up")
    assert (r.returncode, r.stdout.strip()) == (0, "link up")
    # usage errors: exit 2, one line, no traceback
    for args in (["--control", dev.control, "link"], ["--control", dev.control, "link", "sideways"],
                 ["link", "up"], ["--control", dev.control, "status", "up"]):
        r = ctl(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    # nothing there: exit 1 with one clear line
    r = ctl("--control", str(tmp_path / "nothing.ctl"), "status")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot reach" in r.stderr
    # a device without a wire has no link to take down
    with DeviceProcess(str(tmp_path / "nowire.sock")) as bare:
        r = ctl("--socket", bare.socket, "link", "down")
        assert r.returncode == 1 and "no wire" in r.stderr and "Traceback" not in r.stderr
        assert json.loads(ctl("--socket", bare.socket, "status").stdout)["wire"] is False
        assert "Traceback" not in bare.log_text()


def test_bad_requests_change_nothing(wire):
    dev, _ = wire
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(dev.control)
        f = s.makefile("rwb")
        for line in (b"link", b"link sideways", b"reboot", b"\xff\xfe", b"status please", b""):
            f.write(line + b"\n")
            f.flush()
            rep = json.loads(f.readline())
            assert rep["ok"] is False and rep["error"], (line, rep)
        f.write(b"status\n")        # the same connection still serves
        f.flush()
        assert json.loads(f.readline())["link"] == "up"
        f.write(b"x" * 1000)        # no newline, too long: refused, connection closed
        f.flush()
        rep = json.loads(f.readline())
        assert rep["ok"] is False and "longer" in rep["error"]
    assert request(dev.control, "status")["link"] == "up"
    assert dev.alive


# -- the TOE's status events, in process (chimney.device.toe through a Nic) ----------------

def test_status_events_follow_the_link_and_the_table(monkeypatch):
    """PAUSE once (link down or table 90 % full, whichever first), UPLOAD_ALL on every
    link down, RESUME only when the link is up and the table below 80 %."""
    from test_toe_engine import Rig, tree
    r = Rig()
    try:
        monkeypatch.setattr(r.nic.toe, "max_conns", 10)

        def initiate(ports):
            entries = tree()[:2]
            for p in ports:
                t = tree()[2]
                t.state.const.local_port = p
                entries.append(t)
            c, sts = r.drv.initiate(entries)
            assert c["status"] == hw.ST_SUCCESS
            return [s.nic_ctx for s in sts[2:]]

        def status_events():
            return [e["kind"] for e in r.drv.pop(hw.EVENTQ) if e["ctx"] == 0]

        first = initiate([30000])
        assert status_events() == []
        assert r.nic.set_link(False) is True
        r.pump()
        assert status_events() == [hw.EV_PAUSE, hw.EV_UPLOAD_ALL]
        assert not r.nic.reg_read(hw.REG_STATUS, 4) & hw.STATUS_LINK_UP
        assert r.nic.reg_read(hw.REG_CAUSE, 4) == hw.CAUSE_LINK
        assert r.nic.set_link(False) is False
        r.drv.terminate(first)                      # the table drains, the link is still down
        assert status_events() == []
        ctxs = initiate(range(30001, 30010))        # 9 of 10 (INITIATE goes on while paused)
        assert status_events() == []
        assert r.nic.set_link(True) is True
        r.pump()
        assert status_events() == []                # link up, but the table is 90 % full
        assert r.nic.reg_read(hw.REG_STATUS, 4) & hw.STATUS_LINK_UP
        r.drv.terminate(ctxs[:2])
        assert status_events() == [hw.EV_RESUME]    # 7 of 10 and the link up
        assert r.nic.set_link(False) is True        # a second cut: PAUSE and UPLOAD_ALL again
        r.pump()
        assert status_events() == [hw.EV_PAUSE, hw.EV_UPLOAD_ALL]
    finally:
        r.close()


def test_control_socket_path_that_does_not_fit(tmp_path):
    """The default control path is 4 bytes longer than the vfio-user socket's: where only
    the latter fits the device runs without control (and says so); an explicit --control
    that cannot be made is one clear line and exit status 1."""
    room = 107 - len(str(tmp_path)) - len("/nic.sock") - 1        # sun_path holds 107 bytes
    deep = tmp_path / ("d" * (room - 2))
    deep.mkdir()
    sock = str(deep / "nic.sock")
    assert len(sock) <= 107 < len(sock + ".ctl")
    with DeviceProcess(sock, log_path=str(tmp_path / "device.log")) as dev:
        assert dev.alive and "no control socket" in dev.log_text()
        with pytest.raises(ControlError, match="cannot reach"):
            dev.status()
    r = subprocess.run([sys.executable, "-m", "chimney.device", "--socket", str(tmp_path / "x.sock"),
                        "--control", sock + ".ctl"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1 and "--control" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "x.sock")
