"""forge edit: task vectors, merges, and SAE-guided layer selection (built-in plugin)."""

from llmforge.hookspecs import hookimpl


@hookimpl
def forge_commands(cli):
    """Add the `edit` command group to the forge group."""
    from llmforge_edit.cli import edit_group

    cli.add_command(edit_group)


@hookimpl
def forge_merge_methods():
    """Register the built-in merge methods: task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune."""
    from llmforge_edit.merge_methods import BUILTIN_MERGE_METHODS

    return dict(BUILTIN_MERGE_METHODS)
