"""Tests of the fine-tuning methods: training, adapter reload, task vectors, budget matching and the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llmforge.cli import cli
from llmforge.data import Example, tokenize_examples

from llmforge_finetune.methods import METHODS, MethodSettings, get_method

IDS = [[1, 5, 9, 40, 7, 300, 12, 2]]
# The tiny model's layers have 32 or 64 inputs, below MiSS's default block size of 64.
TINY_OPTIONS = {"miss": {"block_size": 16}}



def invoke(*args: str):
    return CliRunner().invoke(cli, ["finetune", *args], catch_exceptions=False)


def logits_of(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def train_in_memory(model_dir, method: str, **options):
    """Wrap the tiny model with `method`, train 4 fp32 steps, and return (model, spec, values, initial factors, result)."""
    import torch

    from llmforge.models import load_model
    from llmforge_finetune.adapters import adalora_hooks, initial_lora_factors, wrap_model
    from llmforge_finetune.train import TrainSettings, train

    loaded = load_model(str(model_dir))
    spec = get_method(method)
    values = spec.resolve(MethodSettings(method=method, **options))
    torch.manual_seed(0)
    model = wrap_model(loaded.model, spec, values, total_steps=4)
    initial = initial_lora_factors(model) if spec.mutated_init else None
    examples = tokenize_examples([Example("Say:", " the same words again"), Example("Echo:", " red green blue")],
                                 loaded.tokenizer, max_length=32)
    step_hook, regularizer = adalora_hooks(model, spec)
    lr = 1e-3 if method == "full" else 2e-2
    settings = TrainSettings(steps=4, batch_size=2, lr=lr, warmup_steps=0, schedule="constant", precision="fp32")
    result = train(model, examples, settings, pad_token_id=0, progress=False, step_hook=step_hook,
                   regularizer=regularizer)
    return model, spec, values, initial, result


def fresh_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def apply_vector(model, vector):
    import torch

    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in vector.items():
            parameters[name].add_(delta.to(parameters[name].dtype))
    return model


# Every method's update, written as merged minus base weights, is exact for the trained model, so
# W0 + dW reproduces its logits. DoRA, OFT, BOFT, IA3 and MiSS are not additive in their own
# parameters: a * dW is not the model with its parameters scaled by a. This test uses a = 1 only.
@pytest.mark.parametrize("method", [name for name in METHODS if name != "full"])
def test_method_trains_reloads_and_vector_matches(tiny_model_dir, tmp_path, method):
    import torch
    from peft import PeftModel

    from llmforge.models import load_model
    from llmforge_finetune.adapters import adapter_task_vector, save_adapter

    model, spec, values, initial, result = train_in_memory(tiny_model_dir, method, **TINY_OPTIONS.get(method, {}))
    assert result.steps == 4
    assert all(torch.isfinite(torch.tensor(result.loss_curve)))
    model.eval()
    tuned_logits = logits_of(model)
    base_logits = logits_of(fresh_base(tiny_model_dir))
    assert (tuned_logits - base_logits).abs().max() > 1e-4, "training did not change the model"

    output = tmp_path / "adapter"
    model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    save_adapter(model, output, spec, initial)
    reloaded = PeftModel.from_pretrained(fresh_base(tiny_model_dir), output).eval()
    assert torch.allclose(logits_of(reloaded), tuned_logits, atol=1e-4)
    assert torch.allclose(logits_of(load_model(str(output)).model), tuned_logits, atol=1e-4)

    vector = adapter_task_vector(model, spec, initial)
    assert {v.dtype for v in vector.values()} == {torch.float32}
    base_names = {name for name, _ in fresh_base(tiny_model_dir).named_parameters()}
    assert set(vector) <= base_names
    patched = apply_vector(fresh_base(tiny_model_dir), vector)
    assert torch.allclose(logits_of(patched), tuned_logits, atol=1e-4)


def test_full_finetune_reloads_and_vector_matches(tiny_model_dir, tmp_path):
    import torch

    from llmforge.models import load_model
    from llmforge_finetune.output import full_task_vector

    model, _, _, _, result = train_in_memory(tiny_model_dir, "full")
    assert all(torch.isfinite(torch.tensor(result.loss_curve)))
    model.eval()
    tuned_logits = logits_of(model)
    output = tmp_path / "full"
    model.save_pretrained(output)
    load_model(str(tiny_model_dir)).tokenizer.save_pretrained(output)
    assert torch.allclose(logits_of(load_model(str(output), cache=None).model), tuned_logits, atol=1e-5)

    vector = full_task_vector(model, tiny_model_dir)
    assert set(vector) == {name for name, _ in model.named_parameters()}
    assert any(v.abs().max() > 0 for v in vector.values())
    patched = apply_vector(fresh_base(tiny_model_dir), vector)
    assert torch.allclose(logits_of(patched), tuned_logits, atol=1e-5)


def test_milora_starts_from_minor_components(tiny_model_dir):
    import torch

    from llmforge.models import load_model
    from llmforge_finetune.adapters import lora_layers, wrap_model

    original = dict(fresh_base(tiny_model_dir).named_parameters())
    spec = get_method("milora")
    values = spec.resolve(MethodSettings(method="milora", rank=4))
    model = wrap_model(load_model(str(tiny_model_dir)).model, spec, values)
    for name, module in lora_layers(model):
        weight = original[f"{name}.weight"].detach()
        _, singular, vh = torch.linalg.svd(weight, full_matrices=False)
        lora_a = module.lora_A["default"].weight.detach()
        # The rows of A span the last 4 right singular vectors of the base weight.
        projection = lora_a @ vh[-4:].T @ vh[-4:]
        assert torch.allclose(projection, lora_a, atol=1e-4)
        rebuilt = module.get_base_layer().weight + module.scaling["default"] * (
            module.lora_B["default"].weight @ lora_a)
        assert torch.allclose(rebuilt, weight, atol=1e-5)
    assert logits_of(model).shape[-1] > 0


def test_cli_runs_each_method(tiny_model_dir, qa_data, tmp_path):
    from llmforge.cache import Cache, CacheKey
    from llmforge.models import model_digest

    for method in METHODS:
        output = tmp_path / method
        extra = ["--block-size", "16"] if method == "miss" else []
        result = invoke(*extra, "--model", str(tiny_model_dir), "--data", str(qa_data), "-o", str(output), "--steps", "2",
                        "--quiet", "--json", "--method", method, "--batch-size", "4")
        assert result.exit_code == 0, (method, result.output)
        summary = json.loads(result.stdout)
        assert summary["method"] == method
        record = json.loads((output / "forge_run.json").read_text())
        assert record["method"] == method
        assert record["trainable_parameters"] == summary["trainable_parameters"] > 0
        key = record["task_vector_cache_key"]
        assert Cache().lookup(CacheKey(key["kind"], key["inputs"], key["params"])) is not None, method
        tuned = key["inputs"].get("adapter") or key["inputs"]["tuned"]
        assert tuned == model_digest(str(output)), method
    assert (tmp_path / "full" / "config.json").is_file()
    assert (tmp_path / "full" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "full" / "forge_run.json").read_text())["hyperparameters"]["lr"] == 5e-5


def test_budget_matches_brute_force(tiny_model_dir):
    from transformers import AutoConfig

    from llmforge_finetune.budget import candidate_sizes, count_parameters, match_budget

    config = AutoConfig.from_pretrained(tiny_model_dir)
    for method, budget in [("lora", 3000), ("lora", 32_000), ("dora", 7000), ("oft", 3000), ("boft", 2000),
                           ("miss", 5000), ("vera", 1000), ("adalora", 9000)]:
        spec = get_method(method)
        values = spec.resolve(MethodSettings(method=method, **TINY_OPTIONS.get(method, {})))
        match = match_budget(config, spec, values, budget)

        counts = {}
        for size in candidate_sizes(config, spec, values):
            if method == "vera" and size > 200:
                break
            try:
                counts[size] = count_parameters(config, spec, {**values, spec.size_option: size})[0]
            except ValueError:
                continue
        best = min(counts, key=lambda size: (abs(counts[size] - budget), size))
        assert match.matched, method
        assert match.size == best, (method, budget, match, counts)
        assert match.trainable == counts[best], method


def test_budget_for_ia3_reports_fixed_count(tiny_model_dir):
    from transformers import AutoConfig

    from llmforge_finetune.budget import count_parameters, match_budget

    config = AutoConfig.from_pretrained(tiny_model_dir)
    spec = get_method("ia3")
    values = spec.resolve(MethodSettings(method="ia3"))
    match = match_budget(config, spec, values, 1000)
    assert not match.matched
    assert match.size is None
    assert match.trainable == count_parameters(config, spec, values)[0]


def test_meta_count_equals_real_model(tiny_model_dir):
    from transformers import AutoConfig

    from llmforge.models import load_model
    from llmforge_finetune.adapters import count_trainable, wrap_model
    from llmforge_finetune.budget import count_parameters

    config = AutoConfig.from_pretrained(tiny_model_dir)
    for method in METHODS:
        spec = get_method(method)
        values = spec.resolve(MethodSettings(method=method, **TINY_OPTIONS.get(method, {})))
        real = count_trainable(wrap_model(load_model(str(tiny_model_dir)).model, spec, values))
        assert count_parameters(config, spec, values)[0] == real, method


@pytest.mark.parametrize("text, expected", [("2.4M", 2_400_000), ("500k", 500_000), ("1e6", 1_000_000),
                                            ("1200000", 1_200_000), ("1.5b", 1_500_000_000), ("3K", 3000)])
def test_parse_budget(text, expected):
    from llmforge_finetune.budget import parse_budget

    assert parse_budget(text) == expected


def test_list_methods_json():
    result = CliRunner().invoke(cli, ["finetune", "--list-methods", "--json"])
    assert result.exit_code == 0, result.output
    methods = json.loads(result.stdout)["methods"]
    assert [m["name"] for m in methods] == list(METHODS)
    by_name = {m["name"]: m for m in methods}
    assert by_name["lora"]["defaults"]["rank"] == 8
    assert by_name["lora"]["size_option"] == "--rank"
    assert by_name["vera"]["defaults"]["rank"] == 256
    assert by_name["oft"]["defaults"]["block_size"] == 32
    assert by_name["oft"]["size_option"] == "--block-size"
    assert by_name["ia3"]["size_option"] is None
    assert by_name["full"]["lr"] == 5e-5
    assert "--block-size" not in by_name["lora"]["options"]


def test_dry_run_writes_and_trains_nothing(tiny_model_dir, qa_data, tmp_path, isolated_cache):
    from llmforge.cache import Cache

    output = tmp_path / "adapter"
    result = invoke("--model", str(tiny_model_dir), "--data", str(qa_data), "-o", str(output), "--method", "oft",
                    "--budget", "3000", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True
    assert plan["method"] == "oft"
    assert plan["size_option"] == "block_size"
    assert plan["budget"]["size"] == plan["size"]
    assert plan["trainable_parameters"] == plan["budget"]["trainable_parameters"]
    memory = plan["memory"]["bytes"]
    assert set(memory) == {"weights", "gradients", "master_weights", "adamw_states", "activations_estimate",
                           "adapter_intermediates"}
    assert memory["adamw_states"] == 8 * plan["trainable_parameters"]
    assert "loss_curve" not in plan
    assert "steps" not in plan
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["qa.jsonl"]
    assert not any(r["kind"] == "task-vector" for _, r in Cache().records())

    text = invoke("--model", str(tiny_model_dir), "--method", "ia3", "--budget", "1000", "--dry-run")
    assert text.exit_code == 0, text.output
    assert "cannot be matched" in text.stdout


BAD_OPTIONS = [
    (["--method", "oft", "--rank", "4"], "--rank is not an option of --method oft"),
    (["--method", "lora", "--block-size", "8"], "--block-size is not an option of --method lora"),
    (["--method", "ia3", "--alpha", "2"], "--alpha is not an option of --method ia3"),
    (["--method", "full", "--dropout", "0.1"], "--dropout is not an option of --method full"),
    (["--method", "vera", "--alpha", "2"], "--alpha is not an option of --method vera"),
    (["--method", "oft", "--block-size", "0"], "invalid --block-size 0"),
    (["--method", "oft", "--block-size", "7"], "cannot attach OFT adapters"),
    (["--budget", "lots"], "invalid --budget 'lots'"),
    (["--budget", "0"], "invalid --budget '0'"),
    (["--budget", "2M", "--rank", "4"], "either --budget or --rank"),
]


@pytest.mark.parametrize("extra, message", BAD_OPTIONS)
def test_invalid_method_option_exits_1(tiny_model_dir, qa_data, tmp_path, extra, message):
    output = tmp_path / "adapter"
    result = invoke("--model", str(tiny_model_dir), "--data", str(qa_data), "-o", str(output), "--steps", "1",
                    "--quiet", *extra)
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert not output.exists()


@pytest.mark.slow
def test_real_model_dry_run_counts(real_model_cache):
    expected = {"lora": 2_442_240, "oft": 2_321_280, "vera": 209_280, "ia3": 184_320}
    for method, count in expected.items():
        result = invoke("--model", "smollm2-135m", "--method", method, "--dry-run", "--json", "--quiet")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["trainable_parameters"] == count, method
