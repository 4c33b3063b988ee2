"""Choosing alpha, the factor on the transported vector, by the held-out LM loss of the target.

For each alpha of the grid, the target's weights become base + alpha * tau_B in place, the mean
loss on the completion tokens of a held-out data file is measured, and the weights are restored.
The alpha with the lowest loss wins; ties go to the smaller alpha. The grid always scores alpha 0,
the target base itself, so the record shows whether the transfer helps at all.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch


def parse_alpha_grid(text: str) -> list[float]:
    """Parse "0.5,1,1.5" into sorted distinct finite alphas, with 0 added."""
    values = set()
    for part in (piece.strip() for piece in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise ForgeError(f"invalid --alpha-grid item {part!r}; give numbers such as 0.5,1,1.5") from None
        if not math.isfinite(value):
            raise ForgeError(f"invalid --alpha-grid item {part!r}; alphas must be finite")
        values.add(value)
    return sorted(values | {0.0})


def held_out_loss(model, batches) -> float:
    """Return the mean LM loss over the completion tokens of all batches (token-weighted)."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            labels = batch.labels[:, 1:].reshape(-1)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels,
                                                       ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((labels != -100).sum())
    if count == 0:
        raise ForgeError("the --alpha-data file has no completion tokens to score; give examples with completions")
    return total / count


def _parameters(model, names) -> dict[str, "torch.Tensor"]:
    """Map each vector name to the model parameter it updates; a tied parameter is listed once."""
    parameters, seen = {}, set()
    for name in names:
        parameter = model.get_parameter(name)
        if id(parameter) not in seen:
            seen.add(id(parameter))
            parameters[name] = parameter
    return parameters


def search_alpha(model, transported: dict[str, "torch.Tensor"], grid: list[float], batches) -> tuple[float, dict[str, Any]]:
    """Score every alpha of the grid on the held-out batches and return (best alpha, {alpha: loss}).

    The model's weights change in place during the search and are restored afterwards, up to
    floating-point rounding (base + a - a). So the caller writes its output from the base files.
    """
    import torch

    parameters = _parameters(model, transported)
    scores, current = {}, 0.0
    with torch.no_grad():
        try:
            for alpha in grid:
                for name, parameter in parameters.items():
                    parameter.add_(transported[name].to(parameter.dtype), alpha=alpha - current)
                current = alpha
                scores[repr(alpha)] = held_out_loss(model, batches)
        finally:
            for name, parameter in parameters.items():
                parameter.add_(transported[name].to(parameter.dtype), alpha=-current)
    best = min(grid, key=lambda alpha: (scores[repr(alpha)], alpha))
    return best, scores
