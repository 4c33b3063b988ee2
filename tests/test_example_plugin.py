"""The example third-party plugin in plugins/examples/forge-tokens, installed as a user would install it.

pip builds the example from a copy of its source and installs it offline (no index, no build
isolation, so the environment's setuptools builds it) into a temporary target directory. The
`forge` script of this environment then runs with that directory on PYTHONPATH, so the plugin
is found through its entry point and the environment itself is left unchanged.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FORGE

EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "examples" / "forge-tokens"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> tuple[Path, Path]:
    """Copy the example's source and pip-install the copy into a target directory; return (target, copy)."""
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "forge-tokens"
    # The build writes build/ and *.egg-info into the source tree, so it runs on a copy.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    target = root / "site-packages"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--no-cache-dir", "--quiet", "--target", str(target), str(source)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    return target, source


@pytest.fixture
def plugin_env(forge_env, installed_example) -> dict[str, str]:
    """The environment of a `forge` subprocess that finds the installed example through PYTHONPATH."""
    target, _ = installed_example
    env = dict(forge_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_forge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(FORGE), *args], capture_output=True, text=True, env=env, timeout=300)


def qa_token_count(tokenizer, records: list[dict]) -> tuple[int, int]:
    """Count (prompt, completion) tokens of question/answer records as forge finetune's default templates build them."""
    prompt_tokens = completion_tokens = 0
    for record in records:
        prompt_tokens += len(tokenizer(f"Question: {record['question']}\nAnswer:")["input_ids"])
        # The completion gets EOS appended.
        completion_tokens += len(tokenizer(f" {record['answer']}", add_special_tokens=False)["input_ids"]) + 1
    return prompt_tokens, completion_tokens


def test_pip_install_into_target(installed_example):
    target, _ = installed_example
    entry_points = (target / "forge_tokens-0.1.0.dist-info" / "entry_points.txt").read_text()

    assert "[llmforge]\ntokens = forge_tokens" in entry_points
    assert (target / "forge_tokens" / "tasks" / "plurals.yaml").is_file()
    assert (target / "forge_tokens" / "tasks" / "plurals.jsonl").is_file()
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("forge-tokens")  # the test environment itself has no copy


def test_plugins_lists_example(plugin_env):
    result = run_forge("plugins", "--json", env=plugin_env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)

    plugins = {plugin["name"]: plugin for plugin in document["plugins"]}
    assert plugins["tokens"] == {"name": "tokens", "module": "forge_tokens", "version": "0.1.0",
                                 "hooks": ["forge_commands", "forge_eval_tasks"]}
    assert document["errors"] == []

    table = run_forge("plugins", env=plugin_env).stdout.splitlines()
    assert [line.split()[:3] for line in table if line.startswith("tokens ")] == [["tokens", "0.1.0", "forge_tokens"]]


def test_load_plugins_selects_example(plugin_env):
    result = run_forge("plugins", "--json", env={**plugin_env, "FORGE_LOAD_PLUGINS": "tokens"})
    assert result.returncode == 0, result.stderr

    assert [plugin["name"] for plugin in json.loads(result.stdout)["plugins"]] == ["tokens"]


@pytest.mark.parametrize(("shell", "expected"), [
    ("bash", "plugins tokens transfer zo"),
    ("fish", "__forge_at tokens"),
    ("zsh", "'tokens:"),
])
def test_completion_covers_example_command(plugin_env, shell, expected):
    with_plugin = run_forge("completion", shell, env=plugin_env)
    without = run_forge("completion", shell, env={**plugin_env, "PYTHONPATH": ""})

    assert with_plugin.returncode == 0, with_plugin.stderr
    assert expected in with_plugin.stdout
    assert expected not in without.stdout


def test_tokens_on_tiny_model(plugin_env, tiny_model_dir, qa_data):
    result = run_forge("tokens", "--model", str(tiny_model_dir), "--data", str(qa_data), "--json", env=plugin_env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)

    from transformers import AutoTokenizer

    records = [json.loads(line) for line in qa_data.read_text().splitlines()]
    prompt_tokens, completion_tokens = qa_token_count(AutoTokenizer.from_pretrained(tiny_model_dir), records)
    assert document["schema"] == "forge-tokens.stats/1"
    assert document["records"] == 12
    assert document["tokens"]["prompt"] == prompt_tokens
    assert document["tokens"]["completion"] == completion_tokens
    assert document["tokens"]["total"] == prompt_tokens + completion_tokens
    # SmolLM2's byte-level BPE spells any text with its byte tokens, so nothing is unknown.
    assert document["unknown"]["count"] == 0
    assert "forge tokens: read 12 records" in result.stderr


def test_tokens_bad_input_exits_1(plugin_env, tiny_model_dir, tmp_path):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"question": "What is 1 plus 1?", "answer": "2"}\n{"question": "What is\n', encoding="utf-8")

    malformed = run_forge("tokens", "--model", str(tiny_model_dir), "--data", str(data), env=plugin_env)
    assert malformed.returncode == 1
    assert malformed.stdout == ""
    assert f"Error: {data}:2: invalid JSON" in malformed.stderr
    assert "Traceback" not in malformed.stderr

    bad_column = run_forge("tokens", "--model", str(tiny_model_dir), "--data", str(data), "--column", "prompt",
                           env=plugin_env)
    assert bad_column.returncode == 1
    assert "Error: invalid --column 'prompt'; use FIELD=NAME" in bad_column.stderr


def test_eval_lists_example_task(plugin_env, installed_example):
    target, _ = installed_example
    result = run_forge("eval", "--list-tasks", "--json", env=plugin_env)
    assert result.returncode == 0, result.stderr

    tasks = {task["name"]: task for task in json.loads(result.stdout)["tasks"]}
    assert tasks["plurals"]["kind"] == "multiple_choice"
    assert Path(tasks["plurals"]["source"]) == target / "forge_tokens" / "tasks" / "plurals.yaml"
    assert "arith" in tasks  # the built-in tasks are still there


def test_eval_scores_example_task(plugin_env, tiny_model_dir):
    result = run_forge("eval", "--model", str(tiny_model_dir), "--general", "plurals", "--dtype", "float32",
                       "--quiet", "--json", env=plugin_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert [task["name"] for task in report["inputs"]["tasks"]] == ["plurals"]
    scores = report["results"][0]["tasks"]["plurals"]
    assert scores["n"] == 16
    assert 0.0 <= scores["score"] <= 1.0


def test_example_own_tests_pass(plugin_env, installed_example):
    _, source = installed_example
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(source / "pytest-tmp")]
    process = subprocess.run(command, cwd=source, capture_output=True, text=True, env=plugin_env, timeout=600)

    assert process.returncode == 0, process.stdout[-3000:]
    assert " passed" in process.stdout
    assert " failed" not in process.stdout


@pytest.mark.slow
def test_tokens_on_smollm2(plugin_env, real_model_cache, smollm2_tokenizer_dir):
    env = {**plugin_env, "FORGE_CACHE": str(real_model_cache)}
    result = run_forge("tokens", "--model", "smollm2-135m", "--data", "demo:arith/train.jsonl", "--quiet", "--json",
                       env=env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)

    # The tokenizer read from the GGUF file directly must count what forge's converted copy counts.
    from transformers import AutoTokenizer

    from llmforge.data import read_records, resolve_data_path

    records = read_records(resolve_data_path("demo:arith/train.jsonl"))
    prompt_tokens, completion_tokens = qa_token_count(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir), records)
    assert document["records"] == len(records)
    assert document["tokens"]["prompt"] == prompt_tokens
    assert document["tokens"]["completion"] == completion_tokens
    assert document["unknown"] == {"token": "<|endoftext|>", "count": 0, "rate": 0.0, "examples": 0, "top": []}
