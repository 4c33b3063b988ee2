"""forge transfer on exact re-parameterisations: bico must recover the known transported vector."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmforge.checkpoint import load_task_vector, save_task_vector
from llmforge.errors import ForgeError
from llmforge.models import model_digest
from llmforge_transfer.calibration import CalibrationSettings, match_linear_layers
from llmforge_transfer.reparam import draw_reparameterisation, llama_shape, make_test_target, map_task_vector
from llmforge_transfer.transfer import TRANSPORTED_VECTOR, TransferRequest, run_transfer

WORDS = ("river stone green quickly seven music paper under bright window table sings old new castle "
         "moon dance logic number eleven garden silver cold warm market travel").split()


@pytest.fixture
def calib_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "calib.jsonl"
    lines = []
    for _ in range(60):
        indices = torch.randint(len(WORDS), (30,), generator=generator).tolist()
        lines.append(json.dumps({"text": " ".join(WORDS[i] for i in indices)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float64).eval()


def _low_rank_vector(state, rank=2, scale=0.05, seed=0):
    """A seeded random update: rank-2 on every matrix, dense on norm gains; no lm_head (the source is tied)."""
    generator = torch.Generator().manual_seed(seed)
    vector = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        if tensor.dim() == 2:
            left = torch.randn(tensor.shape[0], rank, generator=generator, dtype=torch.float64)
            right = torch.randn(rank, tensor.shape[1], generator=generator, dtype=torch.float64)
            vector[name] = scale * left @ right / rank
        else:
            vector[name] = scale * torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
    return vector


@pytest.fixture
def rotated_pair(tiny_model_dir, tmp_path):
    """(source dir, target dir, source vector file, exact target vector) for a rotated and permuted target."""
    target_dir = tmp_path / "target"
    make_test_target(str(tiny_model_dir), target_dir, seed=4, permute_mlp=True, permute_heads=True)
    source = _load(tiny_model_dir)
    shape = llama_shape(source.config)
    spec = draw_reparameterisation(shape, seed=4, permute_mlp=True, permute_heads=True)
    state = {name: tensor.to(torch.float32).to(torch.float64) for name, tensor in source.state_dict().items()}
    vector = _low_rank_vector(state)
    exact = map_task_vector(state, vector, spec, shape)

    vector_file = tmp_path / "source.tv.safetensors"
    save_task_vector(vector_file, {name: update.to(torch.float32) for name, update in vector.items()},
                     base_digest=model_digest(str(tiny_model_dir)), tuned_digest="sha256:test")
    return tiny_model_dir, target_dir, vector_file, exact


def _transfer(source_dir, target_dir, vector_file, calib, output, align="bico", tokens=3000, layer_map="proportional"):
    settings = CalibrationSettings(calib_tokens=tokens, dtype="float64", batch_size=8, layer_map=layer_map)
    request = TransferRequest(source_base=str(source_dir), target_base=str(target_dir), calib=str(calib),
                              output=output, vector=str(vector_file), align=align, settings=settings)
    return run_transfer(request, command=["test"])


def _relative_error(transported, exact):
    numerator = sum(float((transported.get(name, torch.zeros_like(update)).double() - update).square().sum())
                    for name, update in exact.items())
    return (numerator / sum(float(update.square().sum()) for update in exact.values())) ** 0.5


def test_bico_recovers_exact_vector(rotated_pair, calib_file, tmp_path):
    source_dir, target_dir, vector_file, exact = rotated_pair
    record = _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out")

    transported, metadata = load_task_vector(tmp_path / "out" / TRANSPORTED_VECTOR)
    assert metadata["base_digest"] == model_digest(str(target_dir))
    assert _relative_error(transported, exact) < 1e-4
    assert record["warnings"] == []
    assert max(layer["input_residual"] for layer in record["layers"].values()) < 1e-8


def test_bico_matches_tuned_logits(rotated_pair, calib_file, tmp_path):
    source_dir, target_dir, vector_file, _ = rotated_pair
    _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out")

    tuned = _load(source_dir)
    vector, _ = load_task_vector(vector_file)
    tuned.load_state_dict({name: tuned.state_dict()[name] + update.double() for name, update in vector.items()},
                          strict=False)
    transferred = _load(tmp_path / "out")
    input_ids = torch.tensor([[1, 200, 3000, 45, 9, 77, 5000, 12]])
    with torch.no_grad():
        expected = torch.log_softmax(tuned(input_ids=input_ids).logits, -1)
        actual = torch.log_softmax(transferred(input_ids=input_ids).logits, -1)
    kl = float((expected.exp() * (expected - actual)).sum(-1).mean())
    assert kl < 1e-6


def test_naive_is_far_off(rotated_pair, calib_file, tmp_path):
    source_dir, target_dir, vector_file, exact = rotated_pair
    _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out", align="naive")

    transported, _ = load_task_vector(tmp_path / "out" / TRANSPORTED_VECTOR)
    assert _relative_error(transported, exact) > 0.5


def test_identity_target_gives_identity_maps(tiny_model_dir, calib_file, tmp_path):
    source = _load(tiny_model_dir)
    vector = _low_rank_vector(source.state_dict(), seed=1)
    vector = {name: update for name, update in vector.items() if update.dim() == 2}
    vector_file = tmp_path / "source.tv.safetensors"
    save_task_vector(vector_file, {name: update.to(torch.float32) for name, update in vector.items()},
                     base_digest=model_digest(str(tiny_model_dir)), tuned_digest="sha256:test")
    target_dir = tmp_path / "same"
    shutil.copytree(tiny_model_dir, target_dir)

    record = _transfer(tiny_model_dir, target_dir, vector_file, calib_file, tmp_path / "out")
    transported, _ = load_task_vector(tmp_path / "out" / TRANSPORTED_VECTOR)
    expected = dict(vector)
    assert _relative_error(transported, expected) < 1e-6
    assert max(layer["output_residual"] for layer in record["layers"].values() if "output_residual" in layer) < 1e-8


def test_vector_of_other_base_rejected(rotated_pair, calib_file, tmp_path):
    source_dir, target_dir, vector_file, _ = rotated_pair
    with pytest.raises(ForgeError, match="not the source base"):
        _transfer(target_dir, target_dir, vector_file, calib_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_mismatch_rejected(rotated_pair, calib_file, tmp_path):
    from transformers import AutoTokenizer

    source_dir, target_dir, vector_file, _ = rotated_pair
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    tokenizer.add_tokens(["<extra_transfer_token>"])
    tokenizer.save_pretrained(str(target_dir))
    with pytest.raises(ForgeError, match="tokenizers .* differ"):
        _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_few_tokens_warn_with_rank(rotated_pair, calib_file, tmp_path):
    source_dir, target_dir, vector_file, _ = rotated_pair
    record = _transfer(source_dir, target_dir, vector_file, calib_file, tmp_path / "out", tokens=20)
    assert any("has rank" in warning for warning in record["warnings"])


def test_no_matching_layers_rejected():
    with pytest.raises(ForgeError, match="no linear layer"):
        match_linear_layers(["model.layers.0.mlp.fc1"], ["model.layers.0.self_attn.q_proj", "lm_head"])
