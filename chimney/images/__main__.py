"""python -m chimney.images {build [--force] | status}"""

from __future__ import annotations

import argparse
import sys

from . import BuildError, build_all, cache_root, debian_mirror, stages
from ._cache import console, human_size


def _status() -> int:
    out = console()
    out.print(f"cache: {cache_root()}", soft_wrap=True)
    missing = 0
    for st in stages():
        if st.is_built():
            m = st.manifest()
            extra = st.summary(m)
            out.print(f"[green]built[/green]   {st.name:<13} {st.key()}  {human_size(m.get('size_bytes', 0)):>10}  "
                      f"built {m.get('built_at', '?')[:16]} in {m.get('build_seconds', 0):.1f} s"
                      + (f"  ({extra})" if extra else ""), soft_wrap=True)
            out.print(f"        {st.path}", soft_wrap=True, style="dim")
        else:
            missing += 1
            out.print(f"[yellow]missing[/yellow] {st.name:<13} {st.key()}", soft_wrap=True)
        for old in st.others():
            out.print(f"[dim]stale   {old.name}[/dim]", soft_wrap=True)
    try:
        out.print(f"Debian mirror: {debian_mirror()}")
    except BuildError as e:
        out.print(f"[red]{e}")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chimney.images",
                                 description="Build or inspect chimney's cached QEMU runtime and guest image.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build what is missing or out of date")
    b.add_argument("--force", action="store_true", help="rebuild every stage")
    sub.add_parser("status", help="show the cache (exit status 1 if something is not built)")
    args = ap.parse_args(argv)
    if args.cmd == "status":
        return _status()
    try:
        rt, img = build_all(force=args.force)
    except BuildError as e:
        console().print(f"[red]build failed:[/red] {e}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console().print("[red]interrupted[/red] (nothing was added to the cache)")
        return 130
    console().print(f"QEMU {rt.version}: {rt.root}", soft_wrap=True)
    console().print(f"guest: kernel {img.kernel_version}, Python {img.python_version}: {img.kernel.parent}",
                    soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
