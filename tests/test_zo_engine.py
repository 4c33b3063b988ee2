"""The batched scoring engine against the in-place reference loop (tests/zo_reference.py), in fp32."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llmforge_zo.engine import TorchScorer, find_targets
from llmforge_zo.examples import batch_indices, classification_data, parse_verbalizers
from llmforge_zo.methods import PhaseTimes, build_method
from llmforge_zo.settings import ZOSettings
from llmforge_zo.states import LowRankDelta, StackedStates, stack_states
from zo_reference import ReferenceLoop

WORDS = ["good", "bad", "fine", "dull", "bright", "slow", "warm", "cold", "fast", "odd"]


def toy_records(count: int = 40) -> list[dict]:
    return [{"sentence": f"the film was {WORDS[i % 10]} and {WORDS[(3 * i) % 10]} " * (1 + i % 3),
             "label": i % 2} for i in range(count)]


def load_tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def toy_data(tokenizer, words: str = "0=terrible,1=great"):
    return classification_data(toy_records(), tokenizer, template="{sentence} It was",
                               verbalizer=parse_verbalizers(words), label_field="label", max_length=64)


def engine_and_reference(tiny_model_dir, settings: ZOSettings):
    model, tokenizer = load_tiny(tiny_model_dir)
    scorer = TorchScorer(model, find_targets(model), torch.float32)
    method = build_method(settings.resolved(), scorer)
    reference = ReferenceLoop(load_tiny(tiny_model_dir)[0], settings)
    return method, reference, toy_data(tokenizer)


# Learning rates are as large as keeps the two trajectories together: a finite difference of
# losses 1e-4 apart amplifies fp32 rounding, and larger steps turn that into chaotic divergence.
CASES = [
    ZOSettings(method="mezo", lr=1e-3, eps=1e-3, dtype="fp32"),
    ZOSettings(method="mezo", perturbation="factorised", rank=4, lr=1e-3, dtype="fp32"),
    ZOSettings(method="mezo-lora", lr=1e-2, dtype="fp32", queries=2),
    ZOSettings(method="lozo", lr=1e-3, nu=7, dtype="fp32", weight_decay=0.1),
    ZOSettings(method="lozo", lr=1e-3, nu=7, dtype="fp32", queries=2),
    ZOSettings(method="lozo-m", lr=1e-3, nu=7, dtype="fp32", momentum=0.5),
]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s.method}-{s.perturbation}-q{s.queries}-wd{s.weight_decay}")
def test_engine_matches_reference_for_100_steps(tiny_model_dir, settings):
    method, reference, data = engine_and_reference(tiny_model_dir, settings)
    times, engine_losses = PhaseTimes(), []
    batches = [data.batch(batch_indices(len(data), 8, seed=0, step=step)) for step in range(100)]

    for step, batch in enumerate(batches):
        engine_losses.append(method.step(step, batch, times)[:2])
    run = reference.run(batches)

    engine_losses, reference_losses = torch.tensor(engine_losses), torch.tensor(run.losses)
    torch.testing.assert_close(engine_losses, reference_losses, rtol=1e-5, atol=0)
    # The updates must agree to 0.1% of the distance travelled (about 100 steps of lr * g * z).
    # Rounding in the in-place round trips and in the finite differences moves the two runs
    # apart by a few parts in 1e5 of that distance.
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = method.state_tensors() if settings.method == "mezo-lora" else method.task_vector(base.__getitem__)
    for key, tensor in reference.tensors().items():
        start = 0 if settings.method == "mezo-lora" else base[key]
        expected = tensor.detach() - start
        if key.endswith("lora_A"):
            expected, trained[key] = expected - method_initial(settings, method, key), trained[key] - method_initial(settings, method, key)
        travelled = expected.norm().item()
        assert travelled > 1e-3, f"{key} barely moved ({travelled:.2e}), so the comparison proves nothing"
        assert (trained[key] - expected).norm().item() < 1e-3 * travelled, key


def method_initial(settings, method, key):
    from llmforge_zo.methods import initial_lora_factors

    return initial_lora_factors(settings.resolved(), method.shapes)[key[:-len(".lora_A")]][0]


def test_states_of_one_forward_score_like_separate_forwards(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir)
    targets = find_targets(model)
    scorer = TorchScorer(model, targets, torch.float32)
    batch = toy_data(tokenizer).batch(range(6))
    generator = torch.Generator().manual_seed(3)
    states = [{name: LowRankDelta(torch.randn(2, layer.in_features, generator=generator) * 0.3,
                                  torch.randn(layer.out_features, 2, generator=generator) * 0.3)
               for name, layer in scorer.layers.items()} for _ in range(3)]

    together = scorer.score(stack_states(states), batch).losses
    apart = torch.cat([scorer.score(stack_states([state]), batch).losses for state in states])

    torch.testing.assert_close(together, apart, rtol=1e-5, atol=0)
    assert together.unique().numel() == 3


def test_option_rows_match_single_token_scoring(tiny_model_dir):
    model, tokenizer = load_tiny(tiny_model_dir)
    scorer = TorchScorer(model, find_targets(model), torch.float32)
    data = toy_data(tokenizer)
    single_token_batch = data.batch(range(8))
    option_rows_batch = data.option_rows_batch(range(8))

    # Over the options only, single-token log-probs differ from full-vocabulary sums by a
    # per-example constant, which the cross-entropy over options removes.
    single_token_losses = scorer.score(StackedStates(1), single_token_batch).losses
    option_rows_losses = scorer.score(StackedStates(1), option_rows_batch).losses
    torch.testing.assert_close(single_token_losses, option_rows_losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bin_tokens", [48, 512])
def test_packed_scoring_equals_padded_scoring(tiny_model_dir, bin_tokens):
    model, tokenizer = load_tiny(tiny_model_dir)
    scorer = TorchScorer(model, find_targets(model), torch.float32, bin_tokens=bin_tokens)
    batch = toy_data(tokenizer).batch(range(24))
    generator = torch.Generator().manual_seed(5)
    states = [{name: LowRankDelta(torch.randn(2, layer.in_features, generator=generator) * 0.3,
                                  torch.randn(layer.out_features, 2, generator=generator) * 0.3)
               for name, layer in scorer.layers.items()} for _ in range(3)]
    stacked = stack_states(states)

    packed = scorer.score(stacked, batch)
    scorer.packing = False
    padded = scorer.score(stacked, batch)

    torch.testing.assert_close(packed.losses, padded.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.option_scores, padded.option_scores, rtol=1e-5, atol=1e-5)
