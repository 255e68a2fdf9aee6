"""Interop with Linux on the host bus: our host stack (a `chimney perf` process
on --bus host, software or offloaded TCP) against a Linux peer (`chimney perf
--stack linux` in a network namespace, the device's TAP in it), cell by cell.

A cell varies one thing from the default (Linux's tcp_timestamps, tcp_sack,
tcp_window_scaling and tcp_ecn all on, MTU 1500 on both sides, IPv4): each of
the four options off, MTU 576/1280/9000, IPv6; plus combined cells (every option
off at 576, IPv6 at its minimum 1280 and at 9000).  Every cell runs on both
paths (software and offloaded TCP) with the guest as client and as server and
data both ways, and --upload-after hands an offloaded connection back to
software TCP mid-stream in both directions.  Each run moves a few MB,
sha256-verified at both ends, inside a hard timeout (a hang fails with logs).

Linux's options are per-namespace sysctls set in the peer's namespace; the MTU
is the TAP's in the namespace and, on our side, the NIC's MTU register and the
Interface's mtu (perf has no MTU flag, so our side runs perf through
MTU_PERF, which brings the stack up at the given MTU).

CHIMNEY_INTEROP_RUNS=N repeats every run N times (a soak; CI runs each once)."""
import json
import os
import subprocess
import sys
import time

import pytest

from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs, _ip

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

ADDR = PeerAddrs()
TAP = "chim0"
NBYTES = 2_000_000
RUN_TIMEOUT = 30            # seconds for one perf process's whole run (10x the expected under load)
RUNS = int(os.environ.get("CHIMNEY_INTEROP_RUNS", "1"))
SYSCTLS = ("tcp_timestamps", "tcp_sack", "tcp_window_scaling", "tcp_ecn")
ALL_ON = {"tcp_timestamps": 1, "tcp_sack": 1, "tcp_window_scaling": 1, "tcp_ecn": 1}
ALL_OFF = dict.fromkeys(SYSCTLS, 0)

# Our side: chimney perf with the NIC's MTU register and the Interface at argv[1].
MTU_PERF = r"""
import sys
from chimney import hw
from chimney.guest import perf
from chimney.guest.stack.host import HostStack
mtu = int(sys.argv[1])
_on_miniport = HostStack.on_miniport.__func__
def on_miniport(cls, mp, *a, **kw):
    mp.wr(hw.REG_MTU, mtu)
    return _on_miniport(cls, mp, *a, mtu=mtu, **kw)
HostStack.on_miniport = classmethod(on_miniport)
sys.exit(perf.main(sys.argv[2:]))
"""


def linux_perf(*args):
    return [sys.executable, "-u", "-m", "chimney.guest.perf", *map(str, args), "--stack", "linux"]


def chimney_perf(mtu, dev, path, upload_after, *args):
    cmd = [sys.executable, "-u", "-c", MTU_PERF, str(mtu), *map(str, args),
           "--stack", "chimney", "--bus", "host", "--socket", dev.socket,
           "--ip", f"{ADDR.guest4}/{ADDR.prefix4}", "--ip6", f"{ADDR.guest6}/{ADDR.prefix6}",
           "--offload", "on" if path == "offload" else "off"]
    if upload_after is not None:
        cmd += ["--upload-after", str(upload_after)]
    return cmd


def collect(proc, timeout) -> tuple[int | None, str, str]:
    """(exit status, or None when it had to be killed; stdout; stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc = None
    return rc, out.decode(), err.decode()


def last_json(text: str):
    try:
        return json.loads(text.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


class Link:
    """The device and the Linux peer's namespace, set to one cell at a time."""

    def __init__(self, dev, ns):
        self.dev, self.ns, self.port = dev, ns, 6400

    def set_cell(self, sysctls: dict, mtu: int) -> None:
        for name, val in sysctls.items():
            self.ns.run("sysctl", "-q", "-w", f"net.ipv4.{name}={val}")
        _ip("-n", self.ns.name, "link", "set", TAP, "mtu", str(mtu))
        if mtu >= 1280 and ADDR.peer6 not in self.ns.run("ip", "-6", "addr", "show", "dev", TAP).stdout:
            # Linux drops a link's IPv6 addresses while its MTU is below 1280
            _ip("-n", self.ns.name, "addr", "add", f"{ADDR.peer6}/{ADDR.prefix6}", "dev", TAP, "nodad")
        # the peer's cached path MTU and metrics from an earlier cell must not carry over
        self.ns.run("ip", "route", "flush", "cache", check=False)
        self.ns.run("ip", "tcp_metrics", "flush", "all", check=False)
        got = {n: int(self.ns.run("sysctl", "-n", f"net.ipv4.{n}").stdout) for n in sysctls}
        assert got == sysctls

    def run(self, *, mtu, path, role, reverse, ipv6, upload_after=None) -> tuple[dict, dict]:
        """One perf pair; returns (guest, linux) results, both checked to have exited 0."""
        self.port += 1
        fam = ["--ipv6"] if ipv6 else []
        rev = ["-R"] if reverse else []
        common = ["--port", self.port, "-n", NBYTES, "--json", "-i", 0, "--timeout", RUN_TIMEOUT]
        srv_args = ["server", "--once", "--json", "--port", self.port, "--accept-timeout", 60]
        if role == "client":
            host = ADDR.peer6 if ipv6 else ADDR.peer4
            srv = self.ns.popen(*linux_perf(*srv_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            start = lambda: subprocess.Popen(
                chimney_perf(mtu, self.dev, path, upload_after, "client", host, *common, *rev, *fam),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        else:
            host = ADDR.guest6 if ipv6 else ADDR.guest4
            srv = subprocess.Popen(chimney_perf(mtu, self.dev, path, upload_after, *srv_args),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            start = lambda: self.ns.popen(
                *linux_perf("client", host, *common, "--connect-timeout", 30, *rev, *fam),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            cli = start()
            crun = collect(cli, RUN_TIMEOUT + 30)
            srun = collect(srv, 30 if crun[0] is not None else 1)
        finally:
            for p in (srv, cli):
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        cres, sres = last_json(crun[1]), last_json(srun[1])
        if crun[0] != 0 or srun[0] != 0 or cres is None or sres is None:
            # a hang (killed: exit None) or a failed run: both sides' output in the failure
            pytest.fail("".join(f"\n--- {what}: exit {r[0]}\n{r[1][-3000:]}\n{r[2][-3000:]}"
                                for what, r in (("client", crun), ("server", srun))), pytrace=False)
        guest, linux = (cres, sres) if role == "client" else (sres, cres)
        assert guest["stack"] == "chimney" and linux["stack"] == "linux"
        return guest, linux


def check_verified(guest: dict, linux: dict) -> None:
    for res in (guest, linux):
        assert res["error"] is None, res["error"]
        assert res["verified"] is True
        summ = res["summary"]
        assert summ["verified"] is True and len(summ["streams"]) == 1
        s = summ["streams"][0]
        assert s["sender"]["bytes"] == s["receiver"]["bytes"] == NBYTES
        assert s["sender"]["sha256"] == s["receiver"]["sha256"]
    # each end hashed what it sent or received itself: the two ends' digests agree
    mine = {r: guest["summary"]["streams"][0][r]["sha256"] for r in ("sender", "receiver")}
    theirs = {r: linux["summary"]["streams"][0][r]["sha256"] for r in ("sender", "receiver")}
    assert mine == theirs
    stats = guest["stack_stats"]
    assert stats["tcp"].get("tcp_internal_error", 0) == 0 and stats["tcp"].get("tx_errors", 0) == 0
    assert stats["iface"].get("drop_internal_error", 0) == 0
    assert stats["iface"].get("drop_mtu_exceeded", 0) == 0, stats["iface"]


def check_path(guest: dict, path: str, upload_after) -> None:
    """The connection really took the path the run asked for."""
    stats = guest["stack_stats"]
    if path == "software":
        assert "offload" not in stats
        assert stats["tcp"]["tcp_segments_in"] > 0 and stats["tcp"]["tcp_segments_out"] > 0
        return
    off = stats["offload"]
    assert off.get("offloaded", 0) >= 1, off
    assert off.get("offload_failed", 0) == 0, off
    if upload_after is not None:
        assert off.get("uploaded", 0) >= 1, off
        for bad in ("upload_no_state", "upload_rx_gap", "upload_tx_mismatch", "upload_io_never_returned"):
            assert off.get(bad, 0) == 0, off


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interop")
    with Netns("interop") as ns, DeviceProcess(str(tmp / "nic.sock"), tap=TAP, netns=ns.name,
                                                log_path=str(tmp / "device.log")) as dev:
        ns.configure_peer(TAP, ADDR)
        yield Link(dev, ns)
        assert dev.alive, dev.log_text()[-3000:]
        assert "Traceback" not in dev.log_text(), dev.log_text()[-4000:]


# (id, Linux sysctls, MTU, IPv6): the default, one dimension at a time, a few combined
CELLS = [
    ("default", ALL_ON, 1500, False),
    *[(f"{n.removeprefix('tcp_')}-off", {**ALL_ON, n: 0}, 1500, False) for n in SYSCTLS],
    ("mtu576", ALL_ON, 576, False),
    ("mtu1280", ALL_ON, 1280, False),
    ("mtu9000", ALL_ON, 9000, False),
    ("ipv6", ALL_ON, 1500, True),
    ("all-off-mtu576", ALL_OFF, 576, False),
    ("ipv6-mtu1280", ALL_ON, 1280, True),
    ("ipv6-mtu9000", ALL_ON, 9000, True),
]
# (id, guest role, -R): guest's SYN and Linux's SYN, data each way, spread over the two paths
RUNS_PER_PATH = {
    "software": [("client-sends", "client", False), ("server-receives", "server", False)],
    "offload": [("client-receives", "client", True), ("server-sends", "server", True)],
}
PARAMS = [pytest.param(cell, path, d, id=f"{cell[0]}-{path}-{d[0]}")
          for cell in CELLS for path, dirs in RUNS_PER_PATH.items() for d in dirs]
# the default cell takes every combination on both paths
PARAMS += [pytest.param(CELLS[0], path, d, id=f"default-{path}-{d[0]}")
           for path, dirs in RUNS_PER_PATH.items()
           for d in RUNS_PER_PATH["offload" if path == "software" else "software"]]


@pytest.mark.parametrize("cell,path,direction", PARAMS)
def test_interop(link, cell, path, direction):
    _, sysctls, mtu, ipv6 = cell
    _, role, reverse = direction
    link.set_cell(sysctls, mtu)
    for _ in range(RUNS):
        t0 = time.monotonic()
        guest, linux = link.run(mtu=mtu, path=path, role=role, reverse=reverse, ipv6=ipv6)
        check_verified(guest, linux)
        check_path(guest, path, None)
        assert (":" in guest["remote"]["host"]) is ipv6, guest["remote"]
        print(f"\n{cell[0]} {path} {direction[0]}: {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("role,reverse", [("client", False), ("client", True)],
                         ids=["guest-sends", "guest-receives"])
def test_interop_upload_after(link, role, reverse):
    """An offloaded connection uploaded back to software TCP after 1 MB of the
    2 MB: the stream stays exact across the hand-back, in both directions."""
    link.set_cell(ALL_ON, 1500)
    for _ in range(RUNS):
        guest, linux = link.run(mtu=1500, path="offload", role=role, reverse=reverse, ipv6=False,
                                upload_after=NBYTES // 2)
        check_verified(guest, linux)
        check_path(guest, "offload", NBYTES // 2)
