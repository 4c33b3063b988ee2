"""The fine-tuning methods of `forge finetune`: one spec per method, with its options, defaults and peft config.

Every method except `full` goes through HF peft (checked against peft 0.21.2). MiLoRA is not in
that version, so `milora` builds a plain LoRA and re-initialises it here (see `milora_init`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from llmforge.errors import ForgeError

OPTION_FLAGS = {
    "rank": "--rank",
    "alpha": "--alpha",
    "dropout": "--dropout",
    "block_size": "--block-size",
    "target_modules": "--target-modules",
}


@dataclass(frozen=True)
class MethodSettings:
    """Method options as given on the command line; None means "not given", so the method default applies."""

    method: str = "lora"
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    block_size: int | None = None
    target_modules: str | None = None

    def given(self) -> dict[str, Any]:
        """Return the options that were set, by name."""
        return {name: getattr(self, name) for name in OPTION_FLAGS if getattr(self, name) is not None}


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method: the options it takes, their defaults, and how to build its peft config.

    `size_option` is the option that sets the trainable-parameter count (None when the count is
    fixed). `additive` means that peft's `get_delta_weight` is the exact weight update, so the task
    vector is read from it. Otherwise the task vector is a merge on a copy minus the base.
    `mutated_init` marks methods that move part of the base weight into the adapter at init.
    """

    name: str
    title: str
    summary: str
    options: tuple[str, ...]
    defaults: dict[str, Any]
    size_option: str | None
    lr: float = 2e-4
    additive: bool = True
    mutated_init: bool = False
    supports_bf16: bool = True
    build: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    def resolve(self, settings: MethodSettings) -> dict[str, Any]:
        """Return the method's full option values: the given ones over the defaults; reject options it does not take."""
        given = settings.given()
        for name in given:
            if name not in self.options:
                accepted = ", ".join(OPTION_FLAGS[option] for option in self.options) or "no method options"
                raise ForgeError(f"{OPTION_FLAGS[name]} is not an option of --method {self.name}; "
                                 f"{self.name} takes {accepted}")
        values = {**self.defaults, **given}
        validate_values(values)
        return values

    def describe(self) -> dict[str, Any]:
        """Return the JSON-able description that `--list-methods` prints."""
        return {"name": self.name, "title": self.title, "summary": self.summary,
                "options": [OPTION_FLAGS[option] for option in self.options], "defaults": dict(self.defaults),
                "size_option": OPTION_FLAGS[self.size_option] if self.size_option else None, "lr": self.lr}


def validate_values(values: dict[str, Any]) -> None:
    """Raise ForgeError on option values that peft would reject or that cannot train."""
    checks = {
        "rank": lambda v: v > 0,
        "alpha": lambda v: v > 0 and math.isfinite(v),
        "dropout": lambda v: 0 <= v < 1,
        "block_size": lambda v: v > 0,
        "target_modules": lambda v: bool(v.strip()),
    }
    hints = {
        "rank": "it must be a positive integer such as 8",
        "alpha": "it must be a positive number such as 16",
        "dropout": "it must be in [0, 1)",
        "block_size": "it must be a positive integer such as 32",
        "target_modules": "use all-linear or names such as q_proj,v_proj",
    }
    for name, value in values.items():
        if not checks[name](value):
            raise ForgeError(f"invalid {OPTION_FLAGS[name]} {value!r}; {hints[name]}")


def target_modules(values: dict[str, Any]) -> str | list[str]:
    """Return peft's `target_modules`: "all-linear" or a list of module names."""
    text = values["target_modules"]
    if text == "all-linear":
        return "all-linear"
    return [name.strip() for name in text.split(",") if name.strip()]


# peft config builders. Each takes the resolved option values and a `context` dict with
# "model_type" (the transformers model type), "total_steps" and "counting" (True when the
# config only serves to count parameters, so costly initialisations can be skipped).


def _lora_config(values, context, **extra):
    from peft import LoraConfig

    return LoraConfig(r=values["rank"], lora_alpha=values["alpha"], lora_dropout=values["dropout"],
                      target_modules=target_modules(values), bias="none", task_type="CAUSAL_LM", **extra)


def _build_lora(values, context):
    return _lora_config(values, context)


def _build_dora(values, context):
    return _lora_config(values, context, use_dora=True)


def _build_rslora(values, context):
    return _lora_config(values, context, use_rslora=True)


def _build_pissa(values, context):
    return _lora_config(values, context, init_lora_weights=True if context["counting"] else "pissa")


def _build_adalora(values, context):
    from peft import AdaLoraConfig

    # The trainable count is set by init_r; AdaLoRA prunes the rank budget down to target_r during
    # the run. init_r = 1.5 x target_r follows peft's defaults (12 and 8).
    rank = values["rank"]
    return AdaLoraConfig(init_r=rank + rank // 2, target_r=rank, lora_alpha=values["alpha"],
                         lora_dropout=values["dropout"], target_modules=target_modules(values),
                         total_step=max(1, context["total_steps"]), task_type="CAUSAL_LM")


def _build_miss(values, context):
    from peft import MissConfig

    return MissConfig(r=values["block_size"], miss_dropout=values["dropout"], target_modules=target_modules(values),
                      task_type="CAUSAL_LM")


def _build_vera(values, context):
    from peft import VeraConfig

    return VeraConfig(r=values["rank"], vera_dropout=values["dropout"], target_modules=target_modules(values),
                      task_type="CAUSAL_LM")


def _build_ia3(values, context):
    from peft import IA3Config
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    # IA3 scales the input of feed-forward modules and the output of all others; peft names the
    # feed-forward modules per model type (down_proj for Llama). Unknown types scale outputs only.
    feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(context["model_type"], [])
    targets = target_modules(values)
    if targets != "all-linear":
        feedforward = [name for name in feedforward if name in targets]
    # A regex, not a list: peft saves all-linear as full module names, and on reload it rejects a
    # list of short feed-forward names as "not a subset of target_modules" (peft 0.21.2).
    pattern = r".*\.(" + "|".join(re.escape(name) for name in feedforward) + ")$" if feedforward else None
    return IA3Config(target_modules=targets, feedforward_modules=pattern, task_type="CAUSAL_LM")


def _build_oft(values, context):
    from peft import OFTConfig

    # use_cayley_neumann=False: the exact Cayley transform, so every block stays orthogonal
    # (peft's default is a truncated Neumann series).
    return OFTConfig(r=0, oft_block_size=values["block_size"], module_dropout=values["dropout"],
                     target_modules=target_modules(values), use_cayley_neumann=False, task_type="CAUSAL_LM")


def _build_boft(values, context):
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=values["block_size"], boft_block_num=0, boft_n_butterfly_factor=1,
                      boft_dropout=values["dropout"], target_modules=target_modules(values), task_type="CAUSAL_LM")


LORA_OPTIONS = ("rank", "alpha", "dropout", "target_modules")
LORA_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in [
    MethodSpec("full", "full fine-tuning", "All parameters trainable; writes a Hugging Face model directory.",
               (), {}, None, lr=5e-5, additive=False),
    MethodSpec("lora", "LoRA", "Low-rank update B @ A * alpha/r on each target linear layer.",
               LORA_OPTIONS, LORA_DEFAULTS, "rank", build=_build_lora),
    MethodSpec("dora", "DoRA", "LoRA on the direction plus a trainable magnitude vector per output row.",
               LORA_OPTIONS, LORA_DEFAULTS, "rank", additive=False, build=_build_dora),
    MethodSpec("rslora", "rsLoRA", "LoRA scaled by alpha/sqrt(r) instead of alpha/r.",
               LORA_OPTIONS, LORA_DEFAULTS, "rank", build=_build_rslora),
    MethodSpec("pissa", "PiSSA", "LoRA initialised from the largest singular components of each weight.",
               LORA_OPTIONS, LORA_DEFAULTS, "rank", mutated_init=True, build=_build_pissa),
    MethodSpec("milora", "MiLoRA", "LoRA initialised from the smallest singular components of each weight.",
               LORA_OPTIONS, LORA_DEFAULTS, "rank", mutated_init=True, build=_build_lora),
    MethodSpec("adalora", "AdaLoRA", "SVD-form LoRA whose rank budget is pruned from 1.5 x rank to rank while training.",
               LORA_OPTIONS, {**LORA_DEFAULTS, "alpha": 8.0}, "rank", supports_bf16=False, build=_build_adalora),
    MethodSpec("miss", "MiSS", "One shared trainable block of size block-size x out_features per layer.",
               ("dropout", "block_size", "target_modules"),
               {"dropout": 0.0, "block_size": 64, "target_modules": "all-linear"}, "block_size",
               additive=False, build=_build_miss),
    MethodSpec("vera", "VeRA", "Frozen random shared matrices with trainable scaling vectors per layer.",
               ("rank", "dropout", "target_modules"), {"rank": 256, "dropout": 0.0, "target_modules": "all-linear"},
               "rank", build=_build_vera),
    MethodSpec("ia3", "IA3", "Trainable scaling vectors on layer outputs (inputs of feed-forward layers).",
               ("target_modules",), {"target_modules": "all-linear"}, None, additive=False, build=_build_ia3),
    MethodSpec("oft", "OFT", "Block-diagonal orthogonal rotation (exact Cayley) of each weight's input side.",
               ("dropout", "block_size", "target_modules"),
               {"dropout": 0.0, "block_size": 32, "target_modules": "all-linear"}, "block_size",
               additive=False, build=_build_oft),
    MethodSpec("boft", "BOFT", "Butterfly-factored orthogonal rotation with a trainable output scale.",
               ("dropout", "block_size", "target_modules"),
               {"dropout": 0.0, "block_size": 8, "target_modules": "all-linear"}, "block_size",
               additive=False, build=_build_boft),
]}


def get_method(name: str) -> MethodSpec:
    """Return the spec of a method by name; ForgeError lists the known ones."""
    if name not in METHODS:
        raise ForgeError(f"unknown --method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def attach_adapters(model, config, **options):
    """Return `get_peft_model(model, config, **options)`; raise ValueError where peft would adjust a size silently.

    peft 0.21.2 replaces an OFT block size that does not divide a layer's in_features by a nearby
    one and only warns. The count and the record would then be wrong, so it is an error here.
    """
    from peft import get_peft_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, config, **options)
    for warning in caught:
        message = str(warning.message)
        if message.startswith(("Invalid `oft_block_size`", "Invalid `r`")):
            raise ValueError(f"{message.split('!')[0]}: the block size must divide the in_features of every "
                             "adapted layer")
    return peft_model


def peft_config(spec: MethodSpec, values: dict[str, Any], *, model_type: str, total_steps: int = 1,
                counting: bool = False):
    """Build the peft config of `spec` with the resolved option values."""
    if spec.build is None:
        raise ForgeError(f"--method {spec.name} does not use a peft adapter")
    context = {"model_type": model_type, "total_steps": total_steps, "counting": counting}
    return spec.build(values, context)
