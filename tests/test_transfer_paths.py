"""forge transfer: --align activations, --layer-map with a depth mismatch, naive shape errors and the command."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import FORGE
from llmforge.checkpoint import load_task_vector, save_task_vector
from llmforge.errors import ForgeError
from llmforge.models import model_digest
from llmforge_transfer.transfer import TRANSPORTED_VECTOR
import test_transfer_reparam
from test_transfer_reparam import _load, _low_rank_vector, _relative_error, _transfer

# The fixtures of the bico tests: calibration text and a rotated, permuted target with its exact vector.
calib_file = test_transfer_reparam.calib_file
rotated_pair = test_transfer_reparam.rotated_pair


def _run_forge(*args, env):
    return subprocess.run([str(FORGE), *args], capture_output=True, text=True, env=env, timeout=300)


def _save_vector(path, vector, base_dir):
    save_task_vector(path, {name: update.to(torch.float32) for name, update in vector.items()},
                     base_digest=model_digest(str(base_dir)), tuned_digest="sha256:test")
    return path


def _split_error(transported, exact, kinds):
    subset = {name: update for name, update in exact.items() if any(kind in name for kind in kinds)}
    return _relative_error(transported, subset)


# --align activations


def test_activations_exact_except_widening_layers(rotated_pair, calib_file, tmp_path):
    source_dir, target_dir, vector_file, exact = rotated_pair
    record = _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out", align="activations")

    transported, metadata = load_task_vector(tmp_path / "out" / TRANSPORTED_VECTOR)
    assert metadata["align"] == "activations"
    assert max(layer["input_residual"] for layer in record["layers"].values()) < 1e-8
    # On an exact re-parameterisation the outputs y = W x move by the same orthogonal map as the
    # gradients, so layers no wider at the output than at the input get exact maps, q/k included.
    narrowing = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head")
    assert _split_error(transported, exact, narrowing) < 1e-4
    # gate/up map 32 inputs to 64 outputs: y spans only 32 of the 64 output directions, so the
    # output map is not determined in the rest, and a rank warning reports it.
    assert _split_error(transported, exact, ("gate_proj", "up_proj")) > 1e-2
    assert any("mlp.gate_proj: the output cross-covariance has rank 32 of 64" in warning
               for warning in record["warnings"])


# --layer-map with a target made by dropping a layer


@pytest.fixture(scope="module")
def deep_pair(tmp_path_factory, smollm2_tokenizer_dir):
    """(4-layer source dir, 3-layer target dir): the target consists of source layers 0, 1 and 3 unchanged."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    source = LlamaForCausalLM(config)
    source_dir = tmp_path_factory.mktemp("deep-source")
    source.save_pretrained(source_dir)
    tokenizer.save_pretrained(source_dir)

    config.num_hidden_layers = 3
    target = LlamaForCausalLM(config)
    source_layer_of = {0: 0, 1: 1, 2: 3}
    state = {}
    for name in target.state_dict():
        source_name = name
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            source_name = name.replace(f"model.layers.{index}.", f"model.layers.{source_layer_of[index]}.", 1)
        state[name] = source.state_dict()[source_name]
    target.load_state_dict(state)
    target_dir = tmp_path_factory.mktemp("deep-target")
    target.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    return source_dir, target_dir


@pytest.fixture
def deep_vector(deep_pair, tmp_path):
    source_dir, _ = deep_pair
    vector = _low_rank_vector(_load(source_dir).state_dict(), seed=2)
    # Only matrices: a norm-gain update would be folded into the readers' updates.
    vector = {name: update for name, update in vector.items() if name.startswith("model.layers.") and update.dim() == 2}
    return vector, _save_vector(tmp_path / "deep.tv.safetensors", vector, source_dir)


def _layer_updates(vector, source_layer, target_layer):
    prefix = f"model.layers.{source_layer}."
    return {name.replace(prefix, f"model.layers.{target_layer}.", 1): update
            for name, update in vector.items() if name.startswith(prefix) and update.dim() == 2}


def test_layer_map_file_picks_source_layer(deep_pair, deep_vector, calib_file, tmp_path):
    source_dir, target_dir = deep_pair
    vector, vector_file = deep_vector
    layer_map = tmp_path / "layers.json"
    layer_map.write_text(json.dumps({"0": 0, "1": 1, "2": 3}), encoding="utf-8")

    # The output gradients of layers 0 and 1 differ between the models, because the layers after them
    # differ. Their outputs do not, so --align activations must give identity maps there.
    record = _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out", align="activations",
                       layer_map=str(layer_map))
    transported, _ = load_task_vector(tmp_path / "out" / TRANSPORTED_VECTOR)

    assert record["layers"]["model.layers.1.mlp.down_proj"]["source"] == "model.layers.1.mlp.down_proj"
    assert record["layers"]["model.layers.2.mlp.down_proj"]["source"] == "model.layers.3.mlp.down_proj"
    # Layers 0 and 1 are identical in both models and see identical inputs, so their maps are
    # identities wherever the cross-covariance has full rank (not on the gate/up and o_proj outputs).
    full_rank = ("q_proj", "k_proj", "v_proj", "down_proj")
    assert _split_error(transported, _layer_updates(vector, 0, 0), full_rank) < 1e-6
    assert _split_error(transported, _layer_updates(vector, 1, 1), full_rank) < 1e-6


def test_layer_map_proportional_default(deep_pair, deep_vector, calib_file, tmp_path):
    source_dir, target_dir = deep_pair
    vector, vector_file = deep_vector

    record = _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out", align="activations")
    transported, _ = load_task_vector(tmp_path / "out" / TRANSPORTED_VECTOR)

    # Target layer j takes source layer round(j * 3 / 2): 0 -> 0, 1 -> 2 (Python rounds 1.5 to 2), 2 -> 3.
    assert record["layers"]["model.layers.1.mlp.down_proj"]["source"] == "model.layers.2.mlp.down_proj"
    assert record["layers"]["model.layers.2.mlp.down_proj"]["source"] == "model.layers.3.mlp.down_proj"
    assert _split_error(transported, _layer_updates(vector, 1, 1), ("q_proj", "k_proj", "v_proj", "down_proj")) > 0.5


def test_layer_map_file_out_of_range(deep_pair, deep_vector, calib_file, tmp_path):
    source_dir, target_dir = deep_pair
    _, vector_file = deep_vector
    layer_map = tmp_path / "layers.json"
    layer_map.write_text(json.dumps({"2": 7}), encoding="utf-8")

    with pytest.raises(ForgeError, match="target layer 2 to source layer 7"):
        _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out", layer_map=str(layer_map))
    assert not (tmp_path / "out").exists()


# The command, through a subprocess


def test_transfer_command_writes_loadable_model(rotated_pair, calib_file, tmp_path, forge_env):
    from transformers import AutoModelForCausalLM

    source_dir, target_dir, vector_file, _ = rotated_pair
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(source_dir), "--vector", str(vector_file), "--target-base",
                        str(target_dir), "--calib", str(calib_file), "--calib-tokens", "3000", "--dtype", "float64",
                        "-o", str(output), "--json", "--quiet", env=forge_env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["align"] == "bico"
    model = AutoModelForCausalLM.from_pretrained(str(output))
    assert model.config.num_hidden_layers == 2
    record = json.loads((output / "forge_run.json").read_text(encoding="utf-8"))
    layer = record["layers"]["model.layers.1.mlp.up_proj"]
    assert layer["source"] == "model.layers.1.mlp.up_proj"
    assert 0.0 <= layer["input_residual"] < 1e-6
    assert 0.0 <= layer["output_residual"] < 1e-6
    assert "output_residual" not in record["layers"]["lm_head"]


def test_transfer_command_warns_on_few_tokens(rotated_pair, calib_file, tmp_path, forge_env):
    source_dir, target_dir, vector_file, _ = rotated_pair
    result = _run_forge("transfer", "--source-base", str(source_dir), "--vector", str(vector_file), "--target-base",
                        str(target_dir), "--calib", str(calib_file), "--calib-tokens", "20", "-o",
                        str(tmp_path / "out"), env=forge_env)

    assert result.returncode == 0, result.stderr
    assert "has rank" in result.stderr
    assert "raise --calib-tokens" in result.stderr


def _assert_rejected(result, message, output):
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_command_rejects_vector_of_other_base(rotated_pair, calib_file, tmp_path, forge_env):
    _, target_dir, vector_file, _ = rotated_pair
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(target_dir), "--vector", str(vector_file), "--target-base",
                        str(target_dir), "--calib", str(calib_file), "-o", str(output), env=forge_env)
    _assert_rejected(result, "not the source base", output)


def test_command_rejects_other_tokenizer(rotated_pair, calib_file, tmp_path, forge_env):
    import shutil

    from transformers import AutoTokenizer

    source_dir, target_dir, vector_file, _ = rotated_pair
    other = tmp_path / "other-tokenizer"
    shutil.copytree(target_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<extra_transfer_token>"])
    tokenizer.save_pretrained(str(other))
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(source_dir), "--vector", str(vector_file), "--target-base",
                        str(other), "--calib", str(calib_file), "-o", str(output), env=forge_env)
    _assert_rejected(result, "tokenizers of", output)


def test_command_rejects_architecture_without_matching_layers(rotated_pair, calib_file, tmp_path, forge_env,
                                                               smollm2_tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    source_dir, _, vector_file, _ = rotated_pair
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(source_dir), "--vector", str(vector_file), "--target-base",
                        str(gpt2_dir), "--calib", str(calib_file), "-o", str(output), env=forge_env)
    _assert_rejected(result, "no linear layer of the target matches", output)


def test_command_naive_rejects_other_shape(tiny_model_dir, calib_file, tmp_path, forge_env):
    from transformers import AutoTokenizer, LlamaForCausalLM

    source = _load(tiny_model_dir)
    config = source.config
    config.intermediate_size = 48
    wide_dir = tmp_path / "narrow-mlp"
    LlamaForCausalLM(config).save_pretrained(wide_dir)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(wide_dir)
    vector = {name: update for name, update in _low_rank_vector(source.state_dict()).items() if "mlp" in name}
    vector_file = _save_vector(tmp_path / "mlp.tv.safetensors", vector, tiny_model_dir)
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(tiny_model_dir), "--vector", str(vector_file),
                        "--target-base", str(wide_dir), "--calib", str(calib_file), "--align", "naive", "-o",
                        str(output), env=forge_env)
    _assert_rejected(result, "model.layers.0.mlp.down_proj.weight has shape (32, 64) in the vector", output)


def test_command_naive_rejects_missing_tensor(deep_pair, deep_vector, calib_file, tmp_path, forge_env):
    source_dir, target_dir = deep_pair
    _, vector_file = deep_vector
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(source_dir), "--vector", str(vector_file), "--target-base",
                        str(target_dir), "--calib", str(calib_file), "--align", "naive", "-o", str(output),
                        env=forge_env)
    _assert_rejected(result, "the target has no tensor model.layers.3.", output)


def test_command_rejects_invalid_layer_map(rotated_pair, calib_file, tmp_path, forge_env):
    source_dir, target_dir, vector_file, _ = rotated_pair
    layer_map = tmp_path / "layers.json"
    layer_map.write_text("[0, 1]", encoding="utf-8")
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(source_dir), "--vector", str(vector_file), "--target-base",
                        str(target_dir), "--calib", str(calib_file), "--layer-map", str(layer_map), "-o",
                        str(output), env=forge_env)
    _assert_rejected(result, "invalid --layer-map", output)


@pytest.fixture
def lora_adapter(tiny_model_dir, tmp_path):
    """A real PEFT LoRA adapter on the tiny model, with non-zero B so that it changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    directory = tmp_path / "adapter"
    peft_model.save_pretrained(directory)
    merged = peft_model.merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    return directory, {name: merged[name] - base[name] for name in base if not torch.equal(merged[name], base[name])}


def test_command_takes_adapter_as_source_tuned(tiny_model_dir, lora_adapter, calib_file, tmp_path, forge_env):
    from safetensors.torch import load_file

    adapter, delta = lora_adapter
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(tiny_model_dir), "--source-tuned", str(adapter),
                        "--target-base", str(tiny_model_dir), "--calib", str(calib_file), "--align", "naive",
                        "-o", str(output), "--quiet", env=forge_env)

    assert result.returncode == 0, result.stderr
    transported = load_file(output / TRANSPORTED_VECTOR)
    assert sorted(transported) == sorted(delta)
    for name, update in delta.items():
        torch.testing.assert_close(transported[name], update, rtol=1e-5, atol=1e-7)


def test_command_rejects_adapter_of_other_base(rotated_pair, lora_adapter, calib_file, tmp_path, forge_env):
    _, target_dir, _, _ = rotated_pair
    adapter, _ = lora_adapter
    output = tmp_path / "out"
    result = _run_forge("transfer", "--source-base", str(target_dir), "--source-tuned", str(adapter),
                        "--target-base", str(target_dir), "--calib", str(calib_file), "-o", str(output), env=forge_env)
    _assert_rejected(result, "not on the source base", output)
