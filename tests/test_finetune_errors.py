"""Bad input and faults of `forge finetune`: each exits 1, names the value, and leaves no output behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from llmforge.cli import cli

from conftest import FORGE, requires_smollm2

KILL_VARIABLE = "LLMFORGE_FINETUNE_KILL_AFTER_STEP"
SIZED_METHODS = ["lora", "dora", "rslora", "pissa", "milora", "adalora", "miss", "vera", "oft", "boft"]
TINY_LINEAR_MODULES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"


def invoke(*args: str):
    return CliRunner().invoke(cli, ["finetune", *args], catch_exceptions=False)


def run_args(model_dir, data, output, *extra, steps=1):
    return ["--model", str(model_dir), "--data", str(data), "-o", str(output), "--quiet", "--steps", str(steps),
            "--threads", "1", *extra]


def assert_rejected(result, output, *fragments):
    """Check exit status 1, one "Error:" line containing every fragment, and no output or OUTPUT.partial."""
    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ")
    for fragment in fragments:
        assert fragment in error
    assert "Traceback" not in result.output
    assert not output.exists()
    assert not output.with_name(output.name + ".partial").exists()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def tiny_count(tiny_model_dir, method: str, **options) -> int:
    from transformers import AutoConfig

    from llmforge_finetune.budget import count_parameters
    from llmforge_finetune.methods import MethodSettings, get_method

    spec = get_method(method)
    values = spec.resolve(MethodSettings(method=method, **options))
    return count_parameters(AutoConfig.from_pretrained(tiny_model_dir), spec, values)[0]


# --budget no configuration can meet


def test_budget_below_smallest_size(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    smallest = tiny_count(tiny_model_dir, "lora", rank=1)
    largest = tiny_count(tiny_model_dir, "lora", rank=32)

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--budget", "100"))

    assert_rejected(result, output, "--budget 100 is below the smallest LoRA size",
                    f"(--rank 1: {smallest:,} parameters) on {tiny_model_dir}",
                    f"{smallest:,} (--rank 1) to {largest:,} (--rank 32)")


def test_budget_above_largest_size(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    largest = tiny_count(tiny_model_dir, "oft", block_size=32)

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--method", "oft", "--budget", "1e9"))

    assert_rejected(result, output, "--budget 1,000,000,000 is above the largest OFT size",
                    f"(--block-size 32: {largest:,} parameters)")


def test_budget_out_of_range_in_dry_run(tiny_model_dir):
    result = invoke("--model", str(tiny_model_dir), "--method", "dora", "--budget", "10", "--dry-run")

    assert result.exit_code == 1, result.output
    assert "--budget 10 is below the smallest DoRA size" in result.stderr
    assert result.stdout == ""


def test_budget_inside_range_still_matches(tiny_model_dir):
    smallest = tiny_count(tiny_model_dir, "lora", rank=1)

    result = invoke("--model", str(tiny_model_dir), "--budget", str(smallest), "--dry-run", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["size"] == 1


@pytest.mark.parametrize("method", ["ia3", "full"])
def test_budget_fixed_count_warns(tiny_model_dir, caplog, method):
    # A sweep that gives every method the same budget must still run the methods without a size option.
    fixed = tiny_count(tiny_model_dir, method)
    budget = fixed * 3

    result = invoke("--model", str(tiny_model_dir), "--method", method, "--budget", str(budget), "--dry-run",
                    "--json")

    assert result.exit_code == 0, result.output
    assert f"--budget {budget} cannot be matched; it trains {fixed} parameters (0.33x the budget)" in caplog.text
    plan = json.loads(result.stdout)
    assert plan["budget"]["matched"] is False
    assert plan["trainable_parameters"] == fixed


@requires_smollm2
@pytest.mark.slow
def test_budget_range_on_real_model(real_model_cache):
    result = invoke("--model", "smollm2-135m", "--budget", "100", "--dry-run")

    assert result.exit_code == 1, result.output
    # 8 x 305,280 = 2,442,240, the LoRA count of the default rank 8 on all linear layers.
    assert ("--budget 100 is below the smallest LoRA size (--rank 1: 305,280 parameters) on smollm2-135m"
            in result.stderr)
    assert "305,280 (--rank 1) to " in result.stderr


# --target-modules that match nothing


@pytest.mark.parametrize("method", SIZED_METHODS + ["ia3"])
def test_unknown_target_module_lists_names(tiny_model_dir, qa_data, tmp_path, method):
    output = tmp_path / "adapter"

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--method", method, "--target-modules", "foo_proj"))

    assert_rejected(result, output, "invalid --target-modules 'foo_proj'", "is named 'foo_proj'",
                    f"its linear modules are {TINY_LINEAR_MODULES}")


def test_unknown_target_module_in_dry_run(tiny_model_dir):
    result = invoke("--model", str(tiny_model_dir), "--target-modules", "q_proj,foo_proj,bar", "--dry-run")

    assert result.exit_code == 1, result.output
    assert "is named 'foo_proj' or 'bar'" in result.stderr
    assert TINY_LINEAR_MODULES in result.stderr


def test_target_module_suffix_is_accepted(tiny_model_dir):
    result = invoke("--model", str(tiny_model_dir), "--target-modules", "self_attn.q_proj,v_proj", "--dry-run",
                    "--json")

    assert result.exit_code == 0, result.output
    # Rank 8 on q_proj (32 -> 32) and v_proj (32 -> 16) of two layers.
    assert json.loads(result.stdout)["trainable_parameters"] == 2 * 8 * ((32 + 32) + (32 + 16))


# Sequences longer than the model allows


@pytest.fixture
def long_data(tmp_path):
    """Nine prompt/completion records; lines 5 and 7 have a completion of 40 words."""
    records = [{"prompt": f"Q{i}:", "completion": " short"} for i in range(9)]
    records[4]["completion"] = " word" * 40
    records[6]["completion"] = " word" * 40
    return write_jsonl(tmp_path / "long.jsonl", records)


def token_count(tiny_model_dir, prompt, completion):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return len(tokenizer(prompt)["input_ids"]) + len(tokenizer(completion, add_special_tokens=False)["input_ids"]) + 1


def test_overlong_reject_names_first_example(tiny_model_dir, long_data, tmp_path):
    output = tmp_path / "adapter"
    length = token_count(tiny_model_dir, "Q4:", " word" * 40)

    result = invoke(*run_args(tiny_model_dir, long_data, output, "--max-length", "32", "--overlong", "reject",
                              "--batch-size", "4"))

    assert_rejected(result, output, f"{long_data}:5: the example is {length} tokens long",
                    "more than --max-length 32", "2 of 9 examples exceed it", "--overlong truncate")


def test_overlong_reject_after_limit_keeps_line(tiny_model_dir, long_data, tmp_path):
    output = tmp_path / "adapter"

    result = invoke(*run_args(tiny_model_dir, long_data, output, "--max-length", "32", "--overlong", "reject",
                              "--limit", "6", "--batch-size", "4"))

    assert_rejected(result, output, f"{long_data}:5: the example is", "1 of 6 examples exceed it")


def test_overlong_truncate_is_recorded(tiny_model_dir, long_data, tmp_path, caplog):
    output = tmp_path / "adapter"

    result = invoke(*run_args(tiny_model_dir, long_data, output, "--max-length", "32", "--batch-size", "4"))

    assert result.exit_code == 0, result.output
    assert "2 of 9 examples are longer than max_length=32 tokens and were truncated" in caplog.text
    data = json.loads((output / "forge_run.json").read_text())["data"]
    assert data["overlong"] == "truncate"
    assert data["truncated"] == 2
    assert data["dropped"] == 0


def test_tokenize_reject_without_locations(tiny_model_dir):
    from transformers import AutoTokenizer

    from llmforge.data import Example, tokenize_examples
    from llmforge.errors import ForgeError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [Example("Q:", " a"), Example("Q:", " word" * 20)]

    with pytest.raises(ForgeError, match=r"^example 2: the example is \d+ tokens long"):
        tokenize_examples(examples, tokenizer, max_length=8, overlong="reject")
    with pytest.raises(ForgeError, match="invalid --overlong 'drop'"):
        tokenize_examples(examples, tokenizer, max_length=8, overlong="drop")


def test_max_length_above_model_limit(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--max-length", "300"))

    assert_rejected(result, output, "invalid --max-length 300", "accepts at most 256 tokens",
                    "max_position_embeddings")


def test_max_length_above_model_limit_in_dry_run(tiny_model_dir):
    result = invoke("--model", str(tiny_model_dir), "--max-length", "257", "--dry-run")

    assert result.exit_code == 1, result.output
    assert "invalid --max-length 257" in result.stderr


# A data set smaller than one batch, or empty


def test_fewer_examples_than_batch(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--batch-size", "16"))

    assert_rejected(result, output, "the training set has 12 examples (12 records)", "fewer than --batch-size 16",
                    "pass --batch-size 12 or less")


def test_batch_check_counts_limit_and_split(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"

    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--limit", "8", "--eval-split", "0.5",
                              "--batch-size", "6"))

    assert_rejected(result, output, "has 4 examples (8 records after --limit 8, 4 held out by --eval-split 0.5)",
                    "fewer than --batch-size 6", "pass --batch-size 4 or less")


def test_batch_check_counts_dropped(tiny_model_dir, tmp_path):
    output = tmp_path / "adapter"
    records = [{"prompt": "Q:", "completion": " a"}] * 4 + [{"prompt": "long " * 40, "completion": " b"}] * 2
    data = write_jsonl(tmp_path / "mixed.jsonl", records)

    result = invoke(*run_args(tiny_model_dir, data, output, "--max-length", "16", "--batch-size", "5"))

    assert_rejected(result, output, "has 4 examples (6 records, 2 dropped as too long for --max-length 16)")


def test_no_examples_after_filtering(tiny_model_dir, qa_data, tmp_path):
    output = tmp_path / "adapter"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    empty_completions = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "a", "completion": ""}] * 2)
    long_prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "long " * 40, "completion": " b"}] * 2)
    cases = [
        (empty, [], [f"{empty}: no records found"]),
        (empty_completions, [], [f"{empty_completions}:1: empty completion"]),
        (qa_data, ["--limit", "0"], ["invalid --limit 0"]),
        (long_prompts, ["--max-length", "8"], ["none of the 2 examples keeps a completion token within "
                                               "--max-length 8"]),
    ]
    for data, extra, fragments in cases:
        result = invoke(*run_args(tiny_model_dir, data, output, "--batch-size", "1", *extra))
        assert_rejected(result, output, *fragments)


# --resume from another model or method, and a run killed while writing


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_model_dir):
    """A LoRA run killed after saving step 2 of 4: (data file, OUTPUT.partial directory)."""
    root = tmp_path_factory.mktemp("killed")
    data = write_jsonl(root / "qa.jsonl", [{"question": f"What is {a} plus {b}?", "answer": str(a + b)}
                                           for a in range(3) for b in range(4)])
    output = root / "adapter"
    env = {**os.environ, "FORGE_CACHE": str(root / "cache"), KILL_VARIABLE: "2", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([FORGE, "finetune", *run_args(tiny_model_dir, data, output, "--save-every", "2",
                                                             "--batch-size", "4", steps=4)],
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == -9, completed.stderr
    return data, output.with_name("adapter.partial")


def copy_partial(killed_run, tmp_path):
    data, partial = killed_run
    output = tmp_path / "adapter"
    shutil.copytree(partial, tmp_path / "adapter.partial")
    return data, output


def resume_args(model_dir, data, output, *extra):
    return run_args(model_dir, data, output, "--save-every", "2", "--batch-size", "4", "--resume", *extra, steps=4)


def test_resume_with_other_method(tiny_model_dir, killed_run, tmp_path):
    data, output = copy_partial(killed_run, tmp_path)

    result = invoke(*resume_args(tiny_model_dir, data, output, "--method", "oft"))

    assert result.exit_code == 1, result.output
    assert (f"--resume: the unfinished run in {output}.partial used --method lora, this command asks for "
            "--method oft;") in result.stderr
    assert "--overwrite without --resume" in result.stderr
    assert not output.exists()
    assert (tmp_path / "adapter.partial" / "state-000002").is_dir()


def test_resume_with_other_model(tiny_model_dir, killed_run, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from llmforge.models import model_digest

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    data, output = copy_partial(killed_run, tmp_path)

    result = invoke(*resume_args(other, data, output))

    assert result.exit_code == 1, result.output
    assert (f"used --model with content digest {model_digest(str(tiny_model_dir))}, this command asks for "
            f"--model with content digest {model_digest(str(other))};") in result.stderr
    assert not output.exists()


def test_resume_with_other_rank(tiny_model_dir, killed_run, tmp_path):
    data, output = copy_partial(killed_run, tmp_path)

    result = invoke(*resume_args(tiny_model_dir, data, output, "--rank", "4"))

    assert result.exit_code == 1, result.output
    assert "used --rank 8, this command asks for --rank 4;" in result.stderr


def test_resume_ignores_leftover_temporaries(tiny_model_dir, killed_run, tmp_path):
    data, output = copy_partial(killed_run, tmp_path)
    partial = tmp_path / "adapter.partial"
    # What a kill inside atomic_directory leaves: the half-written checkpoint and state of step 4.
    (partial / "checkpoints" / ".step-000004.x1y2.tmp").mkdir()
    (partial / "checkpoints" / ".step-000004.x1y2.tmp" / "adapter_config.json").write_text("{")
    (partial / ".state-000004.x1y2.tmp").mkdir()

    result = invoke(*resume_args(tiny_model_dir, data, output, "--json"))

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_step"] == 2
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000002"]
    assert not partial.exists()
