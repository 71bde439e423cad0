"""The C++ kernel cache (``nsl._build``, ``nsl._cpp``) under real faults, and ``nsl doctor``.

Every fault is real: a building process is killed (SIGKILL, SIGINT) once its compiler runs, a built
``.so`` is truncated, a lock is held by a live process. Each fresh process must end, bounded by a
timeout, with a working kernel (checked against the pure-PyTorch backend) or the one fallback warning.
Real builds are costly (2-3 minutes each on 2 cores): wherever a built cache is needed, this environment's
own build (the install's ``nsl doctor --build``) is copied; only the SIGKILL test builds the kernel for real, and
the truncation test builds a one-function library through the same cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsl import _build, _cpp

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 600  # a real build takes 2-3 minutes on 2 idle cores

# A dynamic layer on the automatic backend (the C++ kernel when usable) against the pure-PyTorch one.
USE_LAYER = """
import torch
import nsl.functional as NF
from nsl import _cpp
from nsl.layers import DynamicNSConv2d
torch.manual_seed(0)
layer = DynamicNSConv2d(3, 4, 3, padding=1).double()
x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
out = layer(x)
with NF.use_backend("unfold"):
    ref = layer(x)
err = float((out - ref).abs().max().detach())
assert err < 1e-9, err
print("kernel" if _cpp.is_available() else "fallback", err)
"""


def _env(root: Path) -> dict:
    env = dict(os.environ, NSL_EXTENSIONS_DIR=str(root), PYTHONPATH=os.pathsep.join(
        [str(REPO / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("NSL_DISABLE_CPP", None)
    return env


def _run(root: Path, code: str, timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_env(root), capture_output=True, text=True,
                          timeout=timeout)


def _spec(root: Path) -> _build.KernelSpec:
    s = _cpp._spec()
    return _build.KernelSpec(s.name, s.source, s.cflags, s.ldflags, root)


def _check_used(res: subprocess.CompletedProcess) -> str:
    """The fresh process ended well: exit 0, output equal to the pure-PyTorch backend's, and either the
    kernel was used or the one fallback warning was printed."""
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    mode = res.stdout.split()[0]
    if mode == "fallback":
        assert len(re.findall("the fused CPU kernel is unavailable", res.stderr)) == 1, res.stderr
    return mode


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory) -> Path:
    """A kernel cache root in a temporary folder holding a verified build: a copy of this environment's own
    (``$NSL_EXTENSIONS_DIR``, built by the install's ``nsl doctor --build``) when it has one, else built once
    here by ``nsl doctor --build``. (The tests that need a real build from nothing make their own.)"""
    root = tmp_path_factory.mktemp("built-ext")
    mine = _spec(_build.cache_root())
    if _build.verify(mine) is None:
        shutil.copytree(mine.directory(), _spec(root).directory())
        return root
    res = subprocess.run([sys.executable, "-m", "nsl.cli", "doctor", "--build"], env=_env(root),
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if _build.verify(_spec(root)) is not None:
        why = f"the C++ kernel did not build here: {res.stdout[-500:]} {res.stderr[-500:]}"
        if os.environ.get("NSL_REQUIRE_CPP") == "1":
            pytest.fail(f"NSL_REQUIRE_CPP=1 but {why}")
        pytest.skip(why)
    return root


def _copy(built: Path, dst: Path) -> Path:
    shutil.copytree(built, dst)
    return dst


def _compiler_pids(root: Path) -> list[int]:
    """Live processes working inside ``root`` (ninja, the compiler) on the kernel's source."""
    root, found = str(root.resolve()), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if cwd.startswith(root) and b"dynamic_ns_conv" in cmd and state != "Z":
            found.append(int(pid))
    return found


def _compiler_running(root: Path) -> bool:
    return bool(_compiler_pids(root))


def _start_and_kill(root: Path, sig: int) -> None:
    """Start building the real kernel into ``root``, wait for its compiler, send ``sig`` to its process group."""
    proc = subprocess.Popen([sys.executable, "-c", USE_LAYER], env=_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _compiler_running(root):
            assert proc.poll() is None, f"the build ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "the compiler never started"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if sig == signal.SIGINT:  # the interrupted process stops its compiler (ninja runs it in its own group)
        deadline = time.monotonic() + 10
        while _compiler_running(root):
            assert time.monotonic() < deadline, "the interrupted build left its compiler running"
            time.sleep(0.1)
    else:  # nothing outlives SIGKILL to stop it: stop the orphaned compiler (ours) so it does not slow the rebuild
        for pid in _compiler_pids(root):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # a real kernel build (tier 2)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the compiler start")
def test_build_killed_with_sigkill_then_a_fresh_process_rebuilds(tmp_path):
    """The fresh process is a first use of a dynamic layer: it compiles for real (never waiting on a stale lock),
    says where, and uses the kernel; then ``nsl doctor`` finds the build and compiles nothing."""
    root = tmp_path / "ext"
    _start_and_kill(root, signal.SIGKILL)
    assert _build.verify(_spec(root)) == "not built"
    res = _run(root, USE_LAYER)
    assert _check_used(res) == "kernel"
    assert f"nsl: compiling the CPU kernel into {_spec(root).parent} " in res.stderr, res.stderr
    assert "waiting" not in res.stderr
    assert _build.verify(_spec(root)) is None
    assert not list(_spec(root).parent.glob(".*build*")), "the killed build's temporary folder was left"
    doctor = subprocess.run([sys.executable, "-m", "nsl.cli", "doctor"], env=_env(root), capture_output=True,
                            text=True, timeout=120)
    assert f"CPU kernel cache: {_spec(root).directory()}: built\n" in doctor.stdout, doctor.stdout + doctor.stderr
    assert "CPU dynamic backend: fused C++ kernel\n" in doctor.stdout
    assert "compiling" not in doctor.stdout + doctor.stderr


@pytest.mark.slow  # copies (or, in an environment without one, builds) the kernel (tier 2)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the compiler start")
def test_build_interrupted_with_sigint_leaves_nothing_that_blocks(tmp_path, built_cache):
    root = tmp_path / "ext"
    _start_and_kill(root, signal.SIGINT)
    parent = _spec(root).parent
    assert not list(parent.glob(".*build*")), "the interrupted build's temporary folder was left"
    # publish the session build beside what the interrupted one left (its lock file): a fresh process
    # takes the lock and uses the kernel at once
    built = _spec(built_cache).directory()
    shutil.copytree(built, parent / built.name)
    res = _run(root, USE_LAYER, timeout=120)
    assert _check_used(res) == "kernel"
    assert "compiling" not in res.stderr and "waiting" not in res.stderr


# A library of one C function, built through the same cache as the kernel (seconds instead of minutes: the
# rebuild after a fault is the cache's logic, the same for every library; the kernel's own first build, after a
# real SIGKILL, is the test above).
PROBE_SOURCE = 'extern "C" int nsl_probe_answer() { return 42; }\n'
USE_PROBE = """
import ctypes, sys
from pathlib import Path
from nsl import _build
spec = _build.KernelSpec("nsl_probe", Path(sys.argv[1]), ("-O2",), (), Path(sys.argv[2]))
so = _build.load_or_build(spec, announce=lambda tmp: print("compiling into", tmp, file=sys.stderr, flush=True))
print(ctypes.CDLL(str(so)).nsl_probe_answer())
"""


@pytest.mark.slow  # two real (small) builds (tier 2)
def test_truncated_library_is_rebuilt_never_sigbus(tmp_path):
    """A built library cut to half its size: a fresh process must not load it (mapping a truncated ELF can
    SIGBUS), but rebuild it, publish the rebuild and call into it."""
    problem = _build.toolchain_problem()
    if problem and os.environ.get("NSL_REQUIRE_CPP") != "1":
        pytest.skip(f"nothing can be compiled here: {problem}")
    src = tmp_path / "probe" / "probe.cpp"
    src.parent.mkdir()
    src.write_text(PROBE_SOURCE)
    root = tmp_path / "ext"
    spec = _build.KernelSpec("nsl_probe", src, ("-O2",), (), root)

    def use() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", USE_PROBE, str(src), str(root)], env=_env(root),
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT)

    first = use()
    assert first.returncode == 0 and first.stdout == "42\n", first.stderr[-2000:]
    so = spec.directory() / "nsl_probe.so"
    size = so.stat().st_size
    with open(so, "r+b") as f:
        f.truncate(size // 2)
    assert _build.verify(spec) == f"damaged: nsl_probe.so has {size // 2} bytes, the manifest says {size}"
    res = use()
    assert res.returncode != -signal.SIGBUS
    assert res.returncode == 0 and res.stdout == "42\n", res.stderr[-2000:]
    assert "compiling into" in res.stderr
    assert _build.verify(spec) is None
    assert not list(spec.parent.glob(".nsl_probe-*")), "a temporary or moved-aside folder was left"


@pytest.mark.slow  # copies (or, in an environment without one, builds) the kernel (tier 2)
def test_damaged_cache_is_detected_before_loading(tmp_path, built_cache):
    """Same size, one byte changed; a wrong manifest; no manifest: each is 'damaged', nothing is loaded."""
    root = _copy(built_cache, tmp_path / "ext")
    spec = _spec(root)
    d = spec.directory()
    so, manifest = d / "nsl_dynamic_ns_conv.so", d / "manifest.json"
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    assert _build.verify(spec) == "damaged: the sha256 of nsl_dynamic_ns_conv.so does not match the manifest"
    m = json.loads(manifest.read_text())
    m["fingerprint"]["torch"] = "0.0"
    manifest.write_text(json.dumps(m))
    assert _build.verify(spec) == "damaged: manifest.json does not match this source/torch/python/flags"
    manifest.unlink()
    assert _build.verify(spec) == "damaged: manifest.json unreadable (FileNotFoundError)"


def test_key_follows_the_source_content_not_its_time(tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("int f() { return 1; }\n")
    spec = _build.KernelSpec("k", src, ("-O3",), (), tmp_path)
    key = spec.key()
    os.utime(src, (0, 0))
    assert spec.key() == key
    src.write_text("int f() { return 2; }\n")
    assert spec.key() != key
    assert _build.KernelSpec("k", src, ("-O2",), (), tmp_path).key() != spec.key()


@pytest.mark.slow  # copies (or, in an environment without one, builds) the kernel (tier 2)
def test_a_live_lock_holder_makes_the_next_process_wait_and_say_so(tmp_path, built_cache):
    """The holder keeps the lock until the waiter has said that it waits; then the waiter proceeds."""
    root = _copy(built_cache, tmp_path / "ext")
    lock, release = _spec(root).lock_path(), tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom pathlib import Path\nfrom nsl import _build\n"
         f"with _build.flock(Path({str(lock)!r})):\n    print('held', flush=True)\n"
         f"    while not Path({str(release)!r}).exists():\n        time.sleep(0.05)\n"],
        env=_env(root), stdout=subprocess.PIPE, text=True)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen([sys.executable, "-c", USE_LAYER], env=_env(root), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        first = waiter.stderr.readline()  # the waiter's first line, printed while the lock is still held
        assert first == f"nsl: waiting for process {holder.pid} to finish building the C++ kernel (lock {lock})...\n"
        release.touch()
        out, err = waiter.communicate(timeout=120)
    finally:
        release.touch()
        holder.wait(timeout=60)
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert _check_used(subprocess.CompletedProcess(waiter.args, waiter.returncode, out, err)) == "kernel"
    assert "waiting" not in err and "compiling" not in err  # one line, and no rebuild


@pytest.mark.slow  # copies (or, in an environment without one, builds) the kernel (tier 2)
def test_two_processes_loading_at_once(tmp_path, built_cache):
    root = _copy(built_cache, tmp_path / "ext")
    procs = [subprocess.Popen([sys.executable, "-c", USE_LAYER], env=_env(root), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert _check_used(subprocess.CompletedProcess(p.args, p.returncode, out, err)) == "kernel"


def test_a_lock_held_too_long_gives_up_with_a_timeout(tmp_path):
    lock = tmp_path / "x.lock"
    expected = re.escape(f"process {os.getpid()} held {lock} for over 0.2 s")
    with _build.flock(lock), pytest.raises(TimeoutError, match=expected):
        with _build.flock(lock, max_wait_s=0.2):
            pass


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    root = tmp_path / "ext"
    env = {**_env(root), "CXX": str(tmp_path / "no-such-c++")}
    res = subprocess.run([sys.executable, "-c", USE_LAYER], env=env, capture_output=True, text=True, timeout=120)
    assert _check_used(res) == "fallback"
    assert f"no C++ compiler ('{tmp_path / 'no-such-c++'}' is not on PATH" in res.stderr
    doc = subprocess.run([sys.executable, "-m", "nsl.cli", "doctor"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert doc.returncode == 1 and "Traceback" not in doc.stderr
    assert "CPU dynamic backend: pure PyTorch: the fused C++ kernel cannot be compiled: no C++ compiler" in doc.stdout


# -- nsl doctor ---------------------------------------------------------------------------------------
@pytest.mark.slow  # copies (or, in an environment without one, builds) the kernel (tier 2)
def test_doctor_on_a_built_cache_reports_it_and_compiles_nothing(built_cache):
    """(``nsl doctor --build`` compiling from nothing: the SIGKILL test above.)"""
    folder = _spec(built_cache).directory()
    for args in (["doctor"], ["doctor", "--build"]):
        res = subprocess.run([sys.executable, "-m", "nsl.cli", *args], env=_env(built_cache), capture_output=True,
                             text=True, timeout=120)
        assert f"CPU kernel cache: {folder}: built\n" in res.stdout, res.stdout + res.stderr
        assert "CPU dynamic backend: fused C++ kernel\n" in res.stdout
        assert "compiling" not in res.stdout + res.stderr
    assert re.search(r"^torch \S+, triton \S+( \S+)?, numpy \S+", res.stdout, re.M)


def test_doctor_without_build_compiles_nothing(tmp_path):
    root = tmp_path / "ext"
    res = subprocess.run([sys.executable, "-m", "nsl.cli", "doctor"], env=_env(root), capture_output=True,
                         text=True, timeout=120)
    folder = _spec(root).directory()
    assert f"CPU kernel cache: {folder}: not built" in res.stdout
    assert res.returncode in (0, 1) and "Traceback" not in res.stderr
    assert not folder.exists()
    dis = subprocess.run([sys.executable, "-m", "nsl.cli", "doctor", "--build"],
                         env={**_env(root), "NSL_DISABLE_CPP": "1"}, capture_output=True, text=True, timeout=120)
    assert "CPU kernel cache: none (disabled by NSL_DISABLE_CPP=1)" in dis.stdout
    assert not folder.exists()
