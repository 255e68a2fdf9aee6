"""What chimney iperf3 prints: iperf3-style text (bitrates in the -f unit) or, with
-J, one JSON object in iperf3's own schema, so that tools reading iperf3's -J
output read ours:

    start      connected[] (socket, local_host, local_port, remote_host, remote_port),
               version, system_info, timestamp, connecting_to / accepted_connection,
               cookie, test_start (protocol, num_streams, blksize, omit, duration,
               bytes, blocks, reverse, interval)
    intervals  [{streams: [{socket, start, end, seconds, bytes, bits_per_second,
               omitted, sender}], sum: {...}}]
    end        streams [{sender: {...}, receiver: {...}}], sum_sent, sum_received
               ({start, end, seconds, bytes, bits_per_second, retransmits, sender}),
               cpu_utilization_percent (host_total, host_user, host_system,
               remote_total, remote_user, remote_system)
    error      present only when the test failed (iperf3 does the same)
    chimney    everything chimney adds: the stack, both ends' byte counts and whether
               they agree, the peer's own results, the stack's counters

Streams are numbered as iperf3 numbers them (1, 3, 4, ...); "socket" carries that id."""
from __future__ import annotations

import json
import os
import sys
import time

# -f: the unit of bitrates in the text output (lower case: bits/s; upper case: bytes/s)
FORMATS = {"k": (1e3, "Kbits/sec"), "m": (1e6, "Mbits/sec"), "g": (1e9, "Gbits/sec"),
           "t": (1e12, "Tbits/sec"), "K": (1 << 10, "KBytes/sec"), "M": (1 << 20, "MBytes/sec"),
           "G": (1 << 30, "GBytes/sec"), "T": (1 << 40, "TBytes/sec")}


def rate(nbytes: int, secs: float, fmt: str = "m") -> str:
    div, unit = FORMATS[fmt]
    per_s = nbytes / secs if secs > 0 else 0.0
    v = per_s * 8 / div if fmt.islower() else per_s / div
    return f"{v:10.2f} {unit}"


def transfer(n: int) -> str:
    for unit, div in (("GBytes", 1 << 30), ("MBytes", 1 << 20), ("KBytes", 1 << 10)):
        if n >= div:
            return f"{n / div:6.2f} {unit}"
    return f"{n:6d} Bytes "


def print_interval(rep: dict, fmt: str = "m", out=None) -> None:
    out = out or sys.stdout
    dt = rep["end"] - rep["start"]
    tail = "  (omitted)" if rep.get("omitted") else ""
    rng = f"{rep['start']:6.2f}-{rep['end']:<6.2f} sec"
    if len(rep["streams"]) > 1:
        for s in rep["streams"]:
            print(f"[{s['id']:3d}] {rng}  {transfer(s['bytes'])}  {rate(s['bytes'], dt, fmt)}{tail}", file=out)
    tag = "SUM" if len(rep["streams"]) > 1 else f"{rep['streams'][0]['id']:3d}" if rep["streams"] else "SUM"
    print(f"[{tag}] {rng}  {transfer(rep['bytes'])}  {rate(rep['bytes'], dt, fmt)}{tail}", file=out, flush=True)


def print_summary(res: dict, fmt: str = "m", out=None) -> None:
    out = out or sys.stdout
    print("- - - - - - - - - - - - - - - - - - - - - - - - -", file=out)
    if res.get("error"):
        print(f"iperf3 error: {res['error']}", file=out)
    end = res.get("end")
    if end:
        print("[ ID] Interval           Transfer     Bitrate            Retr", file=out)
        rows = [(f"{s['id']:3d}", s["sender"], s["receiver"]) for s in end["streams"]]
        if len(rows) > 1 or not rows:
            rows.append(("SUM", end["sum_sent"], end["sum_received"]))
        for tag, snd, rcv in rows:
            for role, d in (("sender", snd), ("receiver", rcv)):
                retr = d.get("retransmits")
                retr = f"{retr:5d}" if role == "sender" and retr is not None else "     "
                print(f"[{tag}]   0.00-{d['seconds']:<6.2f} sec  {transfer(d['bytes'])}  "
                      f"{rate(d['bytes'], d['seconds'], fmt)}  {retr}  {role}", file=out)
        agree = "yes" if res.get("counts_agree") else "no"
        print(f"sent {end['sum_sent']['bytes']} B, received {end['sum_received']['bytes']} B "
              f"(counts agree: {agree})", file=out)
    print("\niperf Done." if not res.get("error") else "", file=out, flush=True)


# -- iperf3's JSON --------------------------------------------------------------------------

def _bps(nbytes: int, secs: float) -> float:
    return nbytes * 8 / secs if secs > 0 else 0.0


def _span(d: dict, sender: bool, start: float = 0.0) -> dict:
    secs = float(d.get("seconds") or 0.0)
    out = {"start": start, "end": start + secs, "seconds": secs, "bytes": int(d.get("bytes") or 0),
           "bits_per_second": _bps(int(d.get("bytes") or 0), secs)}
    if "retransmits" in d:
        out["retransmits"] = d["retransmits"] if d["retransmits"] is not None else 0
    out["sender"] = sender
    return out


def _test_start(res: dict) -> dict:
    return {"protocol": "TCP", "num_streams": res.get("streams") or 0, "blksize": res.get("blksize") or 0,
            "omit": res.get("omit") or 0, "duration": res.get("duration") or 0, "bytes": res.get("bytes") or 0,
            "blocks": 0, "reverse": 1 if res.get("reverse") else 0, "tos": 0, "target_bitrate": 0,
            "bidir": 0, "fqrate": 0, "interval": res.get("interval") or 0}


def to_iperf3_json(res: dict) -> dict:
    """res (a chimney iperf3 client or server result) in iperf3's -J schema."""
    local_sends = (res.get("role") == "client") != bool(res.get("reverse"))
    t0 = res.get("started_at") or time.time()
    start = {"connected": [{"socket": c["id"], "local_host": c["local"][0], "local_port": c["local"][1],
                            "remote_host": c["remote"][0], "remote_port": c["remote"][1]}
                           for c in res.get("connected") or []],
             "version": f"iperf {res.get('version') or '3'} (chimney iperf3)",
             "system_info": " ".join(os.uname()),
             "timestamp": {"time": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(t0)),
                           "timesecs": int(t0)},
             "cookie": res.get("cookie") or "", "test_start": _test_start(res)}
    remote = res.get("remote") or {}
    if res.get("role") == "client":
        start["connecting_to"] = {"host": remote.get("host"), "port": remote.get("port")}
    else:
        start["accepted_connection"] = {"host": remote.get("host"), "port": remote.get("port")}
    intervals = []
    for rep in res.get("intervals") or []:
        secs = rep["end"] - rep["start"]
        om = bool(rep.get("omitted"))
        streams = [{"socket": s["id"], "start": rep["start"], "end": rep["end"], "seconds": secs,
                    "bytes": s["bytes"], "bits_per_second": _bps(s["bytes"], secs), "omitted": om,
                    "sender": local_sends} for s in rep["streams"]]
        intervals.append({"streams": streams,
                          "sum": {"start": rep["start"], "end": rep["end"], "seconds": secs, "bytes": rep["bytes"],
                                  "bits_per_second": _bps(rep["bytes"], secs), "omitted": om,
                                  "sender": local_sends}})
    out = {"start": start, "intervals": intervals, "end": {}}
    end = res.get("end")
    if end:
        cpu, peer = res.get("cpu_util") or {}, res.get("peer_results") or {}
        out["end"] = {
            "streams": [{"sender": {"socket": s["id"], **_span(s["sender"], local_sends)},
                         "receiver": {"socket": s["id"], **_span(s["receiver"], local_sends)}}
                        for s in end["streams"]],
            "sum_sent": _span({"retransmits": None, **end["sum_sent"]}, local_sends),
            "sum_received": _span(end["sum_received"], local_sends),
            "cpu_utilization_percent": {
                "host_total": cpu.get("total", 0.0), "host_user": cpu.get("user", 0.0),
                "host_system": cpu.get("system", 0.0), "remote_total": peer.get("cpu_util_total", 0.0),
                "remote_user": peer.get("cpu_util_user", 0.0), "remote_system": peer.get("cpu_util_system", 0.0)}}
    if res.get("error"):
        out["error"] = res["error"]
    out["chimney"] = res
    return out


def emit(res: dict, as_json: bool, fmt: str = "m", out=None) -> None:
    """The result: iperf3's JSON object (-J) or the text summary, on out (default stdout)."""
    out = out or sys.stdout
    if as_json:
        print(json.dumps(to_iperf3_json(res)), file=out, flush=True)   # one line: one object per test
    else:
        print_summary(res, fmt, out)
