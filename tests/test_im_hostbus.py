"""Offloaded transfers through intermediate drivers, on the host bus: the device
process (TOE) on a TAP in a namespace, a Linux peer there, the guest's miniport,
chimney, IM chain, offload manager and host stack in this process.  One
tracing IM, then two stacked (trace over trace); the traces are checked
against what the host stack registered and what the miniport's chimney was
really asked and answered."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import subprocess
import time

import pytest
from test_offload_hostbus import ADDR, chimney_args, check_offloaded_run, pattern, peer, peer_result, perf, pump, run_pair

from chimney import hw
from chimney.guest.bus.vfio_user import VfioUserBus
from chimney.guest.im import build_chain, chain_of, close_chain, read_trace
from chimney.guest.miniport import Miniport
from chimney.guest.chimney_calls import Chimney
from chimney.guest.stack.host import HostStack
from chimney.guest.stack.offload import OffloadManager
from chimney.tcp.state import TcpState

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

N = 100_000_000          # each way


class Spy:
    """What the miniport's chimney is asked (contexts, handles, tags) and answers
    (the NIC's contexts from INITIATE; the handles it dispatches completions and
    indications to), wrapped around its methods on the instance."""

    def __init__(self, ch: Chimney):
        self.requests: list[tuple] = []         # (op, ctx or ctxs, handle or None, tag or None)
        self.nic_ctx: dict[int, int] = {}       # host handle the NIC got -> its context
        self.dispatched: set[int] = set()       # handles the chimney looked a handler up for
        spy = self
        for op in ("send", "post_receive", "disconnect", "abort"):
            self._wrap_io(ch, op)
        for op in ("query", "terminate", "invalidate"):
            self._wrap_ctxs(ch, op)
        real_init = ch.initiate

        def initiate(entries, cb=None):
            def done(cmd):
                for e in cmd.result or []:
                    if e.status == hw.ST_SUCCESS and e.nic_ctx:
                        spy.nic_ctx[e.host_handle] = e.nic_ctx
                if cb:
                    cb(cmd)
            spy.requests.append(("initiate", [e.nic_ctx for e in entries if e.link],
                                 [e.host_handle for e in entries], None))
            return real_init(entries, done)
        ch.initiate = initiate

        class Handlers(dict):
            def get(self, k, default=None):
                spy.dispatched.add(k)
                return super().get(k, default)
        ch.handlers = Handlers(ch.handlers)

    def _wrap_io(self, ch, op):
        real = getattr(ch, op)

        def call(ctx, handle, *a, **kw):
            tag = real(ctx, handle, *a, **kw)
            self.requests.append((op, ctx, handle, tag))
            return tag
        setattr(ch, op, call)

    def _wrap_ctxs(self, ch, op):
        real = getattr(ch, op)

        def call(ctxs, *a, **kw):
            self.requests.append((op, list(ctxs), None, None))
            return real(ctxs, *a, **kw)
        setattr(ch, op, call)


class ImGuest:
    """Miniport + chimney (spied on) + IM chain from `spec` + offload manager + host stack."""

    def __init__(self, dev, spec: str, **mgr_kw):
        self.bus = VfioUserBus(dev.socket)
        self.mp = Miniport(self.bus)
        self.mp.up()
        self.stack = HostStack.on_miniport(self.mp, ipv4=(ADDR.guest4, ADDR.prefix4))
        self.stack.up()
        self.ch = Chimney(self.mp)
        assert self.ch.supported
        self.ch.up()
        self.spy = Spy(self.ch)
        self.top = build_chain(spec, self.ch)
        self.ims = chain_of(self.top)
        self.mgr = OffloadManager(self.stack, self.top, "never", **mgr_kw)

    def close(self):
        close_chain(self.top)
        with contextlib.suppress(Exception):
            self.mp.down()
        self.bus.close()


def transfer(g, ns, port, n):
    """Offload a connection to the peer, move n bytes each way (sha256 both ends),
    query it, let the peer's FIN arrive, upload on close.  Returns the OffloadPath."""
    p = peer(ns, listen=True, port=port, send=n, seed=f"im-peer{port}", timeout=240)
    s = g.stack.connect(ADDR.peer4, port, timeout=10)
    assert s.offload() and s.offloaded, g.mgr.last_errors
    path = s.path
    out = pattern(f"im-guest{port}", n)
    rx = bytearray()
    t0 = time.monotonic()
    pump(g, s, out, 0, rx, lambda o, r: o >= n and len(r) >= n, timeout=240)
    secs = time.monotonic() - t0
    q = g.mgr.query([s])
    assert q[path.handle]["state"].delegated.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
    assert g.stack.run_until(lambda: (hw.EV_DISCONNECT, 0) in path.events, 20), path.events
    s.close()
    assert g.stack.run_until(lambda: path.state == "uploaded" and not s.path.offloaded(), 30)
    res = peer_result(p, timeout=60, g=g)
    assert hashlib.sha256(bytes(rx)).hexdigest() == hashlib.sha256(pattern(f"im-peer{port}", n)).hexdigest()
    assert res["got"] == n and res["sha256"] == hashlib.sha256(out).hexdigest()
    assert s.flow.data_segments_out == 0                 # the NIC carried all the data
    assert g.mgr.stats.get("upload_rx_gap", 0) == 0 and g.mgr.stats.get("upload_tx_mismatch", 0) == 0
    g.stack.run_until(lambda: not g.stack.detached, 5)
    print(f"\n{len(g.ims)} IM(s): {2 * n / 1e6:.0f} MB both ways in {secs:.1f} s "
          f"({2 * n * 8 / secs / 1e6:.0f} Mbit/s total)")
    return path


def records(g):
    """Each IM's trace, from the top down."""
    return [read_trace(im.path) if im.path else im.records for im in g.ims]


def check_chain(g, traces, path, n):
    """The handle chain as the traces show it, against the host stack above and the
    miniport's chimney below."""
    top, bottom = traces[0], traces[-1]
    # the host's handles: the ones the offload manager put in its state trees
    host = {o["upper_handle"] for r in top if r["op"] == "initiate" for o in r["objects"]}
    assert path.handle in host
    # every operation of the offload, transfer and upload crossed each IM
    for tr in traces:
        ops = {(r["op"], r["way"]) for r in tr}
        for want in (("initiate", "down"), ("initiate_done", "up"), ("query", "down"),
                     ("query_done", "up"), ("terminate", "down"), ("terminate_done", "up"),
                     ("send", "down"), ("send_done", "up"), ("post_receive", "down"),
                     ("recv_done", "up"), ("disconnect", "down"), ("event", "up")):
            assert want in ops, (want, sorted(ops))
    # the connection's entry at each level, from the initiate records
    tcp = []
    for tr in traces:
        (ini,) = [r for r in tr if r["op"] == "initiate" and r["objects"][-1]["type"] == hw.OBJ_TCP]
        (done,) = [r for r in tr if r["op"] == "initiate_done" and r["objects"][-1]["type"] == hw.OBJ_TCP]
        o = done["objects"][-1]
        assert o["status"] == hw.ST_SUCCESS
        assert ini["objects"][-1]["upper_ctx"] == o["upper_ctx"] and ini["objects"][-1]["lower_ctx"] == 0
        tcp.append(o)
    assert tcp[0]["upper_handle"] == path.handle
    assert path.ctx == tcp[0]["upper_ctx"]                   # the host stack holds the top IM's ref
    for a, b in itertools.pairwise(tcp):        # each level's own handle is the next one's upper
        assert b["upper_handle"] == a["own_handle"]
    nic_ctx = g.spy.nic_ctx[tcp[-1]["own_handle"]]           # what the NIC answered the bottom IM
    assert tcp[-1]["lower_ctx"] == nic_ctx                     # written into the bottom IM's entry
    for a, b in itertools.pairwise(tcp):
        assert a["lower_ctx"] == b["upper_ctx"]                # each level holds the next one's ref
    # the bottom IM's lower context is the NIC's, written by the initiate's completion
    lower_ctx = {r["lower_ctx"] for r in bottom if r["op"] == "send"}
    assert lower_ctx == {nic_ctx}
    for i, tr in enumerate(traces[:-1]):
        assert {r["lower_ctx"] for r in tr if r["op"] == "send"} == \
            {r["upper_ctx"] for r in traces[i + 1] if r["op"] == "send"}
    # every request reached the NIC with the NIC's context and the bottom IM's handle
    reqs = [r for r in g.spy.requests if r[0] in ("send", "post_receive", "disconnect")]
    assert reqs and all(ctx == nic_ctx and h == tcp[-1]["own_handle"] for _, ctx, h, _ in reqs)
    assert {t for op, _, _, t in reqs if op == "send"} == {r["tag"] for r in bottom if r["op"] == "send"}
    assert {t for op, _, _, t in reqs if op == "send"} == {r["tag"] for r in top if r["op"] == "send"}
    terms = [r for r in g.spy.requests if r[0] == "terminate"]
    assert [nic_ctx] in [r[1] for r in terms] and [nic_ctx] in [r[1] for r in g.spy.requests if r[0] == "query"]
    assert not set(host) & set(g.spy.nic_ctx)       # the NIC never saw a host handle
    assert not {o["upper_ctx"] for o in tcp} & {nic_ctx}    # nor the IMs' refs as contexts
    # every completion and indication reached the host stack with the host's own handle
    up = [r for r in top if r["way"] == "up" and "upper_handle" in r and r["op"] not in (
        "initiate_done", "query_done", "terminate_done")]
    assert up and all(r["upper_handle"] in host for r in up)
    assert {r["upper_handle"] for r in up if r["op"] in ("recv_done", "indicate", "event",
                                                         "send_done")} == {path.handle}
    # ... and left the NIC with the bottom IM's handle (the chimney dispatched by it)
    assert tcp[-1]["own_handle"] in g.spy.dispatched and path.handle not in g.spy.dispatched
    # the bytes: all that was sent and received crossed every IM
    for tr in traces:
        sent = sum(r["bytes"] for r in tr if r["op"] == "send")
        got = sum(r["bytes"] for r in tr if r["op"] == "recv_done") + \
            sum(r["accepted"] for r in tr if r["op"] == "indicate")
        assert sent == path.posted_bytes == n
        assert got == path.host_rcvd
        assert got >= n - 1_000_000     # (the first bytes may come in the software TCP, before the offload)
    for tr, o in zip(traces, tcp):
        events = [(r["kind"], r["upper_handle"]) for r in tr if r["op"] == "event"]
        assert (hw.EV_DISCONNECT, o["upper_handle"]) in events     # the peer's FIN, at each level
    # the upload ended every entry: nothing stays registered below
    for im in g.ims:
        assert not im.entries and not im.by_own, (im.name, im.entries)
    assert not g.ch.handlers


def test_transfer_through_one_tracing_im(wire, tmp_path):
    dev, ns = wire
    g = ImGuest(dev, f"trace:{tmp_path}/t.jsonl")
    try:
        path = transfer(g, ns, 7100, N)
        close_chain(g.top)
        traces = records(g)
        check_chain(g, traces, path, N)
    finally:
        g.close()


def test_transfer_through_two_stacked_ims(wire, tmp_path):
    dev, ns = wire
    g = ImGuest(dev, f"trace:{tmp_path}/top.jsonl,trace:{tmp_path}/bottom.jsonl")
    try:
        assert [im.name for im in g.ims] == ["trace1", "trace2"] and g.ims[1].lower is g.ch
        path = transfer(g, ns, 7101, N)
        close_chain(g.top)
        traces = records(g)
        check_chain(g, traces, path, N)
        # the same crossings at both levels, each with its own handles
        for op in ("send", "post_receive", "recv_done", "send_done", "event"):
            a = [r for r in traces[0] if r["op"] == op]
            b = [r for r in traces[1] if r["op"] == op]
            assert len(a) == len(b) > 0, op
            assert all(x["upper_handle"] != y["upper_handle"] and x["own_handle"] == y["upper_handle"]
                       for x, y in zip(a, b))
    finally:
        g.close()


@pytest.mark.parametrize("reverse", [False, True])
def test_perf_cli_offloads_through_a_traced_im(wire, tmp_path, reverse):
    """`chimney perf --offload on --im trace:FILE`: the run is offloaded and verified
    through the IM, and the file holds the chain's crossings from initiate to upload."""
    dev, ns = wire
    port = 5620 + reverse
    trace = tmp_path / "trace.jsonl"
    n = 4 << 20
    srv = perf("server", "--stack", "linux", "--once", "--json", "--port", port, "--accept-timeout", 60)
    cli = perf("client", ADDR.peer4, "--port", port, "-n", n, "--json", "-i", 0, *(["-R"] if reverse else []),
               *chimney_args(dev), "--im", f"trace:{trace}")
    cres, _ = run_pair(srv, True, cli, ns)
    check_offloaded_run(cres, n)
    assert list(cres["stack_stats"]["im"]) == ["trace1"]      # one IM, named by kind and level
    recs = read_trace(str(trace))
    ops = {r["op"] for r in recs}
    assert {"initiate", "terminate", "send" if not reverse else "post_receive"} <= ops, ops
    # the data crossed the IM: completions came up through it for (nearly) every byte
    # (what the host stack moved before the offload travels in the state instead)
    up_ops = ("send_done",) if not reverse else ("recv_done", "indicate")
    moved = sum(r.get("bytes") or 0 for r in recs if r["op"] in up_ops and r["way"] == "up")
    assert n - (1 << 20) <= moved <= n + 4096, moved      # (+ perf's stream header)


def test_perf_cli_refuses_im_without_offload(wire):
    dev, _ = wire
    r = subprocess.run(perf("client", ADDR.peer4, "-n", 1000, *chimney_args(dev)[:-2], "--offload", "off",
                            "--im", "trace"), capture_output=True, timeout=60)
    assert r.returncode != 0 and b"--im needs --offload" in r.stderr and b"Traceback" not in r.stderr, r.stderr
