"""Hostile offload sequences against a real device process on the host bus, with a
Linux peer in a namespace (the set-up of test_toe_device.py): inconsistent state
records and a bad record in a batch are refused one by one while the offloaded
connection keeps working and QUERY polling leaves it alone; garbled frames aimed at
its 4-tuple from the namespace do not stop a transfer (exact bytes both ways)."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest
from test_toe_device import (
    ADDR,
    GREETING,
    PEER,
    TAIL,
    TAP,
    Mover,
    Rig,
    gen,
    offload_flow,
    software_connect,
)

from chimney import hw
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns
from chimney.staterec import codec
from chimney.staterec.codec import NONE32, ObjEntry

MB = float(os.environ.get("CHIMNEY_TOE_MB", "4"))
GARBLED = 20_000

# Runs in the namespace: sniffs the peer's segments of the flow on the TAP to learn
# its sequence numbers, and sends `count` garbled frames at the NIC for the 4-tuple.
# Frames with a valid checksum carry no data and no FIN/RST/URG (what no receiver can
# tell from the peer's own), and are blind (random SEQ/ACK) or pure ACKs from ahead of
# the peer's SEQ with its ACK (or an old one) and wild windows; frames near the real numbers with any
# flags and data carry a broken TCP or IP checksum.
GARBLER = r"""
import random, socket, struct, sys, time
tap, nic_mac, src, dst, sport, dport, count, seed = sys.argv[1:9]
sport, dport, count = int(sport), int(dport), int(count)
rnd = random.Random(int(seed))
nic_mac = bytes.fromhex(nic_mac)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))   # ETH_P_ALL: sees outgoing too
s.bind((tap, 0))
s.setblocking(False)
my_mac = open(f"/sys/class/net/{tap}/address").read().strip().replace(":", "")
my_mac = bytes.fromhex(my_mac)
sip, dip = socket.inet_aton(src), socket.inet_aton(dst)
def csum(b):
    if len(b) & 1:
        b += b"\0"
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
seq = ack = None
sent = 0
end = time.monotonic() + 90
print("ready", flush=True)
while sent < count and time.monotonic() < end:
    while True:
        try:
            f = s.recv(65536)
        except BlockingIOError:
            break
        if f[6:12] == my_mac and f[14 + 9] == 6 and f[26:30] == sip and \
                struct.unpack("!H", f[34:36])[0] == sport:
            seq, ack = struct.unpack("!II", f[38:46])
    if seq is None:
        time.sleep(0.01)
        continue
    for _ in range(20):
        valid = rnd.random() < 0.5
        wnd = rnd.choice([0, rnd.getrandbits(16)])
        if valid:
            if rnd.random() < 0.5:
                sq, ak = rnd.getrandbits(32), rnd.getrandbits(32)
            else:
                sq = (seq + rnd.randint(1, 70000)) & 0xFFFFFFFF
                ak = (ack + rnd.choice([0, 0, rnd.randint(-70000, 3000)])) & 0xFFFFFFFF
            flags = 0x10 | rnd.choice([0, 0x08, 0x02, 0x40, 0x80, 0xC0])
            payload = b""
        else:
            sq = (seq + rnd.randint(-70000, 70000)) & 0xFFFFFFFF
            ak = (ack + rnd.randint(-70000, 70000)) & 0xFFFFFFFF
            flags = rnd.getrandbits(8)
            payload = rnd.randbytes(rnd.choice([0, 1, 100, 1400]))
        tcp = struct.pack("!HHIIBBHHH", sport, dport, sq, ak, 0x50, flags,
                          wnd, 0, rnd.getrandbits(16)) + payload
        c = csum(sip + dip + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
        if not valid:
            c ^= rnd.randint(1, 0xFFFF)
        tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), rnd.getrandbits(16), 0x4000,
                         64, 6, 0, sip, dip)
        ipc = csum(ip)
        if not valid and rnd.random() < 0.2:
            ipc ^= 0x0101
        ip = ip[:10] + struct.pack("!H", ipc) + ip[12:]
        s.send(nic_mac + my_mac + b"\x08\x00" + ip + tcp)
        sent += 1
        if sent == count:
            break
    time.sleep(0.002)
print("flooded", sent, flush=True)
# the last word, once the flow is idle: a pure ACK from ahead of the peer's SEQ, with
# the current ACK (the test reads both from the NIC), closing the window
seq, ack = map(int, sys.stdin.readline().split())
tcp = struct.pack("!HHIIBBHHH", sport, dport, (seq + 80000) & 0xFFFFFFFF, ack, 0x50, 0x10, 0,
                  0, 0)
tcp = tcp[:16] + struct.pack("!H", csum(sip + dip + struct.pack("!BBH", 0, 6, 20) + tcp)) \
    + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0x4000, 64, 6, 0, sip, dip)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s.send(nic_mac + my_mac + b"\x08\x00" + ip + tcp)
print("closed", flush=True)
"""


@pytest.fixture
def rig(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with Netns("toeh") as ns, DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP,
                                            netns=ns.name,
                                            log_path=str(tmp_path / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        r = Rig(dev, ns)
        r.impaired = False
        try:
            yield r
        finally:
            r.bus.close()
        assert dev.alive, dev.log_text()
        log = dev.log_text()
        assert "data path error" not in log and "internal error" not in log, log[-3000:]


def start_peer(r, port: int, n: int):
    proc = r.ns.popen(sys.executable, "-u", "-c", PEER, ADDR.peer4, str(port), str(n),
                      str(GREETING), str(TAIL), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
    return proc


def finish(r, flow, m, ctxs, proc):
    """Upload; software sends the tail and reads the peer's digest of everything."""
    import hashlib

    from chimney.tcp.engine import Connection
    c, recs = r.drv.terminate(ctxs)
    assert c["status"] == hw.ST_SUCCESS, (c, recs)
    r.drv.pop(hw.OCOMPLQ_FIRST)
    const, cached, d = recs[0].state.const, recs[0].state.cached, recs[0].state.delegated
    const.local_ip, const.remote_ip = ADDR.guest4, ADDR.peer4
    assert d.send_buffer == b""
    flow.conn = Connection.from_state(const, cached, d, r.st.clock(), flow.conn.cfg)
    r.st.flows[flow.key] = flow
    tail = os.urandom(TAIL)
    assert flow.conn.send(tail, r.st.clock()) == TAIL
    r.st.flush()
    got = bytearray()
    end = time.monotonic() + 60
    while len(got) < 64 and time.monotonic() < end:
        r.st.step(0.01)
        got += flow.conn.recv(1 << 16, r.st.clock())
    assert bytes(got[:64]).decode() == hashlib.sha256(m.out[1:] + tail).hexdigest()
    r.st.run_until(lambda: proc.poll() is not None, 30)
    assert proc.wait(timeout=10) == 0, proc.stderr.read().decode()


@pytest.mark.netns
def test_hostile_initiates_and_query_polling_on_a_real_device(rig):
    r = rig
    n = int(MB * 1_000_000) // 4
    proc = start_peer(r, 5211, n)
    try:
        flow = software_connect(r, 5211)
        r.drv.set_params(rto_min_ticks=200, push_ticks=20)
        (n_ctx, p_ctx, ctx), _ = offload_flow(r, flow)
        # a batch linking to the live neighbour and path: the duplicate 4-tuple fails,
        # each bogus record is refused with its own status, the good one is taken
        const, cached, d = flow.conn.export(r.st.clock())
        recs = [ObjEntry(hw.OBJ_NEIGHBOR, 1, NONE32, link=True, nic_ctx=n_ctx),
                ObjEntry(hw.OBJ_PATH, 2, 0, link=True, nic_ctx=p_ctx)]
        spoil = [None, ("snd_nxt", (d.snd_una - 1) % (1 << 32)), ("remote_mss", 0),
                 ("rcv_wnd", 1 << 30), ("dup", None)]
        for i, s in enumerate(spoil):
            t = codec.Tcp(*[x.__class__(**vars(x)) for x in (const, cached, d)])
            if s is None or s[0] != "dup":
                t.const.local_port = 40000 + i
            if s and s[0] == "remote_mss":
                t.const.remote_mss = 0
            elif s and s[0] in ("snd_nxt", "rcv_wnd"):
                setattr(t.delegated, s[0], s[1])
            recs.append(ObjEntry(hw.OBJ_TCP, 100 + i, 1, t))
        c, st = r.drv.initiate(recs)
        assert c["status"] == hw.ST_PARTIAL
        assert [x.status for x in st] == [0, 0, 0, hw.ST_INVALID_REQUEST,
                                          hw.ST_INVALID_REQUEST, hw.ST_INVALID_REQUEST,
                                          hw.ST_FAILURE]
        c, _ = r.drv.terminate([st[2].nic_ctx])
        assert c["status"] == hw.ST_SUCCESS
        # the offloaded connection works, polled by QUERY every 10 ms
        out = b"G" + os.urandom(n)
        m = Mover(r, ctx, out)
        last = [time.monotonic()]

        def done():
            if time.monotonic() - last[0] > 0.01:
                last[0] = time.monotonic()
                c, q = r.drv.query([ctx])
                assert c["status"] == hw.ST_SUCCESS and q[0].state.delegated.cwnd > 0
            return m.acked == len(out) and len(m.rx) >= GREETING + n
        m.run(done)
        assert bytes(m.rx) == gen(GREETING, b"greet") + gen(n, b"data")
        finish(r, flow, m, [ctx, p_ctx, n_ctx], proc)
    finally:
        if proc.poll() is None:
            proc.kill()


# The peer of the garbled-frames test: a greeting, then it only receives (its SEQ stands
# still, as a forged SEQ from ahead would need to lock the window), then the digest.
SINK = r"""
import hashlib, socket, sys
host, port, n, greet = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ls = socket.socket(socket.AF_INET); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port)); ls.listen(1); ls.settimeout(60)
print("ready", flush=True)
c, _ = ls.accept(); c.settimeout(120)
c.sendall(b"g" * greet)
h, got = hashlib.sha256(), 0
while got < n:
    b = c.recv(min(1 << 16, n - got))
    if not b:
        break
    h.update(b); got += len(b)
c.sendall(h.hexdigest().encode())
c.close()
"""


@pytest.mark.netns
def test_garbled_frames_do_not_stall_an_offloaded_transfer(rig):
    import hashlib
    r = rig
    n = int(MB * 1_000_000)
    proc = r.ns.popen(sys.executable, "-u", "-c", SINK, ADDR.peer4, "5212", str(n),
                      str(GREETING), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    garbler = None
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        flow = software_connect(r, 5212)
        r.drv.set_params(rto_min_ticks=200, push_ticks=20)
        (n_ctx, p_ctx, ctx), _ = offload_flow(r, flow)
        sport = flow.conn.const.local_port
        garbler = r.ns.popen(sys.executable, "-u", "-c", GARBLER, TAP, r.mp.mac.hex(),
                             ADDR.peer4, ADDR.guest4, "5212", str(sport), str(GARBLED), "11",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        assert garbler.stdout.readline().strip() == b"ready", garbler.stderr.read().decode()
        out = os.urandom(n)
        m = Mover(r, ctx, out[:n // 2])
        flooded = []

        def first_half_done():
            if not flooded and select.select([garbler.stdout], [], [], 0)[0]:
                flooded.append(garbler.stdout.readline().split())
            return flooded and m.acked == n // 2
        m.run(first_half_done)
        assert flooded[0] == [b"flooded", str(GARBLED).encode()], flooded
        c, q = r.drv.query([ctx])
        dq = q[0].state.delegated
        assert dq.snd_una == dq.snd_max                 # idle: the ACK is SND.UNA
        garbler.stdin.write(f"{dq.rcv_nxt} {dq.snd_una}\n".encode())
        garbler.stdin.flush()
        assert garbler.stdout.readline().strip() == b"closed", garbler.stderr.read().decode()
        m.out = out                         # the second half, after the closed window
        m.run(lambda: m.acked == len(out) and len(m.rx) >= GREETING + 64)
        assert bytes(m.rx) == b"g" * GREETING + hashlib.sha256(out).hexdigest().encode()
        print(f"\n{GARBLED} garbled frames; csum errors {r.stat('offload_csum_errors')}")
        assert r.stat("offload_csum_errors") > GARBLED // 4
        c, _ = r.drv.terminate([ctx, p_ctx, n_ctx])
        assert c["status"] == hw.ST_SUCCESS
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()
    finally:
        for p in (proc, garbler):
            if p is not None and p.poll() is None:
                p.kill()
