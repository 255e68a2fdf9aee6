"""Packaging: one source for the version, runtime dependencies that are exactly what
the package imports at run time, and a guest share holding only the chimney
package when chimney runs from an installed (not editable) copy."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import chimney
from chimney.host import qemu

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# distribution -> the top-level module it provides
MODULE_OF = {"cffi": "cffi", "qemu.qmp": "qemu", "rich": "rich", "pytest": "pytest", "scapy": "scapy",
             "matplotlib": "matplotlib", "pytest-xdist": "xdist", "ruff": "ruff"}


def _dist(req: str) -> str:
    for i, c in enumerate(req):
        if c in "<>=!~;[ ":
            return req[:i]
    return req


def third_party_imports(paths) -> set[str]:
    found = set()
    for f in paths:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top != "chimney" and top not in sys.stdlib_module_names:
                    found.add(top)
    return found


def test_version_has_one_source():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "chimney.__version__"}
    r = subprocess.run([sys.executable, "-m", "chimney.cli", "--version"], capture_output=True, text=True,
                       check=False, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"chimney {chimney.__version__}"


def test_license():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}


def test_runtime_dependencies_are_what_the_package_imports():
    files = list((ROOT / "chimney").rglob("*.py"))
    # the pytest plugin runs under pytest; the demo's plots need the plots extra
    runtime = [f for f in files if f.name not in ("harness.py", "fastpath_build.py")]
    deps = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {k: {_dist(r) for r in v} for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    # the compiled fast path (chimney/device/_fastpath*.so) imports cffi's _cffi_backend
    imported = third_party_imports(runtime) - {"matplotlib"} | {"cffi"}
    assert imported == {MODULE_OF[d] for d in deps}, (imported, deps)
    assert "pytest" in extras["test"] and "matplotlib" in extras["plots"]
    local = {f.stem for f in (ROOT / "tests").glob("*.py")}     # the tests' own helper modules
    test_imports = third_party_imports((ROOT / "tests").glob("*.py")) - imported - local
    assert test_imports <= {MODULE_OF[d] for d in extras["test"]}, test_imports
    for r in PYPROJECT["project"]["dependencies"]:       # pre-1.0: capped below the next minor
        if ">=0." in r:
            assert "<0." in r, r


def test_guest_share_is_the_checkout_here():
    assert qemu.guest_share() == ROOT


def test_guest_share_of_an_installed_package_holds_only_chimney(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "chimney" / "guest").mkdir(parents=True)
    (site / "chimney" / "__init__.py").write_text("x = 1\n")
    (site / "chimney" / "guest" / "a.py").write_text("y = 2\n")
    (site / "chimney" / "_fast.so").write_bytes(b"\x7fELF")
    (site / "othermod").mkdir()
    (site / "othermod" / "__init__.py").write_text("")
    monkeypatch.setattr(qemu, "CHECKOUT", site)
    monkeypatch.setenv("CHIMNEY_CACHE", str(tmp_path / "cache"))
    share = qemu.guest_share()
    assert share != site and sorted(p.name for p in share.iterdir()) == ["chimney"]
    assert (share / "chimney" / "guest" / "a.py").read_text() == "y = 2\n"
    assert not (share / "chimney" / "_fast.so").exists()        # host-built binaries stay on the host
    assert qemu.guest_share() == share                          # one copy per content
    (site / "chimney" / "guest" / "a.py").write_text("y = 3\n")
    assert qemu.guest_share() != share
