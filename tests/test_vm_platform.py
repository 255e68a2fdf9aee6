"""The VM platform: a long-running VM with the NIC, driven through the guest
agent (virtio-serial) and QMP, with the Linux peer in a network namespace.
One boot for the module (the `vm` fixture of chimney.host.harness), one more
for the kill test (the CLI has tests/test_vm_cli.py)."""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from chimney.host.netns import NETNS_DIR
from chimney.host.agent import CommandTimeout
from chimney.host.vm import PCI_ID

pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def test_boot_figures(vm):
    boot = vm.boots[0]
    assert boot["accel"] in ("tcg", "kvm")
    # under TCG about 8-12 s on a busy 2-core host
    assert boot["agent_ready_s"] < 120, boot


def test_exit_status(vm):
    assert vm.run("true").rc == 0
    assert vm.run("false").rc != 0
    assert vm.run("exit 7").rc == 7
    assert vm.run(["sh", "-c", "exit 201"]).rc == 201
    assert vm.run(["/no/such/program"]).rc == 127
    assert vm.run("kill -9 $$").rc == 128 + 9


def test_stdout_is_byte_exact(vm):
    res = vm.run("head -c 65536 /dev/urandom > /tmp/r && sha256sum < /tmp/r >&2 && cat /tmp/r")
    assert res.rc == 0
    assert len(res.stdout) == 65536
    assert res.stderr.split()[0].decode() == hashlib.sha256(res.stdout).hexdigest()
    every = vm.python("import sys; sys.stdout.buffer.write(bytes(range(256)) * 4 + b'\\r\\n\\0')")
    assert every.stdout == bytes(range(256)) * 4 + b"\r\n\0"


def test_stderr_is_separate(vm):
    res = vm.run("printf 'to out'; printf 'to err\\377' >&2; printf ' again'")
    assert res == (0, b"to out again", b"to err\xff")


def test_stdin(vm):
    data = os.urandom(10000)
    res = vm.run("sha256sum", input=data)
    assert res.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert vm.run("cat").stdout == b""  # /dev/null without input


def test_timeout_kills_the_process_group(vm):
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as err:
        vm.run("echo started; sleep 300 & sleep 301; echo never", timeout=2)
    assert time.monotonic() - t0 < 20
    assert err.value.stdout == b"started\n"
    # both sleeps are gone, and the agent takes the next command
    assert vm.run("pgrep -x sleep").rc == 1


def test_commands_in_sequence(vm):
    outs = [vm.run(f"echo {i}").stdout for i in range(20)]
    assert outs == [f"{i}\n".encode() for i in range(20)]


def test_guest_python_sees_the_checkout(vm):
    res = vm.python("import sys, chimney.hw as hw; print(sys.version_info[:2], hex(hw.PCI_DEVICE_ID))")
    assert res.rc == 0, res.stderr
    assert res.stdout.decode().split(")")[0] == "(3, 13"
    res = vm.python("raise SystemExit('boom')")
    assert res.rc == 1 and b"boom" in res.stderr


def test_qmp_status_and_query_pci(vm):
    assert vm.status() == "running"
    nic = [d for d in vm.pci_devices() if d.get("qdev_id") == "nic0"]
    assert len(nic) == 1 and nic[0]["id"]["vendor"] == 0x1DE5 and nic[0]["id"]["device"] == 0xC41E
    assert any(d.get("qdev_id") == "vnet0" for d in vm.pci_devices())


def test_guest_lists_the_nic(vm):
    assert "Ethernet controller" in vm.guest_lspci()


def test_peer_namespace(vm, peer):
    assert os.path.exists(os.path.join(NETNS_DIR, peer.name))
    addrs = peer.run("ip", "-br", "addr").stdout
    assert peer.nic.peer4 in addrs and peer.vnet.peer4 in addrs, addrs


def test_virtio_net_reaches_the_peer(vm, peer):
    """UDP echo between the guest's virtio-net and the peer in the namespace."""
    server = peer.popen(sys.executable, "-c", (
        "import socket, sys\n"
        f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{peer.vnet.peer4}', 7777))\n"
        "print('ready', flush=True)\n"
        "data, addr = s.recvfrom(2048); s.sendto(data[::-1], addr); print(addr[0], flush=True)\n"),
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        res = vm.python(
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)\n"
            f"s.sendto(b'chimney', ('{peer.vnet.peer4}', 7777)); print(s.recvfrom(100)[0].decode())\n")
        assert res.stdout == b"yenmihc\n", res.stderr
        assert server.stdout.readline().strip() == peer.vnet.guest4
    finally:
        server.kill()
        server.wait()


def _miniport_pings(vm, peer) -> dict:
    """The guest's miniport (VFIO bus) ARPs for and pings the Linux peer."""
    r = vm.run(f"python3 -m chimney.guest.selftest arp-ping --peer {peer.nic.peer4} "
               f"--ip {peer.nic.guest4} --count 3 --json", timeout=120)
    out = json.loads(r.stdout)
    assert r.rc == 0 and out["ok"], out
    assert out["ping"]["received"] == 3 and out["irq"]["device_interrupts"] > 0
    return out


def test_hot_unplug_and_replug(vm, peer):
    """device_del through QMP: the guest releases the NIC (DEVICE_DELETED),
    lspci no longer lists it, the device process stays and sees its client
    go; device_add brings it back on the same socket, and the miniport in
    the guest works again."""
    _miniport_pings(vm, peer)
    log_before = vm.device.log_text()
    sessions = log_before.count("client attached")
    event = vm.unplug_nic(timeout=60)
    assert event["data"]["device"] == "nic0"
    assert vm.run(f"lspci -n -d {PCI_ID}").stdout == b""
    assert not vm.nic_in_qemu()
    deadline = time.monotonic() + 10
    while "client detached" not in vm.device.log_text()[len(log_before):] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm.device.alive
    assert "client detached" in vm.device.log_text()[len(log_before):]

    vm.plug_nic()
    vm.wait_nic_in_guest(present=True, timeout=30)
    assert "Ethernet controller" in vm.guest_lspci()
    assert vm.nic_in_qemu()
    assert vm.device.log_text().count("client attached") == sessions + 1
    assert vm.status() == "running"
    _miniport_pings(vm, peer)


def test_jobs_run_side_by_side(vm):
    """vm.start(): A waits for a file that only B makes, so A ends well only
    if B ran while A was running; A's first line arrives while it still runs."""
    a = vm.start("echo A waits; n=0; until [ -e /tmp/api-b ]; do sleep 0.1; n=$((n+1)); "
                 "[ $n -gt 600 ] && exit 1; done; echo A saw B", timeout=120)
    first = b""
    deadline = time.monotonic() + 60
    while b"\n" not in first:
        assert time.monotonic() < deadline and not a.done, (first, a)
        first += b"".join(data for stream, data in a.poll(1.0) if stream == "stdout")
    assert first == b"A waits\n" and a.rc is None
    assert vm.run("touch /tmp/api-b; echo B").stdout == b"B\n"
    assert a.wait(120) == (0, b"A waits\nA saw B\n", b"")


def test_run_from_threads_at_once(vm):
    """Vm.run from two threads: both wait on a common barrier in the guest."""
    import threading
    results = {}

    def side(me, other):
        results[me] = vm.run(f"touch /tmp/thr-{me}; n=0; until [ -e /tmp/thr-{other} ]; do sleep 0.1; "
                             f"n=$((n+1)); [ $n -gt 600 ] && exit 1; done; echo {me}", timeout=120)

    threads = [threading.Thread(target=side, args=(x, y)) for x, y in (("x", "y"), ("y", "x"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == {"x": (0, b"x\n", b""), "y": (0, b"y\n", b"")}


def test_job_kill_timeout_and_chunks(vm):
    job = vm.start("echo up; exec sleep 300")
    deadline = time.monotonic() + 60
    while job.stdout != b"up\n":  # it runs: now kill it
        assert time.monotonic() < deadline and not job.done, job
        job.poll(1.0)
    job.kill()
    assert job.wait(60) == (128 + 9, b"up\n", b"")
    chunks = list(vm.start("printf a; sleep 0.5; printf b >&2; sleep 0.5; printf c").chunks())
    assert b"".join(d for s, d in chunks if s == "stdout") == b"ac"
    assert b"".join(d for s, d in chunks if s == "stderr") == b"b"
    with pytest.raises(CommandTimeout) as err:
        vm.start("echo so far; sleep 300", timeout=1).wait(60)
    assert err.value.stdout == b"so far\n"
    missing = vm.start(["/no/such/program"])
    assert missing.done and missing.wait().rc == 127


def test_killed_qemu_leaves_the_device_ready_for_the_next_vm(vm):
    """kill -9 QEMU; the device process notices, resets, and the next VM
    (a new QEMU against the same device process) sees the NIC."""
    device_pid = vm.device.proc.pid
    log_before = len(vm.device.log_text())
    vm.kill_qemu()
    deadline = time.monotonic() + 10
    while "device reset for the next client" not in vm.device.log_text()[log_before:]:
        assert time.monotonic() < deadline, vm.device.log_text()[-2000:]
        time.sleep(0.1)
    assert vm.device.alive
    vm.boot()
    assert vm.device.proc.pid == device_pid
    assert "Ethernet controller" in vm.guest_lspci()
    assert vm.run("echo back").stdout == b"back\n"
    assert "Traceback" not in vm.device.log_text()
