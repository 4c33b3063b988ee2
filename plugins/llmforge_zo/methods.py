"""The zeroth-order methods: which states a step probes and how the two-point estimate updates the weights.

Every step draws q directions, scores the 2q states theta +- eps * direction on one batch, forms
g_j = (L+_j - L-_j) / (2 eps) for each query and moves theta by -lr * (mean_j g_j direction_j
+ wd * theta). The methods differ in what theta and the directions are:

- `MezoLora` (mezo-lora): theta is a LoRA adapter (A, B) on every trained module, and the
  directions are Gaussian (dA, dB). Every probed state is itself a LoRA adapter.
- `LowRankZO` (lozo, lozo-m, and mezo with --perturbation factorised): theta is the full weight
  of every trained module, and the directions are U V^T with V held for `nu` steps. Within a
  window the accumulated update is (sum of -lr g U) V^T, so the trained weight stays
  base + acc V^T, a rank-r adapter. It is folded into the base weight when V changes, or every
  step when weight decay is on, because decay scales the whole matrix.
- `ExactMezo` (mezo with --perturbation exact): Gaussian directions of full shape, applied by
  writing W +- eps z into the scorer's weights between two single-state forwards.

Trainable state is fp32 whatever the scoring dtype.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from llmforge_zo import noise
from llmforge_zo.settings import ZOSettings
from llmforge_zo.states import LowRankDelta, StackedStates


class NonFiniteLoss(Exception):
    """A probed state's loss was NaN or infinite; the weights are as they were before the step."""

    def __init__(self, step: int, losses: list[float]):
        super().__init__(f"step {step}: non-finite loss among {losses}")
        self.step, self.losses = step, losses


@dataclass
class PhaseTimes:
    """Seconds spent per phase of a step: noise and perturbation, forward, host sync, update."""

    noise: float = 0.0
    forward: float = 0.0
    sync: float = 0.0
    update: float = 0.0
    wall: float = 0.0
    steps: int = 0

    def add(self, other: "PhaseTimes") -> None:
        for name in ("noise", "forward", "sync", "update"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float]:
        return {"noise": self.noise, "forward": self.forward, "sync": self.sync, "update": self.update}


class ZOMethod:
    """Shared parts of a zeroth-order method: settings, trained module shapes, and the scorer."""

    def __init__(self, settings: ZOSettings, scorer):
        self.settings = settings
        self.scorer = scorer
        self.shapes = scorer.shapes()
        self.names = sorted(self.shapes)

    def probe(self, step: int) -> StackedStates:
        """Return the 2q states of `step`, ordered +q0, -q0, +q1, -q1, ..."""
        raise NotImplementedError

    def score_probes(self, step: int, batch, times: PhaseTimes) -> list[float]:
        """Score the probed states of `step` on `batch`; return their losses (one host sync)."""
        clock = _Clock()
        states = self.probe(step)
        times.noise += clock.lap()
        scores = self.scorer.score(states, batch)
        times.forward += clock.lap()
        losses = scores.losses.tolist()
        times.sync += clock.lap()
        return losses

    def step(self, step: int, batch, times: PhaseTimes) -> list[float]:
        """Run one step on `batch`: score the probes, form each query's g, update. Return the losses.

        Raises NonFiniteLoss before touching the weights when a loss is NaN or infinite.
        """
        losses = self.score_probes(step, batch, times)
        if not all(math.isfinite(loss) for loss in losses):
            raise NonFiniteLoss(step, losses)

        clock = _Clock()
        eps = self.settings.eps
        grads = [(losses[2 * query] - losses[2 * query + 1]) / (2 * eps) for query in range(len(losses) // 2)]
        self.update(step, grads)
        times.update += clock.lap()
        return losses

    def update(self, step: int, grads: list[float]) -> None:
        """Apply the update of `step` given one projected gradient per query."""
        raise NotImplementedError

    def current(self) -> StackedStates:
        """Return the trained point as one state (for evaluation)."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Return everything a checkpoint needs to continue the run."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Restore `state_tensors` saved after `step` steps."""
        raise NotImplementedError

    def task_vector(self, base_weight: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the dense fp32 update of every trained weight, keyed NAME.weight.

        `base_weight(key)` returns the base model's tensor `key`; full-parameter methods keep no
        copy of the base weights, so they read them through it.
        """
        raise NotImplementedError


def initial_lora_factors(settings: ZOSettings, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple]:
    """Return seeded (A, B) per module, modules in sorted order: A uniform in +-1/sqrt(in), B zero."""
    factors = {}
    for index, name in enumerate(sorted(shapes)):
        out_features, in_features = shapes[name]
        generator = torch.Generator().manual_seed(noise.stream_seed(settings.seed, "lora-init", index))
        bound = 1.0 / math.sqrt(in_features)
        a = (torch.rand(settings.rank, in_features, generator=generator) * 2 - 1) * bound
        factors[name] = (a, torch.zeros(out_features, settings.rank))
    return factors


class MezoLora(ZOMethod):
    """MeZO on LoRA factors: A starts uniform in +-1/sqrt(in) (peft's default), B at zero."""

    def __init__(self, settings: ZOSettings, scorer):
        super().__init__(settings, scorer)
        self.scaling = settings.alpha / settings.rank
        factors = initial_lora_factors(settings, self.shapes)
        self.a = {name: a for name, (a, _) in factors.items()}
        self.b = {name: b for name, (_, b) in factors.items()}
        self._directions: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def directions(self, step: int, query: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return (dA, dB) per module for one query of `step`."""
        directions = {}
        for index, name in enumerate(self.names):
            out_features, in_features = self.shapes[name]
            directions[name] = noise.lora_direction(self.settings.seed, step, query, index, rank=self.settings.rank,
                                                    in_features=in_features, out_features=out_features)
        return directions

    def probe(self, step: int) -> StackedStates:
        eps = self.settings.eps
        self._directions = [self.directions(step, query) for query in range(self.settings.queries)]
        deltas = {}
        for name in self.names:
            downs, ups = [], []
            for direction in self._directions:
                d_a, d_b = direction[name]
                for sign in (1.0, -1.0):
                    downs.append(self.a[name] + sign * eps * d_a)
                    ups.append(self.scaling * (self.b[name] + sign * eps * d_b))
            deltas[name] = LowRankDelta(torch.stack(downs), torch.stack(ups))
        return StackedStates(2 * len(self._directions), deltas)

    def update(self, step: int, grads: list[float]) -> None:
        lr, wd, queries = self.settings.lr, self.settings.weight_decay, len(grads)
        for name in self.names:
            grad_a = sum(g * direction[name][0] for g, direction in zip(grads, self._directions)) / queries
            grad_b = sum(g * direction[name][1] for g, direction in zip(grads, self._directions)) / queries
            self.a[name] -= lr * (grad_a + wd * self.a[name])
            self.b[name] -= lr * (grad_b + wd * self.b[name])
        self._directions = []

    def current(self) -> StackedStates:
        deltas = {name: LowRankDelta(self.a[name].unsqueeze(0), (self.scaling * self.b[name]).unsqueeze(0))
                  for name in self.names}
        return StackedStates(1, deltas)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"{name}.lora_A": self.a[name] for name in self.names},
                **{f"{name}.lora_B": self.b[name] for name in self.names}}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        for name in self.names:
            self.a[name] = tensors[f"{name}.lora_A"].float().clone()
            self.b[name] = tensors[f"{name}.lora_B"].float().clone()

    def task_vector(self, base_weight=None) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": self.scaling * self.b[name] @ self.a[name] for name in self.names}


class LowRankZO(ZOMethod):
    """LoZO (momentum optional) and factorised MeZO: directions scale * U V^T, V redrawn every nu steps."""

    def __init__(self, settings: ZOSettings, scorer, *, nu: int, scale: float, momentum: float | None = None):
        super().__init__(settings, scorer)
        self.nu, self.scale, self.beta = nu, scale, momentum
        self.weights = scorer.initial
        self.acc = {name: torch.zeros(self.shapes[name][0], settings.rank) for name in self.names}
        self.momentum = {name: torch.zeros_like(self.acc[name]) for name in self.names} if momentum else None
        self.window = None
        self.v: dict[str, torch.Tensor] = {}
        self._u: list[dict[str, torch.Tensor]] = []

    def _enter_window(self, step: int) -> None:
        """Fold the accumulated update into the weights and draw V for the window of `step`."""
        window = noise.window_of(step, self.nu)
        if window == self.window:
            return
        old_v = self.v
        self.fold()
        self.v = {name: noise.low_rank_v(self.settings.seed, window, index, rank=self.settings.rank,
                                         in_features=self.shapes[name][1])
                  for index, name in enumerate(self.names)}
        if self.momentum is not None and old_v:
            for name in self.names:
                self.momentum[name] = reproject(self.momentum[name], old_v[name], self.v[name])
        self.window = window

    def fold(self) -> None:
        """Write acc V^T into the fp32 weights and the scorer, and reset acc."""
        for name in self.names:
            if self.v and torch.count_nonzero(self.acc[name]):
                self.weights[name].addmm_(self.acc[name], self.v[name].T)
                self.acc[name].zero_()
                self.scorer.set_weight(name, self.weights[name])

    def probe(self, step: int) -> StackedStates:
        self._enter_window(step)
        eps, rank = self.settings.eps * self.scale, self.settings.rank
        self._u = [{name: noise.low_rank_u(self.settings.seed, step, query, index, rank=rank,
                                           out_features=self.shapes[name][0])
                    for index, name in enumerate(self.names)}
                   for query in range(self.settings.queries)]
        deltas = {}
        for name in self.names:
            ups = [self.acc[name] + sign * eps * u[name] for u in self._u for sign in (1.0, -1.0)]
            deltas[name] = LowRankDelta(self.v[name].T, torch.stack(ups))
        return StackedStates(2 * len(self._u), deltas)

    def update(self, step: int, grads: list[float]) -> None:
        lr, wd = self.settings.lr, self.settings.weight_decay
        for name in self.names:
            direction = sum(g * u[name] for g, u in zip(grads, self._u)) * (self.scale / len(grads))
            if self.momentum is not None:
                self.momentum[name].mul_(self.beta).add_(direction, alpha=1 - self.beta)
                direction = self.momentum[name]
            if wd:
                weight = self.weights[name]
                weight.mul_(1 - lr * wd).addmm_(direction, self.v[name].T, alpha=-lr)
                self.scorer.set_weight(name, weight)
            else:
                self.acc[name].add_(direction, alpha=-lr)
        self._u = []

    def current(self) -> StackedStates:
        deltas = {name: LowRankDelta(self.v[name].T, self.acc[name].unsqueeze(0)) for name in self.names} if self.v else {}
        return StackedStates(1, deltas)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.weight": self.weights[name] for name in self.names}
        tensors.update({f"{name}.acc": self.acc[name] for name in self.names})
        if self.momentum is not None:
            tensors.update({f"{name}.momentum": self.momentum[name] for name in self.names})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        for name in self.names:
            self.weights[name].copy_(tensors[f"{name}.weight"])
            self.scorer.set_weight(name, self.weights[name])
            self.acc[name] = tensors[f"{name}.acc"].float().clone()
            if self.momentum is not None:
                self.momentum[name] = tensors[f"{name}.momentum"].float().clone()
        if step > 0:
            self.window = noise.window_of(step - 1, self.nu)
            self.v = {name: noise.low_rank_v(self.settings.seed, self.window, index, rank=self.settings.rank,
                                             in_features=self.shapes[name][1])
                      for index, name in enumerate(self.names)}

    def task_vector(self, base_weight) -> dict[str, torch.Tensor]:
        vector = {}
        for name in self.names:
            weight = self.weights[name] + (self.acc[name] @ self.v[name].T if self.v else 0.0)
            vector[f"{name}.weight"] = weight - base_weight(f"{name}.weight").float()
        return vector


def reproject(momentum: torch.Tensor, old_v: torch.Tensor, new_v: torch.Tensor) -> torch.Tensor:
    """Return M' with M' new_V^T closest to M old_V^T in Frobenius norm: M old_V^T new_V (new_V^T new_V)^-1."""
    gram = new_v.T @ new_v
    return torch.linalg.solve(gram, (momentum @ (old_v.T @ new_v)).T).T


class ExactMezo(ZOMethod):
    """MeZO with exact Gaussian noise of full shape, written into the scorer's weights per state."""

    def __init__(self, settings: ZOSettings, scorer):
        super().__init__(settings, scorer)
        # The scorer's working weights receive W +- eps z, so the fp32 master must be a separate
        # tensor (in fp32 scoring, scorer.initial is the working weight itself).
        self.weights = {name: weight.clone() for name, weight in scorer.initial.items()}
        self._z: list[dict[str, torch.Tensor]] = []
        self._scorer_holds_weights = True

    def directions(self, step: int, query: int) -> dict[str, torch.Tensor]:
        return {name: noise.dense_direction(self.settings.seed, step, query, index, self.shapes[name])
                for index, name in enumerate(self.names)}

    def score_probes(self, step: int, batch, times: PhaseTimes) -> list[float]:
        clock = _Clock()
        self._z, losses = [], []
        for query in range(self.settings.queries):
            self._z.append(self.directions(step, query))
            times.noise += clock.lap()
            for sign in (1.0, -1.0):
                self._write(lambda name: torch.add(self.weights[name], self._z[-1][name], alpha=sign * self.settings.eps))
                times.noise += clock.lap()
                scores = self.scorer.score(StackedStates(1), batch)
                times.forward += clock.lap()
                losses.append(scores.losses.item())
                times.sync += clock.lap()
        self._scorer_holds_weights = False
        return losses

    def _write(self, weight_of: Callable[[str], torch.Tensor]) -> None:
        for name in self.names:
            self.scorer.set_weight(name, weight_of(name))

    def update(self, step: int, grads: list[float]) -> None:
        lr, wd = self.settings.lr, self.settings.weight_decay
        for name in self.names:
            weight = self.weights[name]
            if wd:
                weight.mul_(1 - lr * wd)
            for g, z in zip(grads, self._z):
                weight.add_(z[name], alpha=-lr * g / len(grads))
        self._z = []

    def current(self) -> StackedStates:
        if not self._scorer_holds_weights:
            self._write(lambda name: self.weights[name])
            self._scorer_holds_weights = True
        return StackedStates(1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": self.weights[name] for name in self.names}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        for name in self.names:
            self.weights[name].copy_(tensors[f"{name}.weight"])
        self._scorer_holds_weights = False

    def task_vector(self, base_weight) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": self.weights[name] - base_weight(f"{name}.weight").float() for name in self.names}


class _Clock:
    def __init__(self):
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def build_method(settings: ZOSettings, scorer) -> ZOMethod:
    """Return the method object that `settings.method` names."""
    if settings.method == "mezo-lora":
        # The LoRA factors are the whole trained state, so the fp32 base weights can go.
        scorer.initial.clear()
        return MezoLora(settings, scorer)
    if settings.method in ("lozo", "lozo-m"):
        momentum = settings.momentum if settings.method == "lozo-m" else None
        return LowRankZO(settings, scorer, nu=settings.nu, scale=1.0, momentum=momentum)
    if settings.perturbation == "factorised":
        return LowRankZO(settings, scorer, nu=1, scale=1.0 / math.sqrt(settings.rank))
    return ExactMezo(settings, scorer)
