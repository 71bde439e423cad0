"""Shared test fixtures.

Real-data tests read the packed datasets in ``../shared/data`` (or ``$NSL_SHARED_DATA``) and
materialise them once, in the standard on-disk layouts, into a cache folder
(``$NSL_TEST_CACHE``, default ``~/.cache/nsl-test-data``). Where the packed data are absent
the tests skip with the reason; with ``NSL_REQUIRE_DATA=1`` (set by ``.ci/run``) they fail.

Tests of the compiled C++ kernel carry the ``cpp`` marker: they skip where it cannot be built, and fail
with ``NSL_REQUIRE_CPP=1``. Files that train or convert models run the dynamic layers on the pure-PyTorch
backend through the ``unfold_backend`` fixture (``pytestmark = pytest.mark.usefixtures("unfold_backend")``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    return Path(os.environ.get("NSL_SHARED_DATA", REPO.parent / "shared" / "data"))


def _missing(reason: str):
    if os.environ.get("NSL_REQUIRE_DATA") == "1":
        pytest.fail(f"NSL_REQUIRE_DATA=1 but {reason}")
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpp: needs the compiled C++ kernel (skipped where it cannot be built, "
                                       "failed with NSL_REQUIRE_CPP=1)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("cpp") is None:
        return
    from nsl import _cpp

    if not _cpp.is_available():
        why = f"the C++ kernel is unavailable: {_cpp.unavailable_reason()}"
        if os.environ.get("NSL_REQUIRE_CPP") == "1":
            pytest.fail(f"NSL_REQUIRE_CPP=1 but {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture
def unfold_backend():
    """Dynamic layers on the pure-PyTorch 'unfold' backend: the fused C++ kernel (tested in test_cpp_kernel.py
    and test_ops.py) is compiled on first use, which would dominate the run time of files that train models."""
    import nsl.functional as NF

    with NF.use_backend("unfold"):
        yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    """A folder holding CIFAR-10/100 (python and binary layouts) and Omniglot, materialised once.

    Layout: ``cifar-10-batches-py/``, ``cifar-10-batches-bin/``, ``cifar-100-python/``,
    ``cifar-100-binary/``, ``omniglot/images_{background,evaluation}/cNNNN/NN.png``.
    """
    src = _shared_data()
    script = src / "materialize.py"
    if not script.exists():
        _missing(f"the packed datasets are not at {src} (set NSL_SHARED_DATA to the folder "
                 "holding materialize.py)")
    cache = Path(os.environ.get("NSL_TEST_CACHE", Path.home() / ".cache" / "nsl-test-data"))
    stamp = cache / ".complete"
    if not stamp.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(script), str(cache), "--format", "both"], check=True,
                       stdout=subprocess.DEVNULL)
        stamp.write_text("ok\n")
    return cache


@functools.cache
def _cifar(root: str, name: str, split: str, label: str = "fine", layout: str = "auto"):
    from nsl.data import load_cifar

    return load_cifar(root, name, split, label=label, layout=layout)


@pytest.fixture(scope="module")
def cifar(data_root):
    """``cifar(name, split, label='fine', layout='auto')``: cached loads from the shared cache."""
    return lambda *a, **k: _cifar(str(data_root), *a, **k)


@pytest.fixture(scope="module")
def digits28():
    """Real handwritten digits upscaled to MNIST's 28 x 28, 10 classes (scikit-learn's)."""
    from nsl.data import load_digits

    x, y = load_digits("all", size=28)
    return x, y


@pytest.fixture(autouse=True)
def _backend_not_leaked(request):
    """Fail a test that leaves a non-default dynamic backend behind (it would change later tests)."""
    import nsl.functional as NF

    yield
    if NF._default_backend != "auto":
        leaked = NF._default_backend
        NF.set_backend("auto")
        pytest.fail(f"{request.node.nodeid} left the dynamic backend set to {leaked!r}; use "
                    "nsl.functional.use_backend(...) or restore it")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Start every test with empty torch.compile caches: tests compile the same layer code objects many times,
    and past torch._dynamo's recompile limit a later ``fullgraph=True`` compile would silently fall back."""
    import sys

    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    yield
