"""The guest's host stack, lower layers: Ethernet, ARP, IPv4, ICMPv4, IPv6,
neighbour discovery and ICMPv6, one module per protocol, stdlib only.

`Interface` (iface.py) ties them together over a `send_frame` callable and an
injected clock; `driver.run_on_miniport` feeds it from a Miniport.
"""
from .driver import attach, ping_on_miniport, run_on_miniport
from .ether import FrameError
from .iface import Interface

__all__ = ["Interface", "FrameError", "attach", "run_on_miniport", "ping_on_miniport"]
