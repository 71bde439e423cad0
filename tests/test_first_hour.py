"""Issue 27, part 3: the first hour of a new user.

ninja found outside an activated environment, the ``[onnx]`` extra named where it is needed, start-up without
imports a command does not need, a first dynamic forward without PyTorch's compiler stack, messages that say
what happened (doctor without a compiler, ``--build`` that skips, the fallback warning, the build notice,
SIGTERM during ``nsl demo``), and the packaging (an sdist without an unrunnable test tree, an SPDX licence,
``py.typed``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from nsl import _build, _cpp, doctor

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])), **extra)
    env.pop("NSL_DISABLE_CPP", None)
    return env


# -- ninja outside an activated environment -------------------------------------------------------------------
@pytest.fixture
def path_without_ninja(tmp_path, monkeypatch) -> Path:
    """PATH = one folder holding only the C++ compiler: what cron, pipx or an IDE give ``/path/to/venv/bin/nsl``
    when the system has no ninja of its own."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    if _build.ninja_folder() is None:
        pytest.skip("this interpreter's environment has no ninja (pip install ninja)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "c++").symlink_to(cxx)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CXX", "c++")
    return bin_dir


def test_the_ninja_of_the_environment_is_found_when_it_is_not_on_path(path_without_ninja, tmp_path, monkeypatch):
    assert shutil.which("ninja") is None
    assert _build.toolchain_problem() is None
    assert os.environ["PATH"] == str(path_without_ninja)  # restored after the check
    monkeypatch.setenv("NSL_EXTENSIONS_DIR", str(tmp_path / "ext"))
    out = io.StringIO()
    doctor.doctor(out=out)
    assert "ninja is not installed" not in out.getvalue()
    assert "CPU dynamic backend: fused C++ kernel (not built yet)" in out.getvalue()


# -- the [onnx] extra -------------------------------------------------------------------------------------------
def test_the_onnx_extra_is_declared_and_named_where_export_needs_it(tmp_path, monkeypatch):
    import torch

    from nsl.export import ExportError, export_module

    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(extras["onnx"]) == {"onnx", "onnxscript", "onnxruntime"}
    assert "nsl[onnx]" in (REPO / "README.md").read_text()

    def missing(*a, **k):
        raise ModuleNotFoundError("No module named 'onnxscript'")

    monkeypatch.setattr(torch.onnx, "export", missing)
    with pytest.raises(ExportError, match=re.escape("install them with `pip install 'nsl[onnx]'`")):
        export_module(torch.nn.Conv2d(1, 2, 3), tmp_path / "m.onnx", (2, 1, 8, 8))
    assert list(tmp_path.iterdir()) == []


# -- latency: what `nsl --help` and the first dynamic forward import ----------------------------------------------
@pytest.mark.slow  # a fresh interpreter
def test_nsl_help_imports_nothing_it_does_not_need():
    code = ("import sys\nfrom nsl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = ('scipy.stats', 'PIL.Image', 'sklearn', 'matplotlib', 'torch._dynamo', 'onnx', 'onnxscript')\n"
            "print('IMPORTED', sorted(m for m in heavy if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr
    assert "IMPORTED []" in res.stdout, res.stdout[-500:]


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.cpp
def test_the_first_dynamic_forward_does_not_import_the_compiler_stack():
    """With the C++ kernel built, the first CPU forward goes straight to it: PyTorch does not import
    ``torch._dynamo`` (about 2 s) to wrap the operator's Python default implementation."""
    code = ("import sys, torch, nsl\n"
            "layer = nsl.DynamicNSConv2d(4, 4, 3, padding=1)\n"
            "out = layer(torch.randn(2, 4, 6, 6)); out.sum().backward()\n"
            "from nsl import _cpp\n"
            "print('KERNEL', _cpp.is_available(), 'DYNAMO', 'torch._dynamo' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=_env())
    assert res.returncode == 0, res.stderr
    assert "KERNEL True DYNAMO False" in res.stdout, res.stdout + res.stderr[-500:]


# -- messages -----------------------------------------------------------------------------------------------------
def test_doctor_without_a_compiler_says_it_once_and_build_says_it_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("NSL_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.delenv("NSL_DISABLE_CPP", raising=False)
    for build in (False, True):
        out = io.StringIO()
        assert doctor.doctor(build=build, out=out) == 1
        text = out.getvalue()
        assert "compiled on first use" not in text, text  # it cannot be: no line may say it will
        assert "not built (and it cannot be compiled here: see below)" in text
        assert "CPU dynamic backend: pure PyTorch: the fused C++ kernel cannot be compiled: no C++ compiler" in text
        assert ("--build: skipped, nothing was compiled: the CPU kernel cannot be compiled here: no C++ compiler"
                in text) == build
    assert not (tmp_path / "ext").exists()


def test_doctor_build_says_when_there_is_nothing_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(_cpp, "build_status", lambda: (tmp_path / "k", "built"))
    out = io.StringIO()
    doctor.doctor(build=True, out=out)
    assert "--build: nothing to do, the CPU kernel is already built" in out.getvalue()


def test_the_fallback_warning_is_one_line_and_says_nothing_was_compiled(tmp_path, monkeypatch):
    monkeypatch.setenv("NSL_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.delenv("NSL_DISABLE_CPP", raising=False)
    for name, value in (("_tried", False), ("_library", None), ("_reason", None)):  # as in a fresh process
        monkeypatch.setattr(_cpp, name, value)
    with pytest.warns(RuntimeWarning) as caught:
        assert not _cpp.is_available()
    (w,) = [w for w in caught if "fused CPU kernel" in str(w.message)]
    message = str(w.message)
    assert "\n" not in message and w.filename == "nsl" and w.lineno == 0  # no source line is printed under it
    assert "the CPU kernel cannot be compiled here: no C++ compiler" in message
    assert "compiling the CPU kernel failed" not in message


def test_the_build_notice_gives_the_measured_range(capsys):
    _cpp._announce(Path("/cache/ver/.tmp-build"))
    err = capsys.readouterr().err
    assert err == f"nsl: compiling the CPU kernel into /cache/ver (once; {_build.BUILD_TIME})...\n"
    assert re.fullmatch(r"\d+-\d+ minutes", _build.BUILD_TIME)


FALLBACK_UNDER_A_BAR = """
import sys, torch, nsl
from tqdm import tqdm
bar = tqdm(total=4, file=sys.stderr, desc="training", mininterval=0)
bar.update(1)
nsl.DynamicNSConv2d(3, 4, 3, padding=1)(torch.randn(1, 3, 6, 6))
bar.update(1)
bar.close()
"""


@pytest.mark.slow  # a fresh interpreter
def test_the_fallback_warning_is_printed_on_its_own_line_above_a_progress_bar(tmp_path):
    env = _env(NSL_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX=str(tmp_path / "no-such-c++"))
    res = subprocess.run([sys.executable, "-c", FALLBACK_UNDER_A_BAR], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.split("\n")
    (i,) = [i for i, ln in enumerate(lines) if "the fused CPU kernel is unavailable" in ln]
    shown = lines[i].split("\r")[-1]  # what the terminal shows on that line once the bar is cleared
    assert shown.startswith("nsl:0: RuntimeWarning: the fused CPU kernel is unavailable ("), repr(lines[i])
    assert not lines[i + 1].startswith("  "), "a source line is printed under the warning"
    assert "compiling the CPU kernel failed" not in res.stderr


@pytest.mark.slow  # a real nsl demo process and a real SIGTERM
def test_sigterm_during_nsl_demo_does_not_offer_to_resume_its_temporary_runs(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "nsl.cli", "demo", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(TMPDIR=str(tmp), OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:  # the last, slowest run has started
            if list(tmp.glob("nsl-demo-*/dynamic-diagonal-s0/metrics.jsonl")):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["nsl demo: error: stopped by SIGTERM; its runs were in a temporary folder, now removed (keep "
                     "them with --out DIR to continue an interrupted demo)"], err
    assert "--resume" not in out + err
    assert list(tmp.iterdir()) == []  # the temporary runs are gone


# -- packaging ----------------------------------------------------------------------------------------------------
def test_py_typed_is_shipped_and_the_licence_is_an_spdx_expression():
    project = _pyproject()
    assert project["project"]["license"] == "MIT"
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["nsl"]
    assert (REPO / "src" / "nsl" / "py.typed").is_file()
    build_req = next(r for r in project["build-system"]["requires"] if r.startswith("setuptools"))
    assert tuple(int(p) for p in build_req.split(">=")[1].split(".")[:2]) >= (77, 0)  # PEP 639 licence strings


@pytest.mark.slow  # builds the sdist and the wheel
def test_the_sdist_ships_no_test_tree_and_both_dists_ship_py_typed(tmp_path):
    pytest.importorskip("build", reason="the build package is not installed (pip install 'nsl[test]')")
    if tuple(int(p) for p in metadata.version("setuptools").split(".")[:2]) < (77, 0):
        pytest.skip("setuptools < 77 here: the isolation-free build needs the one pyproject.toml asks for")
    res = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--no-isolation", "--outdir",
                          str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    (wheel,) = tmp_path.glob("*.whl")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
        pkg_info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO") and n.count("/") == 1))
        meta = pkg_info.read().decode()
    assert not [n for n in names if n.startswith("tests")], "the sdist ships tests that cannot run from it"
    assert "src/nsl/py.typed" in names and "src/nsl/csrc/dynamic_ns_conv.cpp" in names
    assert "License-Expression: MIT" in meta
    with zipfile.ZipFile(wheel) as whl:
        assert "nsl/py.typed" in whl.namelist()
