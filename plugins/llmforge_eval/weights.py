"""Per-weight updates of a fine-tuned model against its base: the input of the weight-space diagnostics.

`weight_updates(tuned, base)` yields one `WeightUpdate` (base weight W0 and update dW, both fp32)
per 2-D linear weight that the fine-tune changed. `tuned` is a PEFT adapter directory, a Hugging
Face model directory (a full fine-tune or a merged adapter) or a built-in model name.

For an adapter, the dense update comes from the run's task vector in the cache, the entry that
`forge finetune` stores under CacheKey("task-vector", {"base", "adapter"}, {}). When the cache has
no such entry (an adapter trained elsewhere, or a cleared cache), the adapter is loaded with peft
in fp32 and each tuner layer is merged on a copy of that one layer. The update (merged minus base
weight) is then stored under the same key, so later commands reuse it. For a model directory,
both weight files are read one tensor at a time with `safetensors.safe_open`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from llmforge.cache import Cache, CacheKey
from llmforge.checkpoint import WeightFiles
from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

TASK_VECTOR_KIND = "task-vector"
# The first all-digit component of a parameter name is its decoder layer index ("model.layers.3.mlp...").
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class WeightUpdate:
    """One updated linear weight: the base weight W0 and the update dW = W_ft - W0, both fp32."""

    name: str  # base parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    module_type: str  # the module's own name, e.g. "q_proj"
    layer: int | None  # decoder layer index, None for weights outside the layer stack (lm_head)
    base: "torch.Tensor"
    delta: "torch.Tensor"


@dataclass
class UpdateSource:
    """A fine-tuned model and its base, resolved to directories and content digests."""

    tuned_reference: str
    base_reference: str
    tuned_digest: str
    base_digest: str
    tuned_path: Path  # the adapter directory or the tuned HF model directory
    base_path: Path  # the base HF model directory
    is_adapter: bool


def module_type(name: str) -> str:
    """Return the module's own name of a parameter name: "model.layers.0.mlp.up_proj.weight" -> "up_proj"."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def layer_index(name: str) -> int | None:
    """Return the first all-digit component of a parameter name (the layer index), or None."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def update_cache_key(kind: str, source: UpdateSource, params: dict[str, Any]) -> CacheKey:
    """Return a cache key for a result computed from one (base, tuned) pair and the given settings."""
    return CacheKey(kind, {"base": source.base_digest, "tuned": source.tuned_digest}, params)


# Resolving the pair


def _record_base(directory: Path) -> tuple[str | None, str | None]:
    """Return (base_reference, base_digest) from a forge run record of a tuned model directory.

    A merged adapter (`forge finetune --merge`) lives in the `merged/` folder of the adapter
    output, so its record is the parent's.
    """
    from llmforge.checkpoint import RUN_RECORD_NAME

    candidates = [directory / RUN_RECORD_NAME]
    if directory.name == "merged":
        candidates.append(directory.parent / RUN_RECORD_NAME)
    for path in candidates:
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ForgeError(f"cannot read the run record {path} ({error}); repair or remove it") from None
            if isinstance(record, dict) and record.get("base_reference"):
                return record["base_reference"], record.get("base_digest")
    return None, None


def resolve_update(tuned: str, base: str | None = None, *, cache: Cache | None = None) -> UpdateSource:
    """Resolve a tuned model and its base to directories and digests, without reading any weights.

    `base` defaults to the adapter's base, or for a model directory to the base named in its
    forge run record. Raises ForgeError when the tuned model's recorded base has another digest
    than `base`, or when a model directory has no recorded base and `base` is not given.
    """
    from llmforge.models import model_digest, resolve

    cache = cache or Cache()
    resolved = resolve(tuned, cache=cache)
    tuned_digest = model_digest(tuned, cache=cache)

    if resolved.is_adapter:
        recorded_reference = resolved.base.reference
        recorded_digest = model_digest(recorded_reference, cache=cache)
    else:
        recorded_reference, recorded_digest = _record_base(resolved.path)

    base_reference = base or recorded_reference
    if base_reference is None:
        raise ForgeError(f"{tuned} is a full model directory and names no base model; pass --base REF "
                         "(the model it was fine-tuned from)")
    base_resolved = resolve(base_reference, cache=cache)
    if base_resolved.is_adapter:
        raise ForgeError(f"the base {base_reference} is a PEFT adapter; pass the base model itself")
    base_digest = model_digest(base_reference, cache=cache)

    if recorded_digest is not None and recorded_digest != base_digest:
        raise ForgeError(f"{tuned} was fine-tuned from {recorded_reference} ({recorded_digest[:19]}...), not from "
                         f"{base_reference} ({base_digest[:19]}...); pass its own base with --base")
    if tuned_digest == base_digest:
        raise ForgeError(f"{tuned} and the base {base_reference} are the same weights, so there is no update")
    return UpdateSource(tuned, base_reference, tuned_digest, base_digest, resolved.path, base_resolved.path,
                        resolved.is_adapter)


# Reading weights


def linear_weight_names(model_dir: Path) -> set[str]:
    """Return the weight names of the linear layers of a model directory's architecture.

    The model is built from its config on the meta device, so no memory is allocated. Linear
    layers are `torch.nn.Linear` and transformers' `Conv1D` (GPT-2 style, stored transposed).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        raise ForgeError(f"cannot build the architecture in {model_dir} to find its linear layers: {error}") from None
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))}


def _sorted_names(names) -> list[str]:
    return sorted(names, key=lambda name: (layer_index(name) is None, layer_index(name) or 0, name))


def _check_shape(name: str, base: "torch.Tensor", tuned: "torch.Tensor", source: UpdateSource) -> None:
    if tuple(base.shape) != tuple(tuned.shape):
        raise ForgeError(f"{name} has shape {tuple(tuned.shape)} in {source.tuned_reference} but "
                         f"{tuple(base.shape)} in the base {source.base_reference}; pass the model it was "
                         "fine-tuned from with --base")


def _update(name: str, base: "torch.Tensor", delta: "torch.Tensor", source: UpdateSource) -> WeightUpdate | None:
    """Return the WeightUpdate of one weight, None when it is not 2-D or did not change."""
    _check_shape(name, base, delta, source)
    if delta.dim() != 2 or not bool(delta.any()):
        return None
    return WeightUpdate(name, module_type(name), layer_index(name), base, delta)


def _directory_updates(source: UpdateSource) -> Iterator[WeightUpdate]:
    """Yield tuned minus base for each linear weight of two model directories, one tensor at a time."""
    with WeightFiles(source.tuned_path) as tuned_files, WeightFiles(source.base_path) as base_files:
        linear = linear_weight_names(source.tuned_path)
        names = [name for name in tuned_files.names() if name in linear]
        if not names:
            raise ForgeError(f"no linear-layer weights of the architecture were found in {source.tuned_path}")

        for name in _sorted_names(names):
            if name not in base_files:
                raise ForgeError(f"{name} of {source.tuned_reference} is not in the base {source.base_reference}; "
                                 "pass the model it was fine-tuned from with --base")
            base = base_files.tensor(name).float()
            tuned = tuned_files.tensor(name).float()
            _check_shape(name, base, tuned, source)
            update = _update(name, base, tuned - base, source)
            if update is not None:
                yield update


def merged_adapter_deltas(source: UpdateSource, cache: Cache) -> dict[str, "torch.Tensor"]:
    """Return merged minus base weight for every peft tuner layer of an adapter, in fp32.

    The adapter is loaded with peft in fp32 without merging. Each tuner layer is then deep-copied
    on its own and merged with peft's `merge`, so only one extra layer is in memory at a time.
    This covers additive (LoRA family) and multiplicative (OFT, BOFT, IA3, DoRA) adapters alike.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from llmforge.models import load_model

    loaded = load_model(source.tuned_reference, dtype=torch.float32, cache=cache)
    deltas = {}
    with torch.no_grad():
        for name, module in loaded.model.get_base_model().named_modules():
            if not isinstance(module, BaseTunerLayer) or not hasattr(module, "get_base_layer"):
                continue
            layer = copy.deepcopy(module)
            base_weight = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=list(module.active_adapters))
            deltas[f"{name}.weight"] = (layer.get_base_layer().weight.detach() - base_weight).float().contiguous()
    if not deltas:
        raise ForgeError(f"the adapter {source.tuned_path} has no peft tuner layers, so it changes no weight")
    return deltas


def adapter_task_vector(source: UpdateSource, cache: Cache) -> dict[str, "torch.Tensor"]:
    """Return the adapter's dense task vector: the cached one from `forge finetune`, else computed and cached."""
    from llmforge.checkpoint import TASK_VECTOR_FORMAT, TASK_VECTOR_FORMAT_VERSION

    key = CacheKey(TASK_VECTOR_KIND, {"base": source.base_digest, "adapter": source.tuned_digest}, {})
    metadata = {"format": TASK_VECTOR_FORMAT, "format_version": TASK_VECTOR_FORMAT_VERSION,
                "base_digest": source.base_digest, "tuned_digest": source.tuned_digest,
                "method": _adapter_method(source.tuned_path), "computed_by": "forge eval (peft merge)"}
    return cache.get_or_compute(key, lambda: merged_adapter_deltas(source, cache), metadata=metadata)


def _adapter_method(directory: Path) -> str:
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "unknown"
    return str(config.get("peft_type", "unknown")).lower()


def _adapter_updates(source: UpdateSource, cache: Cache) -> Iterator[WeightUpdate]:
    vector = adapter_task_vector(source, cache)
    with WeightFiles(source.base_path) as base_files:
        for name in _sorted_names(vector):
            if name not in base_files:
                raise ForgeError(f"the adapter {source.tuned_path} updates {name}, which is not in the base "
                                 f"{source.base_reference}; pass the adapter's own base with --base")
            update = _update(name, base_files.tensor(name).float(), vector[name].float(), source)
            if update is not None:
                yield update


def weight_updates(tuned: str, base: str | None = None, *, cache: Cache | None = None) -> Iterator[WeightUpdate]:
    """Yield one WeightUpdate per 2-D linear weight that differs between `tuned` and its base.

    `tuned` is an adapter directory, an HF model directory or a built-in name. `base` defaults to
    the adapter's base, or to the base in a forge run record, and is required for other model
    directories. Weights come in layer order, and weights with an all-zero update are skipped.
    Raises ForgeError when the base digest differs from the tuned model's recorded base, or
    when shapes or names do not match.
    """
    cache = cache or Cache()
    source = resolve_update(tuned, base, cache=cache)
    if source.is_adapter:
        yield from _adapter_updates(source, cache)
    else:
        yield from _directory_updates(source)
