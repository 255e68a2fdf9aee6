"""The tools layer's small parts, without a device: sizes and values as users type
them, and what the stacks' connections report."""
import argparse
from types import SimpleNamespace

import pytest

from chimney.guest.stack.offload import HandoverPath, OffloadPath
from chimney.guest.stack.socket import SoftwarePath
from chimney.guest.tools import values
from chimney.guest.tools.stacks import ChimneyConn


@pytest.mark.parametrize("text,n", [
    ("1", 1), ("1000", 1000), ("1K", 1024), ("1k", 1024), ("4M", 4 << 20), ("2G", 2 << 30),
    ("1.5M", 3 << 19), ("128KB", 128 << 10), ("1T", 1 << 40), (" 64 ", 64),
])
def test_sizes_are_powers_of_two_as_iperf3(text, n):
    assert values.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "5X", "-1", "0", "0K", "1.5", "nanM", "infK", "1e3", "--"])
def test_bad_sizes_say_what_was_given(text):
    with pytest.raises(ValueError) as e:
        values.parse_size(text)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize("parse,good,bad", [
    (values.parse_seconds, [("2", 2.0), ("0.5", 0.5)], ["0", "-1", "x", "nan", "inf"]),
    (values.parse_interval, [("0", 0.0), ("1", 1.0)], ["-1", "x", "inf"]),
    (values.parse_count, [("1", 1), ("128", 128)], ["0", "-3", "1.5", "x"]),
    (values.parse_omit, [("0", 0), ("3", 3)], ["-1", "x"]),
    (values.parse_port, [("1", 1), ("65535", 65535)], ["0", "65536", "x", "-1"]),
])
def test_values(parse, good, bad):
    for text, v in good:
        assert parse(text) == v
    for text in bad:
        with pytest.raises(ValueError):
            parse(text)


def test_argparse_type_is_a_usage_error():
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("-n", type=values.size)
    assert p.parse_args(["-n", "2M"]).n == 2 << 20
    with pytest.raises(argparse.ArgumentError, match="is not a size"):
        p.parse_args(["-n", "2Q"])


def test_offloaded_connection_reports_unacked_bytes():
    """An offloaded send completes once its last byte is acknowledged, so the offload
    path's outstanding bytes are the unacknowledged ones (iperf3's sender waits for
    them to reach 0 before it ends the test)."""
    off = object.__new__(OffloadPath)        # the path's bookkeeping only, no NIC behind it
    off.outstanding = 4096
    conn = ChimneyConn(SimpleNamespace(path=off))
    assert conn.unacked() == 4096
    off.outstanding = 0
    assert conn.unacked() == 0
    soft = object.__new__(SoftwarePath)
    soft.conn = SimpleNamespace(d=SimpleNamespace(send_buffer=b"x" * 10))
    assert ChimneyConn(SimpleNamespace(path=soft)).unacked() == 10
    handover = object.__new__(HandoverPath)
    assert ChimneyConn(SimpleNamespace(path=handover)).unacked() is None


def test_linux_stack_family_window_and_mss():
    """iperf3's -6, -w and -M on kernel sockets: an IPv6 listener only, the buffers and
    the MSS set on the sockets before connect (so the SYN carries them)."""
    import socket

    from chimney.guest.tools.stacks import LinuxStack
    srv = LinuxStack(family=6)
    srv.listen(0)
    port = srv.listener.getsockname()[1]
    assert srv.listener.family == socket.AF_INET6
    assert srv.listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    cli = LinuxStack(family=6, window=256 << 10, mss=1200)
    c = cli.connect("::1", port, timeout=5)
    a, _ = srv.accept(timeout=5)
    try:
        s = c.s
        assert s.family == socket.AF_INET6
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= 1200
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 256 << 10   # the kernel doubles it
        (lh, lp), (rh, rp) = c.addresses()
        assert (lh, rh, rp) == ("::1", "::1", port) and lp > 0
        with pytest.raises(OSError):
            LinuxStack(family=4).connect("::1", port, timeout=2)        # -4: no IPv6
    finally:
        c.close()
        a.close()
        srv.close()
