"""pytest plugin: a VM with the NIC for tests (``pytest_plugins = ["chimney.host.harness"]``).

Fixtures:

``vm`` (module scope)
    A booted :class:`~chimney.host.vm.Vm`: device + network namespace with the
    Linux peer + QEMU (TCG unless $CHIMNEY_ACCEL says otherwise), one boot per
    test module.  ``vm.run(cmd)``, ``vm.python(code)``, ``vm.qmp(...)``,
    ``vm.unplug_nic()``... A module can set ``VM_OPTIONS = {...}`` (keyword
    arguments of Vm, e.g. ``{"virtio_net": False}``).  Skipped without root.
``peer`` (module scope)
    The Linux peer (:class:`~chimney.host.vm.Peer`): ``peer.netns`` (run
    commands with ``peer.run(...)``), ``peer.nic`` / ``peer.nic_if`` (the
    NIC's wire, 10.199.0.0/24), ``peer.vnet`` / ``peer.vnet_if`` (virtio-net,
    10.199.1.0/24).
``vm_factory`` (function scope)
    ``vm_factory(**options)`` boots another VM (side by side), closed after
    the test.

When a test using a VM fails, the VM's serial log, device log, pcap of the
wire, QEMU log and command log are copied to ``artifacts/<test>/`` (under the
rootdir; ``--chimney-artifacts DIR`` or $CHIMNEY_ARTIFACTS to change), while
the VM still runs; a boot that fails leaves them in ``artifacts/<module>-boot/``.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from chimney.host.vm import Peer, Vm

def pytest_addoption(parser):
    parser.addoption("--chimney-artifacts", default=None,
                     help="where failed VM tests leave their logs (default: <rootdir>/artifacts)")


def artifacts_root(config) -> Path:
    opt = config.getoption("--chimney-artifacts", default=None) or os.environ.get("CHIMNEY_ARTIFACTS")
    return Path(opt) if opt else Path(config.rootpath) / "artifacts"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:150]


def _vms_of(item) -> list[Vm]:
    found: list[Vm] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Vm):
            cands = [value]
        elif isinstance(value, Peer):
            cands = [getattr(value, "vm", None)]
        elif isinstance(value, _Factory):
            cands = list(value.vms)
        else:
            cands = []
        for v in cands:
            if v is not None and v not in found:
                found.append(v)
    return found


def save_artifacts(vms: list[Vm], dest: Path) -> list[Path]:
    copied = []
    for vm in vms:
        d = dest if len(vms) == 1 else dest / _slug(vm.name)
        try:
            copied += vm.save_artifacts(d)
        except OSError:
            pass
    return copied


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    vms = _vms_of(item)
    if not vms:
        return
    dest = artifacts_root(item.config) / _slug(item.nodeid.replace("::", "-").replace("/", "-"))
    if rep.when != "call":
        dest = dest.with_name(dest.name + f"-{rep.when}")
    copied = save_artifacts(vms, dest)
    if copied:
        rep.sections.append(("chimney VM artifacts", f"{dest}: " + ", ".join(p.name for p in copied)))


def _boot(request, name_hint: str, **options) -> Vm:
    if os.geteuid() != 0:
        pytest.skip("VM tests need root (network namespaces, TAP)")
    workdir = tempfile.mkdtemp(prefix="chimney-vm-")
    vm = Vm(workdir=workdir, remove_workdir=True, **options)
    try:
        vm.start()
    except Exception:
        dest = artifacts_root(request.config) / f"{_slug(name_hint)}-boot"
        save_artifacts([vm], dest)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return vm


@pytest.fixture(scope="module")
def vm(request):
    """A booted VM with the NIC (one per test module)."""
    options = dict(getattr(request.module, "VM_OPTIONS", {}))
    machine = _boot(request, request.module.__name__, **options)
    try:
        yield machine
    finally:
        machine.close()


@pytest.fixture(scope="module")
def peer(vm) -> Peer:
    """The Linux peer of the module's VM (network namespace + addresses)."""
    if vm.peer is None:
        pytest.skip("this VM has no network namespace")
    return vm.peer


class _Factory:
    def __init__(self, request):
        self.request = request
        self.vms: list[Vm] = []

    def __call__(self, **options) -> Vm:
        machine = _boot(self.request, self.request.node.nodeid, **options)
        self.vms.append(machine)
        return machine

    def close(self) -> None:
        for machine in self.vms:
            machine.close()


@pytest.fixture
def vm_factory(request):
    """Boot more VMs in a test: ``vm_factory(**Vm options)``; closed afterwards."""
    factory = _Factory(request)
    try:
        yield factory
    finally:
        factory.close()
