"""Global neural similarity: a self-attention block with cosine (SphereConv) similarities."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import batched_input, check_positive_int
from .sphere import SphereConv2d

__all__ = ["GlobalSimilarity2d"]


class GlobalSimilarity2d(nn.Module):
    """Self-attention over all ``H * W`` positions with cosine-normalised projections (method page, section 5).

    The paper's appendix extends neural similarity from a local patch to the whole feature map
    (SAGAN-style attention, the authors' ``SphereNet.attention``). With ``x_i`` the ``C``-vector at
    position ``i`` (``i, j`` run over the ``L = H * W`` positions, row-major)::

        q_i = phi(W_q x_i),  k_j = phi(W_k x_j),  v_j = phi(W_v x_j)        1x1 projections
        s(i, j) = scale * <q_i, k_j>                                        the global similarity
        a(i, j) = exp(s(i, j)) / sum_j' exp(s(i, j'))                       softmax over j
        o_i = sum_j a(i, j) v_j                    (then W_o o_i if value_channels != channels)
        y_i = x_i + gamma * o_i

    With ``normalize=True`` the projections are 1x1 :class:`SphereConv2d` with
    ``normalize_weight=True``: ``phi(W x_i)[d] = w_d^T x_i / (sqrt(||x_i||^2 + eps) sqrt(||w_d||^2 + eps))``
    (``eps = 1e-4``), the cosine of the angle between filter ``w_d`` and the input vector
    ``x_i``, so every component of ``q_i``, ``k_j``, ``v_j`` lies in ``[-1, 1]`` (the patch of a
    1x1 conv is the single location, so the input norm is per location, over channels). With
    ``normalize=False`` they are plain 1x1 convolutions (ordinary SAGAN attention).

    ``gamma`` is a scalar parameter initialised to ``0``: the block starts as the identity
    function and learns how much global context to add. (It still receives a gradient at 0:
    ``dL/dgamma = sum_i <dL/dy_i, o_i>``.)

    Scale / temperature. ``scale`` defaults to ``1``, as in the authors' code (and in SAGAN).
    With cosine projections the logits are bounded, ``|s(i, j)| <= qk_channels`` (``d``), so no
    overflow guard is needed; for unrelated directions the components are about
    ``1 / sqrt(C)`` and the logits are small, so the attention starts near-uniform and has to
    sharpen by aligning the filters. The transformer's ``1 / sqrt(d)`` would cap the largest
    logit gap at ``2 sqrt(d)`` (8 for ``C = 128``), limiting how peaked the attention can
    become; pass ``scale=qk_channels ** -0.5`` (or any positive value) to use it.

    Memory: the ``L x L`` attention matrix (``N * (H W)^2`` floats, e.g. 4 MiB per sample at
    32x32 in float32) is formed through :func:`torch.nn.functional.scaled_dot_product_attention`,
    which uses a fused kernel where one is available and avoids materialising it on those
    backends; :meth:`attention` returns it explicitly for inspection.

    Departures from / options for the authors' code: their projections have no bias
    (``bias=False`` here, default) and their query projection is followed by a ReLU (the default
    of their ``_conv_layer``; ``query_relu=True`` reproduces it, default ``False`` following the
    method page's ``s = <q, k>``). They put an L2 of 5e-4 and the orthogonality penalty on the
    three projection filters and nothing on ``gamma`` (see :mod:`nsl.regularizers`).

    Args:
        channels: ``C``, channels of the input and output.
        qk_channels: ``d``, channels of queries and keys (default ``max(1, C // 8)``).
        value_channels: channels of the values (default ``C``). If different from ``C``, a plain
            1x1 output projection ``out_proj`` (``value_channels -> C``, no bias) is added.
        normalize: cosine-normalised (:class:`SphereConv2d`) projections (default) or plain 1x1 convs.
        scale: multiplier of the logits (default ``1``, see above); must be positive.
        bias: bias in the query/key/value projections (default ``False``, as the authors).
        query_relu: apply ReLU to the queries (the authors' code; default ``False``).
        eps: the SphereConv constant (``1e-4``), used when ``normalize``.
        device, dtype: as in :class:`torch.nn.Module` factories.

    Parameters: ``query.weight`` ``[d, C, 1, 1]``, ``key.weight`` ``[d, C, 1, 1]``,
    ``value.weight`` ``[C_v, C, 1, 1]`` (plus biases if ``bias``), ``gamma`` ``[]``
    (and ``out_proj.weight`` ``[C, C_v, 1, 1]``).

    Shapes: input ``[N, C, H, W]`` (or unbatched ``[C, H, W]``) -> output of the same shape.

    Example::

        >>> block = GlobalSimilarity2d(64)
        >>> x = torch.randn(2, 64, 8, 8)
        >>> torch.equal(block(x), x)  # gamma starts at 0
        True
    """

    def __init__(self, channels: int, qk_channels: int | None = None, value_channels: int | None = None,
                 normalize: bool = True, scale: float = 1.0, bias: bool = False, query_relu: bool = False,
                 eps: float = 1e-4, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        name = type(self).__name__
        check_positive_int(name, "channels", channels)
        if qk_channels is None:
            qk_channels = max(1, channels // 8)
        if value_channels is None:
            value_channels = channels
        check_positive_int(name, "qk_channels", qk_channels)
        check_positive_int(name, "value_channels", value_channels)
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"{name}: scale must be positive, got {scale!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"{name}: eps must be positive, got {eps!r}")
        self.channels = channels
        self.qk_channels = qk_channels
        self.value_channels = value_channels
        self.normalize = normalize
        self.scale = float(scale)
        self.query_relu = query_relu
        self.eps = eps

        def proj(out_channels: int) -> nn.Conv2d:
            if normalize:
                return SphereConv2d(channels, out_channels, 1, bias=bias, normalize_weight=True, eps=eps, **factory)
            return nn.Conv2d(channels, out_channels, 1, bias=bias, **factory)

        self.query = proj(qk_channels)
        self.key = proj(qk_channels)
        self.value = proj(value_channels)
        self.out_proj = (nn.Conv2d(value_channels, channels, 1, bias=False, **factory)
                         if value_channels != channels else None)
        self.gamma = nn.Parameter(torch.empty((), **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the projections as ``nn.Conv2d`` does and set ``gamma`` to 0 (the identity block)."""
        for module in (self.query, self.key, self.value, self.out_proj):
            if module is not None:
                module.reset_parameters()
        with torch.no_grad():
            self.gamma.zero_()

    def _check(self, input: Tensor) -> tuple[Tensor, bool]:
        return batched_input(type(self).__name__, input, self.channels, self.gamma.dtype)

    def _qkv(self, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys ``[N, L, d]`` and values ``[N, L, C_v]``."""
        q = self.query(input)
        if self.query_relu:
            q = F.relu(q)
        k = self.key(input)
        v = self.value(input)
        return (q.flatten(2).transpose(1, 2), k.flatten(2).transpose(1, 2), v.flatten(2).transpose(1, 2))

    def attention(self, input: Tensor) -> Tensor:
        """The softmax attention ``a(i, j)`` as ``[N, L, L]`` (``L = H * W``, row-major; rows ``i`` sum to 1).

        An unbatched input ``[C, H, W]`` gives ``[L, L]``.
        """
        input, unbatched = self._check(input)
        q, k, _ = self._qkv(input)
        a = torch.softmax(self.scale * (q @ k.transpose(1, 2)), dim=-1)
        return a.squeeze(0) if unbatched else a

    def forward(self, input: Tensor) -> Tensor:
        input, unbatched = self._check(input)
        n, c, h, w = input.shape
        q, k, v = self._qkv(input)
        # [N, 1, L, d] "one head" layout for the fused kernel; softmax over keys j.
        o = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=self.scale)
        o = o.squeeze(1).transpose(1, 2).reshape(n, self.value_channels, h, w)
        if self.out_proj is not None:
            o = self.out_proj(o)
        out = input + self.gamma * o
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        s = f"{self.channels}, qk_channels={self.qk_channels}, value_channels={self.value_channels}"
        if not self.normalize:
            s += ", normalize=False"
        if self.scale != 1.0:
            s += f", scale={self.scale}"
        if self.query_relu:
            s += ", query_relu=True"
        if self.eps != 1e-4:
            s += f", eps={self.eps}"
        return s
