"""`chimney bench suite`: the cheap measures (c: host-bus offload vs software,
d: request/response, e/f: bulk offload and device memory) with tiny sizes,
through the command line with --json.  Correctness of the structure and of
the runs (verified, positive figures), not timing.  Also chimney.guest.rr on
loopback."""
import json
import os
import subprocess
import sys
import time

import pytest

from chimney.bench import suite

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def test_rr_loopback():
    """The request/response tool on Linux sockets at both ends (no root)."""
    port = 15301 + os.getpid() % 1000
    srv = subprocess.Popen([sys.executable, "-m", "chimney.guest.rr", "server", "--stack", "linux", "--once",
                            "--json", "--port", str(port), "--accept-timeout", "30"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        cli = subprocess.run([sys.executable, "-m", "chimney.guest.rr", "client", "127.0.0.1", "--stack", "linux",
                              "--json", "--port", str(port), "--size", "1", "--count", "300", "-t", "20"],
                             capture_output=True, timeout=60)
        out, _ = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    c = json.loads(cli.stdout.decode().strip().splitlines()[-1])
    s = json.loads(out.decode().strip().splitlines()[-1])
    assert cli.returncode == 0 and srv.returncode == 0, (c, s)
    assert c["verified"] and c["error"] is None and c["transactions"] == 300 and c["tps"] > 0
    assert 0 < c["latency_us"]["min"] <= c["latency_us"]["median"] <= c["latency_us"]["max"]
    assert s["transactions"] == 300 and s["size"] == 1 and s["error"] is None


def test_only_rejects_unknown_measures():
    with pytest.raises(ValueError):
        suite.run("c,z", quiet=True)


@needs_root
def test_suite_cheap_measures_json():
    r = subprocess.run([sys.executable, "-m", "chimney.cli", "bench", "suite", "--only", "c,d,e,f", "--json",
                        "--bytes", "400K", "--software-bytes", "200K", "--conns", "50", "--rr-count", "100",
                        "--rr-seconds", "10", "--timeout", "120"], capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    res = json.loads(r.stdout)
    assert res["measures"] == ["c", "d", "e", "f"]
    assert res["config"]["conns"] == 50 and res["config"]["bytes"] == 400 << 10     # 400K: powers of 2
    assert "vm" not in res and "hostbus_veth" not in res
    assert res["hostbus_device_alive"] is True

    c = res["hostbus_software"]
    for path in ("offload", "software"):
        for d in ("send", "recv"):
            run = c["paths"][path][d]
            assert run["verified"] is True and run["error"] is None, run
            assert run["gbps"] > 0 and run["bytes"] == c["bytes"][path] and run["device_cpu_s"] >= 0
        assert c["paths"][path]["send_gbps"] > 0 and c["paths"][path]["recv_gbps"] > 0
    assert c["paths"]["offload"]["send"]["offloaded"] is True
    assert c["paths"]["offload"]["recv"]["offloaded"] is True
    assert c["ratios"]["offload_vs_software_send"] > 0 and c["ratios"]["offload_vs_software_recv"] > 0

    rr = res["rr"]["hostbus"]
    for path in ("offload", "software", "linux"):
        p = rr["paths"][path]
        assert p["verified"] is True and p["error"] is None, p
        assert p["transactions"] == 100 and p["tps"] > 0 and p["latency_us"]["median"] > 0
    assert rr["paths"]["offload"]["offloaded"] is True
    assert rr["paths"]["software"]["offloaded"] is False
    assert rr["ratios"]["offload_vs_software"] > 0 and rr["ratios"]["offload_vs_linux"] > 0

    b = res["bulk"]
    assert b["error"] is None, b
    assert b["connections"] == b["offloaded"] == b["queried"] == b["terminated"] == 50
    assert b["initiate_objects"] == 52             # one neighbour, one path, 50 connections
    for k in ("setup_software_s", "initiate_s", "query_s", "terminate_s"):
        assert b[k] > 0

    m = res["memory"]
    assert m["error"] is None and m["connections"] == 50
    assert m["rss_before_kib"] > 0 and m["rss_offloaded_kib"] > 0 and m["rss_after_terminate_kib"] > 0
    assert isinstance(m["bytes_per_connection"], float)

    goals = {g["goal"]: g for g in res["goals"]}
    assert set(goals) == {"hostbus_offload_vs_software_send", "hostbus_offload_vs_software_recv"}
    for g in goals.values():
        assert g["at_least"] == 20.0 and g["measured"] > 0 and isinstance(g["met"], bool)
    assert res["wall_s"] > 0


def test_baseline_reads_both_iperf3_reports_and_ratios():
    """Real iperf3's -J (pretty-printed, several lines) and chimney iperf3's (one line after
    other output) are both read; the ratios are offloaded / real iperf3 over virtio-net."""
    from chimney.bench import baseline
    real = {"end": {"sum_received": {"bytes": 500, "seconds": 2.0}}}
    assert baseline._report(json.dumps(real, indent="\t")) == real
    assert baseline._report("note\n" + json.dumps(real)) == real
    assert baseline._report("iperf3: error - unable to connect") is None
    runs = [{"path": "iperf3_offload", "direction": "send", "gbps": 3.0, "ok": True, "guest_cpu_s_per_gb": 1.0},
            {"path": "iperf3_offload", "direction": "recv", "gbps": 2.0, "ok": True, "guest_cpu_s_per_gb": 2.0},
            {"path": "iperf3_virtio", "direction": "send", "gbps": 1.5, "ok": True, "guest_cpu_s_per_gb": 4.0},
            {"path": "iperf3_virtio", "direction": "recv", "gbps": 0.5, "ok": False, "guest_cpu_s_per_gb": 8.0}]
    s = baseline.summarize(runs)
    assert s["ratios"]["offload_vs_iperf3_virtio_send"] == pytest.approx(2.0)
    assert s["ratios"]["offload_vs_iperf3_virtio_recv"] == pytest.approx(4.0)
    assert s["ratios"]["guest_cpu_per_gb_offload_vs_iperf3_virtio_send"] == pytest.approx(0.25)
    assert s["ratios"]["guest_cpu_per_gb_offload_vs_iperf3_virtio_recv"] == pytest.approx(0.25)
    assert s["paths"]["iperf3_offload"]["ok"] is True and s["paths"]["iperf3_virtio"]["ok"] is False
    assert s["paths"]["iperf3_virtio"]["guest_cpu_s_per_gb"] == {"send": 4.0, "recv": 8.0}


def test_vm_goals_are_against_real_iperf3():
    """Throughput goals are at-least, the guest CPU goal at-most (0.25 > 0.2: not met)."""
    res = {"measures": ["a"], "vm": {"iperf3": {"ratios": {
        "offload_vs_iperf3_virtio_send": 3.5, "offload_vs_iperf3_virtio_recv": 1.5,
        "guest_cpu_per_gb_offload_vs_iperf3_virtio_send": 0.1,
        "guest_cpu_per_gb_offload_vs_iperf3_virtio_recv": 0.25}}}}
    goals = {g["goal"]: g for g in suite.goals(res)}
    assert goals["vm_offload_vs_iperf3_virtio_send"]["met"] is True
    assert goals["vm_offload_vs_iperf3_virtio_send"]["at_least"] == 3.0
    assert goals["vm_offload_vs_iperf3_virtio_recv"]["met"] is False
    assert goals["vm_offload_vs_iperf3_virtio_recv"]["at_least"] == 2.0
    assert goals["vm_guest_cpu_per_gb_offload_vs_iperf3_virtio_send"]["met"] is True
    assert goals["vm_guest_cpu_per_gb_offload_vs_iperf3_virtio_recv"] == {
        "goal": "vm_guest_cpu_per_gb_offload_vs_iperf3_virtio_recv", "measure": "a", "at_most": 0.2,
        "measured": 0.25, "met": False,
        "what": "VM: guest CPU per GB offloaded <= 0.2x virtio-net's (receive)"}


@pytest.mark.vm
@pytest.mark.netns
@needs_root
def test_suite_vm_measure_a_json():
    """Measure a through the command line: one VM, real iperf3 over virtio-net beside
    chimney iperf3 offloaded (3 s each way), and the same-program chimney perf runs."""
    r = subprocess.run([sys.executable, "-m", "chimney.cli", "bench", "suite", "--only", "a", "--json",
                        "--vm-bytes", "2M", "--vm-software-bytes", "200K", "--seconds", "3", "--timeout", "120"],
                       capture_output=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    res = json.loads(r.stdout)
    assert res["measures"] == ["a"] and res["config"]["iperf3_seconds"] == 3
    v = res["vm"]
    assert v["device_alive"] is True
    base = v["iperf3"]
    assert base["seconds"] == 3 and set(base["paths"]) == {"iperf3_offload", "iperf3_virtio"}
    for name, p in base["paths"].items():
        assert p["ok"] is True and p["send_gbps"] > 0 and p["recv_gbps"] > 0, (name, p)
        for d in ("send", "recv"):
            run = p[d]
            assert run["error"] is None and run["bytes"] > 0 and run["seconds"] >= 2.5, (name, d, run)
            assert run["guest_cpu_s_per_gb"] > 0 and p["guest_cpu_s_per_gb"][d] == run["guest_cpu_s_per_gb"]
    off = base["paths"]["iperf3_offload"]
    for d in ("send", "recv"):
        assert off[d]["offloaded"] is True and off[d]["device_cpu_s_per_gb"] > 0
        assert base["paths"]["iperf3_virtio"][d]["device_cpu_s"] is None     # inside QEMU
    for k in ("offload_vs_iperf3_virtio_send", "offload_vs_iperf3_virtio_recv",
              "guest_cpu_per_gb_offload_vs_iperf3_virtio_send", "guest_cpu_per_gb_offload_vs_iperf3_virtio_recv"):
        assert base["ratios"][k] > 0, k
    assert base["ratios"]["offload_vs_iperf3_virtio_send"] == pytest.approx(
        off["send_gbps"] / base["paths"]["iperf3_virtio"]["send_gbps"])
    # the same-program comparisons stay
    assert set(v["paths"]) == {"offload", "software", "virtio"}
    for name, p in v["paths"].items():
        assert p["verified"] is True and p["send_gbps"] > 0 and p["recv_gbps"] > 0, (name, p)
    goals = {g["goal"]: g for g in res["goals"]}
    assert set(goals) == {"vm_offload_vs_iperf3_virtio_send", "vm_offload_vs_iperf3_virtio_recv",
                          "vm_guest_cpu_per_gb_offload_vs_iperf3_virtio_send",
                          "vm_guest_cpu_per_gb_offload_vs_iperf3_virtio_recv"}
    for g in goals.values():
        assert g["measured"] > 0 and isinstance(g["met"], bool)
