"""Fetch the official dataset archives, verify their published checksums, extract them atomically.

``download('cifar10', root)`` leaves ``root/cifar-10-batches-py/`` (the python layout read by
:func:`nsl.data.cifar.load_cifar`), ``download('mnist', root)`` leaves the four ``.gz`` idx files in
``root/MNIST/raw/`` (torchvision's layout, read by :func:`nsl.data.mnist.load_mnist`).

Every file is streamed into a temporary folder inside ``root``, hashed while it is written and
compared with the checksum published with the dataset (md5 for these releases; sha256 supported);
only when everything matches is the result moved into place with ``os.replace`` (atomic on one file
system), so an interrupted or corrupted download never leaves a half-written dataset behind.
Archives are extracted with path checks (no absolute paths, no ``..``, no links or devices).

The table :data:`SOURCES` maps a dataset name to its :class:`Source`; pass ``source=`` to
:func:`download` (or edit the table) to use a mirror or a local ``file://`` copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ChecksumError, DatasetError

__all__ = ["SOURCES", "Resource", "Source", "download"]


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
        kind: ``'tar'`` (each resource is a tar archive whose top folder is ``target``) or
            ``'files'`` (the resources are kept as they are, in ``target``).
    """

    resources: tuple[Resource, ...]
    target: str
    kind: str = "tar"


_TORONTO = "https://www.cs.toronto.edu/~kriz/"
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz")


def _idx_source(mirrors: tuple[str, ...], md5s: tuple[str, ...], target: str) -> Source:
    files = zip(_IDX, md5s, strict=True)
    return Source(tuple(Resource(f, tuple(m + f for m in mirrors), md5=h) for f, h in files), target, "files")


#: Official archives and their published md5 sums (the ones torchvision checks).
SOURCES: dict[str, Source] = {
    "cifar10": Source((Resource("cifar-10-python.tar.gz", (_TORONTO + "cifar-10-python.tar.gz",),
                                md5="c58f30108f718f92721af3b95e74349a"),), "cifar-10-batches-py"),
    "cifar100": Source((Resource("cifar-100-python.tar.gz", (_TORONTO + "cifar-100-python.tar.gz",),
                                 md5="eb9058c3a382ffc7106e4002c42a8d85"),), "cifar-100-python"),
    "cifar10-binary": Source((Resource("cifar-10-binary.tar.gz", (_TORONTO + "cifar-10-binary.tar.gz",),
                                       md5="c32a1d4ab5d03f1284b67883e8d87530"),), "cifar-10-batches-bin"),
    "cifar100-binary": Source((Resource("cifar-100-binary.tar.gz", (_TORONTO + "cifar-100-binary.tar.gz",),
                                        md5="03b5dce01913d631647c71ecec9e9cb8"),), "cifar-100-binary"),
    "mnist": _idx_source(_MNIST_MIRRORS, ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                          "d53e105ee54ea40749a09fcbcd1e9432",
                                          "9fb629c4189551a2d022fa330f9573f3",
                                          "ec29112dd5afa0611ce80d1b7f02629c"), "MNIST/raw"),
    "fashion-mnist": _idx_source(_FASHION_MIRRORS, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                                    "25c81989df183df01b3e8a0aad5dffbe",
                                                    "bef4ecab320f06d8554ea6380940ec79",
                                                    "bb300cfdad3c16e7a12a480ee83cd310"), "FashionMNIST/raw"),
}


def _key(name: str) -> str:
    return str(name).lower().replace("_", "-")


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


def _complete(source: Source, dest: Path) -> bool:
    if source.kind == "tar":
        return dest.is_dir() and any(dest.iterdir())
    return all((dest / r.filename).is_file() or (dest / r.filename.removesuffix(".gz")).is_file()
               for r in source.resources)


def download(name: str, root: str | Path, *, source: Source | None = None, force: bool = False,
             progress: bool = False, timeout: float = 60.0) -> Path:
    """Download, verify and extract a dataset into ``root``.

    Args:
        name: a key of :data:`SOURCES`: ``'cifar10'``, ``'cifar100'`` (python layouts),
            ``'cifar10-binary'``, ``'cifar100-binary'``, ``'mnist'``, ``'fashion-mnist'``.
        root: the data folder (created if needed).
        source: overrides ``SOURCES[name]`` (mirrors, ``file://`` URLs, other checksums).
        force: download again even if the target folder is already complete (replacing it).
        progress: show a tqdm progress bar per file.
        timeout: socket timeout per connection, in seconds.

    Returns:
        the folder holding the dataset (e.g. ``root/cifar-10-batches-py``).

    Raises:
        ChecksumError: a file does not match its published checksum on any URL (nothing is kept).
        DatasetError: no URL could be fetched, or the archive is corrupt or lacks the expected folder.
        ValueError: unknown ``name``, or a resource without any checksum.
    """
    key = _key(name)
    if source is None:
        if key not in SOURCES:
            raise ValueError(f"unknown dataset {name!r} to download; available: {', '.join(SOURCES)}")
        source = SOURCES[key]
    if source.kind not in ("tar", "files"):
        raise ValueError(f"Source.kind must be 'tar' or 'files', got {source.kind!r}")
    root = Path(root).expanduser()
    dest = root / source.target
    if not force and _complete(source, dest):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".nsl-download-", dir=root))
    try:
        fetched = []
        for res in source.resources:
            if not (res.md5 or res.sha256):
                raise ValueError(f"resource {res.filename} has no checksum to verify it against")
            path = tmp / res.filename
            problems, mismatch = [], False
            for url in res.urls:
                try:
                    md5, sha = _fetch(url, path, timeout, progress)
                except (urllib.error.URLError, OSError, ValueError) as e:
                    problems.append(f"{url}: {getattr(e, 'reason', e)}")
                    continue
                pairs = (("md5", res.md5, md5), ("sha256", res.sha256, sha))
                bad = [(kind, want, got) for kind, want, got in pairs if want and want.lower() != got]
                if not bad:
                    break
                mismatch = True
                problems.append(f"{url}: " + ", ".join(f"{k} {got} but the published {k} is {want}"
                                                        for k, want, got in bad))
            else:
                path.unlink(missing_ok=True)
                msg = (f"could not download {res.filename} for {name!r} into {root}: " + "; ".join(problems)
                       + f". Fetch it by hand from {res.urls[0]} and place the extracted dataset at {dest}.")
                raise (ChecksumError if mismatch else DatasetError)(
                    ("checksum mismatch, the download was discarded: " if mismatch else "") + msg)
            fetched.append(path)
        old = tmp / "previous"
        if source.kind == "tar":
            out = tmp / "extracted"
            for path in fetched:
                _safe_extract(path, out)
            src = out / source.target
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
