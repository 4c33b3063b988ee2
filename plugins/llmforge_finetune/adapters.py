"""Attach a method's trainable parameters to a model, and read its task vector and adapter files back out."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError

from llmforge_finetune.methods import MethodSpec, attach_adapters, peft_config

ADAPTER_NAME = "default"


def wrap_model(model, spec: MethodSpec, values: dict[str, Any], *, total_steps: int = 1):
    """Return `model` ready to train with `spec`: a peft model, or the model itself with all parameters trainable.

    Adapter weights take the base dtype (peft's `autocast_adapter_dtype` is off): bf16 factors keep
    the forward and backward pass in one dtype, and the trainer keeps fp32 master copies.
    """
    if spec.name == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    config = peft_config(spec, values, model_type=model.config.model_type, total_steps=total_steps)
    # BOFT tries to build a CUDA extension and warns when it cannot; on CPU it runs its
    # pure-PyTorch path instead. attach_adapters records (and so hides) that warning.
    try:
        peft_model = attach_adapters(model, config, autocast_adapter_dtype=False)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ForgeError(f"cannot attach {spec.title} adapters with --target-modules "
                         f"{values.get('target_modules')!r}: {error}") from error

    if spec.name == "milora":
        milora_init(peft_model)
    return peft_model


def lora_layers(peft_model):
    """Yield (module name, LoraLayer) for every LoRA-wrapped layer of a peft model."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            yield name, module


def milora_init(peft_model) -> None:
    """Initialise every LoRA pair from the r smallest singular components of its base weight (MiLoRA).

    With W = U S V^T and the last r singular triplets (u_i, s_i, v_i), B = U_r sqrt(S_r / scaling)
    and A = sqrt(S_r / scaling) V_r^T, and the base weight keeps the residual W - scaling * B A,
    so the model output is unchanged at step 0. This mirrors peft's PiSSA init with the minor
    components in place of the principal ones; peft 0.21.2 has no MiLoRA option.
    """
    import torch

    with torch.no_grad():
        for name, module in lora_layers(peft_model):
            base = module.get_base_layer()
            rank = module.r[ADAPTER_NAME]
            scaling = module.scaling[ADAPTER_NAME]
            weight = base.weight.to(torch.float32)
            if getattr(module, "fan_in_fan_out", False):
                weight = weight.T
            if rank > min(weight.shape):
                raise ForgeError(f"--rank {rank} is larger than the smaller dimension {min(weight.shape)} of {name}; "
                                 "MiLoRA needs rank <= min(in_features, out_features)")

            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            root = torch.sqrt(s[-rank:] / scaling)
            lora_b = u[:, -rank:] * root
            lora_a = root[:, None] * vh[-rank:]
            residual = weight - scaling * (lora_b @ lora_a)
            if getattr(module, "fan_in_fan_out", False):
                residual = residual.T

            factor_dtype = module.lora_A[ADAPTER_NAME].weight.dtype
            module.lora_A[ADAPTER_NAME].weight.copy_(lora_a.to(factor_dtype))
            module.lora_B[ADAPTER_NAME].weight.copy_(lora_b.to(factor_dtype))
            base.weight.copy_(residual.to(base.weight.dtype))


def initial_lora_factors(peft_model) -> dict[str, tuple[Any, Any]]:
    """Return fp32 copies of the initial (A, B) of every LoRA layer, for methods that move base weight into them."""
    return {name: (module.lora_A[ADAPTER_NAME].weight.detach().float().clone(),
                   module.lora_B[ADAPTER_NAME].weight.detach().float().clone())
            for name, module in lora_layers(peft_model)}


def count_trainable(model) -> int:
    """Return the number of trainable parameters of `model`; a tied parameter counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tuner_layers(peft_model):
    """Yield (module name, layer) for every peft tuner layer that wraps a base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_base_layer"):
            if ADAPTER_NAME in getattr(module, "active_adapters", [ADAPTER_NAME]):
                yield name, module


def layer_delta(module, spec: MethodSpec):
    """Return the fp32 weight update of one tuner layer: merged weight minus base weight.

    For additive methods this is peft's `get_delta_weight`. The others (DoRA's norm, OFT and
    BOFT rotations, IA3 and MiSS) copy the layer to fp32, merge it with peft's `merge` and
    subtract the base weight. Only one layer is copied at a time.
    """
    import torch

    if spec.additive:
        layer = copy.deepcopy(module).float()
        return layer.get_delta_weight(ADAPTER_NAME).detach().to(torch.float32)

    layer = copy.deepcopy(module).float()
    base_weight = layer.get_base_layer().weight.detach().clone()
    layer.merge(adapter_names=[ADAPTER_NAME])
    return (layer.get_base_layer().weight.detach() - base_weight).to(torch.float32)


def adapter_task_vector(peft_model, spec: MethodSpec, initial_factors: dict | None = None) -> dict[str, Any]:
    """Return the dense weight update of every adapted layer, keyed by base parameter name, in fp32.

    Applied to the base weights (W0 + dW), the vector gives the fine-tuned model's weights. For
    PiSSA and MiLoRA the base model in memory contains W0 - scaling * B0 A0, so the update against
    the original W0 is scaling * (B A - B0 A0), with (A0, B0) from `initial_factors`.
    """
    import torch

    vector = {}
    for name, module in tuner_layers(peft_model):
        delta = layer_delta(module, spec)
        if spec.mutated_init:
            a0, b0 = initial_factors[name]
            initial = (b0 @ a0) * module.scaling[ADAPTER_NAME]
            delta = delta - (initial.T if getattr(module, "fan_in_fan_out", False) else initial)
        vector[f"{name}.weight"] = delta.contiguous()

    if not vector:
        raise ForgeError(f"the model has no {spec.title} layers, so there is no task vector to compute")
    return {key: value.to(torch.float32) for key, value in vector.items()}


def save_adapter(peft_model, directory: Path, spec: MethodSpec, initial_factors: dict | None = None) -> None:
    """Write the adapter with save_pretrained; PiSSA and MiLoRA are converted to a LoRA on the original base.

    Their trained pair (A, B) applies to the residual base W0 - scaling * B0 A0. The saved adapter
    is the rank-2r LoRA [A; A0], [B, -B0], whose update scaling * (B A - B0 A0) applies to the
    unchanged W0, so peft and forge load it on the ordinary base model. alpha doubles with r
    (times sqrt(2) for rsLoRA) to keep the scaling.
    """
    import torch
    from safetensors.torch import load_file, save_file

    # save_embedding_layers=False: with "auto", peft looks the base reference up on the Hugging Face
    # Hub to compare vocabularies, and no method here trains the embeddings.
    peft_model.save_pretrained(str(directory), save_embedding_layers=False)
    _sort_target_modules(directory / "adapter_config.json")
    if not spec.mutated_init:
        return

    weights_path = directory / "adapter_model.safetensors"
    saved = load_file(weights_path)
    converted = {}
    for key, tensor in saved.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        a0, b0 = initial_factors[module]
        if ".lora_A." in key:
            converted[key] = torch.cat([tensor.float(), a0], dim=0).to(tensor.dtype).contiguous()
        elif ".lora_B." in key:
            converted[key] = torch.cat([tensor.float(), -b0], dim=1).to(tensor.dtype).contiguous()
        else:
            converted[key] = tensor
    save_file(converted, weights_path, metadata={"format": "pt"})

    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = config["lora_alpha"] * (2 ** 0.5 if config.get("use_rslora") else 2)
    config["init_lora_weights"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _sort_target_modules(config_path: Path) -> None:
    """Rewrite the adapter config with target_modules sorted.

    peft keeps target_modules as a set, so its saved order depends on the process's string hash
    seed. Sorting makes equal adapters byte-identical, and so gives them equal digests and one
    cache entry.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def adalora_hooks(peft_model, spec: MethodSpec):
    """Return (step_hook, regularizer) for AdaLoRA, or (None, None) for other methods.

    AdaLoRA reallocates its rank budget from the gradients after every optimizer step, and adds
    an orthogonality penalty mean ||P P^T - I||_F over its factors to the loss (weight
    `orth_reg_weight`, 0.5 by default in peft 0.21).
    """
    import torch

    if spec.name != "adalora":
        return None, None

    tuner = peft_model.base_model
    weight = peft_model.peft_config[ADAPTER_NAME].orth_reg_weight
    factors = [(name, p) for name, p in peft_model.named_parameters()
               if p.requires_grad and (".lora_A." in name or ".lora_B." in name)]

    def regularizer():
        penalties = []
        for name, parameter in factors:
            gram = parameter @ parameter.T if ".lora_A." in name else parameter.T @ parameter
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            penalties.append(torch.linalg.matrix_norm(gram - identity))
        return weight * torch.stack(penalties).mean()

    def step_hook(step: int) -> None:
        tuner.update_and_allocate(step)

    return step_hook, regularizer
