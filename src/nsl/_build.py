"""A crash-safe, hang-free cache for JIT-compiled C++ extensions (used by :mod:`nsl._cpp`).

Layout, under ``root`` (``$NSL_EXTENSIONS_DIR``, default ``~/.cache/nsl/extensions``)::

    <torch version>-py<X.Y>/
        <name>-<key>/               a published build: <name>.so and manifest.json, never modified
        <name>-<key>.lock           fcntl.flock lock file (holds the building process's pid)
        .<name>-<key>.build-<pid>-* a build in progress (or left by a killed one; removed later)

``key`` is the first 16 hex digits of the sha256 of the fingerprint: the source's sha256, the
torch and Python versions, the platform and the compiler flags (never file times). A build runs
in a private temporary folder and is published by one ``rename`` after ``manifest.json`` (the
fingerprint plus the ``.so``'s size and sha256) is written into it, so a published folder is
either complete or absent. Before a ``.so`` is loaded its size and sha256 are checked against the
manifest; any mismatch (a truncated or damaged file) means rebuild. Readers hold a shared flock,
builders an exclusive one: the OS drops a flock when its holder dies, so a killed build never
blocks anyone, and a process waiting on a live builder prints one line naming its pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["KernelSpec", "BuildUnavailable", "cache_root", "cache_problem", "status", "verify", "load_or_build",
           "flock", "toolchain_problem", "ninja_folder", "BUILD_TIME"]

#: How long a first build takes, measured on a 2-core machine: 79 s idle, 250-290 s under load, 360 s at a load
#: average of 8 (the build notice, ``nsl doctor --build`` and the README say it).
BUILD_TIME = "1-6 minutes"
#: Longest wait on another live process's build before giving up (the pure-PyTorch fallback).
MAX_WAIT_S = 900.0
#: Quiet wait before saying that we wait (a reader's shared lock is held only for milliseconds).
_QUIET_WAIT_S = 0.5


def cache_root() -> Path:
    """``$NSL_EXTENSIONS_DIR`` or ``~/.cache/nsl/extensions``."""
    return Path(os.environ.get("NSL_EXTENSIONS_DIR") or Path.home() / ".cache" / "nsl" / "extensions")


class BuildUnavailable(RuntimeError):
    """Nothing was compiled: a build cannot even start here (no compiler or ninja, an unusable cache folder)."""


def cache_problem(folder: Path) -> str | None:
    """Why builds cannot be kept in ``folder`` (created when needed), else None: a part of its path exists and is
    not a folder (a regular file, a pipe), or the deepest existing folder on it is not writable. Creates nothing."""
    folder = Path(folder)
    p = folder
    while True:
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR) and p.parent != p:
                p = p.parent  # not there yet (or below a file: found on the way up)
                continue
            return f"cannot use {p}: {e.strerror or e}"
        if not stat.S_ISDIR(mode):
            what = "a regular file" if stat.S_ISREG(mode) else "not a folder (a pipe, socket or device)"
            return f"{p} is {what}, where a folder is needed; remove it or set NSL_EXTENSIONS_DIR to another folder"
        if not os.access(p, os.W_OK | os.X_OK):
            return (f"{p} is not writable, so {folder} cannot be created; set NSL_EXTENSIONS_DIR to a writable folder"
                    if p != folder else f"{p} is not writable; set NSL_EXTENSIONS_DIR to a writable folder")
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class KernelSpec:
    """One extension: library ``name`` compiled from ``source`` and the C++ files beside it (every ``*.cpp``
    compiled, every ``*.h`` on the include path; all of them in the fingerprint) with ``cflags`` /
    ``ldflags`` under ``root``."""

    name: str
    source: Path
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    root: Path = field(default_factory=cache_root)

    def files(self) -> list[Path]:
        """The source and the C++ sources and headers beside it (the kernel is split by job)."""
        folder = self.source.parent
        return sorted({self.source, *folder.glob("*.cpp"), *folder.glob("*.h")})

    def fingerprint(self) -> dict:
        """Everything the compiled library depends on (the manifest's identity part)."""
        return {
            "name": self.name,
            "source_sha256": hashlib.sha256("".join(f"{p.name}:{_sha256(p)}\n" for p in self.files())
                                            .encode()).hexdigest(),
            "torch": torch.__version__,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "platform": sys.platform,
            "cflags": list(self.cflags),
            "ldflags": list(self.ldflags),
        }

    def key(self, fingerprint: dict | None = None) -> str:
        """The first 16 hex digits of the sha256 of the fingerprint (JSON, sorted keys)."""
        text = json.dumps(fingerprint or self.fingerprint(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def parent(self) -> Path:
        version = torch.__version__.replace("+", "_")
        return self.root / f"{version}-py{sys.version_info.major}.{sys.version_info.minor}"

    def directory(self, fingerprint: dict | None = None) -> Path:
        """The published build folder (exists only once a build is complete)."""
        return self.parent / f"{self.name}-{self.key(fingerprint)}"

    def lock_path(self, fingerprint: dict | None = None) -> Path:
        """The flock file guarding this build (never deleted: deleting a lock file races with its users)."""
        return self.parent / f"{self.name}-{self.key(fingerprint)}.lock"


def verify(spec: KernelSpec, fingerprint: dict | None = None) -> str | None:
    """None when the published build is complete and intact, else why not (``'not built'`` when absent).

    Intact: ``manifest.json`` parses, its fingerprint equals ``spec``'s and the ``.so``'s size and
    sha256 equal the manifest's. Reads files only; never loads anything.
    """
    fingerprint = fingerprint or spec.fingerprint()
    d = spec.directory(fingerprint)
    if not d.exists():
        return "not built"
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"damaged: manifest.json unreadable ({type(e).__name__})"
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return "damaged: manifest.json does not match this source/torch/python/flags"
    so = d / f"{spec.name}.so"
    try:
        size = so.stat().st_size
    except OSError:
        return f"damaged: {so.name} is missing"
    if size != manifest.get("size"):
        return f"damaged: {so.name} has {size} bytes, the manifest says {manifest.get('size')}"
    if _sha256(so) != manifest.get("sha256"):
        return f"damaged: the sha256 of {so.name} does not match the manifest"
    return None


def status(spec: KernelSpec) -> tuple[Path, str]:
    """``(published folder, 'built' | 'not built' | 'damaged: ...' | 'unusable: ...')`` without building or
    loading (``unusable``: :func:`cache_problem` of the cache folder)."""
    fingerprint = spec.fingerprint()
    state = verify(spec, fingerprint) or "built"
    if state != "built":
        problem = cache_problem(spec.parent)
        if problem:
            state = f"unusable: {problem}"
    return spec.directory(fingerprint), state


class flock:
    """``with flock(path, exclusive, what)``: an ``fcntl.flock`` on ``path`` (created if needed).

    Polls without blocking; after half a second of waiting it prints one line to stderr (with the
    exclusive holder's pid when known); after ``MAX_WAIT_S`` it raises ``TimeoutError``. The OS
    releases the lock when its holder dies, so a killed holder never blocks the next process.
    An exclusive holder writes its pid into the file (and clears it on release).
    """

    def __init__(self, path: Path, exclusive: bool = True, what: str = "the C++ kernel",
                 max_wait_s: float | None = None):
        self.path, self.exclusive, self.what = Path(path), exclusive, what
        self.max_wait_s = MAX_WAIT_S if max_wait_s is None else max_wait_s
        self.fd: int | None = None

    def _holder(self) -> str:
        try:
            pid = int(os.pread(self.fd, 32, 0).decode().strip() or 0)
            os.kill(pid, 0)
        except (ValueError, OSError):
            return "another process"
        return f"process {pid}"

    def __enter__(self) -> flock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        start, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > self.max_wait_s:
                    message = f"{self._holder()} held {self.path} for over {self.max_wait_s:g} s"
                    os.close(self.fd)
                    self.fd = None
                    raise TimeoutError(message) from None
                if not said and waited >= _QUIET_WAIT_S:
                    print(f"nsl: waiting for {self._holder()} to finish building {self.what} (lock {self.path})...",
                          file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.1)
        if self.exclusive:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.exclusive:
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def ninja_folder() -> str | None:
    """The folder of the ``ninja`` that this interpreter's environment provides, else None.

    The ``ninja`` package (a dependency of nsl) installs it beside the interpreter (``bin/`` of a venv), which is
    on PATH only in an activated environment: not when ``/path/to/venv/bin/nsl`` runs from pipx, cron or an
    IDE. Looked for in the package's ``BIN_DIR``, the environment's scripts folder and ``sys.executable``'s."""
    folders = []
    with contextlib.suppress(ImportError):
        import ninja

        folders.append(getattr(ninja, "BIN_DIR", None))
    folders += [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    for folder in folders:
        if folder and os.path.isfile(os.path.join(folder, "ninja")) and os.access(os.path.join(folder, "ninja"),
                                                                                    os.X_OK):
            return folder
    return None


@contextlib.contextmanager
def build_path():
    """``PATH`` with :func:`ninja_folder` in front while this block runs (the check for ninja and the build:
    torch's ``cpp_extension`` runs ``ninja`` by name), restored afterwards."""
    folder, old = ninja_folder(), os.environ.get("PATH")
    parts = (old or os.defpath).split(os.pathsep)
    if folder is None or folder in parts:
        yield
        return
    os.environ["PATH"] = os.pathsep.join([folder, *parts])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def toolchain_problem() -> str | None:
    """Why nothing can be compiled here (no C++ compiler ``$CXX`` / ``c++`` on PATH, no ninja on PATH or in this
    interpreter's environment), else None."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install one or set CXX)"
    with build_path():
        if not cpp_extension.is_ninja_available():
            return "ninja is not installed (pip install ninja)"
    return None


def _load_library(path: Path) -> Path:
    """``dlopen`` the library with :func:`torch.ops.load_library`: its static initialisers register its
    kernels with the dispatcher (``TORCH_LIBRARY_IMPL``). Raises ``OSError`` when it cannot be loaded."""
    torch.ops.load_library(str(path))
    return path


def _remove_leftovers(spec: KernelSpec, key: str) -> None:
    """Remove temporary build folders of this key (called under the exclusive lock: none is live)."""
    for p in spec.parent.glob(f".{spec.name}-{key}.*"):
        shutil.rmtree(p, ignore_errors=True)


def _stop_compilers(folder: Path) -> None:
    """SIGTERM the processes working in ``folder`` (Linux: their /proc cwd): the compilers of an interrupted build.

    ninja runs each compiler in its own process group, and ``subprocess.run`` SIGKILLs ninja on Ctrl-C,
    so without this the compiler would go on for a minute after the interrupt."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            if os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)") == str(folder):
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue


def _build(spec: KernelSpec, fingerprint: dict, announce) -> Path:
    """Compile into a private temporary folder, write the manifest, publish with one rename."""
    from torch.utils import cpp_extension

    key = spec.key(fingerprint)
    _remove_leftovers(spec, key)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-{key}.build-{os.getpid()}-", dir=spec.parent))
    try:
        if announce:
            announce(tmp)
        try:
            # is_python_module=False: a plain library, loaded with torch.ops.load_library
            with build_path():
                cpp_extension.load(name=spec.name, sources=[str(p) for p in spec.files() if p.suffix == ".cpp"],
                                   extra_include_paths=[str(spec.source.parent)], extra_cflags=list(spec.cflags),
                                   extra_ldflags=list(spec.ldflags), build_directory=str(tmp), verbose=False,
                                   is_python_module=False)
        except BaseException:
            _stop_compilers(tmp)
            raise
        so = tmp / f"{spec.name}.so"
        for p in tmp.iterdir():  # keep only the library: objects and ninja files are not needed again
            if p != so:
                p.unlink()
        manifest = {"fingerprint": fingerprint, "size": so.stat().st_size, "sha256": _sha256(so)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        final = spec.directory(fingerprint)
        if final.exists():  # damaged: move it aside first (rename is atomic, rmtree is not)
            old = Path(tempfile.mkdtemp(prefix=f".{spec.name}-{key}.old-{os.getpid()}-", dir=spec.parent))
            os.rename(final, old / "d")
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        os.rename(tmp, final)
        return final / so.name
    finally:
        _remove_leftovers(spec, key)


def load_or_build(spec: KernelSpec, announce=None) -> Path:
    """Load the library (its kernels register with the dispatcher) and return its path: the published
    build if it verifies, else a fresh build (then published).

    ``announce(tmp_dir)`` is called just before a real compilation starts. Raises :class:`BuildUnavailable`
    when no build can start (an unusable cache folder, no compiler or ninja: nothing was compiled), what the
    build raises (compiler errors), ``TimeoutError`` when another live process builds for too long.
    """
    fingerprint = spec.fingerprint()
    if verify(spec, fingerprint) is not None:  # to be built here: the cache folder must be usable
        problem = cache_problem(spec.parent)
        if problem:
            raise BuildUnavailable(f"the kernel cache cannot be used: {problem}")
    lock = spec.lock_path(fingerprint)
    so = spec.directory(fingerprint) / f"{spec.name}.so"
    with flock(lock, exclusive=False):
        if verify(spec, fingerprint) is None:
            try:
                return _load_library(so)
            except OSError:
                pass  # verified yet unloadable (e.g. a changed system library): rebuild below
    with flock(lock, exclusive=True):
        if verify(spec, fingerprint) is None:  # another process built it while we waited
            try:
                return _load_library(so)
            except OSError:
                pass
        problem = toolchain_problem()
        if problem:
            raise BuildUnavailable(f"the CPU kernel cannot be compiled here: {problem}")
        return _build(spec, fingerprint, announce)
