"""Shared by the VM transfer tests: `chimney perf` inside the guest against a
`chimney perf --stack linux` peer in the namespace, both as JSON."""
import json
import subprocess
import sys
import threading
import time

import pytest


def _json(text: bytes | str, what: str) -> dict:
    """The last line of a JSON-printing program's output."""
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    try:
        return json.loads(text.strip().splitlines()[-1])
    except (IndexError, ValueError):
        pytest.fail(f"{what}: no JSON:\n{text[-3000:]}")


def _finish(proc, timeout, what) -> tuple[bytes, bytes]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s:\n{err.decode(errors='replace')[-2000:]}")


def _linux_perf(peer, *args, port):
    return peer.popen(sys.executable, "-u", "-m", "chimney.guest.perf", *map(str, args), "--stack", "linux",
                      "--port", str(port), "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def guest_perf_client(vm, peer, port, guest_args: str, extra: str, nbytes: int, run_timeout: float):
    """The guest's perf client (guest_args: its bus/stack options; extra: e.g. -R)
    against a Linux perf server: (guest JSON, Linux JSON, wall seconds)."""
    srv = _linux_perf(peer, "server", "--once", "--accept-timeout", 60, port=port)
    t0 = time.monotonic()
    try:
        r = vm.run(f"python3 -m chimney.guest.perf client {peer.nic.peer4} --port {port} -n {nbytes} --json "
                   f"-i 0 {guest_args} --timeout {run_timeout} {extra}", timeout=run_timeout + 60)
    finally:
        out, err = _finish(srv, 60, "the Linux perf server")
    wall = time.monotonic() - t0
    guest = _json(r.stdout, "guest client") if r.stdout.strip() else {}
    assert r.rc == 0, (guest.get("error"), guest.get("summary"), guest.get("stack_stats"),
                       r.stderr.decode()[-3000:], out.decode()[-1500:], err.decode()[-1500:])
    assert srv.returncode == 0, err.decode()[-3000:]
    return guest, _json(out, "linux server"), wall


def guest_perf_server(vm, peer, port, guest_args: str, extra: str, nbytes: int, run_timeout: float):
    """The guest's perf server against a Linux perf client (extra: its options, e.g. -R)."""
    box = {}

    def guest():
        box["r"] = vm.run(f"python3 -m chimney.guest.perf server --once --json -i 0 {guest_args} "
                          f"--port {port} --accept-timeout 90", timeout=run_timeout + 120)
    th = threading.Thread(target=guest, daemon=True)
    t0 = time.monotonic()
    th.start()
    # the Linux client retries (connect timeout) until the guest listens
    cli = _linux_perf(peer, "client", peer.nic.guest4, "-n", nbytes, "-i", 0, "--connect-timeout", 90,
                      "--timeout", run_timeout, *extra.split(), port=port)
    out, err = _finish(cli, run_timeout + 120, "the Linux perf client")
    th.join(run_timeout + 120)
    wall = time.monotonic() - t0
    assert not th.is_alive()
    r = box["r"]
    assert cli.returncode == 0, (out.decode()[-2000:], err.decode()[-3000:])
    assert r.rc == 0, (r.stdout.decode()[-3000:], r.stderr.decode()[-3000:])
    return _json(r.stdout, "guest server"), _json(out, "linux client"), wall
