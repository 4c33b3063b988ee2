"""Tests of the finetune training-loop features: held-out loss, checkpoints, --resume and the NaN stop."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
from click.testing import CliRunner

from llmforge.cli import cli

from conftest import FORGE

KILL_VARIABLE = "LLMFORGE_FINETUNE_KILL_AFTER_STEP"



def invoke(*args: str):
    return CliRunner().invoke(cli, ["finetune", *args], catch_exceptions=False)


def run_args(model_dir, data, output, *extra):
    return ["--model", str(model_dir), "--data", str(data), "-o", str(output), "--quiet", "--batch-size", "4",
            "--threads", "1", *extra]


def adapter_tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def assert_same_tensors(first, second, atol=1e-6):
    import torch

    assert sorted(first) == sorted(second)
    for name in first:
        assert torch.allclose(first[name].float(), second[name].float(), atol=atol, rtol=0), name


def test_eval_curve_recorded(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "4", "--eval-split", "0.25",
                              "--eval-every", "2", "--json"))
    assert result.exit_code == 0, result.output

    summary = json.loads(result.stdout)
    record = json.loads((output / "forge_run.json").read_text())
    assert [step for step, _ in record["eval_curve"]] == [2, 4]
    assert all(math.isfinite(loss) and loss > 0 for _, loss in record["eval_curve"])
    assert summary["final_eval_loss"] == record["eval_curve"][-1][1]
    assert record["data"]["eval_examples"] == 3
    assert record["data"]["train_examples"] == 9


def test_eval_loss_independent_of_batch_size(tiny_model_dir):
    from llmforge.data import Example, tokenize_examples
    from llmforge.models import load_model
    from llmforge_finetune.train import TrainSettings, evaluate_loss

    loaded = load_model(str(tiny_model_dir))
    examples = tokenize_examples([Example(f"Q{i}:", f" answer {i} " * (i + 1)) for i in range(5)],
                                 loaded.tokenizer, max_length=64)
    losses = [evaluate_loss(loaded.model, examples, TrainSettings(batch_size=size, precision="fp32"), pad_token_id=0)
              for size in (1, 2, 5)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0] == pytest.approx(losses[2], rel=1e-5)


def test_eval_options_rejected(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "2", "--eval-every", "1"))
    assert result.exit_code == 1
    assert "--eval-every needs held-out data" in result.stderr

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "2", "--eval-split", "1.5"))
    assert result.exit_code == 1
    assert "invalid --eval-split 1.5" in result.stderr


def test_save_every_writes_loadable_checkpoints(tiny_model_dir, qa_data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmforge.models import load_model

    fixed_lr = ["--no-bf16", "--schedule", "constant", "--warmup-steps", "0", "--lr", "5e-2", "--dropout", "0"]
    output = tmp_path / "adapter"
    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "5", "--save-every", "2", *fixed_lr))
    assert result.exit_code == 0, result.output

    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000004"]
    assert not (tmp_path / "adapter.partial").exists()
    note = json.loads((checkpoints / "step-000004" / "forge_checkpoint.json").read_text())
    assert note["step"] == 4

    # With a constant learning rate, the step-4 checkpoint of a 5-step run is a finished 4-step run.
    four = tmp_path / "four"
    assert invoke(*run_args(tiny_model_dir, qa_data, four, "--steps", "4", *fixed_lr)).exit_code == 0
    assert_same_tensors(adapter_tensors(checkpoints / "step-000004"), adapter_tensors(four))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, checkpoints / "step-000002").eval()(ids).logits
        forge_logits = load_model(str(checkpoints / "step-000002")).model(ids).logits
    assert torch.allclose(peft_logits, forge_logits, atol=1e-5)


def kill_run(tiny_model_dir, qa_data, output, forge_env, kill_step, *extra):
    env = {**forge_env, KILL_VARIABLE: str(kill_step), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([FORGE, "finetune", *run_args(tiny_model_dir, qa_data, output, *extra)],
                               env=env, capture_output=True, text=True, timeout=300)
    return completed


def test_resume_after_kill_matches_uninterrupted(tiny_model_dir, qa_data, tmp_path, forge_env):
    # Six steps of 4 examples from 12 cover two epochs; the kill after step 4 falls inside the second.
    settings = ["--steps", "6", "--lr", "5e-2", "--eval-split", "0.25", "--eval-every", "3"]
    straight = tmp_path / "straight"
    assert invoke(*run_args(tiny_model_dir, qa_data, straight, *settings)).exit_code == 0

    output = tmp_path / "resumed"
    killed = kill_run(tiny_model_dir, qa_data, output, forge_env, 4, *settings, "--save-every", "2")
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / "resumed.partial"
    assert not output.exists()
    assert sorted(p.name for p in partial.iterdir()) == ["checkpoints", "state-000002", "state-000004"]
    assert sorted(json.loads((partial / "state-000004" / "trainer.json").read_text())) == [
        "adalora_rank_pattern", "eval_curve", "format", "loss_curve", "optimizer_param_groups",
        "python_random_state", "resumes", "seconds", "settings", "step", "tokens"]

    result = invoke(*run_args(tiny_model_dir, qa_data, output, *settings, "--save-every", "2", "--resume", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_step"] == 4
    assert not partial.exists()
    assert_same_tensors(adapter_tensors(output), adapter_tensors(straight))

    record = json.loads((output / "forge_run.json").read_text())
    straight_record = json.loads((straight / "forge_run.json").read_text())
    assert record["loss_curve"] == straight_record["loss_curve"]
    assert record["eval_curve"] == straight_record["eval_curve"]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_resume_with_changed_lr_rejected(tiny_model_dir, qa_data, tmp_path, forge_env):
    output = tmp_path / "adapter"
    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "4", "--resume"))
    assert result.exit_code == 1
    assert "no saved state" in result.stderr

    killed = kill_run(tiny_model_dir, qa_data, output, forge_env, 2, "--steps", "4", "--save-every", "2")
    assert killed.returncode == -9, killed.stderr

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "4", "--save-every", "2",
                              "--lr", "1e-3", "--resume"))
    assert result.exit_code == 1
    assert "used --lr 0.0002, this command asks for --lr 0.001;" in result.stderr

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "4", "--save-every", "2"))
    assert result.exit_code == 1
    assert "pass --resume to continue it" in result.stderr
    assert (tmp_path / "adapter.partial" / "state-000002").is_dir()


def test_nan_loss_stops_and_keeps_state(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    # Adam moves each LoRA weight by about --lr per step whatever the gradient's size, so at 1e18 the
    # adapter's output grows like lr^2 from step 2 on and overflows fp32 in the next norm at step 3.
    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "6", "--save-every", "1", "--no-bf16",
                              "--no-packing", "--lr", "1e18", "--max-grad-norm", "1e30", "--warmup-steps", "0",
                              "--schedule", "constant"))
    assert result.exit_code == 1
    match = re.search(r"became (?:nan|inf|-inf|NaN or infinite) at step (\d+)", result.stderr)
    assert match, result.stderr
    failed_step = int(match.group(1))
    kept_match = re.search(r"the state of step (\d+) is kept", result.stderr)
    assert kept_match, result.stderr
    kept_step = int(kept_match.group(1))
    assert 1 <= kept_step < failed_step

    partial = tmp_path / "adapter.partial"
    assert not output.exists()
    assert max(p.name for p in partial.glob("state-*")) == f"state-{kept_step:06d}"
    assert max(p.name for p in (partial / "checkpoints").iterdir()) == f"step-{kept_step:06d}"
    assert json.loads((partial / "stopped.json").read_text())["step"] == failed_step


def test_nan_weights_resume_with_lower_lr(tiny_model_dir, tmp_path):
    import torch

    from llmforge.data import Example, tokenize_examples
    from llmforge.errors import ForgeError
    from llmforge.models import load_model
    from llmforge_finetune.lora import LoraSettings, wrap_with_lora
    from llmforge_finetune.resume import PartialRun
    from llmforge_finetune.train import TrainSettings, train

    def start(settings):
        loaded = load_model(str(tiny_model_dir))
        torch.manual_seed(0)
        model = wrap_with_lora(loaded.model, LoraSettings(dropout=0.0))
        examples = tokenize_examples([Example(f"Q{i}:", f" answer {i}") for i in range(6)], loaded.tokenizer,
                                     max_length=32)
        partial = PartialRun.open(tmp_path / "out", {"--lr": settings.lr}, save_every=1, resume=settings.lr != 5e-2,
                                  overwrite=False)
        return model, examples, partial

    def poison_after_third_step(step):
        if step == 2:
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("nan"))

    settings = TrainSettings(steps=5, batch_size=2, lr=5e-2, precision="fp32")
    model, examples, partial = start(settings)
    with pytest.raises(ForgeError, match="became NaN or infinite at step 3.*state of step 2 is kept"):
        train(model, examples, settings, pad_token_id=0, progress=False, partial=partial,
              step_hook=poison_after_third_step)
    assert sorted(p.name for p in partial.directory.glob("state-*")) == ["state-000001", "state-000002"]

    lower = TrainSettings(steps=5, batch_size=2, lr=1e-3, precision="fp32")
    model, examples, partial = start(lower)
    result = train(model, examples, lower, pad_token_id=0, progress=False, partial=partial)
    assert result.steps == 5
    assert len(result.loss_curve) == 5
    assert all(math.isfinite(loss) for loss in result.loss_curve)
    assert partial.resumes == [{"step": 2, "changed": {"--lr": {"before": 5e-2, "now": 1e-3}}}]


@pytest.mark.parametrize("method", ["full", "pissa", "adalora", "oft"])
def test_resume_exact_for_method(method, tiny_model_dir, qa_data, tmp_path, forge_env):
    from llmforge.models import load_model

    settings = ["--steps", "5", "--method", method, "--lr", "1e-2"]
    straight = tmp_path / "straight"
    assert invoke(*run_args(tiny_model_dir, qa_data, straight, *settings)).exit_code == 0

    output = tmp_path / "resumed"
    killed = kill_run(tiny_model_dir, qa_data, output, forge_env, 2, *settings, "--save-every", "2")
    assert killed.returncode == -9, killed.stderr
    result = invoke(*run_args(tiny_model_dir, qa_data, output, *settings, "--save-every", "2", "--resume"))
    assert result.exit_code == 0, result.output

    straight_state = load_model(str(straight)).model.state_dict()
    resumed_state = load_model(str(output)).model.state_dict()
    assert_same_tensors(straight_state, resumed_state)
    checkpoint = output / "checkpoints" / "step-000004"
    expected = ["forge_checkpoint.json", "trainable.safetensors"] if method == "full" else [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "forge_checkpoint.json"]
    assert sorted(p.name for p in checkpoint.iterdir()) == expected
