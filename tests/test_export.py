"""`nsl export` / :func:`nsl.export.export_onnx`: trained checkpoints to ONNX, checked with onnxruntime."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import nsl
from cli_helpers import run
from nsl.export import ExportError, export_onnx, load_for_export
from nsl.train import make_config, train

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install nsl[test])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install nsl[test])")
pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install nsl[test])")


def _trained(root, kind):
    """A tiny trained CNN-9 checkpoint (digits, 3 steps) of layer kind ``kind``."""
    with nsl.functional.use_backend("unfold"):
        cfg = make_config("demo", layer=kind, iters=3, epochs=None, test_subset=32, progress=False,
                          out=str(root / kind))
        train(cfg, echo=lambda *a, **k: None)
    return root / kind / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {kind: _trained(root, kind) for kind in ("conv", "static-full")}


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def test_export_conv_and_folded_static_full(checkpoints, tmp_path, capsys):
    conv_path, folded_path = tmp_path / "conv.onnx", tmp_path / "static-folded.onnx"
    code, out, err = run(["export", "--checkpoint", str(checkpoints["conv"]), "--out", str(conv_path)], capsys)
    assert code == 0, err
    assert "exported the cnn9/conv classifier (digits)" in out and "input [N, 1, 8, 8] (N dynamic)" in out
    assert "-> output [N, 10]" in out and "onnxruntime check: max |onnx - torch| = " in out
    code, out, err = run(["export", "--checkpoint", str(checkpoints["static-full"]), "--out", str(folded_path),
                          "--fold", "--batch", "3"], capsys)
    assert code == 0, err
    assert "(9 static NSL layer(s) folded)" in out and "on a random batch of 3" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx", "static-folded.onnx"]  # no temp files
    # folded: the graph of a plain CNN (the same operators as the conv model's), computing the folded model
    assert _ops(folded_path) == _ops(conv_path)
    static = load_for_export(checkpoints["static-full"]).module
    folded = nsl.fold(static).eval()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # another batch size: N is dynamic
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(folded_path, x), folded(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_run_onnx(folded_path, x), static(x), atol=1e-4, rtol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(folded_path)).metadata_props}
    assert meta["nsl.layer"] == "static-full" and meta["nsl.folded"] == "True" and meta["nsl.num_classes"] == "10"


@pytest.mark.slow  # about 1 min of exporter time on 2 CPU cores; the few-shot test below exports a dynamic layer
def test_export_dynamic_diagonal_cnn9_uses_standard_ops(tmp_path):
    ckpt = _trained(tmp_path, "dynamic-diagonal")
    path = tmp_path / "dd.onnx"
    res = export_onnx(ckpt, path, fold=True)  # fold leaves dynamic layers as they are
    assert res["checked"] and res["max_abs_diff"] <= res["tolerance"] and res["folded_static_layers"] == 0
    domains = {n.domain for n in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}  # no custom op: the reference formula in standard operators
    model = load_for_export(ckpt).module
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(path, x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_export_fewshot_dynamic_checkpoint_exports_the_backbone(tmp_path):
    from nsl.fewshot.train import CHECKPOINT_FORMAT, FewShotConfig, build_fewshot_model

    torch.manual_seed(0)
    cfg = FewShotConfig(dataset="omniglot", backbone="conv4", layer="dynamic-diagonal")
    model = build_fewshot_model(cfg, 1, 28)
    for m in model.modules():  # predictors start at g = 0 (M = I): make the dynamic part matter
        if isinstance(m, nsl.DynamicNSConv2d):
            with torch.no_grad():
                for p in m.predictor.parameters():
                    p.normal_(0, 0.1)
    ckpt = tmp_path / "fs.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "episode": 0, "config": cfg.to_dict(),
                "meta": {"in_channels": 1, "image_size": 28}, "model": model.state_dict()}, ckpt)
    res = export_onnx(ckpt, tmp_path / "fs.onnx", batch=3)
    assert res["what"] == "conv4/dynamic-diagonal few-shot embedding backbone (omniglot)"
    assert {n.domain for n in onnx.load(str(tmp_path / "fs.onnx")).graph.node} <= {"", "ai.onnx"}  # standard ops
    assert res["checked"] and res["output_shape"] == [3, model.backbone.embedding_dim(28)]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(tmp_path / "fs.onnx", x), model.backbone.eval()(x), atol=1e-4,
                                   rtol=1e-4)


def test_export_bad_inputs_are_one_line(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints["conv"])
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    ck = torch.load(ckpt, weights_only=True)
    mismatch = tmp_path / "mismatch.pt"  # a config of another layer kind than its weights
    torch.save({**ck, "config": {**ck["config"], "layer": "static-full"}}, mismatch)
    cases = [
        (["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")],
         f"checkpoint {tmp_path / 'none.pt'} does not exist"),
        (["--checkpoint", ckpt, "--out", str(tmp_path / "missing" / "m.onnx")],
         f"folder {tmp_path / 'missing'} does not exist"),
        (["--checkpoint", ckpt, "--out", str(text / "m.onnx")], f"{text} is not a folder"),
        (["--checkpoint", ckpt, "--out", str(tmp_path)], f"{tmp_path} is a directory; expected the path of the .onnx"),
        (["--checkpoint", str(text), "--out", str(tmp_path / "m.onnx")], f"cannot read checkpoint {text}"),
        (["--checkpoint", str(other), "--out", str(tmp_path / "m.onnx")],
         f"{other} is neither an nsl training checkpoint"),
        (["--checkpoint", str(mismatch), "--out", str(tmp_path / "m.onnx")], f"{mismatch}"),
        (["--checkpoint", str(mismatch), "--out", str(tmp_path / "m.onnx")], "stage1.0.conv.similarity"),
        (["--checkpoint", ckpt, "--out", str(tmp_path / "m.onnx"), "--input-size", "16", "16"],
         "maps 16x16 inputs to outputs of shape [N, 40], not [N, 10] logits; it was built for 8x8 inputs"),
    ]
    for argv, message in cases:
        code, out, err = run(["export", *argv], capsys)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("nsl export: error: ") and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mismatch.pt", "notes.txt", "other.pt"]  # nothing written
    with pytest.raises(ExportError, match="batch must be a positive integer, got 0"):
        export_onnx(ckpt, tmp_path / "m.onnx", batch=0)


LAYER_KINDS = nsl.layers.LAYER_KINDS
_PREDICTOR_KINDS = [name for name, k in LAYER_KINDS.items()
                    if k.dynamic and k.predictor is not None and k.similarity in ("diagonal", "full")]


def _conv_groups(path):
    return [next((a.i for a in n.attribute if a.name == "group"), 1)
            for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if LAYER_KINDS[k].similarity == "full"
                                  else k for k in _PREDICTOR_KINDS])  # full M: tier 2 (the diagonal kinds stay)
def test_export_dynamic_layer_is_conv_mul_and_exact(kind, tmp_path):
    # stride 2, dilation 2, groups 2, uneven sizes: every geometry argument reaches the slices and 1x1 convs
    from nsl.layers import make_conv

    torch.manual_seed(0)
    layer = make_conv(kind, 4, 6, 3, stride=2, padding=2, dilation=2, groups=2).eval()
    for p in layer.predictor.parameters():  # predictors may start at M = I: make the dynamic part matter
        with torch.no_grad():
            p.normal_(0, 0.3)
    x = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(3))
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(layer, (x,), str(path), input_names=["input"], output_names=["output"], dynamo=True,
                      external_data=False)
    assert "Einsum" not in _ops(path)  # the reference formula's mix (full) is gone
    assert _conv_groups(path).count(2) >= 9  # the modulated conv: one 1x1 Conv (groups 2) per filter position
    with torch.no_grad():
        want = layer.double()(x.double()).float()
    torch.testing.assert_close(_run_onnx(path, x), want, atol=1e-4, rtol=1e-4)
