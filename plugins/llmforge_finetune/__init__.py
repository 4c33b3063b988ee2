"""forge finetune: parameter-efficient fine-tuning (built-in plugin)."""

from llmforge.hookspecs import hookimpl


@hookimpl
def forge_commands(cli):
    """Add the `finetune` command to the forge group."""
    from llmforge_finetune.cli import finetune_command

    cli.add_command(finetune_command)
