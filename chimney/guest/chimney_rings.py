"""What the chimney calls (chimney.guest.chimney_calls) keep in guest memory: the
first-fit DMA arena their buffers come from, and the two kinds of ring -- to the
device (the driver produces entries and rings the doorbell) and to the host (the
device writes records, the driver takes them, status word first; see
chimney/hw.py's ordering rules)."""
from __future__ import annotations

from .. import hw


class ChimneyError(Exception):
    pass


# -- guest memory -----------------------------------------------------------------------

class Block:
    __slots__ = ("iova", "mem", "off", "size")

    def __init__(self, mem, iova, off, size):
        self.mem, self.iova, self.off, self.size = mem, iova, off, size


class DmaArena:
    """First-fit allocator over one DMA buffer; freed ranges coalesce."""

    def __init__(self, buf, align: int = 64):
        self.buf = buf
        self.align = align
        self.free_list: list[list[int]] = [[0, len(buf)]]      # sorted [offset, size]
        self.used = 0

    def alloc(self, size: int) -> Block | None:
        size = max(self.align, (size + self.align - 1) // self.align * self.align)
        for i, (off, sz) in enumerate(self.free_list):
            if sz >= size:
                if sz == size:
                    del self.free_list[i]
                else:
                    self.free_list[i] = [off + size, sz - size]
                self.used += size
                return Block(self.buf.mem[off:off + size], self.buf.iova + off, off, size)
        return None

    def free(self, b: Block) -> None:
        fl = self.free_list
        lo, hi = 0, len(fl)
        while lo < hi:
            mid = (lo + hi) // 2
            if fl[mid][0] < b.off:
                lo = mid + 1
            else:
                hi = mid
        fl.insert(lo, [b.off, b.size])
        self.used -= b.size
        # coalesce with the right, then the left neighbour
        if lo + 1 < len(fl) and fl[lo][0] + fl[lo][1] == fl[lo + 1][0]:
            fl[lo][1] += fl[lo + 1][1]
            del fl[lo + 1]
        if lo > 0 and fl[lo - 1][0] + fl[lo - 1][1] == fl[lo][0]:
            fl[lo - 1][1] += fl[lo][1]
            del fl[lo]

    @property
    def available(self) -> int:
        return sum(s for _, s in self.free_list)


# -- rings --------------------------------------------------------------------------------

class ToDeviceRing:
    """Driver produces: write entries, advance DB_TAIL; DB_HEAD mirrors the device's consumer index."""

    def __init__(self, ch, qid: int, size: int):
        self.ch, self.qid, self.size = ch, qid, size
        self.layout = hw.RING_ENTRY[hw.queue_kind(qid).name]
        self.mem = ch.bus.dma_alloc(size * self.layout.size)
        self.tail = 0
        self.rung = 0

    def head(self) -> int:
        return self.ch.dbw[hw.DB_HEAD_BASE + 4 * self.qid]

    def space(self) -> int:
        return self.size - ((self.tail - self.head()) & 0xFFFFFFFF)

    def put(self, **fields) -> None:
        i = self.tail % self.size
        self.layout.pack_into(self.mem.mem, i * self.layout.size, **fields)
        self.tail = (self.tail + 1) & 0xFFFFFFFF

    def put_raw(self, st, *values) -> None:
        """One entry from positional field values (st: the layout's struct)."""
        st.pack_into(self.mem.mem, (self.tail % self.size) * st.size, *values)
        self.tail = (self.tail + 1) & 0xFFFFFFFF

    def ring(self) -> None:
        if self.rung != self.tail:
            self.rung = self.tail
            self.ch.mp._ring(self.qid, self.tail)

    def ring_lazy(self) -> None:
        """Doorbell without the trapped KICK: when the device sleeps, the kick is owed and
        written only when the driver is about to wait (Chimney.kick_owed); until then the
        device's own look at the doorbells (every 2 ms while asleep) finds the entries.
        Data requests of a busy driver thus cost no trapped write."""
        if self.rung != self.tail:
            self.rung = self.tail
            dbw = self.ch.dbw
            dbw[hw.DB_TAIL_BASE + 4 * self.qid] = self.tail
            if dbw[hw.DB_NEED_KICK]:
                self.ch._owed = True


class ToHostRing:
    """Device produces at DB_HEAD; the driver consumes below it and returns entries via DB_TAIL."""

    def __init__(self, ch, qid: int, size: int):
        self.ch, self.qid, self.size = ch, qid, size
        self.layout = hw.RING_ENTRY[hw.queue_kind(qid).name]
        self.mem = ch.bus.dma_alloc(size * self.layout.size)
        self.tail = 0

    def pending(self) -> bool:
        return self.ch.dbw[hw.DB_HEAD_BASE + 4 * self.qid] != self.tail

    def take(self, limit: int = 1 << 30) -> list[dict]:
        head = self.ch.dbw[hw.DB_HEAD_BASE + 4 * self.qid]
        n = min((head - self.tail) & 0xFFFFFFFF, limit)
        if n > self.size:
            raise ChimneyError(f"queue {self.qid}: head {head} runs {n} entries ahead of tail {self.tail}")
        out = []
        es, mem, lay = self.layout.size, self.mem.mem, self.layout
        for _ in range(n):
            out.append(lay.unpack_from(mem, (self.tail % self.size) * es))
            self.tail = (self.tail + 1) & 0xFFFFFFFF
        if n:
            self.ch.dbw[hw.DB_TAIL_BASE + 4 * self.qid] = self.tail
        return out

    def take_raw(self, st, limit: int = 1 << 30) -> list[tuple]:
        """Like take, entries as tuples of field values (st: the layout's struct)."""
        dbw = self.ch.dbw
        head = dbw[hw.DB_HEAD_BASE + 4 * self.qid]
        tail = self.tail
        n = min((head - tail) & 0xFFFFFFFF, limit)
        if not n:
            return []
        if n > self.size:
            raise ChimneyError(f"queue {self.qid}: head {head} runs {n} entries ahead of tail {tail}")
        mem, size, unpack = self.mem.mem, self.size, st.unpack_from
        es = st.size
        out = [unpack(mem, ((tail + i) % size) * es) for i in range(n)]
        self.tail = (tail + n) & 0xFFFFFFFF
        dbw[hw.DB_TAIL_BASE + 4 * self.qid] = self.tail
        return out
