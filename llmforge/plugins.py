"""The plugin manager: loads built-in and third-party plugins from the ``llmforge`` entry points.

A plugin that fails to import or register is recorded in ``load_errors``, and the CLI reports
it on stderr. The other plugins and commands keep working. ``FORGE_LOAD_PLUGINS`` (a comma
list of entry-point names) restricts which plugins load; set to an empty string, none load.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field

import pluggy

from llmforge import hookspecs

ENTRY_POINT_GROUP = "llmforge"


@dataclass
class PluginInfo:
    """The description of one loaded plugin, as ``forge plugins`` prints it."""

    name: str
    module: str
    version: str | None
    hooks: list[str] = field(default_factory=list)


@dataclass
class LoadError:
    """A plugin that could not be imported or registered, with the error text."""

    name: str
    module: str
    error: str


_manager: pluggy.PluginManager | None = None
_versions: dict[str, str | None] = {}
load_errors: list[LoadError] = []


def _selected_names() -> set[str] | None:
    raw = os.environ.get("FORGE_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _distribution_version(entry_point: importlib.metadata.EntryPoint) -> str | None:
    distribution = getattr(entry_point, "dist", None)
    return distribution.version if distribution is not None else None


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading the entry-point plugins on first use."""
    global _manager
    if _manager is not None:
        return _manager

    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    selected = _selected_names()

    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if selected is not None and entry_point.name not in selected:
            continue
        try:
            module = entry_point.load()
            manager.register(module, name=entry_point.name)
        except Exception as error:  # a broken plugin must not take the others down
            load_errors.append(LoadError(entry_point.name, entry_point.value, f"{type(error).__name__}: {error}"))
            continue
        _versions[entry_point.name] = _distribution_version(entry_point)

    _manager = manager
    return manager


def loaded_plugins() -> list[PluginInfo]:
    """Describe every registered plugin: entry-point name, module, distribution version and hooks."""
    manager = get_plugin_manager()
    infos = []
    for name, plugin in manager.list_name_plugin():
        hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
        infos.append(PluginInfo(name, getattr(plugin, "__name__", repr(plugin)), _versions.get(name), hooks))
    return sorted(infos, key=lambda info: info.name)


def reset_for_tests() -> None:
    """Forget the loaded plugins so the next ``get_plugin_manager`` call loads them again."""
    global _manager
    _manager = None
    load_errors.clear()
    _versions.clear()
