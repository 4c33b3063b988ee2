"""Hyper-parameters of a zeroth-order run, with per-method defaults and validation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from llmforge.errors import ForgeError

METHODS = ("mezo", "mezo-lora", "lozo", "lozo-m")
PERTURBATIONS = ("exact", "factorised")
DTYPES = ("bf16", "fp32")

# Defaults per method. eps is the usual setting of the MeZO and LoZO papers. Their learning rates
# (1e-4 for LoRA, 1e-6 for full weights) suit runs of 20k steps on large models. On SST-2 with
# smollm2-135m, 300 steps of mezo-lora at 1e-4 left dev accuracy at zero-shot (0.58), while
# mezo-lora at 1e-3 and lozo at 1e-5 (fp32) reached 0.70 and 0.64. mezo keeps the papers' 1e-6,
# which no run here has tuned.
# "rank" is the LoRA rank (mezo-lora), the rank of U V^T (lozo), or the factor rank of the
# factorised stand-in for full-rank noise (mezo --perturbation factorised). Scoring runs in bf16:
# on 12 SST-2 batches of smollm2-135m at eps 1e-3, the projected gradients (L+ - L-) / 2 eps of
# bf16 scoring correlated 0.985 with those of fp32 scoring, for lozo and both mezo variants.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mezo": {"eps": 1e-3, "lr": 1e-6, "rank": 64, "dtype": "bf16"},
    "mezo-lora": {"eps": 1e-2, "lr": 1e-3, "rank": 8, "dtype": "bf16"},
    "lozo": {"eps": 1e-3, "lr": 1e-5, "rank": 2, "dtype": "bf16"},
    "lozo-m": {"eps": 1e-3, "lr": 1e-5, "rank": 2, "dtype": "bf16"},
}


@dataclass
class ZOSettings:
    """Hyper-parameters of a zeroth-order run; a None field takes the method's default from DEFAULTS."""

    method: str = "lozo"
    eps: float | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    steps: int = 1000
    batch_size: int = 16
    queries: int = 1
    rank: int | None = None
    alpha: float | None = None
    nu: int = 50
    momentum: float = 0.9
    perturbation: str = "exact"
    dtype: str | None = None
    target_modules: str = "all-linear"
    seed: int = 0

    def resolved(self) -> "ZOSettings":
        """Return a copy with the method's defaults filled in, validated."""
        if self.method not in METHODS:
            raise ForgeError(f"unknown --method {self.method!r}; use one of: {', '.join(METHODS)}")
        defaults = DEFAULTS[self.method]
        filled = replace(self, **{name: value for name, value in defaults.items() if getattr(self, name) is None})
        if filled.alpha is None:
            filled = replace(filled, alpha=2.0 * filled.rank)
        filled.validate()
        return filled

    def validate(self) -> None:
        """Raise ForgeError naming the first invalid value."""
        positive = {"--eps": self.eps, "--lr": self.lr, "--steps": self.steps, "--batch-size": self.batch_size,
                    "--queries": self.queries, "--rank": self.rank, "--alpha": self.alpha, "--nu": self.nu}
        for flag, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ForgeError(f"invalid {flag} {value}; it must be a positive finite number")
        for flag, value in {"--steps": self.steps, "--batch-size": self.batch_size, "--queries": self.queries,
                            "--rank": self.rank, "--nu": self.nu}.items():
            if int(value) != value:
                raise ForgeError(f"invalid {flag} {value}; it must be a whole number")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ForgeError(f"invalid --weight-decay {self.weight_decay}; it must be zero or positive")
        if not 0 <= self.momentum < 1:  # also rejects NaN
            raise ForgeError(f"invalid --momentum {self.momentum}; it must be in [0, 1)")
        if self.perturbation not in PERTURBATIONS:
            raise ForgeError(f"invalid --perturbation {self.perturbation!r}; use one of: {', '.join(PERTURBATIONS)}")
        if self.dtype not in DTYPES:
            raise ForgeError(f"invalid --dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}")
        if not self.target_modules.strip():
            raise ForgeError("invalid --target-modules ''; use all-linear or names such as q_proj,v_proj")

    @property
    def torch_dtype(self):
        import torch

        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def as_dict(self) -> dict[str, Any]:
        """Return the settings that the method uses, as a JSON-able dict (for run records and --resume)."""
        used = asdict(self)
        unused = {"mezo-lora": ("nu", "momentum", "perturbation"), "lozo": ("alpha", "momentum", "perturbation"),
                  "lozo-m": ("alpha", "perturbation"), "mezo": ("alpha", "nu", "momentum")}[self.method]
        if self.method == "mezo" and self.perturbation == "exact":
            unused += ("rank",)
        return {name: value for name, value in used.items() if name not in unused}
