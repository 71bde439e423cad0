"""torch.export and AOTInductor with a dynamic batch, for every layer kind.

No shape check may guard on the batch (``nsl._geometry.has_shape``: Python's tuple ``==`` compared the batch of a
dynamic ``M`` with ``P``, 9 for a 3x3 kernel and 49 for a 7x7 stem, and the export failed with ``Constraints
violated (batch)``). A converted net with a 7x7 stride-2 stem and a 3x3 layer is exported with a batch ``Dim`` and
run at batch 1, 3, 9 and 49 against eager; the program keeps ``torch.ops.nsl.dynamic_ns_conv2d``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import nsl
from nsl.layers import LAYER_KINDS, DynamicNSConv2d
from nsl.models import build_model

BATCHES = (1, 3, 9, 49)  # 9 and 49: the P of the 3x3 layer and of the 7x7 stem
OP = "nsl.dynamic_ns_conv2d.default"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (hand-offs between threads would cost more than the work), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(model: nn.Module) -> nn.Module:
    """Predictors, similarities and dynamic-filter mixing away from their identity start (so M matters)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "predictor" in name or "similarity" in name or "mix" in name:
                p.normal_(0, 0.3)
    return model


def _net(kind: str, **options) -> nn.Module:
    """A 7x7 stride-2 stem and a 3x3 conv converted to ``kind``, pooled to 5 logits; eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 7, stride=2, padding=3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    if kind != "conv":
        net = nsl.convert(net, kind=kind, predictor_width=4, **options) if LAYER_KINDS[kind].predictor else \
            nsl.convert(net, kind=kind, **options)
    return _randomise(net).eval()


CASES = ([pytest.param(k, {}, id=k) for k in LAYER_KINDS]
         + [pytest.param("dynamic-diagonal", {"predictor_stride": s}, id=f"dynamic-diagonal-predictor_stride{s}")
            for s in (2, 0)]
         + [pytest.param("dynamic-diagonal-light", {"predictor_norm": "batch"}, id="dynamic-diagonal-light-batchnorm")])


def _op_calls(ep) -> int:
    return sum(str(n.target) == OP for n in ep.graph.nodes if n.op == "call_function")


def _check_batches(run, model, size=16):
    gen = torch.Generator().manual_seed(2)
    for n in BATCHES:
        x = torch.randn(n, 3, size, size, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x), rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"batch {n}: {m}")


@pytest.mark.parametrize("kind,options", CASES)
def test_export_with_a_batch_dim_runs_at_every_batch(kind, options):
    model = _net(kind, **options)
    ep = torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: Dim("batch")},))
    layers = sum(isinstance(m, DynamicNSConv2d) for m in model.modules())
    assert _op_calls(ep) == layers  # the operator stays in the program (2 for the DynamicNSConv2d kinds)
    _check_batches(ep.module(), model)


@pytest.mark.parametrize("backend", ["unfold", "ztrick", "reference"])
def test_export_with_a_batch_dim_on_the_pure_pytorch_backends(backend):
    """The explicit backends trace to plain ops; the lean ones chunk the batch, one chunk when it is symbolic
    (a Python loop over a symbolic batch put a guard on it: 'You marked batch as dynamic but your code
    specialized it to be a constant (2)')."""
    import nsl.functional as NF

    model = _net("dynamic-diagonal")
    with NF.use_backend(backend):
        ep = torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: Dim("batch")},))
        _check_batches(ep.module(), model)


def test_export_shared_prediction_cnn9_with_a_batch_dim():
    """CNN-9 with one prediction per stage (the stage's g held between its layers' calls)."""
    torch.manual_seed(0)
    model = _randomise(build_model("cnn9", "dynamic-diagonal", width=4, image_size=8, share_prediction=True,
                                   predictor_width=4)).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: Dim("batch")},))
    assert _op_calls(ep) == sum(isinstance(m, DynamicNSConv2d) for m in model.modules())
    _check_batches(ep.module(), model, size=8)


def _aoti():
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        pytest.skip("torch._inductor.aoti_compile_and_package needs torch >= 2.6")
    return torch._inductor


@pytest.mark.slow  # an inductor C++ compile: about a minute on 2 cores
def test_aot_inductor_package_with_a_batch_dim(tmp_path):
    """An AOTInductor package of a dynamic-diagonal model runs at every batch; in a fresh process it loads and
    runs after ``import nsl`` (the operator's schema is defined in Python) and fails without it."""
    inductor = _aoti()
    model = _net("dynamic-diagonal")
    ep = torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: Dim("batch")},))
    path = inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    _check_batches(inductor.aoti_load_package(path), model)
    x = torch.randn(9, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.save({"x": x, "want": model(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        if sys.argv[1] == "with-nsl":
            import nsl  # noqa: F401
        io = torch.load({str(tmp_path / "io.pt")!r})
        runner = torch._inductor.aoti_load_package({str(path)!r})
        torch.testing.assert_close(runner(io["x"]), io["want"], rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    good = subprocess.run([sys.executable, "-c", script, "with-nsl"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert good.returncode == 0 and good.stdout.strip() == "ok", good.stderr
    bad = subprocess.run([sys.executable, "-c", script, "without"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode != 0 and "nsl" in bad.stderr, bad.stdout
