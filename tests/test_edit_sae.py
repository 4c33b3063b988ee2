"""forge edit sae: TopK SAE gradients and training, activation caching, the SAELens layout and the commands."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import FORGE
from llmforge.errors import ForgeError
from llmforge_edit.activations import (ActivationRequest, ModelShape, TextSource, cached_activations, hook_name,
                                       parse_layers, tokenize_texts)
from llmforge_edit.sae import TrainSettings, explained_variance, initial_sae, topk_gradients, train_sae
from llmforge_edit.saelens import read_sae, read_sae_set, saelens_config, write_sae

WORDS = ("river stone light garden number seven market winter paper music green quiet doctor train "
         "window bread orange forest letter mountain ocean cloud silver teacher").split()


@pytest.fixture
def text_data(tmp_path) -> Path:
    """About 4000 tokens of random-word paragraphs as a .txt file (one record per paragraph)."""
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(100)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def synthetic_activations(count: int, seed: int = 1):
    """Activations made of 3 of 64 unit-norm atoms in 32 dimensions, plus an offset; returns (x, atoms)."""
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(64, 32, generator=generator)
    atoms /= atoms.norm(dim=-1, keepdim=True)
    chosen = torch.stack([torch.randperm(64, generator=generator)[:3] for _ in range(count)])
    weights = torch.rand(count, 3, generator=generator) * 2 + 0.5
    return torch.zeros(count, 64).scatter(1, chosen, weights) @ atoms + 1.0, atoms


def run_forge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(FORGE), *args], capture_output=True, text=True, env=env, timeout=600)


# The TopK SAE


def test_gradients_match_autograd():
    generator = torch.Generator().manual_seed(0)
    sae = initial_sae(16, TrainSettings(expansion=4, k=4), torch.randn(16, generator=generator), generator)
    sae.b_enc = torch.randn(64, generator=generator) * 0.1
    x = torch.randn(32, 16, generator=generator)
    loss, gradients, _, _ = topk_gradients(sae, x, variance=2.0)

    parameters = {name: tensor.clone().requires_grad_() for name, tensor in sae.tensors().items()}
    pre = (x - parameters["b_dec"]) @ parameters["W_enc"] + parameters["b_enc"]
    values, indices = pre.topk(4, dim=-1)
    features = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    reference = ((features @ parameters["W_dec"] + parameters["b_dec"] - x) ** 2).sum() / (32 * 2.0)
    reference.backward()

    assert float(loss) == pytest.approx(float(reference.detach()), rel=1e-5)
    for name, tensor in parameters.items():
        torch.testing.assert_close(gradients[name], tensor.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_sae_recovers_sparse_dictionary():
    x, atoms = synthetic_activations(6000)
    settings = TrainSettings(expansion=4, k=4, steps=300, batch_size=256, lr=3e-3, dead_tokens=5000, dtype="fp32")
    result = train_sae(x, settings)

    assert result.explained_variance > 0.85
    assert result.dead_fraction < 0.2
    decoder_rows = result.sae.W_dec / result.sae.W_dec.norm(dim=-1, keepdim=True)
    best_cosine = (atoms @ decoder_rows.t()).max(dim=1).values
    assert float((best_cosine > 0.9).float().mean()) > 0.5
    torch.testing.assert_close(result.sae.W_dec.norm(dim=-1), torch.ones(result.sae.d_sae), rtol=0, atol=1e-4)


def test_training_beats_untrained_sae():
    x, _ = synthetic_activations(3000, seed=2)
    settings = TrainSettings(expansion=4, k=4, steps=100, batch_size=256, lr=3e-3, dtype="fp32")
    generator = torch.Generator().manual_seed(0)
    untrained = explained_variance(initial_sae(32, settings, x.mean(0), generator), x)
    trained = train_sae(x, settings).explained_variance

    assert trained > untrained + 0.3


def test_training_is_reproducible():
    x, _ = synthetic_activations(2000, seed=3)
    settings = TrainSettings(expansion=2, k=4, steps=20, batch_size=128, dtype="fp32")
    first, second = train_sae(x, settings), train_sae(x, settings)
    torch.testing.assert_close(first.sae.W_enc, second.sae.W_enc, rtol=0, atol=0)


def test_invalid_k_names_dictionary_size():
    x, _ = synthetic_activations(500)
    with pytest.raises(ForgeError, match="only 64 features"):
        train_sae(x, TrainSettings(expansion=2, k=100, steps=1))


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(ForgeError, match="layer 4 in --layers is out of range"):
        parse_layers("1,4", 4)
    with pytest.raises(ForgeError, match="invalid --layers"):
        parse_layers("one", 4)


# The SAELens layout


def test_saelens_layout_round_trip(tmp_path):
    x, _ = synthetic_activations(1000)
    result = train_sae(x, TrainSettings(expansion=2, k=4, steps=5, batch_size=128))
    config = saelens_config(result.sae, layer=3, model_name="m", context_size=64, prepend_bos=False, dataset_path="d")
    write_sae(tmp_path / hook_name(3), result.sae, config)

    written = json.loads((tmp_path / hook_name(3) / "cfg.json").read_text())
    assert written["architecture"] == "topk"
    assert written["activation_fn_kwargs"] == {"k": 4}
    assert (written["d_in"], written["d_sae"], written["hook_layer"]) == (32, 64, 3)
    assert written["hook_name"] == "blocks.3.hook_resid_post"
    stored = read_sae(tmp_path / hook_name(3))
    assert stored.layer == 3
    for name, tensor in result.sae.tensors().items():
        torch.testing.assert_close(stored.sae.tensors()[name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(stored.sae.reconstruct(x[:50]), result.sae.reconstruct(x[:50]), rtol=0, atol=0)


def test_reads_saelens6_nested_config(tmp_path):
    x, _ = synthetic_activations(500)
    sae = train_sae(x, TrainSettings(expansion=2, k=4, steps=3, batch_size=128)).sae
    write_sae(tmp_path, sae, {"d_in": 32, "d_sae": 64, "dtype": "float32", "architecture": "topk", "k": 4,
                              "apply_b_dec_to_input": True, "normalize_activations": "none",
                              "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.7.hook_resid_post"}})
    stored = read_sae_set(tmp_path)

    assert [item.layer for item in stored] == [7]
    assert stored[0].sae.k == 4


def test_width_mismatch_names_layer_and_widths(tmp_path):
    x, _ = synthetic_activations(500)
    sae = train_sae(x, TrainSettings(expansion=2, k=4, steps=3, batch_size=128)).sae
    write_sae(tmp_path / hook_name(1), sae, saelens_config(sae, layer=1, model_name="m", context_size=8,
                                                             prepend_bos=False, dataset_path="d"))
    with pytest.raises(ForgeError, match="layer 1 .*d_in=32.*hidden size is 48"):
        read_sae_set(tmp_path, ModelShape(hidden_size=48, num_layers=4))
    with pytest.raises(ForgeError, match="layer 1 .*the model has 1 decoder layers"):
        read_sae_set(tmp_path, ModelShape(hidden_size=32, num_layers=1))


# Activations and the commands on the tiny model


def test_activations_cached_per_layer(tiny_model_dir, text_data):
    request = ActivationRequest(str(tiny_model_dir), TextSource(str(text_data)), tokens=1500, max_length=64,
                                progress=False)
    first, description = cached_activations(request, [0, 1])
    again, second_description = cached_activations(request, [1])

    assert description["layers_from_cache"] == 0
    assert second_description["layers_from_cache"] == 1
    assert tuple(first[0].shape) == (1500, 32)
    assert first[0].dtype == torch.bfloat16
    torch.testing.assert_close(again[1], first[1], rtol=0, atol=0)


def test_activations_match_hidden_states(tiny_model_dir, text_data):
    from llmforge.models import load_model

    request = ActivationRequest(str(tiny_model_dir), TextSource(str(text_data)), tokens=40, max_length=40,
                                skip_bos=False, dtype="fp32", progress=False)
    activations, _ = cached_activations(request, [0])
    loaded = load_model(str(tiny_model_dir))
    first_text = text_data.read_text().split("\n\n")[0]
    ids = loaded.tokenizer(first_text, return_tensors="pt")["input_ids"][:, :40]
    with torch.inference_mode():
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states

    # hidden_states[1] is the output of decoder block 0, the hook point blocks.0.hook_resid_post.
    torch.testing.assert_close(activations[0].float(), hidden[1][0].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_train_command_end_to_end(tiny_model_dir, text_data, tmp_path, forge_env):
    output = tmp_path / "saes"
    common = ["--model", str(tiny_model_dir), "--data", str(text_data), "--tokens", "3000", "--max-length", "64",
              "--expansion", "4", "--k", "8", "--steps", "60", "--batch-size", "256", "--quiet", "--json"]
    result = run_forge("edit", "sae", "train", *common, "--layers", "0,1", "-o", str(output), env=forge_env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)

    assert sorted(path.name for path in output.iterdir()) == [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "forge_run.json"]
    for row in summary["layers"]:
        assert row["explained_variance"] > 0.5, row
        assert (row["d_in"], row["d_sae"], row["k"]) == (32, 128, 8)
    weights = (output / "blocks.1.hook_resid_post" / "sae_weights.safetensors")
    from llmforge.checkpoint import load_tensors
    assert sorted(load_tensors(weights)) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    record = json.loads((output / "forge_run.json").read_text())
    assert record["schema"] == "llmforge.edit.sae/1"
    assert record["activations"]["layers_from_cache"] == 0

    rerun = run_forge("edit", "sae", "train", *common[:-4], "--k", "4", "--steps", "5", "--quiet", "--json",
                      "--layers", "1", "-o", str(tmp_path / "again"), env=forge_env)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["activations"]["layers_from_cache"] == 1

    info = run_forge("edit", "sae", "info", str(output), "--model", str(tiny_model_dir), "--json", env=forge_env)
    assert info.returncode == 0, info.stderr
    rows = json.loads(info.stdout)["saes"]
    assert [row["layer"] for row in rows] == [0, 1]
    assert rows[1]["explained_variance"] == summary["layers"][1]["explained_variance"]


def test_layer_out_of_range_exits_1(tiny_model_dir, text_data, tmp_path, forge_env):
    result = run_forge("edit", "sae", "train", "--model", str(tiny_model_dir), "--data", str(text_data),
                       "--layers", "2", "-o", str(tmp_path / "saes"), "--quiet", env=forge_env)

    assert result.returncode == 1
    assert "layer 2 in --layers is out of range: the model has 2 decoder layers" in result.stderr
    assert not (tmp_path / "saes").exists()


def test_info_width_mismatch_exits_1(tiny_model_dir, text_data, tmp_path, forge_env):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    output = tmp_path / "saes"
    trained = run_forge("edit", "sae", "train", "--model", str(tiny_model_dir), "--data", str(text_data),
                        "--layers", "1", "--tokens", "500", "--steps", "2", "--batch-size", "128", "--expansion", "2",
                        "--k", "4", "-o", str(output), "--quiet", env=forge_env)
    assert trained.returncode == 0, trained.stderr

    result = run_forge("edit", "sae", "info", str(output), "--model", str(wide), env=forge_env)
    assert result.returncode == 1
    assert "the SAE for layer 1" in result.stderr
    assert "d_in=32" in result.stderr
    assert "hidden size is 48" in result.stderr


# Long texts, small data sets and small budgets


class WordTokenizer:
    """Splits on spaces into ids 10, 11, ...; puts BOS id 1 in front when `bos` is set."""

    def __init__(self, bos: bool):
        self.bos_token_id = 1 if bos else None

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + index for index, _ in enumerate(text.split())]
        return {"input_ids": ([1] if self.bos_token_id is not None else []) + ids}


@pytest.mark.parametrize("bos", [True, False])
def test_tokenize_splits_long_text_into_windows(bos):
    sequences, total = tokenize_texts([" ".join(["w"] * 25)], WordTokenizer(bos), max_length=10, token_budget=1000,
                                      skip_bos=True)

    assert total == 25
    assert all(len(ids) <= 10 for ids in sequences)
    assert [ids[0] == 1 for ids in sequences] == [bos] * len(sequences)
    body = [token for ids in sequences for token in (ids[1:] if bos else ids)]
    assert body == list(range(10, 35))


def test_tokenize_stops_at_budget():
    sequences, total = tokenize_texts([" ".join(["w"] * 50)], WordTokenizer(True), max_length=10, token_budget=20,
                                      skip_bos=True)

    assert total == 20
    assert len(sequences) == 3


def test_one_paragraph_file_gives_many_tokens(tiny_model_dir, tmp_path):
    path = tmp_path / "one-record.txt"
    rng = random.Random(2)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60)) + "\n")
    request = ActivationRequest(str(tiny_model_dir), TextSource(str(path)), tokens=400, max_length=64, progress=False)
    activations, description = cached_activations(request, [0])

    assert description["tokens"] == 400
    assert activations[0].shape[0] == 400


def test_short_data_warns_with_both_counts(tiny_model_dir, tmp_path, caplog):
    path = tmp_path / "short.txt"
    path.write_text("river stone light garden\n", encoding="utf-8")
    request = ActivationRequest(str(tiny_model_dir), TextSource(str(path)), tokens=5000, max_length=64, progress=False)
    with caplog.at_level("WARNING"):
        _, description = cached_activations(request, [0])

    assert description["tokens"] < 5000
    assert f"collected {description['tokens']} of the 5000 tokens asked for by --tokens" in caplog.text


def test_train_sae_rejects_too_few_tokens():
    x, _ = synthetic_activations(300)
    with pytest.raises(ForgeError, match="only 300 activation tokens; SAE training needs at least 400"):
        train_sae(x, TrainSettings(expansion=2, k=4, steps=2, batch_size=64, dtype="fp32"))


def test_train_command_rejects_small_budget(tiny_model_dir, text_data, tmp_path, forge_env):
    output = tmp_path / "saes"
    result = run_forge("edit", "sae", "train", "--model", str(tiny_model_dir), "--data", str(text_data),
                       "--layers", "1", "--tokens", "19", "-o", str(output), "--quiet", env=forge_env)

    assert result.returncode == 1
    assert "invalid --tokens 19" in result.stderr
    assert not output.exists()


def test_train_command_warns_few_steps(tiny_model_dir, text_data, tmp_path, forge_env):
    output = tmp_path / "saes"
    result = run_forge("edit", "sae", "train", "--model", str(tiny_model_dir), "--data", str(text_data),
                       "--layers", "1", "--tokens", "1000", "--expansion", "2", "--k", "4", "-o", str(output),
                       "--quiet", env=forge_env)

    assert result.returncode == 0, result.stderr
    assert "1000 tokens give only 1 Adam steps per layer" in result.stderr


# The real model


@pytest.mark.slow
def test_train_smollm2_small_budget(real_model_cache, tmp_path, forge_env, text_data):
    forge_env["FORGE_CACHE"] = str(real_model_cache)
    output = tmp_path / "saes"
    result = run_forge("edit", "sae", "train", "--model", "smollm2-135m", "--data", str(text_data),
                       "--layers", "0,29", "--tokens", "3000", "--steps", "40", "--batch-size", "512",
                       "-o", str(output), "--quiet", "--json", env=forge_env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["layers"]

    assert [(row["layer"], row["d_in"], row["d_sae"], row["k"]) for row in rows] == [(0, 576, 4608, 32),
                                                                                      (29, 576, 4608, 32)]
    for row in rows:
        assert row["explained_variance"] > 0.5, row
    info = run_forge("edit", "sae", "info", str(output), "--model", "smollm2-135m", env=forge_env)
    assert info.returncode == 0, info.stderr
    assert "layer  29  blocks.29.hook_resid_post  topk  d_in 576  d_sae 4608  k 32" in info.stdout
