"""`chimney demo --json` end to end, as a user runs it: a subprocess that provisions
(nothing to do in CI after scripts/setup), boots its own VM with the chimney NIC and
virtio-net, runs 2 MB each way over the three paths (offloaded, host stack software
TCP, guest Linux over virtio-net), prints one JSON object on stdout and writes the
PNG plots.  Bounded: 2 MB per run, a hard timeout on the whole demo."""
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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    try:
        p = subprocess.run([sys.executable, "-m", "chimney.cli", "demo", "--json", "-n", str(NBYTES),
                            "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=420,
                           check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"chimney demo did not finish in 420 s:\n{(e.stderr or b'')[-3000:]}")
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    try:
        res = json.loads(p.stdout)          # one JSON object, nothing else on stdout
    except ValueError:
        pytest.fail(f"chimney demo --json: stdout is not one JSON object:\n{p.stdout[:3000]}")
    return res, out, p.stderr


def test_demo_json_has_three_verified_paths(demo):
    res, _, err = demo
    assert set(res["paths"]) == {"offload", "software", "virtio"}
    for name, p in res["paths"].items():
        assert p["send_gbps"] > 0 and p["recv_gbps"] > 0, (name, p, err[-2000:])
        assert p["verified"] is True, (name, p)
        for d in ("send", "recv"):
            assert p[d]["bytes"] == NBYTES and p[d]["error"] is None, (name, d, p[d])
    assert res["bytes_per_run"] == NBYTES and res["device_alive"] is True


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
