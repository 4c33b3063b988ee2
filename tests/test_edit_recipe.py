"""The layer-selection recipe (examples/edit-selection.mk) runs end to end on the tiny model, and make reruns nothing."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FORGE

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "edit-selection.mk"
EDITS = ("top-k", "all", "random-k", "bottom-k", "top-k-projected")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(tmp_path: Path, model: Path, text: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    variables = [f"FORGE={FORGE}", f"MODEL={model}", f"OUT={tmp_path / 'out'}", f"GENERAL_TEXT={text}",
                 "K=1", "FT_STEPS=2", "SAE_TOKENS=1000", "SAE_EPOCHS=1", "LAYER_TOKENS=400",
                 "LAYER_OPTIONS=--min-rate 0", "GENERAL=facts", "EVAL_LIMIT=4"]
    return subprocess.run(["make", "-f", str(RECIPE), *variables, *extra], capture_output=True, text=True,
                          env=env, timeout=900, cwd=tmp_path)


def test_recipe_runs_and_reruns_nothing(tiny_model_dir, tmp_path, forge_env):
    rng = random.Random(0)
    text = tmp_path / "general.txt"
    text.write_text("\n\n".join(" ".join(rng.choice("the a river stone light seven".split()) for _ in range(30))
                                for _ in range(60)) + "\n", encoding="utf-8")

    first = make(tmp_path, tiny_model_dir, text, forge_env)
    assert first.returncode == 0, first.stderr[-3000:]

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    evaluated = json.dumps(report)
    for edit in EDITS:
        assert (tmp_path / "out" / edit / "forge_run.json").is_file()
        assert f"out/{edit}" in evaluated
    projected = json.loads((tmp_path / "out" / "top-k-projected" / "forge_run.json").read_text())
    assert 0.0 <= projected["projection"]["energy_fraction"] <= 1.0

    second = make(tmp_path, tiny_model_dir, text, forge_env, "--question")
    assert second.returncode == 0, "make wants to rebuild a target although no input changed"
