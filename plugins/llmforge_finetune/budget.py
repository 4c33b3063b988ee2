"""Exact trainable-parameter counts, budget matching and a memory estimate, all without loading weights.

Counts come from building the model and its peft adapters on PyTorch's meta device: shapes
only, no storage, so a count for SmolLM2-135M takes well under a second.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from llmforge.errors import ForgeError

from llmforge_finetune.methods import OPTION_FLAGS, MethodSpec, attach_adapters, peft_config, target_modules

SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
BUDGET_PATTERN = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*([kmbg]?)\s*$", re.IGNORECASE)
# NOTE: VeRA's count grows by one parameter per adapted layer and rank, so large budgets need very
# large ranks. Its frozen shared matrices (rank x max dimension, not counted) grow with the rank too,
# and this cap is a guess, not a measured memory limit.
VERA_MAX_RANK = 65536


def parse_budget(text: str) -> int:
    """Parse a parameter budget such as 2.4M, 500k, 1e6 or 1200000 into an integer."""
    match = BUDGET_PATTERN.match(str(text))
    if not match:
        raise ForgeError(f"invalid --budget {text!r}; use a parameter count such as 2.4M, 500k, 1e6 or 1200000")
    value = float(match.group(1).replace("_", "")) * SUFFIXES[match.group(2).lower()]
    if not (math.isfinite(value) and value >= 1):
        raise ForgeError(f"invalid --budget {text!r}; it must be at least 1 parameter")
    return round(value)


def meta_model(model_config):
    """Build the model of an HF config on the meta device (shapes only, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def linear_module_names(model_config) -> list[str]:
    """Return the full names of the model's torch.nn.Linear modules, in module order."""
    import torch

    return [name for name, module in meta_model(model_config).named_modules() if isinstance(module, torch.nn.Linear)]


def check_target_modules(model_config, values: dict[str, Any], model_name: str) -> None:
    """Raise ForgeError when a --target-modules name matches no linear module, listing the names the model has.

    A name matches a module whose full name equals it or ends with "." plus it, as in peft. peft
    0.21.2 rejects a list only when no name matches, so without this check a misspelt name next
    to a valid one would be ignored.
    """
    targets = target_modules(values) if "target_modules" in values else "all-linear"
    if targets == "all-linear":
        return

    names = linear_module_names(model_config)
    missing = [target for target in targets
               if not any(name == target or name.endswith("." + target) for name in names)]
    if missing:
        leaves = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
        raise ForgeError(f"invalid --target-modules {values['target_modules']!r}: no linear module of {model_name} "
                         f"is named {' or '.join(repr(name) for name in missing)}; its linear modules are "
                         f"{', '.join(leaves)}; pass all-linear or some of these names, comma-separated")


def count_parameters(model_config, spec: MethodSpec, values: dict[str, Any]) -> tuple[int, int]:
    """Return (trainable, total) parameter counts of `spec` with `values` on the model of `model_config`."""
    model = meta_model(model_config)
    total = sum(p.numel() for p in model.parameters())
    if spec.name == "full":
        return total, total

    config = peft_config(spec, values, model_type=model_config.model_type, counting=True)
    peft_model = attach_adapters(model, config)
    # peft 0.21.2 leaves AdaLoRA's `ranknum` (the current rank as a constant, never trained)
    # trainable when the layer is built on the meta device. On a real model it is frozen.
    trainable = sum(p.numel() for name, p in peft_model.named_parameters()
                    if p.requires_grad and ".ranknum." not in name)
    return trainable, total + trainable


def targeted_shapes(model_config, spec: MethodSpec, values: dict[str, Any]) -> list[tuple[int, int]]:
    """Return (in_features, out_features) of every layer that `spec` adapts with `values`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = peft_config(spec, values, model_type=model_config.model_type, counting=True)
    peft_model = attach_adapters(meta_model(model_config), config)
    shapes = []
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_base_layer"):
            base = module.get_base_layer()
            shapes.append((base.in_features, base.out_features))
    return shapes


def candidate_sizes(model_config, spec: MethodSpec, values: dict[str, Any]) -> list[int]:
    """Return the sizes to search, ascending: ranks up to a cap, or block sizes that divide every in_features."""
    shapes = targeted_shapes(model_config, spec, values)
    if not shapes:
        raise ForgeError(f"--method {spec.name} adapts no layer with --target-modules {values['target_modules']!r}")

    if spec.size_option == "block_size" and spec.name in ("oft", "boft"):
        common = math.gcd(*(in_features for in_features, _ in shapes))
        # A block of size 1 has no free rotation parameters.
        return [size for size in range(2, common + 1) if common % size == 0]
    if spec.name == "miss":
        return list(range(1, min(in_features for in_features, _ in shapes) + 1))
    if spec.name == "vera":
        return list(range(1, VERA_MAX_RANK + 1))
    # A LoRA rank above min(in, out) of every layer adds parameters but no expressiveness.
    return list(range(1, max(min(shape) for shape in shapes) + 1))


@dataclass
class BudgetMatch:
    """The size chosen for a budget and its exact count; `size` is None for methods with a fixed count."""

    budget: int
    size_option: str | None
    size: int | None
    trainable: int
    matched: bool

    def as_dict(self) -> dict[str, Any]:
        """Return the match as a JSON-able dict for the run record."""
        return {"budget": self.budget, "size_option": OPTION_FLAGS.get(self.size_option),
                "size": self.size, "trainable_parameters": self.trainable, "matched": self.matched,
                "relative_error": round((self.trainable - self.budget) / self.budget, 6)}


def match_budget(model_config, spec: MethodSpec, values: dict[str, Any], budget: int, *,
                 model_name: str = "this model") -> BudgetMatch:
    """Choose the size whose exact trainable count is nearest to `budget` (the smaller size on a tie).

    Counts grow with the size for every method here, so a binary search finds the first size at
    or over the budget and compares it with the size before. Sizes that peft rejects for this
    model are dropped from the search. Raises ForgeError when the budget is below the count of
    the smallest valid size or above that of the largest. A method with a fixed count (IA3, full)
    returns that count unmatched: a sweep that gives every method the same budget still runs it,
    and the run record states how far off the count is.
    """
    if spec.size_option is None:
        trainable, _ = count_parameters(model_config, spec, values)
        return BudgetMatch(budget, None, None, trainable, matched=False)

    sizes = candidate_sizes(model_config, spec, values)
    counts: dict[int, int] = {}

    def count(size: int) -> int | None:
        if size not in counts:
            try:
                counts[size] = count_parameters(model_config, spec, {**values, spec.size_option: size})[0]
            except ValueError:
                counts[size] = -1
        return counts[size] if counts[size] >= 0 else None

    check_reachable(spec, budget, sizes, count, model_name)
    while sizes:
        low, high = 0, len(sizes)
        invalid = None
        while low < high:
            middle = (low + high) // 2
            value = count(sizes[middle])
            if value is None:
                invalid = sizes[middle]
                break
            if value >= budget:
                high = middle
            else:
                low = middle + 1
        if invalid is not None:
            sizes.remove(invalid)
            continue
        neighbours = [sizes[i] for i in (low - 1, low) if 0 <= i < len(sizes)]
        best = min(neighbours, key=lambda size: (abs(count(size) - budget), size))
        return BudgetMatch(budget, spec.size_option, best, count(best), matched=True)
    raise ForgeError(f"no {OPTION_FLAGS[spec.size_option]} value works for --method {spec.name} on this model")


def check_reachable(spec: MethodSpec, budget: int, sizes: list[int], count, model_name: str) -> None:
    """Raise ForgeError unless `budget` lies between the counts of the smallest and largest valid sizes.

    `count(size)` returns the trainable count of a size, or None where peft rejects that size.
    """
    flag = OPTION_FLAGS[spec.size_option]
    smallest = next((size for size in sizes if count(size) is not None), None)
    largest = next((size for size in reversed(sizes) if count(size) is not None), None)
    if smallest is None or largest is None:
        raise ForgeError(f"no {flag} value works for --method {spec.name} on {model_name}")

    reach = (f"{spec.title} on {model_name} trains {count(smallest):,} ({flag} {smallest}) to "
             f"{count(largest):,} ({flag} {largest}) parameters")
    if budget < count(smallest):
        raise ForgeError(f"--budget {budget:,} is below the smallest {spec.title} size ({flag} {smallest}: "
                         f"{count(smallest):,} parameters) on {model_name}; {reach}. Raise --budget or choose "
                         "a method with fewer parameters (forge finetune --list-methods)")
    if budget > count(largest):
        raise ForgeError(f"--budget {budget:,} is above the largest {spec.title} size ({flag} {largest}: "
                         f"{count(largest):,} parameters) on {model_name}; {reach}. Lower --budget or choose "
                         "a method with more parameters (forge finetune --list-methods)")


def memory_estimate(model_config, *, total: int, trainable: int, full: bool, precision: str, batch_size: int,
                    max_length: int, adapter_features: int = 0) -> dict[str, Any]:
    """Estimate training memory in bytes: weights, gradients, AdamW states and activations.

    Weights, gradients, fp32 master copies (bf16 runs) and the two fp32 AdamW moments are exact
    for the given counts. Activations are an estimate: s*b*h*(34 + 5*a*s/h) bytes per layer at
    16-bit precision (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", a GPT layer without recomputation), doubled for fp32, plus fp32 logits
    for every token. `adapter_features` adds the adapters' own intermediates, that many values per
    token kept for the backward pass (for VeRA: rank times adapted layers, which dominates at high
    ranks). It assumes every example is max_length tokens long and ignores memory-efficient
    attention, so it is a rough upper estimate.
    """
    low_precision = precision == "bf16"
    weight_bytes = 2 if low_precision else 4
    frozen = 0 if full else total - trainable
    layers = model_config.num_hidden_layers
    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    tokens = batch_size * max_length
    per_layer = tokens * hidden * (34 + 5 * heads * max_length / hidden) * (1 if precision != "fp32" else 2)
    logits = tokens * model_config.vocab_size * 4

    parts = {
        "weights": (frozen + trainable) * weight_bytes,
        "gradients": trainable * weight_bytes,
        "master_weights": trainable * 4 if low_precision else 0,
        "adamw_states": trainable * 8,
        "activations_estimate": int(layers * per_layer + logits),
        "adapter_intermediates": tokens * adapter_features * (2 if precision != "fp32" else 4),
    }
    return {"bytes": parts, "total_bytes": sum(parts.values()),
            "total_gib": round(sum(parts.values()) / 2**30, 3),
            "activations_note": (f"estimate for batch {batch_size} x {max_length} tokens: 34+5as/h bytes per "
                                 "token, hidden unit and layer at 16-bit (Korthikanti et al. 2022) plus fp32 logits")}
