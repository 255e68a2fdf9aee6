"""The host stack over a bad link in the VM: chimney perf on our host
stack inside the guest (miniport on Linux VFIO) against the Linux peer in
the namespace, through a NIC whose link misbehaves as netem would (delay,
jitter, 2% loss, reordering, both directions: the device's --impair), over
IPv4 and IPv6, both directions, sha256-verified at both ends.  One boot
runs all four transfers; each is bounded in bytes and by a hard timeout."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns, PeerAddrs
from chimney.host.qemu import run_in_guest

pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

ADDR = PeerAddrs()
IMPAIR = "delay=5ms,jitter=2ms,loss=2%,reorder=10%,seed=11"
NBYTES = 1_000_000
RUN_TIMEOUT = 120           # per transfer, in the guest (TCG)
CASES = [("ipv4", False), ("ipv4", True), ("ipv6", False), ("ipv6", True)]   # (family, reverse)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("vm-lossy")
    with Netns("vmlossy") as ns:
        with DeviceProcess(str(d / "nic.sock"), tap="chim0", netns=ns.name, impair=IMPAIR,
                           log_path=str(d / "device.log")) as dev:
            ns.configure_peer("chim0", ADDR)
            servers = [ns.popen(sys.executable, "-u", "-m", "chimney.guest.perf", "server", "--stack", "linux",
                                "--once", "--json", "--port", str(7401 + i), "--accept-timeout", "400",
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                       for i in range(len(CASES))]
            try:
                cmds = []
                for i, (fam, reverse) in enumerate(CASES):
                    host = ADDR.peer6 if fam == "ipv6" else ADDR.peer4
                    cmds.append(f"python3 -m chimney.guest.perf client {host} --port {7401 + i} -n {NBYTES} "
                                f"--json -i 0 --bus vfio --timeout {RUN_TIMEOUT} --seed {i}"
                                f"{' --ipv6' if fam == 'ipv6' else ''}{' -R' if reverse else ''}")
                res = run_in_guest("; ".join(cmds), vfio_user_socket=dev.socket, workdir=d / "vm",
                                   timeout=len(CASES) * (RUN_TIMEOUT + 30) + 120)
                linux = []
                for s in servers:
                    try:
                        out, err = s.communicate(timeout=30)
                    except subprocess.TimeoutExpired:
                        s.kill()
                        out, err = s.communicate()
                    linux.append((s.returncode, out.decode(), err.decode()))
            finally:
                for s in servers:
                    if s.poll() is None:
                        s.kill()
                        s.communicate()
            alive = dev.alive
    log = dev.log_text()
    guest = []
    for line in res.stdout.decode(errors="replace").splitlines():
        if line.startswith("{"):
            guest.append(json.loads(line))
    return res, guest, linux, alive, log


def test_all_transfers_ran(runs):
    res, guest, linux, alive, log = runs
    assert len(guest) == len(CASES), (res.stdout.decode()[-3000:], res.stderr.decode()[-3000:])
    assert alive and "Traceback" not in log, log[-3000:]
    # the link really lost and reordered frames both ways (the device's counters at exit)
    counters = dict(re.findall(r"impairment (tx|rx) \(.*?\): (\{.*?\})", log))
    assert set(counters) == {"tx", "rx"}, log[-2000:]
    for side, text in counters.items():
        c = ast.literal_eval(text)
        assert c["lost"] > 0 and c["reordered"] > 0, (side, c)


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{f}-{'linux-sends' if r else 'guest-sends'}" for f, r in CASES])
def test_lossy_transfer_in_vm(runs, case):
    res, guest, linux, _, _ = runs
    assert len(guest) > case, res.stderr.decode()[-3000:]
    fam, reverse = CASES[case]
    g = guest[case]
    rc, out, err = linux[case]
    assert rc == 0, (out[-2000:], err[-2000:])
    lres = json.loads(out.strip().splitlines()[-1])
    for r in (g, lres):
        assert r["error"] is None, r["error"]
        assert r["verified"] is True
        s = r["summary"]["streams"][0]
        assert s["sender"]["bytes"] == s["receiver"]["bytes"] == NBYTES
        assert s["sender"]["sha256"] == s["receiver"]["sha256"]
    assert g["stack"] == "chimney" and lres["stack"] == "linux" and g["reverse"] is reverse
    assert (":" in g["remote"]["host"]) is (fam == "ipv6")
    assert g["summary"]["streams"][0]["sender"]["sha256"] == lres["summary"]["streams"][0]["sender"]["sha256"]
    assert g["stack_stats"]["tcp"].get("tcp_internal_error", 0) == 0
    s = g["summary"]["sum"]["receiver"]
    print(f"\nVM, impaired ({IMPAIR}), {fam}, {'Linux sends' if reverse else 'guest sends'}: "
          f"{s['bytes'] / 1e6:.1f} MB verified, {s['mbps']:.2f} Mbit/s")
