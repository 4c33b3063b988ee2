"""Scoring backends for `forge zo`, registered through the `forge_zo_backends` hook.

A backend factory is called as `factory(model, targets, dtype, packing=...)` with the fp32 Hugging
Face model, the names of the linear modules being trained, and the scoring dtype. It returns a
scorer with:

- `shapes() -> {name: (out_features, in_features)}` of the trained modules;
- `initial`: {name: fp32 weight} as loaded (full-parameter methods train copies of these);
- `set_weight(name, weight)`: replace a module's base weight between steps;
- `score(states, batch) -> StateScores`: one loss per state of a `StackedStates` on a
  `ScoringBatch`, with nothing written into the base weights.

docs/zo-backends.md sketches a vLLM backend on this interface.
"""

from __future__ import annotations

from typing import Callable

from llmforge.errors import ForgeError


def available_backends() -> dict[str, Callable]:
    """Return every registered backend factory by name (built-in and plugin ones)."""
    from llmforge.plugins import get_plugin_manager

    backends: dict[str, Callable] = {}
    for mapping in get_plugin_manager().hook.forge_zo_backends():
        backends.update(mapping or {})
    return backends


def get_backend(name: str) -> Callable:
    """Return the factory of backend `name`, or raise ForgeError listing the installed ones."""
    backends = available_backends()
    if name not in backends:
        raise ForgeError(f"no zeroth-order scoring backend named {name!r} is installed; installed: "
                         f"{', '.join(sorted(backends)) or 'none'}. A backend such as vLLM comes from a plugin "
                         "that implements the forge_zo_backends hook (see docs/zo-backends.md)")
    return backends[name]
