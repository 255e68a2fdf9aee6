"""The host stack end to end in the VM: chimney perf on our host stack inside the
guest (the miniport on Linux VFIO behind the vIOMMU, --bus vfio) moves
100 MB to and from the Linux peer in the namespace, the guest as client
and as server, sha256-verified at both ends.  One boot for the module;
every run bounded in bytes and by a hard timeout.  Figures are printed
(run with -s)."""

import pytest
from vm_perf import guest_perf_client, guest_perf_server

pytestmark = [pytest.mark.vm, pytest.mark.netns]

VM_OPTIONS = {"virtio_net": False}
NBYTES = 100_000_000
RUN_TIMEOUT = 300           # seconds for one 100 MB run in the guest (TCG)


def run_guest_client(vm, peer, reverse: bool, port: int):
    return guest_perf_client(vm, peer, port, "--bus vfio", "-R" if reverse else "", NBYTES, RUN_TIMEOUT)


def run_guest_server(vm, peer, reverse: bool, port: int):
    return guest_perf_server(vm, peer, port, "--bus vfio", "-R" if reverse else "", NBYTES, RUN_TIMEOUT)


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
