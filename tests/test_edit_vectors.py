"""forge edit diff and merge on the tiny model: dense and low-rank vectors, round trips, bad input, and smollm2-135m."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FORGE


def forge(*args, env, check=True):
    result = subprocess.run([str(FORGE), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def save_llama(directory: Path, tokenizer_dir: Path, *, seed: int, intermediate_size: int = 64) -> Path:
    """Save a random 2-layer Llama like conftest's tiny model, with another seed or MLP width."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tuned_models(tmp_path_factory, tiny_model_dir):
    """A 3-step LoRA adapter and a 3-step full fine-tune of the tiny model, trained with their own cache."""
    root = tmp_path_factory.mktemp("edit-tuned")
    env = {**os.environ, "FORGE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--model", tiny_model_dir, "--data", "demo:arith/train.jsonl", "--steps", "3", "--quiet"]
    forge("finetune", *common, "-o", root / "lora", env=env)
    forge("finetune", *common, "--method", "full", "--lr", "1e-3", "-o", root / "full", env=env)
    return {"lora": root / "lora", "full": root / "full"}


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def cache_records(cache_root: Path, kind: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((cache_root / "refs" / kind).glob("*.json"))]


# forge edit diff


def test_diff_full_model_is_tuned_minus_base(tiny_model_dir, tuned_models, tmp_path, forge_env):
    from llmforge.checkpoint import read_metadata
    from llmforge.models import model_digest

    output = tmp_path / "full.safetensors"
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", output, env=forge_env)
    vector, base, tuned = load_file(output), read_weights(tiny_model_dir), read_weights(tuned_models["full"])

    assert sorted(vector) == sorted(base)
    for name in base:
        torch.testing.assert_close(vector[name], tuned[name].float() - base[name].float(), rtol=0, atol=0)
    metadata = read_metadata(output)
    assert metadata["layout"] == "dense"
    assert metadata["base_digest"] == model_digest(str(tiny_model_dir))
    assert metadata["tuned_digest"] == model_digest(str(tuned_models["full"]))


def test_diff_lora_product_matches_peft_merge(tiny_model_dir, tuned_models):
    from llmforge.cache import Cache
    from llmforge_edit.vectors import lora_delta, peft_merge_delta, resolve_pair

    source = resolve_pair(str(tiny_model_dir), str(tuned_models["lora"]), cache=Cache())
    product, merged = lora_delta(source), peft_merge_delta(source, Cache())

    assert product is not None
    assert sorted(product) == sorted(merged)
    for name in product:
        torch.testing.assert_close(product[name], merged[name], rtol=1e-5, atol=1e-7)
    assert any(bool(delta.any()) for delta in product.values())


def test_diff_caches_under_shared_keys(tiny_model_dir, tuned_models, tmp_path, forge_env, isolated_cache):
    from llmforge.models import model_digest

    for rank in (None, 2):
        options = [] if rank is None else ["--rank", rank]
        forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["lora"], "-o",
              tmp_path / f"lora-{rank}.safetensors", *options, env=forge_env)

    [dense] = cache_records(isolated_cache, "task-vector")
    assert dense["inputs"] == {"base": model_digest(str(tiny_model_dir)),
                               "adapter": model_digest(str(tuned_models["lora"]))}
    assert dense["params"] == {}
    [low_rank] = cache_records(isolated_cache, "task-vector-low-rank")
    assert low_rank["inputs"] == dense["inputs"]
    assert low_rank["params"] == {"rank": 2}


def test_diff_reads_the_finetune_cache_entry(tiny_model_dir, tuned_models, tmp_path, forge_env):
    # The fine-tune stored its vector in its own cache; pointed at that cache, diff adds no entry.
    cache_root = tuned_models["lora"].parent / "cache"
    before = cache_records(cache_root, "task-vector")
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["lora"], "-o", tmp_path / "tv.safetensors",
          env={**forge_env, "FORGE_CACHE": str(cache_root)})

    assert len(cache_records(cache_root, "task-vector")) == len(before) == 2


def test_low_rank_factors_and_energy(tiny_model_dir, tuned_models, tmp_path, forge_env):
    from llmforge_edit.vectors import load_dense_task_vector

    dense_path, low_path = tmp_path / "dense.safetensors", tmp_path / "r2.safetensors"
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", dense_path, env=forge_env)
    result = forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", low_path,
                   "--rank", "2", "--json", env=forge_env)
    summary, dense, stored = json.loads(result.stdout), load_file(dense_path), load_file(low_path)

    assert summary["layout"] == "low-rank"
    assert summary["rank"] == 2
    retained_total = 0.0
    for name, delta in dense.items():
        if delta.dim() == 1:
            assert torch.equal(stored[name], delta)
            assert summary["retained_energy_per_tensor"][name] == 1.0
            retained_total += float(delta.double().pow(2).sum())
            continue
        assert stored[name + ".svd_u"].shape == (delta.shape[0], 2)
        assert stored[name + ".svd_s"].shape == (2,)
        assert stored[name + ".svd_vh"].shape == (2, delta.shape[1])
        singular = torch.linalg.svdvals(delta.double())
        expected = float(singular[:2].pow(2).sum() / singular.pow(2).sum())
        assert summary["retained_energy_per_tensor"][name] == pytest.approx(expected, rel=1e-4)
        retained_total += float(singular[:2].pow(2).sum())

    total = sum(float(delta.double().pow(2).sum()) for delta in dense.values())
    assert summary["retained_energy"] == pytest.approx(retained_total / total, rel=1e-4)
    assert 0 < summary["retained_energy"] < 1

    reconstructed, metadata = load_dense_task_vector(low_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    u, s, vh = torch.linalg.svd(dense[name], full_matrices=False)
    torch.testing.assert_close(reconstructed[name], (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-6)
    assert metadata["layout"] == "low-rank"


def test_full_rank_low_rank_vector_is_exact(tiny_model_dir, tuned_models, tmp_path, forge_env):
    from llmforge_edit.vectors import load_dense_task_vector

    # The tiny model's matrices have at most 32 rows or columns, so rank 32 keeps every update dense.
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", tmp_path / "d.safetensors",
          env=forge_env)
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", tmp_path / "r.safetensors",
          "--rank", "32", env=forge_env)
    dense, _ = load_dense_task_vector(tmp_path / "d.safetensors")
    low_rank, _ = load_dense_task_vector(tmp_path / "r.safetensors")

    assert sorted(low_rank) == sorted(dense)
    for name in dense:
        assert torch.equal(low_rank[name], dense[name])


# forge edit merge


def test_merge_one_vector_reproduces_tuned_model(tiny_model_dir, tuned_models, tmp_path, forge_env):
    from transformers import AutoModelForCausalLM

    vector, output = tmp_path / "full.safetensors", tmp_path / "merged"
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", vector, env=forge_env)
    forge("edit", "merge", "--base", tiny_model_dir, "--vector", vector, "-o", output, env=forge_env)
    merged, tuned = read_weights(output), read_weights(tuned_models["full"])

    assert sorted(merged) == sorted(tuned)
    for name in tuned:
        torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=1e-6)
    assert json.loads((output / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(output)
    assert type(model).__name__ == "LlamaForCausalLM"

    record = json.loads((output / "forge_run.json").read_text())
    assert record["method"] == "task_arithmetic"
    assert record["lambda"] == 1.0
    assert record["vectors"][0]["weight"] == 1.0
    assert record["vectors"][0]["file_digest"].startswith("sha256:")
    assert record["merged_tensors"] == len(tuned)


def test_merge_lora_vector_matches_peft_merged_model(tiny_model_dir, tuned_models, tmp_path, forge_env):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    vector, output = tmp_path / "lora.safetensors", tmp_path / "merged"
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["lora"], "-o", vector, env=forge_env)
    forge("edit", "merge", "--base", tiny_model_dir, "--vector", f"{vector}:weight=1", "--method", "ties",
          "-o", output, env=forge_env)

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          str(tuned_models["lora"])).merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    tokens = torch.tensor([[1, 20, 300, 4000, 50]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, reference(tokens).logits, rtol=1e-4, atol=1e-5)


def test_merge_filters_layers_and_modules(tiny_model_dir, tuned_models, tmp_path, forge_env):
    vector, output = tmp_path / "full.safetensors", tmp_path / "merged"
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", vector, env=forge_env)
    forge("edit", "merge", "--base", tiny_model_dir, "--vector", vector, "--layers", "1", "--modules", "q_proj,v_proj",
          "-o", output, env=forge_env)
    merged, base, tuned = read_weights(output), read_weights(tiny_model_dir), read_weights(tuned_models["full"])

    selected = {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
    for name in base:
        expected = tuned[name] if name in selected else base[name]
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
    assert json.loads((output / "forge_run.json").read_text())["merged_tensors"] == 2


def test_merge_dare_is_reproducible_by_seed(tiny_model_dir, tuned_models, tmp_path, forge_env):
    vector = tmp_path / "full.safetensors"
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", vector, env=forge_env)
    outputs = {}
    for label, seed in (("a", 1), ("b", 1), ("c", 2)):
        outputs[label] = tmp_path / label
        forge("edit", "merge", "--base", tiny_model_dir, "--vector", f"{vector}:density=0.5", "--method", "dare_ties",
              "--seed", seed, "-o", outputs[label], env=forge_env)
    first, again, other = (read_weights(outputs[label]) for label in "abc")
    name = "model.layers.0.mlp.up_proj.weight"

    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first[name], other[name])
    assert json.loads((outputs["c"] / "forge_run.json").read_text())["seed"] == 2


def test_merge_two_vectors_lambda_and_weights(tiny_model_dir, tuned_models, tmp_path, forge_env):
    full, lora, output = tmp_path / "full.safetensors", tmp_path / "lora.safetensors", tmp_path / "merged"
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", full, env=forge_env)
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["lora"], "-o", lora, "--rank", "2",
          env=forge_env)
    forge("edit", "merge", "--base", tiny_model_dir, "--vector", f"{full}:weight=0.7", "--vector", f"{lora}:weight=0.3",
          "--lambda", "0.5", "-o", output, env=forge_env)
    from llmforge_edit.vectors import load_dense_task_vector

    base, merged = read_weights(tiny_model_dir), read_weights(output)
    full_vector, _ = load_dense_task_vector(full)
    lora_vector, _ = load_dense_task_vector(lora)
    for name in base:
        update = 0.7 * full_vector[name] + 0.3 * lora_vector.get(name, torch.zeros_like(full_vector[name]))
        torch.testing.assert_close(merged[name], base[name] + 0.5 * update, rtol=0, atol=1e-6, msg=name)


# Bad input


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("edit-other")
    return {"reseeded": save_llama(root / "reseeded", smollm2_tokenizer_dir, seed=1),
            "wider": save_llama(root / "wider", smollm2_tokenizer_dir, seed=0, intermediate_size=48)}


def assert_rejected(result, message: str, output: Path) -> None:
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*"))


def test_diff_rejects_other_shapes(tiny_model_dir, other_models, tmp_path, forge_env):
    output = tmp_path / "tv.safetensors"
    result = forge("edit", "diff", "--base", tiny_model_dir, "--tuned", other_models["wider"], "-o", output,
                   env=forge_env, check=False)
    assert_rejected(result, "tensor 'model.layers.0.mlp.down_proj.weight' has shape (32, 64)", output)


def test_diff_rejects_adapter_on_other_base(other_models, tuned_models, tmp_path, forge_env):
    output = tmp_path / "tv.safetensors"
    result = forge("edit", "diff", "--base", other_models["reseeded"], "--tuned", tuned_models["lora"], "-o", output,
                   env=forge_env, check=False)
    assert_rejected(result, "pass its own base with --base", output)


def test_diff_rejects_adapter_as_base(tuned_models, tmp_path, forge_env):
    output = tmp_path / "tv.safetensors"
    result = forge("edit", "diff", "--base", tuned_models["lora"], "--tuned", tuned_models["full"], "-o", output,
                   env=forge_env, check=False)
    assert_rejected(result, "is a PEFT adapter", output)


@pytest.fixture
def full_vector(tiny_model_dir, tuned_models, tmp_path, forge_env) -> Path:
    vector = tmp_path / "full.safetensors"
    forge("edit", "diff", "--base", tiny_model_dir, "--tuned", tuned_models["full"], "-o", vector, env=forge_env)
    return vector


@pytest.mark.parametrize("options, message", [
    (["--method", "ties", "--vector-options", ":density=0"], "density 0 of --vector"),
    (["--method", "dare_ties", "--vector-options", ":density=1.5"], "density 1.5 of --vector"),
    (["--method", "slerp"], "unknown merge method 'slerp'"),
    (["--vector-options", ":density=0.5"], "task_arithmetic does not prune"),
    (["--layers", "0-2"], "layer 2 in --layers is out of range"),
    (["--modules", "qproj"], "--modules 'qproj' matches no tensor"),
    (["--lambda", "inf"], "invalid --lambda inf"),
    (["--modules", "embed_tokens", "--layers", "0"], "the merge would change no tensor"),
    (["--method", "ties", "--vector-options", ":weight=0"], "every update of the"),
    (["--lambda", "0"], "every update of the"),
])
def test_merge_rejects_bad_options(tiny_model_dir, full_vector, tmp_path, forge_env, options, message):
    suffix = options[options.index("--vector-options") + 1] if "--vector-options" in options else ""
    options = [option for option in options if option not in ("--vector-options", suffix)]
    output = tmp_path / "merged"
    result = forge("edit", "merge", "--base", tiny_model_dir, "--vector", f"{full_vector}{suffix}", *options,
                   "-o", output, env=forge_env, check=False)
    assert_rejected(result, message, output)


def test_merge_rejects_vector_of_other_base(other_models, full_vector, tmp_path, forge_env):
    output = tmp_path / "merged"
    result = forge("edit", "merge", "--base", other_models["reseeded"], "--vector", full_vector, "-o", output,
                   env=forge_env, check=False)
    assert_rejected(result, "was computed against base", output)


def test_merge_rejects_vector_shape_mismatch(tiny_model_dir, tmp_path, forge_env):
    from llmforge.checkpoint import save_task_vector
    from llmforge.models import model_digest

    vector, output = tmp_path / "bad.safetensors", tmp_path / "merged"
    save_task_vector(vector, {"model.norm.weight": torch.ones(5)}, base_digest=model_digest(str(tiny_model_dir)),
                     tuned_digest="sha256:none")
    result = forge("edit", "merge", "--base", tiny_model_dir, "--vector", vector, "-o", output, env=forge_env,
                   check=False)
    assert_rejected(result, "has shape (5,) for tensor 'model.norm.weight' but the base has (32,)", output)


def test_merge_rejects_non_vector_file(tiny_model_dir, tmp_path, forge_env):
    output = tmp_path / "merged"
    result = forge("edit", "merge", "--base", tiny_model_dir, "--vector", tiny_model_dir / "model.safetensors",
                   "-o", output, env=forge_env, check=False)
    assert_rejected(result, "is not a forge task vector", output)


def test_merge_records_normalize_used(tiny_model_dir, full_vector, tmp_path, forge_env):
    output = tmp_path / "merged"
    forge("edit", "merge", "--base", tiny_model_dir, "--vector", full_vector, "--method", "ties", "-o", output,
          env=forge_env)

    assert json.loads((output / "forge_run.json").read_text())["normalize"] is True


@pytest.mark.parametrize("input_file", ["adapter", "base"])
def test_diff_rejects_output_inside_input(tiny_model_dir, tuned_models, tmp_path, forge_env, input_file):
    from llmforge.checkpoint import file_digest

    copy = tmp_path / "lora-copy"
    shutil.copytree(tuned_models["lora"], copy)
    target = copy / "adapter_model.safetensors" if input_file == "adapter" else tiny_model_dir / "model.safetensors"
    before = file_digest(target)
    result = forge("edit", "diff", "--base", tiny_model_dir, "--tuned", copy, "-o", target, "--overwrite",
                   env=forge_env, check=False)

    assert result.returncode == 1, result.stderr
    assert "an input of this diff" in result.stderr
    assert file_digest(target) == before


def save_wide_llama(directory: Path, tokenizer_dir: Path) -> Path:
    """A 1-layer Llama whose 49152 x 256 embedding makes a merge take long enough to signal it mid-write."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_sigterm_removes_temporary_output(smollm2_tokenizer_dir, tmp_path, forge_env):
    from llmforge.checkpoint import save_task_vector
    from llmforge.models import model_digest

    base = save_wide_llama(tmp_path / "wide", smollm2_tokenizer_dir)
    vector = tmp_path / "tv.safetensors"
    save_task_vector(vector, {name: torch.full(tensor.shape, 0.01) for name, tensor in read_weights(base).items()},
                     base_digest=model_digest(str(base)), tuned_digest="sha256:tuned", extra={"layout": "dense"})
    output = tmp_path / "out" / "merged"
    output.parent.mkdir()
    # ties is not elementwise, so it merges each tensor whole from stacked copies of the four updates.
    # The write then lasts seconds on one thread, and the poll below checks every 5 ms.
    command = [str(FORGE), "edit", "merge", "--base", str(base), *["--vector", str(vector)] * 4, "--method", "ties",
               "-o", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=forge_env)
    deadline = time.monotonic() + 120
    while not list(output.parent.glob(".merged.*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 143, stderr
    assert "Terminated." in stderr
    assert list(output.parent.iterdir()) == []


# The real model


@pytest.mark.slow
def test_diff_and_merge_on_smollm2(real_model_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmforge.models import load_model

    env = {**os.environ, "FORGE_CACHE": str(real_model_cache)}
    adapter, vector, output = tmp_path / "lora", tmp_path / "lora.safetensors", tmp_path / "merged"
    forge("finetune", "--model", "smollm2-135m", "--data", "demo:arith/train.jsonl", "--steps", "3", "--quiet",
          "-o", adapter, env=env)
    summary = json.loads(forge("edit", "diff", "--base", "smollm2-135m", "--tuned", adapter, "-o", vector, "--json",
                               env=env).stdout)
    low_rank = json.loads(forge("edit", "diff", "--base", "smollm2-135m", "--tuned", adapter, "--rank", "4", "--json",
                                "-o", tmp_path / "r4.safetensors", env=env).stdout)
    forge("edit", "merge", "--base", "smollm2-135m", "--vector", vector, "-o", output, env=env)

    assert summary["layout"] == "dense"
    assert summary["tensors"] > 0
    assert 0 < low_rank["retained_energy"] <= 1
    reference = load_model(str(adapter)).model
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    tokens = torch.tensor([[1, 520, 3000, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, reference(tokens).logits, rtol=1e-3, atol=1e-3)
