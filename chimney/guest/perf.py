"""`python3 -m chimney.guest.perf`: chimney perf (chimney.guest.tools.perf); this
module path stays for the documented commands and for code that imports the stacks."""
from .tools.perf import main
from .tools.stacks import ChimneyStack, LinuxStack, make_stack

__all__ = ["ChimneyStack", "LinuxStack", "main", "make_stack"]

if __name__ == "__main__":
    raise SystemExit(main())
