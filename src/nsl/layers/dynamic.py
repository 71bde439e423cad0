"""Dynamic neural similarity: ``M(y) = I + g(x)(y)`` predicted at every output location."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._geometry import has_shape
from ..functional import ns_conv2d
from ._checks import batched_input, check_conv_args, check_positive_int
from ._predictor_paths import _hooked, light_predictor_forward, sphere_predictor_forward
from .sphere import SphereConv2d

__all__ = ["DynamicNSConv2d", "SimilarityPredictor", "LightPredictor", "DYNAMIC_SIMILARITIES", "PREDICTORS",
           "PREDICTOR_NORMS", "check_predictor_init", "check_predictor_norm", "check_shared_predictor",
           "predictor_norm_groups"]

DYNAMIC_SIMILARITIES = ("diagonal", "full")
PREDICTORS = ("sphere", "cosine", "light")
#: The predictors' normalisations: ``'batch'`` (the authors' BatchNorm, batch statistics), ``'group'``
#: (GroupNorm, per sample: trains at batch 1 and computes the same in train and eval mode), ``'none'``.
PREDICTOR_NORMS = ("batch", "group", "none")
_INITS = ("zero", "authors")
_NORM_EPS = 1e-3  # the authors' TensorFlow batch-norm epsilon (the group norm's too, so 'authors' init behaves alike)


def check_predictor_init(owner: str, init) -> None:
    """Raise ``ValueError`` unless ``init`` is a predictor initialisation (``'zero'`` or ``'authors'``)."""
    if init not in _INITS:
        raise ValueError(f"{owner}: unknown predictor_init {init!r}; expected one of {', '.join(_INITS)}")


def check_predictor_norm(owner: str, norm) -> None:
    """Raise ``ValueError`` unless ``norm`` is a predictor normalisation (one of :data:`PREDICTOR_NORMS`)."""
    if not isinstance(norm, str) or norm not in PREDICTOR_NORMS:
        raise ValueError(f"{owner}: unknown predictor_norm {norm!r}; expected one of {', '.join(PREDICTOR_NORMS)}")


def predictor_norm_groups(channels: int) -> int:
    """Groups of a predictor's ``GroupNorm`` over ``channels``: the most groups, at most 32 (Wu & He's
    default), that divide ``channels`` into groups of at least 8 channels; 1 below 16 channels.

    E.g. 64 -> 8, 128 -> 16, 256 -> 32, 16 -> 2, 9 (a 3x3 diagonal ``g``) -> 1, 81 (full) -> 9 (one
    group per row of ``M``). Groups of many channels keep the statistics meaningful on a 1x1 feature map.
    """
    top = min(32, channels // 8)
    return max((g for g in range(1, top + 1) if channels % g == 0), default=1)


def _norm_layer(norm: str, channels: int, factory: dict) -> nn.Module:
    """The normalisation ``norm`` (:data:`PREDICTOR_NORMS`) over ``channels``, eps 1e-3 (the authors')."""
    if norm == "batch":
        return nn.BatchNorm2d(channels, eps=_NORM_EPS, **factory)
    if norm == "group":
        return nn.GroupNorm(predictor_norm_groups(channels), channels, eps=_NORM_EPS, **factory)
    return nn.Identity()


def check_shared_predictor(owner: str, predictor) -> None:
    """Raise ``TypeError`` unless ``predictor`` (a module given to share) is an ``nn.Module``."""
    if not isinstance(predictor, nn.Module):
        raise TypeError(f"{owner}: predictor must be a predictor name or an nn.Module, got {type(predictor).__name__}")


def _check_predictor_args(owner: str, in_channels, kernel_size, stride, padding, dilation, similarity,
                          hidden_channels, init, norm) -> None:
    check_conv_args(owner, in_channels, 1, kernel_size, stride, padding, dilation)
    if similarity not in DYNAMIC_SIMILARITIES:
        raise ValueError(f"{owner}: unknown similarity {similarity!r}; expected one of "
                         f"{', '.join(DYNAMIC_SIMILARITIES)}")
    check_positive_int(owner, "hidden_channels", hidden_channels, allow_none=True)
    check_predictor_init(owner, init)
    check_predictor_norm(owner, norm)


def _he_normal_(weight: Tensor, scale: float) -> None:
    """He (fan-in, ReLU gain) normal initialisation times ``scale`` (the authors' predictor init)."""
    fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
    nn.init.normal_(weight, std=scale * math.sqrt(2.0 / fan_in))


class SimilarityPredictor(nn.Module):
    """The authors' neural similarity predictor ``g``: two convolutions, at the layer's geometry.

    ``h = ReLU(N?(SphereConv_3x3(x)))``, ``g = N?(conv_last(h))`` with ``conv_last`` of the
    modulated layer's kernel size, stride, padding and dilation, so that ``g`` lands on the layer's
    output grid and each location's prediction reads the same patch as the convolution it
    modulates (for the authors' 3x3 / stride 1 / padding 1 layers this is their 3x3 conv).

    * ``kind='sphere'``: the first conv is divided by the input patch norm
      ``sqrt(conv(x*x, 1) + 1e-4)`` (SphereNet); the last conv is plain. Batch norm (eps 1e-3)
      after both convs for diagonal ``M``, none for full ``M``, as in the authors' code.
    * ``kind='cosine'``: both convs divided by input patch norm and filter norm (cosine
      similarity), batch norm after both: the authors' best CIFAR predictor.

    ``norm`` chooses the normalisation ``N`` at those places (attributes ``bn1``, ``bn2``, whatever
    ``N`` is, so that checkpoints keep their keys): ``'batch'`` (default, the authors'):
    ``BatchNorm2d``, batch statistics in training, so it fails on a single value per channel (batch 1
    on a 1x1 map); ``'group'``: ``GroupNorm`` with :func:`predictor_norm_groups` groups, statistics
    of each sample over its group's channels and locations, identical in train and eval mode;
    ``'none'``: no normalisation, the SphereConv's patch-norm division (and the cosine's filter norm)
    alone bound the scale. Both norms use eps 1e-3 and a per-channel affine ``gamma * x_hat + beta``.

    Output channels: ``P`` (diagonal) or ``P * P`` (full), ``P = kh * kw``.
    Init: ``'zero'`` makes ``g = 0`` exactly (the last norm's scale, or the last conv
    where there is no norm, starts at zero), so the layer starts as its plain convolution
    in train and eval mode; ``'authors'`` uses He x 0.1 and He x 0.001 for the two convs.
    ``bias=False`` drops the convs' biases where there is no norm (the authors' code has
    no bias in any conv); the default ``True`` keeps them.

    Shapes: ``x [N, C_in, H, W]`` -> ``g [N, P or P*P, H_out, W_out]``.
    """

    def __init__(self, in_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 similarity: str = "diagonal", kind: str = "sphere", hidden_channels: int | None = None,
                 init: str = "zero", bias: bool = True, norm: str = "batch", device=None, dtype=None):
        super().__init__()
        if kind not in ("sphere", "cosine"):
            raise ValueError(f"SimilarityPredictor: unknown predictor kind {kind!r}; expected 'sphere' or 'cosine'")
        _check_predictor_args(type(self).__name__, in_channels, kernel_size, stride, padding, dilation, similarity,
                              hidden_channels, init, norm)
        factory = {"device": device, "dtype": dtype}
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        P = kh * kw
        out = P if similarity == "diagonal" else P * P
        if hidden_channels is None:
            hidden_channels = 64 if similarity == "diagonal" else 128
        hidden = hidden_channels
        use_norm = (similarity == "diagonal" or kind == "cosine") and norm != "none"
        self.in_channels, self.hidden_channels = in_channels, hidden
        self.kind, self.similarity, self.init, self.norm = kind, similarity, init, norm
        conv_bias = bool(bias) and not use_norm
        self.conv1 = SphereConv2d(in_channels, hidden, 3, padding=1, bias=conv_bias, **factory)
        self.bn1 = _norm_layer(norm, hidden, factory) if use_norm else nn.Identity()
        if kind == "cosine":
            self.conv1.normalize_weight = True
            self.conv2 = SphereConv2d(hidden, out, (kh, kw), stride, padding, dilation, bias=conv_bias,
                                      normalize_weight=True, **factory)
        else:
            self.conv2 = nn.Conv2d(hidden, out, (kh, kw), stride, padding, dilation, bias=conv_bias, **factory)
        self.bn2 = _norm_layer(norm, out, factory) if use_norm else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _he_normal_(self.conv1.weight, 0.1)
        _he_normal_(self.conv2.weight, 0.001)
        for m in (self.conv1, self.conv2):
            if m.bias is not None:
                m.bias.zero_()
        for bn in (self.bn1, self.bn2):
            if isinstance(bn, (nn.BatchNorm2d, nn.GroupNorm)):
                bn.reset_parameters()
        if self.init == "zero":
            if isinstance(self.bn2, (nn.BatchNorm2d, nn.GroupNorm)):
                self.bn2.weight.zero_()
            else:
                self.conv2.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched = batched_input(type(self).__name__, x, self.in_channels, self.conv1.weight.dtype)
        g = sphere_predictor_forward(self, x)  # bn2(conv2(ReLU(bn1(conv1(x))))), eval norms folded
        return g.squeeze(0) if unbatched else g


class LightPredictor(nn.Module):
    """A cheap predictor: depthwise conv at the layer's geometry, then two 1x1 convs.

    ``g = tanh(conv1x1_b(ReLU(N(conv1x1_a(ReLU(N(dwconv(x))))))))`` with the depthwise conv using the
    modulated layer's kernel size, stride, padding and dilation (so ``g`` is on its output grid)
    and ``hidden_channels`` (default 16) between the 1x1 convs. The ``tanh`` bounds ``g`` to
    ``(-1, 1)``, the range the SphereConv predictor's cosines have: unbounded, ``g`` reached -24..+38
    at lr 0.1 and the network collapsed to input-independent logits (CNN-9, CIFAR-10). Its cost per location,
    ``C_in * P + C_in * hidden + hidden * P`` multiply-adds (``hidden * P * P`` for full ``M``),
    is a small fraction of the convolution's ``C_in * C_out * P``.
    Init ``'zero'``: the last conv starts at zero (``g = 0``). ``bias=False`` drops the last conv's
    bias (the only one). ``norm``: the normalisation ``N`` (attributes ``bn0``, ``bn1``), ``'batch'``
    (default), ``'group'`` or ``'none'`` as in :class:`SimilarityPredictor` (with ``'none'`` only the
    ``tanh`` bounds ``g``).

    Shapes: ``x [N, C_in, H, W]`` -> ``g [N, P or P*P, H_out, W_out]``.
    """

    kind = "light"

    def __init__(self, in_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 similarity: str = "diagonal", hidden_channels: int | None = None, init: str = "zero",
                 bias: bool = True, norm: str = "batch", device=None, dtype=None):
        super().__init__()
        _check_predictor_args(type(self).__name__, in_channels, kernel_size, stride, padding, dilation, similarity,
                              hidden_channels, init, norm)
        factory = {"device": device, "dtype": dtype}
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        P = kh * kw
        out = P if similarity == "diagonal" else P * P
        hidden = 16 if hidden_channels is None else hidden_channels
        self.in_channels, self.hidden_channels = in_channels, hidden
        self.similarity, self.init, self.norm = similarity, init, norm
        self.dw = nn.Conv2d(in_channels, in_channels, (kh, kw), stride, padding, dilation, groups=in_channels,
                            bias=False, **factory)
        self.bn0 = _norm_layer(norm, in_channels, factory)
        self.pw = nn.Conv2d(in_channels, hidden, 1, bias=False, **factory)
        self.bn1 = _norm_layer(norm, hidden, factory)
        self.out = nn.Conv2d(hidden, out, 1, bias=bool(bias), **factory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _he_normal_(self.dw.weight, 1.0)
        _he_normal_(self.pw.weight, 1.0)
        for bn in (self.bn0, self.bn1):
            if isinstance(bn, (nn.BatchNorm2d, nn.GroupNorm)):
                bn.reset_parameters()
        if self.out.bias is not None:
            self.out.bias.zero_()
        if self.init == "zero":
            self.out.weight.zero_()
        else:
            _he_normal_(self.out.weight, 0.001)

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched = batched_input(type(self).__name__, x, self.in_channels, self.dw.weight.dtype)
        g = light_predictor_forward(self, x)  # tanh(out(ReLU(bn1(pw(ReLU(bn0(dw(x)))))))), fused on CPU
        return g.squeeze(0) if unbatched else g

    def similarity_from(self, x: Tensor) -> Tensor:
        """``M = I + g(x)`` for :class:`DynamicNSConv2d`: ``[N, P, H_out, W_out]`` (diagonal) or
        ``[N, P, P, H_out, W_out]`` (full) for ``x [N, C_in, H, W]``; the fused CPU operator computes ``M``
        directly (``g`` is never written), elsewhere ``forward(x)`` plus the identity (same numbers)."""
        x, _ = batched_input(type(self).__name__, x, self.in_channels, self.dw.weight.dtype)
        sim = light_predictor_forward(self, x, identity=True)
        if self.similarity == "diagonal":
            return sim
        P = self.dw.kernel_size[0] * self.dw.kernel_size[1]
        return sim.view(sim.shape[0], P, P, *sim.shape[2:])


class DynamicNSConv2d(nn.Conv2d):
    """Convolution whose similarity ``M(y) = I + g(x)(y)`` is predicted at every output location.

    ::

        out[n, o](y) = b[o] + sum_{c,p,q} w[o, c, p] M[n, p, q](y) x[n, c](y*stride + dilation*offset(q) - padding)

    with ``M(y) = diag(1 + g(x)(y))`` (``similarity='diagonal'``, ``g`` has ``P`` channels) or
    ``M(y) = I + g(x)(y)`` reshaped ``[P, P]`` (``'full'``, ``P * P`` channels), ``P = kh * kw``.
    ``g`` is computed on the layer's output grid (any stride, padding, dilation).

    Args:
        in_channels ... dtype: as in :class:`torch.nn.Conv2d`.
        similarity: ``'diagonal'`` or ``'full'``.
        predictor: ``'sphere'`` (the authors' predictor), ``'cosine'`` (their best CIFAR variant,
            both convs cosine-normalised), ``'light'`` (:class:`LightPredictor`), or any
            ``nn.Module`` mapping ``x [N, C_in, H, W]`` to ``[N, P or P*P, H_out, W_out]``.
            Passing another layer's ``predictor`` module shares it between layers (the paper's
            shared parametrisation): ``b = DynamicNSConv2d(..., predictor=a.predictor)``.
        predictor_init: ``'zero'`` (default: ``g = 0`` exactly at the start, so the layer starts
            as its plain convolution) or ``'authors'`` (He x 0.1 / He x 0.001, which leaves
            ``M(y)`` only approximately ``I``; see the method notes on batch-norm eps).
        hidden_channels: width of the built-in predictors (default 64 diagonal / 128 full for
            ``'sphere'`` and ``'cosine'``, 16 for ``'light'``).
        predictor_bias: ``False`` builds the built-in predictors without conv biases (the authors'
            code has none); default ``True``.
        predictor_norm: the built-in predictors' normalisation (:data:`PREDICTOR_NORMS`):
            ``'batch'`` (default, the authors' BatchNorm), ``'group'`` (GroupNorm: per sample, so the
            layer trains at batch 1 and computes the same in train and eval mode) or ``'none'``.

    Attributes:
        kernel_gate: ``None`` or a module returning the kernel shape ``D`` (``[P]`` per layer, or
            ``[C_out, P]`` per filter with diagonal ``M``), applied after ``M``:
            ``M'(y) = M(y) diag(D)``, so a removed input position stays removed.
        record_similarity: when ``True``, ``forward`` stores ``M(y)`` of the last call in
            ``last_similarity`` (``[N, P, H_out, W_out]`` or ``[N, P, P, H_out, W_out]``, detached).
        weight_transform: ``None`` or a module ``T`` with ``W -> T(W)`` (same shape): the layer
            computes with ``T(W)`` in place of ``W`` (set by :func:`nsl.convert` for ``nn.Conv2d``
            subclasses that transform their weight, e.g. weight standardisation).
        input_padding: ``None`` or a module padding the input before the predictor and the
            convolution (set by :func:`nsl.convert` for TensorFlow-style dynamic 'same' padding).

    Shapes: input ``[N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``) -> output
    ``[N, C_out, H_out, W_out]`` (``[C_out, H_out, W_out]``). The input must have the parameters'
    dtype (outside autocast): a float64 input to a float32 layer is a ``TypeError`` naming both.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", similarity: str = "diagonal",
                 predictor: str | nn.Module = "sphere", predictor_init: str = "zero",
                 hidden_channels: int | None = None, predictor_bias: bool = True, predictor_norm: str = "batch",
                 device=None, dtype=None):
        name = type(self).__name__
        check_conv_args(name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if similarity not in DYNAMIC_SIMILARITIES:
            raise ValueError(f"{name}: unknown similarity {similarity!r} for a dynamic layer; expected one of "
                             f"{', '.join(DYNAMIC_SIMILARITIES)}")
        check_predictor_init(name, predictor_init)
        check_predictor_norm(name, predictor_norm)
        check_positive_int(name, "hidden_channels", hidden_channels, allow_none=True)
        if not isinstance(predictor, nn.Module) and predictor not in PREDICTORS:
            raise ValueError(f"{name}: unknown predictor {predictor!r}; expected one of {', '.join(PREDICTORS)} "
                             "or an nn.Module")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.similarity_kind = similarity
        if isinstance(predictor, str):
            self.predictor_name = predictor
        else:  # a shared built-in predictor keeps its name ('sphere', 'cosine', 'light')
            kind = getattr(predictor, "kind", None)
            self.predictor_name = kind if kind in PREDICTORS else type(predictor).__name__
        self.predictor_init = predictor_init
        # a shared built-in predictor keeps its normalisation; a custom module has its own (None here)
        self.predictor_norm = predictor_norm if isinstance(predictor, str) else getattr(predictor, "norm", None)
        self.record_similarity = False
        self.kernel_gate: nn.Module | None = None
        self.weight_transform: nn.Module | None = None
        self.input_padding: nn.Module | None = None
        self.last_similarity: Tensor | None = None
        if isinstance(predictor, nn.Module):
            self.predictor = predictor
        else:
            geometry = dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                            padding=self.padding, similarity=similarity, hidden_channels=hidden_channels,
                            init=predictor_init, bias=predictor_bias, norm=predictor_norm, device=device,
                            dtype=dtype)
            if predictor == "light":
                self.predictor = LightPredictor(in_channels, **geometry)
            else:
                self.predictor = SimilarityPredictor(in_channels, kind=predictor, **geometry)

    def similarity_from(self, input: Tensor) -> Tensor:
        """``M(y)`` for ``input``: ``[N, P, H_out, W_out]`` (diagonal) or ``[N, P, P, H_out, W_out]`` (full).

        A built-in :class:`LightPredictor` of this similarity called plainly (its own ``forward``, no hooks on it)
        gives ``M`` by :meth:`LightPredictor.similarity_from` (on CPU one fused operator writes ``M``, never ``g``)."""
        p = self.predictor
        if (isinstance(p, LightPredictor) and type(p).forward is LightPredictor.forward and not _hooked(p)
                and p.similarity == self.similarity_kind and p.dw.kernel_size == self.kernel_size):
            return p.similarity_from(input)
        g = p(input)
        kh, kw = self.kernel_size
        P = kh * kw
        channels = P if self.similarity_kind == "diagonal" else P * P
        if g.dim() != 4 or g.shape[1] != channels:
            raise ValueError(f"the predictor returned shape {list(g.shape)}; expected [N, {channels}, H_out, "
                             f"W_out] (P{' * P' if channels != P else ''} channels for {self.similarity_kind} "
                             f"similarity with a {kh}x{kw} kernel)")
        if self.similarity_kind == "diagonal":
            return g + 1.0
        eye = torch.eye(P, device=g.device, dtype=g.dtype).view(1, P, P, 1, 1)
        return g.view(g.shape[0], P, P, *g.shape[2:]) + eye

    def base_weight(self) -> Tensor:
        """The weight ``M`` acts on: ``weight``, or ``weight_transform(weight)`` when a transform is attached.

        :func:`nsl.convert` attaches the weight transform of a converted ``nn.Conv2d`` subclass (e.g. the
        weight standardisation of ``StdConv2d``), so that the layer keeps computing what it computed.
        """
        return self.weight if self.weight_transform is None else self.weight_transform(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        input, unbatched = batched_input(type(self).__name__, input, self.in_channels, self.weight.dtype)
        if self.input_padding is not None:  # e.g. TensorFlow 'same' padding computed from the input size
            input = self.input_padding(input)
        sim = self.similarity_from(input)
        weight = self.base_weight()
        if self.kernel_gate is not None:
            d = self.kernel_gate()
            P = sim.shape[1]
            if has_shape(d, (P,)):
                sim = sim * (d.view(1, P, 1, 1) if sim.dim() == 4 else d.view(1, 1, P, 1, 1))
            elif self.similarity_kind == "diagonal" and has_shape(d, (weight.shape[0], P)):
                weight = weight * d.view(weight.shape[0], 1, *self.kernel_size)
            else:
                raise ValueError(f"kernel_gate returned shape {list(d.shape)}; expected [P] = [{P}], or "
                                 f"[C_out, P] = [{weight.shape[0]}, {P}] with diagonal similarity")
        if self.record_similarity:
            self.last_similarity = sim.detach()
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        out = ns_conv2d(input, weight, sim, self.bias, self.stride, padding, self.dilation, self.groups)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", similarity={self.similarity_kind!r}, predictor={self.predictor_name!r}"
        if self.predictor_init != "zero":
            s += f", predictor_init={self.predictor_init!r}"
        if self.predictor_norm not in ("batch", None):
            s += f", predictor_norm={self.predictor_norm!r}"
        return s
