"""The TOE in a real device process on the host bus, against a Linux peer in a
namespace.  The connection is set up by the host stack's software TCP, its
state exported and offloaded with raw ring writes (tests/test_toe_helpers.py),
MBs move each way through OSEND/ORECV (sha256 on both ends), then the
connection is terminated and the software TCP carries on from the returned
state.  Hostile requests are answered with error completions while the
offloaded connection keeps working; with --impair the device retransmits.

Size: CHIMNEY_TOE_MB (default 4 MB each way; impaired runs use half)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from test_toe_helpers import Buf, ToeDriver

from chimney import hw
from chimney.guest.bringup import bring_up
from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs
from chimney.staterec import codec
from chimney.staterec.codec import NONE32, ObjEntry
from chimney.tcp.engine import Connection

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

ADDR = PeerAddrs()
TAP = "chtoe0"
MB = float(os.environ.get("CHIMNEY_TOE_MB", "4"))
GREETING = 3000
TAIL = 5000             # bytes the guest sends in software after the upload
IO_TIMEOUT = 120
CHUNK = 64 * 1024
NSEND = 8               # send buffers in flight
NRECV = 8               # posted receive buffers
NPOOL = 4

# The peer: sends a greeting at once, waits for b"G", then sends n bytes while it
# reads n bytes; then reads `tail` more (sent by the software TCP after the upload),
# answers the sha256 of everything it read after "G", and closes.
PEER = r"""
import hashlib, json, os, socket, sys, threading
host, port, n, greet, tail = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ls = socket.socket(socket.AF_INET); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port)); ls.listen(1); ls.settimeout(60)
print("ready", flush=True)
c, _ = ls.accept(); c.settimeout(120)
rnd = hashlib.sha256(b"seed").digest()
def gen(k, salt):
    out = bytearray(); i = 0
    while len(out) < k:
        out += hashlib.sha256(salt + i.to_bytes(8, "little")).digest(); i += 1
    return bytes(out[:k])
g = gen(greet, b"greet")
c.sendall(g)
first = c.recv(1)
assert first == b"G", first
data = gen(n, b"data")
t = threading.Thread(target=c.sendall, args=(data,)); t.start()
h, got = hashlib.sha256(), 0
while got < n + tail:
    b = c.recv(min(1 << 16, n + tail - got))
    if not b:
        break
    h.update(b); got += len(b)
t.join()
c.sendall(h.hexdigest().encode())
c.shutdown(socket.SHUT_WR)
c.close()
print(json.dumps({"got": got, "sent_sha": hashlib.sha256(g + data).hexdigest()}), flush=True)
"""


def gen(k: int, salt: bytes) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < k:
        out += hashlib.sha256(salt + i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:k])


class Rig:
    def __init__(self, dev, ns):
        self.dev, self.ns = dev, ns
        self.g = bring_up(socket=dev.socket, ram_size=128 << 20, ip=(ADDR.guest4, ADDR.prefix4))
        self.bus, self.mp, self.st = self.g.bus, self.g.mp, self.g.stack
        self.drv = ToeDriver(self.alloc, self.mp.wr, hw.Words(self.mp.db),
                             lambda: time.sleep(0.0002), ring=1024, vector=7)

    def alloc(self, n: int) -> Buf:
        b = self.bus.dma_alloc(n)
        return Buf(b.mem, b.iova)

    def stat(self, name: str) -> int:
        return self.mp.rd(hw.stat_offset(name), 8)

    def peer_mac(self) -> bytes:
        return bytes.fromhex(self.ns.run("cat", f"/sys/class/net/{TAP}/address")
                             .stdout.strip().replace(":", ""))


@pytest.fixture(params=["clean", "impaired"])
def rig(request, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    impair = "delay=1ms,loss=2%,reorder=10%,seed=7" if request.param == "impaired" else None
    with Netns("toe") as ns:
        with DeviceProcess(str(tmp_path / "nic.sock"), tap=TAP, netns=ns.name, impair=impair,
                           log_path=str(tmp_path / "device.log")) as dev:
            ns.configure_peer(TAP, ADDR)
            r = Rig(dev, ns)
            r.impaired = impair is not None
            try:
                yield r
            finally:
                r.bus.close()
            assert dev.alive, dev.log_text()
            log = dev.log_text()
            assert "data path error" not in log, log[-3000:]


def software_connect(r: Rig, port: int):
    flow = r.st.open(ADDR.peer4, port)
    assert r.st.run_until(lambda: flow.conn.established, 10)
    # the greeting arrives in software and is acknowledged, not consumed
    assert r.st.run_until(lambda: len(flow.conn.d.recv_buffer) >= GREETING, 10)
    return flow


def offload_flow(r: Rig, flow):
    """Export the software connection and initiate it on the NIC; the flow leaves the stack."""
    const, cached, d = flow.conn.export(r.st.clock())
    r.st.flush()                         # the delayed ACK export sent
    r.st.flows.pop(flow.key)
    entries = [ObjEntry(hw.OBJ_NEIGHBOR, 1, NONE32, codec.Neighbor(r.mp.mac, r.peer_mac())),
               ObjEntry(hw.OBJ_PATH, 2, 0, codec.Path(ADDR.guest4, ADDR.peer4, 1500)),
               ObjEntry(hw.OBJ_TCP, 3, 1, codec.Tcp(const, cached, d))]
    c, st = r.drv.initiate(entries)
    assert c["status"] == hw.ST_SUCCESS, (c, st)
    return [s.nic_ctx for s in st], d


class Mover:
    """Moves `out` through OSEND and reads into posted buffers / indications."""

    def __init__(self, r: Rig, ctx: int, out: bytes):
        self.r, self.ctx, self.out = r, ctx, out
        self.sbufs = [r.alloc(CHUNK) for _ in range(NSEND)]
        self.rbufs = [r.alloc(CHUNK) for _ in range(NRECV)]
        self.pbufs = [r.alloc(CHUNK) for _ in range(NPOOL)]
        self.free_s = list(range(NSEND))
        self.sent = 0
        self.acked = 0
        self.rx = bytearray()
        self.events = []
        self.indications = 0
        for i in range(NRECV):
            r.drv.orecv(ctx, self.rbufs[i].iova, CHUNK, tag=1000 + i)
        for i in range(NPOOL):
            r.drv.orecv(0, self.pbufs[i].iova, CHUNK, tag=2000 + i, flags=hw.ORF_POOL)

    def step(self):
        drv = self.r.drv
        while self.free_s and self.sent < len(self.out):
            i = self.free_s.pop()
            n = min(CHUNK, len(self.out) - self.sent)
            self.sbufs[i].mem[:n] = self.out[self.sent:self.sent + n]
            drv.osend(self.ctx, self.sbufs[i].iova, n, tag=i)
            self.sent += n
        drv.collect()
        self.handle(drv.pop(hw.OCOMPLQ_FIRST))
        self.events += drv.pop(hw.EVENTQ)
        time.sleep(0.0002)

    def handle(self, recs, uploading=False):
        drv = self.r.drv
        for c in recs:
            k = c["kind"]
            if uploading and c["status"] == hw.ST_UPLOADED:
                if k == hw.OC_RECV_DONE:
                    self.rx += self.rbufs[c["tag"] - 1000].mem[:c["len"]]
                continue
            assert c["status"] == hw.ST_SUCCESS, c
            if k == hw.OC_SEND_DONE:
                self.acked += c["len"]
                self.free_s.append(c["tag"])
            elif k == hw.OC_RECV_DONE:
                i = c["tag"] - 1000
                self.rx += self.rbufs[i].mem[:c["len"]]
                if not uploading:
                    drv.orecv(self.ctx, self.rbufs[i].iova, CHUNK, tag=c["tag"])
            elif k == hw.OC_INDICATE:
                if uploading:
                    continue            # not accepted: the bytes are in recv_buffer
                i = c["tag"] - 2000
                self.rx += self.pbufs[i].mem[:c["len"]]
                self.indications += 1
                drv.orecv(self.ctx, 0, c["len"], tag=0, flags=hw.ORF_ACCEPT)
                drv.orecv(0, self.pbufs[i].iova, CHUNK, tag=c["tag"], flags=hw.ORF_POOL)
            else:
                raise AssertionError(f"unexpected completion {c}")

    def run(self, until, timeout=IO_TIMEOUT):
        end = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < end, (f"timed out: sent {self.sent} acked {self.acked} "
                                            f"rx {len(self.rx)}")
            self.step()


def hostile(r: Rig, ctx: int):
    drv = r.drv
    BAD = 0xDEAD_0000_0000
    assert drv.command(77)[0]["status"] == hw.ST_INVALID_REQUEST
    assert drv.command(hw.CMD_INITIATE, b"\x09" * 56, 4096)[0]["status"] == hw.ST_INVALID_REQUEST
    assert drv.command(hw.CMD_TERMINATE, codec.encode_contexts([ctx ^ (1 << 25)]), 4096)[0][
        "status"] == hw.ST_INVALID_HANDLE
    assert drv.command(hw.CMD_QUERY, codec.encode_contexts([ctx]), 4096,
                       resp_addr=BAD)[0]["status"] == hw.ST_DMA_ERROR
    assert drv.command(hw.CMD_QUERY, codec.encode_contexts([ctx]), 4096,
                       req_addr=BAD)[0]["status"] == hw.ST_DMA_ERROR
    drv.osend(ctx ^ (1 << 25), 0, 10, tag=901)
    drv.osend(ctx, BAD, 10, tag=902)
    drv.orecv(ctx, BAD, 10, tag=903)
    errs = drv.wait(hw.OCOMPLQ_FIRST, lambda c: c["tag"] == 902)
    errs += drv.wait(hw.OCOMPLQ_FIRST, lambda c: c["tag"] == 903) \
        if not any(c["tag"] == 903 for c in errs) else []
    assert {(c["tag"], c["kind"], c["status"]) for c in errs} >= {
        (901, hw.OC_ERROR, hw.ST_INVALID_HANDLE), (902, hw.OC_ERROR, hw.ST_DMA_ERROR),
        (903, hw.OC_ERROR, hw.ST_DMA_ERROR)}
    # a producer index far beyond the ring: reported, ignored, the queue keeps working
    drv.db[hw.DB_TAIL_BASE + 4 * hw.OSENDQ_FIRST] = drv.tail[hw.OSENDQ_FIRST] + 100_000
    errs = drv.wait(hw.OCOMPLQ_FIRST, lambda c: c["tag"] == 0xFFFFFFFF)
    assert any(c["status"] == hw.ST_INVALID_REQUEST for c in errs)
    drv.ring_db(hw.OSENDQ_FIRST)


@needs_root
def test_offloaded_transfer_both_ways_then_upload(rig):
    r = rig
    n = int(MB * 1_000_000) // (2 if r.impaired else 1)
    port = 5201
    proc = r.ns.popen(sys.executable, "-u", "-c", PEER, ADDR.peer4, str(port), str(n),
                      str(GREETING), str(TAIL), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        flow = software_connect(r, port)
        sw_data_segs = flow.data_segments_out
        r.drv.set_params(rto_min_ticks=200, push_ticks=20)
        (n_ctx, p_ctx, ctx), d0 = offload_flow(r, flow)
        assert r.stat("offload_conns") == 1
        hostile(r, ctx)
        out = b"G" + os.urandom(n)
        m = Mover(r, ctx, out)
        want_rx = GREETING + n
        t0 = time.monotonic()
        m.run(lambda: m.acked == len(out) and len(m.rx) >= want_rx)
        secs = time.monotonic() - t0
        assert bytes(m.rx[:want_rx]) == gen(GREETING, b"greet") + gen(n, b"data")
        # the greeting buffered in software came first
        assert len(m.rx) == want_rx
        # per-connection statistics while running
        c, recs = r.drv.query([ctx])
        dq = recs[0].state.delegated
        assert dq.cwnd > 0 and dq.srtt > 0 and dq.snd_una == (d0.snd_una + len(out)) % (1 << 32)
        rexmit = r.stat("offload_retransmits")
        print(f"\noffloaded: {2 * n / 1e6:.1f} MB both ways in {secs:.2f} s = "
              f"{2 * n / 1e6 / secs:.2f} MB/s; segs out {r.stat('offload_segs_out')}, "
              f"in {r.stat('offload_segs_in')}, retransmits {rexmit}, "
              f"indications {m.indications}")
        if r.impaired:
            assert rexmit > 0
        assert flow.data_segments_out == sw_data_segs        # no software data segment
        # upload: the software TCP carries on from the returned state
        c, recs = r.drv.terminate([ctx, p_ctx, n_ctx])
        assert c["status"] == hw.ST_SUCCESS, (c, recs)
        const, cached, d = recs[0].state.const, recs[0].state.cached, recs[0].state.delegated
        const.local_ip, const.remote_ip = ADDR.guest4, ADDR.peer4
        assert d.send_buffer == b"" and d.snd_una == dq.snd_una
        # posted receives come back UPLOADED
        done = r.drv.pop(hw.OCOMPLQ_FIRST)
        assert all(x["status"] == hw.ST_UPLOADED for x in done)
        assert sum(x["len"] for x in done) == 0
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
        res_digest = bytes(got[:64]).decode()
        assert res_digest == hashlib.sha256(out[1:] + tail).hexdigest()
        r.st.run_until(lambda: proc.poll() is not None, 30)
        outp, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()
        res = json.loads(outp.decode().strip().splitlines()[-1])
        assert res["got"] == n + TAIL
    finally:
        if proc.poll() is None:
            proc.kill()


@needs_root
def test_upload_mid_transfer_then_software_finishes(rig):
    """Terminate while data is in flight both ways and received data is not consumed:
    the software TCP finishes the transfer from the returned state, byte-exact."""
    r = rig
    n = int(MB * 1_000_000) // (2 if r.impaired else 1)
    port = 5202
    proc = r.ns.popen(sys.executable, "-u", "-c", PEER, ADDR.peer4, str(port), str(n),
                      str(GREETING), str(TAIL), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        flow = software_connect(r, port)
        r.drv.set_params(rto_min_ticks=200, push_ticks=20)
        (n_ctx, p_ctx, ctx), d0 = offload_flow(r, flow)
        out = b"G" + os.urandom(n)
        m = Mover(r, ctx, out)
        m.run(lambda: m.acked >= n // 2 and len(m.rx) >= n // 2)
        time.sleep(0.05)            # the device has taken every request posted so far
        # stop consuming: the next completions are not processed before the upload
        c, recs = r.drv.terminate([ctx, p_ctx, n_ctx])
        assert c["status"] == hw.ST_SUCCESS, (c, recs)
        m.handle(r.drv.pop(hw.OCOMPLQ_FIRST), uploading=True)
        const, cached, d = recs[0].state.const, recs[0].state.cached, recs[0].state.delegated
        const.local_ip, const.remote_ip = ADDR.guest4, ADDR.peer4
        # what the device returns continues what the host had acknowledged as sent
        in_flight = len(d.send_buffer)
        assert out[m.sent - in_flight:m.sent] == d.send_buffer
        print(f"\nupload at {m.acked} acked / {len(m.rx)} received: {in_flight} send bytes and "
              f"{len(d.recv_buffer)} received bytes returned, state {d.state}")
        rx = bytearray(m.rx)          # d.recv_buffer comes out of flow.conn.recv()
        flow.conn = Connection.from_state(const, cached, d, r.st.clock(), flow.conn.cfg)
        r.st.flows[flow.key] = flow
        pending = out[m.sent:] + os.urandom(TAIL)
        tail = pending[-TAIL:]
        want = GREETING + n + 64
        end = time.monotonic() + IO_TIMEOUT
        while (pending or len(rx) < want) and time.monotonic() < end:
            if pending:
                k = flow.conn.send(pending[:1 << 16], r.st.clock())
                pending = pending[k:]
            r.st.step(0.002)
            rx += flow.conn.recv(1 << 20, r.st.clock())
        assert len(rx) >= want, (len(rx), want, len(pending))
        expect = gen(GREETING, b"greet") + gen(n, b"data")
        if bytes(rx[:GREETING + n]) != expect:
            bad = next(i for i in range(GREETING + n) if rx[i] != expect[i])
            raise AssertionError(f"stream differs at byte {bad} (device part {len(m.rx)}, "
                                 f"returned {len(d.recv_buffer)}); "
                                 f"found at {expect.find(bytes(rx[bad:bad + 64]))}")
        assert bytes(rx[GREETING + n:want]).decode() == hashlib.sha256(out[1:] + tail).hexdigest()
        r.st.run_until(lambda: proc.poll() is not None, 30)
        outp, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
