"""Ctrl-C (SIGINT) on commands that write output: exit status 130, no partial output, and a resume hint.

A command sets its resume hint with `llmforge.cli.set_resume_hint`, and the CLI prints it after
"Interrupted.". The end-to-end tests send a real SIGINT to the installed `forge` script and then rerun
the command with the flags that the hint names.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import click
from click.testing import CliRunner

from llmforge.cli import ForgeGroup, Terminated, partial_run_hint, set_resume_hint

from conftest import FORGE


def interrupting_group(hint, error: type[KeyboardInterrupt] = KeyboardInterrupt) -> click.Group:
    """Return a forge-style group with one command `work` that sets `hint` and is then interrupted."""

    @click.group(cls=ForgeGroup)
    def group() -> None:
        pass

    @group.command()
    def work() -> None:
        set_resume_hint(hint)
        raise error()

    return group


def test_hint_follows_interrupted():
    result = CliRunner().invoke(interrupting_group("Rerun to reuse the cache."), ["work"])

    assert result.exit_code == 130
    assert result.stderr == "Interrupted.\nRerun to reuse the cache.\n"


def test_callable_hint_on_sigterm():
    calls = []

    def hint() -> str:
        calls.append("called")
        return "computed at the interrupt"

    result = CliRunner().invoke(interrupting_group(hint, Terminated), ["work"])

    assert result.exit_code == 143
    assert result.stderr == "Terminated.\ncomputed at the interrupt\n"
    assert calls == ["called"]


def test_no_hint_prints_interrupted_only():
    result = CliRunner().invoke(interrupting_group(None), ["work"])

    assert result.exit_code == 130
    assert result.stderr == "Interrupted.\n"


def test_partial_run_hint_follows_saved_state(tmp_path):
    output = tmp_path / "run"
    partial = tmp_path / "run.partial"

    assert "add --save-every N" in partial_run_hint(output, saves=False)()
    assert "starts over" in partial_run_hint(output, saves=True)()

    (partial / "checkpoints").mkdir(parents=True)
    assert "with --overwrite and without --resume" in partial_run_hint(output, saves=True)()

    (partial / "state-000002").mkdir()
    (partial / "state-000004").mkdir()
    hint = partial_run_hint(output, saves=True)()
    assert "state of step 4" in hint
    assert "rerun the same command with --resume" in hint


# End to end: a real SIGINT to the installed script


def leftovers(directory: Path, name: str) -> list[str]:
    """Return the entries that belong to output `name` in `directory`, staging entries included."""
    return sorted(path.name for path in directory.iterdir()
                  if path.name == name or path.name.startswith(f".{name}."))


def test_finetune_ctrl_c_then_resume(tiny_model_dir, qa_data, tmp_path, forge_env):
    output = tmp_path / "adapter"
    partial = tmp_path / "adapter.partial"
    command = [str(FORGE), "finetune", "--model", str(tiny_model_dir), "--data", str(qa_data), "-o", str(output),
               "--steps", "100", "--save-every", "2", "--batch-size", "4", "--threads", "1", "--quiet"]

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**forge_env, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(partial.glob("state-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert "Interrupted.\n" in stderr
    assert "rerun the same command with --resume to continue from it" in stderr
    assert "Traceback" not in stderr
    assert leftovers(tmp_path, "adapter") == []
    assert list(partial.glob("state-*"))

    resumed = subprocess.run([*command, "--resume", "--json"], capture_output=True, text=True, timeout=300,
                             env={**forge_env, "OMP_NUM_THREADS": "1"})

    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["steps"] == 100
    assert summary["resumed_from_step"] >= 2
    assert (output / "forge_run.json").is_file()
    assert not partial.exists()


def write_eval_tasks(folder: Path) -> list[Path]:
    """Write a quick multiple-choice task and a perplexity task that takes seconds on the tiny model."""
    folder.mkdir()
    questions = [{"question": "What color is the sky?", "choices": ["blue", "green"], "answer": 0},
                 {"question": "What is frozen water?", "choices": ["steam", "ice"], "answer": 1}]
    (folder / "quiz.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (folder / "long.txt").write_text("Small models learn small things, one window at a time. " * 400)
    specs = [{"name": "quiz", "kind": "multiple_choice", "data": "quiz.jsonl", "prompt": "Q: {question}\nA:",
              "choices": "choices", "answer": "answer"},
             {"name": "long", "kind": "perplexity", "data": "long.txt", "max_length": 64, "stride": 16}]
    paths = []
    for spec in specs:
        paths.append(folder / f"{spec['name']}.json")
        paths[-1].write_text(json.dumps(spec))
    return paths


def test_eval_ctrl_c_then_rerun_reuses_scores(tiny_model_dir, tmp_path, forge_env):
    quiz, long = write_eval_tasks(tmp_path / "tasks")
    report = tmp_path / "report.json"
    command = [str(FORGE), "eval", "--model", str(tiny_model_dir), "--general", "quiz,long", "--task-file", str(quiz),
               "--task-file", str(long), "--batch-size", "1", "--dtype", "float32", "-o", str(report)]

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=forge_env)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "scored quiz" in line:
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=120)
    stderr = "".join(seen) + rest

    assert process.returncode == 130, stderr
    assert "Interrupted.\nRerun the same command to continue: the scores of the tasks that finished are cached" in stderr
    assert "scored long" not in stderr
    assert leftovers(tmp_path, "report.json") == []
    assert leftovers(tmp_path, "report.pareto.png") == []

    rerun = subprocess.run([*command, "--json", "--quiet"], capture_output=True, text=True, env=forge_env, timeout=300)

    assert rerun.returncode == 0, rerun.stderr
    tasks = json.loads(rerun.stdout)["results"][0]["tasks"]
    assert tasks["quiz"]["cached"] is True
    assert tasks["long"]["cached"] is False
    assert json.loads(report.read_text())["results"][0]["tasks"]["long"]["n"] > 100
