"""Ethernet II frames, optionally with one 802.1Q tag."""
from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
BROADCAST = b"\xff" * 6
HEADER_LEN = 14
MIN_FRAME = 60          # without FCS; shorter frames are padded on build


class FrameError(ValueError):
    """Malformed input; `reason` is a short stats key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def mac_bytes(mac) -> bytes:
    """b'\\x02...' or '02:00:...' -> 6 bytes."""
    if isinstance(mac, (bytes, bytearray)):
        b = bytes(mac)
    else:
        b = bytes.fromhex(str(mac).replace(":", "").replace("-", ""))
    if len(b) != 6:
        raise ValueError(f"bad MAC {mac!r}")
    return b


def mac_str(mac: bytes) -> str:
    return bytes(mac).hex(":")


def is_multicast(mac: bytes) -> bool:
    return bool(mac[0] & 1)


@dataclass
class Frame:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes
    vlan: int | None = None     # the whole TCI (PCP/DEI/VID) when tagged

    @property
    def vid(self) -> int | None:
        return None if self.vlan is None else self.vlan & 0x0FFF


def parse(data: bytes) -> Frame:
    if len(data) < HEADER_LEN:
        raise FrameError("truncated", f"{len(data)}-byte frame")
    dst, src, etype = bytes(data[0:6]), bytes(data[6:12]), struct.unpack_from("!H", data, 12)[0]
    off, vlan = HEADER_LEN, None
    if etype == ETH_P_8021Q:
        if len(data) < HEADER_LEN + 4:
            raise FrameError("truncated", "802.1Q tag cut short")
        vlan, etype = struct.unpack_from("!HH", data, 14)
        off += 4
    if etype < 0x0600:
        raise FrameError("not_ethernet_ii", f"length field {etype}")
    return Frame(dst, src, etype, bytes(data[off:]), vlan)


def build(dst, src, ethertype: int, payload: bytes, vlan: int | None = None, pad: bool = True) -> bytes:
    hdr = mac_bytes(dst) + mac_bytes(src)
    if vlan is not None:
        hdr += struct.pack("!HH", ETH_P_8021Q, vlan & 0xFFFF)
    out = hdr + struct.pack("!H", ethertype) + bytes(payload)
    if pad and len(out) < MIN_FRAME:
        out += bytes(MIN_FRAME - len(out))
    return out
