"""Tests of nsl.data.download (the library function; ``nsl download`` is in test_download.py) from file URLs
serving archives and idx files built from real CIFAR-10 and digits: checksums, atomic extraction, unsafe members."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
import torch

from nsl.data import (
    ChecksumError,
    DatasetError,
    Resource,
    Source,
    load_cifar,
    load_mnist,
    write_idx,
)
from nsl.data import download as download_module
from nsl.data.download import SOURCES, download


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory, data_root):
    """A cifar-10-python.tar.gz holding the real test batch and meta file."""
    d = tmp_path_factory.mktemp("archive")
    path = d / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for f in ("test_batch", "batches.meta"):
            tf.add(data_root / "cifar-10-batches-py" / f, arcname=f"cifar-10-batches-py/{f}")
    return path


def test_download_from_file_url_extracts_atomically(cifar_archive, tmp_path, cifar):
    md5 = _md5(cifar_archive)
    bad_mirror = (tmp_path / "nope.tar.gz").as_uri()
    src = Source((Resource("cifar-10-python.tar.gz", (bad_mirror, cifar_archive.as_uri()), md5=md5),),
                 "cifar-10-batches-py")
    root = tmp_path / "data"
    out = download("cifar10", root, source=src)
    assert out == root / "cifar-10-batches-py"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no leftovers
    x, y = load_cifar(root, "cifar10", "test")
    assert torch.equal(x, cifar("cifar10", "test")[0]) and torch.equal(y, cifar("cifar10", "test")[1])
    # already there: nothing is fetched (the URL is dead); force fetches again and replaces
    dead = Source((Resource("cifar-10-python.tar.gz", (bad_mirror,), md5=md5),), "cifar-10-batches-py")
    assert download("cifar10", root, source=dead) == out
    (out / "stale").write_text("x")
    download("cifar10", root, source=src, force=True)
    assert not (out / "stale").exists() and (out / "test_batch").is_file()
    # sha256 works as well
    sha = hashlib.sha256(cifar_archive.read_bytes()).hexdigest()
    src256 = Source((Resource("c.tar.gz", (cifar_archive.as_uri(),), sha256=sha),), "cifar-10-batches-py")
    assert download("cifar10", tmp_path / "d2", source=src256).is_dir()


def test_download_checksum_mismatch(cifar_archive, tmp_path, monkeypatch):
    root = tmp_path / "data"
    wrong = "0" * 32
    src = Source((Resource("cifar-10-python.tar.gz", (cifar_archive.as_uri(),), md5=wrong),),
                 "cifar-10-batches-py")
    monkeypatch.setitem(download_module.SOURCES, "cifar10", src)  # the URL table is overridable
    with pytest.raises(ChecksumError) as e:
        download("cifar10", root)
    msg = str(e.value)
    assert "checksum mismatch" in msg and _md5(cifar_archive) in msg and wrong in msg
    assert isinstance(e.value, DatasetError)
    assert list(root.iterdir()) == []  # nothing kept, not even the temporary folder
    missing = Source((Resource("x.tar.gz", ((tmp_path / "none").as_uri(),), md5=wrong),), "x")
    with pytest.raises(DatasetError, match="could not download x.tar.gz"):
        download("cifar10", root, source=missing)
    with pytest.raises(ValueError, match="no checksum"):
        download("x", root, source=Source((Resource("x", (cifar_archive.as_uri(),)),), "x"))
    with pytest.raises(ValueError, match="available: cifar10, cifar100"):
        download("svhn", root)


def test_download_refuses_unsafe_archive_and_fetches_idx_files(tmp_path, digits28):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        info = tarfile.TarInfo("../escaped")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    src = Source((Resource("evil.tar.gz", (evil.as_uri(),), md5=_md5(evil)),), "cifar-10-batches-py")
    with pytest.raises(DatasetError, match="unsafe member '../escaped'"):
        download("cifar10", tmp_path / "root", source=src)
    assert not (tmp_path / "escaped").exists()
    # MNIST-style sources: the .gz idx files are kept as they are in root/MNIST/raw
    x, y = digits28
    srv = tmp_path / "server"
    srv.mkdir()
    write_idx(srv / "train-images-idx3-ubyte.gz", x[:300, 0])
    write_idx(srv / "train-labels-idx1-ubyte.gz", y[:300].to(torch.uint8))
    res = tuple(Resource(f, ((srv / f).as_uri(),), md5=_md5(srv / f))
                for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"))
    out = download("mnist", tmp_path / "root", source=Source(res, "MNIST/raw", "files"))
    assert out == tmp_path / "root" / "MNIST" / "raw"
    xi, yi = load_mnist(tmp_path / "root", "train", check_counts=False)
    assert torch.equal(xi, x[:300]) and torch.equal(yi, y[:300])


def test_download_table_is_complete():
    assert set(SOURCES) >= {"cifar10", "cifar100", "mnist", "fashion-mnist"}
    for src in SOURCES.values():
        for r in src.resources:
            assert len(r.md5) == 32 and all(u.startswith(("https://", "http://")) for u in r.urls)
    assert SOURCES["cifar10"].resources[0].md5 == "c58f30108f718f92721af3b95e74349a"
