"""State objects on the wire of the command queue: the byte form of neighbour,
path and TCP state records (chimney.hw ObjRecord and the *State layouts), used
by the miniport to build requests and read responses, and by the device to
read requests and build responses.

A buffer is a sequence of records, each an `ObjRecord` header, `state_len`
bytes of state and `data_len` bytes of TCP data, padded to 8 bytes:

    neighbour: NeighState
    path:      PathState
    TCP:       TcpConstState + TcpCachedState + TcpDelegatedState,
               then send_len bytes of send data and recv_len bytes of received data

A record with `link` set names an object already offloaded (its `nic_ctx`) and
carries no state.  TCP records take their IP addresses from their parent path,
so `TcpConst.local_ip/remote_ip` are filled in by `decode_records` from the
tree and are not encoded twice.  Everything read from a buffer is checked;
malformed input raises CodecError, never anything else.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from .. import hw
from ..tcp.state import TcpCached, TcpConst, TcpDelegated, TcpState

_STATES = [TcpState(n) for n in hw.TCP_STATES]
_STATE_INDEX = {s: i for i, s in enumerate(_STATES)}
NONE32 = 0xFFFFFFFF
_TCP_STATE_LEN = hw.TcpConstState.size + hw.TcpCachedState.size + hw.TcpDelegatedState.size
_STATE_LEN = {hw.OBJ_NEIGHBOR: hw.NeighState.size, hw.OBJ_PATH: hw.PathState.size,
              hw.OBJ_TCP: _TCP_STATE_LEN}
MAX_DATA = 16 << 20       # per record: a sanity bound on send + receive data


class CodecError(ValueError):
    """A malformed state buffer."""


@dataclass
class Neighbor:
    src_mac: bytes
    dst_mac: bytes
    vlan_id: int | None = None
    host_reach_delta: int = 0       # cached, ticks
    nic_reach_delta: int = 0        # delegated, ticks


@dataclass
class Path:
    src_ip: str
    dst_ip: str
    path_mtu: int = 1500

    @property
    def ipv6(self) -> bool:
        return ipaddress.ip_address(self.src_ip).version == 6


@dataclass
class Tcp:
    const: TcpConst
    cached: TcpCached
    delegated: TcpDelegated         # send_buffer / recv_buffer carry the data


@dataclass
class ObjEntry:
    """One object of a request or response.  `parent`: index of the parent
    entry in the same buffer, or (when the parent is a link entry's object
    already offloaded) still the index of that link entry; OBJ_NONE for none."""
    type: int
    host_handle: int
    parent: int = NONE32
    state: Neighbor | Path | Tcp | None = None
    link: bool = False
    nic_ctx: int = 0
    status: int = 0
    extra: dict = field(default_factory=dict)


# --- addresses ------------------------------------------------------------------
def ip16(addr: str) -> bytes:
    """An address in 16 bytes: IPv6 as is, IPv4 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(addr)
    return ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed


def ip_from16(raw: bytes, v6: bool) -> str:
    ip = ipaddress.IPv6Address(raw)
    if not v6:
        if ip.ipv4_mapped is None:
            raise CodecError(f"IPv4 path with a non-mapped address {ip}")
        return str(ip.ipv4_mapped)
    return str(ip)


# --- per-object state -------------------------------------------------------------
def _u32(v: int, what: str) -> int:
    if not 0 <= v <= NONE32:
        raise CodecError(f"{what} = {v} does not fit 32 bits")
    return v


def _delta_out(v: int) -> int:
    return NONE32 if v < 0 else min(v, NONE32 - 1)


def _delta_in(v: int) -> int:
    return -1 if v == NONE32 else v


def encode_neighbor(n: Neighbor) -> bytes:
    if len(n.src_mac) != 6 or len(n.dst_mac) != 6:
        raise CodecError("MAC addresses are 6 bytes")
    return hw.NeighState.pack(src_mac=bytes(n.src_mac), vlan_id=n.vlan_id or 0,
                              dst_mac=bytes(n.dst_mac),
                              flags=hw.NEIGHF_VLAN if n.vlan_id is not None else 0,
                              host_reach_delta=_u32(n.host_reach_delta, "host_reach_delta"),
                              nic_reach_delta=_u32(n.nic_reach_delta, "nic_reach_delta"))


def decode_neighbor(raw: bytes) -> Neighbor:
    f = hw.NeighState.unpack_from(raw)
    return Neighbor(src_mac=f["src_mac"], dst_mac=f["dst_mac"],
                    vlan_id=f["vlan_id"] if f["flags"] & hw.NEIGHF_VLAN else None,
                    host_reach_delta=f["host_reach_delta"], nic_reach_delta=f["nic_reach_delta"])


def encode_path(p: Path) -> bytes:
    try:
        v6 = p.ipv6
        if ipaddress.ip_address(p.dst_ip).version != (6 if v6 else 4):
            raise CodecError("path mixes IPv4 and IPv6")
        return hw.PathState.pack(src_ip=ip16(p.src_ip), dst_ip=ip16(p.dst_ip),
                                 path_mtu=_u32(p.path_mtu, "path_mtu"), flags=int(v6))
    except ValueError as e:
        raise CodecError(str(e)) from None


def decode_path(raw: bytes) -> Path:
    f = hw.PathState.unpack_from(raw)
    if f["flags"] & ~1:
        raise CodecError(f"path flags {f['flags']:#x}: unknown address family")
    v6 = bool(f["flags"] & 1)
    if not 68 <= f["path_mtu"] <= 65535:
        raise CodecError(f"path MTU {f['path_mtu']} out of range")
    return Path(ip_from16(f["src_ip"], v6), ip_from16(f["dst_ip"], v6), f["path_mtu"])


def encode_tcp(t: Tcp) -> tuple[bytes, bytes]:
    """State bytes and data bytes (send data, then received data)."""
    c, k, d = t.const, t.cached, t.delegated
    cflags = ((hw.TCF_TIMESTAMPS if c.timestamps else 0) | (hw.TCF_SACK if c.sack else 0)
              | (hw.TCF_WINDOW_SCALING if c.window_scaling else 0))
    const = hw.TcpConstState.pack(local_port=c.local_port, remote_port=c.remote_port, flags=cflags,
                                  snd_wscale=c.snd_wscale, rcv_wscale=c.rcv_wscale,
                                  remote_mss=c.remote_mss, rss_hash=c.rss_hash)
    kflags = ((hw.TCCF_KEEPALIVE if k.keepalive else 0) | (hw.TCCF_NAGLE if k.nagle else 0)
              | (hw.TCCF_KEEPALIVE_RESTART if k.keepalive_restart else 0)
              | (hw.TCCF_MAXRT_RESTART if k.maxrt_restart else 0)
              | (hw.TCCF_UPDATE_RCV_WND if k.update_rcv_wnd else 0))
    cached = hw.TcpCachedState.pack(flags=kflags, ttl=k.ttl, tos=k.tos,
                                    initial_rcv_wnd=k.initial_rcv_wnd,
                                    rcv_indicate_size=k.rcv_indicate_size,
                                    ka_probe_count=k.ka_probe_count, ka_timeout=k.ka_timeout,
                                    ka_interval=k.ka_interval, max_rt=k.max_rt,
                                    flow_label=k.flow_label, user_priority=k.user_priority)
    vals = {n: getattr(d, n) for n in hw._DELEGATED_U32 if n not in ("send_len", "recv_len")}
    vals["ka_timeout_delta"] = _delta_out(d.ka_timeout_delta)
    vals["retransmit_delta"] = _delta_out(d.retransmit_delta)
    for n, v in vals.items():
        _u32(v, n)
    dflags = (hw.TCDF_FIN_QUEUED if d.fin_queued else 0) | (hw.TCDF_IN_RECOVERY if d.in_recovery else 0)
    deleg = hw.TcpDelegatedState.pack(state=_STATE_INDEX[d.state], flags=dflags,
                                      send_len=len(d.send_buffer), recv_len=len(d.recv_buffer),
                                      **vals)
    return const + cached + deleg, bytes(d.send_buffer) + bytes(d.recv_buffer)


def decode_tcp(raw: bytes, data: bytes, path: Path | None) -> Tcp:
    o1 = hw.TcpConstState.size
    o2 = o1 + hw.TcpCachedState.size
    c = hw.TcpConstState.unpack_from(raw, 0)
    k = hw.TcpCachedState.unpack_from(raw, o1)
    d = hw.TcpDelegatedState.unpack_from(raw, o2)
    if d["state"] >= len(_STATES):
        raise CodecError(f"TCP state {d['state']} unknown")
    if d["send_len"] + d["recv_len"] != len(data):
        raise CodecError(f"TCP data: send_len {d['send_len']} + recv_len {d['recv_len']} "
                         f"!= {len(data)} bytes present")
    if c["snd_wscale"] > 14 or c["rcv_wscale"] > 14:
        raise CodecError("window scale above 14 (RFC 7323 §2.3)")
    if c["remote_mss"] < 64:
        raise CodecError(f"remote MSS {c['remote_mss']} too small")
    const = TcpConst(local_ip=path.src_ip if path else "0.0.0.0", local_port=c["local_port"],
                     remote_ip=path.dst_ip if path else "0.0.0.0", remote_port=c["remote_port"],
                     timestamps=bool(c["flags"] & hw.TCF_TIMESTAMPS),
                     sack=bool(c["flags"] & hw.TCF_SACK),
                     window_scaling=bool(c["flags"] & hw.TCF_WINDOW_SCALING),
                     snd_wscale=c["snd_wscale"], rcv_wscale=c["rcv_wscale"],
                     remote_mss=c["remote_mss"], rss_hash=c["rss_hash"])
    kf = k.pop("flags")
    cached = TcpCached(keepalive=bool(kf & hw.TCCF_KEEPALIVE), nagle=bool(kf & hw.TCCF_NAGLE),
                       keepalive_restart=bool(kf & hw.TCCF_KEEPALIVE_RESTART),
                       maxrt_restart=bool(kf & hw.TCCF_MAXRT_RESTART),
                       update_rcv_wnd=bool(kf & hw.TCCF_UPDATE_RCV_WND), **k)
    st, df = d.pop("state"), d.pop("flags")
    send_len = d.pop("send_len")
    d.pop("recv_len")
    d["ka_timeout_delta"] = _delta_in(d["ka_timeout_delta"])
    d["retransmit_delta"] = _delta_in(d["retransmit_delta"])
    deleg = TcpDelegated(state=_STATES[st], fin_queued=bool(df & hw.TCDF_FIN_QUEUED),
                         in_recovery=bool(df & hw.TCDF_IN_RECOVERY),
                         send_buffer=bytes(data[:send_len]), recv_buffer=bytes(data[send_len:]), **d)
    return Tcp(const, cached, deleg)


# --- consistency (what a device must refuse at Initiate) --------------------------------
MAX_SEG_MSS = 65535 - 40          # largest MSS an IPv4 or IPv6 packet can carry
MAX_BACKOFF = 255                 # retransmit / window-probe backoff exponents
MIN_KA_TICKS = 100                # keep-alive idle time and interval: at least 0.1 s
_FIN_SENT = (TcpState.FIN_WAIT_1, TcpState.CLOSING, TcpState.LAST_ACK)


def _after(a: int, b: int) -> int:
    """a - b in sequence space, as a signed distance."""
    v = (a - b) & 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _unicast_mac(mac: bytes) -> bool:
    return len(mac) == 6 and not mac[0] & 1 and any(mac)


def check_neighbor(n: Neighbor) -> str | None:
    """Why this neighbour state cannot be offloaded, or None."""
    if not _unicast_mac(n.src_mac) or not _unicast_mac(n.dst_mac):
        return "neighbour link-layer addresses must be unicast and not zero"
    return None


def check_path(p: Path) -> str | None:
    for a in (p.src_ip, p.dst_ip):
        ip = ipaddress.ip_address(a)
        if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and a == "255.255.255.255"):
            return f"path address {a} is not a unicast address"
    if p.ipv6 and p.path_mtu < 1280:
        return f"IPv6 path MTU {p.path_mtu} below 1280"
    return None


def check_cached(k: TcpCached) -> str | None:
    """Cached TCP variables a connection can run with (Initiate and Update)."""
    if k.keepalive and (k.ka_timeout < MIN_KA_TICKS or k.ka_interval < MIN_KA_TICKS):
        return (f"keep-alive timeout {k.ka_timeout} / interval {k.ka_interval} ticks "
                f"below {MIN_KA_TICKS}")
    if not 0 <= k.ttl <= 255 or not 0 <= k.tos <= 255 or not 0 <= k.flow_label < 1 << 20:
        return "TTL, TOS or flow label out of range"
    return None


def check_tcp(t: Tcp, max_send: int, max_recv: int) -> str | None:
    """Why this TCP state is inconsistent (and would fail later, or stall), or None.
    max_send / max_recv: the device's send buffer and its bound on receive window plus
    buffered receive data."""
    c, d = t.const, t.delegated
    if not c.local_port or not c.remote_port:
        return "a port is zero"
    if c.snd_wscale > 14 or c.rcv_wscale > 14:
        return "window scale above 14 (RFC 7323 §2.3)"
    if not c.window_scaling and (c.snd_wscale or c.rcv_wscale):
        return "window scale set without window scaling negotiated"
    if not 64 <= c.remote_mss <= MAX_SEG_MSS:
        return f"remote MSS {c.remote_mss} out of range 64..{MAX_SEG_MSS}"
    why = check_cached(t.cached)
    if why:
        return why
    if _after(d.snd_nxt, d.snd_una) < 0:
        return "SND.NXT is behind SND.UNA"
    if _after(d.snd_max, d.snd_nxt) < 0:
        return "SND.MAX is behind SND.NXT"
    fin = 1 if d.fin_queued else 0
    if _after(d.snd_max, d.snd_una) > len(d.send_buffer) + fin:
        return (f"{_after(d.snd_max, d.snd_una)} bytes in flight but only "
                f"{len(d.send_buffer)} send bytes carried")
    unsent = len(d.send_buffer) - _after(d.snd_nxt, d.snd_una)
    if d.retransmit_delta < 0 and (_after(d.snd_max, d.snd_una) > 0 or
                                   (d.snd_wnd == 0 and unsent > 0)):
        return "bytes in flight (or a zero window with data waiting) but no timer running"
    if d.state in _FIN_SENT and not d.fin_queued:
        return f"{d.state} without a queued FIN"
    if len(d.send_buffer) > max_send:
        return f"{len(d.send_buffer)} send bytes exceed the send buffer of {max_send}"
    if d.rcv_wnd + len(d.recv_buffer) > max_recv:
        return (f"receive window {d.rcv_wnd} plus {len(d.recv_buffer)} buffered bytes "
                f"exceed {max_recv}")
    for name in ("snd_wnd", "max_snd_wnd"):
        if getattr(d, name) > 0xFFFF << c.snd_wscale:
            return f"{name} {getattr(d, name)} beyond what the peer can advertise"
    if d.cwnd < 1 or d.ssthresh < 1:
        return "cwnd and ssthresh must be at least 1"
    if d.retransmit_count > MAX_BACKOFF or d.window_probe_count > MAX_BACKOFF:
        return f"retransmit / window-probe count above {MAX_BACKOFF}"
    if not c.timestamps and d.ts_recent:
        return "TS.Recent set without timestamps negotiated"
    return None


# --- record buffers ----------------------------------------------------------------
def _pad8(n: int) -> int:
    return (n + 7) & ~7


def encode_records(entries: list[ObjEntry], with_data: bool = True) -> bytes:
    out = bytearray()
    for e in entries:
        state, data = b"", b""
        if not e.link and e.state is not None:
            if e.type == hw.OBJ_NEIGHBOR:
                state = encode_neighbor(e.state)
            elif e.type == hw.OBJ_PATH:
                state = encode_path(e.state)
            elif e.type == hw.OBJ_TCP:
                state, data = encode_tcp(e.state)
                if not with_data:
                    # Query: the lengths stay in the delegated state, the bytes are left out
                    data = b""
            else:
                raise CodecError(f"object type {e.type} unknown")
        out += hw.ObjRecord.pack(type=e.type, link=int(e.link), status=e.status, parent=e.parent,
                                 host_handle=e.host_handle, nic_ctx=e.nic_ctx,
                                 state_len=len(state), data_len=len(data))
        out += state + data
        out += bytes(_pad8(len(out)) - len(out))
    return bytes(out)


def decode_records(buf, with_data: bool = True, max_records: int = 1 << 20,
                   tree: bool = True, record_errors: bool = False) -> list[ObjEntry]:
    """Parse and check a record buffer.

    tree=True (INITIATE requests): parents must come before their dependents
    and be one layer down (neighbour <- path <- TCP); TCP records get their
    addresses from their path.  tree=False (UPDATE requests, QUERY and
    TERMINATE responses): every record stands alone, `parent` holds the
    parent's NIC context and is not checked, TCP addresses stay unset (the
    host knows them).  with_data=False: QUERY's form, TCP data left out but
    its lengths kept (the buffers come back as zero bytes of that length).
    record_errors=True (the device): a record whose framing is sound but whose
    state does not decode is returned with state None and the reason in
    extra["error"], so the other records of the buffer still get their answer."""
    buf = bytes(buf)
    entries: list[ObjEntry] = []
    pos = 0
    while pos < len(buf):
        if len(entries) >= max_records:
            raise CodecError(f"more than {max_records} records")
        if pos + hw.ObjRecord.size > len(buf):
            raise CodecError(f"record {len(entries)}: truncated header at byte {pos}")
        h = hw.ObjRecord.unpack_from(buf, pos)
        pos += hw.ObjRecord.size
        i = len(entries)
        typ, slen, dlen = h["type"], h["state_len"], h["data_len"]
        if typ not in _STATE_LEN:
            raise CodecError(f"record {i}: object type {typ} unknown")
        if h["link"] not in (0, 1):
            raise CodecError(f"record {i}: link must be 0 or 1")
        if dlen > MAX_DATA or (dlen and typ != hw.OBJ_TCP):
            raise CodecError(f"record {i}: data_len {dlen} not allowed")
        if pos + slen + dlen > len(buf):
            raise CodecError(f"record {i}: state/data run past the buffer")
        e = ObjEntry(type=typ, host_handle=h["host_handle"], parent=h["parent"], link=bool(h["link"]),
                     nic_ctx=h["nic_ctx"], status=h["status"])
        parent_state = None
        if not tree:
            pass
        elif typ == hw.OBJ_NEIGHBOR:
            if e.parent != NONE32:
                raise CodecError(f"record {i}: a neighbour has no parent")
        elif not e.link:
            if e.parent >= i:
                raise CodecError(f"record {i}: parent {e.parent} is not an earlier record")
            p = entries[e.parent]
            if p.type != typ - 1:
                raise CodecError(f"record {i}: parent {e.parent} is a type-{p.type} object, "
                                 f"not the layer below")
            parent_state = p.state
        if e.link and tree:
            if slen or dlen:
                raise CodecError(f"record {i}: a link carries no state")
            if e.nic_ctx == 0:
                raise CodecError(f"record {i}: a link needs a NIC context")
        if slen and not (e.link and tree):
            if slen != _STATE_LEN[typ]:
                raise CodecError(f"record {i}: state_len {slen}, expected {_STATE_LEN[typ]}")
            try:
                e.state = _decode_state(typ, buf[pos:pos + slen],
                                        buf[pos + slen:pos + slen + dlen], e,
                                        with_data and tree, parent_state)
            except CodecError as err:
                if not record_errors:
                    raise
                e.extra["error"] = f"record {i}: {err}"
        pos = _pad8(pos + slen + dlen)
        entries.append(e)
    return entries


def _decode_state(typ: int, raw: bytes, data: bytes, e: ObjEntry, data_present: bool,
                  parent_state):
    if typ == hw.OBJ_NEIGHBOR:
        return decode_neighbor(raw)
    if typ == hw.OBJ_PATH:
        return decode_path(raw)
    if not data and not data_present:
        d = hw.TcpDelegatedState.unpack_from(raw, _TCP_STATE_LEN - hw.TcpDelegatedState.size)
        data = bytes(d["send_len"] + d["recv_len"])
        e.extra["data_omitted"] = True
    return decode_tcp(raw, data, parent_state if isinstance(parent_state, Path) else None)


def encode_statuses(entries: list[ObjEntry]) -> bytes:
    return b"".join(hw.ObjStatus.pack(status=e.status, type=e.type, nic_ctx=e.nic_ctx,
                                      host_handle=e.host_handle) for e in entries)


def decode_statuses(buf) -> list[ObjEntry]:
    buf = bytes(buf)
    if len(buf) % hw.ObjStatus.size:
        raise CodecError("status buffer is not a whole number of ObjStatus")
    out = []
    for pos in range(0, len(buf), hw.ObjStatus.size):
        f = hw.ObjStatus.unpack_from(buf, pos)
        out.append(ObjEntry(type=f["type"], host_handle=f["host_handle"], nic_ctx=f["nic_ctx"],
                            status=f["status"]))
    return out


def encode_contexts(ctxs: list[int]) -> bytes:
    return struct.pack(f"<{len(ctxs)}I", *ctxs)


def decode_contexts(buf) -> list[int]:
    buf = bytes(buf)
    if len(buf) % 4:
        raise CodecError("context list is not a whole number of u32")
    return list(struct.unpack(f"<{len(buf) // 4}I", buf))
