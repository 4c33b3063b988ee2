"""The `forge edit` group; each subcommand lives in its own module and is a thin layer over plain functions."""

from __future__ import annotations

import click


@click.group(name="edit")
def edit_group() -> None:
    """Edit models with task vectors: compute them, merge them, and choose layers with sparse autoencoders."""


def _add_subcommands() -> None:
    # Each subcommand module imports only click at import time, so `forge --help` stays fast.
    from llmforge_edit.sae_cli import sae_group
    from llmforge_edit.select_cli import apply_command, layers_command
    from llmforge_edit.vectors_cli import diff_command, merge_command

    edit_group.add_command(diff_command)
    edit_group.add_command(merge_command)
    edit_group.add_command(sae_group)
    edit_group.add_command(layers_command)
    edit_group.add_command(apply_command)


_add_subcommands()
