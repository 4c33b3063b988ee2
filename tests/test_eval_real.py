"""forge eval on the real smollm2-135m: the demo tasks and the specs for the public data sets."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA, requires_shared_data, requires_smollm2

from llmforge_eval.evaluate import evaluate


@pytest.fixture
def shared_forge_cache(shared_cache, monkeypatch):
    """Use the session cache, so the GGUF file is converted once for all real-model tests."""
    monkeypatch.setenv("FORGE_CACHE", str(shared_cache))
    return shared_cache


@pytest.mark.slow
@requires_smollm2
def test_real_model_demo_tasks(shared_forge_cache):
    report = evaluate(["smollm2-135m"], target=["arith"], general=["facts"], limit=76, batch_size=16)
    tasks = report["results"][0]["tasks"]
    assert tasks["arith"]["n"] == 76
    assert 0.0 <= tasks["arith"]["score"] <= 1.0
    assert tasks["facts"]["n"] == 76
    # The base model scored 0.72 on all 76 facts questions; chance is 0.25.
    assert tasks["facts"]["score"] > 0.5


@pytest.mark.slow
@requires_smollm2
@requires_shared_data
def test_real_model_public_tasks(shared_forge_cache):
    report = evaluate(["smollm2-135m"], target=["gsm8k"], general=["sst2", "arc_easy", "arc_challenge", "boolq", "wikitext2"],
                      limit=4, batch_size=8, data_dir=SHARED_DATA)
    tasks = report["results"][0]["tasks"]
    for name in ("gsm8k", "sst2", "arc_easy", "arc_challenge", "boolq"):
        assert tasks[name]["n"] == 4
        assert 0.0 <= tasks[name]["score"] <= 1.0
    assert tasks["wikitext2"]["n"] == 4
    assert tasks["wikitext2"]["metrics"]["tokens"] == 1023 + 3 * 512
    # A 135M model's WikiText-2 perplexity is in the tens; a broken tokenization or shift gives thousands.
    assert 5 < tasks["wikitext2"]["score"] < 100
    assert report["results"][0]["summary"]["excluded_from_mean"] == ["wikitext2"]
