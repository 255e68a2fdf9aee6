"""iperf3 interoperability (chimney.guest.iperf3) against the real iperf3
binary (Debian's iperf3 package): on loopback with kernel sockets (no root),
then on the host bus, our host stack (--stack chimney --bus host, one device
process) against iperf3 inside a Linux peer namespace.  Every run is bounded
(-t 1..2 s or a few MB); each test checks that both programs report the same
byte counts: ours, and the real iperf3's -J output."""
import contextlib
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from chimney.guest.tools import iperf3 as ip3
from chimney.guest.tools import iperf3_proto as proto
from chimney.guest.tools.stacks import LinuxStack
from chimney.host.netns import PeerAddrs

IPERF3 = shutil.which("iperf3")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
ADDR = PeerAddrs()
MiB = 1 << 20


def test_iperf3_is_installed():
    """Not a skip: the interop tests need the real binary (scripts/setup installs it)."""
    assert IPERF3, "iperf3 is missing (apt-get install iperf3; scripts/setup does)"
    out = subprocess.run([IPERF3, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("iperf 3.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(text: str, what: str) -> dict:
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        pytest.fail(f"no JSON from {what}:\n{text}")


def iperf3_rates(obj: dict) -> tuple[float, float]:
    """What tools reading iperf3's -J take from it: end.sum_sent and end.sum_received
    bits_per_second.  Strict about the schema, so that a real iperf3's output and ours
    go through exactly this code."""
    assert "error" not in obj, obj.get("error")
    assert isinstance(obj["start"]["connected"], list) and obj["start"]["connected"]
    for c in obj["start"]["connected"]:
        assert {"socket", "local_host", "local_port", "remote_host", "remote_port"} <= set(c)
    assert isinstance(obj["start"]["version"], str) and obj["start"]["test_start"]["protocol"] == "TCP"
    assert isinstance(obj["start"]["test_start"]["num_streams"], int)
    for iv in obj["intervals"]:
        assert isinstance(iv["streams"], list)
        assert {"start", "end", "seconds", "bytes", "bits_per_second"} <= set(iv["sum"])
    end = obj["end"]
    for s in end["streams"]:
        assert s["sender"]["bytes"] >= 0 and s["receiver"]["bytes"] >= 0
    for k in ("sum_sent", "sum_received"):
        assert {"start", "end", "seconds", "bytes", "bits_per_second"} <= set(end[k]), end[k]
    assert isinstance(end["sum_sent"]["retransmits"], int)
    assert {"host_total", "host_user", "host_system", "remote_total", "remote_user",
            "remote_system"} <= set(end["cpu_utilization_percent"])
    return float(end["sum_sent"]["bits_per_second"]), float(end["sum_received"]["bits_per_second"])


def ours_from(text: str) -> dict:
    """Our -J output (the last line: one object per test) in iperf3's schema; -> the
    chimney part, after the schema check."""
    obj = json.loads(text.strip().splitlines()[-1])
    sent_bps, received_bps = iperf3_rates(obj)
    ours = obj["chimney"]
    assert obj["end"]["sum_sent"]["bytes"] == ours["sent"]["bytes"]
    assert obj["end"]["sum_received"]["bytes"] == ours["received"]["bytes"]
    assert sent_bps > 0 and received_bps > 0
    return ours


def check_ours(res: dict, streams: int) -> None:
    assert res["error"] is None, res["error"]
    assert res["tool"] == "chimney iperf3" and res["streams"] == streams
    assert [s["id"] for s in res["end"]["streams"]] == proto.stream_ids(streams)
    assert [s["id"] for s in res["peer_results"]["streams"]] == proto.stream_ids(streams)
    for side in ("sent", "received"):
        assert res[side]["bytes"] > 0 and res[side]["seconds"] > 0 and res[side]["mbps"] > 0
    assert res["end"]["sum_sent"] == res["sent"] and res["end"]["sum_received"] == res["received"]
    for s in res["end"]["streams"]:
        assert s["sender"]["bytes"] > 0 and s["receiver"]["bytes"] > 0


def check_against_real_client(ours: dict, theirs: dict, streams: int, *, exact=True) -> None:
    """Our server's result against a real client's -J: the client knows both sides."""
    check_ours(ours, streams)
    assert "error" not in theirs, theirs.get("error")
    end = theirs["end"]
    assert end["sum_sent"]["bytes"] == ours["sent"]["bytes"]
    assert end["sum_received"]["bytes"] == ours["received"]["bytes"]
    assert len(end["streams"]) == streams
    for t, o in zip(end["streams"], ours["end"]["streams"]):
        assert t["sender"]["bytes"] == o["sender"]["bytes"]
        assert t["receiver"]["bytes"] == o["receiver"]["bytes"]
    if exact:
        assert ours["sent"]["bytes"] == ours["received"]["bytes"] and ours["counts_agree"] is True
    else:   # -R -t: a real iperf3 receiver does not count what arrives after its TEST_END
        assert 0 < ours["received"]["bytes"] <= ours["sent"]["bytes"]


def check_against_real_server(ours: dict, theirs: dict, streams: int, reverse: bool) -> None:
    """Our client's result against a real server's -J: the server reports its own side only
    (it writes its report before the results exchange)."""
    check_ours(ours, streams)
    assert "error" not in theirs, theirs.get("error")
    end = theirs["end"]
    mine, key = ("sent", "sender") if reverse else ("received", "receiver")
    assert end[f"sum_{mine}"]["bytes"] == ours[mine]["bytes"]
    assert [t[key]["bytes"] for t in end["streams"]] == [o[key]["bytes"] for o in ours["end"]["streams"]]
    # ... and what the server told us in the exchange is what we report for its side
    peer_bytes = [p["bytes"] for p in ours["peer_results"]["streams"]]
    assert peer_bytes == [o[key]["bytes"] for o in ours["end"]["streams"]]
    assert ours["sent"]["bytes"] == ours["received"]["bytes"] and ours["counts_agree"] is True


# -- loopback, kernel sockets -------------------------------------------------------------

def real_server(port: int, cmd_prefix=()):
    return subprocess.Popen([*cmd_prefix, IPERF3, "-s", "-1", "-p", str(port), "-J"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_real(proc, timeout=30) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return last_json(out, f"iperf3 (exit {proc.returncode}, stderr {err!r})")


LOOP_CASES = {
    "t1": {"duration": 1},
    "n4M": {"nbytes": 4 * MiB},
    "P2-t1": {"duration": 1, "streams": 2},
    "R-t1": {"duration": 1, "reverse": True},
    "R-n4M-P2": {"nbytes": 4 * MiB, "streams": 2, "reverse": True},
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_loopback_our_client_real_server(case):
    kw = LOOP_CASES[case]
    port = free_port()
    srv = real_server(port)
    t0 = time.monotonic()
    ours = ip3.run_client(LinuxStack(), "127.0.0.1", port, as_json=True, interval=0.5,
                          connect_timeout=10, **kw)
    theirs = finish_real(srv)
    assert time.monotonic() - t0 < 20
    n = kw.get("streams", 1)
    check_against_real_server(ours, theirs, n, kw.get("reverse", False))
    assert ours["direction"] == ("server->client" if kw.get("reverse") else "client->server")
    if "nbytes" in kw:
        assert ours["received"]["bytes"] >= kw["nbytes"]
        if not kw.get("reverse"):
            assert ours["sent"]["bytes"] == kw["nbytes"]        # we send exactly -n
    else:
        assert 0.9 < ours["sent"]["seconds"] < 3
        assert ours["intervals"] and all(r["end"] >= r["start"] for r in ours["intervals"])
    assert theirs["start"]["test_start"]["num_streams"] == n
    assert theirs["start"]["test_start"]["reverse"] == int(bool(kw.get("reverse")))


def serve_in_thread(stack, port):
    stack.listen(port)
    box = {}
    t = threading.Thread(target=lambda: box.update(res=ip3.serve_one(stack, as_json=True, accept_timeout=15)),
                         daemon=True)
    t.start()
    return t, box


REAL_CLIENT_CASES = {
    "t1": (["-t", "1"], 1, True),
    "n4M": (["-n", "4M"], 1, True),
    "P2-t1": (["-P", "2", "-t", "1"], 2, True),
    "R-n4M-P2": (["-R", "-n", "4M", "-P", "2"], 2, True),
    "R-t1": (["-R", "-t", "1"], 1, False),
}


@pytest.mark.parametrize("case", list(REAL_CLIENT_CASES))
def test_loopback_real_client_our_server(case):
    args, n, exact = REAL_CLIENT_CASES[case]
    port = free_port()
    stack = LinuxStack()
    t, box = serve_in_thread(stack, port)
    try:
        cli = subprocess.run([IPERF3, "-c", "127.0.0.1", "-p", str(port), "-J", *args],
                             capture_output=True, text=True, timeout=30, check=False)
        t.join(20)
    finally:
        stack.close()
    assert not t.is_alive()
    theirs = last_json(cli.stdout, f"iperf3 -c (exit {cli.returncode}, {cli.stderr!r})")
    ours = box["res"]
    assert cli.returncode == 0, cli.stdout
    check_against_real_client(ours, theirs, n, exact=exact)
    assert ours["client_done"] is True               # IPERF_DONE came
    assert ours["peer_params"]["client_version"].startswith("3.")
    assert ours["reverse"] is ("-R" in args)
    if "-n" in args:
        assert ours["sent"]["bytes"] == 4 * MiB
    assert theirs["end"]["sum_sent"]["bytes"] > 0


def test_loopback_cli_client_subprocess():
    """The module's command line, plain text output (intervals, sender/receiver lines)."""
    port = free_port()
    srv = real_server(port)
    cli = subprocess.run([sys.executable, "-u", "-m", "chimney.guest.iperf3", "client", "127.0.0.1",
                          "-p", str(port), "-n", "2M", "-P", "2", "--stack", "linux"],
                         capture_output=True, text=True, timeout=30, check=False)
    theirs = finish_real(srv)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "sender" in cli.stdout and "receiver" in cli.stdout and "counts agree: yes" in cli.stdout
    assert theirs["end"]["sum_received"]["bytes"] >= 2 * MiB


def test_cli_iperf3_subcommand_server(capsys):
    """`chimney iperf3 server --one-off --json` serves one real client."""
    from chimney.cli import main
    port = free_port()
    box = {}
    t = threading.Thread(target=lambda: box.update(rc=main(["iperf3", "server", "-p", str(port), "--one-off",
                                                             "--json", "--stack", "linux",
                                                             "--accept-timeout", "15"])), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    cli = None
    while time.monotonic() < deadline:
        cli = subprocess.run([IPERF3, "-c", "127.0.0.1", "-p", str(port), "-J", "-n", "1M", "-R"],
                             capture_output=True, text=True, timeout=30, check=False)
        if "refused" not in cli.stdout:     # -J: a refused connect still exits 0
            break
        time.sleep(0.1)
    t.join(20)
    assert not t.is_alive() and box["rc"] == 0
    ours = ours_from(capsys.readouterr().out)
    theirs = json.loads(cli.stdout)
    check_against_real_client(ours, theirs, 1)
    assert ours["sent"]["bytes"] == MiB and ours["port"] == port


def test_json_is_iperf3s_schema_one_parser_for_real_and_ours():
    """Our -J output is read by the code that reads a real iperf3 client's -J: a real
    iperf3 -c against our server, our client against a real iperf3 -s, both on loopback;
    the same byte counts at both ends of each pair."""
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-u", "-m", "chimney.cli", "iperf3", "-s", "-1", "-p", str(port),
                            "-J", "--stack", "linux", "--accept-timeout", "30"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        real_client = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:      # until our server listens
            r = subprocess.run([IPERF3, "-c", "127.0.0.1", "-p", str(port), "-J", "-n", "3M", "-P", "2"],
                               capture_output=True, text=True, timeout=30, check=False)
            real_client = json.loads(r.stdout)
            if "refused" not in real_client.get("error", ""):
                break
            time.sleep(0.2)
        our_server_out, _ = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert srv.returncode == 0
    port2 = free_port()
    real_srv = real_server(port2)
    ours = subprocess.run([sys.executable, "-u", "-m", "chimney.cli", "iperf3", "-c", "127.0.0.1", "-p", str(port2),
                           "-J", "-t", "1", "-O", "1", "--stack", "linux"],
                          capture_output=True, text=True, timeout=60, check=False)
    real_server_json = finish_real(real_srv)
    assert ours.returncode == 0, ours.stderr
    our_client = json.loads(ours.stdout.strip().splitlines()[-1])
    our_server = json.loads(our_server_out.strip().splitlines()[-1])
    rates = {name: iperf3_rates(obj) for name, obj in
             (("real client", real_client), ("our client", our_client), ("our server", our_server))}
    for name, (sent, received) in rates.items():
        assert sent > 0 and received > 0, name
    # each pair agrees on the bytes, read the same way from both programs' JSON
    assert real_client["end"]["sum_received"]["bytes"] == our_server["end"]["sum_received"]["bytes"] == 3 * MiB
    assert our_client["end"]["sum_sent"]["bytes"] == real_server_json["end"]["sum_received"]["bytes"]
    assert our_client["chimney"]["counts_agree"] is True
    # -O 1: the first second's interval reports are marked omitted, the rest are not
    om = [iv["sum"]["omitted"] for iv in our_client["intervals"]]
    assert om[0] is True and om[-1] is False, om
    assert our_client["start"]["test_start"]["num_streams"] == 1
    assert our_server["start"]["test_start"]["num_streams"] == 2


def test_logfile_gets_the_output(tmp_path):
    """--logfile: the -J object goes to the file, nothing to stdout."""
    port = free_port()
    srv = real_server(port)
    log = tmp_path / "iperf3.log"
    r = subprocess.run([sys.executable, "-u", "-m", "chimney.cli", "iperf3", "-c", "127.0.0.1", "-p", str(port),
                        "-J", "-n", "1M", "--stack", "linux", "--logfile", str(log), "-f", "K"],
                       capture_output=True, text=True, timeout=60, check=False)
    finish_real(srv)
    assert r.returncode == 0 and r.stdout == "", (r.stdout, r.stderr)
    assert ours_from(log.read_text())["sent"]["bytes"] == MiB


def test_udp_request_gets_server_error():
    """An unsupported test (UDP) is refused with SERVER_ERROR + i_errno, as iperf3's server does."""
    port = free_port()
    stack = LinuxStack()
    t, box = serve_in_thread(stack, port)
    try:
        cli = subprocess.run([IPERF3, "-c", "127.0.0.1", "-p", str(port), "-J", "-u", "-t", "1"],
                             capture_output=True, text=True, timeout=30, check=False)
        t.join(20)
    finally:
        stack.close()
    theirs = json.loads(cli.stdout)
    assert "not implemented" in theirs["error"].lower()
    assert "only TCP" in box["res"]["error"]


def fake_server(reply: bytes):
    """A server that takes the cookie and answers `reply` (then closes)."""
    ls = socket.create_server(("127.0.0.1", 0))
    got = {}

    def serve():
        c, _ = ls.accept()
        with c:
            got["cookie"] = c.recv(proto.COOKIE_SIZE, socket.MSG_WAITALL)
            c.sendall(reply)
            time.sleep(0.2)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return ls, t, got


@pytest.mark.parametrize("reply,expect", [
    (struct.pack("b", proto.ACCESS_DENIED), "ACCESS_DENIED"),
    (struct.pack(">bii", proto.SERVER_ERROR, 13, 0), "i_errno 13 (not implemented)"),
    (struct.pack("b", 99), "unexpected control message 99"),
])
def test_client_reports_refusals(reply, expect):
    ls, t, got = fake_server(reply)
    try:
        res = ip3.run_client(LinuxStack(), "127.0.0.1", ls.getsockname()[1], duration=1,
                             as_json=True, timeout=5)
        t.join(5)
    finally:
        ls.close()
    assert expect in res["error"]
    c = got["cookie"]
    assert len(c) == 37 and c[-1:] == b"\0" and set(c[:-1].decode()) <= set(proto.COOKIE_CHARS)


def test_stream_ids_skip_two():
    assert proto.stream_ids(1) == [1]
    assert proto.stream_ids(4) == [1, 3, 4, 5]


class FakePeerConn:
    """A sending stream's connection whose peer has everything acknowledged after
    `acked_after` looks, but whose window (max 64 KB, 1 KB slack) reopens only once the
    sender probed `reads_after` times -- a receiver that announces nothing by itself."""

    def __init__(self, acked_after=2, reads_after=3, window=True):
        self.acked_after, self.reads_after, self.window = acked_after, reads_after, window
        self.looks = self.probes = self.ends = 0
        self.probes_before_acked = 0

    def unacked(self):
        self.looks += 1
        return 0 if self.looks > self.acked_after else 4096

    def peer_window(self):
        if not self.window:
            return None
        return (64 << 10) - (0 if self.probes >= self.reads_after else 20_000), 64 << 10, 1024

    def probe_window(self):
        self.probes += 1
        if self.looks <= self.acked_after:
            self.probes_before_acked += 1

    def end_window_probe(self):
        self.ends += 1


class FakeStack:
    def wait(self, timeout, conns_r=(), conns_w=()):
        time.sleep(min(timeout, 0.002))


def test_settle_waits_for_the_peer_window_to_reopen_probing_it():
    conns = [FakePeerConn(), FakePeerConn(acked_after=5, reads_after=6)]
    streams = [proto.DataStream(i, c, sending=True) for i, c in zip((1, 3), conns)]
    out = proto.settle(FakeStack(), streams, time.monotonic() + 10)
    assert out["acked"] is True and out["read"] is True
    assert [(c.probes, c.probes_before_acked, c.ends) for c in conns] == [(3, 0, 1), (6, 0, 1)]
    assert out["probe_rounds"] == 9 and out["seconds"] < proto.SETTLE_MAX


def test_settle_gives_up_after_settle_max_and_says_so(monkeypatch):
    monkeypatch.setattr(proto, "SETTLE_MAX", 0.2)
    conn = FakePeerConn(reads_after=10 ** 9)
    t0 = time.monotonic()
    out = proto.settle(FakeStack(), [proto.DataStream(1, conn, sending=True)], t0 + 10)
    assert out["acked"] is True and out["read"] is False and conn.ends == 1
    assert 0.2 <= time.monotonic() - t0 < 1.0
    assert 0.2 / proto.PROBE_INTERVAL - 5 <= conn.probes <= 0.2 / proto.PROBE_INTERVAL + 1


def test_settle_without_a_known_window_waits_grace_and_does_not_probe():
    conn = FakePeerConn(window=False)
    out = proto.settle(FakeStack(), [proto.DataStream(1, conn, sending=True)], time.monotonic() + 10)
    assert out["acked"] is True and out["read"] is None and conn.probes == conn.ends == 0
    assert out["seconds"] >= proto.GRACE


# -- the host bus: our host stack against iperf3 in a Linux peer namespace ----------------

def chimney_args(dev):
    return ["--stack", "chimney", "--bus", "host", "--socket", dev.socket,
            "--ip", f"{ADDR.guest4}/{ADDR.prefix4}", "--ip6", f"{ADDR.guest6}/{ADDR.prefix6}"]


def ours_cmd(*args):
    return [sys.executable, "-u", "-m", "chimney.guest.iperf3", *map(str, args)]


def our_json(proc, timeout) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out, err)
    return ours_from(out.decode() if isinstance(out, bytes) else out)


HOSTBUS_CASES = {
    "n6M-P2": (["-n", "6M", "-P", "2"], 2, False),
    "R-t2": (["-R", "-t", "2"], 1, True),
}


@needs_root
@pytest.mark.parametrize("case", list(HOSTBUS_CASES))
def test_hostbus_our_client_real_server(wire, case):
    dev, ns = wire
    args, n, reverse = HOSTBUS_CASES[case]
    port = 5211 + len(case)
    srv = real_server(port, ("ip", "netns", "exec", ns.name))
    try:
        cli = subprocess.Popen(ours_cmd("client", ADDR.peer4, "-p", port, *args, "--json", *chimney_args(dev)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ours = our_json(cli, 60)
    finally:
        theirs = finish_real(srv)
    check_against_real_server(ours, theirs, n, reverse)
    assert ours["stack"] == "chimney"
    assert ours["stack_stats"]["tcp"]["tcp_segments_in"] > 0
    if "-n" in args:
        assert ours["sent"]["bytes"] == 6 * MiB
    print(f"\nchimney client -> iperf3 -s ({case}): {ours['sent']['bytes'] / 1e6:.1f} MB, "
          f"sender {ours['sent']['mbps']:.1f} Mbit/s, receiver {ours['received']['mbps']:.1f} Mbit/s, "
          f"settle {ours.get('settle')}")


def wait_listening(proc, timeout=30) -> None:
    """Our server prints one line to stderr once it listens (--json)."""
    end = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            pytest.fail(f"our server did not come up: {buf!r}")
        r, _, _ = select.select([proc.stderr], [], [], left)
        if r:
            buf += os.read(proc.stderr.fileno(), 4096)
    assert b"server on the chimney stack" in buf


HOSTBUS_SERVER_CASES = {
    "n6M-P2": (["-n", "6M", "-P", "2"], 2, True),
    "R-t2": (["-R", "-t", "2"], 1, False),
}


@needs_root
@pytest.mark.parametrize("case", list(HOSTBUS_SERVER_CASES))
def test_hostbus_real_client_our_server(wire, case):
    dev, ns = wire
    args, n, exact = HOSTBUS_SERVER_CASES[case]
    port = 5231 + len(case)
    srv = subprocess.Popen(ours_cmd("server", "-p", port, "--one-off", "--json", "--accept-timeout", 30,
                                    *chimney_args(dev)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(srv)
        cli = ns.run(IPERF3, "-c", ADDR.guest4, "-p", str(port), "-J", *args, check=False, timeout=60)
        out, err = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert srv.returncode == 0, (out, err)
    ours = ours_from(out.decode())
    theirs = last_json(cli.stdout, f"iperf3 -c in the namespace ({cli.stderr!r})")
    assert cli.returncode == 0, cli.stdout
    check_against_real_client(ours, theirs, n, exact=exact)
    assert ours["stack"] == "chimney" and ours["remote"]["host"] == ADDR.peer4
    assert ours["client_done"] is True
    if "-n" in args:
        assert ours["received"]["bytes"] >= 6 * MiB
    print(f"\niperf3 -c -> chimney server ({case}): {ours['sent']['bytes'] / 1e6:.1f} MB, "
          f"sender {ours['sent']['mbps']:.1f} Mbit/s, receiver {ours['received']['mbps']:.1f} Mbit/s")


# -- the host bus, over offloaded connections (--offload on) -------------------------------

def check_offloaded(ours: dict, streams: int, moved: int, sending: bool) -> None:
    """Every connection (control + data streams) was offloaded right after its handshake;
    the software TCP sent no data (only handshake and closing segments); the NIC carried
    the bytes."""
    st = ours["stack_stats"]
    assert st["offload"]["offloaded"] >= streams + 1, st["offload"]
    assert st["offload"].get("upload_rx_gap", 0) == 0 and st["offload"].get("upload_tx_mismatch", 0) == 0
    assert st["tcp"]["tcp_segments_out"] <= 4 * (streams + 1), st["tcp"]     # SYN/ACK/FIN-ACKs only
    dev = st["device"]
    assert dev["offload_bytes_out" if sending else "offload_bytes_in"] >= moved
    assert dev["offload_cmd_errors"] == 0 and dev["offload_req_errors"] == 0


OFFLOAD_CLIENT_CASES = {
    "n2M": (["-n", "2M"], 1, False),
    "n6M-P2": (["-n", "6M", "-P", "2"], 2, False),
    "R-t2": (["-R", "-t", "2"], 1, True),
    "t2-P2": (["-t", "2", "-P", "2"], 2, False),
}


@needs_root
@pytest.mark.parametrize("case", list(OFFLOAD_CLIENT_CASES))
def test_hostbus_offloaded_our_client_real_server(wire, case):
    """Our client with --offload on against a real `iperf3 -s` in the namespace."""
    dev, ns = wire
    args, n, reverse = OFFLOAD_CLIENT_CASES[case]
    port = 5251 + list(OFFLOAD_CLIENT_CASES).index(case)
    srv = real_server(port, ("ip", "netns", "exec", ns.name))
    t0 = time.monotonic()
    try:
        cli = subprocess.Popen(ours_cmd("client", ADDR.peer4, "-p", port, *args, "--json", "--timeout", 40,
                                        "--offload", "on", *chimney_args(dev)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ours = our_json(cli, 60)
    finally:
        theirs = finish_real(srv)
    check_against_real_server(ours, theirs, n, reverse)
    assert ours["stack"] == "chimney"
    if "-n" in args:
        assert ours["sent"]["bytes"] == int(args[1][:-1]) * MiB
    check_offloaded(ours, n, ours["sent"]["bytes"] if not reverse else ours["received"]["bytes"],
                    sending=not reverse)
    print(f"\noffloaded chimney client -> iperf3 -s ({case}): {ours['sent']['bytes'] / 1e6:.1f} MB, "
          f"receiver {ours['received']['mbps']:.1f} Mbit/s, {time.monotonic() - t0:.1f} s wall, "
          f"settle {ours.get('settle')}")


OFFLOAD_SERVER_CASES = {
    "n6M-P2": (["-n", "6M", "-P", "2"], 2, True),
    "R-t2": (["-R", "-t", "2"], 1, False),
    "t2": (["-t", "2"], 1, True),
}


@needs_root
@pytest.mark.parametrize("case", list(OFFLOAD_SERVER_CASES))
def test_hostbus_offloaded_real_client_our_server(wire, case):
    """A real `iperf3 -c` in the namespace against our server with --offload on."""
    dev, ns = wire
    args, n, exact = OFFLOAD_SERVER_CASES[case]
    port = 5271 + list(OFFLOAD_SERVER_CASES).index(case)
    srv = subprocess.Popen(ours_cmd("server", "-p", port, "--one-off", "--json", "--accept-timeout", 30,
                                    "--offload", "on", *chimney_args(dev)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(srv)
        cli = ns.run(IPERF3, "-c", ADDR.guest4, "-p", str(port), "-J", *args, check=False, timeout=60)
        out, err = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert srv.returncode == 0, (out, err)
    ours = ours_from(out.decode())
    theirs = last_json(cli.stdout, f"iperf3 -c in the namespace ({cli.stderr!r})")
    assert cli.returncode == 0, cli.stdout
    check_against_real_client(ours, theirs, n, exact=exact)
    assert ours["client_done"] is True
    sending = "-R" in args
    check_offloaded(ours, n, (ours["sent"] if sending else ours["received"])["bytes"], sending=sending)
    print(f"\niperf3 -c -> offloaded chimney server ({case}): {ours['received']['bytes'] / 1e6:.1f} MB, "
          f"receiver {ours['received']['mbps']:.1f} Mbit/s")


# -- the end of a test against a real Linux receiver that reads late ----------------------

# Listens, accepts, reads nothing until a line on stdin, then reads `n` bytes and prints
# how many it got; keeps the connection open until a second line.
LATE_READER = r'''
import socket, sys
ls = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
c, _ = ls.accept()
sys.stdin.readline()
c.settimeout(10)
got, n = 0, int(sys.argv[2])
while got < n:
    b = c.recv(65536)
    if not b:
        break
    got += len(b)
print(got, flush=True)
sys.stdin.readline()
'''


@needs_root
@pytest.mark.parametrize("offload", ["off", "on"])
def test_settle_learns_when_a_real_receiver_has_read(wire, offload, monkeypatch):
    """What ends our sender's test: 16 KB acknowledged by a Linux receiver whose
    application has not read them is not settled (its window stays short of the
    largest); once it has read them, settle learns so from a probe's answer -- the
    receiver announces nothing by itself when less than half its window was in use."""
    from chimney.guest.tools.stacks import ChimneyStack
    dev, ns = wire
    port, n = 5291 + (offload == "on"), 16 << 10
    peer = ns.popen(sys.executable, "-c", LATE_READER, str(port), str(n), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True)
    stack = None
    try:
        assert peer.stdout.readline().strip() == "listening"
        stack = ChimneyStack("host", dev.socket, ip=f"{ADDR.guest4}/{ADDR.prefix4}", ip6=(),
                             offload=offload)
        conn = stack.connect(ADDR.peer4, port, 10)
        assert conn.sock.offloaded is (offload == "on")
        stream = proto.DataStream(1, conn, sending=True)
        data, sent, end = os.urandom(n), 0, time.monotonic() + 10
        while sent < n and time.monotonic() < end:
            sent += conn.send(data[sent:])
            stack.wait(0.01)
        assert sent == n
        monkeypatch.setattr(proto, "SETTLE_MAX", 0.6)
        unread = proto.settle(stack, [stream], time.monotonic() + 10)
        assert unread["acked"] is True and unread["read"] is False, unread
        assert unread["probe_rounds"] > 0
        peer.stdin.write("read\n")
        peer.stdin.flush()
        assert peer.stdout.readline().strip() == str(n)
        monkeypatch.setattr(proto, "SETTLE_MAX", 3.0)
        read = proto.settle(stack, [stream], time.monotonic() + 10)
        assert read["acked"] is True and read["read"] is True, read
        assert read["probe_rounds"] > 0
        if offload == "on":
            assert stack.mgr.stats["window_probes"] == 2
            # the NIC's keep-alive settings are back as they were (off)
            st = next(iter(stack.mgr.query([conn.sock]).values()))["state"]
            assert st.cached.keepalive is False and st.delegated.state.name == "ESTABLISHED"
        print(f"\nsettle against a late reader ({offload}): unread {unread}, read {read}")
        conn.close()
        stack.finish(2.0)
    finally:
        with contextlib.suppress(OSError):
            peer.stdin.write("done\n")
            peer.stdin.flush()
        try:
            peer.wait(10)
        finally:
            if peer.poll() is None:
                peer.kill()
            if stack is not None:
                stack.close()
