"""`chimney perf`: the protocol on loopback (Linux sockets at both ends, no
root), then on the host bus against a Linux peer in a namespace: one
device process and one namespace for the module; every run is a pair of
processes (`python3 -m chimney.guest.perf`), one on our host stack (--stack
chimney --bus host), one on kernel sockets inside the namespace (--stack
linux).  Figures are printed (run with -s)."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from chimney.guest.tools import perf as perf_mod
from chimney.guest.tools.stacks import LinuxStack
from chimney.host.netns import PeerAddrs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

ADDR = PeerAddrs()
MB20 = 20_000_000
RUN_TIMEOUT = 150       # seconds for one whole perf process


def perf(*args):
    return [sys.executable, "-u", "-m", "chimney.guest.perf", *map(str, args)]


def chimney_args(dev):
    return ["--stack", "chimney", "--bus", "host", "--socket", dev.socket,
            "--ip", f"{ADDR.guest4}/{ADDR.prefix4}", "--ip6", f"{ADDR.guest6}/{ADDR.prefix6}"]


def finish(proc, timeout=RUN_TIMEOUT) -> tuple[dict, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode()
    try:
        return json.loads(text.strip().splitlines()[-1]), err.decode()
    except (IndexError, ValueError):
        pytest.fail(f"no JSON (exit {proc.returncode}):\n{text}\n{err.decode()}")


def pair(server_cmd, server_popen, client_cmd, client_popen):
    """Start the server, then the client (which retries until the server listens)."""
    srv = server_popen(server_cmd)
    try:
        cli = client_popen(client_cmd)
        cres, cerr = finish(cli)
        sres, serr = finish(srv, timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert cli.returncode == 0, (cres, cerr)
    assert srv.returncode == 0, (sres, serr)
    return cres, sres


def check_result(res: dict, streams: int, nbytes=None) -> None:
    assert res["error"] is None, res["error"]
    assert res["verified"] is True
    assert res["protocol"] == 1 and res["streams"] == streams
    summ = res["summary"]
    assert summ["verified"] is True and len(summ["streams"]) == streams
    for s in summ["streams"]:
        assert s["verified"] is True
        assert s["sender"]["sha256"] == s["receiver"]["sha256"]
        assert s["sender"]["bytes"] == s["receiver"]["bytes"] > 0
        for side in ("sender", "receiver"):
            assert set(s[side]) >= {"bytes", "seconds", "mbps", "sha256"}
        assert "retransmits" in s["sender"] and "retransmitted_bytes" in s["sender"]
    for side in ("sender", "receiver"):
        assert set(summ["sum"][side]) >= {"bytes", "seconds", "mbps"}
        assert summ["sum"][side]["mbps"] > 0
        if nbytes is not None:
            assert summ["sum"][side]["bytes"] == nbytes
    assert isinstance(res["intervals"], list) and isinstance(res["stack_stats"], dict)


def figures(tag: str, res: dict) -> str:
    s = res["summary"]["sum"]
    return (f"{tag}: {s['sender']['bytes'] / 1e6:.1f} MB, sender {s['sender']['mbps']:.1f} Mbit/s, "
            f"receiver {s['receiver']['mbps']:.1f} Mbit/s")


@needs_root
@pytest.mark.parametrize("reverse", [False, True], ids=["chimney-sends", "linux-sends"])
def test_chimney_client_linux_server(wire, reverse):
    dev, ns = wire
    port = 5201 + reverse
    srv_cmd = perf("server", "--stack", "linux", "--once", "--json", "--port", port, "--accept-timeout", 60)
    cli_cmd = perf("client", ADDR.peer4, "--port", port, "-n", MB20, "--json", *(["-R"] if reverse else []),
                   *chimney_args(dev))
    cres, sres = pair(srv_cmd, lambda c: ns.popen(*c, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
                      cli_cmd, lambda c: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for res in (cres, sres):
        check_result(res, 1, MB20)
        assert res["reverse"] is reverse
        assert res["direction"] == ("server->client" if reverse else "client->server")
    assert cres["role"] == "client" and cres["stack"] == "chimney"
    assert sres["role"] == "server" and sres["stack"] == "linux"
    assert cres["summary"]["streams"][0]["sender"]["sha256"] == sres["summary"]["streams"][0]["sender"]["sha256"]
    assert cres["stack_stats"]["tcp"]["tcp_segments_in"] > 0
    assert cres["stack_stats"]["tcp"].get("tcp_internal_error", 0) == 0
    if not reverse:
        snd = cres["summary"]["sum"]["sender"]
        assert snd["retransmitted_bytes"] is not None and snd["retransmitted_bytes"] >= 0
    print("\n" + figures(f"chimney client, {'linux -> chimney' if reverse else 'chimney -> linux'}", cres))


@needs_root
def test_chimney_server_linux_client_two_streams(wire):
    dev, ns = wire
    srv_cmd = perf("server", "--once", "--json", "--port", 5301, "--accept-timeout", 60, *chimney_args(dev))
    cli_cmd = perf("client", ADDR.guest4, "--port", 5301, "-n", MB20, "-P", 2, "--json",
                   "--stack", "linux", "--connect-timeout", 30)
    cres, sres = pair(srv_cmd, lambda c: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
                      cli_cmd, lambda c: ns.popen(*c, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for res in (cres, sres):
        check_result(res, 2, MB20)
    assert sres["stack"] == "chimney" and cres["stack"] == "linux"
    assert sres["remote"]["host"] == ADDR.peer4
    for s in cres["summary"]["streams"]:
        assert s["sender"]["bytes"] == MB20 // 2
    assert cres["summary"]["streams"][0]["sender"]["sha256"] != cres["summary"]["streams"][1]["sender"]["sha256"]
    print("\n" + figures("chimney server, linux client -P 2", sres))


@needs_root
def test_duration_with_intervals(wire):
    dev, ns = wire
    srv_cmd = perf("server", "--stack", "linux", "--once", "--json", "--port", 5401, "--accept-timeout", 60)
    cli_cmd = perf("client", ADDR.peer6, "--ipv6", "--port", 5401, "-t", 2, "-i", 0.5, *chimney_args(dev))
    srv = ns.popen(*srv_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cli = subprocess.run(cli_cmd, capture_output=True, text=True, timeout=60, check=False)
        sres, _ = finish(srv, timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert cli.returncode == 0, cli.stdout + cli.stderr
    text = cli.stdout
    lines = [ln for ln in text.splitlines() if ln.startswith("[SUM]") and "Mbit/s" in ln]
    assert len(lines) >= 3 + 2, text        # interval reports, then the sender and receiver sums
    assert "verified: yes" in text
    check_result(sres, 1)
    assert sres["duration"] == 2
    snd = sres["summary"]["sum"]["sender"]
    assert 1.5 < snd["seconds"] < 10
    print(f"\n{text}")


# -- loopback, Linux sockets at both ends (no root) -------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_run(**kw):
    port = free_port()
    srv = LinuxStack()
    srv.listen(port)
    box = {}
    t = threading.Thread(target=lambda: box.update(res=perf_mod.serve_one(srv, as_json=True, accept_timeout=10)),
                         daemon=True)
    t.start()
    try:
        cres = perf_mod.run_client(LinuxStack(), "127.0.0.1", port, as_json=True, **kw)
        t.join(30)
    finally:
        srv.close()
    assert not t.is_alive()
    return cres, box["res"]


@pytest.mark.parametrize("reverse", [False, True])
def test_loopback_bytes(reverse):
    cres, sres = loopback_run(nbytes=3_000_001, streams=3, reverse=reverse, seed=7)
    for res in (cres, sres):
        check_result(res, 3, 3_000_001)
    assert [s["sender"]["bytes"] for s in cres["summary"]["streams"]] == [1_000_001, 1_000_000, 1_000_000]
    # the data is the seeded stream, not zeros
    h = hashlib.sha256(perf_mod.stream_data(7, 0, 1_000_001))
    assert cres["summary"]["streams"][0]["sender"]["sha256"] == h.hexdigest()


def test_loopback_duration_intervals():
    t0 = time.monotonic()
    cres, _ = loopback_run(duration=0.6, interval=0.2)
    assert time.monotonic() - t0 < 10
    check_result(cres, 1)
    assert len(cres["intervals"]) >= 3
    for rep in cres["intervals"]:
        assert set(rep) >= {"start", "end", "bytes", "mbps", "streams"}
    assert 0.5 < cres["summary"]["sum"]["sender"]["seconds"] < 5


def test_mismatch_is_not_verified():
    mine = {"streams": [{"id": 0, "role": "sender", "bytes": 10, "seconds": 1.0, "sha256": "a",
                         "retransmits": 0, "retransmitted_bytes": None}]}
    peer = {"streams": [{"id": 0, "role": "receiver", "bytes": 10, "seconds": 1.0, "sha256": "b"}]}
    assert perf_mod.summarize(mine, peer, 1)["verified"] is False
    peer["streams"][0]["sha256"] = "a"
    assert perf_mod.summarize(mine, peer, 1)["verified"] is True
    assert perf_mod.summarize(mine, peer, 2)["verified"] is False      # a stream missing


def test_hard_timeout_bounds_a_silent_server():
    ls = socket.create_server(("127.0.0.1", 0))      # accepts, never answers
    port = ls.getsockname()[1]
    try:
        t0 = time.monotonic()
        res = perf_mod.run_client(LinuxStack(), "127.0.0.1", port, nbytes=1000, timeout=1.0,
                                  as_json=True)
        assert time.monotonic() - t0 < 5
    finally:
        ls.close()
    assert res["verified"] is False and "timeout" in res["error"]


def test_cli_perf_subcommand(capsys):
    from chimney.cli import main
    port = free_port()
    srv = LinuxStack()
    srv.listen(port)
    t = threading.Thread(target=lambda: perf_mod.serve_one(srv, as_json=True, accept_timeout=10), daemon=True)
    t.start()
    try:
        rc = main(["perf", "client", "127.0.0.1", "--port", str(port), "--stack", "linux",
                   "-n", "2M", "-R", "--json"])
        t.join(30)
    finally:
        srv.close()
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and res["verified"] is True and res["bytes"] == 2 << 20 and res["reverse"] is True   # 2M: powers of 2
