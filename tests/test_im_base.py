"""The intermediate-driver layer against a scripted fake chimney below it: handle
translation both ways, buffers passed through as the same objects, entry
lifetime, bogus and stale handles, two stacked IMs, the trace and the spec."""
from __future__ import annotations

import argparse
import itertools
import json

import pytest

from chimney import hw
from chimney.guest.im import (
    ImError,
    ImSpecError,
    IntermediateDriver,
    TraceIM,
    build_chain,
    chain_of,
    close_chain,
    parse_spec,
    read_trace,
    spec_arg,
)
from chimney.staterec.codec import NONE32, Neighbor, ObjEntry, Path


class FakeCmd:
    def __init__(self, opcode, args, cb):
        self.opcode, self.args, self.cb = opcode, args, cb
        self.done, self.status, self.count, self.result, self.error = False, None, 0, None, None


class FakeRing:
    size = 8

    def space(self):
        return 8


class FakeLower:
    """A scripted chimney: objects get contexts 0x5000 + n; commands complete on poll();
    completions and indications are fired by the test (as the NIC would send them)."""

    def __init__(self):
        self.is_up, self.paused, self.supported = True, False, True
        self.sendq = FakeRing()
        self.status_handler = self.neigh_query_handler = None
        self.handlers = {}
        self.objs = {}                  # ctx -> host handle given with it
        self.ctxs = itertools.count(0x5001)
        self.tags = itertools.count(100)
        self.cmds, self.queue = [], []
        self.sends, self.recvs, self.ctl, self.accepts = [], [], [], []
        self.fail_initiate = False
        self.raise_on_initiate = None

    def register(self, h, handler):
        self.handlers[h] = handler

    def unregister(self, h):
        self.handlers.pop(h, None)

    def _cmd(self, opcode, args, cb):
        c = FakeCmd(opcode, args, cb)
        self.cmds.append(c)
        self.queue.append(c)
        return c

    def initiate(self, entries, cb=None):
        if self.raise_on_initiate:
            raise self.raise_on_initiate
        return self._cmd(hw.CMD_INITIATE, entries, cb)

    def update(self, entries, cb=None):
        return self._cmd(hw.CMD_UPDATE, entries, cb)

    def query(self, ctxs, cb=None):
        return self._cmd(hw.CMD_QUERY, ctxs, cb)

    def invalidate(self, ctxs, cb=None):
        return self._cmd(hw.CMD_INVALIDATE, ctxs, cb)

    def terminate(self, ctxs, cb=None, data_room=0):
        c = self._cmd(hw.CMD_TERMINATE, ctxs, cb)
        c.data_room = data_room
        return c

    def set_params(self, params=None, cb=None):
        return self._cmd(hw.CMD_SET_PARAMS, params, cb)

    def _run(self, c):
        if c.opcode == hw.CMD_INITIATE:
            res = []
            for e in c.args:
                if e.link:
                    ok = e.nic_ctx in self.objs
                    res.append(ObjEntry(e.type, e.host_handle, nic_ctx=e.nic_ctx if ok else 0,
                                        status=hw.ST_SUCCESS if ok else hw.ST_INVALID_HANDLE))
                elif self.fail_initiate:
                    res.append(ObjEntry(e.type, e.host_handle, status=hw.ST_FAILURE))
                else:
                    ctx = next(self.ctxs)
                    self.objs[ctx] = e.host_handle
                    res.append(ObjEntry(e.type, e.host_handle, nic_ctx=ctx, status=hw.ST_SUCCESS))
            c.result = res
            c.status = hw.ST_SUCCESS if not self.fail_initiate else hw.ST_FAILURE
        elif c.opcode in (hw.CMD_QUERY, hw.CMD_TERMINATE):
            res = []
            for ctx in c.args:
                h = self.objs.get(ctx)
                if h is None:
                    res.append(ObjEntry(hw.OBJ_NEIGHBOR, 0, NONE32, status=hw.ST_INVALID_HANDLE,
                                        nic_ctx=ctx))
                else:
                    res.append(ObjEntry(hw.OBJ_TCP, h, NONE32, state=("state-of", ctx), nic_ctx=ctx,
                                        status=hw.ST_SUCCESS))
                    if c.opcode == hw.CMD_TERMINATE:
                        del self.objs[ctx]
            c.result, c.status = res, hw.ST_SUCCESS
        else:
            c.status = hw.ST_SUCCESS
        c.count = len(c.args or [])
        c.done = True
        if c.cb:
            c.cb(c)

    def pending(self):
        return bool(self.queue)

    def poll(self, limit=1024):
        n = len(self.queue)
        todo, self.queue = self.queue, []
        for c in todo:
            self._run(c)
        return n

    def kick_owed(self):
        pass

    def send_room(self):
        return 8

    # data requests
    def send(self, ctx, handle, data):
        tag = next(self.tags)
        self.sends.append((ctx, handle, data, tag))
        return tag

    def request_data(self, tag, n):
        for _, _, d, t in self.sends:
            if t == tag:
                return bytes(d[:n])
        return b""

    def post_receive(self, ctx, handle, size, push=True):
        tag = next(self.tags)
        self.recvs.append((ctx, handle, size, push, tag))
        return tag

    def disconnect(self, ctx, handle):
        tag = next(self.tags)
        self.ctl.append(("disconnect", ctx, handle, tag))
        return tag

    def abort(self, ctx, handle):
        tag = next(self.tags)
        self.ctl.append(("abort", ctx, handle, tag))
        return tag

    def accept(self, ctx, n):
        self.accepts.append((ctx, n))

    def give_pool_buffer(self, b=None):
        return True

    # what the NIC sends up (with the handle it was given)
    def fire(self, handle, method, *args):
        return getattr(self.handlers[handle], method)(*args)


class Upper:
    """The overlying driver's handler: records what reaches it."""

    def __init__(self):
        self.got = []

    def on_send_done(self, tag, nbytes, status):
        self.got.append(("send_done", tag, nbytes, status))

    def on_recv_done(self, tag, data, flags, status):
        self.got.append(("recv_done", tag, data, flags, status))

    def on_indicate(self, data, flags):
        self.got.append(("indicate", data, flags))
        return len(data) // 2

    def on_event(self, kind, reason, value):
        self.got.append(("event", kind, reason, value))

    def on_ocompl_error(self, tag, status):
        self.got.append(("ocompl_error", tag, status))


def tree(h0=1):
    """neighbour (h0), path (h0+1), one TCP record (h0+2) whose state is a marker object."""
    return [ObjEntry(hw.OBJ_NEIGHBOR, h0, NONE32, Neighbor(b"\x02" * 6, b"\x04" * 6)),
            ObjEntry(hw.OBJ_PATH, h0 + 1, 0, Path("10.0.0.2", "10.0.0.1")),
            ObjEntry(hw.OBJ_TCP, h0 + 2, 1, object())]


def offload(top, low, entries):
    cmd = top.initiate(entries)
    top.wait(cmd, 1)
    return cmd


@pytest.fixture
def pair():
    low = FakeLower()
    return IntermediateDriver(low), low


def test_initiate_translates_handles_down_and_up(pair):
    im, low = pair
    ents = tree()
    cmd = offload(im, low, ents)
    assert cmd.ok and cmd.count == 3
    (down,) = [c.args for c in low.cmds]
    # below: the IM's own handles, the same state objects, parents renumbered in step
    assert [d.host_handle for d in down] == [e.own_handle for e in im.entries.values()]
    assert not {d.host_handle for d in down} & {1, 2, 3}
    assert all(d.state is e.state for d, e in zip(down, ents))
    assert [d.parent for d in down] == [NONE32, 0, 1]
    # above: the overlying handles, and the IM's refs as the contexts (not the NIC's)
    assert [r.host_handle for r in cmd.result] == [1, 2, 3]
    refs = [r.nic_ctx for r in cmd.result]
    assert set(refs) == set(im.entries) and not set(refs) & set(low.objs)
    for r in cmd.result:
        e = im.entries[r.nic_ctx]
        assert e.upper_handle == r.host_handle and low.objs[e.lower_ctx] == e.own_handle


def test_data_requests_and_indications_translate_and_keep_the_buffers(pair):
    im, low = pair
    cmd = offload(im, low, tree())
    tcp = cmd.result[2]
    ent = im.entries[tcp.nic_ctx]
    up = Upper()
    im.register(3, up)
    data = memoryview(bytearray(b"x" * 5000))
    tag = im.send(tcp.nic_ctx, 3, data)
    ctx, handle, got, ltag = low.sends[-1]
    assert (ctx, handle, ltag) == (ent.lower_ctx, ent.own_handle, tag)
    assert got is data                                  # the very same buffer, no copy
    rtag = im.post_receive(tcp.nic_ctx, 3, 65536, push=False)
    assert low.recvs[-1] == (ent.lower_ctx, ent.own_handle, 65536, False, rtag)
    dtag = im.disconnect(tcp.nic_ctx, 3)
    atag = im.abort(tcp.nic_ctx, 3)
    assert low.ctl == [("disconnect", ent.lower_ctx, ent.own_handle, dtag),
                       ("abort", ent.lower_ctx, ent.own_handle, atag)]
    # up: the NIC answers with the IM's handle, the upper handler gets the same objects
    rx = b"received bytes"
    ind = bytearray(b"indicated!")
    low.fire(ent.own_handle, "on_send_done", tag, 5000, hw.ST_SUCCESS)
    low.fire(ent.own_handle, "on_recv_done", rtag, rx, hw.OCF_FIN, hw.ST_SUCCESS)
    assert low.fire(ent.own_handle, "on_indicate", ind, 0) == 5       # accepted count comes back
    low.fire(ent.own_handle, "on_event", hw.EV_DISCONNECT, 0, 0)
    low.fire(ent.own_handle, "on_ocompl_error", atag, hw.ST_ABORTED)
    assert up.got == [("send_done", tag, 5000, hw.ST_SUCCESS), ("recv_done", rtag, rx, hw.OCF_FIN, 0),
                      ("indicate", ind, 0), ("event", hw.EV_DISCONNECT, 0, 0),
                      ("ocompl_error", atag, hw.ST_ABORTED)]
    assert up.got[1][2] is rx and up.got[2][1] is ind
    assert im.request_data(tag, 3) == b"xxx"


def test_link_update_query_invalidate_use_the_lower_context(pair):
    im, low = pair
    first = offload(im, low, tree())
    n_ref, p_ref = first.result[0].nic_ctx, first.result[1].nic_ctx
    n_ent, p_ent = im.entries[n_ref], im.entries[p_ref]
    # a second connection on the same path: link records name the IM's refs
    ents = [ObjEntry(hw.OBJ_NEIGHBOR, 1, NONE32, link=True, nic_ctx=n_ref),
            ObjEntry(hw.OBJ_PATH, 2, 0, link=True, nic_ctx=p_ref),
            ObjEntry(hw.OBJ_TCP, 9, 1, object())]
    cmd = offload(im, low, ents)
    assert cmd.ok and [r.nic_ctx for r in cmd.result][:2] == [n_ref, p_ref]
    down = low.cmds[-1].args
    assert [(d.nic_ctx, d.host_handle) for d in down[:2]] == [(n_ent.lower_ctx, n_ent.own_handle),
                                                            (p_ent.lower_ctx, p_ent.own_handle)]
    assert len(im.entries) == 4                         # links made no new entries
    tcp_ref = cmd.result[2].nic_ctx
    upd = im.update([ObjEntry(hw.OBJ_NEIGHBOR, 1, NONE32, Neighbor(b"\x02" * 6, b"\x06" * 6),
                              nic_ctx=n_ref)])
    im.wait(upd, 1)
    assert upd.ok and low.cmds[-1].args[0].nic_ctx == n_ent.lower_ctx
    assert low.cmds[-1].args[0].host_handle == n_ent.own_handle
    q = im.wait(im.query([tcp_ref, p_ref]), 1)
    assert low.cmds[-1].args == [im.entries[tcp_ref].lower_ctx, p_ent.lower_ctx]
    assert [(r.host_handle, r.nic_ctx) for r in q.result] == [(9, tcp_ref), (2, p_ref)]
    assert q.result[0].state == ("state-of", im.entries[tcp_ref].lower_ctx)
    inv = im.wait(im.invalidate([p_ref]), 1)
    assert inv.ok and low.cmds[-1].args == [p_ent.lower_ctx]


def test_terminate_ends_the_entry_and_late_completions_still_come_up(pair):
    im, low = pair
    cmd = offload(im, low, tree())
    tcp_ref = cmd.result[2].nic_ctx
    ent = im.entries[tcp_ref]
    up = Upper()
    im.register(3, up)
    tag = im.send(tcp_ref, 3, b"abc")
    t = im.wait(im.terminate([tcp_ref], data_room=1234), 1)
    assert low.cmds[-1].data_room == 1234 and low.cmds[-1].args == [ent.lower_ctx]
    assert t.ok and t.result[0].host_handle == 3 and t.result[0].nic_ctx == tcp_ref
    assert tcp_ref not in im.entries and im.entry(tcp_ref) is None
    # the send the terminate overtook completes UPLOADED after it: still routed up
    low.fire(ent.own_handle, "on_send_done", tag, 0, hw.ST_UPLOADED)
    assert up.got == [("send_done", tag, 0, hw.ST_UPLOADED)]
    im.unregister(3)                                # the overlying driver is done with it
    assert ent.own_handle not in low.handlers and ent.own_handle not in im.by_own
    # parents: terminated after their dependents, their ports (never registered above) go at once
    t2 = im.wait(im.terminate([cmd.result[1].nic_ctx, cmd.result[0].nic_ctx]), 1)
    assert t2.ok and not im.entries and not im.by_own and not low.handlers


def test_stale_and_bogus_contexts_get_clear_errors(pair):
    im, low = pair
    cmd = offload(im, low, tree())
    tcp_ref = cmd.result[2].nic_ctx
    up = Upper()
    im.register(3, up)
    im.wait(im.terminate([tcp_ref]), 1)
    sent = len(low.cmds)
    # state operations on a stale context: INVALID_HANDLE, as the NIC answers, nothing goes down
    for op in (im.query, im.terminate, im.invalidate):
        c = im.wait(op([tcp_ref]), 1)
        assert c.status == hw.ST_INVALID_HANDLE and f"{tcp_ref:#x}" in c.error
    assert im.wait(im.query([tcp_ref]), 1).result[0].status == hw.ST_INVALID_HANDLE
    assert len(low.cmds) == sent
    # one stale among live ones: the live one goes down, the answer is PARTIAL, in order
    p_ref = cmd.result[1].nic_ctx
    q = im.wait(im.query([tcp_ref, p_ref]), 1)
    assert q.status == hw.ST_PARTIAL and low.cmds[-1].args == [im.entries[p_ref].lower_ctx]
    assert [r.status for r in q.result] == [hw.ST_INVALID_HANDLE, hw.ST_SUCCESS]
    assert q.result[1].nic_ctx == p_ref
    # a send on the stale context: refused (ERROR / INVALID_HANDLE on the next poll), bytes readable
    data = b"refused bytes"
    n_sends = len(low.sends)
    tag = im.send(tcp_ref, 3, data)
    assert len(low.sends) == n_sends and up.got == []
    seen = []
    up.on_ocompl_error = lambda t, s: seen.append((t, s, im.request_data(t, 7)))
    im.poll()
    assert seen == [(tag, hw.ST_INVALID_HANDLE, b"refused")]
    assert im.request_data(tag, 7) != b"refused"       # freed once the handler returned
    assert any("unknown context" in e for e in im.errors)
    # a context and a handle of nobody: ImError with one clear line, never a KeyError
    for call in (lambda: im.send(0xDEAD, 77, b"x"), lambda: im.post_receive(0xDEAD, 77, 10),
                 lambda: im.disconnect(0xDEAD, 77), lambda: im.abort(0xDEAD, 77),
                 lambda: im.accept(0xDEAD, 1)):
        with pytest.raises(ImError, match="0xdead"):
            call()
    # a live context with another object's handle
    with pytest.raises(ImError, match="belongs to handle"):
        im.send(p_ref, 3, b"x")
    # a link to a context that is not there: that record and its dependents fail, here
    c = im.wait(im.initiate([ObjEntry(hw.OBJ_NEIGHBOR, 5, NONE32, link=True, nic_ctx=0xBAD),
                             ObjEntry(hw.OBJ_PATH, 6, 0, Path("10.0.0.2", "10.0.0.9")),
                             ObjEntry(hw.OBJ_TCP, 7, 1, object())]), 1)
    assert c.status == hw.ST_FAILURE and [r.status for r in c.result] == [
        hw.ST_INVALID_HANDLE, hw.ST_FAILURE, hw.ST_FAILURE]
    assert [r.host_handle for r in c.result] == [5, 6, 7] and "0xbad" in c.error
    assert len(low.cmds) == sent + 1


def test_failed_or_raising_initiate_leaves_no_entries(pair):
    im, low = pair
    low.fail_initiate = True
    cmd = offload(im, low, tree())
    assert cmd.status == hw.ST_FAILURE and all(r.nic_ctx == 0 for r in cmd.result)
    assert [r.host_handle for r in cmd.result] == [1, 2, 3]
    assert not im.entries and not im.by_own and not low.handlers
    low.fail_initiate = False
    low.raise_on_initiate = RuntimeError("arena exhausted")
    with pytest.raises(RuntimeError, match="arena exhausted"):
        im.initiate(tree())
    assert not im.entries and not im.by_own and not low.handlers


def test_status_and_neighbour_query_pass_up_translated(pair):
    im, low = pair
    cmd = offload(im, low, tree())
    n_ref = cmd.result[0].nic_ctx
    ent = im.entries[n_ref]
    seen = []
    im.status_handler = lambda k: seen.append(("status", k))
    im.neigh_query_handler = lambda ctx, h: seen.append(("neigh", ctx, h))
    low.status_handler(hw.EV_UPLOAD_ALL)
    low.neigh_query_handler(ent.lower_ctx, ent.own_handle)
    low.neigh_query_handler(0x999, 0x123)           # nobody's: counted, not passed up
    assert seen == [("status", hw.EV_UPLOAD_ALL), ("neigh", n_ref, 1)]
    assert im.stats["neigh_query_unknown"] == 1
    low.paused = True
    assert im.paused and im.is_up and im.sendq is low.sendq


def test_two_stacked_ims_chain_the_handles():
    low = FakeLower()
    top = build_chain("trace,trace", low)
    upper_im, lower_im = chain_of(top)
    assert isinstance(top, TraceIM) and lower_im.lower is low and top.bottom is low
    assert (upper_im.name, lower_im.name) == ("trace1", "trace2")
    cmd = offload(top, low, tree())
    tcp_ref = cmd.result[2].nic_ctx
    a = upper_im.entries[tcp_ref]
    b = lower_im.entries[a.lower_ctx]
    assert b.upper_handle == a.own_handle and low.objs[b.lower_ctx] == b.own_handle
    assert len({a.upper_handle, a.own_handle, b.own_handle}) == 3
    assert len({a.ref, b.ref, b.lower_ctx}) == 3
    up = Upper()
    top.register(3, up)
    data = bytearray(b"y" * 100)
    tag = top.send(tcp_ref, 3, data)
    assert low.sends[-1][:3] == (b.lower_ctx, b.own_handle, data) and low.sends[-1][2] is data
    ind = b"z" * 10
    assert low.fire(b.own_handle, "on_indicate", ind, 0) == 5
    low.fire(b.own_handle, "on_send_done", tag, 100, hw.ST_SUCCESS)
    assert up.got[0][1] is ind and up.got[1] == ("send_done", tag, 100, hw.ST_SUCCESS)
    t = top.wait(top.terminate([tcp_ref]), 1)
    assert t.ok and t.result[0].host_handle == 3 and t.result[0].nic_ctx == tcp_ref
    assert tcp_ref not in upper_im.entries and a.lower_ctx not in lower_im.entries
    top.unregister(3)
    assert b.own_handle not in low.handlers
    # each trace shows its own level of the chain
    s1 = next(r for r in upper_im.records if r["op"] == "send")
    s2 = next(r for r in lower_im.records if r["op"] == "send")
    assert (s1["upper_handle"], s1["upper_ctx"], s1["own_handle"], s1["lower_ctx"]) == (
        3, a.ref, a.own_handle, a.lower_ctx)
    assert (s2["upper_handle"], s2["upper_ctx"], s2["own_handle"], s2["lower_ctx"]) == (
        a.own_handle, b.ref, b.own_handle, b.lower_ctx)
    assert s1["bytes"] == s2["bytes"] == 100 and s1["tag"] == s2["tag"] == tag


def test_trace_file_has_one_json_record_per_crossing(tmp_path):
    low = FakeLower()
    path = tmp_path / "t.jsonl"
    top = build_chain(f"trace:{path}", low)
    cmd = offload(top, low, tree())
    tcp_ref = cmd.result[2].nic_ctx
    top.register(3, Upper())
    top.send(tcp_ref, 3, b"q" * 7)
    ent = top.entries[tcp_ref]
    low.fire(ent.own_handle, "on_event", hw.EV_RETRIEVE, hw.RR_TIMEOUT, 0)
    top.wait(top.terminate([tcp_ref]), 1)
    close_chain(top)
    recs = read_trace(str(path))
    assert [(r["op"], r["way"]) for r in recs] == [
        ("initiate", "down"), ("initiate_done", "up"), ("send", "down"), ("event", "up"),
        ("terminate", "down"), ("terminate_done", "up")]
    assert all(r["im"] == "trace1" and r["t"] >= 0 for r in recs)
    ini = recs[0]["objects"]
    assert [o["upper_handle"] for o in ini] == [1, 2, 3]
    done = recs[1]["objects"]
    assert done[2] == {"type": hw.OBJ_TCP, "status": hw.ST_SUCCESS, **ent.chain()}
    assert recs[1]["status"] == hw.ST_SUCCESS and ent.lower_ctx == 0x5003
    assert recs[3]["reason"] == hw.RR_TIMEOUT and recs[3]["upper_handle"] == 3
    assert recs[4]["objects"] == [ent.chain()]
    assert recs[5]["objects"] == [{"type": hw.OBJ_TCP, "status": hw.ST_SUCCESS, **ent.chain()}]
    # the file spells the handles in hex
    raw = json.loads(path.read_text().splitlines()[2])
    assert raw["bytes"] == 7 and raw["upper_handle"] == "0x3" and raw["own_handle"] == hex(ent.own_handle)


def test_spec_parsing_and_errors(tmp_path):
    low = FakeLower()
    assert build_chain("", low) is low and parse_spec("") == []
    assert parse_spec("trace:/tmp/x.jsonl, trace") == [("trace", "/tmp/x.jsonl"), ("trace", None)]
    for bad, msg in (("bogus", "unknown IM 'bogus'"), ("trace,,trace", "empty element"),
                     (",", "empty element")):
        with pytest.raises(ImSpecError, match=msg):
            build_chain(bad, low)
    # a chain that cannot be built leaves the layer below as it was
    mine = low.status_handler = object()
    with pytest.raises(ImSpecError, match="cannot write the trace file"):
        build_chain(f"trace:{tmp_path}/no/such/dir/t.jsonl,trace", low)
    assert low.status_handler is mine and low.neigh_query_handler is None


def test_im_option_is_a_usage_error_when_malformed(capsys):
    ap = argparse.ArgumentParser(prog="chimney perf")
    ap.add_argument("--im", type=spec_arg)
    assert ap.parse_args(["--im", "trace:/tmp/x.jsonl,trace"]).im == "trace:/tmp/x.jsonl,trace"
    with pytest.raises(SystemExit) as ex:
        ap.parse_args(["--im", "trace,tarce"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "unknown IM 'tarce'" in err and "Traceback" not in err
