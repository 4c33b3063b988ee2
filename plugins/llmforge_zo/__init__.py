"""forge zo: zeroth-order fine-tuning run as batched inference over adapter states (built-in plugin)."""

from llmforge.hookspecs import hookimpl


@hookimpl
def forge_commands(cli):
    """Add the `zo` command to the forge group."""
    from llmforge_zo.cli import zo_command

    cli.add_command(zo_command)


@hookimpl
def forge_zo_backends():
    """Register the built-in torch scoring engine."""
    from llmforge_zo.engine import torch_backend

    return {"torch": torch_backend}
