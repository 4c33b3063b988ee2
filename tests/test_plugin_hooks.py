"""Plugin hooks: every hookimpl matches a hookspec, and FORGE_TRACE_PLUGINS traces hook calls."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pluggy
import pytest

from llmforge import hookspecs, plugins
from llmforge.completion import builtin_plugin_names
from llmforge.hookspecs import hookimpl

from conftest import FORGE, install_plugin


@pytest.fixture
def fresh_manager():
    """Make the next get_plugin_manager() call load the plugins again, and forget them afterwards."""
    plugins.reset_for_tests()
    yield
    plugins.reset_for_tests()


def run_forge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(FORGE), *args], capture_output=True, text=True, env=env, timeout=120)


# --- check_pending ------------------------------------------------------------------------------


def test_builtin_hookimpls_match_specs(fresh_manager, monkeypatch):
    names = builtin_plugin_names()
    monkeypatch.setenv("FORGE_LOAD_PLUGINS", ",".join(names))

    manager = plugins.get_plugin_manager()

    assert plugins.load_errors == []
    assert sorted(name for name, _ in manager.list_name_plugin()) == names
    assert {"finetune", "eval", "zo", "edit", "transfer"} <= set(names)
    manager.check_pending()


def test_misspelled_hookimpl_fails_check_pending(fresh_manager, monkeypatch, tmp_path):
    install_plugin(tmp_path, "forge_misspelled_plugin", """\
        from llmforge.hookspecs import hookimpl

        @hookimpl
        def forge_comands(cli):
            pass
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "forge_misspelled_plugin", raising=False)
    monkeypatch.setenv("FORGE_LOAD_PLUGINS", ",".join([*builtin_plugin_names(), "forge_misspelled_plugin"]))

    manager = plugins.get_plugin_manager()

    # pluggy registers a hookimpl without a spec, so only check_pending finds the misspelling.
    assert plugins.load_errors == []
    assert manager.has_plugin("forge_misspelled_plugin")
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'forge_comands'"):
        manager.check_pending()


# --- tracing ------------------------------------------------------------------------------------


class ZoBackends:
    @hookimpl
    def forge_zo_backends(self):
        return {"spsa": "x" * 200}


class BrokenMergeMethods:
    @hookimpl
    def forge_merge_methods(self):
        raise RuntimeError("merge methods unavailable")


def traced_manager(stream: io.StringIO) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    plugins.enable_hook_tracing(manager, stream)
    manager.register(ZoBackends(), name="backends")
    manager.register(BrokenMergeMethods(), name="broken")
    return manager


def test_trace_shows_result_shortened():
    stream = io.StringIO()

    traced_manager(stream).hook.forge_zo_backends()

    call, done = stream.getvalue().splitlines()
    assert call == "forge trace: call forge_zo_backends() plugins=backends"
    assert done.startswith("forge trace: done forge_zo_backends plugins=backends returned [{'spsa': 'xxx")
    assert done.endswith(" ms")
    assert len(done) < 160


def test_trace_shows_exception():
    stream = io.StringIO()

    with pytest.raises(RuntimeError):
        traced_manager(stream).hook.forge_merge_methods()

    done = stream.getvalue().splitlines()[1]
    assert done.startswith("forge trace: done forge_merge_methods plugins=broken raised RuntimeError: 'merge methods unavailable'")


def test_forge_plugins_traced_on_stderr(forge_env):
    env = {**forge_env, "FORGE_TRACE_PLUGINS": "1", "FORGE_LOAD_PLUGINS": ",".join(builtin_plugin_names())}

    result = run_forge("plugins", "--json", env=env)

    lines = [line for line in result.stderr.splitlines() if line.startswith("forge trace: ")]
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema"] == "llmforge.plugins/1"
    for name in builtin_plugin_names():
        assert f"forge trace: call forge_commands(cli=<ForgeGroup cli>) plugins={name}" in lines
        assert any(line.startswith(f"forge trace: done forge_commands plugins={name} returned []") for line in lines)
    assert len(lines) == 2 * len(builtin_plugin_names())


def test_no_trace_without_variable(forge_env):
    env = {**forge_env, "FORGE_TRACE_PLUGINS": "0"}

    result = run_forge("plugins", env=env)

    assert result.returncode == 0
    assert "forge trace:" not in result.stderr


def test_failing_forge_commands_skipped_and_traced(tmp_path, forge_env):
    install_plugin(tmp_path, "forge_failing_plugin", """\
        from llmforge.hookspecs import hookimpl

        @hookimpl
        def forge_commands(cli):
            import click

            cli.add_command(click.Command("half-built", callback=lambda: None))
            raise ValueError("cannot build the commands")
    """)
    env = {**forge_env, "PYTHONPATH": str(tmp_path), "FORGE_TRACE_PLUGINS": "1"}

    result = run_forge("finetune", "--help", env=env)
    listing = json.loads(run_forge("plugins", "--json", env=forge_env | {"PYTHONPATH": str(tmp_path)}).stdout)
    half_built = run_forge("half-built", env=env)

    assert result.returncode == 0, result.stderr
    assert "Usage: forge finetune" in result.stdout
    assert ("plugin 'forge_failing_plugin' failed to add its commands and is skipped: "
            "ValueError: cannot build the commands") in result.stderr
    assert ("forge trace: done forge_commands plugins=forge_failing_plugin raised ValueError: "
            "'cannot build the commands'") in result.stderr
    assert "forge_failing_plugin" not in [plugin["name"] for plugin in listing["plugins"]]
    assert [error["name"] for error in listing["errors"]] == ["forge_failing_plugin"]
    assert half_built.returncode == 2


def test_third_party_cannot_take_builtin_name(tmp_path, forge_env):
    install_plugin(tmp_path, "forge_impostor", """\
        from llmforge.hookspecs import hookimpl

        @hookimpl
        def forge_commands(cli):
            pass
    """)
    # The same module registered under the entry-point name of the built-in eval plugin.
    entry_points = tmp_path / "forge_impostor-1.0.dist-info" / "entry_points.txt"
    entry_points.write_text("[llmforge]\neval = forge_impostor\n")
    env = {**forge_env, "PYTHONPATH": str(tmp_path)}

    listing = json.loads(run_forge("plugins", "--json", env=env).stdout)
    tasks = run_forge("eval", "--list-tasks", env=env)

    assert tasks.returncode == 0, tasks.stderr
    assert "llmforge_eval" in [plugin["module"] for plugin in listing["plugins"]]
    assert [error["module"] for error in listing["errors"]] == ["forge_impostor"]
    assert "the plugin name 'eval' is taken by llmforge_eval" in listing["errors"][0]["error"]


@pytest.mark.parametrize(("returned", "message"), [
    ("[42]", "returned 42, which is not a spec dict"),
    ("['/nonexistent/spec.yaml']", "task file not found: /nonexistent/spec.yaml, returned by the forge_eval_tasks hook"),
])
def test_bad_eval_tasks_named_by_plugin(tmp_path, forge_env, returned, message):
    install_plugin(tmp_path, "forge_bad_tasks", f"""\
        from llmforge.hookspecs import hookimpl

        @hookimpl
        def forge_eval_tasks():
            return {returned}
    """)
    env = {**forge_env, "PYTHONPATH": str(tmp_path)}

    result = run_forge("eval", "--list-tasks", env=env)

    assert result.returncode == 1
    assert message in result.stderr
    assert "plugin forge_bad_tasks" in result.stderr
    assert "Traceback" not in result.stderr
