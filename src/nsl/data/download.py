"""Fetch the official dataset archives, verify their published checksums, extract them atomically.

``download('cifar10', root)`` leaves ``root/cifar-10-batches-py/`` (the python layout read by
:func:`nsl.data.cifar.load_cifar`), ``download('mnist', root)`` leaves the four ``.gz`` idx files in
``root/MNIST/raw/`` (torchvision's layout, read by :func:`nsl.data.mnist.load_mnist`),
``download('omniglot', root)`` leaves ``root/omniglot-py/images_{background,evaluation}/`` (read by
:func:`nsl.fewshot.load_omniglot`). The command line is ``nsl download NAME DIR`` (``nsl download
--list`` lists the names) or ``--download`` on ``nsl train`` / ``nsl fewshot train``, which calls
:func:`ensure_dataset`.

Every file is streamed into a temporary folder inside ``root``, hashed while it is written and
compared with the checksum published with the dataset (md5 for these releases; sha256 supported);
only when everything matches is the result moved into place with ``os.replace`` (atomic on one file
system), so an interrupted or corrupted download never leaves a half-written dataset behind.
Archives (tar or zip) are extracted with path checks (no absolute paths, no ``..``, no links or
devices).

The table :data:`SOURCES` maps a dataset name to its :class:`Source`; pass ``source=`` to
:func:`download` (or edit the table) to use a mirror or a local ``file://`` copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ChecksumError, DatasetError

__all__ = ["NO_FILES", "PROVIDERS", "SOURCES", "Resource", "Source", "download", "ensure_dataset", "find_downloaded",
           "resolve_name"]


@dataclass(frozen=True)
class Resource:
    """One file to fetch: its name on disk, the URLs to try in order, and its published checksum(s)."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Source:
    """How to obtain a dataset.

    Attributes:
        resources: the files to fetch.
        target: folder, relative to ``root``, that holds the dataset afterwards.
        kind: ``'tar'`` (each resource is a tar archive whose top folder is ``target``),
            ``'zip'`` (each resource ``X.zip`` is a zip archive whose top folder ``X`` is extracted
            into ``target``) or ``'files'`` (the resources are kept as they are, in ``target``).
        title: human-readable name (``nsl download --list``).
        size_mb: approximate download size in MB, 0 if unknown (``nsl download --list``).
        required: paths, relative to ``target``, that a complete copy holds (files or folders);
            empty: any non-empty ``target`` counts as complete (for ``'files'``: every resource).
        alt_targets: other folders, relative to ``root``, where the loaders also find the dataset.
    """

    resources: tuple[Resource, ...]
    target: str
    kind: str = "tar"
    title: str = ""
    size_mb: int = 0
    required: tuple[str, ...] = ()
    alt_targets: tuple[str, ...] = ()


_TORONTO = "https://www.cs.toronto.edu/~kriz/"
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz")


_OMNIGLOT = ("https://raw.githubusercontent.com/brendenlake/omniglot/master/python/",
             "https://github.com/brendenlake/omniglot/raw/master/python/")


def _idx_source(mirrors: tuple[str, ...], md5s: tuple[str, ...], target: str, title: str, size_mb: int) -> Source:
    files = zip(_IDX, md5s, strict=True)
    return Source(tuple(Resource(f, tuple(m + f for m in mirrors), md5=h) for f, h in files), target, "files",
                  title, size_mb)


def _tar(filename: str, md5: str, target: str, title: str, size_mb: int, required: tuple[str, ...]) -> Source:
    return Source((Resource(filename, (_TORONTO + filename,), md5=md5),), target, "tar", title, size_mb, required)


_CIFAR10_PY = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_CIFAR10_BIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin", "batches.meta.txt")

#: Official archives and their published md5 sums (the ones torchvision checks).
SOURCES: dict[str, Source] = {
    "cifar10": _tar("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                    "CIFAR-10 (python version)", 170, _CIFAR10_PY),
    "cifar100": _tar("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                     "CIFAR-100 (python version)", 169, ("train", "test", "meta")),
    "cifar10-binary": _tar("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin",
                           "CIFAR-10 (binary version)", 170, _CIFAR10_BIN),
    "cifar100-binary": _tar("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary",
                            "CIFAR-100 (binary version)", 169,
                            ("train.bin", "test.bin", "fine_label_names.txt", "coarse_label_names.txt")),
    "mnist": _idx_source(_MNIST_MIRRORS, ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                          "d53e105ee54ea40749a09fcbcd1e9432",
                                          "9fb629c4189551a2d022fa330f9573f3",
                                          "ec29112dd5afa0611ce80d1b7f02629c"), "MNIST/raw", "MNIST", 12),
    "fashion-mnist": _idx_source(_FASHION_MIRRORS, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                                    "25c81989df183df01b3e8a0aad5dffbe",
                                                    "bef4ecab320f06d8554ea6380940ec79",
                                                    "bb300cfdad3c16e7a12a480ee83cd310"), "FashionMNIST/raw",
                                 "Fashion-MNIST", 31),
    "omniglot": Source(tuple(Resource(f, tuple(m + f for m in _OMNIGLOT), md5=h) for f, h in (
        ("images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
        ("images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"))),
        "omniglot-py", "zip", "Omniglot (background and evaluation alphabets)", 16,
        ("images_background", "images_evaluation"), ("omniglot",)),
}

#: which downloads hold the files of a dataset of ``nsl train`` / ``nsl fewshot train`` (the first is
#: the one :func:`ensure_dataset` fetches; any of them present counts); names absent here (``digits``
#: needs no files, ``imagefolder`` and ``mini-imagenet`` have no download) cannot be fetched.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cifar10": ("cifar10", "cifar10-binary"),
    "cifar100": ("cifar100", "cifar100-binary"),
    "cifar-fs": ("cifar100", "cifar100-binary"),
    "fc100": ("cifar100", "cifar100-binary"),
    "mnist": ("mnist",),
    "fashion-mnist": ("fashion-mnist",),
    "omniglot": ("omniglot",),
}
#: datasets that need no files (bundled with a package)
NO_FILES = ("digits",)
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
            "cifar-10-binary": "cifar10-binary", "cifar-100-binary": "cifar100-binary"}


def _key(name: str) -> str:
    key = str(name).lower().replace("_", "-")
    return _ALIASES.get(key, key)


def resolve_name(name: str) -> str:
    """The :data:`SOURCES` key that ``name`` designates: a download name, an alias (``cifar-10``) or a
    dataset of :data:`PROVIDERS` (``cifar-fs`` -> ``cifar100``); ValueError listing the valid names."""
    key = _key(name)
    if key in SOURCES:
        return key
    if key in PROVIDERS:
        return PROVIDERS[key][0]
    extra = sorted(set(PROVIDERS) - set(SOURCES))
    raise ValueError(f"unknown dataset {name!r} to download; available: {', '.join(SOURCES)} "
                     f"(and {', '.join(extra)}, which are made from them)")


def _present(source: Source, base: Path) -> bool:
    """Whether ``base`` holds a complete copy of ``source``'s dataset (its required paths)."""
    if not base.is_dir():
        return False
    if source.kind == "files":
        names = source.required or tuple(r.filename for r in source.resources)
        return all((base / f).is_file() or (base / f.removesuffix(".gz")).is_file() for f in names)
    if source.required:
        return all((base / f).exists() and (not (base / f).is_dir() or any((base / f).iterdir()))
                   for f in source.required)
    return any(base.iterdir())


def find_downloaded(name: str, root: str | Path) -> Path | None:
    """The folder under ``root`` that already holds dataset ``name`` (any download of
    :data:`PROVIDERS` ``[name]``, in its target folder, an alternative folder or ``root`` itself),
    or None. Only the presence of the required files is checked, not their content."""
    key = _key(name)
    root = Path(root).expanduser()
    for src_name in PROVIDERS.get(key, (resolve_name(key),)):
        src = SOURCES[src_name]
        for base in (root / src.target, *(root / t for t in src.alt_targets), root):
            if _present(src, base):
                return base
    return None


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> tuple[str, str]:
    """Stream ``url`` into ``dest``; return its ``(md5, sha256)`` hex digests."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "nsl-data"})
    with urllib.request.urlopen(req, timeout=timeout) as r, open(dest, "wb") as f:
        bar = None
        if progress:
            from tqdm import tqdm

            total = r.headers.get("Content-Length")
            bar = tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=dest.name)
        try:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                md5.update(chunk)
                sha.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    return md5.hexdigest(), sha.hexdigest()


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest`` refusing absolute paths, ``..``, links and devices."""
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    raise DatasetError(f"refusing to extract {archive.name}: unsafe member {m.name!r}")
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4 without extraction filters; members checked above
                tf.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"cannot extract {archive.name}: the archive is corrupt ({e})") from e


def _safe_unzip(archive: Path, dest: Path) -> None:
    """Extract a zip archive into ``dest`` refusing absolute paths, ``..`` and symbolic links."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                p = PurePosixPath(info.filename)
                if p.is_absolute() or ".." in p.parts or ":" in info.filename or "\\" in info.filename \
                        or stat.S_ISLNK(info.external_attr >> 16):
                    raise DatasetError(f"refusing to extract {archive.name}: unsafe member {info.filename!r}")
            zf.extractall(dest)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise DatasetError(f"cannot extract {archive.name}: the archive is corrupt ({e})") from e


def _reason(url: str, e: BaseException) -> str:
    """One line saying why ``url`` could not be fetched (naming an unreachable host as such)."""
    reason = getattr(e, "reason", e)
    if isinstance(e, urllib.error.HTTPError):
        return f"{url}: HTTP {e.code} {e.reason}"
    if isinstance(reason, (socket.gaierror, ConnectionError, TimeoutError, socket.timeout)):
        host = urllib.parse.urlsplit(url).netloc or url
        why = reason.strerror if getattr(reason, "strerror", None) else (str(reason) or type(reason).__name__)
        return f"{url}: cannot reach {host} ({why})"
    return f"{url}: {str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__}"


def _unreachable(e: BaseException) -> bool:
    reason = getattr(e, "reason", e)
    return (not isinstance(e, urllib.error.HTTPError)
            and isinstance(reason, (socket.gaierror, ConnectionError, TimeoutError, socket.timeout)))


def download(name: str, root: str | Path, *, source: Source | None = None, force: bool = False,
             progress: bool = False, timeout: float = 60.0) -> Path:
    """Download, verify and extract a dataset into ``root``.

    Args:
        name: a key of :data:`SOURCES`: ``'cifar10'``, ``'cifar100'`` (python layouts),
            ``'cifar10-binary'``, ``'cifar100-binary'``, ``'mnist'``, ``'fashion-mnist'``,
            ``'omniglot'`` (or a name :func:`resolve_name` maps to one: ``'cifar-fs'``, ``'fc100'``).
        root: the data folder (created if needed).
        source: overrides ``SOURCES[name]`` (mirrors, ``file://`` URLs, other checksums).
        force: download again even if the target folder is already complete (replacing it).
        progress: show a tqdm progress bar per file.
        timeout: socket timeout per connection, in seconds.

    Returns:
        the folder holding the dataset (e.g. ``root/cifar-10-batches-py``).

    Raises:
        ChecksumError: a file does not match its published checksum on any URL (nothing is kept).
        DatasetError: no URL could be fetched (offline: the message says which hosts were
            unreachable), or the archive is corrupt or lacks the expected folder.
        ValueError: unknown ``name``, or a resource without any checksum.
    """
    if source is None:
        source = SOURCES[resolve_name(name)]
    if source.kind not in ("tar", "zip", "files"):
        raise ValueError(f"Source.kind must be 'tar', 'zip' or 'files', got {source.kind!r}")
    root = Path(root).expanduser()
    dest = root / source.target
    if not force and _present(source, dest):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".nsl-download-", dir=root))
    try:
        fetched = []
        for res in source.resources:
            if not (res.md5 or res.sha256):
                raise ValueError(f"resource {res.filename} has no checksum to verify it against")
            path = tmp / res.filename
            problems, mismatch, offline = [], False, True
            for url in res.urls:
                try:
                    md5, sha = _fetch(url, path, timeout, progress)
                except (urllib.error.URLError, OSError, ValueError) as e:
                    problems.append(_reason(url, e))
                    offline = offline and _unreachable(e)
                    continue
                offline = False
                pairs = (("md5", res.md5, md5), ("sha256", res.sha256, sha))
                bad = [(kind, want, got) for kind, want, got in pairs if want and want.lower() != got]
                if not bad:
                    break
                mismatch = True
                problems.append(f"{url}: " + ", ".join(f"{k} {got} but the published {k} is {want}"
                                                        for k, want, got in bad))
            else:
                path.unlink(missing_ok=True)
                msg = (f"could not download {res.filename} for {name!r} into {root}"
                       + (" (no network connection?)" if offline else "") + ": " + "; ".join(problems)
                       + f". Fetch it by hand from {res.urls[0]} and place the "
                       + ("file" if source.kind == "files" else "extracted dataset") + f" at {dest}.")
                raise (ChecksumError if mismatch else DatasetError)(
                    ("checksum mismatch, the download was discarded: " if mismatch else "") + msg)
            fetched.append(path)
        old = tmp / "previous"
        if source.kind in ("tar", "zip"):
            out = tmp / "extracted"
            for path in fetched:
                if source.kind == "tar":
                    _safe_extract(path, out)
                else:
                    _safe_unzip(path, out / source.target)
            src = out / source.target
            if source.required and src.is_dir() and not _present(source, src):
                missing = [f for f in source.required if not (src / f).exists()]
                raise DatasetError(f"the archive(s) for {name!r} lack {', '.join(missing)} in {source.target}/")
            if not src.is_dir():
                found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
                raise DatasetError(f"the archive for {name!r} does not contain the folder {source.target}/ "
                                   f"(found {found})")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                os.replace(dest, old)
            os.replace(src, dest)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            for path in fetched:
                os.replace(path, dest / path.name)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_dataset(dataset: str, root: str | Path, *, progress: bool = False, echo: Callable[[str], None] = print,
                   timeout: float = 60.0) -> Path | None:
    """Make ``dataset`` (a training or few-shot dataset name) available under ``root``.

    If :func:`find_downloaded` finds it, nothing is fetched; otherwise the first download of
    :data:`PROVIDERS` ``[dataset]`` is fetched with :func:`download` (checksummed, atomic), saying so
    through ``echo``. This is what ``--download`` on ``nsl train`` and ``nsl fewshot train`` runs.

    Returns:
        the folder holding the dataset, or None for a dataset that needs no files (:data:`NO_FILES`).

    Raises:
        ValueError: ``dataset`` has no download (``imagefolder``, ``mini-imagenet``, unknown names).
        DatasetError, ChecksumError: as :func:`download`.
    """
    key = _key(dataset)
    if key in NO_FILES:
        return None
    if key not in PROVIDERS and key not in SOURCES:
        raise ValueError(f"dataset {dataset!r} has no download source (downloadable: {', '.join(PROVIDERS)}); "
                         f"place its files in {root} yourself")
    found = find_downloaded(key, root)
    if found is not None:
        return found
    src_name = resolve_name(key)
    src = SOURCES[src_name]
    size = f", about {src.size_mb} MB" if src.size_mb else ""
    echo(f"{dataset} is not in {root}: downloading {src.title or src_name}{size}")
    dest = download(src_name, root, progress=progress, timeout=timeout)
    echo(f"{src.title or src_name}: checksums verified, extracted to {dest}")
    return dest
