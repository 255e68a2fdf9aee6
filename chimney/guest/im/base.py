"""The intermediate-driver (IM) base: a layer between the host stack's offload
manager and the chimney below it (the miniport's `Chimney`, or another IM) that
presents the very interface it consumes, so the manager offloads through zero,
one or several stacked IMs without knowing (docs/im-drivers.md).

    im = IntermediateDriver(lower)          # lower: a Chimney (up) or another IM
    mgr = OffloadManager(stack, im, "always")

Per offloaded object the IM keeps an `ImEntry`:
    upper_handle  the overlying driver's handle (host_handle of the initiate record)
    ref           the IM's reference to the entry, handed up as the object's context
    own_handle    the IM's own handle, passed down as host_handle
    lower_ctx     the context the layer below returned for own_handle
Requests come down with (ref, upper_handle) and go on with (lower_ctx,
own_handle); completions and indications come up with own_handle (the lower
layer dispatches them to the entry's `_Port`) and go on to the handler the
overlying driver registered for upper_handle.  Data (send buffers, received
and indicated bytes, state trees) passes through as the same objects.

A context from above that names no live entry (never handed out, or
terminated) is answered as the NIC answers a stale context, never passed
down: state operations complete with per-object INVALID_HANDLE and `error`
says which contexts; data requests complete with an ERROR / INVALID_HANDLE to
the handler of the handle the caller passed (a send's bytes stay readable
through request_data).  Those completions are delivered by the next poll().

Subclasses observe every crossing through `crossing()` (see trace.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter, deque

from ... import hw
from ...staterec.codec import NONE32

_CMD_NAMES = {b.mask: b.name for b in hw.CMD_OPCODES}
_ordinals = itertools.count(1)


class ImError(Exception):
    """A request the IM cannot route (a handle that belongs to no object of its own)."""


class ImEntry:
    """One object offloaded through this IM; lives from initiate until its terminate
    (or a failed initiate) completes."""
    __slots__ = ("live", "lower_ctx", "own_handle", "ref", "type", "upper_handle")

    def __init__(self, type_: int, upper_handle: int, ref: int, own_handle: int):
        self.type, self.upper_handle, self.ref, self.own_handle = type_, upper_handle, ref, own_handle
        self.lower_ctx = 0
        self.live = False           # True once the initiate below succeeded

    def chain(self) -> dict:
        return {"upper_handle": self.upper_handle, "upper_ctx": self.ref,
                "own_handle": self.own_handle, "lower_ctx": self.lower_ctx}

    def __repr__(self) -> str:
        return (f"ImEntry(upper_handle={self.upper_handle:#x} ref={self.ref:#x} "
                f"own_handle={self.own_handle:#x} lower_ctx={self.lower_ctx:#x})")


class ImCommand:
    """A state operation as the overlying driver sees it (the fields of Chimney's
    Command): done, status, count, result (translated ObjEntry list or None), error."""

    def __init__(self, opcode: int, tag: int, cb=None):
        self.opcode, self.tag, self.cb = opcode, tag, cb
        self.done = False
        self.status: int | None = None
        self.count = 0
        self.result = None
        self.error: str | None = None
        self.lower = None           # the command below (None when answered by the IM)
        self.started = time.monotonic()
        self.seconds = 0.0

    @property
    def name(self) -> str:
        return _CMD_NAMES.get(self.opcode, str(self.opcode))

    @property
    def ok(self) -> bool:
        return self.done and self.status == hw.ST_SUCCESS

    def __repr__(self) -> str:
        return f"ImCommand({self.name} tag={self.tag} done={self.done} status={self.status})"


class _Port:
    """What the IM registers below for one own_handle: completions and indications of
    that object, passed up to the overlying driver's handler for its upper_handle."""
    __slots__ = ("entry", "im")

    def __init__(self, im, entry: ImEntry):
        self.im, self.entry = im, entry

    def _up(self, method: str):
        h = self.im.handlers.get(self.entry.upper_handle)
        return getattr(h, method, None) if h is not None else None

    def on_send_done(self, tag, nbytes, status) -> None:
        self.im.crossing("send_done", "up", self.entry, tag=tag, bytes=nbytes, status=status)
        f = self._up("on_send_done")
        if f:
            f(tag, nbytes, status)

    def on_recv_done(self, tag, data, flags, status) -> None:
        self.im.crossing("recv_done", "up", self.entry, tag=tag, bytes=len(data), flags=flags,
                         status=status)
        f = self._up("on_recv_done")
        if f:
            f(tag, data, flags, status)

    def on_indicate(self, data, flags) -> int:
        f = self._up("on_indicate")
        taken = int(f(data, flags) or 0) if f else 0
        self.im.crossing("indicate", "up", self.entry, bytes=len(data), flags=flags, accepted=taken)
        return taken

    def on_event(self, kind, reason, value) -> None:
        self.im.crossing("event", "up", self.entry, kind=kind, reason=reason, value=value)
        f = self._up("on_event")
        if f:
            f(kind, reason, value)
        else:
            self.im.stats["ev_unknown_handle"] += 1

    def on_ocompl_error(self, tag, status) -> None:
        self.im.crossing("ocompl_error", "up", self.entry, tag=tag, status=status)
        f = self._up("on_ocompl_error")
        if f:
            f(tag, status)


class IntermediateDriver:
    """Pass-through IM: handle translation both ways, nothing else.  Subclass and
    override `crossing` to watch, or the request methods to change what goes down."""

    kind = "im"

    def __init__(self, lower, name: str | None = None):
        self.lower = lower
        self.ordinal = next(_ordinals)
        self.name = name or f"{self.kind}{self.ordinal}"
        self.stats: Counter = Counter()
        self.handlers: dict[int, object] = {}       # upper handle -> the overlying handler
        self.status_handler = None                  # set by the overlying driver
        self.neigh_query_handler = None
        self.entries: dict[int, ImEntry] = {}       # ref -> live (or initiating) entry
        self.by_own: dict[int, ImEntry] = {}        # own handle -> entry whose port is registered below
        self.errors: list[str] = []                 # the last bogus requests, one line each
        # refs: u32, this IM's ordinal in the top byte so stacked layers' values differ
        self._refs = itertools.count(1)
        self._handles = itertools.count(1)
        self._tags = itertools.count(1)
        self._local: deque = deque()                # completions the IM answers itself
        self._local_data: dict[int, object] = {}    # their tag -> send data (request_data)
        lower.status_handler = self._on_lower_status
        lower.neigh_query_handler = self._on_lower_neigh_query

    # -- the hook ----------------------------------------------------------------------
    def crossing(self, op: str, way: str, entry: ImEntry | None, **info) -> None:
        """Called for every call and indication crossing the IM (way "down": a request
        on its way to the lower layer, "up": a completion or indication on its way to
        the overlying driver).  Nothing here; the tracing IM records."""

    # -- what the overlying driver reads -------------------------------------------------
    @property
    def is_up(self) -> bool:
        return self.lower.is_up

    @property
    def paused(self) -> bool:
        return self.lower.paused

    @property
    def sendq(self):
        """The send ring's occupancy (the manager orders a TERMINATE after the sends on
        it); the IM queues nothing of its own, so it is the one at the bottom."""
        return self.lower.sendq

    @property
    def supported(self) -> bool:
        return self.lower.supported

    @property
    def bottom(self):
        """The miniport's chimney under all stacked IMs."""
        low = self.lower
        while isinstance(low, IntermediateDriver):
            low = low.lower
        return low

    def up(self, params: dict | None = None) -> None:
        self.lower.up(params)

    def pending(self) -> bool:
        return bool(self._local) or self.lower.pending()

    def kick_owed(self) -> None:
        self.lower.kick_owed()

    def send_room(self) -> int:
        return self.lower.send_room()

    # -- handles -------------------------------------------------------------------------
    def _new_entry(self, type_: int, upper_handle: int) -> ImEntry:
        while True:
            ref = ((0xF0 - self.ordinal) & 0xFF) << 24 | (next(self._refs) & 0xFFFFFF)
            if ref & 0xFFFFFF and ref not in self.entries:
                break
        own = (0x1D << 56) | (self.ordinal << 40) | next(self._handles)
        e = ImEntry(type_, upper_handle, ref, own)
        self.entries[ref] = e
        self.by_own[own] = e
        self.lower.register(own, _Port(self, e))
        return e

    def _retire(self, e: ImEntry) -> None:
        """The object is gone below: its ref is stale from now on.  Its port stays
        registered while the overlying driver keeps a handler for it (completions of
        requests that raced the terminate still come up)."""
        e.live = False
        self.entries.pop(e.ref, None)
        if e.upper_handle not in self.handlers:
            self._drop_port(e)

    def _drop_port(self, e: ImEntry) -> None:
        if self.by_own.get(e.own_handle) is e:
            del self.by_own[e.own_handle]
            self.lower.unregister(e.own_handle)

    def entry(self, ref: int) -> ImEntry | None:
        e = self.entries.get(ref)
        return e if e is not None and e.live else None

    def _bogus(self, what: str) -> None:
        msg = f"{self.name}: {what}"
        self.stats["bogus_requests"] += 1
        self.errors.append(msg)
        del self.errors[:-64]

    def register(self, handle: int, handler) -> None:
        self.handlers[handle] = handler

    def unregister(self, handle: int) -> None:
        self.handlers.pop(handle, None)
        for e in [e for e in self.by_own.values() if e.upper_handle == handle and not e.live]:
            self._drop_port(e)

    # -- state manipulation ---------------------------------------------------------------
    def _cmd(self, opcode: int, cb) -> ImCommand:
        return ImCommand(opcode, next(self._tags) & 0xFFFFFFFF or 1, cb)

    def _complete(self, cmd: ImCommand, status: int, count: int, result, error=None,
                  objs=None) -> None:
        cmd.status, cmd.count, cmd.result = status, count, result
        if error:
            cmd.error = f"{cmd.error}; {error}" if cmd.error else error
        cmd.done = True
        cmd.seconds = time.monotonic() - cmd.started
        self.crossing(cmd.name.lower() + "_done", "up", None, status=status,
                      objects=objs if objs is not None else [_obj(r) for r in (result or [])],
                      error=cmd.error)
        if cmd.cb is not None:
            cmd.cb(cmd)

    def _answer_later(self, cmd: ImCommand, status: int, count: int, result, error: str) -> None:
        self._local.append(lambda: self._complete(cmd, status, count, result, error))

    def initiate(self, entries, cb=None) -> ImCommand:
        """Offload a state tree: new records get an entry (own handle down), link records
        name an entry's lower context; results come up with the upper handles and refs."""
        cmd = self._cmd(hw.CMD_INITIATE, cb)
        n = len(entries)
        down, plan, made = [], [], []       # plan[i]: (entry, index below) or a local status
        index: dict[int, int] = {}          # upper index -> index below
        bad: list[str] = []
        for i, e in enumerate(entries):
            parent = e.parent
            if parent != NONE32 and (parent >= i or parent not in index):
                # its parent failed here (or names no earlier record): it fails too
                plan.append(hw.ST_FAILURE if parent < i else hw.ST_INVALID_REQUEST)
                continue
            p_down = NONE32 if parent == NONE32 else index[parent]
            if e.link:
                ent = self.entry(e.nic_ctx)
                if ent is None:
                    bad.append(f"{e.nic_ctx:#x}")
                    plan.append(hw.ST_INVALID_HANDLE)
                    continue
                rec = dataclasses.replace(e, host_handle=ent.own_handle, nic_ctx=ent.lower_ctx,
                                          parent=p_down)
            else:
                ent = self._new_entry(e.type, e.host_handle)
                made.append(ent)
                rec = dataclasses.replace(e, host_handle=ent.own_handle, nic_ctx=0, parent=p_down)
            index[i] = len(down)
            plan.append((ent, len(down)))
            down.append(rec)
        error = f"link to unknown context(s) {', '.join(bad)}" if bad else None
        if bad:
            self._bogus(f"initiate: {error}")
        self.crossing("initiate", "down", None, objects=[
            {"type": e.type, "link": e.link, **(p[0].chain() if isinstance(p, tuple) else
                                                {"upper_handle": e.host_handle, "status": p})}
            for e, p in zip(entries, plan)])
        if not down:
            self._answer_later(cmd, hw.ST_FAILURE if n else hw.ST_INVALID_REQUEST, n,
                               [self._local_status(e, p) for e, p in zip(entries, plan)], error)
            return cmd
        try:
            cmd.lower = self.lower.initiate(down, cb=lambda c: self._initiated(cmd, c, entries, plan,
                                                                               error))
        except Exception:
            for ent in made:                 # nothing went down: forget the entries made for it
                self.entries.pop(ent.ref, None)
                self._drop_port(ent)
            raise
        return cmd

    @staticmethod
    def _local_status(e, status: int):
        return dataclasses.replace(e, state=None, link=False, nic_ctx=0, status=status)

    def _initiated(self, cmd, low, entries, plan, error) -> None:
        res = low.result or []
        # one status per record sent down, in order (else matched by own handle)
        in_order = len(res) == sum(isinstance(p, tuple) for p in plan)
        by_own = {r.host_handle: r for r in res}
        out, objs, failed = [], [], 0
        for e, p in zip(entries, plan):
            if not isinstance(p, tuple):
                out.append(self._local_status(e, p))
                objs.append({"type": e.type, "status": p, "upper_handle": e.host_handle})
                failed += 1
                continue
            ent, j = p
            r = res[j] if in_order else by_own.get(ent.own_handle)
            if r is None:
                out.append(self._local_status(e, hw.ST_FAILURE))
                objs.append({"type": e.type, "status": hw.ST_FAILURE, **ent.chain()})
                failed += 1
                if not e.link:
                    self._retire(ent)
                continue
            ok = r.status in (hw.ST_SUCCESS, hw.ST_PARTIAL) and r.nic_ctx
            if not e.link:
                if ok:
                    ent.lower_ctx, ent.live = r.nic_ctx, True
                else:
                    self._retire(ent)
            if not ok:
                failed += 1
            out.append(dataclasses.replace(r, host_handle=ent.upper_handle,
                                           nic_ctx=ent.ref if ok else 0))
            objs.append({"type": r.type, "status": r.status, **ent.chain()})
        status = low.status
        if status == hw.ST_SUCCESS and failed:
            status = hw.ST_PARTIAL if failed < len(entries) else hw.ST_FAILURE
        cmd.error = low.error
        self._complete(cmd, status, len(entries), out, error, objs)

    def update(self, entries, cb=None) -> ImCommand:
        cmd = self._cmd(hw.CMD_UPDATE, cb)
        known = [(e, self.entry(e.nic_ctx)) for e in entries]
        bad = [f"{e.nic_ctx:#x}" for e, ent in known if ent is None]
        down = [dataclasses.replace(e, host_handle=ent.own_handle, nic_ctx=ent.lower_ctx,
                                    parent=self._lower_parent(e.parent))
                for e, ent in known if ent is not None]
        self.crossing("update", "down", None, objects=[
            {"type": e.type, **(ent.chain() if ent else {"upper_ctx": e.nic_ctx})} for e, ent in known])
        return self._by_contexts(cmd, self.lower.update, down, [ent for _, ent in known], bad)

    def _lower_parent(self, parent: int) -> int:
        # a path record's parent names its (new) neighbour by context: translate it too
        if parent == NONE32:
            return parent
        ent = self.entry(parent)
        return ent.lower_ctx if ent is not None else NONE32

    def query(self, ctxs, cb=None) -> ImCommand:
        return self._ctx_op(hw.CMD_QUERY, self.lower.query, ctxs, cb)

    def invalidate(self, ctxs, cb=None) -> ImCommand:
        return self._ctx_op(hw.CMD_INVALIDATE, self.lower.invalidate, ctxs, cb)

    def terminate(self, ctxs, cb=None, data_room: int = 0) -> ImCommand:
        return self._ctx_op(hw.CMD_TERMINATE, lambda c, cb: self.lower.terminate(
            c, cb, data_room=data_room), ctxs, cb)

    def _ctx_op(self, opcode, call, ctxs, cb) -> ImCommand:
        cmd = self._cmd(opcode, cb)
        ents = [self.entry(c) for c in ctxs]
        bad = [f"{c:#x}" for c, ent in zip(ctxs, ents) if ent is None]
        self.crossing(cmd.name.lower(), "down", None, objects=[
            ent.chain() if ent else {"upper_ctx": c} for c, ent in zip(ctxs, ents)])
        down = [ent.lower_ctx for ent in ents if ent is not None]
        return self._by_contexts(cmd, call, down, ents, bad, ctxs)

    def _by_contexts(self, cmd, call, down, ents, bad, ctxs=None) -> ImCommand:
        """Send the known objects down; unknown ones get INVALID_HANDLE (as the NIC
        answers a stale context), all of them unknown: answered here."""
        n = len(ents)
        error = None
        if bad:
            error = f"unknown context(s) {', '.join(bad)} (never offloaded here, or terminated)"
            self._bogus(f"{cmd.name.lower()}: {error}")
        if not down:
            missing = [_missing(c) for c in ctxs] if ctxs is not None and cmd.opcode in (
                hw.CMD_QUERY, hw.CMD_TERMINATE) else None
            self._answer_later(cmd, hw.ST_INVALID_HANDLE if n else hw.ST_INVALID_REQUEST, n,
                               missing, error)
            return cmd
        cmd.lower = call(down, lambda c: self._by_contexts_done(cmd, c, ents, ctxs, error))
        return cmd

    def _by_contexts_done(self, cmd, low, ents, ctxs, error) -> None:
        by_lower: dict[int, ImEntry] = {ent.lower_ctx: ent for ent in ents if ent is not None}
        result = None
        if low.result is not None:
            result, placed = [], {}         # ref -> its translated records, in order
            for r in low.result:
                ent = by_lower.get(r.nic_ctx)
                if ent is None:             # a record the IM cannot place: no context to give
                    result.append(dataclasses.replace(r, nic_ctx=0))
                    continue
                t = dataclasses.replace(r, host_handle=ent.upper_handle, nic_ctx=ent.ref)
                placed.setdefault(ent.ref, deque()).append(t)
                result.append(t)
                if cmd.opcode == hw.CMD_TERMINATE and r.status in (hw.ST_SUCCESS, hw.ST_INVALID_HANDLE):
                    self._retire(ent)       # uploaded (or unknown below too): the offload is over
            if ctxs is not None and cmd.opcode in (hw.CMD_QUERY, hw.CMD_TERMINATE):
                # one record per requested context, in the order asked (as the NIC answers)
                result = [(placed.get(ent.ref) or deque([_missing(c)])).popleft()
                          if ent is not None else _missing(c) for c, ent in zip(ctxs, ents)]
        status = low.status
        if status == hw.ST_SUCCESS and error:
            status = hw.ST_PARTIAL
        if result is not None and ctxs is not None and len(result) == len(ents):
            objs = [{"type": r.type, "status": r.status, **(ent.chain() if ent else {"upper_ctx": c})}
                    for r, c, ent in zip(result, ctxs, ents)]
        else:
            objs = [ent.chain() if ent else {"status": hw.ST_INVALID_HANDLE} for ent in ents]
        cmd.error = low.error
        self._complete(cmd, status, len(ents), result, error, objs)

    def set_params(self, params: dict | None = None, cb=None):
        self.crossing("set_params", "down", None, params=params)
        return self.lower.set_params(params, cb)

    def wait(self, cmd, timeout: float = 10.0):
        """Poll until cmd completes (as Chimney.wait)."""
        end = time.monotonic() + timeout
        while not cmd.done:
            if time.monotonic() > end:
                raise TimeoutError(f"{cmd} did not complete in {timeout} s")
            if not self.poll():
                self.kick_owed()
                time.sleep(0.0005)
        return cmd

    # -- data I/O ---------------------------------------------------------------------------
    def _route(self, op: str, ctx: int, handle: int) -> ImEntry | None:
        """The live entry a data request names, or None (then answered here)."""
        e = self.entry(ctx)
        if e is not None and e.upper_handle == handle:
            return e
        if e is not None:
            raise ImError(f"{self.name}: {op} with handle {handle:#x} on context {ctx:#x}, "
                          f"which belongs to handle {e.upper_handle:#x}")
        if handle not in self.handlers:
            raise ImError(f"{self.name}: {op} on context {ctx:#x} with handle {handle:#x}: "
                          f"neither was offloaded through this IM")
        self._bogus(f"{op} on unknown context {ctx:#x} (handle {handle:#x}): never offloaded "
                    f"here, or terminated; completes INVALID_HANDLE")
        return None

    def _refuse(self, op: str, ctx: int, handle: int, nbytes: int, data=None) -> int:
        tag = (1 << 48) | (self.ordinal << 32) | (next(self._tags) & 0xFFFFFFFF)
        if data is not None:
            self._local_data[tag] = data

        def done():
            self.crossing("ocompl_error", "up", None, upper_handle=handle, upper_ctx=ctx, tag=tag,
                          status=hw.ST_INVALID_HANDLE)
            h = self.handlers.get(handle)
            f = getattr(h, "on_ocompl_error", None) if h is not None else None
            try:
                if f:
                    f(tag, hw.ST_INVALID_HANDLE)
            finally:
                self._local_data.pop(tag, None)
        self.crossing(op, "down", None, upper_handle=handle, upper_ctx=ctx, tag=tag, bytes=nbytes,
                      status=hw.ST_INVALID_HANDLE)
        self._local.append(done)
        return tag

    def send(self, ctx: int, handle: int, data) -> int | None:
        e = self._route("send", ctx, handle)
        if e is None:
            return self._refuse("send", ctx, handle, len(data), data)
        tag = self.lower.send(e.lower_ctx, e.own_handle, data)
        self.crossing("send", "down", e, tag=tag, bytes=len(data))
        return tag

    def request_data(self, tag: int, n: int) -> bytes:
        d = self._local_data.get(tag)
        if d is not None:
            return bytes(d[:n])
        return self.lower.request_data(tag, n)

    def post_receive(self, ctx: int, handle: int, size: int, push: bool = True) -> int | None:
        e = self._route("post_receive", ctx, handle)
        if e is None:
            return self._refuse("post_receive", ctx, handle, size)
        tag = self.lower.post_receive(e.lower_ctx, e.own_handle, size, push=push)
        self.crossing("post_receive", "down", e, tag=tag, bytes=size, push=push)
        return tag

    def disconnect(self, ctx: int, handle: int) -> int | None:
        e = self._route("disconnect", ctx, handle)
        if e is None:
            return self._refuse("disconnect", ctx, handle, 0)
        tag = self.lower.disconnect(e.lower_ctx, e.own_handle)
        self.crossing("disconnect", "down", e, tag=tag)
        return tag

    def abort(self, ctx: int, handle: int) -> int | None:
        e = self._route("abort", ctx, handle)
        if e is None:
            return self._refuse("abort", ctx, handle, 0)
        tag = self.lower.abort(e.lower_ctx, e.own_handle)
        self.crossing("abort", "down", e, tag=tag)
        return tag

    def accept(self, ctx: int, n: int) -> None:
        """The answer to an indication (the lowest layer gives it itself, from what
        on_indicate returned); here for callers that answer by hand."""
        e = self.entry(ctx)
        if e is None:
            raise ImError(f"{self.name}: accept on unknown context {ctx:#x}")
        self.crossing("accept", "down", e, bytes=n)
        self.lower.accept(e.lower_ctx, n)

    def give_pool_buffer(self, b=None) -> bool:
        return self.lower.give_pool_buffer(b)

    # -- completions and indications ----------------------------------------------------------
    def poll(self, limit: int = 1024) -> int:
        n = 0
        while self._local:
            self._local.popleft()()
            n += 1
        return n + self.lower.poll(limit)

    def _on_lower_status(self, kind) -> None:
        self.crossing("status", "up", None, kind=kind)
        if self.status_handler is not None:
            self.status_handler(kind)

    def _on_lower_neigh_query(self, ctx, handle) -> None:
        e = self.by_own.get(handle)
        if e is None or not e.live or e.lower_ctx != ctx:
            self.stats["neigh_query_unknown"] += 1
            self.crossing("neigh_query", "up", None, own_handle=handle, lower_ctx=ctx,
                          error="no live entry")
            return
        self.crossing("neigh_query", "up", e)
        if self.neigh_query_handler is not None:
            self.neigh_query_handler(e.ref, e.upper_handle)


def _obj(r) -> dict:
    """A record as the overlying driver sees it, for the trace."""
    return {"type": r.type, "status": r.status, "upper_handle": r.host_handle, "upper_ctx": r.nic_ctx}


def _missing(ctx: int):
    """The record the NIC returns for an unknown context in QUERY / TERMINATE."""
    from ...staterec.codec import ObjEntry
    return ObjEntry(hw.OBJ_NEIGHBOR, 0, NONE32, status=hw.ST_INVALID_HANDLE, nic_ctx=ctx)
