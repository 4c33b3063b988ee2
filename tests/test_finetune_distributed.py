"""Tests of data-parallel fine-tuning: `forge finetune` under torchrun and accelerate launch, on loopback only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from llmforge.cli import cli
from llmforge.errors import ForgeError

from conftest import FORGE

KILL_VARIABLE = "LLMFORGE_FINETUNE_KILL_AFTER_STEP"
# Adapter dropout draws different masks per process, so the runs compared for equality turn it off.
EXACT = ["--no-bf16", "--dropout", "0", "--lr", "1e-2", "--threads", "1", "--quiet", "--json"]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                      "GROUP_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def single_process_environment(monkeypatch):
    """Remove launcher variables that a surrounding torchrun could have set, so in-process runs are one process."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env(forge_env, tmp_path) -> dict[str, str]:
    # gloo binds to the loopback interface, and accelerate reads no user configuration.
    return {**forge_env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "HF_HOME": str(tmp_path / "hf-home")}


def torchrun(args, env, processes=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_loopback_port()), str(FORGE), "finetune",
               *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["finetune", *args], catch_exceptions=False)


def run_args(model_dir, data, output, *extra):
    return ["--model", str(model_dir), "--data", str(data), "-o", str(output), *extra]


def adapter_tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def record(directory):
    return json.loads((directory / "forge_run.json").read_text())


def assert_close_tensors(first, second, rtol=1e-5, atol=1e-5):
    # AdamW divides by the root of the mean squared gradient, which magnifies the rounding of
    # near-zero gradients. A different split of the same batch moved LoRA weights by up to 4e-6
    # after 4 steps at lr 1e-2 on the tiny model. A mean of micro-batch means moved them by 5e-2.
    import torch

    assert sorted(first) == sorted(second)
    for name in first:
        assert torch.allclose(first[name], second[name], rtol=rtol, atol=atol), name


def assert_close_curves(first, second, rtol=1e-5):
    assert len(first) == len(second)
    assert first == pytest.approx(second, rel=rtol)


def test_world_defaults_to_one_process():
    from llmforge_finetune.distributed import World

    assert World.from_environment({}) == World(rank=0, size=1, local_rank=0)
    assert World.from_environment({"WORLD_SIZE": "1"}).is_main


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "29500"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "invalid RANK 2"),
    ({"WORLD_SIZE": "two"}, "invalid WORLD_SIZE 'two'"),
    ({"WORLD_SIZE": "0"}, "invalid WORLD_SIZE 0"),
])
def test_world_rejects_incomplete_environment(environ, expected):
    from llmforge_finetune.distributed import World

    with pytest.raises(ForgeError, match=expected):
        World.from_environment(environ, connect=False)


def test_world_shards_contiguously():
    from llmforge_finetune.distributed import World

    items = list(range(5))
    shares = [World(rank=rank, size=2).shard(items) for rank in range(2)]
    assert shares == [[0, 1], [2, 3, 4]]
    assert [World(rank=rank, size=4).shard([7]) for rank in range(4)] == [[], [], [], [7]]


def test_batch_size_not_divisible_rejected(tiny_model_dir, qa_data, tmp_path, monkeypatch):
    # The check runs before the process group is joined, so no other process is needed.
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_loopback_port())}.items():
        monkeypatch.setenv(name, value)
    output = tmp_path / "adapter"
    result = invoke(*run_args(tiny_model_dir, qa_data, output, "--steps", "2", "--batch-size", "3", "--quiet"))

    assert result.exit_code == 1
    assert "invalid --batch-size 3 for a world size of 2" in result.stderr
    assert not output.exists()
    assert not (tmp_path / "adapter.partial").exists()


def test_grad_accum_weights_tokens(tiny_model_dir):
    import torch

    from llmforge.data import Example, tokenize_examples
    from llmforge.models import load_model
    from llmforge_finetune.lora import LoraSettings, wrap_with_lora
    from llmforge_finetune.train import TrainSettings, train

    def run(batch_size, grad_accum):
        loaded = load_model(str(tiny_model_dir))
        torch.manual_seed(0)
        model = wrap_with_lora(loaded.model, LoraSettings(dropout=0.0))
        # Completions of very different lengths: a mean of micro-batch means would weight them unequally.
        examples = tokenize_examples([Example(f"Q{i}:", " word" * (1 + 9 * (i % 2))) for i in range(4)],
                                     loaded.tokenizer, max_length=32)
        settings = TrainSettings(steps=4, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup_steps=0,
                                 precision="fp32")
        result = train(model, examples, settings, pad_token_id=0, progress=False)
        trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return result, trained

    # With four examples every step covers all of them, whatever the split into micro-batches.
    whole, whole_weights = run(4, 1)
    accumulated, accumulated_weights = run(2, 2)
    assert_close_curves(accumulated.loss_curve, whole.loss_curve)
    assert accumulated.tokens == whole.tokens
    assert_close_tensors(accumulated_weights, whole_weights)
    assert whole.loss_curve[-1] < whole.loss_curve[0]


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, qa_data, tmp_path, forge_env):
    env = launcher_env(forge_env, tmp_path)
    # Nine training examples in batches of four end each epoch with a batch of one row, so rank 0
    # gets an empty share. The held-out loss is computed on shares of 1 and 2 examples.
    settings = ["--steps", "4", "--batch-size", "4", "--eval-split", "0.25", "--eval-every", "2", *EXACT]
    two = tmp_path / "two"
    completed = torchrun(run_args(tiny_model_dir, qa_data, two, *settings), env)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)  # one document: rank 1 prints nothing
    one = tmp_path / "one"
    assert invoke(*run_args(tiny_model_dir, qa_data, one, *settings)).exit_code == 0

    assert summary["world_size"] == 2
    assert summary["global_batch"] == 4
    assert summary["micro_batch_per_process"] == 2
    assert summary["tokens"] == record(one)["tokens"]
    assert_close_curves(record(two)["loss_curve"], record(one)["loss_curve"])
    assert [step for step, _ in record(two)["eval_curve"]] == [2, 4]
    assert_close_curves([loss for _, loss in record(two)["eval_curve"]],
                        [loss for _, loss in record(one)["eval_curve"]])
    assert_close_tensors(adapter_tensors(two), adapter_tensors(one))
    assert record(one)["loss_curve"][-1] != record(one)["loss_curve"][0]


@pytest.mark.slow
def test_two_processes_match_grad_accum(tiny_model_dir, qa_data, tmp_path, forge_env):
    env = launcher_env(forge_env, tmp_path)
    # Four examples: every step of a global batch of four covers all of them, whatever the split.
    common = ["--steps", "3", "--limit", "4", *EXACT]
    two = tmp_path / "two"
    completed = torchrun(run_args(tiny_model_dir, qa_data, two, *common, "--batch-size", "4"), env)
    assert completed.returncode == 0, completed.stderr
    accumulated = tmp_path / "accumulated"
    result = invoke(*run_args(tiny_model_dir, qa_data, accumulated, *common, "--batch-size", "2", "--grad-accum", "2"))
    assert result.exit_code == 0, result.output

    assert record(accumulated)["global_batch"] == 4
    assert record(accumulated)["world_size"] == 1
    assert_close_curves(record(two)["loss_curve"], record(accumulated)["loss_curve"])
    assert_close_tensors(adapter_tensors(two), adapter_tensors(accumulated))


@pytest.mark.slow
def test_torchrun_rejects_indivisible_batch(tiny_model_dir, qa_data, tmp_path, forge_env):
    output = tmp_path / "adapter"
    completed = torchrun(run_args(tiny_model_dir, qa_data, output, "--steps", "2", "--batch-size", "3", "--quiet"),
                         launcher_env(forge_env, tmp_path))

    assert completed.returncode == 1
    assert "invalid --batch-size 3 for a world size of 2" in completed.stderr
    assert not output.exists()


@pytest.fixture
def uneven_data(tmp_path):
    """Twelve sums of 1 to 12 terms: rows of different lengths give each rank differently shaped dropout masks."""
    path = tmp_path / "sums.jsonl"
    records = [{"question": "What is " + " plus ".join(str(k) for k in range(terms)) + "?",
                "answer": str(sum(range(terms)))} for terms in range(1, 13)]
    path.write_text("".join(json.dumps(item) + "\n" for item in records), encoding="utf-8")
    return path


@pytest.mark.slow
def test_resume_two_processes(tiny_model_dir, uneven_data, tmp_path, forge_env):
    env = launcher_env(forge_env, tmp_path)
    # Default dropout: the ranks' shares have different shapes, so their random generators drift
    # apart, and each rank's state must be saved and restored for an exact resume.
    settings = ["--steps", "5", "--batch-size", "4", "--no-bf16", "--lr", "5e-2", "--threads", "1", "--quiet"]
    straight = tmp_path / "straight"
    completed = torchrun(run_args(tiny_model_dir, uneven_data, straight, *settings), env)
    assert completed.returncode == 0, completed.stderr

    output = tmp_path / "resumed"
    killed = torchrun(run_args(tiny_model_dir, uneven_data, output, *settings, "--save-every", "2"),
                      {**env, KILL_VARIABLE: "2"})
    assert killed.returncode != 0
    assert not output.exists()
    assert (tmp_path / "resumed.partial" / "state-000002").is_dir()

    result = invoke(*run_args(tiny_model_dir, uneven_data, output, *settings, "--save-every", "2", "--resume"))
    assert result.exit_code == 1
    assert "used WORLD_SIZE 2" in result.stderr
    assert "asks for WORLD_SIZE 1" in result.stderr

    resumed = torchrun(run_args(tiny_model_dir, uneven_data, output, *settings, "--save-every", "2", "--resume"), env)
    assert resumed.returncode == 0, resumed.stderr
    assert record(output)["resumed_from_step"] == 2
    assert record(output)["loss_curve"] == record(straight)["loss_curve"]
    assert_close_tensors(adapter_tensors(output), adapter_tensors(straight), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_accelerate_launch_runs_two_processes(tiny_model_dir, qa_data, tmp_path, forge_env):
    # accelerate 1.16 starts N processes through torchrun with --multi_gpu even without a GPU,
    # while --cpu starts a single process unless MPI is set up.
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if not os.path.exists(accelerate):
        pytest.skip("accelerate is not installed beside the test interpreter")
    output = tmp_path / "adapter"
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(free_loopback_port()), str(FORGE), "finetune",
               *run_args(tiny_model_dir, qa_data, output, "--steps", "2", "--batch-size", "4", *EXACT)]
    completed = subprocess.run(command, env=launcher_env(forge_env, tmp_path), capture_output=True, text=True,
                               timeout=300)

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["world_size"] == 2
    assert record(output)["micro_batch_per_process"] == 2
