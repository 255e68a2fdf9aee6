"""The offload manager does not offer the NIC a connection whose software send buffer
holds more than the NIC's send buffer (after an upload that returned the NIC's queued
send requests too): INITIATE refuses that state, the offload failed and the connection
stayed in software for good (seen in the handover test on the host bus)."""
from types import SimpleNamespace

from test_toe_engine import Rig

from chimney.guest.stack.offload.manager import NIC_SEND_BUFFER, OffloadManager
from chimney.tcp.state import TcpState


def _manager_and_socket(send_bytes: int):
    key = ("10.0.0.2", 40000, "10.0.0.1", 5001)
    conn = SimpleNamespace(state=TcpState.ESTABLISHED, urgent_received=False,
                           d=SimpleNamespace(send_buffer=bytearray(send_bytes)))
    iface = SimpleNamespace(arp_cache=SimpleNamespace(), nd_cache=SimpleNamespace())   # hooks land here
    stack = SimpleNamespace(clock=lambda: 0.0, flows={key: object()}, iface=iface)
    mgr = OffloadManager(stack, SimpleNamespace(is_up=True, paused=False))
    sock = SimpleNamespace(path=SimpleNamespace(software_conn=lambda: conn),
                           flow=SimpleNamespace(key=key))
    return mgr, sock


def test_nic_send_buffer_is_the_devices():
    r = Rig()
    try:
        assert NIC_SEND_BUFFER == r.nic.toe.cfg.send_buffer_size
    finally:
        r.close()


def test_offloadable_only_within_the_nics_send_buffer():
    mgr, sock = _manager_and_socket(NIC_SEND_BUFFER)
    assert mgr.offloadable(sock)
    mgr, sock = _manager_and_socket(NIC_SEND_BUFFER + 1)
    assert not mgr.offloadable(sock)
