"""Kernel-shape learning: a Boolean ``D`` selecting which kernel positions a layer (or filter) uses.

The paper reads a regularised similarity as learning the kernel's shape: a Boolean matrix ``D``
keeps ``k`` of the ``P = kh * kw`` kernel positions. ``D`` is applied *after* the similarity ``M``,
so that a removed position stays removed whatever ``M`` is::

    static:   W'[o, c, q] = (sum_p W[o, c, p] M[p, q]) * D[q]        (D[o, q] per filter)
    dynamic:  M'(y) = M(y) diag(D)                                     (per filter: diagonal M only)

Optimising a Boolean ``D`` is combinatorial; this module implements a simple, deterministic
heuristic (a gate per position, relaxed with sparsity pressure, then annealed to an exact top-k
with straight-through gradients, then frozen; see :class:`KernelShapeGate` and :func:`anneal`)
and a magnitude-pruning baseline (:func:`magnitude_prune`) that produces the same kind of hard
gate, so that both are trained, evaluated and folded (:func:`nsl.fold`) the same way.

Typical loop (``steps`` optimiser steps, usually after some dense training)::

    gates = attach_kernel_shape(model, active=5)                # 5 of 9 positions per 3x3 layer
    shape = shape_parameters(model)                             # the gates' logits
    rest = [p for p in model.parameters() if all(p is not q for q in shape)]
    opt = torch.optim.Adam([{"params": rest},                   # the gate logits: a larger lr,
                            {"params": shape, "lr": 0.05}])     # no weight decay
    for step in range(steps):
        anneal(model, step / steps)      # relaxed -> hard top-k (40 %) -> frozen, fine-tune (70 %)
        loss = task_loss(model) + sparsity_loss(model, weight=1.0)
        ...
    harden(model)                        # no-op after anneal froze the gates; exact 0/1 buffers
    plain = nsl.fold(model)              # static layers: removed positions are exact zeros

Measured on scikit-learn digits (16x16, a 3-layer CNN, 200 dense + 200 shaping steps, 5 of 9
positions, 3 seeds; ``tests/test_shape.py``): dense 0.92-0.94, learned shape 0.86-0.90 (diagonal
and full ``M``), magnitude pruning + 200 fine-tuning steps 0.87-0.97: on this small task the
learned shape does not beat the magnitude baseline.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

from .layers import DynamicNSConv2d, NSConv2d

__all__ = [
    "KernelShapeGate",
    "PHASES",
    "attach_kernel_shape",
    "magnitude_prune",
    "magnitude_scores",
    "sparsity_loss",
    "set_phase",
    "anneal",
    "harden",
    "kernel_shapes",
    "active_fraction",
    "shape_parameters",
    "gated_layers",
    "resolve_budget",
]

PHASES = ("relaxed", "hard", "frozen")
_SHAPED = (NSConv2d, DynamicNSConv2d)


def resolve_budget(budget, positions: int) -> int:
    """The number ``k`` of active positions out of ``positions = P`` for ``budget``.

    ``budget`` is an ``int`` ``k`` with ``1 <= k <= P``, or a ``float`` fraction ``f`` in ``(0, 1]``
    giving ``k = max(1, floor(f * P + 0.5))`` (``0.5`` of a 3x3 kernel -> 5 positions).
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"the budget of active kernel positions must be an int k (positions kept) or a float "
                        f"fraction in (0, 1], got {budget!r}")
    if isinstance(budget, numbers.Integral):
        k = int(budget)
        if not 1 <= k <= positions:
            raise ValueError(f"budget k = {k} active positions is out of range for a kernel with P = {positions} "
                             f"positions: expected 1 <= k <= {positions}")
        return k
    f = float(budget)
    if not (0.0 < f <= 1.0) or math.isnan(f):
        raise ValueError(f"budget fraction {budget!r} of active kernel positions must be in (0, 1]; pass an int "
                         "for a number of positions")
    return max(1, math.floor(f * positions + 0.5))


def _topk_mask(scores: Tensor, k: int) -> Tensor:
    """0/1 mask of the ``k`` largest entries of ``scores`` along the last dimension.

    Ties are broken deterministically towards the lower position index (stable sort).
    """
    idx = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k]
    return torch.zeros_like(scores).scatter_(-1, idx, 1.0)


class KernelShapeGate(nn.Module):
    """A learnable kernel shape ``D`` over ``P`` positions: ``[P]`` (per layer) or ``[C_out, P]`` (per filter).

    Parameters and buffers (``R`` rows: 1 per layer, ``C_out`` per filter):
        ``logits`` (parameter, ``[P]`` or ``[C_out, P]``, all ``init = 3``): one score per position.
        ``mask`` (buffer, same shape, all ones at the start): the last hard shape ``D_prev`` while
        ``'hard'``, the frozen 0/1 shape after :meth:`harden`.
        The phase and temperature are saved in the state dict too (``get_extra_state``), so a
        hardened checkpoint loads hardened.

    With the stretched sigmoid ``s(l) = sigmoid(l / T) (1 + 2 eps) - eps`` (``eps = stretch = 0.1``:
    the deterministic part of a hard-concrete gate) and ``r(l) = clamp(s(l), 0, 1)`` whose gradient
    is taken straight through the clamp (``dr/dl = ds/dl`` everywhere), ``forward()`` returns, by
    phase:

    * ``'relaxed'`` (the start): ``D = r(l)``, continuous in ``[0, 1]``. At ``init = 3`` and
      ``T = 1``, ``s = 1.04`` so ``D = 1`` exactly: attaching a gate does not change the layer,
      yet the logits receive gradients from the start (straight-through clamp). A position can
      reach exactly 0 (``l <= -2.4 T``) and come back.
    * ``'hard'``: ``D = topk_k(l + margin * D_prev) + r(l) - stop_grad(r(l))``: the forward value
      is exactly 0/1 with exactly ``k`` ones per row (ties to the lower index), the backward pass
      is that of ``r`` (straight-through estimator), so the logits keep learning and the shape can
      still change. The hysteresis ``margin`` (default 1) lets a removed position replace a kept
      one only when its logit is larger by more than ``margin``: each swap is a shock to the
      network (the swapped-in weights did not train while removed), so it must be rare.
    * ``'frozen'`` (after :meth:`harden`): ``D = mask``, an exact 0/1 buffer, no gradient.

    Sparsity pressure (:meth:`penalty`): ``mean_rows relu(sum_q r(l_q) - k) / P``: it pushes the
    soft mass of each row down to the budget ``k`` and vanishes there, so it never collapses the
    shape; the task gradient decides which positions go.

    Schedule (:func:`anneal`, ``progress`` in ``[0, 1]``): relaxed with the penalty while
    ``progress < warmup = 0.4`` (the temperature moves geometrically from ``temperature`` to
    ``final_temperature``; equal by default), hard top-k with straight-through gradients until
    ``freeze = 0.7``, then frozen (:meth:`harden`: ``D = topk_k(l + margin * D_prev)``, i.e. the
    current hard shape) while the network fine-tunes to its final shape.

    Args:
        positions: ``P = kh * kw``.
        out_channels: ``None`` for one shape shared by every filter and channel of the layer (like
            ``M``), or ``C_out`` for one shape per filter.
        budget: ``k`` (int, ``1 <= k <= P``) active positions per row, or a fraction ``f`` in
            ``(0, 1]`` (``k = max(1, floor(f * P + 0.5))``).
        temperature, final_temperature: ``T > 0`` of the sigmoid at the start and at the end of the
            relaxed phase.
        margin: hysteresis of the hard phase, in logits (``>= 0``).
        init: initial logit of every position; ``D`` starts at exactly 1 when
            ``sigmoid(init / T) >= (1 + eps) / (1 + 2 eps)``.
        stretch: ``eps >= 0``.

    Shapes: ``forward()`` -> ``[P]`` or ``[C_out, P]`` (the layer's ``kernel_gate`` contract).
    """

    def __init__(self, positions: int, out_channels: int | None = None, budget: int | float = 0.5,
                 temperature: float = 1.0, final_temperature: float = 1.0, margin: float = 1.0, init: float = 3.0,
                 stretch: float = 0.1, device=None, dtype=None):
        super().__init__()
        if isinstance(positions, bool) or not isinstance(positions, numbers.Integral) or positions < 1:
            raise ValueError(f"positions must be a positive int (P = kh * kw), got {positions!r}")
        bad_out = isinstance(out_channels, bool) or not isinstance(out_channels, numbers.Integral)
        if out_channels is not None and (bad_out or out_channels < 1):
            raise ValueError(f"out_channels must be None (one shape per layer) or a positive int, got {out_channels!r}")
        if not (temperature > 0 and final_temperature > 0):
            raise ValueError(f"temperatures must be > 0, got temperature={temperature!r}, "
                             f"final_temperature={final_temperature!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        if not stretch >= 0:
            raise ValueError(f"stretch must be >= 0, got {stretch!r}")
        self.positions = int(positions)
        self.out_channels = None if out_channels is None else int(out_channels)
        self.k = resolve_budget(budget, self.positions)
        self.initial_temperature = self.temperature = float(temperature)
        self.final_temperature = float(final_temperature)
        self.margin = float(margin)
        self.stretch = float(stretch)
        shape = (self.positions,) if out_channels is None else (self.out_channels, self.positions)
        self.logits = nn.Parameter(torch.full(shape, float(init), device=device, dtype=dtype))
        self.register_buffer("mask", torch.ones(shape, device=device, dtype=dtype))
        self._phase = "relaxed"

    def get_extra_state(self) -> dict:
        return {"phase": self._phase, "temperature": self.temperature}

    def set_extra_state(self, state: dict) -> None:
        if state.get("phase") not in PHASES:
            raise ValueError(f"invalid kernel-shape gate state {state!r}")
        self._phase = state["phase"]
        self.temperature = float(state.get("temperature", self.temperature))

    # -- phase -----------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """``'relaxed'``, ``'hard'`` or ``'frozen'``."""
        return self._phase

    def set_phase(self, phase: str) -> None:
        """Switch between ``'relaxed'`` and ``'hard'`` (use :meth:`harden` to freeze)."""
        if phase not in ("relaxed", "hard"):
            raise ValueError(f"unknown phase {phase!r}; expected 'relaxed' or 'hard' (use harden() to freeze)")
        if self.phase == "frozen":
            raise ValueError("this kernel-shape gate is hardened (frozen); attach a new gate to train a shape again")
        self._phase = phase

    # -- values ----------------------------------------------------------------------------------
    def relaxed(self) -> Tensor:
        """``r(l) = clamp(sigmoid(l / T) (1 + 2 eps) - eps, 0, 1)`` with a straight-through clamp."""
        s = torch.sigmoid(self.logits / self.temperature) * (1.0 + 2.0 * self.stretch) - self.stretch
        return s.detach().clamp(0.0, 1.0) + (s - s.detach())  # forward: exactly the clamp

    @torch.no_grad()
    def hard(self) -> Tensor:
        """``topk_k(l + margin * D_prev)``: exactly ``k`` ones per row (no gradient); updates ``D_prev``.

        ``D_prev`` (the ``mask`` buffer, all ones before the first call) is the previous hard shape:
        the bonus ``margin`` makes a position swap in only when its logit beats the weakest active
        one by more than ``margin`` (hysteresis), so the shape does not flicker between steps.
        """
        new = _topk_mask(self.logits + self.margin * self.mask, self.k)
        self.mask.copy_(new)
        return new

    @torch.no_grad()
    def current(self) -> Tensor:
        """The value ``forward()`` gives now, without a gradient and without updating ``D_prev``."""
        if self.phase == "frozen":
            return self.mask
        if self.phase == "relaxed":
            return self.relaxed()
        return _topk_mask(self.logits + self.margin * self.mask, self.k)

    def forward(self) -> Tensor:
        phase = self.phase
        if phase == "frozen":
            return self.mask
        r = self.relaxed()
        if phase == "relaxed":
            return r
        return self.hard() + (r - r.detach())  # forward: exactly 0/1; backward: dr/dl

    def penalty(self) -> Tensor:
        """``mean_rows relu(sum_q r(l_q) - k) / P`` (0 once frozen); a scalar in ``[0, (P - k) / P]``."""
        if self.phase == "frozen":
            return self.logits.new_zeros(())
        excess = torch.relu(self.relaxed().sum(-1) - self.k)
        return excess.mean() / self.positions

    @torch.no_grad()
    def harden(self, scores: Tensor | None = None) -> Tensor:
        """Freeze ``D`` to the exact 0/1 mask of the ``k`` largest ``scores`` of each row.

        Default scores: ``logits + margin * D_prev`` (the current hard shape, see the class notes).

        Returns the mask (``[P]`` or ``[C_out, P]``); the gate returns it from now on.
        """
        scores = self.logits + self.margin * self.mask if scores is None else scores
        if tuple(scores.shape) != tuple(self.logits.shape):
            raise ValueError(f"scores of shape {list(scores.shape)} do not match the gate's shape "
                             f"{list(self.logits.shape)}")
        self.mask.copy_(_topk_mask(scores.detach().to(self.mask), self.k))
        self._phase = "frozen"
        return self.mask

    def extra_repr(self) -> str:
        rows = "per layer" if self.out_channels is None else f"per filter, out_channels={self.out_channels}"
        return f"positions={self.positions}, k={self.k}, {rows}, phase={self.phase!r}, temperature={self.temperature}"


# ---------------------------------------------------------------------------------------------
# model-level helpers
# ---------------------------------------------------------------------------------------------
def _positions(layer: nn.Conv2d) -> int:
    return layer.kernel_size[0] * layer.kernel_size[1]


def _eligible(model: nn.Module, include: Callable[[str, nn.Module], bool] | None) -> list[tuple[str, nn.Conv2d]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if include is not None and not callable(include):
        raise TypeError(f"include must be a callable (name, layer) -> bool, got {type(include).__name__}")
    picked = []
    for name, m in model.named_modules():
        if not isinstance(m, _SHAPED):
            continue
        ok = include(name, m) if include is not None else min(m.kernel_size) >= 3
        if ok:
            picked.append((name, m))
    if not picked:
        what = "selected by include" if include is not None else "with a kernel of 3x3 or larger"
        raise ValueError(f"the model has no NSConv2d or DynamicNSConv2d layer {what}; convert its convolutions "
                         "first with nsl.convert(model, ...)")
    return picked


def gated_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d, KernelShapeGate]]:
    """``(name, layer, gate)`` for every NSL layer of ``model`` with a :class:`KernelShapeGate`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return [(name, m, m.kernel_gate) for name, m in model.named_modules()
            if isinstance(m, _SHAPED) and isinstance(getattr(m, "kernel_gate", None), KernelShapeGate)]


def _gates(model: nn.Module) -> list[KernelShapeGate]:
    found = gated_layers(model)
    if not found:
        raise ValueError("the model has no kernel-shape gate; call attach_kernel_shape(model, ...) or "
                         "magnitude_prune(model, ...) first")
    return [g for _, _, g in found]


def _check_per_filter(picked, per_filter: bool) -> None:
    if not per_filter:
        return
    for name, m in picked:
        if isinstance(m, DynamicNSConv2d) and m.similarity_kind != "diagonal":
            raise ValueError(f"per-filter kernel shapes need a diagonal M on dynamic layers; layer {name!r} has "
                             f"{m.similarity_kind!r} similarity (use per_filter=False: one shape per layer)")


def attach_kernel_shape(model: nn.Module, active: int | float = 0.5, per_filter: bool = False,
                        include: Callable[[str, nn.Module], bool] | None = None,
                        **gate_kwargs) -> list[KernelShapeGate]:
    """Attach a :class:`KernelShapeGate` (phase ``'relaxed'``, ``D = 1``) to the NSL layers of ``model``.

    Every :class:`NSConv2d` and :class:`DynamicNSConv2d` with a kernel of 3x3 or larger (or, with
    ``include``, every NSL layer for which ``include(qualified_name, layer)`` is true) gets a gate as
    its ``kernel_gate``, replacing any gate it had. The model computes the same function right
    after attaching. The gates' logits are new parameters: build the optimiser afterwards, e.g.
    with :func:`shape_parameters` in a group of its own (a larger learning rate, no weight decay).

    Args:
        model: a model with NSL layers (see :func:`nsl.convert`), or one NSL layer.
        active: ``k`` positions kept per layer (or per filter), or a fraction of ``P`` in ``(0, 1]``.
        per_filter: one shape per output filter (``D`` is ``[C_out, P]``) instead of per layer (``[P]``);
            dynamic layers need a diagonal ``M`` for this.
        include: ``(name, layer) -> bool`` choosing the layers.
        **gate_kwargs: ``temperature``, ``final_temperature``, ``margin``, ``init``, ``stretch`` of
            :class:`KernelShapeGate`.
    Returns:
        The new gates, in the order of ``model.named_modules()``.
    """
    picked = _eligible(model, include)
    _check_per_filter(picked, per_filter)
    for _, m in picked:  # validate every budget before changing anything
        resolve_budget(active, _positions(m))
    gates = []
    for _, m in picked:
        gate = KernelShapeGate(_positions(m), m.out_channels if per_filter else None, budget=active,
                               device=m.weight.device, dtype=m.weight.dtype, **gate_kwargs)
        m.kernel_gate = gate
        gates.append(gate)
    return gates


@torch.no_grad()
def _ungated_weight(layer: nn.Conv2d) -> Tensor:
    """``W M`` for a static layer (without ``D``), ``W`` for a dynamic one (its ``M(y)`` depends on the input)."""
    if isinstance(layer, NSConv2d):
        return layer._similar_weight()
    return layer.weight


@torch.no_grad()
def magnitude_scores(layer: nn.Conv2d, per_filter: bool = False) -> Tensor:
    """The magnitude-pruning score of each kernel position of an NSL ``layer`` (float32).

    ``||W'[:, :, q]||_2`` over filters and channels (``[P]``), or ``||W'[o, :, q]||_2`` per filter
    (``[C_out, P]``), with ``W' = W M`` for a static layer (without its kernel shape) and ``W`` for a
    dynamic one.
    """
    sq = _ungated_weight(layer).float().pow(2).sum(1).flatten(1)  # [C_out, P]
    return sq.sqrt() if per_filter else sq.sum(0).sqrt()


@torch.no_grad()
def magnitude_prune(model: nn.Module, active: int | float = 0.5, per_filter: bool = False,
                    include: Callable[[str, nn.Module], bool] | None = None) -> list[KernelShapeGate]:
    """Baseline: keep, per layer (or per filter), the ``k`` kernel positions of largest weight magnitude.

    The score of position ``q`` is ``||W'[:, :, q]||_2`` over filters and channels (per filter:
    ``||W'[o, :, q]||_2``), with ``W' = W M`` the static layer's weight without a kernel shape
    (dynamic layers: ``W``, as ``M(y)`` depends on the input). The result is a hardened
    :class:`KernelShapeGate` (exact 0/1 ``D`` with ``k`` ones per row; ties to the lower index)
    attached as each layer's ``kernel_gate``, replacing any gate, so the baseline is evaluated,
    fine-tuned and folded exactly like a learned shape. Arguments as in :func:`attach_kernel_shape`.

    Returns:
        The new (frozen) gates.
    """
    picked = _eligible(model, include)
    _check_per_filter(picked, per_filter)
    for _, m in picked:
        resolve_budget(active, _positions(m))
    gates = []
    for _, m in picked:
        scores = magnitude_scores(m, per_filter)
        gate = KernelShapeGate(_positions(m), m.out_channels if per_filter else None, budget=active,
                               device=m.weight.device, dtype=m.weight.dtype)
        gate.harden(scores)
        m.kernel_gate = gate
        gates.append(gate)
    return gates


def sparsity_loss(model: nn.Module, weight: float = 1.0) -> Tensor:
    """``weight * mean_gates penalty``, the term to add to the task loss (see :meth:`KernelShapeGate.penalty`).

    Each gate's penalty is ``mean_rows relu(sum_q r(l_q) - k) / P``: zero once the soft mass of every
    row is within the budget, and for frozen gates.
    """
    gates = _gates(model)
    return weight * torch.stack([g.penalty() for g in gates]).mean()


def set_phase(model: nn.Module, phase: str) -> None:
    """Set every gate of ``model`` to ``'relaxed'`` or ``'hard'``."""
    for g in _gates(model):
        g.set_phase(phase)


def anneal(model: nn.Module, progress: float, warmup: float = 0.4, freeze: float = 0.7) -> str:
    """Drive the schedule from any loop with ``progress`` in ``[0, 1]`` (e.g. ``step / steps``); returns the phase.

    * ``progress < warmup``: ``'relaxed'``, temperature ``T = T0 (T1 / T0) ** (progress / warmup)``
      (geometric from ``temperature`` to ``final_temperature``; equal by default);
    * ``warmup <= progress < freeze``: ``'hard'`` (exact top-k, straight-through gradients);
    * ``progress >= freeze``: :meth:`KernelShapeGate.harden` (once; the rest fine-tunes the network
      with the shape fixed, so it recovers from the last change of shape).
    """
    if not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")
    if not 0.0 <= float(warmup) <= float(freeze) <= 1.0:
        raise ValueError(f"expected 0 <= warmup <= freeze <= 1, got warmup={warmup!r}, freeze={freeze!r}")
    gates = _gates(model)
    if progress >= freeze:
        for g in gates:
            if g.phase != "frozen":
                g.harden()
        return "frozen"
    phase = "relaxed" if progress < warmup else "hard"
    t = 1.0 if warmup == 0 else min(1.0, progress / warmup)
    for g in gates:
        g.set_phase(phase)
        g.temperature = g.initial_temperature * (g.final_temperature / g.initial_temperature) ** t
    return phase


def harden(model: nn.Module) -> list[Tensor]:
    """Freeze every gate to ``D = topk_k(logits + margin * D_prev)`` (exact 0/1 buffers); returns the masks.

    ``D_prev`` is the last hard shape (all ones if the gate never was hard, so the plain top-k).

    Gates that are already frozen (e.g. from :func:`magnitude_prune`) keep their mask.
    """
    return [g.mask if g.phase == "frozen" else g.harden() for g in _gates(model)]


@torch.no_grad()
def kernel_shapes(model: nn.Module) -> dict[str, Tensor]:
    """The current ``D`` of every gated layer, detached on the CPU: ``[kh, kw]`` or ``[C_out, kh, kw]``."""
    found = gated_layers(model)
    if not found:
        _gates(model)  # raises the standard message
    return {name: g.current().float().cpu().reshape(*g.logits.shape[:-1], *m.kernel_size)
            for name, m, g in found}


@torch.no_grad()
def active_fraction(model: nn.Module) -> float:
    """``sum D / numel D`` over all gates: the fraction of active kernel positions (soft mass when relaxed).
    Reads the gates without changing them."""
    ds = [g.current() for g in _gates(model)]
    return float(sum(d.sum().item() for d in ds) / sum(d.numel() for d in ds))


def shape_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The logits of every gate (for an optimiser parameter group of their own)."""
    return [g.logits for g in _gates(model)]
