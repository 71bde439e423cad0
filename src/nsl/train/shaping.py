"""Kernel-shape learning inside the training loop (``TrainConfig.shape_*``; :mod:`nsl.shape`).

With ``shape_active = k > 0`` every NSL layer of the model gets a :class:`nsl.shape.KernelShapeGate`
when the model is built (``D = 1``: the model is unchanged), so checkpoints have the same keys at
every step. The run is split at ``s = round(shape_start * iters)``:

* steps ``< s``: dense training; the gates stay at ``D = 1`` (their logits get no update);
* the gate logits have an optimizer of their own, Adam with lr ``shape_lr`` and no weight decay
  (scale-free, so the shaping speed does not depend on the network's optimizer and lr schedule);
  it is saved in the checkpoint (``"shape"``);
* ``shape_method = 'learned'``: from ``s`` on, :func:`nsl.shape.anneal` with progress
  ``(step - s) / (iters - s)`` (relaxed with the budget penalty ``shape_weight *
  sparsity_loss`` until ``shape_warmup``, hard top-k with straight-through gradients until
  ``shape_freeze``, then frozen while the network fine-tunes);
* ``shape_method = 'magnitude'`` (the baseline): at step ``s`` each gate is hardened to the ``k``
  positions of largest ``||(W M)[:, :, q]||_2`` (:func:`nsl.shape.magnitude_prune`'s score), then
  the network fine-tunes with that fixed shape.

Both end with exact 0/1 shapes of ``k`` positions, evaluated and folded (``nsl eval --fold``) alike.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import shape as _shape
from .config import ConfigError, TrainConfig

__all__ = ["KernelShapeSchedule"]


class KernelShapeSchedule:
    """Drives the kernel-shape gates of ``model`` through a run of ``iters`` steps (see the module notes)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, iters: int):
        self.cfg, self.model, self.iters = cfg, model, iters
        self.start = min(iters - 1, round(cfg.shape_start * iters))
        self.gates = [g for _, _, g in _shape.gated_layers(model)]
        self.optimizer = torch.optim.Adam([g.logits for g in self.gates], lr=cfg.shape_lr) \
            if cfg.shape_method == "learned" else None

    @staticmethod
    def attach(cfg: TrainConfig, model: nn.Module) -> None:
        """Attach the gates (``D = 1``) when ``cfg.shape_active``; magnitude gates get no gradient."""
        if not cfg.shape_active:
            return
        try:
            gates = _shape.attach_kernel_shape(model, active=cfg.shape_active, per_filter=cfg.shape_per_filter)
        except ValueError as e:
            raise ConfigError(f"shape_active={cfg.shape_active}: {e}") from None
        if not gates:
            raise ConfigError(f"shape_active={cfg.shape_active} but model {cfg.model!r} with layer {cfg.layer!r} "
                              "has no NSL layer with a kernel of 3x3 or larger")
        if cfg.shape_method == "magnitude":
            for g in gates:
                g.logits.requires_grad_(False)

    def _progress(self, step: int) -> float:
        return (step - self.start) / max(1, self.iters - self.start)

    def before_step(self, step: int) -> None:
        """Set the gates' phase for the optimizer step ``step`` (0-based)."""
        if step < self.start:
            return
        if self.cfg.shape_method == "magnitude":
            if step == self.start and self.gates[0].phase != "frozen":
                self._prune()
            return
        _shape.anneal(self.model, self._progress(step), warmup=self.cfg.shape_warmup, freeze=self.cfg.shape_freeze)

    @torch.no_grad()
    def _prune(self) -> None:
        for _, layer, gate in _shape.gated_layers(self.model):
            gate.harden(_shape.magnitude_scores(layer, self.cfg.shape_per_filter))

    def loss(self, step: int) -> torch.Tensor | None:
        """The sparsity term to add to the task loss at ``step`` (``None`` when there is none)."""
        if self.cfg.shape_method != "learned" or step < self.start or not self.cfg.shape_weight:
            return None
        if self._progress(step) >= self.cfg.shape_freeze:
            return None
        return _shape.sparsity_loss(self.model, self.cfg.shape_weight)

    def step(self, step: int) -> None:
        """Update the gate logits after the backward pass of ``step`` (learned shapes, while not frozen)
        and clear their gradients; during the dense part the gates stay at ``D = 1``."""
        if self.optimizer is not None and step >= self.start and self.gates[0].phase != "frozen":
            self.optimizer.step()
        for g in self.gates:
            g.logits.grad = None

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def active_fraction(self) -> float:
        """Fraction of kernel positions the gates keep now (:func:`nsl.shape.active_fraction`; 1.0 before shaping)."""
        return _shape.active_fraction(self.model)
