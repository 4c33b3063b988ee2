"""forge transfer --alpha-grid: the held-out search scores each alpha correctly, restores the weights and picks the best."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import FORGE
from llmforge.errors import ForgeError
from llmforge_transfer.alpha import held_out_loss, parse_alpha_grid, search_alpha
from llmforge_transfer.calibration import CalibrationSettings, calibration_batches
import test_transfer_reparam
from test_transfer_reparam import _load, _low_rank_vector

calib_file = test_transfer_reparam.calib_file
rotated_pair = test_transfer_reparam.rotated_pair


def test_alpha_grid_parsing():
    assert parse_alpha_grid("1, 0.5,1.5,0.5") == [0.0, 0.5, 1.0, 1.5]
    for text in ("half", "1,inf"):
        with pytest.raises(ForgeError, match="--alpha-grid"):
            parse_alpha_grid(text)


def test_search_scores_and_restores(tiny_model_dir, calib_file):
    from transformers import AutoTokenizer

    model = _load(tiny_model_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    vector = _low_rank_vector(before, scale=0.5, seed=3)
    batches = calibration_batches(str(calib_file), AutoTokenizer.from_pretrained(tiny_model_dir),
                                  CalibrationSettings(calib_tokens=400, batch_size=4))
    grid = [0.0, 0.5, 2.0]

    best, scores = search_alpha(model, vector, grid, batches)

    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=1e-12)
    for alpha in grid:
        shifted = _load(tiny_model_dir)
        # The head is tied to the embedding, so it is left out: loading it would undo the embedding update.
        shifted.load_state_dict({name: tensor + alpha * vector.get(name, torch.zeros_like(tensor))
                                 for name, tensor in before.items() if name != "lm_head.weight"}, strict=False)
        assert scores[repr(alpha)] == pytest.approx(held_out_loss(shifted, batches), rel=1e-9)
    assert scores[repr(best)] == min(scores.values())
    assert len(set(scores.values())) == len(grid)


def test_command_applies_best_alpha(rotated_pair, calib_file, tmp_path, forge_env):
    from safetensors.torch import load_file

    source_dir, target_dir, vector_file, _ = rotated_pair
    common = ["transfer", "--source-base", str(source_dir), "--vector", str(vector_file), "--target-base",
              str(target_dir), "--calib", str(calib_file), "--calib-tokens", "1500", "--quiet"]

    lonely = subprocess.run([str(FORGE), *common, "--alpha-grid", "0.5,1", "-o", str(tmp_path / "bad")],
                            capture_output=True, text=True, env=forge_env, timeout=300)
    assert lonely.returncode == 1
    assert "--alpha-grid and --alpha-data go together" in lonely.stderr
    assert not (tmp_path / "bad").exists()

    result = subprocess.run([str(FORGE), *common, "--alpha-grid", "0.5,1", "--alpha-data", str(calib_file),
                             "-o", str(tmp_path / "out"), "--json"],
                            capture_output=True, text=True, env=forge_env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout)
    losses = record["alpha_search"]["losses"]
    assert set(losses) == {"0.0", "0.5", "1.0"}
    assert losses[repr(record["alpha"])] == min(losses.values())

    transported = load_file(tmp_path / "out" / "transported_vector.safetensors")
    written = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(target_dir / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(written[name], base[name] + record["alpha"] * transported[name], rtol=1e-5, atol=1e-6)
