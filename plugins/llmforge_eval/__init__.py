"""forge eval: target-task and general-capability evaluation (built-in plugin).

The built-in tasks are spec files in `specs/`, registered through `forge_eval_tasks`, the same hook
a third-party plugin implements to add its own tasks.
"""

from __future__ import annotations

from pathlib import Path

from llmforge.hookspecs import hookimpl

SPEC_DIR = Path(__file__).parent / "specs"


@hookimpl
def forge_commands(cli):
    """Add `forge eval`."""
    from llmforge_eval.cli import eval_command

    cli.add_command(eval_command)


@hookimpl
def forge_eval_tasks():
    """Return the built-in task spec files, one YAML file per task in `specs/`."""
    return sorted(SPEC_DIR.glob("*.yaml"))
