"""`python3 -m chimney.guest.iperf3`: chimney iperf3 (chimney.guest.tools.iperf3); this
module path stays for the documented commands."""
from .tools.iperf3 import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
