"""forge transfer make-test-target: exact re-parameterisations keep the logits and map task vectors exactly."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import FORGE
from llmforge.errors import ForgeError
from llmforge_transfer.reparam import (
    build_target_model,
    draw_reparameterisation,
    llama_shape,
    make_test_target,
    map_task_vector,
    reparameterise,
)


def _load(directory, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


INPUT_IDS = torch.tensor([[1, 17, 400, 2301, 77, 5, 9000, 12], [3, 3, 80, 801, 1234, 42, 7, 600]])


@pytest.mark.parametrize("permute", [False, True])
def test_reparameterised_logits_unchanged(tiny_model_dir, permute):
    source = _load(tiny_model_dir)
    shape = llama_shape(source.config)
    spec = draw_reparameterisation(shape, seed=3, permute_mlp=permute, permute_heads=permute)
    target = build_target_model(source, spec, shape)

    difference = (_logits(source, INPUT_IDS) - _logits(target, INPUT_IDS)).abs().max()
    # HF RMSNorm computes in float32 even in a float64 model, so the match is to about 1e-7.
    assert float(difference) < 1e-6
    assert not target.config.tie_word_embeddings


def test_reparameterised_weights_differ(tiny_model_dir):
    source = _load(tiny_model_dir)
    shape = llama_shape(source.config)
    spec = draw_reparameterisation(shape, seed=3, permute_mlp=True, permute_heads=True)
    state = reparameterise(source.state_dict(), spec, shape)

    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(state[name], source.state_dict()[name])
    assert torch.equal(state["model.norm.weight"], torch.ones(shape["hidden"], dtype=torch.float64))
    rotation = spec.rotation
    assert torch.allclose(rotation @ rotation.T, torch.eye(shape["hidden"], dtype=torch.float64), atol=1e-12)


def test_head_permutation_keeps_groups(tiny_model_dir):
    source = _load(tiny_model_dir)
    shape = llama_shape(source.config)
    spec = draw_reparameterisation(shape, seed=1, permute_mlp=False, permute_heads=True)
    permuted = [layer for layer in range(shape["layers"])
                if not torch.equal(spec.kv_head_permutations[layer], torch.arange(shape["kv_heads"]))]
    assert permuted, "seed 1 should permute the key/value heads of some layer"


def test_mapped_vector_reproduces_tuned_logits(tiny_model_dir):
    source = _load(tiny_model_dir)
    shape = llama_shape(source.config)
    spec = draw_reparameterisation(shape, seed=5, permute_mlp=True, permute_heads=True)
    base_state = source.state_dict()
    generator = torch.Generator().manual_seed(0)
    vector = {name: 0.05 * torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
              for name, tensor in base_state.items() if name != "lm_head.weight"}
    assert source.config.tie_word_embeddings, "the fixture should have tied embeddings"

    tuned = _load(tiny_model_dir)
    tuned.load_state_dict({name: base_state[name] + vector[name] for name in vector}, strict=False)
    target = build_target_model(source, spec, shape)
    mapped = map_task_vector(base_state, vector, spec, shape)
    target.load_state_dict({name: tensor + mapped[name] for name, tensor in target.state_dict().items()})

    difference = (_logits(tuned, INPUT_IDS) - _logits(target, INPUT_IDS)).abs().max()
    assert float(difference) < 1e-6
    assert float(mapped["model.norm.weight"].abs().max()) == 0.0


def test_mapped_vector_rejects_unknown_tensor(tiny_model_dir):
    source = _load(tiny_model_dir)
    shape = llama_shape(source.config)
    spec = draw_reparameterisation(shape, seed=0, permute_mlp=False, permute_heads=False)
    with pytest.raises(ForgeError, match="model.layers.9.mlp.up_proj.weight"):
        map_task_vector(source.state_dict(), {"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}, spec, shape)


def test_make_test_target_writes_loadable_model(tiny_model_dir, tmp_path):
    output = tmp_path / "target"
    record = make_test_target(str(tiny_model_dir), output, seed=2, permute_mlp=True, permute_heads=True)

    assert record["max_relative_logit_difference"] < 1e-5
    assert (output / "forge_run.json").is_file()
    target = _load(output)
    difference = (_logits(_load(tiny_model_dir), INPUT_IDS) - _logits(target, INPUT_IDS)).abs().max()
    assert float(difference) < 1e-4


def test_make_test_target_cli(tiny_model_dir, tmp_path, forge_env):
    output = tmp_path / "target"
    result = subprocess.run([str(FORGE), "transfer", "make-test-target", "--model", str(tiny_model_dir), "-o",
                             str(output), "--permute-mlp", "--json"], capture_output=True, text=True, env=forge_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["permute_mlp"] is True

    again = subprocess.run([str(FORGE), "transfer", "make-test-target", "--model", str(tiny_model_dir), "-o",
                            str(output)], capture_output=True, text=True, env=forge_env)
    assert again.returncode == 1
    assert "already exists" in again.stderr
