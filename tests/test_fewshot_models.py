"""Few-shot backbones, ProtoNet / bilinear heads, episode loss and the evaluation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nsl.fewshot import (
    BACKBONES,
    BilinearSimilarityHead,
    FewShotClassifier,
    FewShotDataset,
    PrototypicalHead,
    build_backbone,
    check_episode,
    confidence_interval,
    episode_labels,
    episode_loss_and_accuracy,
    evaluate,
    get_fewshot_dataset,
    make_episode,
)
from nsl.models import LAYER_KINDS

# --------------------------------------------------------------------------------------------------
# Backbones


@pytest.mark.parametrize("layer", LAYER_KINDS)
def test_conv4_embedding_shapes_every_layer_kind(layer):
    torch.manual_seed(0)
    for in_channels, side, dim in [(3, 32, 256), (1, 28, 64)]:  # CIFAR-FS / FC100, Omniglot
        net = build_backbone("conv4", layer, in_channels=in_channels)
        z = net(torch.randn(2, in_channels, side, side))
        assert z.shape == (2, dim) and net.embedding_dim(side) == dim
        z.square().mean().backward()
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # every 3x3 conv of the blocks is of the requested kind
    kinds = {type(b.conv).__name__ for b in net.blocks}
    assert len(kinds) == 1 and (layer != "conv" or kinds == {"Conv2d"})


@pytest.mark.parametrize("layer", ["conv", "static-diagonal"])
def test_conv4_mini_imagenet_size(layer):
    net = build_backbone("conv4", layer)
    assert net(torch.randn(1, 3, 84, 84)).shape == (1, 1600) and net.embedding_dim(84) == 1600
    assert net.embedding_dim((84, 32)) == 64 * 5 * 2


@pytest.mark.parametrize("layer", ["conv", "dynamic-diagonal"])
def test_resnet12_embedding_shape(layer):
    torch.manual_seed(0)
    net = build_backbone("resnet12", layer)
    assert [b.conv1.out_channels for b in net.blocks] == [64, 160, 320, 640]
    assert all(type(b.shortcut[0]).__name__ == "Conv2d" and b.shortcut[0].kernel_size == (1, 1)
               for b in net.blocks)
    z = net(torch.randn(2, 3, 16, 16))
    assert z.shape == (2, 640) and net.embedding_dim(16) == 640
    small = build_backbone("resnet12", layer, in_channels=1, widths=(8, 8, 16, 16))
    assert small(torch.randn(3, 1, 20, 20)).shape == (3, 16)


def test_backbone_registry_errors():
    assert set(BACKBONES) == {"conv4", "resnet12"}
    with pytest.raises(ValueError, match=r"unknown backbone 'conv5'; valid backbones: conv4, resnet12"):
        build_backbone("conv5")
    with pytest.raises(ValueError, match=r"unknown layer kind 'dynamic'; valid kinds: conv, static-diagonal"):
        build_backbone("conv4", "dynamic")
    with pytest.raises(ValueError, match="at least 16x16"):
        build_backbone("conv4").embedding_dim(8)


# --------------------------------------------------------------------------------------------------
# Heads

S = torch.tensor([[1.0, 0.0, 2.0], [3.0, 2.0, 0.0],      # class 0
                  [0.0, -1.0, 1.0], [-2.0, 1.0, 3.0]],    # class 1
                 dtype=torch.float64)
YS = torch.tensor([0, 0, 1, 1])
Q = torch.tensor([[2.0, 1.0, 1.0], [-1.0, 0.0, 2.0], [0.5, -0.5, 0.0]], dtype=torch.float64)


def _hand_logits(metric, scale=10.0):
    protos = [[(1 + 3) / 2, (0 + 2) / 2, (2 + 0) / 2], [(0 - 2) / 2, (-1 + 1) / 2, (1 + 3) / 2]]  # [2,1,1], [-1,0,2]
    out = []
    for q in Q.tolist():
        row = []
        for p in protos:
            dot = sum(a * b for a, b in zip(q, p))
            if metric == "euclidean":
                row.append(-sum((a - b) ** 2 for a, b in zip(q, p)))
            elif metric == "cosine":
                row.append(scale * dot / math.sqrt(sum(a * a for a in q) * sum(b * b for b in p)))
            else:
                row.append(dot)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
def test_prototypical_head_against_hand_computation(metric):
    head = PrototypicalHead(metric).double()
    logits = head(S, YS, Q)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, _hand_logits(metric), rtol=1e-12, atol=1e-12)
    if metric == "euclidean":  # query 0 is prototype 0, query 1 is prototype 1: distance exactly 0
        assert logits[0, 0] == 0 and logits[1, 1] == 0 and (logits <= 0).all()


def test_cosine_scale_is_learnable_or_fixed():
    head = PrototypicalHead("cosine").double()
    assert isinstance(head.scale, torch.nn.Parameter) and head.scale.item() == 10.0
    torch.nn.functional.cross_entropy(head(S, YS, Q), torch.tensor([0, 1, 0])).backward()
    assert head.scale.grad is not None and head.scale.grad.item() != 0
    fixed = PrototypicalHead("cosine", learn_scale=False, scale_init=5.0).double()
    assert list(fixed.parameters()) == [] and fixed.scale.item() == 5.0
    torch.testing.assert_close(fixed(S, YS, Q), _hand_logits("cosine", 5.0))


@pytest.mark.parametrize("rank", [None, 2])
def test_bilinear_head_is_the_dot_product_at_init(rank):
    torch.manual_seed(0)
    head = BilinearSimilarityHead(3, rank=rank).double()
    torch.testing.assert_close(head.matrix(), torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(head(S, YS, Q), PrototypicalHead("dot")(S, YS, Q), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head(S, YS, Q), _hand_logits("dot"))
    n_params = sum(p.numel() for p in head.parameters())
    assert n_params == (9 if rank is None else 2 * 3 * rank)


@pytest.mark.parametrize("rank", [None, 2])
def test_bilinear_head_with_prototype_bias_is_protonet_at_init(rank):
    torch.manual_seed(0)
    head = BilinearSimilarityHead(3, rank=rank, prototype_bias=True).double()
    diff = head(S, YS, Q) - 0.5 * PrototypicalHead("euclidean")(S, YS, Q)
    torch.testing.assert_close(diff, 0.5 * Q.square().sum(1, keepdim=True).expand(-1, 2))  # per-query constant
    with torch.no_grad():  # a learned M enters the bias too: q^T M p - p^T M p / 2
        m = torch.randn(3, 3, dtype=torch.float64)
        if rank is None:
            head.delta.copy_(m - torch.eye(3, dtype=torch.float64))
        else:
            head.u.copy_(m[:, :2])
            m = torch.eye(3, dtype=torch.float64) + head.u @ head.v.t()
        p = torch.stack([S[:2].mean(0), S[2:].mean(0)])
        expected = Q @ m @ p.t() - 0.5 * torch.einsum("jd,de,je->j", p, m, p)
        torch.testing.assert_close(head(S, YS, Q), expected)


def _permuted_episode(g, n_classes=8, n_way=4, k_shot=3, n_query=5, noise=0.3):
    """Support of class c near e_c, queries near e_perm(c): the dot product is worse than chance."""
    perm = (torch.arange(n_classes) + 1) % n_classes
    classes = torch.randperm(n_classes, generator=g)[:n_way]
    eye = torch.eye(n_classes)
    support = eye[classes].repeat_interleave(k_shot, 0) + noise * torch.randn(n_way * k_shot, n_classes, generator=g)
    query = eye[perm[classes]].repeat_interleave(n_query, 0) + noise * torch.randn(n_way * n_query, n_classes,
                                                                                  generator=g)
    return support, episode_labels(n_way, k_shot), query, episode_labels(n_way, n_query)


@pytest.mark.parametrize("rank", [None, 8])
def test_bilinear_head_learns_a_similarity_the_dot_product_lacks(rank):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = BilinearSimilarityHead(8, rank=rank)
    dot = PrototypicalHead("dot")
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    test = [_permuted_episode(g) for _ in range(10)]

    def accuracy(h):
        with torch.no_grad():
            return np.mean([(h(s, ys, q).argmax(1) == yq).float().mean().item() for s, ys, q, yq in test])

    before = accuracy(head)
    losses = []
    for _ in range(150):
        s, ys, q, yq = _permuted_episode(g)
        loss = torch.nn.functional.cross_entropy(head(s, ys, q), yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert before == accuracy(dot) < 0.25  # at init: the dot product, below chance (0.25) here
    assert accuracy(head) > 0.9
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    assert not torch.allclose(head.matrix().detach(), torch.eye(8))


# --------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_episode_inputs():
    with pytest.raises(ValueError, match=r"support must be grouped by class.*got \[0, 1, 0, 1\]"):
        check_episode(S, torch.tensor([0, 1, 0, 1]), Q)
    with pytest.raises(ValueError, match=r"support must be grouped by class.*got \[0, 0, 0, 1\]"):
        PrototypicalHead()(S, torch.tensor([0, 0, 0, 1]), Q)  # unequal shots
    with pytest.raises(ValueError, match=r"support must be grouped by class.*got \[1, 1, 2, 2\]"):
        PrototypicalHead()(S, torch.tensor([1, 1, 2, 2]), Q)  # labels must start at 0
    with pytest.raises(ValueError, match="support_labels has 3 entries but support has 4 rows"):
        PrototypicalHead()(S, YS[:3], Q)
    with pytest.raises(ValueError, match="query embedding dim 2 does not match support embedding dim 3"):
        PrototypicalHead()(S, YS, Q[:, :2])
    with pytest.raises(ValueError, match="embedding dim 3 does not match the bilinear head's dim 5"):
        BilinearSimilarityHead(5)(S.float(), YS, Q.float())
    with pytest.raises(ValueError, match=r"must be 2-D \[n, D\]"):
        PrototypicalHead()(S[None], YS, Q)
    with pytest.raises(ValueError, match="unknown metric 'manhattan'; valid metrics: euclidean, cosine, dot"):
        PrototypicalHead("manhattan")

    model = FewShotClassifier(build_backbone("conv4", in_channels=1), PrototypicalHead())
    xs, xq = torch.randn(4, 1, 28, 28), torch.randn(3, 1, 28, 28)
    with pytest.raises(ValueError, match="support_labels has 3 entries but support has 4 images"):
        model(xs, YS[:3], xq)
    with pytest.raises(ValueError, match=r"support images \(1, 28, 28\) and query images \(1, 32, 32\)"):
        model(xs, YS, torch.randn(3, 1, 32, 32))
    with pytest.raises(ValueError, match="query_labels has 2 entries but query has 3 images"):
        episode_loss_and_accuracy(model, xs, YS, xq, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"query_labels must lie in 0\.\.1 \(n_way = 2\), got 0\.\.2"):
        episode_loss_and_accuracy(model, xs, YS, xq, torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------------------------------
# Evaluation protocol


def test_confidence_interval_matches_numpy():
    acc = np.array([0.6, 0.8, 0.4, 1.0, 0.7, 0.55, 0.9])
    mean, ci = confidence_interval(acc)
    assert mean == pytest.approx(np.mean(acc), abs=1e-15)
    assert ci == pytest.approx(1.96 * np.std(acc, ddof=0) / np.sqrt(len(acc)), abs=1e-15)
    assert confidence_interval(torch.tensor(acc))[1] == pytest.approx(ci, abs=1e-15)
    assert confidence_interval([0.5, 0.5, 0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        confidence_interval([])


class _ScriptedModel(torch.nn.Module):
    """Answers the first ``correct[e]`` queries of episode ``e`` right and the rest wrong."""

    def __init__(self, correct):
        super().__init__()
        self.correct, self.calls = list(correct), 0

    def forward(self, support, support_labels, query):
        n_way = int(support_labels.max()) + 1
        yq = episode_labels(n_way, len(query) // n_way)
        pred = (yq + 1) % n_way
        k = self.correct[self.calls]
        pred[:k] = yq[:k]
        self.calls += 1
        return torch.nn.functional.one_hot(pred, n_way).float()


def _toy_dataset(n_classes=6, per_class=8, side=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_classes * per_class, 3, side, side), generator=g, dtype=torch.uint8)
    return FewShotDataset(images, torch.arange(n_classes).repeat_interleave(per_class),
                          [f"c{i}" for i in range(n_classes)], "toy", "test")


def test_evaluate_known_per_episode_accuracies():
    ds = _toy_dataset()
    correct = [10, 7, 3, 10, 0, 5, 9, 8]  # of 5-way x 2 queries = 10 per episode
    model = _ScriptedModel(correct).train()
    res = evaluate(model, ds, n_way=5, k_shot=1, n_query=2, n_episodes=len(correct), seed=3, progress=False)
    expected = np.array(correct) / 10
    np.testing.assert_allclose(res.accuracies, expected, rtol=0, atol=1e-15)
    assert res.mean == pytest.approx(expected.mean(), abs=1e-15)
    assert res.ci95 == pytest.approx(1.96 * np.std(expected) / np.sqrt(len(expected)), abs=1e-15)
    assert res.std == pytest.approx(np.std(expected), abs=1e-15) and res.n_episodes == 8
    assert model.training and str(res).startswith(f"{100 * expected.mean():.2f} +- ")
    with pytest.raises(ValueError, match="n_query >= 1"):
        evaluate(model, ds, 5, 1, 0, 4, progress=False)
    with pytest.raises(ValueError, match="batch_episodes > 1 needs a model with .embed and .head"):
        evaluate(model, ds, 5, 1, 2, 4, batch_episodes=2, progress=False)


def test_evaluate_paired_episodes_and_batching():
    torch.manual_seed(0)
    ds = _toy_dataset()
    model = FewShotClassifier(build_backbone("conv4", width=8), PrototypicalHead()).train()
    a = evaluate(model, ds, 3, 2, 3, 6, seed=1, progress=True)
    b = evaluate(model, ds, 3, 2, 3, 6, seed=1, batch_episodes=4, progress=False)
    assert model.training  # training mode restored
    np.testing.assert_array_equal(a.accuracies, b.accuracies)  # same episodes, batching is transparent
    assert np.all(np.isin(np.round(a.accuracies * 9), np.arange(10)))  # multiples of 1 / (3 * 3)


# --------------------------------------------------------------------------------------------------
# Real data: a few ProtoNet training episodes on CIFAR-FS


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_protonet_conv4_training_reduces_the_loss_on_cifar_fs(data_root):
    ds = get_fewshot_dataset("cifar-fs", data_root, "train")
    torch.manual_seed(0)
    model = FewShotClassifier(build_backbone("conv4"), PrototypicalHead("euclidean"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, accs = [], []
    for ep in ds.sampler(n_way=5, k_shot=5, n_query=5, n_episodes=30, seed=0):
        xs, ys, xq, yq = make_episode(ds.images, ep, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        loss, acc = episode_loss_and_accuracy(model, xs, ys, xq, yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append(acc.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.6 * first, (first, last, losses)
    assert np.mean(accs[-10:]) > 0.25  # above chance (0.2) on 5-way episodes
