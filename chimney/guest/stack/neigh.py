"""A neighbour cache shared by ARP (IPv4) and neighbour discovery (IPv6).

States (a subset of RFC 4861's): INCOMPLETE (solicited, no answer yet; packets
wait in a bounded queue), REACHABLE (confirmed recently), STALE (known MAC,
not confirmed lately: used, and re-probed by unicast).  No timers of its own:
`poll(now)` does the work and returns what to send.  `on_update(addr, entry)`
(when set) hears of every entry that got a MAC or was confirmed (its MAC may
have changed), and of one given up (entry None): the offload manager keeps
the NIC's copy in step through it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

INCOMPLETE = "incomplete"
REACHABLE = "reachable"
STALE = "stale"


@dataclass
class Entry:
    state: str
    mac: bytes | None
    updated: float                      # when the state last changed / was confirmed
    retries: int = 0                    # solicitations sent in this INCOMPLETE/probe round
    next_probe: float = 0.0
    queue: deque = field(default_factory=deque)     # (ethertype, packet) awaiting the MAC


class NeighbourCache:
    def __init__(self, stats: dict, prefix: str, *, reachable_time: float = 30.0,
                 retrans_time: float = 1.0, max_retries: int = 3, stale_time: float = 600.0,
                 queue_len: int = 8, max_entries: int = 256):
        self.stats = stats
        self.p = prefix                 # "arp" or "nd", for stats keys
        self.reachable_time = reachable_time
        self.retrans_time = retrans_time
        self.max_retries = max_retries
        self.stale_time = stale_time
        self.queue_len = queue_len
        self.max_entries = max_entries
        self.entries: dict = {}
        self.on_update = None           # on_update(addr, Entry | None)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def get(self, addr):
        return self.entries.get(addr)

    def fresh(self, e: Entry | None, now: float) -> bool:
        """A MAC confirmed within reachable_time."""
        return e is not None and e.mac is not None and e.state == REACHABLE and \
            now - e.updated <= self.reachable_time

    def probe(self, addr, now: float) -> str | None:
        """Confirm addr now (a reachability question): 'unicast' with the MAC known,
        'multicast' otherwise (an INCOMPLETE entry made); None when the cache is full."""
        e = self.entries.get(addr)
        if e is None:
            if not self._make_room(now):
                return None
            e = self.entries[addr] = Entry(INCOMPLETE, None, now, retries=1,
                                           next_probe=now + self.retrans_time)
            return "multicast"
        if e.state == INCOMPLETE:
            return "multicast"
        if e.state == REACHABLE:
            e.state = STALE     # unconfirmed until it answers
        e.next_probe = now + self.retrans_time
        return "unicast"

    def lookup(self, addr, now: float) -> tuple[bytes | None, str | None]:
        """(mac to use or None, solicitation to send now: None, 'multicast' or 'unicast')."""
        e = self.entries.get(addr)
        if e is None:
            return None, None
        if e.state == REACHABLE and now - e.updated > self.reachable_time:
            e.state = STALE
        if e.state == STALE and e.mac is not None and now >= e.next_probe:
            # Still used, but confirm it: a unicast probe, at most once per retrans_time.
            e.next_probe = now + self.retrans_time
            return e.mac, "unicast"
        return e.mac, None

    def resolve(self, addr, ethertype: int, packet: bytes, now: float):
        """The MAC to send to, or None after queueing the packet.

        Returns (mac, solicit) where solicit is None, 'multicast' or 'unicast'.
        """
        mac, solicit = self.lookup(addr, now)
        if mac is not None:
            return mac, solicit
        e = self.entries.get(addr)
        if e is None:
            if not self._make_room(now):
                self._count(f"drop_{self.p}_cache_full")
                return None, None
            e = self.entries[addr] = Entry(INCOMPLETE, None, now, retries=1,
                                           next_probe=now + self.retrans_time)
            solicit = "multicast"
        if len(e.queue) >= self.queue_len:
            e.queue.popleft()
            self._count(f"drop_{self.p}_queue_full")
        e.queue.append((ethertype, packet))
        self._count(f"{self.p}_queued")
        return None, solicit

    def _make_room(self, now: float) -> bool:
        if len(self.entries) < self.max_entries:
            return True
        victims = [a for a, e in self.entries.items() if e.state != INCOMPLETE]
        if not victims:
            return False
        oldest = min(victims, key=lambda a: self.entries[a].updated)
        del self.entries[oldest]
        return True

    def learn(self, addr, mac: bytes, now: float, *, confirmed: bool, create: bool = True) -> list:
        """Record addr -> mac.  confirmed: the neighbour answered us (REACHABLE);
        otherwise it only spoke (STALE unless the MAC is unchanged).  Returns
        the packets that were waiting for this MAC, as (ethertype, packet)."""
        e = self.entries.get(addr)
        if e is None:
            if not create or not self._make_room(now):
                return []
            e = self.entries[addr] = Entry(STALE, mac, now)
        changed = e.mac != mac
        e.mac = mac
        if confirmed:
            e.state, e.updated, e.retries = REACHABLE, now, 0
        elif e.state == INCOMPLETE or changed:
            e.state, e.updated, e.retries = STALE, now, 0
        waiting = list(e.queue)
        e.queue.clear()
        if self.on_update is not None:
            self.on_update(addr, e)
        return waiting

    def poll(self, now: float) -> list:
        """Timers: returns the addresses to solicit again (multicast)."""
        again = []
        for addr, e in list(self.entries.items()):
            if e.state == INCOMPLETE:
                if now < e.next_probe:
                    continue
                if e.retries >= self.max_retries:
                    self._count(f"drop_{self.p}_unresolved", len(e.queue))
                    self._count(f"{self.p}_resolution_failed")
                    del self.entries[addr]
                    if self.on_update is not None:
                        self.on_update(addr, None)
                    continue
                e.retries += 1
                e.next_probe = now + self.retrans_time
                again.append(addr)
            elif e.state == REACHABLE and now - e.updated > self.reachable_time:
                e.state = STALE
            elif e.state == STALE and now - e.updated > self.stale_time:
                del self.entries[addr]
        return again

    def next_deadline(self) -> float | None:
        ds = [e.next_probe for e in self.entries.values() if e.state == INCOMPLETE]
        return min(ds) if ds else None
