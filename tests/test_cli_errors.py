"""Bad input to every chimney command ends in one clear line on stderr and the
documented exit status (2: usage), never a traceback, and before anything is
started (no NIC touched, no VM booted).  `chimney vm` has its own tests."""
import os
import subprocess
import sys

import pytest

from chimney.guest.bus.vfio_user import VfioUserBus

NOPE = "/nonexistent-chimney-dir"


def chimney(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "chimney.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, check=False)


def assert_one_line_error(r, rc, *needles):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


CASES = {
    # perf
    "perf-size": (["perf", "client", "127.0.0.1", "-n", "5X", "--stack", "linux"], "is not a size"),
    "perf-size-0": (["perf", "client", "127.0.0.1", "-n", "0", "--stack", "linux"], "at least 1 byte"),
    "perf-time": (["perf", "client", "127.0.0.1", "-t", "soon", "--stack", "linux"], "not a number of seconds"),
    "perf-time-neg": (["perf", "client", "127.0.0.1", "-t", "-3", "--stack", "linux"], "positive"),
    "perf-streams": (["perf", "client", "127.0.0.1", "-n", "1M", "-P", "0", "--stack", "linux"], "at least 1"),
    "perf-port": (["perf", "client", "127.0.0.1", "-n", "1M", "-p", "70000", "--stack", "linux"], "1..65535"),
    "perf-interval": (["perf", "client", "127.0.0.1", "-n", "1M", "-i", "-1", "--stack", "linux"], "interval"),
    "perf-upload-after": (["perf", "client", "10.199.0.1", "-n", "1M", "--upload-after", "1Q"], "is not a size"),
    "perf-no-device": (["perf", "client", "10.199.0.1", "-n", "1M", "--bus", "host", "--socket",
                        f"{NOPE}/nic.sock"], f"no device listening at {NOPE}/nic.sock"),
    "perf-not-a-socket": (["perf", "client", "10.199.0.1", "-n", "1M", "--bus", "host", "--socket", "/etc/hostname"],
                          "/etc/hostname is not a socket"),
    "perf-no-socket": (["perf", "client", "10.199.0.1", "-n", "1M", "--bus", "host"], "needs --socket"),
    "perf-bad-ip": (["perf", "client", "10.199.0.1", "-n", "1M", "--bus", "host", "--socket", "/x.sock",
                     "--ip", "300.1.2.3/24"], "'300.1.2.3/24' is not an IP address"),
    "perf-bad-prefix": (["perf", "client", "10.199.0.1", "-n", "1M", "--bus", "host", "--socket", "/x.sock",
                         "--ip", "10.199.0.2/33"], "prefix must be 0..32"),
    "perf-bad-ip6": (["perf", "client", "10.199.0.1", "-n", "1M", "--bus", "host", "--socket", "/x.sock",
                      "--ip6", "10.1.1.1/64"], "is not an IPv6 address"),
    "perf-host-name": (["perf", "client", "peer.example", "-n", "1M", "--bus", "host", "--socket", "/x.sock"],
                       "has no name resolution"),
    "perf-accept-timeout": (["perf", "server", "--accept-timeout", "0", "--stack", "linux"], "positive"),
    "perf-no-subcommand": (["perf"], "required"),
    # iperf3
    "iperf3-time": (["iperf3", "-c", "127.0.0.1", "-t", "0", "--stack", "linux"], "at least 1"),
    "iperf3-len": (["iperf3", "-c", "127.0.0.1", "-l", "0", "--stack", "linux"], "at least 1 byte"),
    "iperf3-bytes": (["iperf3", "-c", "127.0.0.1", "-n", "1.5.5M", "--stack", "linux"], "is not a size"),
    "iperf3-omit": (["iperf3", "-c", "127.0.0.1", "-O", "x", "--stack", "linux"], "not a whole number"),
    "iperf3-format": (["iperf3", "-c", "127.0.0.1", "-f", "q", "--stack", "linux"], "invalid choice"),
    "iperf3-mss": (["iperf3", "-c", "127.0.0.1", "-M", "20", "--stack", "linux"], "88..9000"),
    "iperf3-window": (["iperf3", "-c", "127.0.0.1", "-w", "big", "--stack", "linux"], "is not a size"),
    "iperf3-logfile": (["iperf3", "-c", "127.0.0.1", "--logfile", f"{NOPE}/log", "--stack", "linux"],
                       f"cannot write {NOPE}/log"),
    "iperf3-server-no-device": (["iperf3", "-s", "--bus", "host", "--socket", f"{NOPE}/nic.sock"],
                                "no device listening at"),
    # rr
    "rr-size": (["rr", "client", "127.0.0.1", "--size", "2M", "--stack", "linux"], "at most"),
    "rr-count": (["rr", "client", "127.0.0.1", "--count", "0", "--stack", "linux"], "at least 1"),
    "rr-time": (["rr", "client", "127.0.0.1", "-t", "x", "--stack", "linux"], "not a number of seconds"),
    # device
    "device-socket-dir": (["device", "--socket", f"{NOPE}/nic.sock"], f"{NOPE} is not a directory"),
    "device-not-a-socket": (["device", "--socket", "/etc/hostname"], "/etc/hostname: exists and is not a socket"),
    "device-log-level": (["device", "--socket", "/tmp/chimney-x.sock", "--log-level", "LOUD"], "--log-level"),
    "device-mtu": (["device", "--socket", "/tmp/chimney-x.sock", "--mtu", "20"], "68..9000"),
    "device-mtu-text": (["device", "--socket", "/tmp/chimney-x.sock", "--mtu", "big"], "invalid int value"),
    "device-netns-no-tap": (["device", "--socket", "/tmp/chimney-x.sock", "--netns", "x"], "--netns needs --tap"),
    "device-netns-missing": (["device", "--socket", "/tmp/chimney-x.sock", "--tap", "t0", "--netns",
                              "chimney-no-such-ns"], "no such network namespace"),
    "device-tap-name": (["device", "--socket", "/tmp/chimney-x.sock", "--tap", "a-name-much-too-long"],
                        "an interface name is 1-15"),
    "device-mac": (["device", "--socket", "/tmp/chimney-x.sock", "--mac", "zz"], "not a MAC address"),
    "device-impair": (["device", "--socket", "/tmp/chimney-x.sock", "--impair", "delay=soon"], "--impair"),
    "device-pcap": (["device", "--socket", "/tmp/chimney-x.sock", "--pcap", f"{NOPE}/x.pcap"],
                    f"--pcap {NOPE}/x.pcap"),
    "device-snaplen": (["device", "--socket", "/tmp/chimney-x.sock", "--pcap", "/tmp/chimney-x.pcap",
                        "--snaplen", "0"], "--snaplen 0: the snap length must be 1..262144"),
    "device-snaplen-no-pcap": (["device", "--socket", "/tmp/chimney-x.sock", "--snaplen", "100"],
                               "--snaplen needs --pcap"),
    "device-pci-id": (["device", "--socket", "/tmp/chimney-x.sock", "--pci-id", "1de5"],
                      "--pci-id: '1de5' is not a PCI id VVVV:DDDD"),
    "device-pci-id-vendor": (["device", "--socket", "/tmp/chimney-x.sock", "--pci-id", "ffff:0001"],
                             "vendor ffff is not a valid PCI vendor id"),
    # demo (checked before provisioning or booting anything)
    "demo-size": (["demo", "-n", "0"], "at least 1 byte"),
    "demo-size-unit": (["demo", "-n", "1Q"], "is not a size"),
    "demo-out": (["demo", "--out", f"{NOPE}/plots"], f"cannot make {NOPE}/plots"),
    # bench
    "bench-which": (["bench", "nosuch"], "invalid choice"),
    "bench-only": (["bench", "suite", "--only", "z"], "unknown measure"),
    "bench-bytes": (["bench", "suite", "--bytes", "0"], "at least 1 byte"),
    "bench-conns": (["bench", "suite", "--conns", "0"], "at least 1"),
    "bench-seconds": (["bench", "suite", "--seconds", "-2"], "positive"),
    "bench-seconds-whole": (["bench", "suite", "--seconds", "8.5"], "whole seconds"),
    "bench-rr-seconds": (["bench", "suite", "--rr-seconds", "0"], "positive"),
    "demo-seconds": (["demo", "--seconds", "0"], "at least 1"),
    "bench-save": (["bench", "suite", "--save", f"{NOPE}/x.json"], f"cannot write {NOPE}/x.json"),
    "bench-profile": (["bench", "suite", "--profile", f"{NOPE}/prof"], f"cannot make {NOPE}/prof"),
    # the rest
    "datasheet-output": (["datasheet", "-o", f"{NOPE}/d.md"], f"cannot write {NOPE}/d.md"),
    "no-command": (["frobnicate"], "invalid choice"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case):
    args, needle = CASES[case]
    assert_one_line_error(chimney(*args), 2, needle)


def test_version():
    from chimney import __version__
    r = chimney("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"chimney {__version__}"


@pytest.mark.skipif(os.geteuid() != 0, reason="the device process runs as root in these tests")
def test_device_refuses_a_live_socket_and_names_its_process(device):
    r = chimney("device", "--socket", device.socket)
    assert_one_line_error(r, 2, f"--socket {device.socket}: another device is listening there",
                          f"pid {device.proc.pid}")
    assert device.proc.poll() is None          # the live device is untouched


@pytest.mark.skipif(os.geteuid() != 0, reason="the device process runs as root in these tests")
def test_second_client_is_told_the_device_is_busy(device):
    bus = VfioUserBus(device.socket)            # the first client, attached
    try:
        r = chimney("perf", "client", "10.199.0.1", "-n", "1M", "--bus", "host", "--socket", device.socket)
        assert_one_line_error(r, 2, f"device busy: another client is attached to {device.socket}")
    finally:
        bus.close()


def _parsers(p, path=()):
    import argparse
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                if path + (name,) != ("vm",):           # chimney vm: its own tests
                    yield from _parsers(sp, path + (name,))


def test_every_option_has_help_and_no_markup():
    """--help of every command: each option says what it does; plain text, no reST or
    Markdown markup (backticks, ``literals``, :role:)."""
    import argparse

    from chimney.cli import build_parser
    seen = 0
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert a.help, f"chimney {' '.join(path)}: {a.option_strings or a.dest} has no help"
            seen += 1
        text = p.format_help()
        for mark in ("`", ":class:", ":func:", "\n.. "):
            assert mark not in text, (path, mark)
    assert seen > 100
