"""The models along an interpolation path: W(a) = W0 + a dW built in memory, one a at a time.

`load_path_model` loads the tuned model once and returns a `PathModel`. Its `set_alpha(a)` moves
the model to W(a) in place. LoRA-family adapters are scaled (exact), OFT rotations are rebuilt
from a scaled generator (the Cayley path, every point orthogonal), and everything else moves
densely.
`llmforge_eval.interpolate` scores these points; see its docstring for the three methods.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from llmforge.cache import Cache
from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The generator scale for OFT at path position a: "sqrt" scales Q by sqrt(a), "linear" by a.
OFT_SCALES = ("sqrt", "linear")
DEFAULT_OFT_SCALE = "sqrt"


# The OFT Cayley path


def skew_symmetric(generator: "torch.Tensor", block_size: int) -> "torch.Tensor":
    """Build the skew-symmetric blocks Q (b, n, n) from peft's OFT parameter (b, n (n - 1) / 2).

    peft stores the strict upper triangle of each block row by row (``torch.triu_indices``) and
    forms Q = U - U^T.
    """
    import torch

    rows, cols = torch.triu_indices(block_size, block_size, 1)
    blocks = torch.zeros(generator.shape[0], block_size, block_size, dtype=generator.dtype, device=generator.device)
    blocks[:, rows, cols] = generator
    return blocks - blocks.transpose(-2, -1)


def cayley(skew: "torch.Tensor") -> "torch.Tensor":
    """Return the exact Cayley transform R = (I - Q)(I + Q)^-1 of a batch of skew-symmetric blocks.

    This is the convention of peft's OFT with ``use_cayley_neumann=False``. R is orthogonal for
    every skew-symmetric Q.
    """
    import torch

    identity = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return torch.linalg.solve(identity + skew, identity - skew, left=False)


def oft_generator_scale(alpha: float, rule: str = DEFAULT_OFT_SCALE) -> float:
    """Return the factor applied to the OFT generator Q at path position `alpha`."""
    if rule not in OFT_SCALES:
        raise ForgeError(f"Invalid OFT scale rule {rule!r}; expected one of {', '.join(OFT_SCALES)}.")
    return math.sqrt(alpha) if rule == "sqrt" else alpha


def oft_rotation(generator: "torch.Tensor", block_size: int, alpha: float,
                 rule: str = DEFAULT_OFT_SCALE) -> "torch.Tensor":
    """Return the OFT rotation blocks at path position `alpha`: Cayley of the scaled generator."""
    return cayley(skew_symmetric(generator * oft_generator_scale(alpha, rule), block_size))


# Models along the path


def _tuner_modules(model):
    """Split a model's adapter modules into LoRA layers, OFT rotations and other tuner layers."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.oft.layer import OFTLayer, OFTRotationModule
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora, oft, other = [], [], []
    for module in model.modules():
        if isinstance(module, OFTRotationModule):
            oft.append(module)
        elif isinstance(module, OFTLayer):
            continue  # the wrapper of a base layer, whose rotation is the OFTRotationModule inside it
        elif isinstance(module, LoraLayer):
            lora.append(module)
        elif isinstance(module, BaseTunerLayer):
            other.append(module)
    return lora, oft, other


def path_method(model) -> str:
    """Name how a loaded model (plain or peft) moves along W0 + a dW: lora-scaling, oft-cayley or dense."""
    if not hasattr(model, "peft_config"):
        return "dense"
    config = next(iter(model.peft_config.values()))
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return "dense"
    lora, oft, other = _tuner_modules(model)
    if lora and not oft and not other and not any(module.lora_variant for module in lora):
        return "lora-scaling"
    if oft and not lora and not other:
        return "oft-cayley"
    return "dense"


class PathModel:
    """A loaded model that moves along the path in place: `set_alpha(a)` gives it the weights W(a)."""

    def __init__(self, loaded, method: str, *, oft_scale: str = DEFAULT_OFT_SCALE,
                 dense_updates: dict[str, tuple] | None = None):
        self.loaded = loaded
        self.method = method
        self.oft_scale = oft_scale
        lora, oft, _ = _tuner_modules(loaded.model)
        self.scalings = [(module, name, value) for module in lora for name, value in module.scaling.items()]
        self.generators = [(module, module.weight.detach().clone()) for module in oft]
        for module in oft:
            # An adapter trained with peft's truncated Neumann series is not exactly orthogonal. Setting the
            # instance attribute makes this model use the exact transform and leaves peft's code unchanged.
            module.use_cayley_neumann = False
        self.dense = dense_updates or {}
        self.parameters = dict(loaded.model.named_parameters())

    def set_alpha(self, alpha: float) -> None:
        """Set the model's weights to W(alpha)."""
        import torch

        with torch.no_grad():
            if self.method == "lora-scaling":
                for module, name, value in self.scalings:
                    module.scaling[name] = value * alpha
            elif self.method == "oft-cayley":
                factor = oft_generator_scale(alpha, self.oft_scale)
                for module, generator in self.generators:
                    module.weight.copy_(generator * factor)
            else:
                for name, (base, delta) in self.dense.items():
                    self.parameters[name].copy_(base + alpha * delta)


def dense_updates(tuned: str, baseline: str, model, cache: Cache) -> dict[str, tuple]:
    """Return {parameter name: (W0, dW)} in fp32 for every parameter of `model` that the fine-tune changed.

    Linear weights come from `llmforge_eval.weights.weight_updates`, which reuses the task vector in
    the cache. A full fine-tune also changes norms and embeddings; those are read from the two
    model directories here, so that a=1 reproduces every tuned parameter.
    """
    from llmforge_eval.weights import resolve_update, weight_updates

    names = {name for name, _ in model.named_parameters()}
    updates = {}
    for update in weight_updates(tuned, baseline, cache=cache):
        if update.name not in names:
            raise ForgeError(f"{update.name} of {tuned} is not a parameter of the base model {baseline}; "
                             "pass the model it was fine-tuned from with --baseline")
        updates[update.name] = (update.base, update.delta)

    source = resolve_update(tuned, baseline, cache=cache)
    # NOTE: for an adapter, only its tuner layers move. Modules an adapter saves whole (peft's
    # modules_to_save) are not in weight_updates and stay at the base weights on this path.
    if not source.is_adapter:
        updates.update(_other_parameter_updates(source.tuned_path, source.base_path, names - set(updates)))
    if not updates:
        raise ForgeError(f"{tuned} changes no parameter of {baseline}, so there is no path to score")
    return updates


def _other_parameter_updates(tuned_dir: Path, base_dir: Path, names: set[str]) -> dict[str, tuple]:
    """Return (W0, dW) of the named parameters that differ between two model directories (fp32)."""
    import torch
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, "torch.Tensor"]:
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                found.update({key: handle.get_tensor(key) for key in handle.keys() if key in names})
        return found

    tuned, base = tensors(tuned_dir), tensors(base_dir)
    updates = {}
    for name, value in tuned.items():
        if name not in base or base[name].shape != value.shape:
            raise ForgeError(f"{name} of {tuned_dir} is missing from, or has another shape in, the base {base_dir}; "
                             "pass the model it was fine-tuned from with --baseline")
        delta = value.to(torch.float32) - base[name].to(torch.float32)
        if bool(delta.any()):
            updates[name] = (base[name].to(torch.float32), delta)
    return updates


def planned_method(adapter_dir: Path | None) -> str:
    """Name the path method from an adapter's adapter_config.json (None: a full model), without loading it."""
    if adapter_dir is None:
        return "dense"
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        return "dense"
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in ("LORA", "ADALORA") and not config.get("use_dora"):
        return "lora-scaling"
    if peft_type == "OFT":
        return "oft-cayley"
    return "dense"


def load_path_model(tuned: str, baseline: str, method: str, *, dtype: str, oft_scale: str,
                    cache: Cache) -> PathModel:
    """Load the model that `PathModel.set_alpha` moves along the path, in the given dtype."""
    from llmforge.models import load_model

    if method != "dense":
        loaded = load_model(tuned, dtype=dtype, cache=cache)
        found = path_method(loaded.model)
        if found != method:
            raise ForgeError(f"the adapter {tuned} has layers that {method} cannot scale (peft built a {found} "
                             "path from it); report this adapter's adapter_config.json as a bug")
        return PathModel(loaded, method, oft_scale=oft_scale)

    # Dense interpolation of an adapter runs on the plain base model with the adapter's merged update.
    loaded = load_model(baseline, dtype=dtype, cache=cache)
    updates = dense_updates(tuned, baseline, loaded.model, cache)
    logger.info("dense interpolation of %d parameters", len(updates))
    return PathModel(loaded, "dense", dense_updates=updates)


def full_checkpoint_state(model, trainable: Path) -> dict[str, "torch.Tensor"]:
    """Read a full fine-tuning checkpoint's trainable.safetensors and check it against the model's parameters.

    Full fine-tuning trains every parameter, so the checkpoint must contain all of them. That also
    makes loading it replace every weight of a model that held an earlier checkpoint.
    """
    from llmforge.checkpoint import load_tensors

    tensors = load_tensors(trainable)
    known = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in known or tuple(known[name].shape) != tuple(tensor.shape):
            raise ForgeError(f"checkpoint {trainable} contains {name}, which the base model lacks or has with "
                             "another shape; rewind against the base model the run was trained from")
    missing = sorted(set(known) - set(tensors))
    if missing:
        raise ForgeError(f"checkpoint {trainable} lacks {len(missing)} parameters such as {missing[0]}; a full "
                         "fine-tuning checkpoint contains every parameter, so recreate it")
    return tensors
