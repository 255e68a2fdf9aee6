"""CPU spent during a data phase (started when the data starts, so start-up does not count)."""
from __future__ import annotations

import os
import time


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine (the guest, in a VM) spent not idle so far: the time
    since boot times the CPUs, less idle and iowait (/proc/uptime, /proc/stat).  Not the
    sum of the busy fields: those are timer ticks, and a vCPU held in a long device
    access (an MMIO exit under TCG) misses ticks, which then count as neither busy nor
    idle; the kernel's idle time is clocked (tickless idle), so this counts that time."""
    try:
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        v = [int(x) for x in lines[0].split()[1:6]]
        ncpu = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
        return up * ncpu - (v[3] + v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """This process's CPU (user and system) and the whole machine's (which includes the
    kernel's TCP for kernel sockets), from construction on."""

    def __init__(self):
        self.t0, self.times0, self.m0 = time.monotonic(), os.times(), machine_busy_s()

    def result(self) -> dict:
        """Seconds: process_s, machine_s (None where /proc/stat is missing), wall_s."""
        t, m1 = os.times(), machine_busy_s()
        proc = (t.user - self.times0.user) + (t.system - self.times0.system)
        return {"process_s": round(proc, 3),
                "machine_s": round(m1 - self.m0, 3) if m1 is not None and self.m0 is not None else None,
                "wall_s": round(time.monotonic() - self.t0, 3)}

    def util(self) -> tuple[float, float, float]:
        """(total, user, system): this process's CPU in percent of the wall time, as iperf3's."""
        wall = max(1e-9, time.monotonic() - self.t0)
        t = os.times()
        user = (t.user - self.times0.user) / wall * 100
        system = (t.system - self.times0.system) / wall * 100
        return round(user + system, 6), round(user, 6), round(system, 6)
