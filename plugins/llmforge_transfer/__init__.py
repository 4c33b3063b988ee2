"""forge transfer: move a task vector to a new base model by aligning coordinates (built-in plugin)."""

from llmforge.hookspecs import hookimpl


@hookimpl
def forge_commands(cli):
    """Add the `transfer` command to the forge group."""
    from llmforge_transfer.cli import transfer_group

    cli.add_command(transfer_group)
