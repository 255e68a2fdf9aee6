"""The host bus: a vfio-user client that plays QEMU's part, minus the VM.

It connects to the device process, hands it a memfd as "guest RAM" (one DMA
mapping), gives it eventfds as MSI-X vectors, and maps the doorbell page the
device offers.  The miniport runs on it unchanged.
"""
from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import socket

from ... import vfio_user as vu
from . import DeviceGone, DmaBuffer, EventfdIrqs, unmap_all

RAM_IOVA = 0x1_0000_0000     # above 4 GiB, so that 64-bit addresses get exercised


class VfioUserError(Exception):
    def __init__(self, cmd: int, err: int):
        super().__init__(f"{vu.COMMAND_NAMES.get(cmd, cmd)} failed: "
                         f"{errno.errorcode.get(err, err)} ({os.strerror(err) if err else 'no errno'})")
        self.errno = err
        self.cmd = cmd


class VfioUserClient:
    """Lock-step requests over the socket: one message out, its reply in."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._ids = itertools.count(1)

    def send_raw(self, data: bytes, fds=()) -> None:
        try:
            vu.send_msg(self.sock, data, fds)
        except OSError as e:
            raise DeviceGone(f"device connection lost: {e}") from None

    def recv_reply(self) -> tuple[tuple, bytes, list[int]]:
        fds: list[int] = []
        try:
            raw = vu.recv_exact(self.sock, vu.HDR_SIZE, fds)
            if raw is None:
                raise DeviceGone("device closed the connection")
            hdr = vu.HDR.unpack(raw)
            body = vu.recv_exact(self.sock, hdr[2] - vu.HDR_SIZE, fds) if hdr[2] > vu.HDR_SIZE else b""
            if body is None:
                raise DeviceGone("device closed the connection mid-reply")
        except socket.timeout:
            raise DeviceGone("device did not answer in time") from None
        except (ConnectionError, OSError) as e:
            if isinstance(e, DeviceGone):
                raise
            raise DeviceGone(f"device connection lost: {e}") from None
        return hdr, body, fds

    def request(self, cmd: int, payload: bytes = b"", fds=(), *, no_reply: bool = False,
                check: bool = True) -> tuple[bytes, list[int]]:
        msg_id = next(self._ids) & 0xFFFF
        flags = vu.NO_REPLY if no_reply else 0
        self.send_raw(vu.HDR.pack(msg_id, cmd, vu.HDR_SIZE + len(payload), flags, 0) + payload, fds)
        if no_reply:
            return b"", []
        (rid, rcmd, _size, rflags, err), body, rfds = self.recv_reply()
        if rid != msg_id or rcmd != cmd or rflags & vu.TYPE_MASK != vu.TYPE_REPLY:
            raise DeviceGone(f"reply {rid}/{rcmd} does not match request {msg_id}/{cmd}")
        if rflags & vu.ERROR and check:
            for fd in rfds:
                os.close(fd)
            raise VfioUserError(cmd, err)
        return body, rfds

    def close(self) -> None:
        self.sock.close()


class VfioUserBus(EventfdIrqs):
    def __init__(self, socket_path: str, ram_size: int = 64 << 20, timeout: float = 10.0):
        super().__init__()
        self.client = VfioUserClient(socket_path, timeout)
        caps = {"capabilities": {"max_msg_fds": vu.MAX_MSG_FDS, "max_data_xfer_size": vu.MAX_DATA_XFER,
                                 "pgsizes": 4096, "max_dma_maps": 65535}}
        text = json.dumps(caps).encode() + b"\0"
        self.client.request(vu.VERSION, vu.VERSION_HDR.pack(0, 0) + text)
        body, _ = self.client.request(vu.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(vu.DEVICE_INFO.size, 0, 0, 0))
        _, self.flags, self.num_regions, self.num_irqs = vu.DEVICE_INFO.unpack(body)
        self.regions = {i: self._region_info(i) for i in range(min(self.num_regions, vu.PCI_NUM_REGIONS))}
        # Guest RAM: one memfd, mapped for the device at RAM_IOVA.
        self.ram_fd = os.memfd_create("chimney-hostbus-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, ram_size)
        self.ram = mmap.mmap(self.ram_fd, ram_size)
        self.ram_size = ram_size
        self._next = 0
        self.client.request(vu.DMA_MAP, vu.DMA_MAP_MSG.pack(
            vu.DMA_MAP_MSG.size, vu.DMA_READ_FLAG | vu.DMA_WRITE_FLAG, 0, RAM_IOVA, ram_size),
            [self.ram_fd])
        self._bars: dict[int, mmap.mmap] = {}

    def _region_info(self, index: int) -> dict:
        argsz = vu.REGION_INFO.size
        for _ in range(2):
            body, fds = self.client.request(vu.DEVICE_GET_REGION_INFO,
                                            vu.REGION_INFO.pack(argsz, 0, index, 0, 0, 0))
            need, flags, _, cap_off, size, offset = vu.REGION_INFO.unpack_from(body)
            if need <= argsz:
                break
            for fd in fds:
                os.close(fd)
            argsz = need        # ask again with room for the capabilities
        info = {"flags": flags, "size": size, "offset": offset, "fd": fds[0] if fds else None,
                "areas": []}
        for fd in fds[1:]:
            os.close(fd)
        if flags & vu.REGION_FLAG_CAPS and cap_off:
            cid, _ver, _next = vu.CAP_HEADER.unpack_from(body, cap_off)
            if cid == vu.REGION_INFO_CAP_SPARSE_MMAP:
                n, _ = vu.SPARSE_MMAP_HDR.unpack_from(body, cap_off + vu.CAP_HEADER.size)
                base = cap_off + vu.CAP_HEADER.size + vu.SPARSE_MMAP_HDR.size
                info["areas"] = [vu.SPARSE_MMAP_AREA.unpack_from(body, base + 16 * i) for i in range(n)]
        return info

    # -- the bus interface ---------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._read(vu.PCI_CONFIG_REGION, offset, size), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._write(vu.PCI_CONFIG_REGION, offset, value.to_bytes(size, "little"))

    def reg_read(self, bar: int, offset: int, size: int = 4) -> int:
        return int.from_bytes(self._read(bar, offset, size), "little")

    def reg_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self._write(bar, offset, value.to_bytes(size, "little"))

    def _read(self, region: int, offset: int, count: int) -> bytes:
        body, _ = self.client.request(vu.REGION_READ, vu.REGION_RW.pack(offset, region, count))
        return body[vu.REGION_RW.size:vu.REGION_RW.size + count]

    def _write(self, region: int, offset: int, data: bytes) -> None:
        self.client.request(vu.REGION_WRITE, vu.REGION_RW.pack(offset, region, len(data)) + data)

    def map_bar(self, bar: int):
        if bar not in self._bars:
            info = self.regions[bar]
            if not info["flags"] & vu.REGION_FLAG_MMAP or info["fd"] is None:
                raise OSError(errno.EINVAL, f"BAR{bar} is not mappable")
            self._bars[bar] = mmap.mmap(info["fd"], info["size"], offset=info["offset"])
        return self._bars[bar]

    def dma_alloc(self, size: int, align: int = 4096) -> DmaBuffer:
        start = (self._next + align - 1) // align * align
        if start + size > self.ram_size:
            raise MemoryError(f"host-bus RAM exhausted ({self.ram_size} bytes)")
        self._next = start + size
        return DmaBuffer(memoryview(self.ram)[start:start + size], RAM_IOVA + start)

    def enable_msix(self, nvectors: int) -> None:
        fds = self.create(nvectors)
        # a message carries at most MAX_MSG_FDS fds: hand the vectors over in slices
        for start in range(0, nvectors, vu.MAX_MSG_FDS):
            part = fds[start:start + vu.MAX_MSG_FDS]
            self.client.request(vu.DEVICE_SET_IRQS, vu.IRQ_SET.pack(
                vu.IRQ_SET.size, vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_TRIGGER,
                vu.PCI_MSIX_IRQ, start, len(part)), part)

    def close(self) -> None:
        unmap_all(self._bars)
        for info in self.regions.values():
            if info["fd"] is not None:
                os.close(info["fd"])
        self.regions = {}
        self.client.close()
        self.close_irqs()
        try:
            self.ram.close()
        except BufferError:
            pass            # a DmaBuffer view still exists; the mapping goes with the process
        os.close(self.ram_fd)
