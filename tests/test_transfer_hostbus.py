"""The host stack end to end on the host bus: a guest application (chimney perf on
our host stack, --bus host) moves 100 MB to and from a Linux peer (chimney
perf --stack linux in a network namespace), the guest as client and as
server, sha256-verified at both ends; then the same over a bad link (the
NIC's netem-style impairment on both directions: delay, jitter, 2% loss,
reordering) over IPv4 and IPv6.  Every run is a pair of processes bounded
in bytes and by a hard timeout.  Figures are printed (run with -s)."""
import ast
import json
import os
import re
import subprocess
import sys
import time

import pytest

from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

ADDR = PeerAddrs()
TAP = "chim0"
MB100 = 100_000_000
RUN_TIMEOUT = 240           # seconds for one whole 100 MB perf process (a few times the expected)
# netem's "delay 5ms 2ms loss 2% reorder 10%" on both directions of the NIC's port
IMPAIR = "delay=5ms,jitter=2ms,loss=2%,reorder=10%,seed=4"
LOSSY_BYTES = 2_000_000
LOSSY_TIMEOUT = 90


def perf(*args):
    return [sys.executable, "-u", "-m", "chimney.guest.perf", *map(str, args)]


def chimney_args(dev):
    return ["--stack", "chimney", "--bus", "host", "--socket", dev.socket,
            "--ip", f"{ADDR.guest4}/{ADDR.prefix4}", "--ip6", f"{ADDR.guest6}/{ADDR.prefix6}"]


def finish(proc, timeout) -> tuple[dict, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"perf did not finish in {timeout} s:\n{out.decode()[-2000:]}\n{err.decode()[-2000:]}")
    text = out.decode()
    try:
        return json.loads(text.strip().splitlines()[-1]), err.decode()
    except (IndexError, ValueError):
        pytest.fail(f"no JSON (exit {proc.returncode}):\n{text}\n{err.decode()}")


def run_pair(dev, ns, *, guest_role, reverse, host, nbytes, port, timeout, ipv6=False):
    """One perf run: the guest (our stack on the host bus) as `guest_role`, the
    Linux peer in the namespace as the other end.  Returns (guest, linux) results."""
    hard = ["--timeout", timeout]
    if guest_role == "client":
        srv_cmd = perf("server", "--stack", "linux", "--once", "--json", "--port", port, "--accept-timeout", 60)
        cli_cmd = perf("client", host, "--port", port, "-n", nbytes, "--json", "-i", 0, *hard,
                       *(["-R"] if reverse else []), *(["--ipv6"] if ipv6 else []), *chimney_args(dev))
        srv = ns.popen(*srv_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        start_cli = lambda: subprocess.Popen(cli_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: E731
    else:
        srv_cmd = perf("server", "--once", "--json", "--port", port, "--accept-timeout", 60, *chimney_args(dev))
        cli_cmd = perf("client", host, "--port", port, "-n", nbytes, "--json", "-i", 0, *hard,
                       "--stack", "linux", "--connect-timeout", 30, *(["-R"] if reverse else []))
        srv = subprocess.Popen(srv_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        start_cli = lambda: ns.popen(*cli_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: E731
    t0 = time.monotonic()
    try:
        cli = start_cli()
        cres, cerr = finish(cli, timeout + 30)
        sres, serr = finish(srv, 30)
    finally:
        for p in (srv,):
            if p.poll() is None:
                p.kill()
                p.communicate()
    wall = time.monotonic() - t0
    assert cli.returncode == 0, (cres, cerr[-3000:])
    assert srv.returncode == 0, (sres, serr[-3000:])
    guest, linux = (cres, sres) if guest_role == "client" else (sres, cres)
    assert guest["stack"] == "chimney" and linux["stack"] == "linux"
    guest["wall_seconds"] = wall
    return guest, linux


def check_verified(guest: dict, linux: dict, nbytes: int, guest_sends: bool) -> None:
    for res in (guest, linux):
        assert res["error"] is None, res["error"]
        assert res["verified"] is True
        summ = res["summary"]
        assert summ["verified"] is True and len(summ["streams"]) == 1
        s = summ["streams"][0]
        assert s["sender"]["bytes"] == s["receiver"]["bytes"] == nbytes
        assert s["sender"]["sha256"] == s["receiver"]["sha256"]
    # each end hashed what it itself sent or received: the two ends' own digests agree
    mine = {r: guest["summary"]["streams"][0][r]["sha256"] for r in ("sender", "receiver")}
    theirs = {r: linux["summary"]["streams"][0][r]["sha256"] for r in ("sender", "receiver")}
    assert mine == theirs
    tcp = guest["stack_stats"]["tcp"]
    assert tcp.get("tcp_internal_error", 0) == 0 and tcp.get("tx_errors", 0) == 0
    assert tcp["tcp_segments_in"] > 0 and tcp["tcp_segments_out"] > 0
    assert guest["stack_stats"]["iface"].get("drop_internal_error", 0) == 0


def figures(tag: str, guest: dict) -> str:
    s = guest["summary"]["sum"]
    return (f"{tag}: {s['receiver']['bytes'] / 1e6:.1f} MB verified, receiver {s['receiver']['mbps']:.1f} "
            f"Mbit/s, {guest['wall_seconds']:.1f} s wall")


# -- a clean link: 100 MB each way, guest as client and as server -------------------------

CASES = [  # (guest role, reverse): who sends follows
    ("client", False),      # guest client sends to the Linux server
    ("client", True),       # Linux server sends to the guest client
    ("server", False),      # Linux client sends to the guest server
    ("server", True),       # guest server sends to the Linux client
]


def _guest_sends(role: str, reverse: bool) -> bool:
    return (role == "client") != reverse


@pytest.mark.parametrize("role,reverse", CASES,
                         ids=["guest-client-sends", "guest-client-receives",
                              "guest-server-receives", "guest-server-sends"])
def test_100mb_clean_link(wire, role, reverse):
    dev, ns = wire
    host = ADDR.peer4 if role == "client" else ADDR.guest4
    port = 6201 + CASES.index((role, reverse))
    guest, linux = run_pair(dev, ns, guest_role=role, reverse=reverse, host=host, nbytes=MB100,
                            port=port, timeout=RUN_TIMEOUT)
    check_verified(guest, linux, MB100, _guest_sends(role, reverse))
    assert guest["role"] == role
    print("\n" + figures(f"host bus, guest {role}, {'guest sends' if _guest_sends(role, reverse) else 'guest receives'}",
                         guest))


# -- a bad link: delay, jitter, 2% loss, reordering, both directions, IPv4 and IPv6 --------

@pytest.fixture(scope="module")
def lossy_wire(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lossy")
    with Netns("lossy") as ns, DeviceProcess(str(tmp / "nic.sock"), tap=TAP, netns=ns.name, impair=IMPAIR,
                                             log_path=str(tmp / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        yield dev, ns
        assert dev.alive, dev.log_text()[-3000:]
    # the device logs each direction's impairment counters when it stops: the link
    # really lost and reordered frames both ways
    log = dev.log_text()
    counters = dict(re.findall(r"impairment (tx|rx) \(.*?\): (\{.*?\})", log))
    assert set(counters) == {"tx", "rx"}, log[-2000:]
    for side, text in counters.items():
        c = ast.literal_eval(text)
        assert c["lost"] > 0 and c["reordered"] > 0 and c["delayed"] > 0, (side, c)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("role,reverse", CASES,
                         ids=["guest-client-sends", "guest-client-receives",
                              "guest-server-receives", "guest-server-sends"])
def test_lossy_link(lossy_wire, family, role, reverse):
    dev, ns = lossy_wire
    v6 = family == "ipv6"
    if role == "client":
        host = ADDR.peer6 if v6 else ADDR.peer4
    else:
        host = ADDR.guest6 if v6 else ADDR.guest4
    port = 6301 + 10 * v6 + CASES.index((role, reverse))
    guest, linux = run_pair(dev, ns, guest_role=role, reverse=reverse, host=host, nbytes=LOSSY_BYTES,
                            port=port, timeout=LOSSY_TIMEOUT, ipv6=v6)
    check_verified(guest, linux, LOSSY_BYTES, _guest_sends(role, reverse))
    remote = guest["remote"]["host"]
    assert (":" in remote) is v6, remote
    tcp = guest["stack_stats"]["tcp"]
    if _guest_sends(role, reverse):
        # the link lost ~2% of our segments: the software TCP must have resent some
        assert tcp["tcp_segments_out"] > LOSSY_BYTES // 1448, tcp
    print("\n" + figures(f"impaired ({IMPAIR}), {family}, guest {role}, "
                         f"{'guest sends' if _guest_sends(role, reverse) else 'guest receives'}", guest))
