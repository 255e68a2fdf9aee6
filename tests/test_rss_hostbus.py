"""Receive side scaling end to end on the host bus: the guest's miniport, chimney
calls, offload manager and host stack in this process, the device process (TOE)
on a TAP in a namespace, Linux peers in that namespace.  Offloaded connections
spread over the offload queue sets by their hash; the indirection table changes
while data flows and receives are posted, and every stream's bytes stay exact."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import time

import pytest
from test_offload_hostbus import ADDR, PEER, pattern, peer, perf, run_pair

from chimney.guest import rss
from chimney.guest.bringup import bring_up
from chimney.guest.miniport import VEC_OFFLOAD_FIRST
from chimney.guest.stack.offload import OffloadPath

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def test_perf_8_streams_over_4_queue_sets(wire):
    """chimney perf -P 8 --offload on --rss-queues 4: the guest receives 8 streams
    from the Linux peer; they spread over at least 3 sets, each verified."""
    dev, ns = wire
    port, total = 5530, 32 << 20
    srv = perf("server", "--stack", "linux", "--once", "--json", "--port", port, "--accept-timeout", 60)
    cli = perf("client", ADDR.peer4, "--port", port, "-n", total, "-P", 8, "-R", "--json", "-i", 0,
               "--stack", "chimney", "--bus", "host", "--socket", dev.socket,
               "--ip", f"{ADDR.guest4}/{ADDR.prefix4}", "--offload", "on", "--rss-queues", 4)
    res, _ = run_pair(srv, True, cli, ns)
    assert res["error"] is None and res["verified"] is True
    streams = res["summary"]["streams"]
    assert len(streams) == 8 and all(s["verified"] for s in streams)
    assert sum(s["receiver"]["bytes"] for s in streams) == total
    queues = []
    for s in streams:
        mine = s["receiver"]
        assert mine["offloaded"] is True and mine["uploads"] == 0
        info = mine["rss"]
        assert info is not None and 0 <= info["queue"] < 4 and sum(info["records"].values()) > 0
        queues.append(info["queue"])
    assert len(set(queues)) >= 3, queues
    ch = res["stack_stats"]["chimney"]
    assert ch.get("rss_moves_seen", 0) == 0         # the table never changed: nobody moved
    print(f"\n8 streams over queue sets {sorted(queues)}: "
          f"{res['summary']['sum']['receiver']['mbps']:.1f} Mbit/s")


def test_a_sets_completions_fire_its_own_vector(wire):
    """The completions of a connection on set k raise MSI-X vector VEC_OFFLOAD_FIRST + k."""
    dev, ns = wire
    g = bring_up(socket=dev.socket, ip=(ADDR.guest4, ADDR.prefix4), offload="always",
                 require_offload=True, rss_queues=4)
    p = peer(ns, listen=True, port=6290, send=100_000, hold=1.0, no_shut=True, timeout=20)
    try:
        s = g.stack.connect(ADDR.peer4, 6290, timeout=10)
        assert s.offloaded
        k = g.chimney.queue_of(s.path.handle)
        assert k == g.chimney.rss_table[rss.rss_hash(*s.flow.key) & 127]
        vec = VEC_OFFLOAD_FIRST + k
        g.stack.step(0)                     # receives posted, nothing arrived yet (the peer holds)
        assert s.path.recvs and not s.path.rx_held
        g.bus.clear_irq(vec)
        g.mp._arm(vec)
        r, _, _ = select.select([g.bus.irq_fd(vec)], [], [], 10)
        assert r, f"vector {vec} of set {k} never fired"
        got = bytearray()
        end = time.monotonic() + 20
        while len(got) < 100_000 and time.monotonic() < end:
            with contextlib.suppress(BlockingIOError):
                got += s.recv(1 << 20, timeout=0.5)
        assert bytes(got) == pattern("peer", 100_000)
        assert g.chimney.qsets[k].records > 0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        g.close()


def peers(ns, n, port0, nbytes):
    procs = []
    for i in range(n):
        a = {"listen": True, "port": port0 + i, "send": nbytes, "seed": f"rss-peer-{i}", "timeout": 90}
        p = ns.popen(sys.executable, "-c", PEER, json.dumps(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"listening"
        procs.append(p)
    return procs


def test_table_changes_mid_transfer_keep_every_stream_exact(wire):
    """8 offloaded connections on 4 sets, data both ways; the indirection table is
    rotated three times while data arrives and every connection has receives posted.
    Connections move (the driver sees them on their new set), and every byte arrives
    in order both ways."""
    dev, ns = wire
    n, nbytes, port0 = 8, 6_000_000, 6300
    g = bring_up(socket=dev.socket, ip=(ADDR.guest4, ADDR.prefix4), offload="always",
                 require_offload=True, rss_queues=4,
                 # 8 connections' sends, posted receives and their uploads' responses fit the arena
                 send_limit=512 * 1024, post_size=64 * 1024, rx_limit=1 << 20)
    procs = peers(ns, n, port0, nbytes)
    try:
        stack, mgr, ch = g.stack, g.offload, g.chimney
        socks = [stack.connect(ADDR.peer4, port0 + i, timeout=10) for i in range(n)]
        assert all(s.offloaded for s in socks)
        outs = [pattern(f"rss-guest-{i}", nbytes) for i in range(n)]
        offs, rxs, shut = [0] * n, [bytearray() for _ in range(n)], [False] * n
        table = bytearray(ch.rss_table)
        changes, moved_with_posted = 0, 0
        end = time.monotonic() + 120
        while not all(len(rx) >= nbytes for rx in rxs) or not all(shut):
            assert time.monotonic() < end, f"timed out: received {[len(r) for r in rxs]}"
            moved = False
            for i, s in enumerate(socks):
                if offs[i] < nbytes and s.path.writable():
                    k = s.send(outs[i][offs[i]:offs[i] + 65536], timeout=0)
                    offs[i] += k
                    moved |= k > 0
                elif offs[i] >= nbytes and not shut[i]:
                    s.shutdown()
                    shut[i] = True
                with contextlib.suppress(BlockingIOError):
                    b = s.recv(1 << 20, timeout=0)
                    if b:
                        rxs[i] += b
                        moved = True
            done = min(len(rx) for rx in rxs)
            if changes < 3 and done >= (changes + 1) * nbytes // 5:
                # mid-transfer: every connection offloaded with receives posted
                paths = [s.path for s in socks]
                assert all(isinstance(p, OffloadPath) for p in paths)
                moved_with_posted += sum(1 for p in paths if p.recvs)
                table = bytearray((q + 1) % 4 for q in table)
                mgr.set_rss_table(table)
                changes += 1
            if not moved:
                stack.step(0.005)
        results = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert out.strip(), err.decode()[-2000:]
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        for i in range(n):
            assert bytes(rxs[i]) == pattern(f"rss-peer-{i}", nbytes), f"stream {i} received out of order"
            assert results[i]["got"] == nbytes
            assert results[i]["sha256"] == hashlib.sha256(outs[i]).hexdigest(), f"stream {i} sent out of order"
        assert changes == 3 and moved_with_posted >= n      # moves happened with receives posted
        assert ch.stats["rss_moves_seen"] >= n               # each connection seen on a new set
        sets = [mgr.rss_info(s) for s in socks]
        assert all(len(info["records"]) >= 2 for info in sets), sets
        assert all(info["queue"] == table[rss.rss_hash(*s.flow.key) & 127]
                   for s, info in zip(socks, sets)), (sets, list(table))
        print(f"\n3 table changes under 8 x {nbytes} B each way: moves seen "
              f"{ch.stats['rss_moves_seen']}, request moves {ch.stats['rss_request_moves']}")
        for s in socks:
            s.close()
        stack.run_until(lambda: not stack.detached, 10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        g.close()
