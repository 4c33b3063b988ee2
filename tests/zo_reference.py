"""The conventional zeroth-order training loop, kept as the baseline the scoring engine is checked against.

This is MeZO as its paper (Malladi et al., 2023) writes it. Perturb the trainable tensors in
place by +eps z and run a forward. Move them by -2 eps z and run a second forward. Move them back
by +eps z, and update with z regenerated from the step's seed a fourth time. It runs a plain fp32 Hugging Face model (a
peft LoRA model for mezo-lora) and computes full logits. It shares with the engine only the
seeded noise streams, the LoRA initialisation and the loss read from logits, and none of the
engine's states, folding or batching.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from llmforge_zo import noise
from llmforge_zo.engine import find_targets
from llmforge_zo.methods import PhaseTimes, initial_lora_factors
from llmforge_zo.objective import losses_from_logits
from llmforge_zo.settings import ZOSettings


@dataclass
class ReferenceRun:
    """Per-step (L+, L-) of query 0, per-phase seconds, and the trained tensors by name."""

    losses: list[tuple[float, float]] = field(default_factory=list)
    times: PhaseTimes = field(default_factory=PhaseTimes)
    steps: int = 0


class ReferenceLoop:
    """In-place MeZO, MeZO-LoRA, LoZO and LoZO-M on an fp32 model."""

    def __init__(self, model, settings: ZOSettings):
        self.settings = settings.resolved()
        self.model = model.float().eval()
        self.model.requires_grad_(False)
        targets = sorted(find_targets(model, self.settings.target_modules))
        if self.settings.method == "mezo-lora":
            self.model = self._wrap_lora(targets)
        modules = dict(self.model.named_modules())
        self.targets = {name: modules[self._module_name(name)] for name in targets}
        self.momentum = {}

    def _wrap_lora(self, targets):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=self.settings.rank, lora_alpha=self.settings.alpha, lora_dropout=0.0,
                            target_modules=targets, bias="none")
        wrapped = get_peft_model(self.model, config)
        modules = dict(wrapped.named_modules())
        shapes = {name: tuple(modules[f"base_model.model.{name}"].weight.shape) for name in targets}
        factors = initial_lora_factors(self.settings, shapes)
        for name, (a, b) in factors.items():
            modules[f"base_model.model.{name}"].lora_A["default"].weight.data.copy_(a)
            modules[f"base_model.model.{name}"].lora_B["default"].weight.data.copy_(b)
        return wrapped.eval()

    def _module_name(self, name: str) -> str:
        return f"base_model.model.{name}" if self.settings.method == "mezo-lora" else name

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the trainable tensors: NAME.lora_A / NAME.lora_B, or NAME.weight."""
        if self.settings.method != "mezo-lora":
            return {f"{name}.weight": module.weight for name, module in self.targets.items()}
        out = {}
        for name, module in self.targets.items():
            out[f"{name}.lora_A"] = module.lora_A["default"].weight
            out[f"{name}.lora_B"] = module.lora_B["default"].weight
        return out

    def direction(self, step: int, query: int) -> dict[str, torch.Tensor]:
        """Regenerate z of every trainable tensor from the seed (dense, full shape)."""
        s = self.settings
        directions = {}
        for index, (name, module) in enumerate(self.targets.items()):
            if s.method == "mezo-lora":
                d_a, d_b = noise.lora_direction(s.seed, step, query, index, rank=s.rank,
                                                in_features=module.in_features, out_features=module.out_features)
                directions[f"{name}.lora_A"], directions[f"{name}.lora_B"] = d_a, d_b
            elif s.method == "mezo" and s.perturbation == "exact":
                directions[f"{name}.weight"] = noise.dense_direction(s.seed, step, query, index, tuple(module.weight.shape))
            else:
                directions[f"{name}.weight"] = self._u_side(step, query, index, module) @ self.v(step, index, module).T
        return directions

    def _u_side(self, step, query, index, module):
        s = self.settings
        u = noise.low_rank_u(s.seed, step, query, index, rank=s.rank, out_features=module.out_features)
        return u / math.sqrt(s.rank) if s.method == "mezo" else u

    def v(self, step, index, module):
        nu = 1 if self.settings.method == "mezo" else self.settings.nu
        return noise.low_rank_v(self.settings.seed, noise.window_of(step, nu), index, rank=self.settings.rank,
                                in_features=module.in_features)

    def perturb(self, step: int, query: int, scale: float) -> None:
        tensors = self.tensors()
        for key, z in self.direction(step, query).items():
            tensors[key].data.add_(z, alpha=scale * self.settings.eps)

    def loss(self, batch) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return losses_from_logits(batch, logits).losses[0]

    def step(self, step: int, batch, run: ReferenceRun) -> None:
        """One step: per query +eps, forward, -2eps, forward, +eps; then the update."""
        grads = []
        for query in range(self.settings.queries):
            pair = []
            for scale in (1.0, -2.0):
                start = time.perf_counter()
                self.perturb(step, query, scale)
                middle = time.perf_counter()
                loss = self.loss(batch)
                after_forward = time.perf_counter()
                pair.append(loss.item())
                run.times.noise += middle - start
                run.times.forward += after_forward - middle
                run.times.sync += time.perf_counter() - after_forward
            start = time.perf_counter()
            self.perturb(step, query, 1.0)
            run.times.noise += time.perf_counter() - start
            grads.append((pair[0] - pair[1]) / (2 * self.settings.eps))
            if query == 0:
                run.losses.append((pair[0], pair[1]))

        start = time.perf_counter()
        self.update(step, grads)
        run.times.update += time.perf_counter() - start
        run.steps += 1

    def update(self, step: int, grads: list[float]) -> None:
        s = self.settings
        if s.method == "lozo-m":
            return self._momentum_update(step, grads)
        tensors = self.tensors()
        for query, g in enumerate(grads):
            for key, z in self.direction(step, query).items():
                if query == 0 and s.weight_decay:
                    tensors[key].data.mul_(1 - s.lr * s.weight_decay)
                tensors[key].data.add_(z, alpha=-s.lr * g / len(grads))

    def _momentum_update(self, step: int, grads: list[float]) -> None:
        """LoZO-M: momentum on the U side, projected onto the new V when V is redrawn."""
        s = self.settings
        for index, (name, module) in enumerate(self.targets.items()):
            v = self.v(step, index, module)
            u_side = sum(g * self._u_side(step, q, index, module) for q, g in enumerate(grads)) / len(grads)
            if name in self.momentum:
                old_m, old_v = self.momentum[name]
                if not torch.equal(old_v, v):
                    old_m = old_m @ old_v.T @ torch.linalg.pinv(v).T
                m = s.momentum * old_m + (1 - s.momentum) * u_side
            else:
                m = (1 - s.momentum) * u_side
            self.momentum[name] = (m, v)
            if s.weight_decay:
                module.weight.data.mul_(1 - s.lr * s.weight_decay)
            module.weight.data.add_(m @ v.T, alpha=-s.lr)

    def run(self, batches, first_step: int = 0) -> ReferenceRun:
        """Run one step per batch in `batches`, starting at step `first_step`."""
        run = ReferenceRun()
        for offset, batch in enumerate(batches):
            self.step(first_step + offset, batch, run)
        return run
