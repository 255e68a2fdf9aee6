"""pytest plugin: a VM with the NIC for tests.

Loaded by the ``pytest11`` entry point ``chimney`` (any project that has
chimney installed gets it), or by ``pytest_plugins = ["chimney.host.harness"]``
where the package is not installed; it registers the ``vm`` marker itself.

Fixtures:

``vm`` (module scope)
    A booted :class:`~chimney.host.vm.Vm`: device + network namespace with the
    Linux peer + QEMU (TCG unless $CHIMNEY_ACCEL says otherwise), one boot per
    test module.  ``vm.run(cmd)``, ``vm.start(cmd)`` (a job: output as it
    comes, several at once), ``vm.python(code)``, ``vm.qmp(...)``,
    ``vm.unplug_nic()``... A module can set ``VM_OPTIONS = {...}`` (keyword
    arguments of Vm, e.g. ``{"virtio_net": False}``; an unknown key is an
    error naming the allowed ones).  Skipped without root.
``peer`` (module scope)
    The Linux peer (:class:`~chimney.host.vm.Peer`): ``peer.netns`` (run
    commands with ``peer.run(...)``), ``peer.nic`` / ``peer.nic_if`` (the
    NIC's wire, 10.199.0.0/24), ``peer.vnet`` / ``peer.vnet_if`` (virtio-net,
    10.199.1.0/24).
``vm_factory`` (function scope)
    ``vm_factory(**options)`` boots another VM (side by side), closed after
    the test.

Under pytest-xdist (``-n N``) the tests of one module stay on one worker (the
plugin puts each VM test in an ``xdist_group`` named after its module and
switches ``--dist load`` to ``loadgroup``), so each module still boots once.

When a test using a VM fails, the VM's serial log, device log, pcap of the
wire, QEMU log, command log, the guest's dmesg and the failing test's own
slice of the command log (``commands-test.log``, with output tails) are
copied to ``artifacts/<test>/`` (under the rootdir; ``--chimney-artifacts
DIR`` or $CHIMNEY_ARTIFACTS to change), while the VM still runs; a boot that
fails leaves them in ``artifacts/<module>-boot/`` and its error names that
folder.
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from chimney.host.vm import Peer, Vm

VM_FIXTURES = ("vm", "peer", "vm_factory")
# Vm keyword arguments the harness sets itself
HARNESS_OWNS = ("workdir", "remove_workdir")


class VmOptionsError(ValueError):
    """VM_OPTIONS (or vm_factory's options) name something Vm does not take."""


def allowed_vm_options() -> list[str]:
    params = inspect.signature(Vm.__init__).parameters
    return sorted(n for n, p in params.items()
                  if n != "self" and n not in HARNESS_OWNS and p.kind is not p.VAR_KEYWORD)


def check_vm_options(options, where: str = "VM_OPTIONS") -> dict:
    """``options`` as a dict of known Vm keyword arguments, or VmOptionsError."""
    if not isinstance(options, dict):
        raise VmOptionsError(f"{where} must be a dict of Vm keyword arguments, not {type(options).__name__}")
    allowed = allowed_vm_options()
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        raise VmOptionsError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
    return dict(options)


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: boots a QEMU virtual machine (slow under TCG)")
    if not config.pluginmanager.hasplugin("xdist"):  # the plugin marks VM tests for it all the same
        config.addinivalue_line("markers", "xdist_group(name): pytest-xdist keeps a group on one worker")
    # pytest-xdist: keep each module's VM tests on one worker (one boot per module)
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"
    # a worker parses the command line itself: it learns of loadgroup from us (pytest_configure_node)
    if (getattr(config, "workerinput", None) or {}).get("chimney_loadgroup"):
        config.option.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, on the controller, for each worker it starts."""
    node.workerinput["chimney_loadgroup"] = node.config.getvalue("dist") == "loadgroup"


def _uses_vm(item) -> bool:
    return item.get_closest_marker("vm") is not None or any(f in VM_FIXTURES for f in getattr(item, "fixturenames", ()))


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups into node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _uses_vm(item) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(name=f"chimney-vm:{item.nodeid.split('::')[0]}"))


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


def save_artifacts(vms: list[Vm], dest: Path, since: dict | None = None) -> list[Path]:
    """Each VM's logs to ``dest`` (a folder per VM when there are several);
    ``since[vm]``: where the test's slice of the command log starts."""
    copied = []
    for vm in vms:
        d = dest if len(vms) == 1 else dest / _slug(vm.name)
        try:
            copied += vm.save_artifacts(d, commands_since=(since or {}).get(vm))
        except OSError:
            pass
    return copied


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    item._chimney_cmdlog = {v: v.command_log_size() for v in _vms_of(item)}
    yield


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
    copied = save_artifacts(vms, dest, getattr(item, "_chimney_cmdlog", None))
    if copied:
        rep.sections.append(("chimney VM artifacts", f"{dest}: " + ", ".join(p.name for p in copied)))


class VmBootFailed(RuntimeError):
    """A VM of the harness did not boot; the message names the artifacts folder."""


def _boot(request, name_hint: str, where: str, options) -> Vm:
    try:
        options = check_vm_options(options, where)
    except VmOptionsError as e:
        pytest.fail(str(e), pytrace=False)
    if os.geteuid() != 0 and options.get("network", True):
        pytest.skip("VM tests need root (network namespaces, TAP)")
    workdir = tempfile.mkdtemp(prefix="chimney-vm-")
    vm = Vm(workdir=workdir, remove_workdir=True, **options)
    try:
        vm.start()
    except Exception as e:
        dest = artifacts_root(request.config) / f"{_slug(name_hint)}-boot"
        copied = save_artifacts([vm], dest)
        shutil.rmtree(workdir, ignore_errors=True)
        text = str(e).replace(os.fspath(vm.workdir), os.fspath(dest))
        files = ", ".join(p.name for p in copied) or "nothing was written"
        raise VmBootFailed(f"VM boot failed: {text}\nartifacts: {dest} ({files})") from None
    return vm


@pytest.fixture(scope="module")
def vm(request):
    """A booted VM with the NIC (one per test module)."""
    options = getattr(request.module, "VM_OPTIONS", {})
    machine = _boot(request, request.module.__name__, f"{request.module.__name__}.VM_OPTIONS", options)
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
        machine = _boot(self.request, self.request.node.nodeid, "vm_factory()", options)
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
