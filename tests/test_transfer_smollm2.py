"""forge transfer on smollm2-135m: bico recovers a known task vector on an exact re-parameterisation."""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import time

import pytest
import torch

from conftest import FORGE
from llmforge.checkpoint import load_task_vector, save_task_vector
from llmforge.models import load_model
from llmforge_transfer.reparam import draw_reparameterisation, llama_shape, make_test_target, reparameterise
from llmforge_transfer.transfer import TRANSPORTED_VECTOR

SEED = 0
EMBEDDING = "model.embed_tokens.weight"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:", "Once upon a time, a small robot"]


def _low_rank_vector(state, rank=4, seed=0):
    """A seeded rank-4 update of every decoder linear weight and of the (tied) embedding, 2% of each weight's std."""
    generator = torch.Generator().manual_seed(seed)
    vector = {}
    for name, tensor in state.items():
        if tensor.dim() != 2 or name == "lm_head.weight":
            continue
        left = torch.randn(tensor.shape[0], rank, generator=generator)
        right = torch.randn(rank, tensor.shape[1], generator=generator)
        vector[name] = 0.02 * float(tensor.std()) * left @ right / rank
    return vector


def _exact_target_vector(state, vector, shape):
    """Return the exact target vector of an update that leaves the norm gains unchanged.

    Such an update enters the re-parameterisation linearly (W g Q^T, Q W and permutations with the
    base gains g), so re-parameterising a state whose weights are the updates gives it directly.
    """
    spec = draw_reparameterisation(shape, seed=SEED, permute_mlp=True, permute_heads=True)
    updates_in_place = {name: vector.get(name, tensor) for name, tensor in state.items()}
    mapped = reparameterise(updates_in_place, spec, shape)
    names = [*vector, "lm_head.weight"]
    return {name: mapped[name].to(torch.float32) for name in names}


def _calibration_file(path, tokenizer, examples=48, length=60):
    """Decoded random token ids: diverse inputs, so every cross-covariance has full rank."""
    rng = random.Random(0)
    lines = [json.dumps({"text": tokenizer.decode([rng.randrange(100, len(tokenizer)) for _ in range(length)])})
             for _ in range(examples)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _relative_error(transported, exact):
    numerator = sum(float((transported.get(name, torch.zeros_like(update)).double() - update.double()).square().sum())
                    for name, update in exact.items())
    return (numerator / sum(float(update.double().square().sum()) for update in exact.values())) ** 0.5


def _mean_kl(expected_model, actual_model, tokenizer):
    total = 0.0
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = torch.log_softmax(expected_model(input_ids=input_ids).logits.double(), -1)
            actual = torch.log_softmax(actual_model(input_ids=input_ids).logits.double(), -1)
        total += float((expected.exp() * (expected - actual)).sum(-1).mean())
    return total / len(PROMPTS)


def _run_forge(*args, env):
    started = time.perf_counter()
    result = subprocess.run([str(FORGE), *args], capture_output=True, text=True, env=env, timeout=900)
    return result, time.perf_counter() - started


@pytest.mark.slow
def test_smollm2_bico_recovers_vector(real_model_cache, tmp_path, forge_env):
    from transformers import AutoModelForCausalLM

    forge_env["FORGE_CACHE"] = str(real_model_cache)
    forge_env["OMP_NUM_THREADS"] = forge_env.get("OMP_NUM_THREADS", "1")
    target_dir = tmp_path / "target"
    make_test_target("smollm2-135m", target_dir, seed=SEED, permute_mlp=True, permute_heads=True)

    source = load_model("smollm2-135m")
    state = source.model.state_dict()
    vector = _low_rank_vector(state)
    exact = _exact_target_vector(state, vector, llama_shape(source.model.config))
    vector_file = tmp_path / "source.tv.safetensors"
    save_task_vector(vector_file, vector, base_digest=source.digest, tuned_digest="sha256:test")
    calib = _calibration_file(tmp_path / "calib.jsonl", source.tokenizer)

    common = ["transfer", "--source-base", "smollm2-135m", "--vector", str(vector_file), "--target-base",
              str(target_dir), "--calib", str(calib), "--calib-tokens", "2048", "--json", "--quiet"]
    result, seconds = _run_forge(*common, "-o", str(tmp_path / "bico"), env=forge_env)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    naive, _ = _run_forge(*common, "-o", str(tmp_path / "naive"), "--align", "naive", env=forge_env)
    assert naive.returncode == 0, naive.stderr

    bico_vector, _ = load_task_vector(tmp_path / "bico" / TRANSPORTED_VECTOR)
    naive_vector, _ = load_task_vector(tmp_path / "naive" / TRANSPORTED_VECTOR)
    bico_error = _relative_error(bico_vector, exact)
    naive_error = _relative_error(naive_vector, exact)

    tuned = source.model
    tuned.load_state_dict({name: state[name] + update for name, update in vector.items()}, strict=False)
    bico_kl = _mean_kl(tuned, AutoModelForCausalLM.from_pretrained(str(tmp_path / "bico")).eval(), source.tokenizer)
    naive_kl = _mean_kl(tuned, AutoModelForCausalLM.from_pretrained(str(tmp_path / "naive")).eval(), source.tokenizer)
    print(f"\nsmollm2 bico: relative error {bico_error:.3g}, KL {bico_kl:.3g}, {seconds:.0f} s, peak RSS "
          f"{peak_mb:.0f} MB, {len(record['warnings'])} rank warnings; naive: relative error {naive_error:.3g}, KL {naive_kl:.3g}", file=sys.stderr)

    assert bico_error < 1e-4
    assert bico_kl < 1e-6
    assert naive_error > 0.5
    assert naive_kl > 100 * max(bico_kl, 1e-9)
