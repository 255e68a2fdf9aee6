"""Issue 4, "done when", in the VM: chimney perf on our host stack inside the
guest (the miniport on Linux VFIO behind the vIOMMU, --bus vfio) moves
100 MB to and from the Linux peer in the namespace, the guest as client
and as server, sha256-verified at both ends.  One boot for the module;
every run bounded in bytes and by a hard timeout.  Figures are printed
(run with -s)."""
import json
import subprocess
import sys
import threading
import time

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.netns]

VM_OPTIONS = {"virtio_net": False}
NBYTES = 100_000_000
RUN_TIMEOUT = 300           # seconds for one 100 MB run in the guest (TCG)


def _json(text: bytes | str, what: str) -> dict:
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    try:
        return json.loads(text.strip().splitlines()[-1])
    except (IndexError, ValueError):
        pytest.fail(f"{what}: no JSON:\n{text[-3000:]}")


def _linux(peer, *args, port):
    return peer.popen(sys.executable, "-u", "-m", "chimney.guest.perf", *map(str, args), "--stack", "linux",
                      "--port", str(port), "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc, timeout) -> tuple[bytes, bytes]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"Linux peer did not finish in {timeout} s:\n{err.decode()[-2000:]}")


def run_guest_client(vm, peer, reverse: bool, port: int):
    srv = _linux(peer, "server", "--once", "--accept-timeout", 60, port=port)
    t0 = time.monotonic()
    try:
        r = vm.run(f"python3 -m chimney.guest.perf client {peer.nic.peer4} --port {port} -n {NBYTES} --json "
                   f"-i 0 --bus vfio --timeout {RUN_TIMEOUT} {'-R' if reverse else ''}", timeout=RUN_TIMEOUT + 60)
    finally:
        out, err = _finish(srv, 60)
    wall = time.monotonic() - t0
    assert r.rc == 0, (r.stdout.decode()[-3000:], r.stderr.decode()[-3000:])
    assert srv.returncode == 0, err.decode()[-3000:]
    return _json(r.stdout, "guest client"), _json(out, "linux server"), wall


def run_guest_server(vm, peer, reverse: bool, port: int):
    box = {}

    def guest():
        box["r"] = vm.run(f"python3 -m chimney.guest.perf server --once --json -i 0 --bus vfio --port {port} "
                          f"--accept-timeout 90", timeout=RUN_TIMEOUT + 120)
    th = threading.Thread(target=guest, daemon=True)
    t0 = time.monotonic()
    th.start()
    # the client retries (connect timeout) until the guest listens
    cli = _linux(peer, "client", peer.nic.guest4, "-n", NBYTES, "-i", 0, "--connect-timeout", 90,
                 "--timeout", RUN_TIMEOUT, *(["-R"] if reverse else []), port=port)
    out, err = _finish(cli, RUN_TIMEOUT + 120)
    th.join(RUN_TIMEOUT + 120)
    wall = time.monotonic() - t0
    assert not th.is_alive()
    r = box["r"]
    assert cli.returncode == 0, (out.decode()[-2000:], err.decode()[-3000:])
    assert r.rc == 0, (r.stdout.decode()[-3000:], r.stderr.decode()[-3000:])
    return _json(r.stdout, "guest server"), _json(out, "linux client"), wall


def check(guest: dict, linux: dict) -> None:
    assert guest["stack"] == "chimney" and linux["stack"] == "linux"
    for res in (guest, linux):
        assert res["error"] is None, res["error"]
        assert res["verified"] is True
        s = res["summary"]["streams"][0]
        assert s["sender"]["bytes"] == s["receiver"]["bytes"] == NBYTES
        assert s["sender"]["sha256"] == s["receiver"]["sha256"]
    assert guest["summary"]["streams"][0]["sender"]["sha256"] == linux["summary"]["streams"][0]["sender"]["sha256"]
    tcp = guest["stack_stats"]["tcp"]
    assert tcp.get("tcp_internal_error", 0) == 0 and tcp.get("tx_errors", 0) == 0
    assert guest["stack_stats"]["iface"].get("drop_internal_error", 0) == 0


CASES = [("client", False), ("client", True), ("server", False), ("server", True)]


@pytest.mark.parametrize("role,reverse", CASES,
                         ids=["guest-client-sends", "guest-client-receives",
                              "guest-server-receives", "guest-server-sends"])
def test_100mb_in_vm(vm, peer, role, reverse):
    port = 7201 + CASES.index((role, reverse))
    run = run_guest_client if role == "client" else run_guest_server
    guest, linux, wall = run(vm, peer, reverse, port)
    check(guest, linux)
    assert guest["role"] == role
    sends = (role == "client") != reverse
    s = guest["summary"]["sum"]["receiver"]
    print(f"\nVM, guest {role}, {'guest sends' if sends else 'guest receives'}: {s['bytes'] / 1e6:.0f} MB "
          f"verified, receiver {s['mbps']:.1f} Mbit/s, {wall:.1f} s wall")
