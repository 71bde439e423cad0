"""Regularisers of the authors' code: the orthogonality penalty on filters and TF-style L2.

Both return a 0-dim tensor to add to the loss, e.g.::

    loss = criterion(model(x), y) + nsl.regularizers.orthogonality_penalty(model)

Which weights are used: the argument ``module_or_params`` is an ``nn.Module`` (every
``nn.Conv1d/2d/3d`` and ``nn.Linear`` inside it, subclasses such as :class:`nsl.SphereConv2d`,
:class:`nsl.NSConv2d` and :class:`nsl.GlobalSimilarity2d`'s projections included, for
:func:`orthogonality_penalty`; every parameter for :func:`l2_penalty`), a single tensor, or an
iterable mixing modules and tensors (to select layers, e.g. leave out the classifier as the
authors do: ``orthogonality_penalty([m for n, m in model.named_modules() if ...])``). Weights
reached twice (shared) are counted once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["orthogonality_penalty", "l2_penalty", "ORTHOGONALITY_TYPES"]

#: Module types whose ``weight`` :func:`orthogonality_penalty` uses when given a module.
ORTHOGONALITY_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _unique(tensors: Iterable[Tensor]) -> Iterator[Tensor]:
    seen: set[int] = set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _collect(module_or_params, from_module, name: str) -> list[Tensor]:
    if isinstance(module_or_params, Tensor):
        items = [module_or_params]
    elif isinstance(module_or_params, nn.Module):
        items = list(from_module(module_or_params))
    elif isinstance(module_or_params, Iterable) and not isinstance(module_or_params, (str, bytes)):
        items = []
        for item in module_or_params:
            if isinstance(item, Tensor):
                items.append(item)
            elif isinstance(item, nn.Module):
                items.extend(from_module(item))
            else:
                raise TypeError(f"{name}: expected modules or tensors, got an item of type {type(item).__name__}")
    else:
        raise TypeError(f"{name}: expected an nn.Module, a Tensor or an iterable of them, "
                        f"got {type(module_or_params).__name__}")
    return list(_unique(items))


def _filter_weights(module: nn.Module) -> Iterator[Tensor]:
    for m in module.modules():
        if isinstance(m, ORTHOGONALITY_TYPES) and isinstance(getattr(m, "weight", None), Tensor):
            yield m.weight


def orthogonality_penalty(module_or_params, weight: float = 2e-4) -> Tensor:
    """The authors' orthogonality penalty on filters: ``weight * sum_W ||W W^T - I||_F^2 / 2``.

    Each filter bank (a conv weight ``[C_out, C_in / groups, *kernel]`` or a linear weight
    ``[out, in]``) is reshaped to ``W`` of shape ``[C_out, fan_in]``, one filter per row, and
    ``W W^T`` is the ``C_out x C_out`` Gram matrix of the filters (``(W W^T)[a, b] = <w_a, w_b>``).
    This is the method page's ``||W^T W - I||^2 / 2`` with the authors' TensorFlow ``W`` of shape
    ``[fan_in, C_out]`` (``tf.reshape(filt, [-1, n_filt])``, ``tf.matmul(tf.transpose(W), W)``):
    the same Gram matrix, since that ``W`` is the transpose of PyTorch's. The ``/ 2`` is
    ``tf.nn.l2_loss``'s. The penalty pushes the filters towards an orthonormal set; it is zero
    exactly when they are (possible only if ``C_out <= fan_in``; otherwise its minimum is
    ``weight * (C_out - fan_in) / 2``). For a grouped convolution the Gram matrix spans the filters
    of all groups (their vectors have the same length ``fan_in``). The authors use ``2e-4`` on all
    their cosine convs, the attention projections included, and not on the classifier.

    Args:
        module_or_params: an ``nn.Module`` (the ``weight`` of every ``nn.Conv1d/2d/3d`` and
            ``nn.Linear`` inside it, subclasses included, transposed convolutions not), a tensor
            of at least 2 dimensions with the filters along dim 0, or an iterable of them.
        weight: the coefficient (default ``2e-4``, the authors').

    Returns:
        A 0-dim tensor (``0.`` if there are no weights), differentiable in the weights.
    """
    tensors = _collect(module_or_params, _filter_weights, "orthogonality_penalty")
    total = None
    for w in tensors:
        if w.dim() < 2:
            raise ValueError(f"orthogonality_penalty: a filter bank needs at least 2 dimensions "
                             f"[out, ...], got shape {list(w.shape)}")
        mat = w.reshape(w.shape[0], -1)
        gram = mat @ mat.transpose(0, 1)
        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        term = (gram - eye).pow(2).sum()
        total = term if total is None else total + term.to(total.device, total.dtype)
    if total is None:
        return torch.zeros(())
    return weight * total / 2


def l2_penalty(module_or_params, weight: float = 5e-4) -> Tensor:
    """TensorFlow-style L2: ``weight * sum_p ||p||^2 / 2`` (``tf.contrib.layers.l2_regularizer``).

    The authors' code uses ``5e-4`` (their ``self.wd``). In plain SGD this equals
    ``weight_decay=weight``; as a loss term it also works with Adam (which the authors' attention
    model uses) and with per-layer selections.

    Args:
        module_or_params: an ``nn.Module`` (all its parameters), a tensor, or an iterable of them.
        weight: the coefficient (default ``5e-4``).

    Returns:
        A 0-dim tensor (``0.`` if there are no parameters).
    """
    tensors = _collect(module_or_params, lambda m: m.parameters(), "l2_penalty")
    total = None
    for p in tensors:
        term = p.pow(2).sum()
        total = term if total is None else total + term.to(total.device, total.dtype)
    if total is None:
        return torch.zeros(())
    return weight * total / 2
