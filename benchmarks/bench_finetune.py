"""Benchmark: forge's LoRA training loop against HF peft + transformers Trainer on the same batches.

Both train LoRA r=8 (alpha 16, dropout 0.05) on all linear layers of smollm2-135m, on the same
tokenized examples in the same batch order (right-padded to the longest example of each batch,
loss on completion tokens only), with AdamW at lr 2e-4, a constant schedule and gradient clipping
at 1.0. Forge runs in its default bf16 mode (bf16 weights and LoRA factors, fp32 master copies).
The Trainer runs with bf16=True and use_cpu=True, which means torch.autocast(bfloat16) over the
fp32 model. The first --warmup steps of each are excluded from the timing.

Each side runs in its own subprocess of this script (`--only forge|trainer`), so that its peak
resident memory (VmHWM from /proc/self/status, read at the end of the subprocess) is its own.
The parent also times a bf16 matrix multiply to relate forge's model-FLOPs rate to this CPU.
Targets: forge at least 1.5x the Trainer's tokens/s, and forge's model FLOPs at least half
the bf16 matmul rate.

    python benchmarks/bench_finetune.py [--steps 20] [--batch-size 8] [--data demo:arith/train.jsonl] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

WARMUP_STEPS = 3
MATMUL_SIZE = 2048


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model reference to fine-tune")
    parser.add_argument("--data", default="demo:arith/train.jsonl",
                        help="training data: a JSONL file in a format llmforge.data detects (GSM8K question/answer "
                             "records work) or demo:NAME")
    parser.add_argument("--limit", type=int, default=1000, help="read at most this many records")
    parser.add_argument("--max-length", type=int, default=256, help="maximum tokens per example")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="untimed optimizer steps before them")
    parser.add_argument("--only", choices=("forge", "trainer"), help="run one side in this process (internal)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    """Return this process's peak resident set size (VmHWM) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def planned_batches(args, tokenizer) -> tuple[list, list[list]]:
    """Tokenize the data; return the examples and, for each warmup + timed step, its batch in forge's order."""
    from llmforge.data import (TokenizedExample, make_batches, read_records, resolve_data_path,
                               to_examples, tokenize_examples)

    records = read_records(resolve_data_path(args.data))[:args.limit]
    examples = tokenize_examples(to_examples(records, tokenizer), tokenizer, max_length=args.max_length)
    pad_id = tokenizer.pad_token_id

    # forge's training loop takes one make_batches epoch after another, seeded seed + epoch, with seed 0 here.
    needed = args.warmup + args.steps
    batches = []
    epoch = 0
    while len(batches) < needed:
        batches.extend(make_batches(examples, args.batch_size, pad_token_id=pad_id, seed=epoch))
        epoch += 1

    plan = []
    for batch in batches[:needed]:
        rows = []
        for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
            length = int(mask.sum())
            rows.append(TokenizedExample(ids[:length].tolist(), labels[:length].tolist()))
        plan.append(rows)
    return examples, plan


def token_counts(plan: list[list]) -> tuple[list[int], list[int]]:
    """Return per step the non-padding tokens (prompt + completion) and the completion (label) tokens."""
    from llmforge.data import IGNORE_INDEX

    tokens = [sum(len(row.input_ids) for row in rows) for rows in plan]
    labelled = [sum(sum(1 for label in row.labels[1:] if label != IGNORE_INDEX) for row in rows) for rows in plan]
    return tokens, labelled


def matmul_parameters(model) -> tuple[int, int]:
    """Return the weight counts of the decoder's linear layers and of the output layer (lm_head)."""
    head = model.get_output_embeddings()
    decoder = sum(module.weight.numel() for module in model.modules()
                  if isinstance(module, torch.nn.Linear) and module is not head)
    return decoder, head.weight.numel()


def run_forge(args) -> dict:
    """Train with forge's loop (bf16 mode) and return its timed-step throughput and parameter counts."""
    from llmforge.models import load_model

    from llmforge_finetune.methods import MethodSettings, get_method
    from llmforge_finetune.train import TrainSettings, train
    from llmforge_finetune.adapters import wrap_model

    loaded = load_model(args.model, dtype=torch.bfloat16)
    examples, plan = planned_batches(args, loaded.tokenizer)
    decoder_params, head_params = matmul_parameters(loaded.model)
    spec = get_method("lora")
    options = spec.resolve(MethodSettings(method="lora", rank=8, alpha=16, dropout=0.05, target_modules="all-linear"))
    settings = TrainSettings(steps=len(plan), batch_size=args.batch_size, lr=2e-4, warmup_steps=0,
                             schedule="constant", max_grad_norm=1.0, seed=0, precision="bf16")

    torch.manual_seed(0)
    model = wrap_model(loaded.model, spec, options, total_steps=len(plan))
    stamps = []
    result = train(model, examples, settings, pad_token_id=loaded.tokenizer.pad_token_id, progress=False,
                   step_hook=lambda step: stamps.append(time.perf_counter()))

    tokens = token_counts(plan)[0]
    # forge batches `examples` itself; equal totals show that it trained on the planned batches.
    assert result.tokens == sum(tokens), (result.tokens, sum(tokens))
    return {"side": "forge", "seconds": stamps[-1] - stamps[args.warmup - 1], "plan": plan,
            "loss_first_last": [result.loss_curve[0], result.loss_curve[-1]],
            "decoder_matmul_parameters": decoder_params, "head_parameters": head_params}


def run_trainer(args) -> dict:
    """Train with peft + transformers Trainer (bf16=True on CPU) and return its timed-step throughput."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llmforge.data import collate
    from llmforge.models import load_model

    loaded = load_model(args.model)
    plan = planned_batches(args, loaded.tokenizer)[1]
    pad_id = loaded.tokenizer.pad_token_id
    torch.manual_seed(0)
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                    target_modules="all-linear", task_type="CAUSAL_LM"))

    class InOrderTrainer(Trainer):
        """A Trainer that reads the dataset in order, so its batches are the planned ones."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def collator(rows):
        batch = collate([row["example"] for row in rows], pad_id)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}

    stamps = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="forge-bench-trainer-") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=len(plan),
            learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            bf16=True, use_cpu=True, eval_strategy="no", save_strategy="no", report_to=[], logging_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0)
        dataset = [{"example": row} for rows in plan for row in rows]
        trainer = InOrderTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                                 callbacks=[StepTimes()])
        trainer.train()
    assert len(stamps) == len(plan), (len(stamps), len(plan))
    return {"side": "trainer", "seconds": stamps[-1] - stamps[args.warmup - 1], "plan": plan}


def run_side(args) -> dict:
    """Run one side in this process and add the timed tokens and the peak memory."""
    import contextlib

    # The Trainer prints its summary on stdout, where the parent reads this side's JSON document.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_forge(args) if args.only == "forge" else run_trainer(args)

    tokens, labelled = token_counts(result.pop("plan"))
    result["timed_tokens"] = sum(tokens[args.warmup:])
    result["timed_label_tokens"] = sum(labelled[args.warmup:])
    result["tokens_per_second"] = result["timed_tokens"] / result["seconds"]
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def bf16_matmul_gflops(repeats: int = 5) -> float:
    """Return the median rate of a MATMUL_SIZE square bf16 torch.matmul in GFLOP/s (2 n^3 per product)."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=torch.bfloat16)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * MATMUL_SIZE**3 / statistics.median(times) / 1e9


def run_child(args, side: str) -> dict:
    command = [sys.executable, __file__, "--only", side, "--json", "--model", args.model, "--data", args.data,
               "--limit", str(args.limit), "--max-length", str(args.max_length), "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout)


def compare(args) -> dict:
    """Run both sides in subprocesses and the matmul timing here; return the comparison."""
    matmul_before = bf16_matmul_gflops()
    forge = run_child(args, "forge")
    trainer = run_child(args, "trainer")
    matmul_after = bf16_matmul_gflops()
    matmul = max(matmul_before, matmul_after)

    # LoRA on a frozen base: forward 2N and backward 2N (input gradients only) FLOPs per token, so 4N.
    decoder = forge["decoder_matmul_parameters"]
    head = forge["head_parameters"]
    decoder_gflops = 4 * decoder * forge["tokens_per_second"] / 1e9
    with_head_gflops = 4 * (decoder + head) * forge["tokens_per_second"] / 1e9
    return {
        "steps_timed": args.steps, "warmup_steps_untimed": args.warmup, "batch_size": args.batch_size,
        "data": args.data, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "tokens_counted": "non-padding tokens (prompt + completion) of the timed steps",
        "timed_tokens": forge["timed_tokens"], "timed_label_tokens": forge["timed_label_tokens"],
        "forge_tokens_per_second": round(forge["tokens_per_second"], 1),
        "trainer_tokens_per_second": round(trainer["tokens_per_second"], 1),
        "forge_over_trainer": round(forge["tokens_per_second"] / trainer["tokens_per_second"], 3),
        "forge_peak_rss_mib": forge["peak_rss_mib"], "trainer_peak_rss_mib": trainer["peak_rss_mib"],
        "forge_loss_first_last": forge["loss_first_last"],
        "bf16_matmul_gflops_before_after": [round(matmul_before, 1), round(matmul_after, 1)],
        "forge_model_gflops_decoder_4n": round(decoder_gflops, 2),
        "forge_model_gflops_with_head_4n": round(with_head_gflops, 2),
        "forge_fraction_of_matmul_decoder": round(decoder_gflops / matmul, 3),
        "forge_fraction_of_matmul_with_head": round(with_head_gflops / matmul, 3),
        "decoder_matmul_parameters": decoder, "head_parameters": head,
        "target_forge_over_trainer": 1.5, "target_fraction_of_matmul": 0.5,
    }


def main() -> None:
    args = parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    result = run_side(args) if args.only else compare(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, value in result.items():
            print(f"{name:<36} {value}")


if __name__ == "__main__":
    main()
