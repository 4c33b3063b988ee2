"""Tests of the finetune plugin: the training loop, the adapter directory, the run record and the cache."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from llmforge.cli import cli
from llmforge.data import Example, tokenize_examples

from conftest import FORGE, requires_smollm2




def invoke(*args: str):
    return CliRunner().invoke(cli, ["finetune", *args], catch_exceptions=False)


def base_args(model_dir, data, output, *extra):
    return ["--model", str(model_dir), "--data", str(data), "-o", str(output), "--steps", "3", "--quiet", *extra]


def test_loss_decreases_on_repeated_set(tiny_model_dir):
    import torch

    from llmforge.models import load_model
    from llmforge_finetune.lora import LoraSettings, wrap_with_lora
    from llmforge_finetune.train import TrainSettings, train

    loaded = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    model = wrap_with_lora(loaded.model, LoraSettings(rank=8, dropout=0.0))
    examples = tokenize_examples([Example("Say:", " the same words again"), Example("Echo:", " red green blue")],
                                 loaded.tokenizer, max_length=32)
    settings = TrainSettings(steps=40, batch_size=2, lr=2e-2, warmup_steps=0, schedule="constant", precision="fp32")
    result = train(model, examples, settings, pad_token_id=0, progress=False)

    assert result.steps == 40
    assert len(result.loss_curve) == 40
    # The tiny model's output embedding is frozen with 0.02-scale weights, so its logits can move
    # by well under 1 and the loss starts near log(49152) = 10.8; a drop of 0.3 is a clear signal.
    assert sum(result.loss_curve[-5:]) / 5 < sum(result.loss_curve[:5]) / 5 - 0.3


def test_bf16_training_updates_fp32_masters(tiny_model_dir):
    import torch

    from llmforge.models import load_model
    from llmforge_finetune.lora import LoraSettings, wrap_with_lora
    from llmforge_finetune.train import TrainSettings, train

    loaded = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    model = wrap_with_lora(loaded.model, LoraSettings(dropout=0.0))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    examples = tokenize_examples([Example("Say:", " hello there")], loaded.tokenizer, max_length=32)
    result = train(model, examples, TrainSettings(steps=20, batch_size=1, lr=2e-2, warmup_steps=0), pad_token_id=0,
                   progress=False)

    assert result.loss_curve[-1] < result.loss_curve[0]
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_learning_rate_schedule():
    from llmforge_finetune.train import learning_rate

    assert learning_rate(0, base=1.0, warmup=4, total=10, schedule="cosine") == pytest.approx(0.25)
    assert learning_rate(3, base=1.0, warmup=4, total=10, schedule="cosine") == pytest.approx(1.0)
    assert learning_rate(4, base=1.0, warmup=4, total=10, schedule="cosine") == pytest.approx(1.0)
    assert learning_rate(7, base=1.0, warmup=4, total=10, schedule="cosine") == pytest.approx(0.5)
    assert learning_rate(9, base=1.0, warmup=4, total=10, schedule="constant") == pytest.approx(1.0)


def test_cli_writes_adapter_record_and_json(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    result = invoke(*base_args(tiny_model_dir, qa_data, output, "--json", "--batch-size", "4"))
    assert result.exit_code == 0, result.output

    summary = json.loads(result.stdout)
    assert summary["steps"] == 3
    assert summary["tokens"] > 0
    assert summary["tokens_per_second"] > 0
    assert summary["trainable_parameters"] > 0
    assert summary["output"] == str(output.resolve())
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors", "forge_run.json"]

    record = json.loads((output / "forge_run.json").read_text())
    assert record["base_reference"] == str(tiny_model_dir.resolve())
    assert record["base_digest"].startswith("sha256:")
    assert record["inputs"]["data"].startswith("sha256:")
    assert record["seed"] == 0
    assert record["hyperparameters"]["rank"] == 8
    assert record["hyperparameters"]["lr"] == 2e-4
    assert len(record["loss_curve"]) == 3
    assert record["trainable_parameters"] == summary["trainable_parameters"]
    assert record["task_vector_cache_key"]["kind"] == "task-vector"
    assert record["versions"]["torch"]
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    # peft keeps target_modules as a set; sorted, equal adapters get equal bytes and digests.
    assert config["target_modules"] == sorted(config["target_modules"])


def test_adapter_loads_with_peft_and_forge(tiny_model_dir, qa_data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmforge.models import load_model

    output = tmp_path / "adapter"
    assert invoke(*base_args(tiny_model_dir, qa_data, output, "--lr", "5e-2")).exit_code == 0

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, output).eval()(ids).logits
        forge_logits = load_model(str(output)).model(ids).logits
    assert not torch.allclose(base_logits, peft_logits)
    assert torch.allclose(peft_logits, forge_logits, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_merge_writes_model_equal_to_adapter(tiny_model_dir, qa_data, tmp_path, method):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / "adapter"
    result = invoke(*base_args(tiny_model_dir, qa_data, output, "--lr", "5e-2", "--method", method, "--merge",
                               "--json"))
    assert result.exit_code == 0, result.output

    merged_dir = output / "merged"
    assert json.loads(result.stdout)["merged_model"] == str(merged_dir.resolve())
    assert json.loads((output / "forge_run.json").read_text())["merged_model_digest"].startswith("sha256:")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        adapter_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                   output).eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert not torch.allclose(base_logits, merged_logits)
    # OFT merges its rotation in a different order of float operations than its forward pass.
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-3)
    assert (merged_dir / "tokenizer.json").is_file()


def test_merge_rejected_for_full(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "model"
    result = invoke(*base_args(tiny_model_dir, qa_data, output, "--method", "full", "--merge"))
    assert result.exit_code == 1
    assert "--merge applies to adapter methods" in result.stderr
    assert not output.exists()


def test_task_vector_in_cache_equals_lora_product(tiny_model_dir, qa_data, tmp_path):
    from safetensors.torch import load_file

    from llmforge.cache import Cache, CacheKey

    output = tmp_path / "adapter"
    assert invoke(*base_args(tiny_model_dir, qa_data, output, "--lr", "5e-2", "--alpha", "32")).exit_code == 0
    record = json.loads((output / "forge_run.json").read_text())
    key = record["task_vector_cache_key"]
    cache = Cache()
    assert cache.lookup(CacheKey(key["kind"], key["inputs"], key["params"])) is not None
    vector = cache.get_or_compute(CacheKey(key["kind"], key["inputs"], key["params"]),
                                  lambda: pytest.fail("the task vector was not cached"))

    adapter = load_file(output / "adapter_model.safetensors")
    prefix = "base_model.model."
    scale = 32 / 8
    a_names = [name for name in adapter if name.endswith("lora_A.weight")]
    assert len(vector) == len(a_names) == 2 * 7
    for a_name in a_names:
        module = a_name[len(prefix):-len(".lora_A.weight")]
        expected = adapter[a_name.replace("lora_A", "lora_B")].float() @ adapter[a_name].float() * scale
        assert vector[f"{module}.weight"].shape == expected.shape
        assert (vector[f"{module}.weight"] - expected).abs().max() < 1e-6
    assert any(v.abs().max() > 0 for v in vector.values())

    from llmforge.checkpoint import read_metadata
    from llmforge.models import model_digest

    blob = cache.blob_path(cache.lookup(CacheKey(key["kind"], key["inputs"], key["params"])))
    metadata = read_metadata(blob)
    assert metadata["format"] == "llmforge.task_vector"
    assert metadata["base_digest"] == record["base_digest"]
    assert metadata["tuned_digest"] == record["adapter_digest"] == model_digest(str(output))
    temporary_paths = [r["params"]["path"] for _, r in cache.records() if r["kind"] == "file-digest"]
    assert all(".tmp" not in path for path in temporary_paths)


def test_overwrite_replaces_output(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "old.txt").write_text("old")
    (output / "forge_run.json").write_text("{}")
    assert invoke(*base_args(tiny_model_dir, qa_data, output, "--overwrite")).exit_code == 0
    assert not (output / "old.txt").exists()
    assert (output / "adapter_model.safetensors").is_file()


def test_overwrite_refuses_foreign_directory(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "photos"
    output.mkdir()
    (output / "holiday.jpg").write_text("precious")

    result = invoke(*base_args(tiny_model_dir, qa_data, output, "--overwrite"))

    assert result.exit_code == 1
    assert "not written by forge" in result.output
    assert sorted(p.name for p in output.iterdir()) == ["holiday.jpg"]


BAD_INPUTS = [
    (["--model", "no-such-model"], "unknown model reference 'no-such-model'"),
    (["--data", "EMPTY"], "no records found"),
    (["--data", "MALFORMED"], "MALFORMED:2: invalid JSON"),
    (["--data", "demo:nope.jsonl"], "unknown demo data set"),
    (["--rank", "0"], "invalid --rank 0"),
    (["--lr", "0"], "invalid --lr 0.0"),
    (["--lr", "-1e-3"], "invalid --lr -0.001"),
    (["--steps", "0"], "invalid --steps 0"),
    (["--batch-size", "0"], "invalid --batch-size 0"),
    (["--dropout", "1.5"], "invalid --dropout 1.5"),
    (["--epochs", "1"], "either --steps or --epochs"),
    (["--max-length", "1"], "invalid --max-length 1"),
    (["--column", "prompt"], "invalid --column 'prompt'"),
    (["--target-modules", "no_such_proj"], "invalid --target-modules 'no_such_proj'"),
]


@pytest.mark.parametrize("override, message", BAD_INPUTS)
def test_bad_input_exits_1_and_writes_nothing(tiny_model_dir, qa_data, tmp_path, override, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"text": "ok"}\n{"text": \n')
    replacements = {"EMPTY": str(empty), "MALFORMED": str(malformed)}
    override = [replacements.get(value, value) for value in override]
    message = message.replace("MALFORMED", str(malformed))

    args = dict(zip(["--model", "--data"], [str(tiny_model_dir), str(qa_data)]))
    extra = []
    for flag, value in zip(override[::2], override[1::2]):
        if flag in args:
            args[flag] = value
        else:
            extra += [flag, value]
    output = tmp_path / "out" / "adapter"
    result = invoke("--model", args["--model"], "--data", args["--data"], "-o", str(output), "--quiet",
                    "--steps", "2", *extra)

    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert result.stderr.splitlines()[-1].startswith("Error: ")
    assert not output.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_output_without_overwrite(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "keep.txt").write_text("keep")
    result = invoke(*base_args(tiny_model_dir, qa_data, output))
    assert result.exit_code == 1
    assert "already exists" in result.stderr
    assert "--overwrite" in result.stderr
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter")] == []


def test_nan_loss_stops_with_error(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    result = invoke(*base_args(tiny_model_dir, qa_data, output, "--lr", "1e30", "--max-grad-norm", "1e30",
                               "--no-bf16", "--steps", "8"))
    assert result.exit_code == 1
    assert "training loss became" in result.stderr
    assert not output.exists()


def test_forge_script_runs_finetune(tiny_model_dir, qa_data, tmp_path, forge_env):
    output = tmp_path / "adapter"
    completed = subprocess.run([FORGE, "finetune", *base_args(tiny_model_dir, qa_data, output, "--json")], env=forge_env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["steps"] == 3
    assert (output / "adapter_model.safetensors").is_file()
    assert "finetune" not in completed.stderr


def test_forge_script_reports_bad_input(tiny_model_dir, tmp_path, forge_env):
    output = tmp_path / "adapter"
    completed = subprocess.run([FORGE, "finetune", "--model", str(tiny_model_dir), "--data", str(tmp_path / "x.jsonl"),
                                "-o", str(output)], env=forge_env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    assert "data file not found" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not output.exists()


@pytest.mark.slow
@requires_smollm2
def test_real_model_few_steps(tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("FORGE_CACHE", str(shared_cache))
    output = tmp_path / "adapter"
    result = invoke("--model", "smollm2-135m", "--data", "demo:arith/train.jsonl", "-o", str(output), "--steps", "4",
                    "--limit", "64", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["trainable_parameters"] == 2_442_240
    # --quiet also silences transformers' weight-loading progress bar.
    assert "Loading weights" not in result.stderr
    assert summary["final_train_loss"] < 5
    record = json.loads((output / "forge_run.json").read_text())
    assert record["base_reference"] == "smollm2-135m"


def test_cli_template_unescapes_newline():
    from llmforge.data import QA_PROMPT_TEMPLATE
    from llmforge_finetune.cli import unescape_template

    typed = r"Question: {question}\nAnswer:"

    assert unescape_template(None, None, typed) == QA_PROMPT_TEMPLATE
    assert unescape_template(None, None, None) is None
    assert unescape_template(None, None, r"a\tb") == "a\tb"


def test_output_under_a_file_is_rejected(tiny_model_dir, qa_data, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")

    result = invoke(*base_args(tiny_model_dir, qa_data, blocker / "sub"))

    assert result.exit_code == 1
    assert f"its parent {blocker} is a file" in result.output
    assert blocker.read_text() == "x"
    # Rejected while checking the options, so before any training step ran.
    assert "finetune:" not in result.stderr
