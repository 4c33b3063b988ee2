"""forge-tokens: an example third-party forge plugin.

It implements two hooks of ``llmforge.hookspecs``:

- ``forge_commands`` adds ``forge tokens``, which counts the tokens of a data set for a model's
  tokenizer, as ``forge finetune`` would tokenize it, and reports unknown tokens;
- ``forge_eval_tasks`` adds the evaluation task ``plurals``, a spec file shipped in ``tasks/``.

This module is imported whenever ``forge`` starts, so it imports only ``llmforge.hookspecs`` and
the standard library. The command module, and torch and transformers inside it, load on use.
"""

from __future__ import annotations

from pathlib import Path

from llmforge.hookspecs import hookimpl

TASK_DIR = Path(__file__).parent / "tasks"


@hookimpl
def forge_commands(cli):
    """Add `forge tokens` to the forge group."""
    from forge_tokens.cli import tokens_command

    cli.add_command(tokens_command)


@hookimpl
def forge_eval_tasks():
    """Return the paths of the shipped task spec files; forge eval reads and validates them."""
    return sorted(TASK_DIR.glob("*.yaml"))
