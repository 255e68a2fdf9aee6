"""Build cache machinery shared by the image recipes.

A *stage* is one cached build product: a directory ``<cache>/<name>-<key>``
where ``key`` hashes the stage's recipe files and the keys of the stages it
builds on.  A stage is built in a temporary directory next to its final place
and renamed into place only when complete, so an interrupted build never leaves
a half-built cache entry behind.  A per-stage ``flock`` lets concurrent callers
wait for one build instead of racing.

Nothing here knows what the stages contain; see ``_runtime.py``,
``_guestroot.py`` and ``_guest.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

HERE = Path(__file__).resolve().parent

# Bump when the cache layout itself (not a recipe) changes incompatibly.
CACHE_FORMAT = "1"

# Written into every built stage directory (its presence marks a complete build).
MANIFEST = "manifest.json"
BUILD_LOG = "build.log"


class BuildError(RuntimeError):
    """A recipe step failed; the message carries the tail of its log."""


# --------------------------------------------------------------------------
# locations


def cache_root() -> Path:
    """Root of the image cache: ``$CHIMNEY_CACHE`` or ``~/.cache/chimney``."""
    env = os.environ.get("CHIMNEY_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "chimney").resolve()


def _parse_deb822(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, last = {}, None
            continue
        if line[0] in " \t" and last:
            stanza[last] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            last = key.strip().lower()
            stanza[last] = value.strip()
    if stanza:
        yield stanza


def _apt_source_candidates(etc: Path) -> Iterator[tuple[str, list[str]]]:
    """(uri, suites) for every enabled ``deb`` source in the host apt config."""
    d = etc / "sources.list.d"
    for f in sorted(d.glob("*.sources")) if d.is_dir() else []:
        for st in _parse_deb822(f.read_text(errors="replace")):
            if st.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in st.get("types", "").split():
                continue
            for uri in st.get("uris", "").split():
                yield uri, st.get("suites", "").split()
    lists = [etc / "sources.list"]
    if d.is_dir():
        lists += sorted(d.glob("*.list"))
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # [arch=... signed-by=...]
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = words[1:]
            if len(words) >= 2:
                yield words[0], [words[1]]


def debian_mirror(etc: Path | str = "/etc/apt") -> str:
    """URI of the Debian archive to build from.

    ``$CHIMNEY_DEBIAN_MIRROR`` if set, else the first non-security ``deb``
    source of the host's apt configuration (deb822 ``*.sources`` files first,
    then one-line ``sources.list`` entries).  Never hard-coded.
    """
    env = os.environ.get("CHIMNEY_DEBIAN_MIRROR", "").strip()
    if env:
        return env.rstrip("/")
    for uri, suites in _apt_source_candidates(Path(etc)):
        if not re.match(r"^(https?|file):", uri):
            continue
        if "security" in uri or any(s.endswith("-security") or s.endswith("/updates") for s in suites):
            continue
        return uri.rstrip("/")
    raise BuildError(
        "no Debian mirror found in the host's apt configuration "
        f"({etc}/sources.list.d/*.sources, {etc}/sources.list); "
        "set CHIMNEY_DEBIAN_MIRROR to the archive URI"
    )


# --------------------------------------------------------------------------
# output


_console = None


def console():
    """The rich console used for build progress (stderr)."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, highlight=False)
    return _console


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def tree_size(path: Path) -> int:
    """Apparent size of a tree (files counted once per inode, links not followed)."""
    if path.is_file():
        return path.stat().st_size
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


# --------------------------------------------------------------------------
# running steps


def _die_with_parent() -> None:
    """In a child before exec: get SIGKILL when the builder dies (even by
    SIGKILL), instead of writing on into a build directory being removed."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


class Builder:
    """Runs a stage's steps: a spinner with elapsed time per step, command
    output captured to the stage's ``build.log``."""

    def __init__(self, stage: "Stage", tmp: Path, progress):
        self.stage = stage
        self.tmp = tmp
        self.progress = progress
        self.log_path = tmp / BUILD_LOG
        self._log = open(self.log_path, "ab", buffering=0)
        self.timings: dict[str, float] = {}

    def close(self) -> None:
        self._log.close()

    def log(self, text: str) -> None:
        self._log.write(text.encode() + b"\n")

    @contextlib.contextmanager
    def step(self, description: str):
        """A build step: a live spinner with elapsed time on a terminal, a
        start and an end line otherwise."""
        label = f"{self.stage.name}: {description}"
        t0 = time.monotonic()
        self.log(f"### {description}")
        if self.progress is not None:
            task = self.progress.add_task(label, total=1)
        else:
            console().print(f"  … {label}", soft_wrap=True)
        try:
            yield
        except BaseException:
            if self.progress is not None:
                self.progress.update(task, description=f"[red]{label} (failed)")
                self.progress.stop_task(task)
            else:
                console().print(f"  [red]✗[/red] {label} (failed after {time.monotonic() - t0:.1f} s)",
                                soft_wrap=True)
            raise
        finally:
            self.timings[description] = round(time.monotonic() - t0, 2)
        if self.progress is not None:
            self.progress.update(task, completed=1)
        else:
            console().print(f"  [green]✓[/green] {label} ({time.monotonic() - t0:.1f} s)", soft_wrap=True)

    def run(self, argv: Sequence[str | os.PathLike], *, env: dict | None = None,
            cwd: Path | None = None, stdout=None) -> None:
        """Run a command; its output goes to the build log (stdout optionally
        to a file object).  Raises BuildError with the log's tail on failure."""
        argv = [os.fspath(a) for a in argv]
        self.log("$ " + " ".join(argv))
        full_env = None if env is None else {**os.environ, **env}
        rc = subprocess.call(argv, stdin=subprocess.DEVNULL,
                             stdout=stdout if stdout is not None else self._log,
                             stderr=self._log, env=full_env, cwd=cwd, preexec_fn=_die_with_parent)
        if rc != 0:
            raise BuildError(f"{self.stage.name}: command failed (exit {rc}): "
                             f"{' '.join(argv)[:300]}\n{self.tail()}")

    def capture(self, argv: Sequence[str | os.PathLike], *, env: dict | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        argv = [os.fspath(a) for a in argv]
        self.log("$ " + " ".join(argv))
        full_env = None if env is None else {**os.environ, **env}
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, env=full_env, preexec_fn=_die_with_parent)
        self.log(p.stdout + p.stderr + f"[exit {p.returncode}]")
        if check and p.returncode != 0:
            raise BuildError(f"{self.stage.name}: command failed (exit {p.returncode}): "
                             f"{' '.join(argv)[:300]}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        return p

    def tail(self, lines: int = 40) -> str:
        try:
            data = self.log_path.read_bytes()[-16384:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------
# stages


@dataclass
class Stage:
    """One cached build product.

    ``inputs`` are file names (relative to this package) whose contents define
    the recipe; ``deps`` are stages whose keys feed into this one's key;
    ``build(tmp, builder)`` fills ``tmp`` and returns manifest entries;
    ``summary(manifest)`` gives the short description shown when cached.
    """

    name: str
    inputs: Sequence[str]
    build: Callable[[Path, Builder], dict]
    deps: Sequence["Stage"] = ()
    summary: Callable[[dict], str] = lambda m: ""
    _announced: bool = field(default=False, repr=False)

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(f"chimney-cache {CACHE_FORMAT} {self.name} {DPKG_PATH_FILTERS}\n".encode())
        for name in sorted(self.inputs):
            data = (HERE / name).read_bytes()
            h.update(f"{name} {len(data)}\n".encode())
            h.update(data)
        for dep in self.deps:
            h.update(f"dep {dep.name} {dep.key()}\n".encode())
        return h.hexdigest()[:16]

    @property
    def path(self) -> Path:
        return cache_root() / f"{self.name}-{self.key()}"

    def is_built(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    def others(self) -> list[Path]:
        """Cache entries of this stage other than the current one (stale)."""
        root = cache_root()
        if not root.is_dir():
            return []
        pat = re.compile(re.escape(self.name) + r"-[0-9a-f]{16}$")
        return [p for p in root.iterdir() if pat.match(p.name) and p != self.path]

    def get(self, *, build: bool = True, force: bool = False, quiet: bool = False) -> Path:
        """The stage's directory: built if needed (build=True), else it must exist."""
        if build:
            return self.ensure(force=force, quiet=quiet)
        if not self.is_built():
            raise FileNotFoundError(f"{self.name} is not built ({self.path}); "
                                    "run: python -m chimney.images build")
        return self.path

    def ensure(self, *, force: bool = False, quiet: bool = False) -> Path:
        """Return the stage's directory, building it (and its deps) if needed."""
        for dep in self.deps:
            dep.ensure(quiet=quiet)
        path = self.path
        if path.is_dir() and (path / MANIFEST).is_file() and not force:
            self._announce(quiet)
            return path
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".lock-{self.name}", self.name):
            if path.is_dir() and (path / MANIFEST).is_file() and not force:
                self._announce(quiet)  # someone else built it while we waited
                return path
            self._build(path)
        self._announced = True
        return path

    def _announce(self, quiet: bool) -> None:
        if self._announced or quiet:
            return
        self._announced = True
        m = self.manifest()
        extra = self.summary(m)
        console().print(
            f"[green]✓[/green] {self.name} cached"
            + (f" ({extra})" if extra else "")
            + f": {self.path}", soft_wrap=True)

    def _build(self, path: Path) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        root = path.parent
        # Leftovers of killed builds of this stage (we hold its lock).
        pat = re.compile(re.escape(f".tmp-{self.name}-") + r"[0-9a-f]{16}-\d+$")
        for stale in root.iterdir():
            if pat.match(stale.name):
                _rmtree(stale)
        tmp = root / f".tmp-{self.name}-{self.key()}-{os.getpid()}"
        tmp.mkdir()
        t0 = time.monotonic()
        progress = None
        if console().is_terminal:
            progress = Progress(SpinnerColumn(finished_text="[green]✓"), TimeElapsedColumn(),
                                TextColumn("{task.description}"), console=console(), transient=False)
        builder = Builder(self, tmp, progress)
        try:
            with progress if progress is not None else contextlib.nullcontext():
                manifest = self.build(tmp, builder)
        except BaseException:
            builder.close()
            keep = root / f".failed-{self.name}.log"
            with contextlib.suppress(OSError):
                shutil.copyfile(builder.log_path, keep)
                console().print(f"[red]✗ {self.name} build failed[/red]; log: {keep}")
            _rmtree(tmp)
            raise
        builder.close()
        manifest = dict(manifest)
        manifest.update(
            stage=self.name, key=self.key(), built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            build_seconds=round(time.monotonic() - t0, 1), step_seconds=builder.timings,
            deps={d.name: d.key() for d in self.deps},
        )
        manifest["size_bytes"] = tree_size(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if path.exists():  # --force: swap the new build in, then drop the old one
            old = root / f".old-{self.name}-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        for p in [old, *self.others(), root / f".failed-{self.name}.log"]:
            if p is not None:
                _rmtree(p)
        console().print(
            f"[green]✓[/green] {self.name} built in {manifest['build_seconds']:.1f} s "
            f"({human_size(manifest['size_bytes'])}"
            + (f", {self.summary(manifest)}" if self.summary(manifest) else "")
            + f"): {path}", soft_wrap=True)


@contextlib.contextmanager
def _locked(lockfile: Path, name: str):
    with open(lockfile, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with console().status(f"waiting for another process building {name}"):
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mounts_under(path: Path) -> list[str]:
    prefix = os.fspath(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")  # \040 for spaces
            if mnt.startswith(prefix):
                found.append(mnt)
    return found


def _rmtree(path: Path) -> None:
    """Remove a (possibly half-built) tree, but never through a mount point:
    a killed chroot build may have left /dev, /proc or /sys mounted in it."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return
    mounts = _mounts_under(path)
    for mnt in sorted(mounts, key=len, reverse=True):
        subprocess.call(["umount", "--lazy", mnt], stderr=subprocess.DEVNULL)
    mounts = _mounts_under(path)
    if mounts:
        raise BuildError(f"not removing {path}: still has mount points {mounts}")
    for _ in range(5):  # a killed build's orphaned children may still be writing
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.5)


# --------------------------------------------------------------------------
# helpers for recipes


def read_list(name: str) -> list[str]:
    """Entries of a package-data list file: one per line, ``#`` comments."""
    out = []
    for line in (HERE / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def root_exec(root: Path, program: str) -> list[str]:
    """argv prefix running ``program`` (a path inside ``root``) with the root's
    own dynamic loader and libraries, without chroot or installation."""
    return [
        os.fspath(root / "lib64/ld-linux-x86-64.so.2"),
        "--library-path",
        f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu",
        os.fspath(root / program.lstrip("/")),
    ]


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BuildError(
            f"missing host tools: {', '.join(missing)} (apt-get install {' '.join(missing)})")


# dpkg path filters of every mmdebstrap root (part of every stage's key).
DPKG_PATH_FILTERS = (
    "path-exclude=/usr/share/doc/*", "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-include=/usr/share/doc/*/copyright",  # keep the licences
)


def mmdebstrap_common() -> list[str]:
    """mmdebstrap options shared by all recipes: no docs, man pages or info."""
    opts = ["mmdebstrap"]
    if os.geteuid() == 0:
        # as root, unshare mode still gives correct ownership but does its
        # mounts (/dev, /proc, /sys) in a private mount namespace, which
        # cannot outlive a killed build
        opts.append("--mode=unshare")
    if os.environ.get("CHIMNEY_BUILD_VERBOSE"):
        opts.append("--verbose")
    opts += [f"--dpkgopt={f}" for f in DPKG_PATH_FILTERS]
    return opts


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(debian_mirror(), file=sys.stderr)
