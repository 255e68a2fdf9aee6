"""chimney.host.harness as a pytest plugin for other projects: loaded by the
package's ``pytest11`` entry point, the ``vm`` marker registered by the
plugin, VM tests grouped per module for pytest-xdist, VM_OPTIONS checked,
boot failures pointing at the artifacts folder.

The outside project is a throw-away directory with its own test files, run
with ``python -m pytest`` in a subprocess.  chimney's metadata there is what
``pip install`` writes from pyproject.toml (a dist-info with its entry
points), put on PYTHONPATH beside this checkout."""
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import chimney
from chimney.host import harness

CHECKOUT = Path(__file__).resolve().parents[1]


def _site(tmp_path: Path) -> Path:
    """A site directory with chimney's dist-info as pip would write it (entry points from pyproject.toml)."""
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    version = chimney.__version__                   # pyproject's version is dynamic: this is its source
    info = site / f"chimney-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: chimney\nVersion: {version}\n")
    lines = []
    for group, eps in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


def _pytest(tmp_path: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{_site(tmp_path)}{os.pathsep}{CHECKOUT}"}
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _project(tmp_path: Path, files: dict[str, str]) -> Path:
    proj = tmp_path / "outside"
    proj.mkdir()
    for name, text in files.items():
        (proj / name).write_text(textwrap.dedent(text))
    return proj


def test_vm_options_are_checked():
    assert harness.check_vm_options({"virtio_net": False, "memory_mb": 512}) == {"virtio_net": False,
                                                                               "memory_mb": 512}
    with pytest.raises(harness.VmOptionsError) as err:
        harness.check_vm_options({"virtio": False, "memory": 1}, "t.VM_OPTIONS")
    text = str(err.value)
    assert text.startswith("t.VM_OPTIONS: unknown keys 'memory', 'virtio'; allowed: ")
    for key in ("accel", "impair", "memory_mb", "virtio_net", "network"):
        assert key in text.split("allowed: ")[1]
    for key in ("workdir", "remove_workdir", "self"):  # the harness sets these itself
        assert key not in text.split("allowed: ")[1].split(", ")
    with pytest.raises(harness.VmOptionsError, match="must be a dict"):
        harness.check_vm_options(["virtio_net"])


def test_xdist_load_becomes_loadgroup():
    lines = []
    config = SimpleNamespace(option=SimpleNamespace(numprocesses=4, dist="load"),
                             addinivalue_line=lambda kind, line: lines.append((kind, line)),
                             pluginmanager=SimpleNamespace(hasplugin=lambda name: True))
    harness.pytest_configure(config)
    assert config.option.dist == "loadgroup"
    assert ("markers", "vm: boots a QEMU virtual machine (slow under TCG)") in lines
    config.option.dist = "loadscope"  # a mode the user chose stays
    harness.pytest_configure(config)
    assert config.option.dist == "loadscope"


def test_outside_project_gets_marker_groups_and_option_errors(tmp_path):
    """Collected with --strict-markers (the `vm` marker comes from the plugin),
    VM tests grouped per module, an unknown VM_OPTIONS key a one-line error
    that names the allowed keys; nothing boots."""
    proj = _project(tmp_path, {
        "conftest.py": """
            def pytest_collection_finish(session):
                for item in session.items:
                    m = item.get_closest_marker("xdist_group")
                    print("GROUP", item.nodeid, m.kwargs["name"] if m else None)
            """,
        "test_a.py": """
            import pytest
            pytestmark = pytest.mark.vm
            VM_OPTIONS = {"virtio": False}
            def test_one(vm):
                pass
            def test_plain():
                pass
            """,
        "test_b.py": """
            def test_two(peer):
                pass
            def test_none():
                pass
            """,
    })
    co = _pytest(tmp_path, proj, "--strict-markers", "--co", "-q", "-s")
    assert co.returncode == 0, co.stdout + co.stderr
    groups = dict(line.split()[1:] for line in co.stdout.splitlines() if line.startswith("GROUP "))
    assert groups == {"test_a.py::test_one": "chimney-vm:test_a.py", "test_a.py::test_plain": "chimney-vm:test_a.py",
                      "test_b.py::test_two": "chimney-vm:test_b.py", "test_b.py::test_none": "None"}
    run = _pytest(tmp_path, proj, "-q", "test_a.py::test_one")
    assert run.returncode == 1, run.stdout
    assert "test_a.VM_OPTIONS: unknown key 'virtio'; allowed: accel, append," in run.stdout, run.stdout
    assert "Traceback" not in run.stdout and "1 error" in run.stdout


def test_conftest_and_entry_point_load_the_harness_once(tmp_path):
    """This suite's conftest with the entry point installed: one plugin, its fixtures there."""
    r = _pytest(tmp_path, CHECKOUT, "--fixtures", "-q", "tests/test_offload_codec.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vm [module scope]" in r.stdout and "vm_factory" in r.stdout


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_outside_project_boots_a_vm(tmp_path):
    """One short VM test in the outside project passes; a VM that cannot boot
    (64 MiB) fails with QEMU's reason and names its artifacts folder."""
    proj = _project(tmp_path, {
        "test_guest.py": """
            import pytest
            pytestmark = pytest.mark.vm

            def test_guest_answers(vm, peer):
                assert vm.run("echo outside").stdout == b"outside\\n"
                assert peer.nic.peer4 in peer.run("ip", "-br", "addr").stdout
            """,
        "test_tiny.py": """
            VM_OPTIONS = {"memory_mb": 64, "network": False}

            def test_never_boots(vm):
                pass
            """,
    })
    r = _pytest(tmp_path, proj, "-q", "--strict-markers")
    out = r.stdout
    assert "1 passed" in out and "1 error" in out, out + r.stderr
    assert "initrd too large for --memory 64" in out, out
    folder = proj / "artifacts" / "test_tiny-boot"
    assert f"artifacts: {folder} (" in out, out
    assert (folder / "qemu.log").is_file() and "initrd" in (folder / "qemu.log").read_text()


def test_xdist_keeps_each_module_on_one_worker(tmp_path):
    """`-n 2`: every module's VM tests on one worker, whichever it is (the
    tests here only carry the marker, so nothing boots)."""
    body = """
        import os
        import pytest
        pytestmark = pytest.mark.vm

        @pytest.mark.parametrize("i", range(4))
        def test_where(i):
            with open(os.environ["WHERE_LOG"], "a") as f:
                f.write(f"{__name__} {os.environ['PYTEST_XDIST_WORKER']}\\n")
        """
    proj = _project(tmp_path, {"test_m1.py": body, "test_m2.py": body, "test_m3.py": body})
    log = tmp_path / "where.log"
    os.environ["WHERE_LOG"] = str(log)
    try:
        r = _pytest(tmp_path, proj, "-q", "-n", "2", "--strict-markers")
    finally:
        del os.environ["WHERE_LOG"]
    assert r.returncode == 0 and "12 passed" in r.stdout, r.stdout + r.stderr
    workers: dict[str, set] = {}
    for line in log.read_text().splitlines():
        module, worker = line.split()
        workers.setdefault(module, set()).add(worker)
    assert sorted(workers) == ["test_m1", "test_m2", "test_m3"]
    assert all(len(w) == 1 for w in workers.values()), workers
