"""Adapter states: the nearby parameter states that a zeroth-order step scores.

Every probed state is a set of low-rank deltas on a frozen base: for module m, the weight seen
by the forward is W_m + up_m @ down_m. A LoRA state is (down = A, up = scaling * B), and a LoZO
state is (down = V^T, up = accumulated update + eps * U). `StackedStates` stores S states in the
layout a batched forward needs. Per module, `up` is S x out x r, and `down` is either r x in,
shared by all states (LoZO's V), or S x r x in.

The `forge_zo_backends` interface speaks in these terms: a backend scores a `StackedStates` on a
batch and returns one loss per state. `stack_states` builds one from a plain list of per-state
dicts, the form a serving engine that loads one LoRA adapter per state would take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch


@dataclass
class LowRankDelta:
    """One module's delta up @ down, with down r x in and up out x r (LoRA's A and scaling * B)."""

    down: torch.Tensor
    up: torch.Tensor


@dataclass
class StackedStates:
    """S adapter states, stacked per module; a module absent from `deltas` is unchanged in every state."""

    count: int
    deltas: dict[str, LowRankDelta] = field(default_factory=dict)

    def state(self, index: int) -> dict[str, LowRankDelta]:
        """Return state `index` as a per-module dict (the unstacked form)."""
        unstacked = {}
        for name, delta in self.deltas.items():
            down = delta.down if delta.down.dim() == 2 else delta.down[index]
            unstacked[name] = LowRankDelta(down, delta.up[index])
        return unstacked


def stack_states(states: Sequence[Mapping[str, LowRankDelta]]) -> StackedStates:
    """Stack per-state dicts of deltas; every state must name the same modules with the same ranks."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    names = set(states[0])
    for index, state in enumerate(states):
        if set(state) != names:
            raise ValueError(f"state {index} changes modules {sorted(set(state) ^ names)[:3]}; "
                             "every state must name the same modules")

    deltas = {}
    for name in sorted(names):
        downs = [state[name].down for state in states]
        ups = torch.stack([state[name].up for state in states])
        shared = all(down is downs[0] for down in downs)
        deltas[name] = LowRankDelta(downs[0] if shared else torch.stack(downs), ups)
    return StackedStates(len(states), deltas)
