"""The plugin manager: loads built-in and third-party plugins from the ``llmforge`` entry points.

A plugin that fails to import or register is recorded in ``load_errors``, and the CLI reports
it on stderr. The other plugins and commands keep working. ``FORGE_LOAD_PLUGINS`` (a comma
list of entry-point names) restricts which plugins load; set to an empty string, none load.
``FORGE_TRACE_PLUGINS=1`` prints every hook call and its result on stderr.
"""

from __future__ import annotations

import importlib.metadata
import os
import reprlib
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pluggy

from llmforge import hookspecs

ENTRY_POINT_GROUP = "llmforge"
TRACE_VARIABLE = "FORGE_TRACE_PLUGINS"
SELECT_VARIABLE = "FORGE_LOAD_PLUGINS"


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
    raw = os.environ.get(SELECT_VARIABLE)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _distribution_version(entry_point: importlib.metadata.EntryPoint) -> str | None:
    distribution = getattr(entry_point, "dist", None)
    return distribution.version if distribution is not None else None


def _ordered_entry_points() -> list[importlib.metadata.EntryPoint]:
    """Return the plugin entry points, llmforge's own first, so that no other package can take a built-in's name."""
    entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

    def is_third_party(entry_point: importlib.metadata.EntryPoint) -> bool:
        distribution = getattr(entry_point, "dist", None)
        return distribution is None or distribution.metadata["Name"] != hookspecs.PROJECT_NAME

    return sorted(entry_points, key=is_third_party)


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading the entry-point plugins on first use."""
    global _manager
    if _manager is not None:
        return _manager

    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_VARIABLE, "") not in ("", "0"):
        enable_hook_tracing(manager)
    selected = _selected_names()

    entry_points = _ordered_entry_points()
    for name in sorted((selected or set()) - {entry_point.name for entry_point in entry_points}):
        load_errors.append(LoadError(name, "-", f"{SELECT_VARIABLE} names {name!r}, but no installed plugin has that "
                                                "name; see `forge plugins` without it for the installed names"))
    for entry_point in entry_points:
        if selected is not None and entry_point.name not in selected:
            continue
        if manager.has_plugin(entry_point.name):
            owner = manager.get_plugin(entry_point.name)
            load_errors.append(LoadError(entry_point.name, entry_point.value,
                                         f"the plugin name {entry_point.name!r} is taken by {owner.__name__}; "
                                         "rename this entry point"))
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


def _short_repr(value: object) -> str:
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = 60
    shortener.maxlist = shortener.maxdict = 4
    return shortener.repr(value)


def enable_hook_tracing(manager: pluggy.PluginManager, stream=None) -> None:
    """Write a line on ``stream`` (default stderr) before and after every hook call of ``manager``.

    The first line names the hook, the plugins whose implementations run and the keyword
    arguments. The second line gives the result or the exception, and the time the call took.
    """

    def write(line: str) -> None:
        print(line, file=stream or sys.stderr, flush=True)

    started: list[float] = []

    def before(hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, object]) -> None:
        plugins = ",".join(impl.plugin_name for impl in hook_impls) or "-"
        arguments = ", ".join(f"{key}={_short_repr(value)}" for key, value in kwargs.items())
        write(f"forge trace: call {hook_name}({arguments}) plugins={plugins}")
        started.append(time.perf_counter())

    def after(outcome, hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, object]) -> None:
        milliseconds = (time.perf_counter() - started.pop()) * 1000
        plugins = ",".join(impl.plugin_name for impl in hook_impls) or "-"
        if outcome.exception is not None:
            ending = f"raised {type(outcome.exception).__name__}: {_short_repr(str(outcome.exception))}"
        else:
            ending = f"returned {_short_repr(outcome.get_result())}"
        write(f"forge trace: done {hook_name} plugins={plugins} {ending} in {milliseconds:.1f} ms")

    manager.add_hookcall_monitoring(before, after)


def skip_plugin(name: str, error: str) -> None:
    """Unregister the plugin `name` after one of its hooks failed, and record it as failed to load."""
    manager = get_plugin_manager()
    plugin = manager.unregister(name=name)
    module = getattr(plugin, "__name__", repr(plugin))
    load_errors.append(LoadError(name, module, error))


def plugin_hook_callers(hook_name: str) -> list[tuple[str, pluggy.HookCaller]]:
    """Return (plugin name, caller) pairs that call one plugin's implementation of ``hook_name`` each.

    The pairs come in registration order. Calling the plugins one at a time lets the caller
    skip a plugin whose implementation raises and still run the others, and the calls still go
    through pluggy, so tracing shows them.
    """
    manager = get_plugin_manager()
    hook = getattr(manager.hook, hook_name)
    implementers = {impl.plugin for impl in hook.get_hookimpls()}
    callers = []
    for name, plugin in manager.list_name_plugin():
        if plugin in implementers:
            callers.append((name, manager.subset_hook_caller(hook_name, implementers - {plugin})))
    return callers


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
