"""forge zo on the real smollm2-135m: engine against the reference loop, and SST-2 above zero-shot."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import FORGE, SHARED_DATA, requires_shared_data
from zo_reference import ReferenceLoop

pytestmark = [pytest.mark.slow, requires_shared_data]

SST2 = SHARED_DATA / "sst2"
CLASSIFY = ["--template", "{sentence} It was", "--verbalizers", "0=terrible,1=great"]


def sst2_batches(tokenizer, steps: int):
    from llmforge.readers import read_records
    from llmforge_zo.examples import batch_indices, classification_data, parse_verbalizers

    data = classification_data(read_records(SST2 / "train.tsv")[:200], tokenizer, template="{sentence} It was",
                               verbalizer=parse_verbalizers("0=terrible,1=great"), label_field="label", max_length=128)
    return [data.batch(batch_indices(len(data), 16, seed=0, step=step)) for step in range(steps)]


@pytest.mark.parametrize("method", ["lozo", "mezo-lora"])
def test_engine_losses_equal_the_reference_loop_on_smollm2(real_model_cache, method):
    from llmforge.models import load_model
    from llmforge_zo.engine import TorchScorer, find_targets
    from llmforge_zo.methods import PhaseTimes, build_method
    from llmforge_zo.settings import ZOSettings

    settings = ZOSettings(method=method, dtype="fp32", nu=2).resolved()
    loaded = load_model("smollm2-135m")
    batches = sst2_batches(loaded.tokenizer, 3)
    scorer = TorchScorer(loaded.model, find_targets(loaded.model), torch.float32)
    method_run = build_method(settings, scorer)
    engine = [method_run.step(step, batch, PhaseTimes())[:2] for step, batch in enumerate(batches)]
    del method_run, scorer, loaded

    reference = ReferenceLoop(load_model("smollm2-135m").model, settings).run(batches)
    torch.testing.assert_close(torch.tensor(engine), torch.tensor(reference.losses), rtol=1e-5, atol=0)


def test_mezo_lora_beats_zero_shot_on_sst2(real_model_cache, tmp_path):
    out = tmp_path / "sst2-mezo-lora"
    result = subprocess.run(
        [FORGE, "zo", "--model", "smollm2-135m", "--data", str(SST2 / "train.tsv"), "--limit", "1000", *CLASSIFY,
         "--method", "mezo-lora", "--lr", "1e-3", "--steps", "200", "--eval-data", str(SST2 / "dev.tsv"),
         "--eval-limit", "200", "-o", str(out), "--json", "--quiet"],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)

    zero_shot, final = summary["zero_shot"], summary["final"]
    assert final["loss"] < zero_shot["loss"] - 0.1
    assert final["accuracy"] > zero_shot["accuracy"]
