"""External commands: an executable ``forge-NAME`` on ``PATH`` runs as ``forge NAME ARGS...``.

forge looks an external up only after no built-in or plugin command matched NAME, so an external
can never replace a loaded command. The arguments after NAME reach the external unchanged,
``--help`` included. The external inherits stdin, stdout and stderr, and forge exits with its
exit status, or with 128 + N when signal N killed it. Two variables are added to the environment
that the external receives:

``FORGE_CACHE``
    The absolute path of the cache root that forge itself uses (``$FORGE_CACHE``, else the
    platform cache directory), so the external can share the cache.
``FORGE_EXECUTABLE``
    The absolute path of the ``forge`` script that is running, so the external can call forge
    back with the same installation. It is left unset when forge cannot find its own script.

Only POSIX systems are supported, like the cache (which needs ``fcntl``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import click

from llmforge.errors import ForgeError

PREFIX = "forge-"
# Signals that forge passes on to a running external. SIGINT is not among them, because Ctrl-C
# in a terminal already reaches every process of the foreground process group.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@dataclass
class External:
    """One ``forge-NAME`` file found on PATH, as ``forge plugins`` lists it.

    ``shadowed`` is true when a built-in or plugin command has the same name, and
    ``executable`` is false for a file without execute permission. Either one means that
    ``forge NAME`` never runs this file.
    """

    name: str
    path: str
    executable: bool
    shadowed: bool = False


def _path_directories() -> list[str]:
    # An empty PATH entry means the current directory to a POSIX shell. forge skips such
    # entries, so a forge-NAME file in whatever directory the user is in never runs.
    return [directory for directory in os.environ.get("PATH", "").split(os.pathsep) if directory]


def _is_executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_external(name: str) -> str | None:
    """Return the absolute path of the first executable ``forge-NAME`` on PATH, or None."""
    if not name or name.startswith("-") or "/" in name or "\0" in name:
        return None

    for directory in _path_directories():
        candidate = os.path.join(directory, PREFIX + name)
        if _is_executable_file(candidate):
            return os.path.abspath(candidate)
    return None


def scan_externals(taken: set[str] | frozenset[str] = frozenset()) -> list[External]:
    """List every ``forge-NAME`` file on PATH, one per NAME, sorted by NAME.

    For each NAME the entry is the file that ``forge NAME`` would run: the first executable
    one in PATH order. When no file of that name is executable, the first one is listed with
    ``executable`` false. Names in ``taken`` (the loaded commands) are marked ``shadowed``.
    """
    found: dict[str, External] = {}
    for directory in _path_directories():
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:  # a PATH entry that is missing or unreadable is skipped, as shells do
            continue
        for entry in entries:
            name = entry.name[len(PREFIX):]
            if not entry.name.startswith(PREFIX) or not name or not os.path.isfile(entry.path):
                continue
            if name in found and found[name].executable:
                continue
            executable = os.access(entry.path, os.X_OK)
            if name not in found or executable:
                found[name] = External(name, os.path.abspath(entry.path), executable, name in taken)
    return [found[name] for name in sorted(found)]


def forge_executable() -> str | None:
    """Return the absolute path of the running ``forge`` script, or None when it cannot be found.

    The console script is ``sys.argv[0]`` when forge was started as ``forge``. Otherwise (for
    example under click's CliRunner) the script that pip installs next to the interpreter is used.
    """
    candidates = [str(Path(sys.executable).parent / "forge")]
    if sys.argv and Path(sys.argv[0]).name == "forge":
        candidates.insert(0, sys.argv[0])

    for candidate in candidates:
        if _is_executable_file(candidate):
            return os.path.abspath(candidate)
    return None


def external_environment() -> dict[str, str]:
    """Return the environment for an external: forge's own plus FORGE_CACHE and FORGE_EXECUTABLE."""
    from llmforge.cache import default_cache_root

    environment = dict(os.environ)
    environment["FORGE_CACHE"] = os.path.abspath(default_cache_root())
    executable = forge_executable()
    if executable is not None:
        environment["FORGE_EXECUTABLE"] = executable
    else:
        environment.pop("FORGE_EXECUTABLE", None)
    return environment


def run_external(path: str, args: list[str]) -> int:
    """Run the external at ``path`` with ``args``, wait for it and return forge's exit status.

    While it runs, forge ignores SIGINT (the external receives Ctrl-C from the terminal itself
    and decides what to do) and passes SIGTERM and SIGHUP on to it. Python handlers, unlike
    SIG_IGN, are reset to the default when the external starts, so the external starts with the
    default signal dispositions.
    """
    process: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        if process is not None and process.poll() is None:
            process.send_signal(signum)

    handlers = {signal.SIGINT: lambda signum, frame: None, **{signum: forward for signum in FORWARDED_SIGNALS}}
    # signal.signal works only in the main thread; elsewhere the external runs with forge's handlers.
    if threading.current_thread() is not threading.main_thread():
        handlers = {}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        process = subprocess.Popen([path, *args], env=external_environment())
        returncode = process.wait()
    except OSError as error:
        raise ForgeError(
            f"failed to run the external command {path}: {error.strerror or error}; "
            "check that it is executable and that its #! line names an installed interpreter"
        ) from error
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    # A negative return code is the number of the signal that killed the external.
    return 128 - returncode if returncode < 0 else returncode


class ExternalCommand(click.Command):
    """A click command that runs a ``forge-NAME`` executable with the arguments left unparsed."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name, help=f"Run the external command {path}.", add_help_option=False)
        self.path = path

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # No click parsing: options such as --help and the "--" separator reach the external as typed.
        ctx.args = list(args)
        return []

    def invoke(self, ctx: click.Context):
        ctx.exit(run_external(self.path, ctx.args))


def external_command(name: str) -> ExternalCommand | None:
    """Return a command that runs ``forge-NAME`` from PATH, or None when there is none."""
    path = find_external(name)
    return ExternalCommand(name, path) if path is not None else None
