"""Output conventions of every command: --json with a schema version, --quiet, colour rules, broken pipes."""

from __future__ import annotations

import json
import re
import subprocess

import click
import pytest

from conftest import FORGE

SCHEMA = re.compile(r"^llmforge\.[a-z0-9_.-]+/\d+$")
ANSI = "\x1b["
# Commands that print no progress bars or log lines, so --quiet would have nothing to silence.
SILENT_COMMANDS = {"forge cache gc", "forge cache info", "forge cache ls", "forge cache rm", "forge cache verify",
                   "forge models", "forge plugins", "forge edit sae info", "forge completion"}


def runnable_commands() -> dict[str, click.Command]:
    """Every command that does work: the leaves, and groups such as `forge eval` that run without a subcommand."""
    from llmforge.cli import cli
    from llmforge.cli_reference import walk_commands

    return {" ".join(path): command for path, command in walk_commands(cli)
            if not isinstance(command, click.Group) or command.invoke_without_command}


def option_names(command: click.Command) -> set[str]:
    return {name for parameter in command.params for name in getattr(parameter, "opts", [])}


def forge_json(*args, env) -> dict:
    result = subprocess.run([str(FORGE), *map(str, args), "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_command_offers_json_and_quiet():
    commands = runnable_commands()
    assert {"forge finetune", "forge zo", "forge edit merge", "forge transfer", "forge eval"} <= set(commands)

    without_json = sorted(path for path, command in commands.items() if "--json" not in option_names(command))
    without_quiet = sorted(path for path, command in commands.items()
                           if path not in SILENT_COMMANDS and "--quiet" not in option_names(command))

    # `forge completion` prints a shell script, which has no JSON form.
    assert without_json == ["forge completion"]
    assert without_quiet == []


def test_core_json_documents_carry_a_schema(forge_env):
    documents = {
        "plugins": forge_json("plugins", env=forge_env),
        "models": forge_json("models", env=forge_env),
        "cache ls": forge_json("cache", "ls", env=forge_env),
        "eval --list-tasks": forge_json("eval", "--list-tasks", env=forge_env),
        "cache verify": forge_json("cache", "verify", env=forge_env),
        "cache gc": forge_json("cache", "gc", "--dry-run", env=forge_env),
    }

    for name, document in documents.items():
        assert SCHEMA.match(document.get("schema", "")), f"forge {name} --json has no schema version: {document}"


def test_edit_and_transfer_json_documents_carry_a_schema(tmp_path, tiny_model_dir, forge_env):
    from test_edit_vectors import save_llama

    tuned = save_llama(tmp_path / "tuned", tiny_model_dir, seed=7)
    forge_env["OMP_NUM_THREADS"] = "1"
    vector = tmp_path / "tv.safetensors"

    documents = {
        "edit diff": forge_json("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned, "-o", vector, "--quiet",
                                env=forge_env),
        "edit merge": forge_json("edit", "merge", "--base", tiny_model_dir, "--vector", f"{vector}:weight=0.5",
                                 "-o", tmp_path / "merged", "--quiet", env=forge_env),
        "transfer make-test-target": forge_json("transfer", "make-test-target", "--model", tiny_model_dir,
                                                "-o", tmp_path / "rotated", "--quiet", env=forge_env),
        "transfer": forge_json("transfer", "--source-base", tiny_model_dir, "--target-base", tmp_path / "rotated",
                               "--vector", vector, "--align", "naive", "-o", tmp_path / "moved", "--quiet",
                               env=forge_env),
    }

    for name, document in documents.items():
        assert SCHEMA.match(document.get("schema", "")), f"forge {name} --json has no schema version"
    assert json.loads((tmp_path / "merged" / "forge_run.json").read_text())["schema"] == documents["edit merge"]["schema"]


def test_closed_stdout_ends_quietly(forge_env):
    # The reader goes away before forge writes, as `head` does after its first lines.
    process = subprocess.Popen([str(FORGE), "models", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=forge_env)
    process.stdout.close()

    stderr = process.stderr.read().decode()
    status = process.wait(timeout=120)

    assert status == 0
    assert stderr == ""


@pytest.mark.parametrize(("variables", "coloured"), [
    ({}, False),
    ({"FORCE_COLOR": "1"}, True),
    ({"FORCE_COLOR": "0"}, False),
    ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, True),
    ({"NO_COLOR": "1"}, False),
])
def test_error_label_colour_rules(variables, coloured, forge_env):
    env = {name: value for name, value in forge_env.items() if name not in ("FORCE_COLOR", "NO_COLOR")}
    env.update(variables)

    result = subprocess.run([str(FORGE), "cache", "rm", "../outside"], capture_output=True, text=True, env=env,
                            timeout=120)

    assert result.returncode == 1
    assert (ANSI in result.stderr) is coloured
    assert "Error:" in result.stderr
    assert ANSI not in result.stdout


def test_colour_needs_a_terminal(monkeypatch):
    from llmforge.terminal import color_enabled

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert color_enabled(Terminal()) is True
    monkeypatch.setenv("TERM", "dumb")
    assert color_enabled(Terminal()) is False
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("NO_COLOR", "1")
    assert color_enabled(Terminal()) is False
