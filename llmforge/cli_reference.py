"""The command-line reference (docs/cli.md), generated from the ``--help`` text of every command.

Each command's help is rendered at a fixed width with only the built-in plugins loaded, so the
page is the same on every machine and a diff of it shows every changed option or help text.
Regenerate it with::

    python -m llmforge.cli_reference

``python -m llmforge.cli_reference --check`` exits with status 1 when the page is out of date;
the test suite runs that check, so CI fails on drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

WIDTH = 100
DEFAULT_PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
REGENERATE = "python -m llmforge.cli_reference"

INTRODUCTION = f"""\
# Command-line reference

Generated from `forge ... --help` with the built-in plugins loaded; do not edit by hand.
Regenerate with `{REGENERATE}` (CI fails when this page is out of date).
Commands added by third-party plugins or external `forge-NAME` programs are not listed here.
"""


def walk_commands(command: click.Command, path: tuple[str, ...] = ("forge",)):
    """Yield (path, command) for `command` and every subcommand, depth first, subcommands sorted by name."""
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from walk_commands(command.commands[name], path + (name,))


def help_text(cli: click.Command, path: tuple[str, ...]) -> str:
    """Render the ``--help`` text of the command at `path` as a terminal of WIDTH columns would show it."""
    from llmforge.cli import LIST_EXTERNALS

    settings = {**cli.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    context = click.Context(cli, info_name=path[0], **settings)
    context.meta[LIST_EXTERNALS] = False  # the programs on this machine's PATH are not part of forge
    command = cli
    for name in path[1:]:
        command = command.commands[name]
        context = click.Context(command, info_name=name, parent=context, terminal_width=WIDTH, max_content_width=WIDTH)
    return command.get_help(context)


def render_reference(cli: click.Command) -> str:
    """Return the whole reference page: a contents list, then one section per command."""
    commands = list(walk_commands(cli))
    contents = [f"- [`{' '.join(path)}`](#{'-'.join(path)})" for path, _ in commands]
    sections = []
    for path, _ in commands:
        sections.append(f"## {' '.join(path)}\n\n```text\n{help_text(cli, path).rstrip()}\n```\n")
    return "\n".join([INTRODUCTION, *contents, "", *sections])


def main(argv: list[str] | None = None) -> int:
    """Write the reference page, or with --check report whether it differs from the commands."""
    parser = argparse.ArgumentParser(prog=REGENERATE, description=main.__doc__)
    parser.add_argument("page", nargs="?", type=Path, default=DEFAULT_PAGE, help="default: %(default)s")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)

    from llmforge.completion import load_builtin_cli

    text = render_reference(load_builtin_cli())
    current = args.page.read_text(encoding="utf-8") if args.page.is_file() else None
    if current == text:
        return 0
    if args.check:
        print(f"out of date: {args.page}; regenerate it with: {REGENERATE}", file=sys.stderr)
        return 1

    from llmforge.checkpoint import atomic_write

    with atomic_write(args.page, "wb") as handle:
        handle.write(text.encode("utf-8"))
    print(f"wrote: {args.page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
