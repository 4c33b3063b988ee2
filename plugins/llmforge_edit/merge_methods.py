"""The built-in merge methods and the registry of the `forge_merge_methods` hook.

For one base tensor, every vector i contributes its update tau_i (zero where the vector has no
entry), a weight w_i and a density d_i, and a method combines them into one update delta. The
built-in methods follow mergekit's generalized task arithmetic:

- task_arithmetic: delta = sum_i w_i tau_i.
- magnitude_prune: keep the int(d_i * numel) entries of largest |tau_i| per tensor, then sum as above.
- dare_linear: keep each entry with probability d_i and divide the kept ones by d_i (DARE's
  rescale), then sum as above.
- ties: magnitude pruning, then sign election: per entry the elected sign is the sign of
  sum_i w_i tau_i (positive on a tie), and only the weighted entries with that sign are summed.
- dare_ties: DARE's random pruning, then the same sign election.

With normalization the sum is divided by the sum of the weights that took part: per entry for
ties and dare_ties (the weights whose entry has the elected sign), per tensor for the others. As
in mergekit, normalization is on by default for ties only. See `task_arithmetic` for the
contract of a method callable.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence


if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# Pruning and sign election


def magnitude_mask(delta: "torch.Tensor", density: float) -> "torch.Tensor":
    """Return a boolean mask of the int(density * numel) entries of largest absolute value."""
    import torch

    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(delta.abs().reshape(-1), keep, sorted=False).indices] = True
    return mask.view(delta.shape)


def dare_prune(delta: "torch.Tensor", density: float, generator: "torch.Generator") -> "torch.Tensor":
    """Drop each entry with probability 1 - density and divide the kept entries by density (DARE)."""
    import torch

    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def elected_sign_mask(weighted: "torch.Tensor") -> "torch.Tensor":
    """Return, per vector and entry, whether the weighted entry has the elected sign.

    `weighted` stacks w_i * tau_i along dimension 0. The elected sign of an entry is the sign of
    the sum over vectors (+1 when the sum is zero), and zero entries never agree.
    """
    import torch

    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    return weighted.sign() == elected


def combine(deltas: Sequence["torch.Tensor"], weights: Sequence[float], *, elect_sign: bool,
            normalize: bool) -> "torch.Tensor":
    """Sum the weighted (already pruned) updates, with optional sign election and normalization."""
    import torch

    if not elect_sign:
        # Accumulate in place, because stacking would keep two more copies of every update.
        total = deltas[0] * weights[0]
        for delta, weight in zip(deltas[1:], weights[1:]):
            total.add_(delta if weight == 1 else delta * weight)
        divisor = float(sum(weights))
        return total.div_(divisor) if normalize and abs(divisor) >= 1e-8 else total

    stacked = torch.stack(list(deltas))
    weight = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * weight
    del stacked
    agree = elected_sign_mask(weighted)
    total = (weighted * agree).sum(dim=0)
    if not normalize:
        return total
    divisor = (weight * agree).sum(dim=0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


# The built-in methods (the hook's callables)


def task_arithmetic(deltas, *, weights, densities, generator, normalize=None):
    """Return sum_i w_i * tau_i (divided by sum_i w_i when normalize is true).

    The contract of every `forge_merge_methods` callable, which this function defines:

    - `deltas`: one fp32 tensor per task vector, all of the base tensor's shape; a vector without
      an entry for this tensor contributes zeros.
    - `weights`, `densities`: the per-vector floats from `--vector PATH:weight=W,density=D`; a
      density is in (0, 1] (default 1) and a weight is any finite number (default 1).
    - `generator`: a `torch.Generator` seeded from `--seed` and the tensor name, for random pruning.
      Draw all random numbers from it, so that a merge is reproducible.
    - `normalize`: True, False, or None for the method's own default.

    Return the combined update, fp32, of the same shape. The merge multiplies it by lambda, in
    place, and adds it to the base tensor. A callable whose `uses_density` attribute is False makes
    the merge reject densities other than 1. A callable whose `elementwise` attribute is True is
    called on blocks of rows (dimension 0) of each tensor, one block after another with the same
    generator. Set it only when each output entry depends on the same entry of each input and on
    nothing else, random draws included.
    """
    return combine(deltas, weights, elect_sign=False, normalize=bool(normalize))


def magnitude_prune(deltas, *, weights, densities, generator, normalize=None):
    """Keep the largest-magnitude fraction `density` of each update, then sum as task_arithmetic does."""
    pruned = [delta * magnitude_mask(delta, density) for delta, density in zip(deltas, densities)]
    return combine(pruned, weights, elect_sign=False, normalize=bool(normalize))


def dare_linear(deltas, *, weights, densities, generator, normalize=None):
    """Prune each update at random with DARE's rescale, then sum as task_arithmetic does."""
    pruned = [dare_prune(delta, density, generator) for delta, density in zip(deltas, densities)]
    return combine(pruned, weights, elect_sign=False, normalize=bool(normalize))


def ties(deltas, *, weights, densities, generator, normalize=None):
    """TIES: magnitude pruning, sign election, and the sum of the agreeing entries (normalized by default)."""
    pruned = [delta * magnitude_mask(delta, density) for delta, density in zip(deltas, densities)]
    return combine(pruned, weights, elect_sign=True, normalize=True if normalize is None else normalize)


def dare_ties(deltas, *, weights, densities, generator, normalize=None):
    """DARE pruning with its rescale, then TIES sign election and the sum of the agreeing entries."""
    pruned = [dare_prune(delta, density, generator) for delta, density in zip(deltas, densities)]
    return combine(pruned, weights, elect_sign=True, normalize=bool(normalize))


task_arithmetic.uses_density = False
task_arithmetic.elementwise = True

BUILTIN_MERGE_METHODS: dict[str, Callable] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}


def available_merge_methods() -> dict[str, Callable]:
    """Return every merge method from the `forge_merge_methods` hook. Plugins cannot replace a built-in name."""
    from llmforge.plugins import get_plugin_manager

    results = get_plugin_manager().hook.forge_merge_methods()

    methods = dict(BUILTIN_MERGE_METHODS)
    for result in results:
        for name, method in (result or {}).items():
            if name in BUILTIN_MERGE_METHODS and method is not BUILTIN_MERGE_METHODS[name]:
                logger.warning("a plugin tried to replace the built-in merge method %r; the built-in is kept", name)
                continue
            if not callable(method):
                logger.warning("a plugin registered merge method %r as a %s, not a callable; it is skipped",
                               name, type(method).__name__)
                continue
            methods[name] = method
    return methods


def method_uses_density(method: Callable) -> bool:
    """Tell whether a merge method reads the per-vector densities (the `uses_density` attribute, default True)."""
    return bool(getattr(method, "uses_density", True))


def method_is_elementwise(method: Callable) -> bool:
    """Tell whether a merge method may get blocks of rows instead of whole tensors (the `elementwise` attribute, default False)."""
    return getattr(method, "elementwise", False) is True
