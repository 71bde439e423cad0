"""GlobalSimilarity2d (global neural similarity) and the regularisers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from nsl.layers.attention import GlobalSimilarity2d
from nsl.layers.sphere import SphereConv2d
from nsl.regularizers import l2_penalty, orthogonality_penalty


def _reference(block: GlobalSimilarity2d, x: torch.Tensor) -> torch.Tensor:
    """Independent float64 reference: explicit per-location cosines and loops over positions."""
    x = x.double()
    eps = block.eps
    n, c, h, w = x.shape
    L = h * w

    def proj(conv: nn.Conv2d) -> torch.Tensor:  # [N, L, D]
        wt = conv.weight.detach().double().reshape(conv.out_channels, c)
        xs = x.reshape(n, c, L).transpose(1, 2)  # [N, L, C]
        out = torch.einsum("nlc,dc->nld", xs, wt)
        if block.normalize:
            xnorm = torch.sqrt((xs * xs).sum(-1, keepdim=True) + eps)
            wnorm = torch.sqrt((wt * wt).sum(-1) + eps)
            out = out / xnorm / wnorm
        if conv.bias is not None:
            out = out + conv.bias.detach().double()
        return out

    q, k, v = proj(block.query), proj(block.key), proj(block.value)
    if block.query_relu:
        q = q.clamp_min(0)
    y = x.clone()
    gamma = block.gamma.item()
    for b in range(n):
        for i in range(L):
            logits = [block.scale * float(torch.dot(q[b, i], k[b, j])) for j in range(L)]
            top = max(logits)
            e = [math.exp(s - top) for s in logits]
            z = sum(e)
            o = sum((e[j] / z) * v[b, j] for j in range(L))
            if block.out_proj is not None:
                o = block.out_proj.weight.detach().double().reshape(c, -1) @ o
            y[b, :, i // w, i % w] += gamma * o
    return y


# ---------------------------------------------------------------------------------------------
# identity at gamma = 0
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 16, 5, 5), (2, 16, 3, 7), (3, 16, 1, 1), (1, 16, 8, 2)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_gate_zero_is_identity(shape, normalize, train):
    torch.manual_seed(0)
    block = GlobalSimilarity2d(16, normalize=normalize)
    block.train(train)
    assert block.gamma.shape == () and block.gamma.item() == 0.0
    x = torch.randn(shape) * 3
    assert torch.equal(block(x), x)


def test_reset_parameters_restores_identity():
    block = GlobalSimilarity2d(8)
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(2, 8, 4, 4)
    assert not torch.equal(block(x), x)
    block.reset_parameters()
    assert torch.equal(block(x), x)


def test_defaults_and_repr():
    block = GlobalSimilarity2d(64)
    assert (block.qk_channels, block.value_channels) == (8, 64)
    assert isinstance(block.query, SphereConv2d) and block.query.normalize_weight
    assert block.query.weight.shape == (8, 64, 1, 1) and block.value.weight.shape == (64, 64, 1, 1)
    assert block.query.bias is None and block.out_proj is None
    assert GlobalSimilarity2d(4).qk_channels == 1
    plain = GlobalSimilarity2d(16, normalize=False)
    assert type(plain.query) is nn.Conv2d
    r = repr(GlobalSimilarity2d(16, qk_channels=4, scale=0.5, query_relu=True))
    assert "16, qk_channels=4, value_channels=16" in r and "scale=0.5" in r and "query_relu=True" in r
    dt = GlobalSimilarity2d(8, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in dt.parameters())


# ---------------------------------------------------------------------------------------------
# against the float64 reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},
    {"normalize": False},
    {"qk_channels": 3, "value_channels": 5},
    {"scale": 0.25, "bias": True, "query_relu": True},
])
def test_matches_reference(kwargs):
    torch.manual_seed(1)
    block = GlobalSimilarity2d(12, **kwargs)
    with torch.no_grad():
        block.gamma.fill_(0.8)
        if not block.normalize:
            for conv in (block.query, block.key):
                conv.weight.mul_(3)  # sharper attention so the test is not about a near-uniform softmax
    x = torch.randn(2, 12, 3, 4)
    expected = _reference(block, x)
    # float32 module
    torch.testing.assert_close(block(x).double(), expected, rtol=1e-5, atol=1e-5)
    # float64 module: tight
    block64 = block.double()
    torch.testing.assert_close(block64(x.double()), expected, rtol=1e-10, atol=1e-10)


def test_attention_map_rows_sum_to_one_and_match_forward():
    torch.manual_seed(2)
    block = GlobalSimilarity2d(8, dtype=torch.float64)
    with torch.no_grad():
        block.gamma.fill_(-1.3)
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    a = block.attention(x)
    assert a.shape == (2, 15, 15)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 15, dtype=torch.float64))
    v = block.value(x).flatten(2)  # [N, C, L]
    manual = x + block.gamma * torch.einsum("ncj,nij->nci", v, a).reshape_as(x)
    torch.testing.assert_close(block(x), manual)


def test_cosine_logits_are_bounded():
    torch.manual_seed(3)
    block = GlobalSimilarity2d(16, qk_channels=4, dtype=torch.float64)
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64) * 100
    q = block.query(x)
    assert q.abs().max() <= 1.0
    # scaling the input does not change the cosine projections (up to eps)
    torch.testing.assert_close(block.attention(x), block.attention(x * 7), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(normalize):
    torch.manual_seed(4)
    block = GlobalSimilarity2d(4, qk_channels=2, value_channels=3, normalize=normalize, bias=True,
                               dtype=torch.float64)
    with torch.no_grad():
        block.gamma.fill_(0.6)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = list(block.parameters())
    names = [n for n, _ in block.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_gamma_gets_gradient_at_zero():
    torch.manual_seed(5)
    block = GlobalSimilarity2d(8)
    x = torch.randn(2, 8, 4, 4)
    block(x).pow(2).sum().backward()
    assert block.gamma.grad is not None and block.gamma.grad.abs() > 0
    # at gamma = 0 the projections get zero gradient, the input gets the identity's
    assert torch.count_nonzero(block.query.weight.grad) == 0
    # closed form: dL/dgamma = sum <dL/dy, o> with o the attention output
    with torch.no_grad():
        block.gamma.fill_(1.0)
        o = block(x) - x
    torch.testing.assert_close(block.gamma.grad, (2 * x * o).sum(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# inside a CNN, compiled
# ---------------------------------------------------------------------------------------------
def _small_cnn() -> nn.Module:
    return nn.Sequential(
        SphereConv2d(3, 16, 3, padding=1, bias=False, normalize_weight=True), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        GlobalSimilarity2d(16),
        nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_in_small_cnn_trains_and_compiles():
    torch.manual_seed(6)
    model = _small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 3, 8, 10), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + orthogonality_penalty(model)
        loss.backward()
        opt.step()
    block = model[4]
    assert block.gamma.item() != 0.0  # the gate moved away from the identity

    model.eval()
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    # and backward through the compiled graph
    model.train()
    model.zero_grad()
    compiled(x).sum().backward()
    assert block.gamma.grad is not None and block.query.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    block = GlobalSimilarity2d(8)
    with pytest.raises(ValueError, match=r"expected 8 input channels, got input of shape \[1, 6, 4, 4\]"):
        block(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match=r"expected input of shape \[N, C, H, W\] or unbatched \[C, H, W\], got "
                                         r"shape \[1, 8, 4, 4, 1\]"):
        block.attention(torch.randn(1, 8, 4, 4, 1))
    with pytest.raises(TypeError, match="expected a torch.Tensor input, got list"):
        block([1.0, 2.0])


def test_unbatched_input_is_a_batch_of_one():
    torch.manual_seed(0)
    block = GlobalSimilarity2d(8)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    x = torch.randn(8, 4, 4)
    torch.testing.assert_close(block(x), block(x[None])[0])
    assert block.attention(x).shape == (16, 16)


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": 0}, "channels must be a positive int, got 0"),
    ({"channels": 2.5}, "channels must be a positive int"),
    ({"channels": 8, "qk_channels": 0}, "qk_channels must be a positive int, got 0"),
    ({"channels": 8, "value_channels": -1}, "value_channels must be a positive int, got -1"),
    ({"channels": 8, "scale": 0.0}, "scale must be positive"),
    ({"channels": 8, "eps": 0.0}, "eps must be positive"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlobalSimilarity2d(**kwargs)


# ---------------------------------------------------------------------------------------------
# regularisers
# ---------------------------------------------------------------------------------------------
def _orth_by_hand(weights, coeff):
    """Loops over filter pairs in float64: coeff/2 * sum_(a,b) (<w_a, w_b> - [a == b])^2."""
    total = 0.0
    for w in weights:
        rows = [r.double() for r in w.detach().reshape(w.shape[0], -1)]
        for a, wa in enumerate(rows):
            for b, wb in enumerate(rows):
                total += (float(torch.dot(wa, wb)) - (1.0 if a == b else 0.0)) ** 2
    return coeff * total / 2


def test_orthogonality_penalty_by_hand():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), SphereConv2d(4, 5, 1, normalize_weight=True),
                          nn.Flatten(), nn.Linear(20, 6))
    weights = [model[0].weight, model[2].weight, model[4].weight]
    got = orthogonality_penalty(model)
    assert got.dim() == 0
    assert math.isclose(got.item(), _orth_by_hand(weights, 2e-4), rel_tol=1e-5)
    # explicit selection (e.g. without the classifier), a single tensor, a custom weight, float64
    sel = orthogonality_penalty([model[0], model[2].weight], weight=0.5)
    assert math.isclose(sel.item(), _orth_by_hand(weights[:2], 0.5), rel_tol=1e-5)
    w64 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    assert math.isclose(orthogonality_penalty(w64, weight=1.0).item(), _orth_by_hand([w64], 1.0), rel_tol=1e-12)
    # W W^T (filters' Gram, PyTorch layout) == TF's W^T W with W = [fan_in, out]
    tf_w = w64.reshape(3, -1).t()
    expected = ((tf_w.t() @ tf_w - torch.eye(3, dtype=torch.float64)) ** 2).sum() / 2
    torch.testing.assert_close(orthogonality_penalty(w64, weight=1.0), expected)


def test_orthogonality_penalty_zero_for_orthonormal_filters():
    torch.manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(18, 6, dtype=torch.float64))  # 6 orthonormal columns of length 18
    conv = nn.Conv2d(2, 6, 3, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(q.t().reshape(6, 2, 3, 3))
    assert orthogonality_penalty(conv).item() < 1e-24
    # more filters than dimensions cannot be orthonormal: minimum weight * (out - fan_in) / 2
    lin = nn.Linear(2, 3, bias=False)
    assert orthogonality_penalty(lin, weight=1.0).item() > 0


def test_orthogonality_penalty_gradient_and_shared_and_empty():
    conv = nn.Conv2d(2, 3, 1, bias=False, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: orthogonality_penalty(w, weight=1.0), (conv.weight.detach().clone()
                                                                                   .requires_grad_(),))
    shared = nn.Sequential(conv, conv)
    assert orthogonality_penalty(shared).item() == pytest.approx(orthogonality_penalty(conv).item())
    assert orthogonality_penalty(nn.ReLU()).item() == 0.0
    # the attention block: its three projections, not gamma
    block = GlobalSimilarity2d(8)
    assert math.isclose(orthogonality_penalty(block).item(),
                        _orth_by_hand([block.query.weight, block.key.weight, block.value.weight], 2e-4),
                        rel_tol=1e-5)


def test_l2_penalty():
    lin = nn.Linear(3, 2, dtype=torch.float64)
    expected = 5e-4 * (lin.weight.detach().pow(2).sum() + lin.bias.detach().pow(2).sum()) / 2
    torch.testing.assert_close(l2_penalty(lin), expected)
    torch.testing.assert_close(l2_penalty([lin.weight], weight=2.0), lin.weight.detach().pow(2).sum())


def test_regularizer_bad_arguments():
    with pytest.raises(TypeError, match="expected an nn.Module, a Tensor or an iterable"):
        orthogonality_penalty(3.0)
    with pytest.raises(TypeError, match="expected modules or tensors, got an item of type str"):
        l2_penalty(["weight"])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        orthogonality_penalty(torch.randn(4))
