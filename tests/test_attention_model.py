"""The authors' global-neural-similarity CIFAR model (``sphere-attention``) and its ``paper-attention`` protocol."""

from __future__ import annotations

import json

import pytest
import torch

from nsl import GlobalSimilarity2d, SphereConv2d
from nsl.models import build_model, count_parameters
from nsl.regularizers import orthogonality_penalty
from nsl.train import ConfigError, make_config, orthogonality_filters, param_groups, train


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_output_shape_and_identity_attention_at_init():
    torch.manual_seed(0)
    model = build_model("sphere-attention", "conv", num_classes=10, in_channels=3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.fc6.kernel_size == (4, 4) and isinstance(model.fc6, SphereConv2d) and model.fc6.normalize_weight
    for att, c in ((model.att1, 128), (model.att2, 192)):
        assert isinstance(att, GlobalSimilarity2d)
        assert att.gamma.item() == 0.0  # the residual gate starts at 0 ...
        assert (att.qk_channels, att.value_channels, att.query_relu, att.query.bias) == (c // 8, c, True, None)
        h = torch.randn(2, c, 8, 8)
        assert torch.equal(att(h), h)  # ... so the block is the identity
    # image size derived as cnn9 does: 8x8 single-channel input gives a 1x1 fc6
    small = build_model("sphere-attention", num_classes=5, in_channels=1, image_size=8).eval()
    assert small.fc6.kernel_size == (1, 1) and small(torch.randn(3, 1, 8, 8)).shape == (3, 5)
    # raw input: the authors' (x - 127.5) / 128 inside the model
    raw = build_model("sphere-attention", image_size=32, raw_input=True).eval()
    raw.load_state_dict(model.state_dict())
    pix = torch.rand(2, 3, 32, 32) * 255
    torch.testing.assert_close(raw(pix), model((pix - 127.5) / 128))


def test_parameter_count_and_regulariser_selection():
    model = build_model("sphere-attention", num_classes=10, image_size=32)
    convs = sum(ci * co * 9 for ci, co in [(3, 128), (128, 128), (128, 128), (128, 192), (192, 192), (192, 192),
                                           (192, 256), (256, 256), (256, 256)])
    bn = 2 * 3 * (128 + 192 + 256)
    att = sum(2 * c * (c // 8) + c * c + 1 for c in (128, 192))
    expected = convs + bn + att + 256 * 256 * 16 + 256 * 10
    assert count_parameters(model) == expected  # about 5.1 M
    # orthogonality: every conv filter (9 convs, fc6, 3 projections x 2 blocks), not the classifier
    filters = orthogonality_filters(model)
    assert len(filters) == 16 and all(f is not model.classifier.weight for f in filters)
    # cnn9 (no own selection): every conv/linear but the last one, the classifier
    cnn = build_model("cnn9", "conv")
    assert all(f is not cnn.classifier for f in orthogonality_filters(cnn))
    # L2 where the authors put it: projections, classifier, BN; not the cosine filters nor the gates
    groups = {g["name"]: g for g in param_groups(model, make_config("paper-attention"))}
    decayed = {id(p) for p in groups["default"]["params"]}
    assert groups["default"]["weight_decay"] == 5e-4 and groups["nodecay"]["weight_decay"] == 0
    names = dict(model.named_parameters())
    for n in ("classifier.weight", "att1.query.weight", "att2.value.weight", "stage1.0.bn.weight", "stage3.2.bn.bias"):
        assert id(names[n]) in decayed, n
    for n in ("stage1.0.conv.weight", "stage3.2.conv.weight", "fc6.weight", "att1.gamma"):
        assert id(names[n]) not in decayed, n


def test_protocol_values():
    cfg = make_config("paper-attention")
    assert (cfg.model, cfg.layer, cfg.optimizer, cfg.lr, cfg.iters, cfg.batch_size) == \
        ("sphere-attention", "conv", "adam", 1e-3, 64_000, 128)
    assert [round(m * cfg.iters) for m in cfg.lr_milestones] == [34_000, 54_000] and cfg.lr_gamma == 0.1
    assert (cfg.orthogonality, cfg.weight_decay, cfg.input) == (2e-4, 5e-4, "raw")
    assert make_config("paper").orthogonality == 0 and make_config("fast").orthogonality == 0
    with pytest.raises(ConfigError, match="orthogonality must be"):
        make_config("paper-attention", orthogonality=-1.0)


def test_unknown_layer_kinds_have_clear_messages():
    with pytest.raises(ValueError, match="sphere-attention supports layer 'conv' only"):
        build_model("sphere-attention", "dynamic-diagonal")
    with pytest.raises(ValueError, match="unknown layer kind"):
        build_model("sphere-attention", "nope")
    with pytest.raises(ConfigError, match="supports layer kind\\(s\\) conv only, got 'static-full'"):
        make_config("paper-attention", layer="static-full")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_model("sphere-attention", image_size=30)


def _run(tmp_path, name, data_root, **kw):
    cfg = make_config("paper-attention", dataset="cifar10", data_dir=str(data_root), out=str(tmp_path / name),
                      iters=2, batch_size=16, train_subset=64, test_subset=32, eval_batch_size=32, progress=False,
                      log_every=1, device="cpu", **kw)
    return cfg, train(cfg, echo=lambda *a, **k: None)


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_paper_attention_trains_with_the_orthogonality_term(tmp_path, data_root):
    cfg, summary = _run(tmp_path, "orth", data_root)
    assert summary["step"] == 2 and 0 <= summary["test_acc"] <= 1
    saved = json.loads((tmp_path / "orth" / "config.json").read_text())
    assert (saved["model"], saved["optimizer"], saved["orthogonality"]) == ("sphere-attention", "adam", 2e-4)
    recs = _records(tmp_path / "orth", "train")
    assert len(recs) == 2 and all(r["orth"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    # the same first batch and init without the term: the logged loss differs by exactly the penalty
    _, _ = _run(tmp_path, "plain", data_root, orthogonality=0.0)
    plain = _records(tmp_path / "plain", "train")
    assert "orth" not in plain[0]
    assert recs[0]["loss"] - plain[0]["loss"] == pytest.approx(recs[0]["orth"], rel=1e-4)
    # and that value is the penalty of the initial filters (He-normal init is far from orthonormal)
    torch.manual_seed(cfg.seed)
    model = build_model("sphere-attention", image_size=32, raw_input=True)
    expected = orthogonality_penalty(orthogonality_filters(model), 2e-4).item()
    assert recs[0]["orth"] == pytest.approx(expected, rel=1e-4)
