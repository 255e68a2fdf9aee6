"""Two chimney NICs back to back: our TOE against our TOE.

Two device processes, their TAPs in one network namespace joined by a Linux
bridge (no address in the namespace: no Linux TCP endpoint in the data path),
and two host-bus guests (`chimney perf --stack chimney --bus host --offload on`),
one the server, the other the client, in one subnet.  Each run is sha256-
verified at both ends, and both devices' offload counters (read through their
control sockets) show that both TOEs carried the data.  Figures are printed
(run with -s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from chimney.host.device import DeviceProcess
from chimney.host.netns import Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# On the shared 2-core test machine 100 MB take 2.5-6.5 s per direction (140-360 Mbit/s:
# two guests and two device processes on two cores), the whole file under 15 s.
NBYTES = 100_000_000
RUN_TIMEOUT = 120           # hard bound for one perf process
SIDES = {"a": ("02:c4:1e:00:0b:01", "10.199.8.1", "fd00:c41e:8::1"),
         "b": ("02:c4:1e:00:0b:02", "10.199.8.2", "fd00:c41e:8::2")}
BRIDGE = "b2bbr0"


@pytest.fixture(scope="module")
def nics(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("b2b")
    with Netns("b2b") as ns:
        devs = {}
        try:
            for name, (mac, _, _) in SIDES.items():
                devs[name] = DeviceProcess(str(tmp / f"nic-{name}.sock"), tap=f"b2b{name}", netns=ns.name,
                                           mac=mac, log_path=str(tmp / f"device-{name}.log"))
            ns.run("ip", "link", "add", BRIDGE, "type", "bridge")
            for name in devs:
                ns.wait_link(f"b2b{name}")
                ns.run("ip", "link", "set", f"b2b{name}", "master", BRIDGE)
            ns.run("ip", "link", "set", BRIDGE, "up")
            # nothing in the namespace speaks IP on this wire
            assert "inet" not in ns.run("ip", "-4", "addr", "show", "dev", BRIDGE).stdout
            yield devs, ns
            for d in devs.values():
                assert d.alive, d.log_text()[-3000:]
                assert "Traceback" not in d.log_text(), d.log_text()[-3000:]
        finally:
            for d in devs.values():
                d.__exit__(None, None, None)


def perf(dev, side, *args):
    _, ip4, ip6 = SIDES[side]
    return [sys.executable, "-u", "-m", "chimney.guest.perf", *map(str, args), "--json", "-i", "0",
            "--stack", "chimney", "--bus", "host", "--socket", dev.socket, "--offload", "on",
            "--ip", f"{ip4}/24", "--ip6", f"{ip6}/64"]


def result(proc, timeout) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"perf did not finish in {timeout} s:\n{err.decode()[-3000:]}")
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()[-3000:]
    res = json.loads(lines[-1])
    assert proc.returncode == 0, (res.get("error"), err.decode()[-3000:])
    return res


def stream(res: dict) -> dict:
    assert res["error"] is None and res["verified"] is True
    (s,) = res["summary"]["streams"]
    return s


@pytest.mark.parametrize("reverse", [False, True], ids=["b-sends", "a-sends"])
def test_toe_to_toe_100mb(nics, reverse):
    devs, _ = nics
    port = 7100 + reverse
    srv = subprocess.Popen(perf(devs["a"], "a", "server", "--once", "--port", port, "--accept-timeout", 60,
                                "--timeout", RUN_TIMEOUT),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        # (the client retries a refused connect until the server listens)
        cli = subprocess.Popen(perf(devs["b"], "b", "client", SIDES["a"][1], "--port", port, "-n", NBYTES,
                                    "--timeout", RUN_TIMEOUT, "--connect-timeout", 30,
                                    *(["-R"] if reverse else [])),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        cres = result(cli, RUN_TIMEOUT + 30)
        sres = result(srv, 30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    wall = time.monotonic() - t0
    cs, ss = stream(cres), stream(sres)
    # each end hashed what it itself sent or received, and they agree
    for s in (cs, ss):
        assert s["sender"]["bytes"] == s["receiver"]["bytes"] == NBYTES
        assert s["sender"]["sha256"] == s["receiver"]["sha256"]
    assert cs["sender"]["sha256"] == ss["sender"]["sha256"]
    sender, receiver = ("a", "b") if reverse else ("b", "a")
    by_side = {"b": cres, "a": sres}
    for side, res in by_side.items():
        mine = stream(res)["sender" if side == sender else "receiver"]
        assert mine["offloaded"] is True and mine["uploads"] == 0, (side, mine)
        st = res["stack_stats"]["offload"]
        assert st.get("upload_rx_gap", 0) == 0 and st.get("upload_tx_mismatch", 0) == 0
    # the sender's software TCP sent no data: its TOE did
    assert stream(by_side[sender])["sender"]["software_data_segments_out"] == 0
    # both devices' own counters (each guest read its NIC's before it reset it on exit):
    # the sending TOE sent every byte, the receiving TOE took them in
    moved = {n: {k: by_side[n]["stack_stats"]["device"][k] for k in ("offload_bytes_out", "offload_bytes_in")}
             for n in devs}
    assert moved[sender]["offload_bytes_out"] >= NBYTES
    # (a receiver may take the first bytes in software, before its offload: they travel in the state)
    assert moved[receiver]["offload_bytes_in"] >= NBYTES - (1 << 20)
    mbps = stream(by_side[receiver])["receiver"]["mbps"]
    print(f"\nTOE {sender} -> TOE {receiver}: {NBYTES / 1e6:.0f} MB verified, {mbps:.1f} Mbit/s, "
          f"{wall:.1f} s wall, device counters {moved}")
