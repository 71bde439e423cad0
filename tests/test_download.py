"""`nsl download`, `--download` on the training commands, and the download module's zip, offline and
idempotence paths. No external network: archives are served by a local http.server on 127.0.0.1 or
read from file:// URLs, with checksums registered by the test."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import zipfile

import pytest

import nsl.data.download as download_module
from cli_helpers import run
from nsl.data import DatasetError, load_cifar
from nsl.data.download import SOURCES, Resource, Source, download, ensure_dataset, find_downloaded


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def http_root(tmp_path):
    """``(folder, base_url)``: a local HTTP server on 127.0.0.1 serving ``folder``."""
    folder = tmp_path / "served"
    folder.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no request log on stderr
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _closed_port_url(name: str) -> str:
    with socket.socket() as s:  # a port nothing listens on: connection refused, as when offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def _fake_cifar_tar(path):
    """A small tar.gz with the file names of the CIFAR-10 python layout (contents are placeholders)."""
    with tarfile.open(path, "w:gz") as tf:
        for f in SOURCES["cifar10"].required:
            data = f"placeholder {f}".encode()
            info = tarfile.TarInfo(f"cifar-10-batches-py/{f}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _register(monkeypatch, name, urls, md5, filename="cifar-10-python.tar.gz"):
    src = SOURCES[name]
    monkeypatch.setitem(SOURCES, name, Source((Resource(filename, tuple(urls), md5=md5),), src.target, src.kind,
                                              src.title, src.size_mb, src.required, src.alt_targets))


def test_download_list_and_bad_names(capsys, tmp_path):
    for argv in (["download"], ["download", "--list"]):
        code, out, err = run(argv, capsys)
        assert code == 0 and err == ""
        for name, src in SOURCES.items():
            assert f"  {name} " in out and src.target in out
        assert "cifar-fs" in out and "fc100" in out and "digits" in out
    code, out, err = run(["download", "svhn", str(tmp_path)], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "unknown dataset 'svhn' to download; available: cifar10, cifar100" in err and "omniglot" in err
    code, _, err = run(["download", "cifar10"], capsys)
    assert code == 2 and "expected DIR, the folder to download cifar10 into" in err
    with pytest.raises(SystemExit):
        run(["download", "cifar10", str(tmp_path), "--timeout", "-1"], capsys)
    assert "argument --timeout: expected a positive number of seconds, got -1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    code, _, err = run(["download", "mnist", str(tmp_path / "file")], capsys)
    assert code == 2 and f"DIR {tmp_path / 'file'} is a file; expected a folder" in err


def test_download_offline_is_one_line(monkeypatch, capsys, tmp_path):
    _register(monkeypatch, "cifar10", [_closed_port_url("cifar-10-python.tar.gz")], "0" * 32)
    root = tmp_path / "data"
    code, out, err = run(["download", "cifar10", str(root), "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("nsl download: error: could not download cifar-10-python.tar.gz for 'cifar10'")
    assert "(no network connection?)" in err and "cannot reach 127.0.0.1:" in err
    assert list(root.iterdir()) == []  # nothing kept, not even the temporary folder


def test_download_from_local_http_server_is_checked_atomic_and_idempotent(http_root, monkeypatch, capsys, tmp_path):
    folder, base = http_root
    archive = _fake_cifar_tar(folder / "cifar-10-python.tar.gz")
    _register(monkeypatch, "cifar10", [base + "missing.tar.gz", base + archive.name], _md5(archive))
    root = tmp_path / "data"
    code, out, err = run(["download", "cifar10", str(root)], capsys)
    assert code == 0, err
    dest = root / "cifar-10-batches-py"
    assert f"checksums verified, extracted to {dest}" in out
    assert "cifar-10-python.tar.gz" in err and "B/s" in err  # the tqdm progress bar (on stderr)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no temporary folder left
    assert sorted(p.name for p in dest.iterdir()) == sorted(SOURCES["cifar10"].required)
    assert find_downloaded("cifar10", root) == dest
    # present: nothing is fetched (the served archive is gone)
    archive.rename(folder / "gone")
    code, out, err = run(["download", "cifar10", str(root)], capsys)
    assert code == 0 and f"is already in {dest}: nothing downloaded" in out
    # an incomplete copy is not "present"; --force fetches again and replaces
    (folder / "gone").rename(archive)
    (dest / "test_batch").unlink()
    assert find_downloaded("cifar10", root) is None
    code, out, err = run(["download", "cifar10", str(root), "--force", "--no-progress"], capsys)
    assert code == 0 and err == "" and (dest / "test_batch").is_file()
    # a wrong checksum: one line, the download discarded, the previous copy intact
    _register(monkeypatch, "cifar10", [base + archive.name], "f" * 32)
    code, out, err = run(["download", "cifar10", str(tmp_path / "other"), "--no-progress"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "checksum mismatch, the download was discarded" in err
    assert _md5(archive) in err and list((tmp_path / "other").iterdir()) == []


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_sources_extract_into_their_target_and_refuse_unsafe_members(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    bg = _zip(srv / "images_background.zip", {"images_background/Alpha/character01/01.png": b"png"})
    ev = _zip(srv / "images_evaluation.zip", {"images_evaluation/Beta/character01/01.png": b"png"})
    src = SOURCES["omniglot"]
    res = tuple(Resource(p.name, (p.as_uri(),), md5=_md5(p)) for p in (bg, ev))
    monkeypatch.setitem(SOURCES, "omniglot", Source(res, src.target, "zip", src.title, src.size_mb, src.required,
                                                    src.alt_targets))
    root = tmp_path / "data"
    lines = []
    out = ensure_dataset("omniglot", root, echo=lines.append)
    assert out == root / "omniglot-py" and (out / "images_evaluation" / "Beta" / "character01" / "01.png").is_file()
    assert lines[0].startswith("omniglot is not in") and "checksums verified" in lines[1]
    assert ensure_dataset("omniglot", root, echo=lines.append) == out and len(lines) == 2  # nothing fetched again
    evil = _zip(srv / "evil.zip", {"../escaped.png": b"x"})
    bad = Source((Resource("evil.zip", (evil.as_uri(),), md5=_md5(evil)),), "omniglot-py", "zip")
    with pytest.raises(DatasetError, match="unsafe member '../escaped.png'"):
        download("omniglot", tmp_path / "d2", source=bad)
    assert not (tmp_path / "escaped.png").exists()
    incomplete = Source((Resource(bg.name, (bg.as_uri(),), md5=_md5(bg)),), "omniglot-py", "zip",
                        required=src.required)
    with pytest.raises(DatasetError, match="lack images_evaluation in omniglot-py/"):
        download("omniglot", tmp_path / "d3", source=incomplete)


def test_ensure_dataset_names():
    assert ensure_dataset("digits", None) is None  # bundled with scikit-learn
    for name in ("imagefolder", "mini-imagenet"):
        with pytest.raises(ValueError, match=f"dataset '{name}' has no download source"):
            ensure_dataset(name, "/nonexistent")
    assert download_module.resolve_name("CIFAR-FS") == "cifar100" and download_module.resolve_name("cifar-10") == \
        "cifar10"


def test_missing_data_messages_name_nsl_download(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_cifar(tmp_path, "cifar100", "train")
    assert f"nsl download cifar100 {tmp_path}" in str(e.value) and "--download" in str(e.value)


def test_train_download_flag(monkeypatch, capsys, tmp_path, data_root):
    # missing data and no network: one line naming the failure, no run directory
    _register(monkeypatch, "cifar10", [_closed_port_url("cifar-10-python.tar.gz")], "0" * 32)
    out_dir = tmp_path / "run"
    argv = ["train", "--dataset", "cifar10", "--model", "cnn9", "--protocol", "fast", "--iters", "1",
            "--batch-size", "16", "--subset", "32", "--test-subset", "16", "--no-progress", "--download"]
    code, _, err = run([*argv, "--data-dir", str(tmp_path / "new"), "--out", str(out_dir)], capsys)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 2, err
    assert "cifar10 is not in" in err and "(no network connection?)" in err and not out_dir.exists()
    code, _, err = run([*argv, "--out", str(out_dir)], capsys)
    assert code == 2 and "--download needs --data-dir DIR, the folder to download cifar10 into" in err
    code, _, err = run(["fewshot", "train", "--dataset", "mini-imagenet", "--data-dir", str(tmp_path), "--out",
                        str(tmp_path / "fs"), "--download", "--no-progress"], capsys)
    assert code == 2 and "--download: dataset 'mini-imagenet' has no download source" in err
    # present (here: a link to the real data): nothing is fetched (the URL above is dead), training runs
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar-10-batches-py").symlink_to(data_root / "cifar-10-batches-py")
    code, out, err = run([*argv, "--data-dir", str(data), "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert (out_dir / "checkpoints" / "last.pt").is_file() and "not in" not in err
