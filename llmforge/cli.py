"""The ``forge`` command: a click group whose commands come from plugins.

The core adds only what manages the core itself: ``plugins``, ``models``, ``cache`` and
``completion``.
Everything else (``finetune``, ``eval``, ...) is added by plugins through ``forge_commands``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import warnings
from typing import Callable

import click

from llmforge import __version__
from llmforge.errors import ForgeError
from llmforge.plugins import get_plugin_manager, load_errors, loaded_plugins, plugin_hook_callers, skip_plugin
from llmforge.terminal import echo_error

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# Context meta key: set to False to leave the forge-NAME programs on PATH out of `forge --help`.
LIST_EXTERNALS = "llmforge.list_externals"


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so that a plain `kill` unwinds like Ctrl-C and cleanup code runs.

    It subclasses KeyboardInterrupt because the atomic writers and partial directories already
    remove their temporary files on KeyboardInterrupt.
    """


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


# Context meta key of the resume hint that an interrupted command prints; see set_resume_hint.
RESUME_HINT = "llmforge.resume_hint"


def set_resume_hint(hint: str | Callable[[], str | None] | None) -> None:
    """Set the hint that the current command prints after "Interrupted." or "Terminated." to say how a rerun resumes.

    A command that writes output calls this before its work starts. The hint names what a rerun
    reuses, such as cached scores or a saved state. A callable runs at the interrupt, so that the
    hint can depend on what the run saved by then. It may return None to print nothing.
    """
    click.get_current_context().meta[RESUME_HINT] = hint


def partial_run_hint(output: str | os.PathLike, *, saves: bool) -> Callable[[], str]:
    """Return a resume hint for a run that keeps its state in OUTPUT.partial/ (``state-*`` entries).

    `saves` is True when the command line requests saved states at all (such as with --save-every).
    """
    from llmforge.checkpoint import partial_directory

    def hint() -> str:
        partial = partial_directory(output)
        states = sorted(partial.glob("state-*")) if partial.is_dir() else []
        if states:
            step = states[-1].name.split(".")[0].removeprefix("state-").lstrip("0") or "0"
            return (f"The state of step {step} is saved in {partial}; rerun the same command with --resume "
                    "to continue from it.")
        if partial.is_dir():
            return (f"{partial} contains no saved state yet; rerun the command with --overwrite and without "
                    "--resume to start over.")
        if saves:
            return "No state was saved before the interrupt, so a rerun of the same command starts over."
        return "Nothing was saved, so a rerun starts over; add --save-every N to make a run resumable."

    return hint


def _resume_hint(ctx: click.Context) -> str | None:
    hint = ctx.meta.get(RESUME_HINT)
    if not callable(hint):
        return hint
    try:
        return hint()
    except OSError:  # the hints only read directory listings; a failure must not replace the interrupt message
        return None


def _end_on_closed_stdout(ctx: click.Context) -> None:
    """Exit 0 after the reader of stdout went away (`forge ... | head`), without a message.

    Whether a write still hit the closed pipe depends on timing, so the status is 0 either way: a
    pipeline under `set -o pipefail` must not fail at random. stdout is pointed at /dev/null so
    that the final flush at exit cannot fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    ctx.exit(0)


class ForgeGroup(click.Group):
    """A click group that turns ForgeError into ``Error: ...`` on stderr and exit status 1.

    A name that matches no loaded command runs the executable ``forge-NAME`` from PATH, if there
    is one (see llmforge.externals). Loaded commands always take precedence.
    """

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        from llmforge.externals import external_command

        return external_command(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_commands(ctx, formatter)
        if not ctx.meta.get(LIST_EXTERNALS, True):
            return
        from llmforge.externals import scan_externals

        # Only the externals that `forge NAME` would run; `forge plugins` lists the others too.
        externals = [external for external in scan_externals(set(self.commands))
                     if external.executable and not external.shadowed]
        if not externals:
            return
        width = max(len(external.name) for external in externals)
        with formatter.section("External commands (forge-NAME on PATH)"):
            # Written without write_dl, which wraps long paths at their hyphens.
            for external in externals:
                formatter.write(f"{'':{formatter.current_indent}}{external.name:<{width}}  {external.path}\n")

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ForgeError as error:
            if ctx.find_root().params.get("debug"):
                raise
            echo_error(str(error), sys.stderr)
            ctx.exit(1)
        except KeyboardInterrupt as interrupt:
            # 128 + the signal number, the shell convention: 130 for Ctrl-C (SIGINT), 143 for SIGTERM.
            terminated = isinstance(interrupt, Terminated)
            click.echo("Terminated." if terminated else "Interrupted.", err=True)
            hint = _resume_hint(ctx)
            if hint:
                click.echo(hint, err=True)
            ctx.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))
        except OSError as error:
            # The user can fix file system failures such as a parent path that is a file, a missing
            # permission or a full disk, so name the path instead of printing a traceback.
            if isinstance(error, BrokenPipeError):
                _end_on_closed_stdout(ctx)
            if ctx.find_root().params.get("debug"):
                raise
            where = f": {error.filename}" if error.filename else ""
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                advice = "free space on that file system or write the output elsewhere"
            else:
                advice = "check the path and its permissions"
            message = f"{error.strerror or error}{where}; {advice}"
            echo_error(message, sys.stderr)
            ctx.exit(1)


def silence_progress_bars() -> None:
    """Turn off the progress bars of transformers and huggingface_hub (GGUF conversion, weight loading).

    Commands call this for --quiet before they load a model.
    """
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    else:
        # Read when transformers is imported; cheaper than importing it when nothing is loaded.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # The GGUF conversion in transformers draws a plain tqdm bar, which only tqdm's own switch turns
    # off. tqdm reads TQDM_* variables when it is imported, and commands import it lazily.
    # NOTE: a plugin that imports tqdm at its top level keeps that bar on under --quiet.
    os.environ["TQDM_DISABLE"] = "1"


def parse_columns(values: tuple[str, ...]) -> dict[str, str]:
    """Parse repeated FIELD=NAME options into {FIELD: NAME}."""
    columns = {}
    for value in values:
        target, separator, source = value.partition("=")
        if not separator or not target.strip() or not source.strip():
            raise ForgeError(f"invalid --column {value!r}; use FIELD=NAME, for example prompt=question")
        columns[target.strip()] = source.strip()
    return columns


def unescape_template(ctx, param, value: str | None) -> str | None:
    """Turn the escapes \\n and \\t typed in a shell into a newline and a tab."""
    if value is None:
        return None
    return value.replace("\\n", "\n").replace("\\t", "\t")


def print_json(document) -> None:
    """Write one JSON document on stdout, the form every ``--json`` option uses."""
    click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))


@click.group(cls=ForgeGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="forge")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow model weights stored as pickle files (.bin, .pt); they are read with weights_only loading.")
def cli(debug: bool, allow_pickle: bool) -> None:
    """Adapt language models: fine-tune them and evaluate what they learned and what they kept.

    Models are named by one reference everywhere: a built-in name (see `forge models`), a Hugging
    Face model directory, a .gguf file, or a PEFT adapter directory. Computed tensors are shared
    between commands through one cache ($FORGE_CACHE, see `forge cache`).
    """
    if allow_pickle:
        os.environ["FORGE_ALLOW_PICKLE"] = "1"


@cli.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def plugins_command(as_json: bool) -> None:
    """List the loaded plugins with their versions and hooks, and the plugins that failed to load.

    Also list the external commands: executables named forge-NAME on PATH, which run as
    `forge NAME ARGS...`. An external whose NAME is taken by a loaded command is marked
    "shadowed", and a forge-NAME file without execute permission "not executable". Neither runs.
    """
    from llmforge.externals import scan_externals

    plugins = [vars(info) for info in loaded_plugins()]
    errors = [vars(error) for error in load_errors]
    externals = [vars(external) for external in scan_externals(set(cli.commands))]
    if as_json:
        print_json({"schema": "llmforge.plugins/1", "plugins": plugins, "errors": errors, "externals": externals})
        return
    for info in plugins:
        click.echo(f"{info['name']:<12} {info['version'] or '-':<10} {info['module']:<22} hooks: {', '.join(info['hooks'])}")
    for error in errors:
        click.echo(f"{error['name']:<12} FAILED     {error['module']:<22} {error['error']}")
    for external in externals:
        flags = []
        if external["shadowed"]:
            flags.append(f"shadowed by the command {external['name']!r}")
        if not external["executable"]:
            flags.append("not executable")
        note = f"  ({'; '.join(flags)}; never runs)" if flags else ""
        click.echo(f"{external['name']:<12} external   {external['path']}{note}")


@cli.command(name="models")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def models_command(as_json: bool) -> None:
    """List the built-in models, whether their package is installed, and whether a converted copy is cached."""
    from llmforge.models import describe_builtin_models

    rows = describe_builtin_models()
    if as_json:
        print_json({"schema": "llmforge.models/1", "models": rows})
        return
    for row in rows:
        installed = "installed" if row["installed"] else "not installed"
        cached = "cached" if row["cached"] else "not cached"
        click.echo(f"{row['name']:<14} {installed:<14} {cached:<11} {row['description']}")
        if not row["installed"]:
            click.echo(f"{'':<14} install with: {row['install']}")


@cli.command(name="completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_command(shell: str) -> None:
    """Print the completion script for SHELL, built from the commands loaded now.

    \b
    bash: forge completion bash > ~/.local/share/bash-completion/completions/forge
    zsh:  forge completion zsh > ~/.zfunc/_forge   (with ~/.zfunc on $fpath before compinit)
    fish: forge completion fish > ~/.config/fish/completions/forge.fish
    """
    from llmforge.completion import render_script

    click.echo(render_script(cli, shell), nl=False)


def _register_plugin_commands() -> None:
    for name, error in [(e.name, e.error) for e in load_errors]:
        click.echo(f"forge: plugin {name!r} failed to load and is skipped: {error}", err=True)
    for plugin_name, hook in plugin_hook_callers("forge_commands"):
        before = dict(cli.commands)
        try:
            hook(cli=cli)
        except Exception as error:  # one broken plugin must not break the other commands
            # Skipped means skipped: drop what it added before it raised, and list it as failed.
            cli.commands.clear()
            cli.commands.update(before)
            skip_plugin(plugin_name, f"{type(error).__name__}: {error}")
            click.echo(f"forge: plugin {plugin_name!r} failed to add its commands and is skipped: "
                       f"{type(error).__name__}: {error}", err=True)


def _add_core_groups() -> None:
    from llmforge.cache_cli import cache_group

    cli.add_command(cache_group)


_add_core_groups()
get_plugin_manager()
_register_plugin_commands()


def main() -> None:
    """Run ``forge``; a closed stdout (``forge ... | head``) ends the program quietly.

    SIGTERM is turned into an exception, so temporary outputs are removed as on Ctrl-C, and the
    exit status is 143. SIGKILL cannot be caught and leaves them behind.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)
    # transformers 5.x warns about its own deprecated attribute whenever a model is loaded. The user
    # cannot act on it, and it would put text on stderr under --quiet.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        cli.main(prog_name="forge")
    except BrokenPipeError:
        # A closed stdout outside a command (in click's own help or usage output).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
