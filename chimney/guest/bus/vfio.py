"""The guest bus: Linux VFIO (vfio-pci + the type1 IOMMU) from user space.

Inside the VM the NIC sits behind QEMU's virtual Intel IOMMU, so vfio-pci
gives us a container with real IOVA mappings:

* registers (BAR0) and config space: pread/pwrite on the device fd at the
  region's offset (each access traps to QEMU, which asks the device);
* the doorbell page (BAR2): mmap of the device fd (no exit);
* DMA memory: 2 MiB hugetlb pages, each chunk mapped with one
  VFIO_IOMMU_MAP_DMA at an IOVA we pick.  QEMU turns every IOMMU page-table
  entry into one vfio-user DMA_MAP, so huge pages keep that to one message
  per 2 MiB;
* MSI-X: eventfds handed over with VFIO_DEVICE_SET_IRQS.

The ioctls go through fcntl.ioctl with the structs packed by the struct
module (no cffi: parsing a cdef cost over a second of guest CPU at every
start under TCG).  Everything that can go wrong in the set-up raises VfioBusError
with the reason (no device, no vfio module, no IOMMU group, errno names).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import mmap
import os
import struct
import subprocess
import time

from ... import hw
from . import DmaBuffer, EventfdIrqs, unmap_all

SYSFS_PCI = "/sys/bus/pci/devices"
VFIO_PCI_DRIVER = "/sys/bus/pci/drivers/vfio-pci"
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
HUGE_PAGE = 2 << 20
MAP_HUGETLB = 0x40000          # linux/mman.h (x86); not exported by Python's mmap
DEFAULT_IOVA_BASE = 0x1_0000_0000   # above 4 GiB, as on the host bus

# --- linux/vfio.h: the structs, as struct formats ------------------------------------
_GROUP_STATUS = struct.Struct("<II")            # argsz, flags
_DEVICE_INFO = struct.Struct("<IIIIII")         # argsz, flags, num_regions, num_irqs, cap_offset, pad
_REGION_INFO = struct.Struct("<IIIIQQ")         # argsz, flags, index, cap_offset, size, offset
_IRQ_INFO = struct.Struct("<IIII")              # argsz, flags, index, count
_IRQ_SET = struct.Struct("<IIIII")              # argsz, flags, index, start, count; then data[]
_IOMMU_INFO = struct.Struct("<IIQII")           # argsz, flags, iova_pgsizes, cap_offset, pad
_DMA_MAP = struct.Struct("<IIQQQ")              # argsz, flags, vaddr, iova, size
_DMA_UNMAP = struct.Struct("<IIQQ")             # argsz, flags, iova, size


def _IO(nr: int) -> int:
    """_IO(VFIO_TYPE, VFIO_BASE + nr): no direction, no size bits."""
    return (ord(";") << 8) | (100 + nr)


VFIO_GET_API_VERSION = _IO(0)
VFIO_CHECK_EXTENSION = _IO(1)
VFIO_SET_IOMMU = _IO(2)
VFIO_GROUP_GET_STATUS = _IO(3)
VFIO_GROUP_SET_CONTAINER = _IO(4)
VFIO_GROUP_UNSET_CONTAINER = _IO(5)
VFIO_GROUP_GET_DEVICE_FD = _IO(6)
VFIO_DEVICE_GET_INFO = _IO(7)
VFIO_DEVICE_GET_REGION_INFO = _IO(8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(9)
VFIO_DEVICE_SET_IRQS = _IO(10)
VFIO_DEVICE_RESET = _IO(11)
VFIO_IOMMU_GET_INFO = _IO(12)
VFIO_IOMMU_MAP_DMA = _IO(13)
VFIO_IOMMU_UNMAP_DMA = _IO(14)
IOCTL_NAMES = {v: k for k, v in globals().items() if k.startswith("VFIO_") and isinstance(v, int)}

VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_MSIX_IRQ_INDEX = 2

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4

_CAP_HEADER = struct.Struct("<HHI")        # id, version, next
_SPARSE_HDR = struct.Struct("<II")         # nr_areas, reserved
_SPARSE_AREA = struct.Struct("<QQ")        # offset, size
_IOVA_RANGE = struct.Struct("<QQ")         # start, end (inclusive)



class VfioBusError(Exception):
    """Setting up or using the VFIO device failed; the message says why."""

    def __init__(self, message: str, err: int | None = None):
        if err is not None:
            message += f": {errno.errorcode.get(err, err)} ({os.strerror(err)})"
        super().__init__(message)
        self.errno = err


def _ioctl(fd: int, request: int, arg, what: str = "") -> int:
    """ioctl(fd, request, arg); arg is an int (passed as unsigned long) or a bytearray
    the kernel reads and fills in place."""
    try:
        return fcntl.ioctl(fd, request, arg, True) if not isinstance(arg, int) else \
            fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise VfioBusError(f"{IOCTL_NAMES.get(request, hex(request))}{' ' + what if what else ''} failed",
                           e.errno) from None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def nic_ids() -> tuple[int, int]:
    """The NIC's vendor:device: $CHIMNEY_PCI_ID when the device was started
    with another id (chimney device --pci-id), else the default (chimney.hw)."""
    text = os.environ.get("CHIMNEY_PCI_ID")
    if not text:
        return hw.PCI_VENDOR_ID, hw.PCI_DEVICE_ID
    try:
        return hw.parse_pci_id(text)
    except ValueError as e:
        raise VfioBusError(f"CHIMNEY_PCI_ID: {e}") from None


def find_device(vendor: int | None = None, device: int | None = None) -> str:
    """PCI address (DDDD:BB:DD.F) of the first function with vendor:device
    (default: the NIC's, nic_ids())."""
    if vendor is None or device is None:
        vendor, device = nic_ids()
    for path in sorted(glob.glob(os.path.join(SYSFS_PCI, "*"))):
        try:
            if int(_read(path + "/vendor"), 16) == vendor and int(_read(path + "/device"), 16) == device:
                return os.path.basename(path)
        except (OSError, ValueError):
            continue
    raise VfioBusError(f"no PCI device {vendor:04x}:{device:04x} in {SYSFS_PCI}")


def _ensure_vfio_pci() -> None:
    if os.path.isdir(VFIO_PCI_DRIVER):
        return
    try:
        subprocess.run(["modprobe", "vfio-pci"], check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if not os.path.isdir(VFIO_PCI_DRIVER):
        raise VfioBusError(f"the vfio-pci driver is not available ({VFIO_PCI_DRIVER} missing; "
                           "load the vfio-pci module)")


def bind_vfio_pci(addr: str, ids: tuple[int, int] | None) -> int:
    """Bind the function to vfio-pci (driver_override); returns its IOMMU group number.

    Refuses a function whose vendor:device is not ``ids`` (None: any), so that
    a wrong address cannot take a disk or a NIC away from its driver."""
    dev = os.path.join(SYSFS_PCI, addr)
    if not os.path.isdir(dev):
        raise VfioBusError(f"no PCI device {addr} in {SYSFS_PCI}")
    if ids is not None:
        found = (int(_read(dev + "/vendor"), 16), int(_read(dev + "/device"), 16))
        if found != tuple(ids):
            raise VfioBusError(f"{addr} is {found[0]:04x}:{found[1]:04x}, not {ids[0]:04x}:{ids[1]:04x}")
    try:
        group = int(os.path.basename(os.readlink(dev + "/iommu_group")))
    except FileNotFoundError:
        raise VfioBusError(f"{addr} has no IOMMU group: boot the guest with a virtual IOMMU "
                           "(-device intel-iommu,caching-mode=on) and intel_iommu=on") from None
    _ensure_vfio_pci()
    driver = os.path.join(dev, "driver")
    current = os.path.basename(os.readlink(driver)) if os.path.islink(driver) else None
    if current != "vfio-pci":
        try:
            _write(dev + "/driver_override", "vfio-pci")
            if current is not None:
                _write(driver + "/unbind", addr)
            _write(VFIO_PCI_DRIVER + "/bind", addr)
        except OSError as e:
            raise VfioBusError(f"binding {addr} (driver {current or 'none'}) to vfio-pci failed",
                               e.errno) from None
    node = f"/dev/vfio/{group}"
    end = time.monotonic() + 5
    while not os.path.exists(node):          # devtmpfs creates it asynchronously
        if time.monotonic() > end:
            raise VfioBusError(f"{node} did not appear after binding {addr} to vfio-pci")
        time.sleep(0.01)
    return group


def _free_hugepages() -> int:
    meminfo = dict(line.split(":", 1) for line in _read("/proc/meminfo").splitlines())
    return int(meminfo.get("HugePages_Free", "0")) - int(meminfo.get("HugePages_Rsvd", "0"))


def reserve_hugepages(n: int) -> None:
    """Make sure at least n unreserved free 2 MiB huge pages exist (raise nr_hugepages).
    Pages added here stay in the pool after close()."""
    free = _free_hugepages()
    if free >= n:
        return
    try:
        _write(NR_HUGEPAGES, str(int(_read(NR_HUGEPAGES)) + n - free))
    except OSError as e:
        raise VfioBusError(f"cannot reserve {n} huge pages via {NR_HUGEPAGES}", e.errno) from None
    if _free_hugepages() < n:
        raise VfioBusError(f"the kernel gave fewer than {n} free 2 MiB huge pages "
                           f"({NR_HUGEPAGES} = {_read(NR_HUGEPAGES)}); reserve them at boot "
                           "with hugepages=N on the kernel command line")


class _Chunk:
    """One hugetlb mapping, mapped for the device with one VFIO_IOMMU_MAP_DMA."""

    def __init__(self, size: int, iova: int):
        self.size = size
        self.iova = iova
        self.used = 0
        self.mapped = False
        try:
            self.mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
        except OSError as e:
            raise VfioBusError(f"mmap of {size >> 20} MiB of 2 MiB huge pages failed", e.errno) from None
        self.vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))   # (export released at once)


class VfioBus(EventfdIrqs):
    """The NIC through vfio-pci: the bus interface of chimney.guest.bus.

    Also counts interrupt wake-ups: ``irq_wakeups[v]`` (wait_irq returned
    because vector v fired) and ``irq_timeouts[v]``.
    """

    def __init__(self, pci_addr: str | None = None, *, iova_base: int = DEFAULT_IOVA_BASE,
                 bus_master: bool = True,
                 ids: tuple[int, int] | None = None):
        super().__init__()
        ids = ids or nic_ids()          # the NIC's vendor:device ($CHIMNEY_PCI_ID or the default)
        if pci_addr is None:
            pci_addr = find_device(*ids)
        self.addr = pci_addr
        self._ids = ids
        self.container = self.group_fd = self.device_fd = -1
        self._chunks: list[_Chunk] = []
        self._bars: dict[int, mmap.mmap] = {}
        self.irq_wakeups: dict[int, int] = {}
        self.irq_timeouts: dict[int, int] = {}
        self.msix_enabled = 0
        try:
            self._open(bus_master)
            self._iova_ranges = self._iommu_iova_ranges()
            self._next_iova = self._first_iova(iova_base)
        except BaseException:
            self.close()
            raise

    # -- set-up -------------------------------------------------------------------
    def _open(self, bus_master: bool) -> None:
        self.group = bind_vfio_pci(self.addr, self._ids)
        try:
            self.container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioBusError("/dev/vfio/vfio missing: the vfio module is not loaded") from None
        version = _ioctl(self.container, VFIO_GET_API_VERSION, 0)
        if version != VFIO_API_VERSION:
            raise VfioBusError(f"VFIO API version {version}, expected {VFIO_API_VERSION}")
        if _ioctl(self.container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1:
            raise VfioBusError("the VFIO container lacks the type1v2 IOMMU "
                               "(vfio_iommu_type1 not loaded?)")
        path = f"/dev/vfio/{self.group}"
        try:
            self.group_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VfioBusError(f"open {path} failed (another process holds the group?)", e.errno) from None
        status = bytearray(_GROUP_STATUS.pack(_GROUP_STATUS.size, 0))
        _ioctl(self.group_fd, VFIO_GROUP_GET_STATUS, status)
        if not _GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
            raise VfioBusError(f"IOMMU group {self.group} is not viable: bind every device in "
                               f"/sys/kernel/iommu_groups/{self.group}/devices to vfio-pci")
        _ioctl(self.group_fd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", self.container)))
        _ioctl(self.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        self.device_fd = _ioctl(self.group_fd, VFIO_GROUP_GET_DEVICE_FD,
                                bytearray(self.addr.encode() + b"\0"), self.addr)
        info = bytearray(_DEVICE_INFO.pack(_DEVICE_INFO.size, 0, 0, 0, 0, 0))
        _ioctl(self.device_fd, VFIO_DEVICE_GET_INFO, info)
        _, flags, num_regions, num_irqs, _, _ = _DEVICE_INFO.unpack(info)
        if not flags & VFIO_DEVICE_FLAGS_PCI:
            raise VfioBusError(f"{self.addr} is not a VFIO PCI device (flags {flags:#x})")
        self.num_irqs = num_irqs
        self.regions = {}
        for i in range(min(num_regions, VFIO_PCI_NUM_REGIONS)):
            try:
                self.regions[i] = self._region_info(i)
            except VfioBusError as e:
                if e.errno != errno.EINVAL:     # EINVAL: no such region (the VGA one)
                    raise
        if bus_master:
            cmd = self.config_read(PCI_COMMAND, 2)
            self.config_write(PCI_COMMAND, 2, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def _region_info(self, index: int) -> dict:
        argsz = _REGION_INFO.size
        for _ in range(2):
            buf = bytearray(argsz)
            _REGION_INFO.pack_into(buf, 0, argsz, 0, index, 0, 0, 0)
            _ioctl(self.device_fd, VFIO_DEVICE_GET_REGION_INFO, buf, f"(region {index})")
            got_argsz, flags, _, cap_offset, size, offset = _REGION_INFO.unpack_from(buf)
            if got_argsz <= argsz:
                break
            argsz = got_argsz      # room for the capability chain
        info = {"flags": flags, "size": size, "offset": offset, "areas": []}
        raw = bytes(buf)
        off = cap_offset if flags & VFIO_REGION_INFO_FLAG_CAPS else 0
        while off and off + _CAP_HEADER.size <= len(raw):
            cid, _ver, nxt = _CAP_HEADER.unpack_from(raw, off)
            if cid == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                n, _ = _SPARSE_HDR.unpack_from(raw, off + _CAP_HEADER.size)
                base = off + _CAP_HEADER.size + _SPARSE_HDR.size
                info["areas"] = [_SPARSE_AREA.unpack_from(raw, base + _SPARSE_AREA.size * i) for i in range(n)]
            off = nxt
        return info

    def _iommu_iova_ranges(self) -> list[tuple[int, int]]:
        """Usable IOVA ranges [(start, end inclusive)] from VFIO_IOMMU_GET_INFO."""
        size = 4096
        buf = bytearray(size)
        _IOMMU_INFO.pack_into(buf, 0, size, 0, 0, 0, 0)
        _ioctl(self.container, VFIO_IOMMU_GET_INFO, buf)
        _, flags, self.iova_pgsizes, cap_offset, _ = _IOMMU_INFO.unpack_from(buf)
        raw = bytes(buf)
        off = cap_offset if flags & VFIO_IOMMU_INFO_CAPS else 0
        while off and off + _CAP_HEADER.size <= len(raw):
            cid, _ver, nxt = _CAP_HEADER.unpack_from(raw, off)
            if cid == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                n, _ = _SPARSE_HDR.unpack_from(raw, off + _CAP_HEADER.size)
                base = off + _CAP_HEADER.size + 8
                return [_IOVA_RANGE.unpack_from(raw, base + 16 * i) for i in range(n)]
            off = nxt
        return [(0, (1 << 64) - 1)]

    def _first_iova(self, base: int) -> int:
        for start, end in self._iova_ranges:
            if start <= base <= end:
                return base
        for start, end in self._iova_ranges:
            s = (start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
            if s + HUGE_PAGE - 1 <= end:
                return s
        raise VfioBusError(f"no usable IOVA range in {self._iova_ranges}")

    def _take_iova(self, size: int) -> int:
        iova = self._next_iova
        for start, end in self._iova_ranges:
            if end < iova:
                continue
            iova = max(iova, (start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE)
            if iova + size - 1 <= end:
                self._next_iova = iova + size
                return iova
        raise VfioBusError(f"IOVA space exhausted (asked {size:#x} at {self._next_iova:#x})")

    # -- the bus interface -----------------------------------------------------------
    def _region_rw(self, index: int, offset: int, size: int, data: bytes | None = None) -> bytes | None:
        info = self.regions.get(index)
        if info is None or offset < 0 or offset + size > info["size"]:
            raise VfioBusError(f"access {offset:#x}+{size} outside region {index}")
        pos = info["offset"] + offset
        try:
            if data is None:
                got = os.pread(self.device_fd, size, pos)
                if len(got) != size:
                    raise VfioBusError(f"short read of region {index} at {offset:#x}: {len(got)}/{size}")
                return got
            n = os.pwrite(self.device_fd, data, pos)
            if n != size:
                raise VfioBusError(f"short write of region {index} at {offset:#x}: {n}/{size}")
        except OSError as e:
            what = "read" if data is None else "write"
            raise VfioBusError(f"{what} of region {index} at {offset:#x} ({size} bytes)", e.errno) from None
        return None

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._region_rw(VFIO_PCI_CONFIG_REGION_INDEX, offset, size), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._region_rw(VFIO_PCI_CONFIG_REGION_INDEX, offset, size, value.to_bytes(size, "little"))

    def reg_read(self, bar: int, offset: int, size: int = 4) -> int:
        return int.from_bytes(self._region_rw(bar, offset, size), "little")

    def reg_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self._region_rw(bar, offset, size, value.to_bytes(size, "little"))

    def map_bar(self, bar: int):
        if bar not in self._bars:
            info = self.regions.get(bar)
            if info is None or not info["size"]:
                raise VfioBusError(f"BAR{bar} does not exist")
            if not info["flags"] & VFIO_REGION_INFO_FLAG_MMAP:
                raise VfioBusError(f"BAR{bar} is not mmappable (region flags {info['flags']:#x})")
            # With a sparse-mmap capability only the listed areas may be mapped;
            # we need the whole BAR (the doorbell page is one page).
            areas = info["areas"]
            if areas and not any(o == 0 and s >= info["size"] for o, s in areas):
                raise VfioBusError(f"BAR{bar} is only partly mmappable: {areas}")
            try:
                self._bars[bar] = mmap.mmap(self.device_fd, info["size"], mmap.MAP_SHARED,
                                            mmap.PROT_READ | mmap.PROT_WRITE, offset=info["offset"])
            except OSError as e:
                raise VfioBusError(f"mmap of BAR{bar} failed", e.errno) from None
        return self._bars[bar]

    def dma_alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        if size <= 0 or align <= 0 or align & (align - 1) or align > HUGE_PAGE:
            raise ValueError(f"bad dma_alloc({size}, {align})")
        for c in self._chunks:
            start = (c.used + align - 1) // align * align
            if start + size <= c.size:
                break
        else:
            chunk_size = (size + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
            c = self._map_chunk(chunk_size)
            start = 0
        c.used = start + size
        return DmaBuffer(memoryview(c.mem)[start:start + size], c.iova + start)

    def _map_chunk(self, size: int) -> _Chunk:
        reserve_hugepages(size // HUGE_PAGE)
        c = _Chunk(size, self._take_iova(size))
        dm = bytearray(_DMA_MAP.pack(_DMA_MAP.size, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                     c.vaddr, c.iova, size))
        try:
            _ioctl(self.container, VFIO_IOMMU_MAP_DMA, dm, f"(iova {c.iova:#x} size {size:#x})")
        except VfioBusError:
            c.mem.close()
            raise
        c.mapped = True
        self._chunks.append(c)
        return c

    def enable_msix(self, nvectors: int) -> None:
        info = bytearray(_IRQ_INFO.pack(_IRQ_INFO.size, 0, VFIO_PCI_MSIX_IRQ_INDEX, 0))
        _ioctl(self.device_fd, VFIO_DEVICE_GET_IRQ_INFO, info, "(MSI-X)")
        count = _IRQ_INFO.unpack(info)[3]
        if nvectors > count:
            raise VfioBusError(f"{nvectors} MSI-X vectors asked, the device has {count}")
        if self.msix_enabled:
            self._disable_msix()
        fds = self.create(nvectors)
        self._set_irqs(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, fds)
        self.msix_enabled = nvectors
        self.irq_wakeups = {v: 0 for v in range(nvectors)}
        self.irq_timeouts = {v: 0 for v in range(nvectors)}

    def _set_irqs(self, flags: int, fds: list[int]) -> None:
        argsz = _IRQ_SET.size + 4 * len(fds)
        buf = bytearray(_IRQ_SET.pack(argsz, flags, VFIO_PCI_MSIX_IRQ_INDEX, 0, len(fds))
                        + struct.pack(f"<{len(fds)}i", *fds))
        _ioctl(self.device_fd, VFIO_DEVICE_SET_IRQS, buf, "(MSI-X)")

    def _disable_msix(self) -> None:
        self._set_irqs(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, [])
        self.msix_enabled = 0

    def wait_irq(self, vector: int, timeout: float | None) -> bool:
        fired = super().wait_irq(vector, timeout)
        counts = self.irq_wakeups if fired else self.irq_timeouts
        counts[vector] = counts.get(vector, 0) + 1
        return fired

    def close(self) -> None:
        """Disable MSI-X, unmap DMA, release the BAR and huge-page mappings, close fds.
        The function stays bound to vfio-pci."""
        errors = []
        if self.msix_enabled and self.device_fd >= 0:
            try:
                self._disable_msix()
            except VfioBusError as e:
                errors.append(e)
        self.close_irqs()
        unmap_all(self._bars)
        for c in self._chunks:
            if c.mapped and self.container >= 0:
                um = bytearray(_DMA_UNMAP.pack(_DMA_UNMAP.size, 0, c.iova, c.size))
                try:
                    _ioctl(self.container, VFIO_IOMMU_UNMAP_DMA, um, f"(iova {c.iova:#x})")
                    c.mapped = False
                except VfioBusError as e:
                    errors.append(e)
            try:
                c.mem.close()
            except BufferError:
                pass        # a DmaBuffer view still exists; the mapping goes with the process
        self._chunks.clear()
        for name in ("device_fd", "group_fd", "container"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if errors:
            raise errors[0]

    def __enter__(self) -> "VfioBus":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
