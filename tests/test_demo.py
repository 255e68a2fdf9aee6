"""`chimney demo --json` end to end, as a user runs it: a subprocess that provisions
(nothing to do in CI after scripts/setup), boots its own VM with the chimney NIC and
virtio-net, runs 2 MB each way over the three paths (offloaded, host stack software
TCP, guest Linux over virtio-net), then the real baseline (chimney iperf3 offloaded
beside real iperf3 over virtio-net, 3 s each way), prints one JSON object on stdout
and writes the PNG plots.  Bounded: 2 MB or 3 s per run, a hard timeout on the
whole demo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (namespaces, TAP)")]

REPO = Path(__file__).resolve().parent.parent
NBYTES = 2_000_000
SECONDS = 3
PERF_PATHS = {"offload", "software", "virtio"}
IPERF3_PATHS = {"iperf3_offload", "iperf3_virtio"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    try:
        p = subprocess.run([sys.executable, "-m", "chimney.cli", "demo", "--json", "-n", str(NBYTES),
                            "--seconds", str(SECONDS), "--out", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"chimney demo did not finish in 600 s:\n{(e.stderr or b'')[-3000:]}")
    if p.returncode != 0:
        try:                                # which run failed, and why
            why = {n: (x.get("verified"), x.get("ok"), x.get("send", {}).get("error"), x.get("recv", {}).get("error"))
                   for n, x in json.loads(p.stdout)["paths"].items()}
        except (ValueError, KeyError, AttributeError):
            why = p.stdout[-3000:]
        pytest.fail(f"chimney demo exit {p.returncode}: {why}\n{p.stderr[-3000:]}")
    try:
        res = json.loads(p.stdout)          # one JSON object, nothing else on stdout
    except ValueError:
        pytest.fail(f"chimney demo --json: stdout is not one JSON object:\n{p.stdout[:3000]}")
    return res, out, p.stderr


def test_demo_json_has_three_verified_paths(demo):
    res, _, err = demo
    assert set(res["paths"]) == PERF_PATHS | IPERF3_PATHS
    for name in PERF_PATHS:
        p = res["paths"][name]
        assert p["send_gbps"] > 0 and p["recv_gbps"] > 0, (name, p, err[-2000:])
        assert p["verified"] is True, (name, p)
        for d in ("send", "recv"):
            assert p[d]["bytes"] == NBYTES and p[d]["error"] is None, (name, d, p[d])
    assert res["bytes_per_run"] == NBYTES and res["device_alive"] is True


def test_demo_real_iperf3_baseline(demo):
    """chimney iperf3 offloaded beside real iperf3 over virtio-net, both directions, with
    guest CPU per GB for both and device CPU per GB for the chimney NIC."""
    res, _, err = demo
    assert res["iperf3_seconds"] == SECONDS
    for name in IPERF3_PATHS:
        p = res["paths"][name]
        assert p["ok"] is True and p["verified"] is None, (name, p, err[-2000:])
        assert p["send_gbps"] > 0 and p["recv_gbps"] > 0, (name, p)
        for d in ("send", "recv"):
            assert p[d]["error"] is None and p[d]["bytes"] > 0 and p[d]["seconds"] >= SECONDS - 0.5, (name, d)
            assert p["guest_cpu_s_per_gb"][d] > 0 and p["guest_cpu_s_per_gb"][d] == p[d]["guest_cpu_s_per_gb"]
            assert p[d]["intervals"] and all(mbps >= 0 for _, mbps in p[d]["intervals"]), (name, d)
            # the whole guest's CPU holds the client's own (busy ticks alone missed a vCPU held in
            # device accesses: 1.5 s for the guest against 2.1 s for chimney iperf3 alone)
            assert p[d]["guest_cpu_s"] >= p[d]["process_cpu_s"] - 0.05, (name, d, p[d])
    off, real = res["paths"]["iperf3_offload"], res["paths"]["iperf3_virtio"]
    for d in ("send", "recv"):
        assert off[d]["offloaded"] is True and off["device_cpu_s_per_gb"][d] > 0
        assert real["device_cpu_s_per_gb"][d] is None       # virtio-net's device work is in QEMU
        r = res["ratios"][f"offload_vs_iperf3_virtio_{d}"]
        assert r == pytest.approx(off[f"{d}_gbps"] / real[f"{d}_gbps"])
        c = res["ratios"][f"guest_cpu_per_gb_offload_vs_iperf3_virtio_{d}"]
        assert c == pytest.approx(off["guest_cpu_s_per_gb"][d] / real["guest_cpu_s_per_gb"][d])


def test_demo_ratios(demo):
    res, _, _ = demo
    ratios = res["ratios"]
    for a, b in (("offload", "virtio"), ("offload", "software"), ("software", "virtio")):
        for d in ("send", "recv"):
            r = ratios[f"{a}_vs_{b}_{d}"]
            assert isinstance(r, float) and r > 0, (a, b, d, r)
            assert r == pytest.approx(res["paths"][a][f"{d}_gbps"] / res["paths"][b][f"{d}_gbps"])


def test_demo_plots(demo):
    res, out, _ = demo
    assert "plot_error" not in res, res.get("plot_error")
    files = [Path(f) for f in res["plots"]]
    assert out / "throughput.png" in files
    assert any(f.name.startswith("offload-") and f.name.endswith("-cwnd-srtt.png") for f in files), files
    for f in files:
        assert f.parent == out and f.exists() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\ndemo: {json.dumps(res['ratios'])}")
