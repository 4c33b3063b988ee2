"""The plugin API: the hooks a forge plugin may implement.

A plugin is a module registered under the entry-point group ``llmforge``. It marks its
functions with ``hookimpl`` and implements any subset of the hooks below. The built-in
commands are plugins too and use nothing that a third-party plugin cannot use.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "llmforge"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def forge_commands(cli):
    """Add click commands or groups to the ``forge`` group ``cli`` with ``cli.add_command``.

    Import heavy libraries (torch, transformers) inside the command functions, not at module
    import, so that ``forge --help`` stays fast.
    """


@hookspec
def forge_model_sources():
    """Return a list of ``llmforge.models.ModelSource`` objects.

    Each source has a ``name`` and a ``resolve(reference, cache) -> Path | None`` callable that
    returns a Hugging Face model directory for references it recognises and ``None`` for the
    rest. Sources are asked before the built-in path rules, in pluggy's call order (the
    plugin registered last first); the first path returned wins.
    """


@hookspec
def forge_eval_tasks():
    """Return evaluation task definitions: spec dicts, or paths to YAML or JSON spec files."""


@hookspec
def forge_merge_methods():
    """Return task-vector merge methods as a mapping of method name to callable."""


@hookspec
def forge_zo_backends():
    """Return zeroth-order scoring backends as a mapping of backend name to factory."""
