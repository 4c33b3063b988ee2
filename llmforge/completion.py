"""Static shell completion scripts for ``forge`` (bash, zsh, fish), generated from the click tree.

The scripts are plain text derived from the commands, options, choices and argument types
that are loaded when the generator runs. Nothing runs Python while a user presses Tab, so
completion never imports torch, and a diff of ``completions/`` shows every command or
option that changed.

Regenerate the checked-in scripts (with all built-in plugins loaded) with::

    python -m llmforge.completion

``python -m llmforge.completion --check`` exits with status 1 when they are out of date.
"""

from __future__ import annotations

import argparse
import enum
import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import click

PROGRAM = "forge"
SHELLS = ("bash", "zsh", "fish")
SCRIPT_NAMES = {"bash": "forge.bash", "zsh": "_forge", "fish": "forge.fish"}
DEFAULT_DIRECTORY = Path(__file__).resolve().parents[1] / "completions"
SUMMARY_LENGTH = 80
# The second line of every script's header. completions/ is written with the built-in plugins
# loaded, while `forge completion SHELL` includes every plugin loaded at that moment.
GENERATED_NOTE = "Generated from the click tree of forge and its loaded plugins. Do not edit by hand."


@dataclass(frozen=True)
class ValueSpec:
    """The way a value completes, where kind is one of none, choice, file, directory or model."""

    kind: str = "none"
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class OptionSpec:
    """One option: all its names (short, long, secondary), its help summary and its values."""

    names: tuple[str, ...]
    summary: str
    nargs: int
    multiple: bool
    metavar: str
    value: ValueSpec

    @property
    def takes_value(self) -> bool:
        return self.nargs > 0


@dataclass(frozen=True)
class ArgumentSpec:
    """One positional argument. Its nargs is -1 for a variadic argument."""

    name: str
    nargs: int
    required: bool
    value: ValueSpec


@dataclass(frozen=True)
class CommandSpec:
    """A command or group. Its path starts with the program name, as in ("forge", "cache", "gc")."""

    path: tuple[str, ...]
    summary: str
    options: tuple[OptionSpec, ...]
    arguments: tuple[ArgumentSpec, ...]
    subcommands: tuple[CommandSpec, ...]

    def walk(self):
        """Yield this command and then every command below it, depth first, in name order."""
        yield self
        for subcommand in self.subcommands:
            yield from subcommand.walk()


def summarize(text: str | None) -> str:
    """Return the first sentence of a help text on one line, cut at a word to SUMMARY_LENGTH characters."""
    if not text:
        return ""

    text = text.split("\f")[0].replace("\b", "")
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", paragraph, maxsplit=1)[0].rstrip(".")
    if len(sentence) > SUMMARY_LENGTH:
        sentence = sentence[: SUMMARY_LENGTH - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return sentence


def is_model_parameter(param: click.Parameter) -> bool:
    """Tell whether a parameter takes a model reference: it is named ``model`` or ``*_model``."""
    name = param.name or ""
    return name == "model" or name.endswith("_model")


def value_spec(param: click.Parameter) -> ValueSpec:
    """Map a parameter's click type to the way its value completes."""
    if is_model_parameter(param):
        return ValueSpec("model")

    param_type = param.type
    if isinstance(param_type, click.Choice):
        names = {choice.name if isinstance(choice, enum.Enum) else str(choice) for choice in param_type.choices}
        return ValueSpec("choice", tuple(sorted(names)))
    if isinstance(param_type, click.Path):
        return ValueSpec("directory" if param_type.dir_okay and not param_type.file_okay else "file")
    if isinstance(param_type, click.File):
        return ValueSpec("file")
    return ValueSpec()


def _option_spec(option: click.Option) -> OptionSpec:
    takes_no_value = option.is_flag or option.count
    return OptionSpec(
        names=tuple(sorted(option.opts + option.secondary_opts)),
        summary=summarize(option.help),
        nargs=0 if takes_no_value else max(option.nargs, 1),
        multiple=bool(option.multiple or option.count),
        metavar=(option.name or "value").replace("_", " "),
        value=ValueSpec() if takes_no_value else value_spec(option),
    )


def _argument_spec(argument: click.Argument) -> ArgumentSpec:
    return ArgumentSpec(argument.name or "argument", argument.nargs, argument.required, value_spec(argument))


def command_spec(command: click.Command, path: tuple[str, ...] = (PROGRAM,), parent: click.Context | None = None) -> CommandSpec:
    """Walk a click command and its visible subcommands into a CommandSpec tree.

    A context is built for each command, as click does when it runs, so that settings such as
    ``help_option_names`` reach the subcommands' help options.
    """
    context = click.Context(command, info_name=path[-1], parent=parent, **command.context_settings)
    params = [param for param in command.get_params(context) if not getattr(param, "hidden", False)]
    options = [_option_spec(param) for param in params if isinstance(param, click.Option)]
    arguments = [_argument_spec(param) for param in params if isinstance(param, click.Argument)]

    subcommands = []
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(context)):
            subcommand = command.get_command(context, name)
            if subcommand is not None and not subcommand.hidden:
                subcommands.append(command_spec(subcommand, (*path, name), context))

    summary = summarize(command.short_help or command.help)
    return CommandSpec(path, summary, tuple(sorted(options, key=lambda option: option.names)), tuple(arguments), tuple(subcommands))


def render_script(command: click.Command, shell: str) -> str:
    """Return the completion script for one shell (bash, zsh or fish) from a click command tree."""
    # Imported here because completion_shells imports the spec classes from this module.
    from llmforge.completion_shells import render_bash, render_fish, render_zsh

    renderers = {"bash": render_bash, "zsh": render_zsh, "fish": render_fish}
    if shell not in renderers:
        raise ValueError(f"invalid shell {shell!r}: expected one of {', '.join(SHELLS)}")

    from llmforge.models import BUILTIN_MODELS

    return renderers[shell](command_spec(command), tuple(sorted(BUILTIN_MODELS)))


def builtin_plugin_names() -> list[str]:
    """Return the names of the ``llmforge`` entry points that the llmforge distribution itself declares."""
    names = []
    for entry_point in importlib.metadata.entry_points(group="llmforge"):
        distribution = getattr(entry_point, "dist", None)
        if distribution is not None and distribution.metadata["Name"] == "llmforge":
            names.append(entry_point.name)
    return sorted(names)


def load_builtin_cli() -> click.Command:
    """Return the ``forge`` group with only the built-in plugins loaded, for generated files.

    Restricting the plugins before llmforge.cli loads them keeps third-party plugins that
    happen to be installed out of the checked-in scripts and docs.
    """
    names = builtin_plugin_names()
    if not names:
        raise SystemExit("error: no llmforge entry points found, so no built-in plugin can load. Install the project first: pip install -e .")
    os.environ["FORGE_LOAD_PLUGINS"] = ",".join(names)
    from llmforge.cli import cli
    from llmforge.plugins import load_errors

    if load_errors:
        failed = ", ".join(f"{error.name} ({error.error})" for error in load_errors)
        raise SystemExit(f"error: built-in plugins failed to load: {failed}. Fix them, then generate the completions again.")
    return cli


def main(argv: list[str] | None = None) -> int:
    """Write the scripts into a directory, or with --check report the scripts that differ."""
    parser = argparse.ArgumentParser(prog="python -m llmforge.completion", description=main.__doc__)
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIRECTORY, help="default: %(default)s")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)

    if args.directory == DEFAULT_DIRECTORY and not (DEFAULT_DIRECTORY.parent / "pyproject.toml").is_file():
        parser.error(f"{DEFAULT_DIRECTORY.parent} is not a source checkout (no pyproject.toml); name the output directory")

    cli = load_builtin_cli()
    stale = []
    for shell in SHELLS:
        path = args.directory / SCRIPT_NAMES[shell]
        text = render_script(cli, shell)
        if path.is_file() and path.read_bytes() == text.encode("utf-8"):
            continue
        stale.append(path)
        if not args.check:
            from llmforge.checkpoint import atomic_write

            with atomic_write(path, "wb") as handle:
                handle.write(text.encode("utf-8"))

    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path}", file=sys.stderr)
    if args.check and stale:
        print("regenerate them with: python -m llmforge.completion", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
