"""The host stack's offload manager (`manager.py`: policy, state trees, offload and
upload) and the paths it puts in a socket's logical switch while the NIC carries a
connection (`path.py`: `HandoverPath`, `OffloadPath`)."""
from .manager import MS_KEY, POLICIES, OffloadManager, rss_hash, toeplitz
from .path import HandoverPath, OffloadPath, data_rcv_end, data_snd_una

__all__ = ["MS_KEY", "POLICIES", "HandoverPath", "OffloadManager", "OffloadPath", "data_rcv_end",
           "data_snd_una", "rss_hash", "toeplitz"]
