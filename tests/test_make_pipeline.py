"""The example pipeline (examples/Makefile) runs end to end on smollm2-135m and make reruns only what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FORGE, requires_smollm2

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "examples" / "Makefile"
# Tiny settings: two LoRA steps, one step of continued pre-training, four examples per eval task.
TINY = ("STEPS=2", "BATCH=4", "NEW_STEPS=1", "NEW_BATCH=4", "LIMIT=4", "LAYERS=28-29")
RUN_RECORDS = ("tuned", "new-base", "edited", "transferred")
EVALS = ("tuned", "edited", "transferred")

pytestmark = [
    pytest.mark.slow,
    requires_smollm2,
    pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed"),
]


def make(out: Path, data: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    command = ["make", "-f", str(MAKEFILE), f"FORGE={FORGE}", f"OUT={out}", f"TASK_DATA={data}", *TINY, *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=out.parent)


def forge_commands(result: subprocess.CompletedProcess) -> list[str]:
    """Return the forge command lines that make printed (run or, with -n, planned)."""
    return [line for line in result.stdout.splitlines() if line.startswith(f"{FORGE} ")]


def modification_times(out: Path) -> dict[str, int]:
    return {str(path.relative_to(out)): path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}


def changed_outputs(before: dict[str, int], after: dict[str, int]) -> set[str]:
    """Return the files and output directories (by top-level name) that were added or rewritten."""
    changed = set()
    for name, mtime in after.items():
        if before.get(name) != mtime:
            top, _, rest = name.partition("/")
            changed.add(name if top in ("settings", "eval") or not rest else top)
    return changed


def test_pipeline_builds_and_reruns_only_changes(tmp_path, real_model_cache):
    env = dict(os.environ, FORGE_CACHE=str(real_model_cache))
    out = tmp_path / "out"
    data = tmp_path / "train.jsonl"
    lines = (ROOT / "llmforge" / "demo" / "arith" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(lines[:64]) + "\n", encoding="utf-8")

    first = make(out, data, env)
    assert first.returncode == 0, first.stderr[-3000:]

    records = {name: json.loads((out / name / "forge_run.json").read_text()) for name in RUN_RECORDS}
    assert records["tuned"]["method"] == "lora"
    assert records["tuned"]["steps"] == 2
    assert records["new-base"]["method"] == "full"
    assert records["new-base"]["steps"] == 1
    assert records["edited"]["selected_layers"] == [28, 29]
    assert records["transferred"]["align"] == "naive"
    assert records["transferred"]["target_base"] == str(out / "new-base")
    assert (out / "tv.safetensors").stat().st_size > 0

    for name in EVALS:
        evaluation = json.loads((out / "eval" / f"{name}.json").read_text())
        references = [result["reference"] for result in evaluation["results"]]
        assert str(out / name) in references
        for result in evaluation["results"]:
            assert result["tasks"]["arith"]["n"] == 4
            assert result["tasks"]["facts"]["n"] == 4
            assert 0.0 <= result["summary"]["target_score"] <= 1.0
    transferred_eval = json.loads((out / "eval" / "transferred.json").read_text())
    assert transferred_eval["inputs"]["baseline"]["reference"] == str(out / "new-base")

    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["steps"] == 2
    assert report["edit"]["selected_layers"] == [28, 29]
    assert report["transfer"]["align"] == "naive"
    assert set(report["eval"]) == set(EVALS)
    tuned_row = report["eval"]["tuned"][str(out / "tuned")]
    assert tuned_row["baseline"] is False
    assert set(tuned_row["tasks"]) == {"arith", "facts"}
    assert tuned_row["target_delta"] == pytest.approx(tuned_row["target_score"] - report["eval"]["tuned"]["smollm2-135m"]["target_score"])
    assert any(line.split()[:2] == ["step", "model"] for line in first.stdout.splitlines()), "no report table"

    built = modification_times(out)
    assert make(out, data, env, "--question").returncode == 0, "make wants to rebuild a target although no input changed"
    dry = make(out, data, env, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert forge_commands(dry) == []
    assert modification_times(out) == built

    # A new edit setting reruns the edit, its evaluation and the report, and nothing upstream or beside it.
    second = make(out, data, env, "LAMBDA=0.5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert changed_outputs(built, modification_times(out)) == {
        "settings/apply.args", "edited", "eval/edited.json", "eval/edited.pareto.png", "report.json"}
    assert [command.split()[1:3] for command in forge_commands(second)] == [["edit", "apply"], ["eval", "--baseline"]]
    assert json.loads((out / "edited" / "forge_run.json").read_text())["lambda"] == 0.5
    assert make(out, data, env, "LAMBDA=0.5", "--question").returncode == 0
    assert make(out, data, env, "--question").returncode != 0, "the edit did not go stale when LAMBDA went back to its default"

    # A newer fine-tuning data file puts every step after the fine-tune in the plan, but not the second base.
    os.utime(data, ns=(max(built.values()) + 10**9,) * 2)
    planned = forge_commands(make(out, data, env, "LAMBDA=0.5", "--dry-run"))
    steps = sorted(" ".join(command.split()[1:3]) for command in planned)
    assert steps == sorted(["finetune --model", "eval --baseline", "edit diff", "edit apply", "eval --baseline",
                            "transfer --source-base", "eval --baseline"])
    assert not any("--method full" in command for command in planned)
