"""Offload end to end in the VM, on an impaired wire: the rest of what
tests/test_offload_vm.py (clean wire) does not cover.

The NIC's wire drops 2% of the frames and reorders 5% (plus 2 ms delay), both
directions, for the whole module (``VM_OPTIONS["impair"]``, the device's
``--impair``).  The host stack in the guest runs on Linux VFIO (--bus vfio).

* Offloaded transfers complete correctly, each direction (8 MB, sha256 at both
  ends): guest sends → the device retransmitted (its ``offload_retransmits``
  counter), the guest's software TCP sent no data segment; guest receives →
  the Linux sender retransmitted and the device reassembled an exact stream.
* Events, in one guest process: a connection with received data buffered in
  software (the application has read nothing) is offloaded; that data comes
  first, in order, before the newer data the NIC receives; the peer's FIN is
  EOF after the data, and the DISCONNECT indication follows.  A second
  connection: the peer resets it (SO_LINGER 0) → ABORT, the socket reports
  the reset.
* Bulk offload in one state tree: 200 real connections (not 1,000 as on the
  host bus, tests/test_offload_hostbus.py: the guest's Python under TCG makes
  each software connect cost tens of ms, so 200 keeps the test bounded);
  QUERY returns 200 delegated states, terminating all returns every
  connection to software ESTABLISHED.

One boot for the module; every run bounded in bytes and by a hard timeout.
Loss makes timing vary, never the assertions on the bytes."""
import json
import random
import subprocess
import sys

import pytest

from test_offload_hostbus import BULK_PEER
from test_offload_vm import _finish, _json, check_verified, perf_guest_client

pytestmark = [pytest.mark.vm, pytest.mark.netns]

IMPAIR = "delay=2ms,loss=2%,reorder=5%,seed=3"
VM_OPTIONS = {"virtio_net": False, "impair": IMPAIR}
NBYTES = 8_000_000


def guest_ip(peer) -> str:
    return f"{peer.nic.guest4}/{peer.nic.prefix4}"


# -- impaired offloaded transfers, each direction -----------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["guest-sends", "guest-receives"])
def test_impaired_offloaded_transfer_in_vm(vm, peer, reverse):
    port = 7401 + reverse
    guest, linux, wall = perf_guest_client(vm, peer, port, "-R" if reverse else "", nbytes=NBYTES)
    mine = check_verified(guest, linux, NBYTES)
    assert mine["offloaded"] is True and mine["uploads"] == 0
    assert mine["software_data_segments_out"] == 0          # the software TCP sent no data for it
    dev = guest["stack_stats"]["device"]
    assert dev["offload_cmd_errors"] == 0 and dev["offload_req_errors"] == 0
    assert dev["offload_bytes_out" if not reverse else "offload_bytes_in"] >= NBYTES - (1 << 20)
    if not reverse:
        # the wire lost some of the NIC's segments: the device retransmitted them
        assert dev["offload_retransmits"] > 0, dev
    else:
        # the wire lost some of Linux's segments: Linux retransmitted, the device reassembled
        theirs = linux["summary"]["streams"][0]["sender"]
        assert theirs["retransmits"] is not None and theirs["retransmits"] > 0, theirs
    print(f"\nVM impaired ({IMPAIR}), guest {'receives' if reverse else 'sends'}: {NBYTES / 1e6:.0f} MB "
          f"verified in {wall:.1f} s, {mine['mbps']:.1f} Mbit/s, device retransmits "
          f"{dev['offload_retransmits']}, Linux retransmits {linux['summary']['streams'][0]['sender']['retransmits']}")


# -- events: buffered data first, FIN -> EOF + DISCONNECT, RST -> ABORT ---------------------

# The Linux peer for the events test.  mode "fin": send `first` bytes, wait for the guest's
# go byte (sent once it has offloaded), send `second` more, FIN, read to EOF.  mode "rst": wait
# for the go byte, send 1000 bytes, close with SO_LINGER 0 (RST).  One JSON line at the end.
EVENTS_PEER = r'''
import json, random, socket, struct, sys, time
a = json.loads(sys.argv[1])
ls = socket.create_server(("0.0.0.0", a["port"]))
ls.settimeout(a["timeout"])
print("listening", flush=True)
c, _ = ls.accept()
c.settimeout(a["timeout"])
data = random.Random(a["seed"]).randbytes(a["first"] + a["second"])
res = {}
if a["mode"] == "fin":
    c.sendall(data[:a["first"]])
    res["go"] = c.recv(1).decode()
    c.sendall(data[a["first"]:])
    c.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        b = c.recv(65536)
        if not b:
            break
        got += b
    res["got"] = len(got)
    c.close()
else:
    res["go"] = c.recv(1).decode()
    c.sendall(data)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    res["rst"] = True
print(json.dumps(res), flush=True)
'''

GUEST_EVENTS = r'''
import json, sys, time
from chimney import hw
from chimney.guest.bringup import bring_up
from chimney.guest.stack.socket import SoftwarePath
host, ip, port_fin, port_rst, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
# small posted receives and a small receive limit: the carried-in data and the newer data go
# through posted buffers and then receive indications
cs = bring_up(bus="vfio", ip=ip, ip6=("fd00:c41e::2/64",), offload="never", require_offload=True,
              post_size=16384, post_depth=2, rx_limit=64 * 1024)
st, ch, mgr = cs.stack, cs.chimney, cs.offload
res = {}

def wait(cond, timeout, what):
    assert st.run_until(cond, timeout), f"timed out: {what}"

# 1. buffered receive data, then offload; newer data; peer FIN
s = st.connect(host, port_fin, timeout=30)
wait(lambda: len(s.path.conn.d.recv_buffer) >= first, 60, "the first bytes in software")
res["buffered_at_offload"] = len(s.path.conn.d.recv_buffer)
assert s.offload() and s.offloaded
s.send(b"g", timeout=10)                    # the peer sends the newer data only now
rx = bytearray()
end = time.monotonic() + 120
while not s.path.eof():
    assert time.monotonic() < end, f"no EOF: received {len(rx)}"
    try:
        b = s.recv(8192, timeout=0)         # read slowly: posted buffers fill, then indications
        if b:
            rx.extend(b)
            continue
    except BlockingIOError:
        pass
    st.step(0.01)
while True:                                 # anything left before the EOF
    try:
        b = s.recv(1 << 20, timeout=0)
    except BlockingIOError:
        st.step(0.01)
        continue
    if not b:
        break
    rx.extend(b)
res["fin_offloaded_throughout"] = s.offloaded
wait(lambda: (hw.EV_DISCONNECT, 0) in s.path.events, 10, "DISCONNECT")
res["fin_events"] = [list(e) for e in s.path.events]
res["eof_again"] = s.recv(10, timeout=0) == b""
res["rx"] = rx.hex()
s.close()
st.run_until(lambda: not st.detached, 10)

# 2. the peer resets
r = st.connect(host, port_rst, timeout=30)
assert r.offload() and r.offloaded
r.send(b"g", timeout=10)
end = time.monotonic() + 60
while not r.path.reset():
    assert time.monotonic() < end, "no reset"
    st.run_until(lambda: r.path.reset(), 1)
    if not r.path.reset():
        # the RST was lost on the wire: a segment from us draws a fresh one from Linux
        try:
            r.send(b"p", timeout=0)
        except (OSError, BlockingIOError):
            pass
res["rst_events"] = [list(e) for e in r.path.events]
got = bytearray()
try:
    while True:
        b = r.recv(1 << 16, timeout=1)
        if not b:
            res["rst_recv"] = "eof"
            break
        got.extend(b)
except ConnectionResetError:
    res["rst_recv"] = "reset"
res["rst_got"] = got.hex()
st.run_until(lambda: not st.detached, 10)
res["detached_after"] = len(st.detached)
res["ch_stats"] = {k: v for k, v in ch.stats.items() if isinstance(v, int)}
res["mgr"] = dict(mgr.stats)
res["ch_events"] = [[e["name"], e.get("reason_name"), e.get("host_handle"), e.get("ctx")] for e in ch.events]
print(json.dumps(res), flush=True)
cs.close()
'''


def _events_peer(peer, **a):
    a.setdefault("timeout", 150)
    p = peer.popen(sys.executable, "-c", EVENTS_PEER, json.dumps(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"listening"
    return p


@pytest.mark.xfail(strict=False, reason=(
    "open defect: the peer's RST sometimes reaches the host without an ABORT event on the "
    "offloaded path (seen once in a full run on the host bus too, test_peer_rst_is_abort)"))
def test_events_buffered_fin_rst_in_vm(vm, peer):
    """One guest process: buffered data first, then newer data, FIN → EOF + DISCONNECT; RST → ABORT."""
    from chimney import hw
    first, second = 150_000, 600_000
    pfin = _events_peer(peer, mode="fin", port=7411, seed="ev-fin", first=first, second=second)
    prst = _events_peer(peer, mode="rst", port=7412, seed="ev-rst", first=1000, second=0)
    try:
        r = vm.run(["python3", "-c", GUEST_EVENTS, peer.nic.peer4, guest_ip(peer), "7411", "7412", str(first)],
                   timeout=300)
    finally:
        fin_out, fin_err = _finish(pfin, 30, "the FIN peer")
        rst_out, rst_err = _finish(prst, 30, "the RST peer")
    assert r.rc == 0, (r.stdout.decode()[-3000:], r.stderr.decode()[-3000:], fin_err.decode()[-1000:],
                       rst_err.decode()[-1000:])
    g = _json(r.stdout, "guest")
    want = random.Random("ev-fin").randbytes(first + second)
    # the buffered data first, in order, then the newer data: one exact stream, then EOF
    assert g["buffered_at_offload"] >= first
    assert bytes.fromhex(g["rx"]) == want
    assert g["fin_offloaded_throughout"] is True
    assert [hw.EV_DISCONNECT, 0] in g["fin_events"] and g["eof_again"] is True
    # carried-in and newer data went through posted receives and receive indications
    assert g["ch_stats"].get("oc_recv_done", 0) >= 1 and g["ch_stats"].get("oc_indicate", 0) >= 1, g["ch_stats"]
    fin = _json(fin_out, "FIN peer")
    assert fin["go"] == "g" and fin["got"] == 0
    # the reset: ABORT indicated, the socket reports it; whatever arrived before is the peer's prefix
    assert [hw.EV_ABORT, 0] in g["rst_events"], g["rst_events"]
    assert g["rst_recv"] == "reset"
    got = bytes.fromhex(g["rst_got"])
    assert got == random.Random("ev-rst").randbytes(1000)[:len(got)]
    assert _json(rst_out, "RST peer")["rst"] is True
    assert g["detached_after"] == 0          # the NIC's objects were freed
    assert g["mgr"].get("upload_rx_gap", 0) == 0 and g["mgr"].get("upload_tx_mismatch", 0) == 0
    print(f"\nVM impaired events: {g['buffered_at_offload']} B buffered at the offload delivered first, "
          f"{first + second} B exact, FIN events {g['fin_events']}, RST events {g['rst_events']}, "
          f"chimney {g['ch_stats']}, events {g['ch_events']}")


# -- bulk offload in one state tree ---------------------------------------------------------

BULK_N = 200        # 1,000 on the host bus; 200 here keeps the guest's software connects bounded under TCG

GUEST_BULK = r'''
import json, sys, time
from chimney import hw
from chimney.guest.bringup import bring_up
from chimney.guest.stack.socket import SoftwarePath
from chimney.tcp.state import TcpState
host, ip, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
# no posted receives for idle connections
cs = bring_up(bus="vfio", ip=ip, ip6=("fd00:c41e::2/64",), offload="never", require_offload=True, post_depth=0)
st, ch, mgr = cs.stack, cs.chimney, cs.offload
res = {}
t0 = time.monotonic()
socks = [st.connect(host, port, timeout=30) for _ in range(n)]
res["t_connect"] = time.monotonic() - t0
res["ports"] = len({s.getsockname()[1] for s in socks})
t0 = time.monotonic()
cmd = mgr.offload(socks, wait=True, timeout=120)
res["t_offload"] = time.monotonic() - t0
res["status"] = None if cmd is None else cmd.status
res["results"] = None if cmd is None else len(cmd.result)
res["errors"] = repr(mgr.last_errors)[:500]
res["all_offloaded"] = all(s.offloaded for s in socks)
res["flows"], res["detached"] = len(st.flows), len(st.detached)
t0 = time.monotonic()
q = mgr.query(socks, timeout=60)
res["t_query"] = time.monotonic() - t0
res["query"] = len(q)
res["query_established"] = sum(1 for v in q.values() if v["state"].delegated.state is TcpState.ESTABLISHED
                               and v["state"].delegated.rcv_wnd > 0 and v["state"].delegated.snd_wnd > 0)
t0 = time.monotonic()
res["uploaded"] = mgr.upload_all(wait=True, timeout=120)
res["t_upload"] = time.monotonic() - t0
res["software_established"] = sum(1 for s in socks if isinstance(s.path, SoftwarePath)
                                  and s.path.conn.state is TcpState.ESTABLISHED)
res["flows_after"], res["detached_after"] = len(st.flows), len(st.detached)
res["mgr_left"] = len(mgr.paths) + len(mgr.neighbours)
# On the lossy wire a handshake's last ACK can be lost: Linux holds that connection in
# SYN-RECV until its SYN-ACK retransmission (1 s, then 3 s) draws our challenge ACK.
# Stay up past those before the RSTs below, or Linux never accepts it.
st.run_until(lambda: False, 4.0)
for s in socks:
    s.abort()
st.step(0)
print(json.dumps(res), flush=True)
cs.close()
'''


def test_bulk_offload_in_vm(vm, peer):
    from chimney import hw
    port = 6500                     # BULK_PEER's port
    p = peer.popen(sys.executable, "-c", BULK_PEER, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"listening"
        r = vm.run(["python3", "-c", GUEST_BULK, peer.nic.peer4, guest_ip(peer), str(port), str(BULK_N)],
                   timeout=400)
    finally:
        try:
            p.stdin.write(f"x {BULK_N}\n".encode())
            p.stdin.flush()
        except OSError:
            pass
        out, err = _finish(p, 30, "the bulk peer")
    assert r.rc == 0, (r.stdout.decode()[-3000:], r.stderr.decode()[-3000:])
    g = _json(r.stdout, "guest")
    assert int(out.decode().split()[-1]) == BULK_N          # Linux accepted every connection
    assert g["ports"] == BULK_N
    assert g["status"] == hw.ST_SUCCESS and g["results"] == BULK_N + 2, g   # neighbour, path, N connections
    assert g["all_offloaded"] is True and g["flows"] == 0 and g["detached"] == BULK_N
    assert g["query"] == g["query_established"] == BULK_N
    assert g["uploaded"] == BULK_N and g["software_established"] == BULK_N
    assert g["flows_after"] == BULK_N and g["detached_after"] == 0 and g["mgr_left"] == 0
    print(f"\nVM bulk ({BULK_N} connections, impaired wire): connects {g['t_connect']:.1f} s, one-tree offload "
          f"{g['t_offload'] * 1000:.0f} ms, query {g['t_query'] * 1000:.0f} ms, terminate all "
          f"{g['t_upload'] * 1000:.0f} ms")
