"""`chimney vm` from the shell, against one VM brought up by `chimney vm up`
for the whole module: output streamed as the guest writes it, commands side
by side, detached jobs (wait / logs / kill), the agent's limit, peer, qmp,
status, down (pcap kept), and the errors of a VM that cannot boot."""
import itertools
import json
import os
import subprocess
import sys
import time

import pytest

from chimney.host.netns import NETNS_DIR

pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def _cli(*args, env, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "chimney.cli", "vm", *args], env=env, timeout=timeout,
                          capture_output=True, **kw)


def _popen(*args, env):
    return subprocess.Popen([sys.executable, "-m", "chimney.cli", "vm", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _one_line(err: bytes) -> str:
    text = err.decode()
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


class CliVm:
    def __init__(self, root):
        self.name = f"cli{os.getpid()}"
        self.root = root
        self.env = {**os.environ, "CHIMNEY_VM_DIR": str(root)}

    def __call__(self, *args, **kw):
        return _cli(*args, "--name", self.name, env=self.env, **kw) if args[0] not in ("run", "peer") else \
            _cli(args[0], "--name", self.name, *args[1:], env=self.env, **kw)

    def popen(self, *args):
        return _popen(args[0], "--name", self.name, *args[1:], env=self.env)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    c = CliVm(tmp_path_factory.mktemp("vms"))
    up = c("up", "--json")
    assert up.returncode == 0, up.stderr.decode()
    c.info = json.loads(up.stdout)
    # the phases went to stderr as they happened
    for phase in ("network namespace", "NIC device process", "QEMU", "guest agent"):
        assert phase in up.stderr.decode(), up.stderr.decode()
    try:
        yield c
    finally:
        c("down", timeout=120)


def test_run_exit_status_bytes_stdin_timeout(cli):
    import hashlib
    assert cli("run", "--", "false").returncode != 0
    assert cli("run", "--", "true").returncode == 0
    assert cli("run", "--", "sh", "-c", "exit 3").returncode == 3
    out = cli("run", "--", "sh", "-c", "head -c 65536 /dev/urandom > /tmp/r; sha256sum < /tmp/r >&2; cat /tmp/r")
    assert out.returncode == 0 and len(out.stdout) == 65536
    assert out.stderr.split()[0].decode() == hashlib.sha256(out.stdout).hexdigest()
    raw = cli("run", "--", "head", "-c", "65536", "/dev/urandom")
    assert raw.returncode == 0 and len(raw.stdout) == 65536 and raw.stderr == b""
    t = cli("run", "--timeout", "1", "--", "sleep", "60")
    assert t.returncode == 124 and b"timed out" in t.stderr
    piped = cli("run", "--stdin", "--", "tr", "a-z", "A-Z", input=b"abc\xff")
    assert piped.stdout == b"ABC\xff"
    assert cli("run", "--", "/no/such/program").returncode == 127
    status = json.loads(cli("status", "--json").stdout)
    assert status["qemu"] == "running" and status["agent"] == "ok" and status["nic_in_qemu"] is True


def test_run_streams_output_as_the_guest_writes_it(cli):
    """A command printing a line a second: each line reaches us while the
    command still runs.  The command waits for our acknowledgement of each
    line (a file we make in the guest with a second `vm run`) before it
    prints the next, so it can only finish if every line arrived on its own."""
    script = ("for i in 1 2 3; do echo \"line $i $(cut -d' ' -f1 /proc/uptime)\"; n=0; "
              "while [ ! -e /tmp/ack-$i ]; do sleep 0.1; n=$((n+1)); [ $n -gt 600 ] && exit 1; done; "
              "sleep 1; done")
    proc = cli.popen("run", "--", "sh", "-c", script)
    seen = []
    try:
        for i in (1, 2, 3):
            line = proc.stdout.readline().decode()
            seen.append((time.monotonic(), line))
            assert line.startswith(f"line {i} "), (seen, proc.stderr.read() if not line else b"")
            assert cli("run", "--", "touch", f"/tmp/ack-{i}").returncode == 0
        assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    guest_times = [float(line.split()[2]) for _, line in seen]
    host_times = [t for t, _ in seen]
    # printed at least a second apart in the guest, and seen here in that order, one by one
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(guest_times)), seen
    assert host_times == sorted(host_times), seen


def test_two_commands_run_at_once(cli):
    """A waits for a file that only B makes: A ends well only if B ran while A was running."""
    a = cli.popen("run", "--timeout", "120", "--", "sh", "-c",
                  "echo A waits; until [ -e /tmp/b-ran ]; do sleep 0.1; done; echo A saw B")
    try:
        assert a.stdout.readline() == b"A waits\n"  # A runs: B starts only now
        b = cli("run", "--", "sh", "-c", "touch /tmp/b-ran; echo B ran")
        assert b.returncode == 0 and b.stdout == b"B ran\n", b.stderr
        assert a.wait(120) == 0
        assert a.stdout.read() == b"A saw B\n"
    finally:
        a.kill()
        a.wait()


def test_detached_server_and_client_wait_logs_kill(cli):
    server = cli("run", "--detach", "--", "sh", "-c",
                 "echo listening; until [ -e /tmp/stop-server ]; do sleep 0.1; done; echo stopping >&2; exit 5")
    assert server.returncode == 0, server.stderr
    job = server.stdout.decode().strip()
    assert job.isdigit(), server.stdout
    deadline = time.monotonic() + 60
    while (logs := cli("logs", job)).stdout != b"listening\n":
        assert logs.returncode == 0 and time.monotonic() < deadline, logs
        time.sleep(0.2)
    jobs = cli("jobs", "--json")
    mine = [j for j in json.loads(jobs.stdout) if str(j["job"]) == job]
    assert mine and mine[0]["running"], jobs.stdout
    # the client, while the server runs
    assert cli("run", "--", "touch", "/tmp/stop-server").returncode == 0
    assert cli("wait", job).returncode == 5
    logs = cli("logs", job)
    assert (logs.returncode, logs.stdout, logs.stderr) == (0, b"listening\n", b"stopping\n")
    assert cli("logs", job, "--follow").stdout == b"listening\n"  # ended: --follow returns at once

    sleeper = cli("run", "-d", "--", "sh", "-c", "echo sleeping; exec sleep 300").stdout.decode().strip()
    assert cli("kill", sleeper).returncode == 0
    assert cli("wait", sleeper, "--timeout", "60").returncode == 128 + 15  # SIGTERM
    assert cli("logs", sleeper).stdout == b"sleeping\n"
    gone = cli("wait", "99999")
    assert gone.returncode == 125 and "no job 99999" in _one_line(gone.stderr)


def test_agent_limit_is_a_clear_error(cli):
    from chimney.guest.agent import MAX_RUNNING
    jobs = []
    try:
        for _ in range(MAX_RUNNING):
            r = cli("run", "-d", "--", "sleep", "300")
            assert r.returncode == 0, r.stderr
            jobs.append(r.stdout.decode().strip())
        busy = cli("run", "--", "true", timeout=60)
        assert busy.returncode == 125
        assert "agent busy" in _one_line(busy.stderr) and str(MAX_RUNNING) in busy.stderr.decode()
    finally:
        for j in jobs:
            cli("kill", j, "--signal", "KILL")
    for j in jobs:
        assert cli("wait", j).returncode == 128 + 9
    assert cli("run", "--", "true").returncode == 0


def test_peer_qmp_status(cli):
    peer = cli("peer", "--", "ip", "-br", "addr")
    assert peer.returncode == 0 and b"10.199.0.1/24" in peer.stdout, peer.stderr
    assert cli("peer", "--", "sh", "-c", "exit 6").returncode == 6
    q = cli("qmp", "query-status")
    assert q.returncode == 0 and json.loads(q.stdout)["status"] == "running"
    pci = json.loads(cli("qmp", "query-pci").stdout)
    assert pci and "devices" in pci[0]
    bad = cli("qmp", "device_del", '{"id": "no-such-device"}')
    assert bad.returncode == 1 and "DeviceNotFound" in _one_line(bad.stderr)
    st = cli("status")
    assert st.returncode == 0 and b"None" not in st.stdout and b"agent ok" in st.stdout, st.stdout
    status = json.loads(cli("status", "--json").stdout)
    assert None not in status.values() and status["agent"] == "ok", status


def test_errors_name_the_vms_that_are_up(cli):
    r = _cli("run", "--name", "nosuchvm", "--", "true", env=cli.env)
    assert r.returncode == 125 and f"up: {cli.name}" in _one_line(r.stderr)
    r = _cli("qmp", "--name", "nosuchvm", "query-status", env=cli.env)
    assert r.returncode == 1 and "no VM 'nosuchvm' is up" in _one_line(r.stderr)
    r = cli("up")
    assert r.returncode == 1 and "already up" in r.stderr.decode().splitlines()[-1]


def test_up_failure_says_why(cli):
    """QEMU refuses the guest's initrd in 64 MiB: `vm up` says so in one line."""
    r = _cli("up", "--name", "tiny", "--no-network", "--memory", "64", env=cli.env, timeout=120)
    assert r.returncode == 1
    last = r.stderr.decode().strip().splitlines()[-1]
    assert "initrd too large for --memory 64" in last and "Traceback" not in r.stderr.decode(), r.stderr
    _cli("down", "--name", "tiny", env=cli.env)


def test_down_keeps_the_pcap(cli):
    """Last in the module: the module's VM goes down; its pcap stays."""
    down = cli("down", timeout=120)
    assert down.returncode == 0, down.stderr
    out = down.stdout.decode()
    assert "powerdown" in out and "pcap and logs kept in " in out, out
    saved = out.split("kept in ")[1].strip()
    assert os.path.isfile(os.path.join(saved, "wire.pcap")) and os.path.getsize(os.path.join(saved, "wire.pcap")) > 0
    assert not os.path.exists(os.path.join(NETNS_DIR, cli.info["netns"]))
    assert not (cli.root / cli.name).exists()
    for pid in (cli.info["qemu_pid"], cli.info["device_pid"], cli.info["supervisor_pid"]):
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert cli("run", "--", "true").returncode == 125
