"""forge-tokens through forge itself: the entry point, `forge tokens`, the cache, bad input and the plurals task.

The plugin must be installed (`pip install -e .`, or `pip install --target DIR .` with DIR on
PYTHONPATH), because forge finds plugins through entry points and not through the source tree.
The commands run in-process with click's CliRunner on forge's own group, so a ForgeError ends
in "Error: ..." on stderr and exit status 1, as in the `forge` script.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmforge.cache import Cache
from llmforge.cli import cli

# Prompt/completion records for the word-level test tokenizer (see conftest.VOCABULARY). The
# unknown words are "rug", "and", "too", "ox" and "oxen".
RECORDS = [
    {"prompt": "What is the plural of cat", "completion": " cats"},
    {"prompt": "What is the plural of goose", "completion": " geese"},
    {"prompt": "a dog sat on the rug", "completion": " and a cat sat too"},
    {"prompt": "What is the plural of ox", "completion": " oxen"},
]


def run_forge(*args: str):
    return CliRunner().invoke(cli, list(args))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def plugin_installed():
    """Fail with the fix when the plugin's entry point is missing, instead of failing on a missing command."""
    names = {entry_point.name for entry_point in importlib.metadata.entry_points(group="llmforge")}
    assert "tokens" in names, "forge-tokens is not installed; run `pip install -e .` in the plugin directory first"


def test_plugins_lists_tokens():
    result = run_forge("plugins", "--json")
    assert result.exit_code == 0, result.output

    plugins = {plugin["name"]: plugin for plugin in json.loads(result.stdout)["plugins"]}
    assert plugins["tokens"]["module"] == "forge_tokens"
    assert plugins["tokens"]["version"] == importlib.metadata.version("forge-tokens")
    assert plugins["tokens"]["hooks"] == ["forge_commands", "forge_eval_tasks"]


def test_hook_names_match_specs():
    # pluggy registers a misspelled hook implementation (forge_comands) without complaint and
    # never calls it; check_pending raises PluginValidationError for it.
    from llmforge.plugins import get_plugin_manager

    get_plugin_manager().check_pending()


def test_counts_on_word_tokenizer(word_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    result = run_forge("tokens", "--model", str(word_model_dir), "--data", str(data), "--quiet", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)

    assert document["schema"] == "forge-tokens.stats/1"
    assert document["records"] == 4
    assert document["cached"] is False
    # Each prompt is <s> plus 6 words; each completion is its words plus </s>.
    assert document["tokens"] == {"total": 40, "prompt": 28, "completion": 12, "text": 32}
    assert document["length"] == {"min": 9, "max": 13, "mean": 10.0, "median": 9.0, "p95": 13}
    assert document["longest"] == {"index": 2, "tokens": 13, "where": f"{data}:3"}
    assert document["over_max_length"] == 0
    assert document["characters_per_token"] == 130 / 32


def test_unknown_tokens_and_spans(word_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    result = run_forge("tokens", "--model", str(word_model_dir), "--data", str(data), "--top", "3", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    unknown = json.loads(result.stdout)["unknown"]

    assert unknown["token"] == "[UNK]"
    assert unknown["count"] == 5
    assert unknown["examples"] == 2
    assert unknown["rate"] == 5 / 32
    assert unknown["top"] == [{"text": "and", "count": 1}, {"text": "ox", "count": 1}, {"text": "oxen", "count": 1}]


def test_max_length_and_table(word_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    result = run_forge("tokens", "--model", str(word_model_dir), "--data", str(data), "--max-length", "9", "--quiet")
    assert result.exit_code == 0, result.output

    # Each line is a label padded to 12 characters, a space and the value.
    rows = {line[:12].rstrip(): line[13:] for line in result.stdout.splitlines()}
    assert rows["over 9"] == "1 examples"
    assert rows["tokens"].startswith("40 (prompt 28, completion 12")
    assert rows["longest"] == f"13 tokens at {data}:3"
    assert rows["unknown"] == "5 tokens [UNK] in 2 examples (rate 0.15625)"
    assert rows["top unknown"] == "'and' (1), 'ox' (1), 'oxen' (1), 'rug' (1), 'too' (1)"
    assert "cached" not in rows
    assert result.stderr == ""


def test_repeat_read_from_cache(word_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    args = ["tokens", "--model", str(word_model_dir), "--data", str(data), "--quiet", "--json"]
    first = json.loads(run_forge(*args).stdout)
    second = json.loads(run_forge(*args).stdout)
    recounted = json.loads(run_forge(*args, "--no-cache").stdout)

    assert [first["cached"], second["cached"], recounted["cached"]] == [False, True, False]
    assert {**second, "cached": False} == first
    assert recounted == first
    kinds = [record["kind"] for _, record in Cache().records()]
    assert kinds.count("forge-tokens.stats") == 1


def test_cached_run_skips_transformers(word_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    args = ["tokens", "--model", str(word_model_dir), "--data", str(data), "--quiet", "--json"]
    assert run_forge(*args).exit_code == 0

    # A fresh interpreter runs the same request, now cached, and reports which heavy modules it imported.
    script = ("import sys\nfrom llmforge.cli import cli\n"
              f"cli.main({args!r}, standalone_mode=False)\n"
              "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules), file=sys.stderr)\n")
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout)["cached"] is True
    assert process.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("case", ["malformed line", "missing file", "max length zero", "unknown model"])
def test_bad_input_exits_1(case, word_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    options = {"--model": str(word_model_dir), "--data": str(data)}
    extra = []
    if case == "malformed line":
        data.write_text(json.dumps(RECORDS[0]) + "\n{\"prompt\": \"a dog\",\n", encoding="utf-8")
        expected = f"Error: {data}:2: invalid JSON"
    elif case == "missing file":
        options["--data"] = str(tmp_path / "absent.jsonl")
        expected = "Error: data file not found"
    elif case == "max length zero":
        extra = ["--max-length", "0"]
        expected = "Error: invalid --max-length 0"
    else:
        options["--model"] = "no-such-model"
        expected = "Error: unknown model reference 'no-such-model'"

    args = [item for pair in options.items() for item in pair]
    result = run_forge("tokens", *args, *extra, "--quiet", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(expected), result.stderr


def test_plurals_task_listed():
    result = run_forge("eval", "--list-tasks", "--json")
    assert result.exit_code == 0, result.output

    tasks = {task["name"]: task for task in json.loads(result.stdout)["tasks"]}
    assert tasks["plurals"]["kind"] == "multiple_choice"
    assert tasks["plurals"]["metric"] == "acc"
    assert Path(tasks["plurals"]["source"]).name == "plurals.yaml"


def test_plurals_task_scores(word_model_dir):
    result = run_forge("eval", "--model", str(word_model_dir), "--general", "plurals", "--dtype", "float32",
                       "--quiet", "--json")
    assert result.exit_code == 0, result.output

    scores = json.loads(result.stdout)["results"][0]["tasks"]["plurals"]
    assert scores["n"] == 16
    assert 0.0 <= scores["score"] <= 1.0
