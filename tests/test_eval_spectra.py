"""Tests of `forge eval spectra`: closed forms of each diagnostic, the weight-update reader and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from llmforge.cache import Cache
from llmforge.cli import cli
from llmforge.errors import ForgeError

from conftest import requires_smollm2


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def finetune(model_dir, data, output, method: str, *extra: str):
    result = invoke("finetune", "--model", str(model_dir), "--data", str(data), "-o", str(output), "--steps", "3",
                    "--lr", "5e-2", "--method", method, "--no-bf16", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return output


def random_weight(rows: int, columns: int, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator)


def spectra_entries(cache: Cache) -> list:
    return [record for _, record in cache.records() if record and record["kind"] == "eval-spectra"]


# Closed forms


def test_rank_one_update_effective_rank():
    import torch

    from llmforge_eval.spectra import effective_rank

    column = torch.tensor([1.0, -2.0, 0.5, 3.0])
    row = torch.tensor([0.3, 1.0, -1.0])
    assert effective_rank(torch.outer(column, row)) == pytest.approx(1.0, abs=1e-6)


def test_equal_singular_values_effective_rank():
    import torch

    from llmforge_eval.spectra import effective_rank

    assert effective_rank(torch.diag(torch.tensor([2.0, 2.0, 0.0]))) == pytest.approx(2.0)
    # Singular values 2 and 1: (4 + 1) / 4.
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(1.25)
    assert effective_rank(torch.zeros(3, 2)) == 0.0


def test_scaled_weight_retention_profile():
    import torch

    from llmforge_eval.spectra import weight_profiles

    base = random_weight(8, 5)
    scale = 1.5
    profiles = weight_profiles(base, (scale - 1) * base)
    singular_values = torch.linalg.svdvals(base)

    assert torch.allclose(profiles["singular_values"], singular_values, atol=1e-5)
    assert torch.allclose(profiles["retention"], scale * singular_values, atol=1e-5)
    assert torch.allclose(profiles["drift"], abs(scale - 1) * singular_values, atol=1e-5)
    # dW v_i = (c - 1) W0 v_i = (c - 1) s_i u_i.
    assert torch.allclose(profiles["energy"], abs(scale - 1) * singular_values, atol=1e-5)


def test_single_input_direction_energy():
    import torch

    from llmforge_eval.spectra import weight_profiles

    base = random_weight(6, 4, seed=1)
    _, _, vh = torch.linalg.svd(base, full_matrices=False)
    direction = 2
    output_change = torch.tensor([1.0, 0.0, -2.0, 0.5, 0.0, 1.0])
    profiles = weight_profiles(base, torch.outer(output_change, vh[direction]))

    energy = profiles["energy"]
    assert energy[direction] == pytest.approx(float(output_change.norm()), rel=1e-5)
    for index in range(4):
        if index != direction:
            assert energy[index] == pytest.approx(0.0, abs=1e-5)


def test_moving_average_hand_example():
    import torch

    from llmforge_eval.spectra import moving_average

    values = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0, 0.0])
    # reflect: 2 3 | 1 3 2 5 4 0 | 4 5
    expected_reflect = torch.tensor([2.2, 2.8, 3.0, 2.8, 3.0, 3.6])
    # symmetric: 3 1 | 1 3 2 5 4 0 | 0 4
    expected_symmetric = torch.tensor([2.0, 2.4, 3.0, 2.8, 2.2, 2.6])
    # edge: 1 1 | 1 3 2 5 4 0 | 0 0
    expected_edge = torch.tensor([1.6, 2.4, 3.0, 2.8, 2.2, 1.8])

    assert torch.allclose(moving_average(values, 5, "reflect"), expected_reflect)
    assert torch.allclose(moving_average(values, 5, "symmetric"), expected_symmetric)
    assert torch.allclose(moving_average(values, 5, "edge"), expected_edge)
    assert torch.allclose(moving_average(values, 1, "reflect"), values)


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge"])
@pytest.mark.parametrize("length", [1, 2, 3, 4, 7])
def test_padding_matches_numpy(mode, length):
    import numpy

    from llmforge_eval.spectra import padded_indices

    expected = numpy.pad(numpy.arange(length), 3, mode=mode)
    assert padded_indices(length, 3, mode).tolist() == expected.tolist()


def test_smoothness_constant_and_linear():
    import torch

    from llmforge_eval.spectra import moving_average, smoothness

    assert smoothness(torch.full((9,), 4.0)) == 0.0

    ramp = torch.arange(10, dtype=torch.float64)
    average = moving_average(ramp)
    # Ends by hand: (2 + 1 + 0 + 1 + 2) / 5 = 1.2 and (1 + 0 + 1 + 2 + 3) / 5 = 1.4; the mirror image at the far end.
    assert average[0] == pytest.approx(1.2)
    assert average[1] == pytest.approx(1.4)
    assert average[-1] == pytest.approx(9 - 1.2)
    assert average[-2] == pytest.approx(8 - 0.4)
    assert torch.allclose(average[2:-2], ramp[2:-2])
    assert smoothness(ramp) == pytest.approx((1.2 + 0.4 + 0.4 + 1.2) / 10)
    # Scale-free with normalize="mean": the ramp's mean is 4.5.
    assert smoothness(3 * ramp, normalize="mean") == pytest.approx(0.32 / 4.5)


def test_settings_reject_bad_values():
    from llmforge_eval.spectra import SpectraSettings

    with pytest.raises(ForgeError, match="odd"):
        SpectraSettings(window=4)
    with pytest.raises(ForgeError, match="padding"):
        SpectraSettings(padding="wrap")


# Reading updates


@pytest.fixture
def edited_model_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny model whose layer-0 q_proj weight and embedding changed; nothing else did."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, directory)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"] * 1.5
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] + 0.1
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_directory_updates_skip_unchanged(tiny_model_dir, edited_model_dir):
    import torch

    from llmforge_eval.weights import weight_updates

    updates = list(weight_updates(str(edited_model_dir), str(tiny_model_dir)))
    # The embedding changed too, but it is not a linear weight.
    assert [update.name for update in updates] == ["model.layers.0.self_attn.q_proj.weight"]
    update = updates[0]
    assert update.module_type == "q_proj"
    assert update.layer == 0
    assert update.base.dtype == torch.float32
    assert torch.allclose(update.delta, 0.5 * update.base)


def test_directory_without_base_rejected(edited_model_dir):
    from llmforge_eval.weights import weight_updates

    with pytest.raises(ForgeError, match="--base"):
        list(weight_updates(str(edited_model_dir)))


def test_shape_mismatch_rejected(tiny_model_dir, edited_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmforge_eval.weights import weight_updates

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.intermediate_size = 48
    other = tmp_path / "other"
    LlamaForCausalLM(config).save_pretrained(other)
    with pytest.raises(ForgeError, match="has shape"):
        list(weight_updates(str(edited_model_dir), str(other)))


def test_identical_model_rejected(tiny_model_dir, tmp_path):
    from llmforge_eval.weights import weight_updates

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    # Same config and weights give the same digest, which is rejected before any tensor is read.
    with pytest.raises(ForgeError, match="same weights"):
        list(weight_updates(str(copy), str(tiny_model_dir)))


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_model_dir):
    """A LoRA (r=2) and an OFT adapter from `forge finetune` on the tiny model, with the cache they wrote."""
    root = tmp_path_factory.mktemp("spectra-runs")
    records = root / "qa.jsonl"
    records.write_text("".join(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
                               for a in range(3) for b in range(4)), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORGE_CACHE", str(root / "cache"))
        lora = finetune(tiny_model_dir, records, root / "lora", "lora", "--rank", "2")
        oft = finetune(tiny_model_dir, records, root / "oft", "oft")
    return {"lora": lora, "oft": oft, "cache": root / "cache", "data": records}


def test_adapter_merge_matches_task_vector(trained_runs):
    from llmforge_eval.weights import weight_updates

    trained_cache = Cache(trained_runs["cache"])
    for method in ("lora", "oft"):
        stored = {u.name: u.delta for u in weight_updates(str(trained_runs[method]), cache=trained_cache)}
        # The isolated cache has no task vector, so these come from peft's merge of each layer.
        merged = {u.name: u.delta for u in weight_updates(str(trained_runs[method]))}
        assert sorted(merged) == sorted(stored)
        assert len(merged) == 14
        for name in stored:
            assert (merged[name] - stored[name]).abs().max() < 1e-5, (method, name)


def test_adapter_with_other_base_rejected(trained_runs, edited_model_dir):
    from llmforge_eval.weights import weight_updates

    with pytest.raises(ForgeError, match="fine-tuned from"):
        list(weight_updates(str(trained_runs["lora"]), str(edited_model_dir)))


# Command line


def test_cli_report_plots_and_cache(trained_runs, tmp_path, isolated_cache, monkeypatch):
    import llmforge_eval.weights

    report_path = tmp_path / "out" / "spectra.json"
    args = ["eval", "spectra", "--model", str(trained_runs["lora"]), "--model", str(trained_runs["oft"]),
            "--quiet", "-o", str(report_path)]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.output
    assert "layer 1" in result.output

    report = json.loads(report_path.read_text())
    assert report["schema"] == "llmforge.eval.spectra/1"
    assert (tmp_path / "out" / "spectra-profiles.png").stat().st_size > 1000
    assert (tmp_path / "out" / "spectra-layers.png").stat().st_size > 1000
    lora, oft = report["models"]
    assert len(lora["weights"]) == 14
    assert max(weight["effective_rank"] for weight in lora["weights"]) <= 2 + 1e-4
    assert lora["summary"]["effective_rank"] > 1.0
    assert oft["summary"]["relative_norm"] > 0
    assert lora["base_digest"] == oft["base_digest"]
    assert sorted(lora["profiles"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(spectra_entries(Cache(isolated_cache))) == 2

    # A second run must come from the cache: reading weights would raise.
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read although the spectra are cached")

    monkeypatch.setattr(llmforge_eval.weights, "weight_updates", no_weights)
    again = invoke("eval", "spectra", "--model", str(trained_runs["lora"]), "--model", str(trained_runs["oft"]),
                   "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["models"][0]["weights"] == lora["weights"]
    assert len(spectra_entries(Cache(isolated_cache))) == 2


def test_cli_modules_filter(trained_runs, tmp_path):
    result = invoke("eval", "spectra", "--model", str(trained_runs["oft"]), "--modules", "q_proj,v_proj", "--json",
                    "--plots", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {weight["module_type"] for weight in report["models"][0]["weights"]} == {"q_proj", "v_proj"}
    assert (tmp_path / "plots" / "spectra-profiles.png").is_file()


def test_cli_unknown_module_fails(trained_runs, tmp_path):
    output = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["eval", "spectra", "--model", str(trained_runs["lora"]), "--modules", "qproj",
                                      "-o", str(output)])
    assert result.exit_code == 1
    assert "qproj" in result.output
    assert not output.exists()


@pytest.mark.slow
@requires_smollm2
def test_real_model_lora_spectra(real_model_cache, qa_data, tmp_path):
    adapter = finetune("smollm2-135m", qa_data, tmp_path / "lora", "lora", "--rank", "4", "--lr", "1e-3")
    result = invoke("eval", "spectra", "--model", str(adapter), "--json", "--quiet")
    assert result.exit_code == 0, result.output

    entry = json.loads(result.stdout)["models"][0]
    # SmolLM2-135M: 30 decoder layers with 7 linear weights each, all adapted by --target-modules all-linear.
    assert len(entry["weights"]) == 210
    assert max(weight["effective_rank"] for weight in entry["weights"]) <= 4 + 1e-3
    assert 0 < entry["summary"]["relative_norm"] < 1
    assert [row["group"] for row in entry["by_layer"]] == list(range(30))
