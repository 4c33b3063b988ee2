"""forge edit layers and apply: the specificity score, layer ranking, layer-selective edits and the SAE projection."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import FORGE
from llmforge.cache import Cache
from llmforge.cli import cli
from llmforge.errors import ForgeError
from llmforge_edit.activations import ActivationRequest, TextSource, cached_activations, hook_name
from llmforge_edit.apply import (MERGED_SUBDIRECTORY, PROJECTED_VECTOR_NAME, ApplyRequest, apply_vector,
                                 choose_layers, feature_basis, project_update, project_vector,
                                 residual_side)
from llmforge_edit.layers import (FeatureStatistics, LayerScoreRequest, feature_statistics, rank_layers,
                                  read_layer_scores, score_layer, score_layers)
from llmforge_edit.merge import layer_index
from llmforge_edit.sae import SparseAutoencoder
from llmforge_edit.saelens import write_sae
from llmforge_edit.vectors import TaskVectorFile

TASK_WORDS = "zero one two three four five six seven eight nine plus minus equals sum".split()
GENERAL_WORDS = ("river stone light garden market winter paper music green quiet doctor train window bread "
                 "orange forest letter mountain ocean cloud silver teacher").split()
HIDDEN = 32
LAYERS = 4
PLANTED_LAYER = 2


def write_paragraphs(path: Path, words: list[str], seed: int) -> Path:
    rng = random.Random(seed)
    paragraphs = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(60)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def identity_sae(width: int) -> SparseAutoencoder:
    """A ReLU SAE whose features are the input coordinates: encode(x) = relu(x)."""
    return SparseAutoencoder(W_enc=torch.eye(width), b_enc=torch.zeros(width), W_dec=torch.eye(width),
                             b_dec=torch.zeros(width), architecture="standard")


def background_sae(generator: torch.Generator, d_in: int = HIDDEN, d_sae: int = 16) -> SparseAutoencoder:
    """A ReLU SAE whose features fire on every token with almost the same value, so their s_j is near 0."""
    decoder = torch.randn(d_sae, d_in, generator=generator)
    return SparseAutoencoder(W_enc=torch.randn(d_in, d_sae, generator=generator) * 0.01, b_enc=torch.ones(d_sae),
                             W_dec=decoder / decoder.norm(dim=-1, keepdim=True), b_dec=torch.zeros(d_in),
                             architecture="standard")


def save_sae(directory: Path, layer: int, sae: SparseAutoencoder) -> None:
    config = {"architecture": "standard", "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
              "hook_name": hook_name(layer), "hook_layer": layer, "apply_b_dec_to_input": True,
              "normalize_activations": "none"}
    write_sae(directory / hook_name(layer), sae, config)


def planted_sae_dir(directory: Path, model: Path, texts: dict[str, Path], planted: int, cache: Cache,
                    d_in: int = HIDDEN, d_sae: int = 16) -> Path:
    """Write one background SAE per layer; at layer `planted`, feature 0 reads the task-minus-general mean direction."""
    generator = torch.Generator().manual_seed(planted)
    for layer in range(LAYERS):
        sae = background_sae(generator, d_in, d_sae)
        if layer == planted:
            means = {}
            for side in ("task", "general"):
                request = ActivationRequest(str(model), TextSource(str(texts[side])), tokens=1500, max_length=64,
                                            progress=False)
                means[side] = cached_activations(request, [layer], cache=cache)[0][layer].float().mean(dim=0)
            direction = (means["task"] - means["general"]) / (means["task"] - means["general"]).norm()
            sae.W_enc[:, 0] = direction
            sae.b_enc[0] = -float(direction @ (means["task"] + means["general"])) / 2
        save_sae(directory, layer, sae)
    return directory


def score_request(model: Path, saes: Path, texts: dict[str, Path], **options) -> LayerScoreRequest:
    return LayerScoreRequest(model=str(model), sae_dir=saes, task=TextSource(str(texts["task"])),
                             general=TextSource(str(texts["general"])), tokens=1500, max_length=64, top_m=4,
                             progress=False, **options)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def invoke(*args) -> "object":
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer_dir):
    """A random 4-layer Llama, task and general text, SAEs with a task feature planted at layer 2, scores and a vector."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmforge.checkpoint import save_task_vector
    from llmforge.models import model_digest

    root = tmp_path_factory.mktemp("edit-layers")
    cache = Cache(root / "cache")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = root / "model"
    LlamaForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)

    texts = {"task": write_paragraphs(root / "task.txt", TASK_WORDS, 0),
             "general": write_paragraphs(root / "general.txt", GENERAL_WORDS, 1)}
    saes = planted_sae_dir(root / "saes", model, texts, PLANTED_LAYER, cache)
    scores_path = root / "scores.json"
    record = score_layers(score_request(model, saes, texts, output=scores_path), cache=cache)

    generator = torch.Generator().manual_seed(7)
    vector = {name: torch.randn(tensor.shape, generator=generator) * 0.01 for name, tensor in read_weights(model).items()}
    vector_path = root / "tv.safetensors"
    save_task_vector(vector_path, vector, base_digest=model_digest(str(model), cache=cache), tuned_digest="sha256:tuned",
                     extra={"layout": "dense"})
    return {"root": root, "cache": cache, "model": model, "texts": texts, "saes": saes, "scores": scores_path,
            "record": record, "vector": vector_path}


# The score


def test_score_matches_hand_computation():
    sae = identity_sae(4)
    task = torch.tensor([[1.0, -1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [2.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    general = torch.tensor([[1.0, 5.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    task_stats, general_stats = feature_statistics(sae, task), feature_statistics(sae, general)

    assert task_stats.mean.tolist() == [1.5, 0.0, 1.0, 0.25]
    assert task_stats.rate.tolist() == [0.75, 0.0, 0.5, 0.25]
    assert general_stats.mean.tolist() == [1.0, 3.0, 0.5, 0.0]
    # s = (1.5 - 1) / 2.5 = 0.2 for feature 0 and (1 - 0.5) / 1.5 = 1/3 for feature 2. Feature 3
    # (s = 1) fires on 25% of the task tokens, below the 30% floor, and feature 1 never fires on task text.
    result = score_layer(task_stats, general_stats, statistic="mean", top_m=2, min_rate=0.3, eps=0.0)
    assert result["score"] == pytest.approx((0.2 + 1 / 3) / 2)
    assert [item["feature"] for item in result["top_features"]] == [2, 0]
    assert result["top_features"][0]["specificity"] == pytest.approx(1 / 3)
    assert result["eligible_features"] == 2
    assert result["task_features"] == 2


def test_rare_feature_saturates_without_floor():
    task = FeatureStatistics(torch.tensor([1.5, 0.0, 1.0, 0.25], dtype=torch.float64),
                             torch.tensor([0.75, 0.0, 0.5, 0.25], dtype=torch.float64), 4)
    general = FeatureStatistics(torch.tensor([1.0, 3.0, 0.5, 0.0], dtype=torch.float64),
                                torch.tensor([1.0, 1.0, 0.5, 0.0], dtype=torch.float64), 2)
    result = score_layer(task, general, statistic="mean", top_m=1, min_rate=0.0, eps=1e-6)

    assert result["top_features"][0]["feature"] == 3
    assert result["score"] == pytest.approx(0.25 / (0.25 + 1e-6))
    assert result["eligible_features"] == 3


def test_rate_statistic_hand_computation():
    task = FeatureStatistics(torch.tensor([1.5, 0.0], dtype=torch.float64), torch.tensor([0.75, 0.5], dtype=torch.float64), 4)
    general = FeatureStatistics(torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.25], dtype=torch.float64), 2)
    result = score_layer(task, general, statistic="rate", top_m=2, min_rate=0.0, eps=0.0)

    # Feature 0: (0.75 - 1) / 1.75 = -1/7. Feature 1: (0.5 - 0.25) / 0.75 = 1/3.
    assert [item["feature"] for item in result["top_features"]] == [1, 0]
    assert result["score"] == pytest.approx((1 / 3 - 1 / 7) / 2)
    assert result["task_features"] == 1


def test_no_eligible_feature_leaves_layer_unscored():
    stats = FeatureStatistics(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 10)
    result = score_layer(stats, stats, statistic="mean", top_m=2, min_rate=0.01, eps=1e-6)

    assert result["score"] is None
    assert result["top_features"] == []


def test_rank_layers_orders_and_skips_unscored():
    rows = [{"layer": 0, "score": 0.1}, {"layer": 1, "score": None}, {"layer": 2, "score": 0.5},
            {"layer": 3, "score": 0.1}]
    ranking = rank_layers(rows)

    assert ranking == [2, 0, 3]
    assert [row["rank"] for row in rows] == [2, None, 1, 3]


# forge edit layers on the tiny model


def test_planted_feature_ranks_layer_first(setup):
    record = setup["record"]
    by_layer = {row["layer"]: row for row in record["layers"]}

    assert record["ranking"][0] == PLANTED_LAYER
    assert by_layer[PLANTED_LAYER]["rank"] == 1
    assert by_layer[PLANTED_LAYER]["top_features"][0]["feature"] == 0
    assert by_layer[PLANTED_LAYER]["score"] > 0.1
    for layer in set(range(LAYERS)) - {PLANTED_LAYER}:
        assert abs(by_layer[layer]["score"]) < 0.02, by_layer[layer]


def test_planted_layer_zero_ranks_first(setup, tmp_path):
    saes = planted_sae_dir(tmp_path / "saes", setup["model"], setup["texts"], 0, setup["cache"])
    record = score_layers(score_request(setup["model"], saes, setup["texts"]), cache=setup["cache"])

    assert record["ranking"][0] == 0
    assert record["task_data"]["layers_from_cache"] == LAYERS


def test_scores_file_contents(setup):
    from llmforge.checkpoint import file_digest
    from llmforge.models import model_digest

    record = read_layer_scores(setup["scores"])

    assert (record["format"], record["format_version"]) == ("llmforge.edit.layer_scores", 1)
    assert record["model_digest"] == model_digest(str(setup["model"]))
    assert record["sae_dir"] == str(setup["saes"].resolve())
    assert record["task_data"]["digest"] == file_digest(setup["texts"]["task"])
    assert record["general_data"]["digest"] == file_digest(setup["texts"]["general"])
    assert record["task_data"]["tokens"] == 1500
    assert record["options"] == {"statistic": "mean", "top_m": 4, "min_rate": 0.01, "eps": 1e-6, "tokens": 1500,
                                 "max_length": 64, "skip_bos": True, "dtype": "bf16", "hook": "blocks.L.hook_resid_post"}
    assert [entry["layer"] for entry in record["saes"]] == list(range(LAYERS))
    for row in record["layers"]:
        assert len(row["top_features"]) == 4
        assert {"feature", "specificity", "mu_task", "mu_general"} <= set(row["top_features"][0])


def test_layers_command_table_json_and_plot(setup, tmp_path):
    options = ["edit", "layers", "--model", setup["model"], "--sae", setup["saes"], "--task-data",
               setup["texts"]["task"], "--general-data", setup["texts"]["general"], "--tokens", 1500,
               "--max-length", 64, "--top-m", 4, "--quiet"]
    table = invoke(*options, "-o", tmp_path / "scores.json", "--plot", tmp_path / "scores.png")
    assert table.exit_code == 0, table.output
    document = invoke(*options, "--json")
    assert document.exit_code == 0, document.output

    assert "layer    score  rank  task features  eligible" in table.output
    assert f"ranking (best first): {PLANTED_LAYER}," in table.output
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(document.output)["ranking"] == json.loads((tmp_path / "scores.json").read_text())["ranking"]


def test_layers_rejects_sae_width_mismatch(setup, tmp_path):
    save_sae(tmp_path / "wide", 1, background_sae(torch.Generator().manual_seed(0), d_in=48))
    result = invoke("edit", "layers", "--model", setup["model"], "--sae", tmp_path / "wide", "--task-data",
                    setup["texts"]["task"], "--general-data", setup["texts"]["general"], "-o", tmp_path / "s.json")

    assert result.exit_code == 1
    assert "d_in=48" in result.output
    assert "hidden size is 32" in result.output
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--top-m", "0", "invalid --top-m 0"),
    ("--min-rate", "1.5", "invalid --min-rate 1.5"),
    ("--eps", "0", "invalid --eps 0"),
])
def test_layers_rejects_bad_option(setup, tmp_path, option, value, message):
    result = invoke("edit", "layers", "--model", setup["model"], "--sae", setup["saes"], "--task-data",
                    setup["texts"]["task"], "--general-data", setup["texts"]["general"], option, value)

    assert result.exit_code == 1
    assert message in result.output


# Choosing layers


def test_random_k_reproducible_by_seed():
    first = choose_layers("random-k", 5, num_layers=30, seed=3)
    again = choose_layers("random-k", 5, num_layers=30, seed=3)
    others = {tuple(choose_layers("random-k", 5, num_layers=30, seed=seed)) for seed in range(4, 10)}

    assert first == again
    assert len(first) == len(set(first)) == 5
    assert all(0 <= layer < 30 for layer in first)
    assert len(others | {tuple(first)}) > 1


def test_top_and_bottom_k_follow_ranking():
    scores = {"ranking": [4, 1, 7, 0]}

    assert choose_layers("top-k", 2, num_layers=8, scores=scores) == [1, 4]
    assert choose_layers("bottom-k", 2, num_layers=8, scores=scores) == [0, 7]
    assert choose_layers("all", None, num_layers=3) == [0, 1, 2]


def test_select_list():
    assert choose_layers("3,7,12-14", None, num_layers=20) == [3, 7, 12, 13, 14]
    with pytest.raises(ForgeError, match="layer 20 in --select is out of range"):
        choose_layers("2,20", None, num_layers=20)
    with pytest.raises(ForgeError, match="invalid --select 'best'"):
        choose_layers("best", None, num_layers=20)


# The projection


def test_feature_basis_is_orthonormal_span():
    rows = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    basis = feature_basis(rows)

    assert basis.shape == (3, 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(basis @ (basis.T @ rows.T), rows.T, rtol=0, atol=1e-5)


def test_residual_side_classification():
    assert residual_side("model.layers.0.self_attn.o_proj.weight", (32, 32), 32) == "write"
    assert residual_side("model.layers.0.self_attn.q_proj.weight", (32, 32), 32) == "read"
    assert residual_side("model.layers.0.mlp.down_proj.weight", (32, 64), 32) == "write"
    assert residual_side("model.layers.0.mlp.up_proj.weight", (64, 32), 32) == "read"
    assert residual_side("model.layers.0.input_layernorm.weight", (32,), 32) == "vector"
    assert residual_side("model.layers.0.self_attn.k_proj.bias", (16,), 32) is None
    assert residual_side("model.layers.0.self_attn.q_proj.bias", (32,), 32) is None
    assert residual_side("model.layers.0.self_attn.o_proj.bias", (32,), 32) == "vector"
    assert residual_side("model.layers.0.mixer.proj.weight", (32, 32), 32) is None


def test_projected_update_lies_in_span():
    generator = torch.Generator().manual_seed(0)
    basis = feature_basis(torch.randn(5, 32, generator=generator))
    complement = torch.eye(32) - basis @ basis.T
    write = project_update(torch.randn(32, 64, generator=generator), basis, "write")
    read = project_update(torch.randn(64, 32, generator=generator), basis, "read")
    vector = project_update(torch.randn(32, generator=generator), basis, "vector")

    assert float((complement @ write).abs().max()) < 1e-5
    assert float((read @ complement).abs().max()) < 1e-5
    assert float((complement @ vector).abs().max()) < 1e-5


def test_projection_energy_full_and_partial(setup):
    generator = torch.Generator().manual_seed(1)
    with TaskVectorFile(setup["vector"]) as vector:
        _, full = project_vector(vector, [1, 2], {1: torch.eye(HIDDEN), 2: torch.eye(HIDDEN)}, HIDDEN)
        partial_basis = feature_basis(torch.randn(8, HIDDEN, generator=generator))
        _, partial = project_vector(vector, [1], {1: partial_basis}, HIDDEN)

    assert full["energy_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert all(row["dropped_tensors"] == [] for row in full["layers"])
    assert [row["energy_fraction"] for row in full["layers"]] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert 0.0 < partial["energy_fraction"] < 1.0
    assert partial["layers"][0]["basis_rank"] == 8
    assert partial["layers"][0]["isotropic_fraction"] == 8 / HIDDEN


# forge edit apply on the tiny model


def test_top_k_edits_only_chosen_layers(setup, tmp_path):
    output = tmp_path / "edited"
    record = apply_vector(ApplyRequest(base=str(setup["model"]), vector=setup["vector"], select="top-k", k=2,
                                       scores=setup["scores"], scale=0.5, output=output))
    base, edited, tau = read_weights(setup["model"]), read_weights(output), load_file(setup["vector"])
    chosen = sorted(setup["record"]["ranking"][:2])

    assert record["selected_layers"] == chosen
    assert PLANTED_LAYER in chosen
    assert sorted(base) == sorted(edited)
    for name in base:
        if layer_index(name) in chosen:
            torch.testing.assert_close(edited[name], base[name] + 0.5 * tau[name], rtol=0, atol=0, msg=name)
        else:
            assert torch.equal(edited[name], base[name]), name
    assert (output / "config.json").is_file()


def test_apply_record_names_selection(setup, tmp_path):
    from llmforge.checkpoint import file_digest

    output = tmp_path / "edited"
    apply_vector(ApplyRequest(base=str(setup["model"]), vector=setup["vector"], select="random-k", k=2, seed=5,
                              output=output))
    record = json.loads((output / "forge_run.json").read_text())

    assert record["schema"] == "llmforge.edit.apply/1"
    assert record["selection"]["mode"] == "random-k"
    assert record["selection"]["seed"] == 5
    assert record["selected_layers"] == choose_layers("random-k", 2, num_layers=LAYERS, seed=5)
    assert record["vectors"][0]["file_digest"] == file_digest(setup["vector"])
    assert record["projection"] is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["edited"]


def test_apply_all_adds_whole_vector(setup, tmp_path):
    output = tmp_path / "edited"
    apply_vector(ApplyRequest(base=str(setup["model"]), vector=setup["vector"], select="all", output=output))
    base, edited, tau = read_weights(setup["model"]), read_weights(output), load_file(setup["vector"])

    for name in base:
        torch.testing.assert_close(edited[name], base[name] + tau[name], rtol=0, atol=0, msg=name)


def test_projected_edit_stays_in_span(setup, tmp_path):
    from llmforge.checkpoint import load_tensors

    output = tmp_path / "edited"
    record = apply_vector(ApplyRequest(base=str(setup["model"]), vector=setup["vector"], select="top-k", k=1,
                                       scores=setup["scores"], project="sae", sae_dir=setup["saes"], output=output))
    projection = record["projection"]
    base, edited = read_weights(setup["model"]), read_weights(output)
    [features] = projection["features"]
    decoder = load_tensors(setup["saes"] / hook_name(PLANTED_LAYER) / "sae_weights.safetensors")["W_dec"]
    basis = feature_basis(decoder[features["features"]])
    complement = torch.eye(HIDDEN) - basis @ basis.T
    prefix = f"model.layers.{PLANTED_LAYER}."

    assert features["layer"] == PLANTED_LAYER
    assert 0.0 <= projection["energy_fraction"] <= 1.0
    assert projection["layers"][0]["energy_fraction"] == pytest.approx(projection["energy_fraction"])
    assert projection["layers"][0]["basis_rank"] == len(features["features"])
    delta_out = edited[prefix + "self_attn.o_proj.weight"] - base[prefix + "self_attn.o_proj.weight"]
    delta_in = edited[prefix + "mlp.up_proj.weight"] - base[prefix + "mlp.up_proj.weight"]
    assert float(delta_out.abs().max()) > 0
    assert float((complement @ delta_out).abs().max()) < 1e-6
    assert float((delta_in @ complement).abs().max()) < 1e-6
    for name in base:
        if layer_index(name) != PLANTED_LAYER:
            assert torch.equal(edited[name], base[name]), name
    assert not (output / PROJECTED_VECTOR_NAME).exists()
    assert not (output / MERGED_SUBDIRECTORY).exists()


# Bad input


def another_vector(setup, tmp_path) -> Path:
    from llmforge.checkpoint import save_task_vector

    path = tmp_path / "other.safetensors"
    save_task_vector(path, {"model.norm.weight": torch.ones(HIDDEN)}, base_digest="sha256:" + "0" * 64,
                     tuned_digest="sha256:tuned", extra={"layout": "dense"})
    return path


def scores_of_another_model(setup, tmp_path) -> Path:
    record = json.loads(setup["scores"].read_text())
    record["model_digest"] = "sha256:" + "1" * 64
    path = tmp_path / "other-scores.json"
    path.write_text(json.dumps(record))
    return path


def sae_dir_of_width(setup, tmp_path, d_in: int, d_sae: int) -> Path:
    directory = tmp_path / f"saes-{d_in}-{d_sae}"
    for layer in range(LAYERS):
        save_sae(directory, layer, background_sae(torch.Generator().manual_seed(layer), d_in, d_sae))
    return directory


BAD_APPLY_CASES = {
    "k zero": (lambda s, t: ["--select", "top-k", "--k", 0, "--scores", s["scores"]], "invalid --k 0"),
    "k above scored layers": (lambda s, t: ["--select", "top-k", "--k", 5, "--scores", s["scores"]],
                              "invalid --k 5: the scores file ranks 4 layers"),
    "random k above layers": (lambda s, t: ["--select", "random-k", "--k", 9], "invalid --k 9: the base has 4 layers"),
    "layer out of range": (lambda s, t: ["--select", "1,7"], "layer 7 in --select is out of range"),
    "top-k without scores": (lambda s, t: ["--select", "top-k", "--k", 1], "pass --scores FILE"),
    "scores of another model": (lambda s, t: ["--select", "top-k", "--k", 1, "--scores", scores_of_another_model(s, t)],
                                "was computed on"),
    "vector of another base": (lambda s, t: ["--select", "all", "--vector", another_vector(s, t)],
                               "was computed against base"),
    "project without sae": (lambda s, t: ["--select", "top-k", "--k", 1, "--scores", s["scores"], "--project", "sae"],
                            "--project sae needs --sae SAE_DIR"),
    "sae width mismatch": (lambda s, t: ["--select", "top-k", "--k", 1, "--scores", s["scores"], "--project", "sae",
                                         "--sae", sae_dir_of_width(s, t, 48, 16)], "d_in=48"),
    "sae dictionary mismatch": (lambda s, t: ["--select", "top-k", "--k", 1, "--scores", s["scores"], "--project",
                                              "sae", "--sae", sae_dir_of_width(s, t, HIDDEN, 8)], "d_sae=8"),
    "sae other weights": (lambda s, t: ["--select", "top-k", "--k", 1, "--scores", s["scores"], "--project", "sae",
                                        "--sae", sae_dir_of_width(s, t, HIDDEN, 16)], "differs from the one"),
}


@pytest.mark.parametrize("case", sorted(BAD_APPLY_CASES))
def test_apply_bad_input_exits_1(setup, tmp_path, case):
    build, message = BAD_APPLY_CASES[case]
    arguments = build(setup, tmp_path)
    if "--vector" not in arguments:
        arguments += ["--vector", setup["vector"]]
    output = tmp_path / "out" / "edited"
    result = invoke("edit", "apply", "--base", setup["model"], *arguments, "-o", output)

    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not output.parent.exists() or list(output.parent.iterdir()) == []


def test_apply_script_exits_1(setup, tmp_path, forge_env):
    output = tmp_path / "edited"
    result = subprocess.run([str(FORGE), "edit", "apply", "--base", str(setup["model"]), "--vector",
                             str(setup["vector"]), "--select", "random-k", "--k", "0", "-o", str(output)],
                            capture_output=True, text=True, env=forge_env, timeout=300)

    assert result.returncode == 1
    assert "invalid --k 0" in result.stderr
    assert not output.exists()


def layers_options(setup, **replace) -> list:
    options = {"--model": setup["model"], "--sae": setup["saes"], "--task-data": setup["texts"]["task"],
               "--general-data": setup["texts"]["general"], "--tokens": 1500, "--max-length": 64, "--top-m": 4}
    options.update(replace)
    return ["edit", "layers", *[item for pair in options.items() for item in pair], "--quiet"]


@pytest.mark.parametrize("option", ["-o", "--plot"])
def test_layers_keeps_existing_output(setup, tmp_path, option):
    existing = tmp_path / "precious.jsonl"
    existing.write_text("keep me\n")
    result = invoke(*layers_options(setup), option, existing)

    assert result.exit_code == 1
    assert f"{option} file {existing} already exists" in result.output
    assert existing.read_text() == "keep me\n"


def test_layers_overwrite_replaces_output(setup, tmp_path):
    existing = tmp_path / "scores.json"
    existing.write_text("old\n")
    result = invoke(*layers_options(setup), "-o", existing, "--overwrite")

    assert result.exit_code == 0, result.output
    assert json.loads(existing.read_text())["format"] == "llmforge.edit.layer_scores"


def test_layers_rejects_k_above_width(setup, tmp_path):
    directory = tmp_path / "saes"
    save_sae(directory, 1, background_sae(torch.Generator().manual_seed(0)))
    config_path = directory / hook_name(1) / "cfg.json"
    config = json.loads(config_path.read_text())
    config.update(architecture="topk", k=32)
    config_path.write_text(json.dumps(config))
    result = invoke(*layers_options(setup, **{"--sae": directory}), "-o", tmp_path / "s.json")

    assert result.exit_code == 1
    assert "k=32" in result.output
    assert "d_sae=16" in result.output
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "--general-data: data file not found"),
    ("empty.txt", "", "no records found"),
    ("wiki.raw", "some text\n", "rename it to one of: .jsonl"),
])
def test_layers_checks_general_data_first(setup, tmp_path, monkeypatch, name, content, message):
    import llmforge_edit.activations as activations

    def fail(*args, **kwargs):
        raise AssertionError("activations were collected before --general-data was checked")

    monkeypatch.setattr(activations, "cached_activations", fail)
    general = tmp_path / name
    if content is not None:
        general.write_text(content)
    request = score_request(setup["model"], setup["saes"], {"task": setup["texts"]["task"], "general": general},
                            output=tmp_path / "s.json")
    with pytest.raises(ForgeError, match=message):
        score_layers(request, cache=setup["cache"])
    assert not (tmp_path / "s.json").exists()


def test_empty_text_record_names_file(setup, tmp_path):
    data = tmp_path / "empty-text.jsonl"
    data.write_text(json.dumps({"text": ""}) + "\n")
    request = score_request(setup["model"], setup["saes"], {"task": data, "general": setup["texts"]["general"]})
    with pytest.raises(ForgeError, match=f"every record of {data} renders to an empty text"):
        score_layers(request, cache=setup["cache"])


def edited_scores(setup, tmp_path, edit) -> Path:
    record = json.loads(setup["scores"].read_text())
    edit(record)
    path = tmp_path / "edited-scores.json"
    path.write_text(json.dumps(record))
    return path


def set_top_feature(record, index: int) -> None:
    row = next(row for row in record["layers"] if row["layer"] == record["ranking"][0])
    row["top_features"][0]["feature"] = index


def remove_task_features(record) -> None:
    row = next(row for row in record["layers"] if row["layer"] == record["ranking"][0])
    for item in row["top_features"]:
        item["specificity"] = -abs(item["specificity"])


def empty_ranking(record) -> None:
    record["ranking"] = []
    for row in record["layers"]:
        row["score"] = row["rank"] = None


def rank_layer_45(record) -> None:
    record["layers"].append({**record["layers"][0], "layer": 45})
    record["ranking"] = [45, *record["ranking"]]


SCORES_CASES = {
    "no layers key": (lambda record: record.pop("layers"), [], "not a valid layer-scores file: missing or malformed `layers`"),
    "layers not a list": (lambda record: record.update(layers=3), [], "malformed `layers`"),
    "feature beyond width": (lambda record: set_top_feature(record, 99999), ["--project", "sae"],
                             "lists feature 99999 for layer"),
    "no task features": (remove_task_features, ["--project", "sae"], "has no task features in the scores file"),
    "empty ranking": (empty_ranking, [], "the scores file ranks no layer"),
    "layer beyond base": (rank_layer_45, [], "the scores file ranks layer 45, but the base has 4"),
}


@pytest.mark.parametrize("case", sorted(SCORES_CASES))
def test_apply_rejects_bad_scores_file(setup, tmp_path, case):
    edit, options, message = SCORES_CASES[case]
    scores = edited_scores(setup, tmp_path, edit)
    if options:
        options = [*options, "--sae", setup["saes"]]
    output = tmp_path / "out" / "edited"
    result = invoke("edit", "apply", "--base", setup["model"], "--vector", setup["vector"], "--select", "top-k",
                    "--k", 1, "--scores", scores, *options, "-o", output)

    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not output.parent.exists() or list(output.parent.iterdir()) == []


def test_apply_rejects_selection_without_tensors(setup, tmp_path):
    from llmforge.checkpoint import save_task_vector
    from llmforge.models import model_digest

    vector = tmp_path / "layer1.safetensors"
    save_task_vector(vector, {"model.layers.1.mlp.down_proj.weight": torch.ones(HIDDEN, 64)},
                     base_digest=model_digest(str(setup["model"]), cache=setup["cache"]), tuned_digest="sha256:tuned",
                     extra={"layout": "dense"})
    output = tmp_path / "out" / "edited"
    result = invoke("edit", "apply", "--base", setup["model"], "--vector", vector, "--select", "0", "-o", output)

    assert result.exit_code == 1, result.output
    assert "the merge would change no tensor" in result.output
    assert list(output.parent.iterdir()) == []


def test_apply_warns_unused_scores_and_sae(setup, tmp_path, caplog):
    request = ApplyRequest(base=str(setup["model"]), vector=setup["vector"], select="1", output=tmp_path / "edited",
                           scores=setup["scores"], sae_dir=setup["saes"])
    with caplog.at_level("WARNING"):
        apply_vector(request, cache=setup["cache"])

    assert "--scores has no effect with --select 1" in caplog.text
    assert "--sae has no effect without --project sae" in caplog.text


def test_random_k_projection_draws_sae_layers(setup, tmp_path, caplog):
    directory = tmp_path / "two-saes"
    for layer in (1, 2):
        (directory / hook_name(layer)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(setup["saes"] / hook_name(layer), directory / hook_name(layer))
    request = ApplyRequest(base=str(setup["model"]), vector=setup["vector"], select="random-k", k=2,
                           output=tmp_path / "edited", scores=setup["scores"], project="sae", sae_dir=directory,
                           seed=0)
    with caplog.at_level("WARNING"):
        record = apply_vector(request, cache=setup["cache"])

    assert record["selected_layers"] == [1, 2]
    assert "random-k draws from the 2 layers that have an SAE" in caplog.text


# The real model


@pytest.mark.slow
def test_layers_and_apply_smollm2(real_model_cache, tmp_path, forge_env):
    from llmforge.checkpoint import save_task_vector
    from llmforge.models import model_digest, resolve_model_dir

    forge_env["FORGE_CACHE"] = str(real_model_cache)
    general = write_paragraphs(tmp_path / "general.txt", GENERAL_WORDS, 1)
    saes = tmp_path / "saes"
    trained = subprocess.run([str(FORGE), "edit", "sae", "train", "--model", "smollm2-135m", "--data", str(general),
                              "--layers", "0-2", "--tokens", "2000", "--steps", "20", "--batch-size", "512",
                              "-o", str(saes), "--quiet"], capture_output=True, text=True, env=forge_env, timeout=900)
    assert trained.returncode == 0, trained.stderr
    scores = tmp_path / "scores.json"
    scored = subprocess.run([str(FORGE), "edit", "layers", "--model", "smollm2-135m", "--sae", str(saes),
                             "--task-data", "demo:arith/train.jsonl", "--general-data", str(general),
                             "--tokens", "1000", "-o", str(scores), "--quiet"],
                            capture_output=True, text=True, env=forge_env, timeout=900)
    assert scored.returncode == 0, scored.stderr
    record = json.loads(scores.read_text())
    assert sorted(record["ranking"]) == [0, 1, 2]
    assert all(-1 <= row["score"] <= 1 for row in record["layers"])

    base_dir = resolve_model_dir("smollm2-135m", cache=Cache(real_model_cache))
    base = read_weights(base_dir)
    generator = torch.Generator().manual_seed(0)
    tau = {name: torch.randn(tensor.shape, generator=generator) * 1e-3 for name, tensor in base.items()
           if layer_index(name) in (0, 1, 2)}
    vector = tmp_path / "tv.safetensors"
    save_task_vector(vector, tau, base_digest=model_digest("smollm2-135m", cache=Cache(real_model_cache)),
                     tuned_digest="sha256:tuned", extra={"layout": "dense"})
    output = tmp_path / "edited"
    applied = subprocess.run([str(FORGE), "edit", "apply", "--base", "smollm2-135m", "--vector", str(vector),
                              "--select", "top-k", "--k", "1", "--scores", str(scores), "--project", "sae",
                              "--sae", str(saes), "-o", str(output), "--json", "--quiet"],
                             capture_output=True, text=True, env=forge_env, timeout=900)
    assert applied.returncode == 0, applied.stderr
    summary = json.loads(applied.stdout)
    edited = read_weights(output)

    [top] = summary["selected_layers"]
    assert top == record["ranking"][0]
    assert 0.0 <= summary["projection"]["energy_fraction"] <= 1.0
    for name in base:
        if layer_index(name) != top:
            assert torch.equal(edited[name], base[name]), name
    assert any(not torch.equal(edited[name], base[name]) for name in base if layer_index(name) == top)
