"""Faults under a running VM: the device process dies while the guest's
miniport (VFIO bus, behind the vIOMMU) waits on it.  The miniport must say
so clearly, within seconds, instead of hanging."""
import json
import os
import threading
import time

import pytest

from chimney.host.device import DeviceProcess
from chimney.host.qemu import run_in_guest

pytestmark = pytest.mark.vm

GUEST = r'''
import json, time
from chimney.guest.bus import DeviceGone
from chimney.guest.bringup import bring_up
g = bring_up(bus="vfio", stack=False)
mp = g.mp
open("/results/ready", "w").write("up")
out = {}
t0 = time.monotonic()
try:
    mp.recv(timeout=60)
    out["recv"] = "returned"
except DeviceGone as e:
    out["recv"] = "DeviceGone"
    out["message"] = str(e)
out["seconds"] = time.monotonic() - t0
out["id_after"] = mp.rd(0)
print(json.dumps(out))
'''


def test_killing_the_device_gives_the_guest_a_clear_error(tmp_path):
    dev = DeviceProcess(str(tmp_path / "nic.sock"), log_path=str(tmp_path / "device.log"))
    result = {}

    def boot():
        try:
            result["r"] = run_in_guest("python3 - <<'EOF'\n" + GUEST + "EOF\n", vfio_user_socket=dev.socket,
                                       workdir=tmp_path / "vm", timeout=240)
        except Exception as e:      # reported below, with the serial log
            result["e"] = e

    vm = threading.Thread(target=boot)
    vm.start()
    ready = tmp_path / "vm" / "results" / "ready"
    end = time.monotonic() + 240
    while not ready.exists() and vm.is_alive() and time.monotonic() < end:
        time.sleep(0.2)
    assert ready.exists(), f"the miniport never came up: {result}"
    time.sleep(0.5)
    dev.kill()
    vm.join(120)
    assert not vm.is_alive(), "the guest hung after the device died"
    assert "e" not in result, f"{result['e']}\n{getattr(result['e'], 'serial_tail', '')}"
    r = result["r"]
    assert r.rc == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["recv"] == "DeviceGone", out
    assert "heartbeat" in out["message"]
    assert out["seconds"] < 10, f"took {out['seconds']:.1f} s to notice"
    assert out["id_after"] in (0xFFFFFFFF, 0), "a dead device's registers read as all-ones (or zero)"
    dev.stop()
    os.path.exists(dev.socket) and os.unlink(dev.socket)
