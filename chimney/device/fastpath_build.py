"""cffi (API mode) build of the device's C fast path: chimney.device._fastpath.

Five compilation units -- fastpath.c (DMA, plain-frame queues, SIGBUS guard),
toe.c (the offload fast path), impair.c (the impaired link), wire.c (the
TAP's virtio-net header, software segmentation, checksums) and pcap.c (the
wire capture's records) -- share
fastpath.h, which includes hw.h, the header generated from chimney/hw.py
(descriptor layouts, registers, flags and stat indices have one definition).
The cdef is fastpath.h's "cdef" section, so no structure is declared twice.
Built by the package's own build (setup.py's cffi_modules), or on demand by
`python -m chimney.device.fastpath_build`.
"""
import importlib.util
import pathlib
import re
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
UNITS = ("fastpath.c", "toe.c", "impair.c", "wire.c", "pcap.c")
HEADER = HERE / "fastpath.h"
HW_HEADER = HERE / "hw.h"


def _load_hw():
    # Load chimney/hw.py by path: at build time the package may not be importable.
    spec = importlib.util.spec_from_file_location("_chimney_hw", HERE.parent / "hw.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod       # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def write_hw_header(hw) -> None:
    """hw.h is checked in (so the C reads on its own) and rewritten when hw.py changed."""
    text = hw.c_header()
    if not HW_HEADER.exists() or HW_HEADER.read_text() != text:
        HW_HEADER.write_text(text)


def cdef_text(hw) -> str:
    """fastpath.h's cdef section, with the one constant its declarations use."""
    src = HEADER.read_text()
    m = re.search(r"/\* cdef: begin \*/(.*?)/\* cdef: end \*/", src, re.DOTALL)
    if m is None:
        raise RuntimeError(f"{HEADER}: no 'cdef: begin' ... 'cdef: end' section")
    return f"#define MAX_FRAME {hw.MAX_FRAME}\n" + m.group(1)


def _rel(p: pathlib.Path) -> str:
    # setuptools wants sources relative to setup.py; ffibuilder.compile runs in ROOT too.
    return str(p.relative_to(ROOT))


_hw = _load_hw()
write_hw_header(_hw)

ffibuilder = FFI()
ffibuilder.cdef(cdef_text(_hw))
ffibuilder.set_source(
    "chimney.device._fastpath",
    '#include "fastpath.h"\n',
    sources=[_rel(HERE / u) for u in UNITS],
    include_dirs=[_rel(HERE)],
    depends=[_rel(HEADER), _rel(HW_HEADER)],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT), verbose=False)
