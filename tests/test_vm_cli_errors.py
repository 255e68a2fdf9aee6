"""`chimney vm` on bad input and missing things: one line on stderr, the
documented exit status (2 usage, 1 failure, 125 for `vm run`/`vm wait`
without a VM), never a traceback.  No VM boots here; a VM that is "up" is
faked with a state folder and a process standing in for its supervisor."""
import json
import os
import subprocess
import sys

import pytest

from chimney.host.netns import Netns


def _cli(*args, env, prefix=(), **kw):
    return subprocess.run([*prefix, sys.executable, "-m", "chimney.cli", "vm", *args], env=env, timeout=60,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)


def _one_line(r) -> str:
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "CHIMNEY_VM_DIR": str(tmp_path / "vms")}


@pytest.fixture
def fake_vm(tmp_path, env):
    """make(name, **state): a state folder whose supervisor looks alive."""
    procs = []

    def make(name, **state):
        # its command line names chimney.host.vmcli, as a real supervisor's does
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "chimney.host.vmcli"])
        procs.append(p)
        d = tmp_path / "vms" / name
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"supervisor_pid": p.pid, "owner_uid": os.getuid(),
                                                  "qmp_socket": str(d / "qmp.sock"), **state}))
        return d

    yield make
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("args, code, text", [
    ((), 2, "chimney vm: the following arguments are required"),
    (("run",), 2, "chimney vm run: no command (chimney vm run -- CMD...)"),
    (("run", "--name"), 2, "chimney vm run: argument --name: expected one argument"),
    (("run", "--name", "a b", "--", "true"), 2, "bad VM name 'a b'"),
    (("run", "--timeout", "0", "--", "true"), 2, "--timeout 0: must be positive"),
    (("run", "--name", "ghost", "--", "true"), 125, "chimney vm run: no VM 'ghost' is up (chimney vm up --name ghost)"),
    (("wait", "x"), 2, "chimney vm wait: bad job 'x'"),
    (("wait", "0"), 2, "job numbers start at 1"),
    (("wait", "3", "--name", "ghost"), 125, "no VM 'ghost' is up"),
    (("logs", "3", "--name", "ghost"), 1, "no VM 'ghost' is up"),
    (("kill", "3", "--signal", "NOPE"), 2, "chimney vm kill: bad signal 'NOPE'"),
    (("qmp", "query-status", "{bad"), 2, "chimney vm qmp: JSON-ARGS is not JSON"),
    (("qmp", "device_del", "[1]"), 2, "JSON-ARGS must be a JSON object"),
    (("qmp", "--name", "ghost", "query-status"), 1, "chimney vm qmp: no VM 'ghost' is up"),
    (("qmp",), 2, "the following arguments are required: CMD"),
    (("peer",), 2, "chimney vm peer: no command (chimney vm peer -- CMD...)"),
    (("peer", "--name", "ghost", "--", "ip", "addr"), 1, "chimney vm peer: no VM 'ghost' is up"),
    (("status", "--name", "ghost"), 3, "chimney vm status: no VM 'ghost'"),
    (("down", "--name", "ghost"), 1, "chimney vm down: no VM 'ghost'"),
    (("up", "--memory", "0", "--no-network"), 2, "chimney vm up: --memory 0: must be a positive number of MiB"),
    (("up", "--accel", "hvf"), 2, "argument --accel: invalid choice: 'hvf'"),
    (("up", "--nope"), 2, "chimney vm up: unrecognized arguments: --nope"),
    (("status", "extra"), 2, "chimney vm status: unrecognized arguments: extra"),
])
def test_bad_input_is_one_line_and_an_exit_status(env, args, code, text):
    r = _cli(*args, env=env)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert text in _one_line(r)
    assert r.stdout == ""


def test_errors_name_the_vms_that_are_up(env, fake_vm):
    fake_vm("alpha", netns=None)
    r = _cli("run", "--name", "ghost", "--", "true", env=env)
    assert r.returncode == 125 and "no VM 'ghost' is up; up: alpha (--name N)" in _one_line(r)


def test_up_needs_root_for_the_network(env):
    # without CAP_NET_ADMIN (as root: dropped from the bounding set, so exec does not get it)
    prefix = ("setpriv", "--bounding-set=-net_admin") if os.geteuid() == 0 else ()
    r = _cli("up", "--name", "noroot", env=env, prefix=prefix)
    assert r.returncode == 1
    assert "chimney vm up: needs root (CAP_NET_ADMIN)" in _one_line(r) and "--no-network" in r.stderr


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_peer_namespace_errors(env, fake_vm):
    fake_vm("nonet", netns=None)
    r = _cli("peer", "--name", "nonet", "--", "ip", "addr", env=env)
    assert r.returncode == 1 and "VM 'nonet' has no network namespace (it was started with --no-network)" in \
        _one_line(r)
    fake_vm("gone", netns="chimney-0-gone")
    r = _cli("peer", "--name", "gone", "--", "ip", "addr", env=env)
    assert r.returncode == 1 and "the namespace chimney-0-gone of VM 'gone' is gone" in _one_line(r)
    with Netns("clipeer") as ns:
        fake_vm("here", netns=ns.name)
        r = _cli("peer", "--name", "here", "--", "ip", "-br", "link", env=env)
        assert r.returncode == 0 and r.stdout.startswith("lo "), r.stderr
        r = _cli("peer", "--name", "here", "--", "no-such-program", env=env)
        assert r.returncode == 127 and "no-such-program: command not found" in _one_line(r)
        r = _cli("peer", "--name", "here", "--", "ip", "link", env=env, prefix=("setpriv", "--bounding-set=-sys_admin"))
        assert r.returncode == 1 and "needs root (CAP_SYS_ADMIN) for ip netns exec" in _one_line(r)


def test_down_all_stops_only_our_vms_and_keeps_the_pcap(tmp_path, env):
    root = tmp_path / "vms"
    for name, owner in (("mine", os.getuid()), ("theirs", 54321)):
        d = root / name
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"supervisor_pid": None, "owner_uid": owner}))
        (d / "wire.pcap").write_bytes(b"\xd4\xc3\xb2\xa1" + bytes(20))
    env = {**env, "SUDO_UID": ""}
    r = _cli("down", "--all", env=env)
    assert r.returncode == 0, r.stderr
    assert "not stopping VMs of other users: theirs of uid 54321" in _one_line(r)
    assert not (root / "mine").exists() and (root / "theirs" / "state.json").exists()
    saved = r.stdout.split("pcap and logs kept in ")[1].strip()
    assert open(os.path.join(saved, "wire.pcap"), "rb").read(4) == b"\xd4\xc3\xb2\xa1"
    r = _cli("down", "--all", "--yes", env=env)
    assert r.returncode == 0 and r.stdout.startswith("theirs: was not up") and not (root / "theirs").exists()
    assert _cli("status", env=env).stdout == "no VMs\n"  # the saved folder is no VM


@pytest.mark.skipif(os.geteuid() != 0, reason="drops a capability root has")
def test_device_without_tun_rights_says_needs_root(tmp_path):
    """The device's own log when it may not make its TAP, as `vm up` reports it."""
    from chimney.host.vm import device_reason
    log = tmp_path / "device.log"
    with open(log, "wb") as f:
        r = subprocess.run(["setpriv", "--bounding-set=-net_admin", sys.executable, "-m", "chimney.cli", "device",
                            "--socket", str(tmp_path / "nic.sock"), "--tap", "uxnotap0"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=60)
    assert r.returncode != 0
    assert device_reason(log).startswith("needs root (CAP_NET_ADMIN) for /dev/net/tun: "), log.read_text()[-2000:]


def test_ip_errors_say_when_root_is_needed():
    from chimney.host.netns import IpError
    prefix = ["setpriv", "--bounding-set=-net_admin,-sys_admin"] if os.geteuid() == 0 else []
    code = "from chimney.host.netns import Netns, IpError\ntry:\n    Netns('t')\nexcept IpError as e:\n    print(e)\n"
    r = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("needs root (CAP_NET_ADMIN): ip netns add chimney-"), r.stdout + r.stderr
    assert issubclass(IpError, subprocess.CalledProcessError)  # callers that catch that still do


def test_status_line_has_no_nones():
    """A VM without a network whose agent does not answer: every part says what it is."""
    from chimney.host.vmcli import _status_line
    line = _status_line({"name": "q", "up": True, "qemu": "running", "agent": "error: agent busy",
                         "device": "running", "nic_in_qemu": False})
    assert line == "q: up, QEMU running, agent error: agent busy, device running, NIC detached, no network"
    line = _status_line({"name": "q", "up": True, "qemu": "paused", "agent": "ok", "device": "running",
                         "nic_in_qemu": True, "netns": "chimney-1-vmq1", "guest_uptime_s": 12.4, "jobs": 2})
    assert line == ("q: up, QEMU paused, agent ok, device running, NIC attached, netns chimney-1-vmq1, "
                    "guest uptime 12 s, 2 jobs")
    assert _status_line({"name": "q", "up": False, "state": "supervisor gone"}) == "q: down (supervisor gone)"


def test_print_cmdline_starts_nothing_and_prints_what_vm_up_runs(tmp_path, env):
    """`vm up --print-cmdline`: the namespace, the device, the peer's addresses
    and the full QEMU command line (with the vIOMMU and the NIC on the device's
    socket), as commands; no state folder, namespace or process is made."""
    import argparse
    import shlex

    from chimney.device.main import add_arguments
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    r = _cli("up", "--name", "pc", "--print-cmdline", "--accel", "tcg", "--pci-id", "c41e:0a01",
             "--impair", "loss=1%", env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not (tmp_path / "vms").exists()
    assert (set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()) == before
    steps = [shlex.split(ln) for ln in r.stdout.splitlines() if ln and not ln.startswith("#")]
    d = str(tmp_path / "vms" / "pc")
    assert ["ip", "netns", "add", "chimney-vm-pc"] in steps
    assert ["ip", "-n", "chimney-vm-pc", "addr", "add", "10.199.0.1/24", "dev", "chim0"] in steps
    assert ["ip", "-n", "chimney-vm-pc", "addr", "add", "fd00:c41e::1/64", "dev", "chim0", "nodad"] in steps
    (device,) = [s for s in steps if s[1:4] == [sys.executable, "-m", "chimney.device"]]
    # this checkout's device, the one whose tree the guest mounts
    assert device[0] == f"PYTHONPATH={os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}"
    p = argparse.ArgumentParser()
    add_arguments(p)
    dev = p.parse_args(device[4:device.index(f">{d}/device.log")])
    assert (dev.socket, dev.tap, dev.netns, dev.pci_id, dev.impair) == \
        (f"{d}/nic.sock", "chim0", "chimney-vm-pc", "c41e:0a01", "loss=1%")
    (qemu,) = [s for s in steps if any(a.endswith("qemu-system-x86_64") for a in s)]
    assert qemu[0].startswith("QEMU_MODULE_DIR=") and qemu[1:5] == ["ip", "netns", "exec", "chimney-vm-pc"]
    devices = [qemu[i + 1] for i, a in enumerate(qemu) if a == "-device"]
    nic = [json.loads(x) for x in devices if x.startswith("{")]
    assert nic == [{"driver": "vfio-user-pci", "bus": "rp0", "id": "nic0",
                    "socket": {"type": "unix", "path": f"{d}/nic.sock"}}]
    # the vIOMMU comes before the devices it translates for
    assert devices.index("intel-iommu,caching-mode=on") < [x.startswith("{") for x in devices].index(True)
    assert qemu[qemu.index("-accel") + 1] == "tcg" and "share=on" in qemu[qemu.index("-object") + 1]
    assert "intel_iommu=on" in qemu[qemu.index("-append") + 1]
    assert steps.index(device) < steps.index(qemu)


@pytest.mark.parametrize("args, text", [
    (("--accel", "auto"), "--print-cmdline: --accel auto decides by booting a probe VM"),
    (("--pci-id", "1de5"), "--pci-id: '1de5' is not a PCI id VVVV:DDDD"),
])
def test_print_cmdline_errors(env, args, text):
    r = _cli("up", "--print-cmdline", *args, env=env)
    assert r.returncode == 2 and text in _one_line(r)
