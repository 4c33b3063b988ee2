"""LoRA wiring: wrap a causal LM with peft adapters and read the task vector back out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llmforge.errors import ForgeError


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; `target_modules` is "all-linear" or a comma-separated list of module names."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = "all-linear"

    def validate(self) -> None:
        """Raise ForgeError on a value that peft would reject or that cannot train."""
        if self.rank <= 0:
            raise ForgeError(f"invalid --rank {self.rank}; the LoRA rank must be a positive integer such as 8")
        if self.alpha <= 0:
            raise ForgeError(f"invalid --alpha {self.alpha}; the LoRA alpha must be positive, such as 16")
        if not 0 <= self.dropout < 1:
            raise ForgeError(f"invalid --dropout {self.dropout}; it must be in [0, 1)")
        if not self.target_modules.strip():
            raise ForgeError("invalid --target-modules ''; use all-linear or names such as q_proj,v_proj")

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-able dict for the run record."""
        return asdict(self)


def _target_modules(settings: LoraSettings) -> str | list[str]:
    if settings.target_modules == "all-linear":
        return "all-linear"
    return [name.strip() for name in settings.target_modules.split(",") if name.strip()]


def wrap_with_lora(model, settings: LoraSettings):
    """Return a peft model with LoRA adapters on `model`; the adapter factors take the base dtype.

    peft casts adapter weights to fp32 on a bf16 base unless `autocast_adapter_dtype` is off. We
    turn it off: bf16 factors keep every matmul of the forward and backward pass in one dtype,
    and the trainer keeps an fp32 master copy of them for the optimizer step.
    """
    from peft import LoraConfig, get_peft_model

    settings.validate()
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_target_modules(settings),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as error:
        raise ForgeError(f"cannot attach LoRA adapters with --target-modules {settings.target_modules!r}: "
                         f"{error}") from error


def count_trainable(model) -> int:
    """Return the number of trainable parameters of `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_task_vector(peft_model) -> dict[str, Any]:
    """Return the dense weight update of every LoRA-wrapped linear, under the base parameter names.

    For a module with factors A (r x in) and B (out x r), the update is B @ A * scaling, in fp32,
    keyed like the base model's state dict (e.g. "model.layers.0.self_attn.q_proj.weight").
    """
    import torch
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    vector = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            a = module.lora_A[adapter].weight.detach().float()
            b = module.lora_B[adapter].weight.detach().float()
            delta = (b @ a) * module.scaling[adapter]
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            vector[f"{name}.weight"] = delta.contiguous()

    if not vector:
        raise ForgeError("the model has no LoRA layers, so there is no task vector to compute")
    return {key: value.to(torch.float32) for key, value in vector.items()}
