"""Shared fixtures: one `chimney device` process per test, its log in a file."""
from __future__ import annotations

import importlib.metadata
import os

import pytest

from chimney.host.device import DeviceProcess



def _harness_autoloaded() -> bool:
    """pytest loads chimney.host.harness itself (the package's pytest11 entry
    point is installed and plugin autoload is on): loading it here too would
    register it twice."""
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "chimney.host.harness" for ep in importlib.metadata.entry_points(group="pytest11"))


# fixtures `vm`, `peer`, `vm_factory`; logs of failed VM tests into artifacts/
pytest_plugins = [] if _harness_autoloaded() else ["chimney.host.harness"]


def start_device(tmp_path, **kw) -> DeviceProcess:
    """Start a device (DEBUG log in tmp_path/device.log); returns when it listens."""
    return DeviceProcess(str(tmp_path / "nic.sock"), log_path=str(tmp_path / "device.log"),
                         log_level="DEBUG", **kw)


def check_stopped_cleanly(dev: DeviceProcess) -> None:
    """Stop the device; fail if it had died on its own or logged a traceback."""
    died = dev.proc.poll() is not None
    dev.stop()
    log = dev.log_text()
    if died or "Traceback" in log:
        pytest.fail(f"device process {'died' if died else 'logged a traceback'} "
                    f"(exit {dev.proc.returncode}):\n{log[-4000:]}", pytrace=False)


@pytest.fixture
def device(tmp_path):
    """A running device: .socket, .proc, .log_text()."""
    dev = start_device(tmp_path)
    try:
        yield dev
    finally:
        check_stopped_cleanly(dev)


WIRE_TAP = "chim0"          # the NIC's TAP in the wire fixture's namespace


@pytest.fixture(scope="module")
def wire(tmp_path_factory, request):
    """A device whose TAP sits in a fresh namespace holding the Linux peer
    (chimney.host.netns.PeerAddrs): (dev, ns), one per test module."""
    from chimney.host.netns import Netns, PeerAddrs
    tag = request.module.__name__.rpartition(".")[2].removeprefix("test_")[:8]
    tmp = tmp_path_factory.mktemp(tag)
    with Netns(tag) as ns, DeviceProcess(str(tmp / "nic.sock"), tap=WIRE_TAP, netns=ns.name,
                                         log_path=str(tmp / "device.log")) as dev:
        ns.configure_peer(WIRE_TAP, PeerAddrs())
        yield dev, ns
        assert dev.alive, dev.log_text()[-3000:]
        assert "Traceback" not in dev.log_text(), dev.log_text()[-3000:]
