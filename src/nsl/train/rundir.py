"""One writer per run directory, and files that are never half-written.

A run directory (``RUN_DIR/config.json``, ``metrics.jsonl``, ``checkpoints/{last,best}.pt``) has one
writer at a time: :class:`RunLock` takes an exclusive ``flock`` on ``RUN_DIR/.lock`` for the life of
the training process. The operating system drops the lock when the process ends, however it ends
(exit, exception, SIGKILL), so a lock is never stale after a crash; the lock file itself stays and
names the last owner. While the lock is held nobody else writes in the folder, so temporary files
left behind by a killed writer (``.NAME.tmpPID``) are garbage: :func:`clean_stale_temps` removes them.

Every file is written to a temporary sibling, flushed, fsynced and renamed over its target
(:func:`atomic_write_text`, and ``atomic_save`` for checkpoints), so a reader sees the old or the new
content, never a torn one. ``metrics.jsonl`` is appended to record by record; a crash mid-record
leaves a torn last line, which :func:`read_jsonl` drops (the record is rewritten by the continuation).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
from pathlib import Path

from .config import ConfigError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

__all__ = ["RunLock", "RunDirBusy", "NotARegularFile", "open_regular", "read_regular_text", "clean_stale_temps",
           "write_atomically", "atomic_write_text", "read_jsonl", "ensure_dir", "describe_os_error", "os_error_reason"]

LOCK_NAME = ".lock"


class RunDirBusy(ConfigError):
    """Another live process holds the run directory's lock."""


def os_error_reason(e: OSError) -> str:
    """A few words for an ``OSError`` (no space, permission denied, ...), without the path."""
    return {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EEXIST: "it exists and is not a folder", errno.EDQUOT: "disk quota exceeded"}.get(
        e.errno, e.strerror or type(e).__name__)


class NotARegularFile(OSError):
    """A path to be read as a file is a directory, a named pipe, a socket or a device (:func:`open_regular`)."""


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str | Path):
    """``path`` opened for binary reading, or :class:`NotARegularFile` at once when it is not a regular file.

    Opened without blocking (``O_NONBLOCK``) and checked on the open descriptor (``fstat``, so nothing can swap
    the file in between): a named pipe with no writer, which a plain ``open`` waits on forever, or a device
    is refused with one line naming the path and what it is; a regular file is then read normally."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path} is {_file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_text(path: str | Path) -> str:
    """The text of the regular file ``path`` (UTF-8); :class:`NotARegularFile` at once for anything else."""
    with open_regular(path) as f:
        return f.read().decode()


def describe_os_error(e: OSError, path: Path | str, doing: str) -> str:
    """One line for an ``OSError`` met while ``doing`` something with ``path`` (no traceback text)."""
    return f"cannot {doing} {path}: {os_error_reason(e)}"


def ensure_dir(path: Path, field: str = "out") -> Path:
    """Create folder ``path`` (and its parents) for config field ``field``; :class:`ConfigError` naming the
    field (``{field}`` in the message, see ConfigError) and the path when that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{{{field}}} {path} is a file, expected a folder", field)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(describe_os_error(e, path, f"create {{{field}}}"), field) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{{{field}}} {path} is not writable", field)
    return path


class RunLock:
    """Exclusive, crash-safe lock on a run directory (``with RunLock(run_dir): ...``).

    ``acquire()`` creates ``run_dir`` if needed and takes a non-blocking exclusive ``flock`` on
    ``run_dir/.lock``; if another process holds it, raises :class:`RunDirBusy` naming that process
    (pid, host, start time). The lock is released by ``release()``, on leaving the ``with`` block, or
    by the operating system when the process dies.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).expanduser()
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        ensure_dir(self.run_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(describe_os_error(e, self.path, "create the lock file")) from None
        try:
            _lock_fd(fd)
        except OSError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirBusy(f"run directory {self.run_dir} is in use by another process ({owner}); wait for it "
                             "to finish, stop it, or choose another {out}", "out") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            _unlock_fd(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_fd(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # pragma: no cover
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _unlock_fd(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:  # pragma: no cover
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _read_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


def clean_stale_temps(run_dir: str | Path) -> list[Path]:
    """Remove temporary files (``.NAME.tmp*``) in ``run_dir`` and ``run_dir/checkpoints``; return them.

    Call only while holding the run's :class:`RunLock`: then no other process writes there, and every
    such file is what a killed writer left behind."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def write_atomically(path: str | Path, write, binary: bool = False) -> None:
    """``write(f)`` into a temporary sibling of ``path``, fsync, rename over ``path``: a reader sees the old or
    the new content, never a torn one. On any error the temporary file is removed, ``path`` keeps its
    previous content, and the error propagates (callers name it their way)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`write_atomically`); OSError is re-raised as
    :class:`ConfigError` naming the file."""
    try:
        write_atomically(path, lambda f: f.write(text))
    except OSError as e:
        raise ConfigError(describe_os_error(e, path, "write")) from None


def read_jsonl(path: str | Path) -> tuple[list[dict], bool]:
    """The records of a JSON-lines file and whether a torn last line was dropped.

    A last line that is not valid JSON (a crash in the middle of writing it) is dropped; an invalid line
    anywhere else raises :class:`ConfigError` naming the file and the line number."""
    path = Path(path)
    try:
        lines = read_regular_text(path).splitlines()
    except FileNotFoundError:
        return [], False
    except NotARegularFile as e:
        raise ConfigError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    records, torn = [], False
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                torn = True
                break
            raise ConfigError(f"{path}, line {i + 1}: not a JSON record ({e})") from None
        records.append(rec)
    return records, torn
