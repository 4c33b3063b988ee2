"""The version-pair recipe (examples/transfer-version-pair.mk) runs end to end on the tiny model."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FORGE

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "transfer-version-pair.mk"
MODELS = ("old-tuned", "new-base", "new-tuned-direct", "new-tuned-bico", "new-tuned-activations", "new-tuned-naive")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def test_version_pair_recipe_runs_and_reruns_nothing(tiny_model_dir, tmp_path, forge_env):
    rng = random.Random(0)
    text = tmp_path / "new-text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice("thou art a rose and yet the night".split()) for _ in range(25))
                                for _ in range(40)) + "\n", encoding="utf-8")
    variables = [f"FORGE={FORGE}", f"MODEL={tiny_model_dir}", f"OUT={tmp_path / 'out'}", f"NEW_TEXT={text}",
                 "CPT_STEPS=2", "CPT_BATCH=4", "FT_STEPS=2", "CALIB_TOKENS=200", "GENERAL=facts", "EVAL_LIMIT=4"]

    def make(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-f", str(RECIPE), *variables, *extra], capture_output=True, text=True,
                              env=forge_env, timeout=900, cwd=tmp_path)

    first = make()
    assert first.returncode == 0, first.stderr[-3000:]

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    old_report = json.loads((tmp_path / "out" / "report-old.json").read_text())
    references = [result["reference"] for result in report["results"] + old_report["results"]]
    for name in MODELS:
        assert str(tmp_path / "out" / name) in references
    assert report["inputs"]["baseline"]["reference"] == str(tmp_path / "out" / "new-base")
    records = {align: json.loads((tmp_path / "out" / f"new-tuned-{align}" / "forge_run.json").read_text())
               for align in ("bico", "activations", "naive")}
    assert records["bico"]["calibration"]["output_side"] == "gradients"
    assert records["activations"]["calibration"]["output_side"] == "outputs"
    assert records["naive"]["calibration"] is None

    second = make("--question")
    assert second.returncode == 0, "make wants to rebuild a target although no input changed"
