"""`python3 -m chimney.guest.rr`: chimney rr (chimney.guest.tools.rr); this module path
stays for the documented commands."""
from .tools.rr import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
