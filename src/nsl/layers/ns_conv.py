"""Static neural similarity convolution: ``w^T M x`` with a learned ``M``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .._geometry import has_shape
from ..functional import static_weight
from ._checks import batched_input, check_conv_args, check_positive_int

__all__ = ["NSConv2d", "STATIC_SIMILARITIES", "apply_kernel_gate"]

STATIC_SIMILARITIES = ("identity", "diagonal", "full", "lowrank")
_INITS = ("identity", "authors")


def apply_kernel_gate(weight: Tensor, gate: nn.Module | None) -> Tensor:
    """``weight * D`` with ``D = gate()`` of shape ``[P]`` (per layer) or ``[C_out, P]`` (per filter).

    ``weight`` is ``[C_out, C_in/groups, kh, kw]``; returns ``weight`` itself when ``gate`` is None.
    """
    if gate is None:
        return weight
    d = gate()
    o, _, kh, kw = weight.shape
    if has_shape(d, (kh * kw,)):
        return weight * d.view(1, 1, kh, kw)
    if has_shape(d, (o, kh * kw)):
        return weight * d.view(o, 1, kh, kw)
    raise ValueError(f"kernel_gate returned shape {list(d.shape)}; expected [P] = [{kh * kw}] or "
                     f"[C_out, P] = [{o}, {kh * kw}]")


class NSConv2d(nn.Conv2d):
    """Convolution with a learned bilinear similarity ``f(w, x) = w^T M x`` (static NSL).

    With ``P = kh * kw`` kernel positions (row-major, as in ``F.conv2d``)::

        out[n, o](y) = b[o] + sum_{c,p,q} w[o, c, p] M_{s(c)}[p, q] x[n, c](y*stride + dilation*offset(q) - padding)

    ``M`` acts on kernel positions and is shared by every filter and, by default, every input
    channel (``similarity_groups=1``; with ``S > 1`` the input channels of each convolution
    group are split into ``S`` blocks ``s(c)``, each with its own ``M``). Because ``M`` does not
    depend on the input, the layer is exactly a convolution with weight
    ``W'[o, c, q] = sum_p W[o, c, p] M[p, q]`` and costs one ``F.conv2d``; :func:`nsl.fold` turns
    it into an ``nn.Conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as in :class:`torch.nn.Conv2d`; ``weight`` and ``bias``
            have ``nn.Conv2d``'s shapes.
        similarity: structure of ``M``:
            ``'identity'`` (``M = I``, no parameter: the plain-convolution baseline),
            ``'diagonal'`` (``M = diag(m)``, parameter ``similarity`` of shape ``[P]``: a weight
            per kernel position, i.e. the kernel's shape), ``'full'`` (``similarity`` ``[P, P]``),
            or ``'lowrank'`` (``M = I + U V^T``, parameters ``similarity_u`` and ``similarity_v``
            of shape ``[P, r]``; ``U`` starts at zero so ``M`` starts at ``I``). With
            ``similarity_groups = S > 1`` every parameter gains a leading dimension ``S``.
        similarity_init: ``'identity'`` (default: ``M = I``, so the layer starts as its plain
            convolution) or ``'authors'`` (the authors' CIFAR code: diagonal ``m`` = ``eye(kh, kw)``
            flattened, i.e. only the kernel's main diagonal is active at the start; full ``M = I``).
        similarity_groups: ``S``, the number of input-channel blocks with their own ``M``.
        rank: ``r`` for ``'lowrank'``.

    Attributes:
        kernel_gate: ``None`` or a module returning the kernel shape ``D`` (``[P]`` or
            ``[C_out, P]``, see :mod:`nsl.shape`), applied after ``M``: ``W' = (W M) * D``.
        weight_transform: ``None`` or a module ``T`` with ``W -> T(W)`` (same shape), applied before
            ``M``: ``W' = (T(W) M) * D`` (set by :func:`nsl.convert` for ``nn.Conv2d`` subclasses that
            transform their weight, e.g. weight standardisation).
        input_padding: ``None`` or a module padding the input before the convolution (set by
            :func:`nsl.convert` for TensorFlow-style dynamic 'same' padding).

    Shapes: input ``[N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``) -> output
    ``[N, C_out, H_out, W_out]`` (``F.conv2d``'s sizes). The input must have the parameters' dtype
    (outside autocast): a float64 input to a float32 layer is a ``TypeError`` naming both.

    Example::

        >>> layer = NSConv2d(16, 32, 3, padding=1, similarity="full")
        >>> layer(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", similarity: str = "full",
                 similarity_init: str = "identity", similarity_groups: int = 1, rank: int = 2,
                 device=None, dtype=None):
        name = type(self).__name__
        check_conv_args(name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if similarity not in STATIC_SIMILARITIES:
            raise ValueError(f"{name}: unknown similarity {similarity!r}; expected one of "
                             f"{', '.join(STATIC_SIMILARITIES)}")
        if similarity_init not in _INITS:
            raise ValueError(f"{name}: unknown similarity_init {similarity_init!r}; expected one of "
                             f"{', '.join(_INITS)}")
        check_positive_int(name, "similarity_groups", similarity_groups)
        if (in_channels // groups) % similarity_groups:
            raise ValueError(f"{name}: similarity_groups = {similarity_groups} must divide the input channels per "
                             f"group, in_channels / groups = {in_channels // groups}")
        if similarity == "lowrank":
            check_positive_int(name, "rank", rank)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.similarity_init = similarity_init
        self.similarity_groups = similarity_groups
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        P = self.kernel_size[0] * self.kernel_size[1]
        lead = () if similarity_groups == 1 else (similarity_groups,)
        if similarity == "diagonal":
            self.similarity = nn.Parameter(torch.empty(*lead, P, **factory))
        elif similarity == "full":
            self.similarity = nn.Parameter(torch.empty(*lead, P, P, **factory))
        elif similarity == "lowrank":
            self.similarity_u = nn.Parameter(torch.empty(*lead, P, rank, **factory))
            self.similarity_v = nn.Parameter(torch.empty(*lead, P, rank, **factory))
        self.kernel_gate: nn.Module | None = None
        self.weight_transform: nn.Module | None = None
        self.input_padding: nn.Module | None = None
        self.similarity_kind = similarity  # set last: reset_parameters re-initialises M once it exists
        self.reset_similarity()

    def reset_parameters(self) -> None:
        """Re-initialise ``weight`` and ``bias`` as ``nn.Conv2d`` does, and ``M`` per ``similarity_init``."""
        super().reset_parameters()
        if hasattr(self, "similarity_kind"):  # nn.Conv2d.__init__ calls this before M exists
            self.reset_similarity()

    @torch.no_grad()
    def reset_similarity(self) -> None:
        """Set ``M`` to its initial value (identity, or the authors' initialisation)."""
        kind = self.similarity_kind
        kh, kw = self.kernel_size
        P = kh * kw
        if kind == "diagonal":
            if self.similarity_init == "authors":
                init = torch.eye(kh, kw).flatten()
            else:
                init = torch.ones(P)
            self.similarity.copy_(init.expand_as(self.similarity))
        elif kind == "full":
            self.similarity.copy_(torch.eye(P).expand_as(self.similarity))
        elif kind == "lowrank":
            self.similarity_u.zero_()
            nn.init.normal_(self.similarity_v, std=1.0 / math.sqrt(P))

    def similarity_matrix(self) -> Tensor | None:
        """``M`` as ``[P, P]`` (``[S, P, P]`` with similarity groups; ``None`` for ``'identity'``).

        A diagonal ``m`` is returned as ``diag(m)``.
        """
        kind = self.similarity_kind
        if kind == "identity":
            return None
        if kind == "diagonal":
            return torch.diag_embed(self.similarity)
        if kind == "full":
            return self.similarity
        u = self.similarity_u
        eye = torch.eye(u.shape[-2], device=u.device, dtype=u.dtype)
        return eye + u @ self.similarity_v.transpose(-1, -2)

    def effective_weight(self) -> Tensor:
        """The folded weight ``W'[o, c, q] = sum_p T(W)[o, c, p] M_{s(c)}[p, q] * D[o, q]``.

        Shape ``[C_out, C_in/groups, kh, kw]``. ``D`` is the kernel shape of an attached
        ``kernel_gate`` (``[P]`` per layer or ``[C_out, P]`` per filter), applied after ``M`` so that
        a removed position stays removed; without a gate ``D = 1``. ``T`` is the attached
        ``weight_transform`` (the identity without one).
        """
        return apply_kernel_gate(self._similar_weight(), self.kernel_gate)

    def base_weight(self) -> Tensor:
        """The weight ``M`` acts on: ``weight``, or ``weight_transform(weight)`` when a transform is attached.

        :func:`nsl.convert` attaches the weight transform of a converted ``nn.Conv2d`` subclass (e.g. the
        weight standardisation of ``StdConv2d``), so that the layer keeps computing what it computed.
        """
        return self.weight if self.weight_transform is None else self.weight_transform(self.weight)

    def _similar_weight(self) -> Tensor:
        kind = self.similarity_kind
        weight = self.base_weight()
        if kind == "identity":
            return weight
        S = self.similarity_groups
        if S == 1:
            sim = self.similarity if kind in ("diagonal", "full") else self.similarity_matrix()
            return static_weight(weight, sim)
        o, c, kh, kw = weight.shape
        w = weight.reshape(o, S, c // S, kh * kw)
        if kind == "diagonal":
            w = w * self.similarity[None, :, None, :]
        else:
            w = torch.einsum("oscp,spq->oscq", w, self.similarity_matrix())
        return w.reshape(o, c, kh, kw)

    def forward(self, input: Tensor) -> Tensor:
        input, unbatched = batched_input(type(self).__name__, input, self.in_channels, self.weight.dtype)
        if self.input_padding is not None:  # e.g. TensorFlow 'same' padding computed from the input size
            input = self.input_padding(input)
        out = self._conv_forward(input, self.effective_weight(), self.bias)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", similarity={self.similarity_kind!r}"
        if self.similarity_init != "identity":
            s += f", similarity_init={self.similarity_init!r}"
        if self.similarity_groups != 1:
            s += f", similarity_groups={self.similarity_groups}"
        if self.similarity_kind == "lowrank":
            s += f", rank={self.rank}"
        return s
