"""forge zo end to end on the tiny model: outputs that load elsewhere, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FORGE
from test_zo_engine import toy_records

CLASSIFY = ["--template", "{sentence} It was", "--verbalizers", "0=terrible,1=great"]


def run_zo(*args, env, check_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([FORGE, "zo", *args], capture_output=True, text=True, env=env, timeout=600)
    if check_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def sst_like(tmp_path):
    path = tmp_path / "train.tsv"
    rows = ["sentence\tlabel"] + [f"{r['sentence'].strip()}\t{r['label']}" for r in toy_records(40)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_mezo_lora_adapter_matches_engine_loss(tiny_model_dir, sst_like, tmp_path, forge_env):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    result = run_zo("--model", str(tiny_model_dir), "--data", str(sst_like), *CLASSIFY, "--method", "mezo-lora",
                    "--steps", "6", "--batch-size", "8", "--lr", "0.5", "--dtype", "fp32", "--eval-data", str(sst_like),
                    "-o", str(out), "--json", env=forge_env)
    summary = json.loads(result.stdout)

    record = json.loads((out / "forge_run.json").read_text())
    assert record["schema"] == "llmforge.zo.run/1"
    assert record["settings"]["method"] == "mezo-lora"
    assert record["zero_shot"]["step"] == 0
    assert "accuracy" in summary["final"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    factors = load_file(out / "adapter_model.safetensors")
    trained_b = [tensor for key, tensor in factors.items() if key.endswith("lora_B.weight")]
    assert trained_b
    assert any(tensor.abs().max() > 0 for tensor in trained_b)

    # The adapter, applied by peft, gives the dev loss that forge measured with its own engine.
    from transformers import AutoTokenizer

    from llmforge.readers import read_records
    from llmforge_zo.examples import classification_data, parse_verbalizers
    from llmforge_zo.objective import losses_from_logits

    data = classification_data(read_records(sst_like), AutoTokenizer.from_pretrained(tiny_model_dir),
                               template="{sentence} It was", verbalizer=parse_verbalizers("0=terrible,1=great"),
                               label_field="label", max_length=256)
    batch = data.batch(range(len(data)))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert losses_from_logits(batch, logits).losses.item() == pytest.approx(summary["final"]["loss"], rel=1e-4)


def test_lozo_writes_a_model_that_transformers_loads(tiny_model_dir, sst_like, tmp_path, forge_env):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "model"
    run_zo("--model", str(tiny_model_dir), "--data", str(sst_like), *CLASSIFY, "--method", "lozo", "--steps", "5",
           "--batch-size", "8", "--lr", "1e-2", "--nu", "2", "-o", str(out), env=forge_env)

    record = json.loads((out / "forge_run.json").read_text())
    assert record["settings"]["nu"] == 2
    assert "alpha" not in record["settings"]
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert changed
    assert all(name.endswith("proj.weight") for name in changed)


def test_completion_objective_trains_on_question_answer_data(tiny_model_dir, qa_data, tmp_path, forge_env):
    out = tmp_path / "qa"
    result = run_zo("--model", str(tiny_model_dir), "--data", str(qa_data), "--method", "mezo-lora", "--steps", "3",
                    "--batch-size", "4", "--eval-data", str(qa_data), "-o", str(out), "--json", env=forge_env)
    summary = json.loads(result.stdout)
    assert summary["objective"] == "language-model"
    assert "accuracy" not in summary["final"]
    assert summary["final"]["loss"] > 0


def test_killed_run_resumes_exactly(tiny_model_dir, sst_like, tmp_path, forge_env):
    common = ["--model", str(tiny_model_dir), "--data", str(sst_like), *CLASSIFY, "--method", "lozo-m", "--steps", "8",
              "--batch-size", "8", "--lr", "1e-2", "--nu", "3", "--save-every", "2"]
    run_zo(*common, "-o", str(tmp_path / "whole"), env=forge_env)
    killed = run_zo(*common, "-o", str(tmp_path / "cut"), check_ok=False,
                    env={**forge_env, "LLMFORGE_ZO_KILL_AFTER_STEP": "4"})
    assert killed.returncode == -9
    assert not (tmp_path / "cut").exists()

    again = run_zo(*common, "-o", str(tmp_path / "cut"), check_ok=False, env=forge_env)
    assert again.returncode == 1
    assert "--resume" in again.stderr
    run_zo(*common, "-o", str(tmp_path / "cut"), "--resume", env=forge_env)

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)
    record = json.loads((tmp_path / "cut" / "forge_run.json").read_text())
    assert record["resumed_at"] == [4]
    assert not (tmp_path / "cut.partial").exists()


def test_resume_with_other_settings_is_rejected(tiny_model_dir, sst_like, tmp_path, forge_env):
    common = ["--model", str(tiny_model_dir), "--data", str(sst_like), *CLASSIFY, "--steps", "4",
              "--batch-size", "8", "--save-every", "2", "-o", str(tmp_path / "out")]
    run_zo(*common, check_ok=False, env={**forge_env, "LLMFORGE_ZO_KILL_AFTER_STEP": "2"})
    result = run_zo(*common, "--resume", "--seed", "5", check_ok=False, env=forge_env)
    assert result.returncode == 1
    assert "--seed was 0 in the saved run and is 5 now" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--eps", "0"], "invalid --eps 0.0; it must be a positive finite number"),
    (["--eps", "inf"], "invalid --eps inf; it must be a positive finite number"),
    (["--lr", "-1e-3"], "invalid --lr -0.001; it must be a positive finite number"),
    (["--weight-decay", "nan"], "invalid --weight-decay nan"),
    (["--batch-size", "64"], "fewer than one batch of 64"),
    (["--backend", "vllm"], "no zeroth-order scoring backend named 'vllm'"),
    (["--label-field", "stars"], "has no label in the field 'stars'"),
    (["--verbalizers", "0=terrible,1=zorblax"], None),
    (["--verbalizers", "0=terrible"], "names 1 label"),
    (["--verbalizers", "0=terrible,2=great"], "label '1' has no verbalizer word"),
    (["--single-token", "require", "--verbalizers", "0=terrible,1=zorblax"], "needs one token per word"),
    (["--template", "{review} It was"], "the --template '{review} It was' names the missing field 'review'"),
])
def test_bad_input_exits_1_and_writes_nothing(tiny_model_dir, sst_like, tmp_path, forge_env, flags, message):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--data", str(sst_like), *CLASSIFY, "--steps", "2", "--batch-size", "8",
            *flags, "-o", str(out)]
    result = run_zo(*args, check_ok=False, env=forge_env)
    if message is None:
        # A multi-token word is scored one row per option, with a warning, and the run succeeds.
        assert result.returncode == 0, result.stderr[-2000:]
        assert "more than one token" in result.stderr
        return
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not (tmp_path / "out.partial").exists()


def test_nan_loss_exits_1_naming_the_step(tiny_model_dir, sst_like, tmp_path, forge_env):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(tiny_model_dir / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})

    result = run_zo("--model", str(broken), "--data", str(sst_like), *CLASSIFY, "--steps", "3", "--batch-size", "8",
                    "-o", str(tmp_path / "out"), check_ok=False, env=forge_env)
    assert result.returncode == 1
    assert "NaN or infinite at step 0" in result.stderr
    assert not (tmp_path / "out").exists()


def test_eval_every_needs_dev_data(tiny_model_dir, sst_like, tmp_path, forge_env):
    result = run_zo("--model", str(tiny_model_dir), "--data", str(sst_like), *CLASSIFY, "--eval-every", "2",
                    "-o", str(tmp_path / "out"), check_ok=False, env=forge_env)
    assert result.returncode == 1
    assert "--eval-every needs --eval-data" in result.stderr
    assert os.listdir(tmp_path) == ["train.tsv"]


def test_ctrl_c_exits_130_with_resume_hint(tiny_model_dir, sst_like, tmp_path, forge_env):
    import signal
    import time

    out = tmp_path / "out"
    process = subprocess.Popen([FORGE, "zo", "--model", str(tiny_model_dir), "--data", str(sst_like), *CLASSIFY,
                                "--steps", "1000000", "--batch-size", "8", "--save-every", "5", "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=forge_env)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out.partial").glob("state-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130
    assert "rerun the same command with --resume" in stderr
    assert not out.exists()
    assert list((tmp_path / "out.partial").glob("state-*.safetensors"))
