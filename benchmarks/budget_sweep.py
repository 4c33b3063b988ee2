"""Budget sweep: fine-tune every method at one trainable-parameter budget and reload each output.

For each method of `forge finetune --list-methods`, this runs the real command line

    forge finetune --model MODEL --data DATA --limit N --method M --budget B --steps S -o OUT/M --json

in a subprocess. It then loads each output the way a user outside forge would. PEFT adapters go through
`peft.PeftModel.from_pretrained` on the base model, the full fine-tune through
`transformers.AutoModelForCausalLM`. The loaded model's loss on the first training records is
shown next to the base model's. One row per method shows the chosen size, the exact trainable
count and its distance from the budget, the throughput, the train loss and the reloaded loss.

    python benchmarks/budget_sweep.py --data ../shared/data/gsm8k/train.jsonl [--budget 2.4M] [--steps 8] [--json]

The default model is smollm2-135m; its first load converts the GGUF file into the forge cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FORGE = Path(sys.executable).with_name("forge")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model reference")
    parser.add_argument("--data", required=True, help="training data, e.g. ../shared/data/gsm8k/train.jsonl")
    parser.add_argument("--limit", type=int, default=64, help="training records read from --data")
    parser.add_argument("--budget", default="2.4M", help="trainable-parameter budget for every method")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example")
    parser.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--output", type=Path, help="directory for the outputs (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def finetune(args, method: str, output: Path) -> dict:
    """Run `forge finetune` for one method and return its JSON summary (or the error it printed)."""
    command = [str(FORGE), "finetune", "--model", args.model, "--data", args.data, "--limit", str(args.limit),
               "--method", method, "--budget", args.budget, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length), "-o", str(output), "--json", "--quiet",
               "--overwrite"]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout)


def reload_loss(args, method: str, output: Path, batch) -> float:
    """Load the output with peft (or transformers for full fine-tuning) and return its loss on `batch`."""
    from transformers import AutoModelForCausalLM

    from llmforge.models import resolve_model_dir

    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(output)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model))
        model = PeftModel.from_pretrained(base, output)
    return completion_loss(model, batch)


def completion_loss(model, batch) -> float:
    """Return the mean cross-entropy over the batch's labelled tokens, computed from the logits.

    The labels are not passed to the model: peft 0.21's AdaLoRA model, loaded for inference,
    fails in its forward pass when the model computes a loss (it adds its training-time
    orthogonality term and looks up a training-only attribute).
    """
    import torch

    with torch.inference_mode():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels.reshape(-1), ignore_index=-100).item()


def probe_batch(args):
    """Return the first --batch-size training examples as a padded batch with labels, and the base model's loss."""
    from transformers import AutoModelForCausalLM

    from llmforge.data import collate, read_records, resolve_data_path, to_examples, tokenize_examples
    from llmforge.models import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(args.model)
    records = read_records(resolve_data_path(args.data))[:args.batch_size]
    examples = tokenize_examples(to_examples(records, tokenizer), tokenizer, max_length=args.max_length)
    padded = collate(examples, tokenizer.pad_token_id)
    batch = {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask, "labels": padded.labels}
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model))
    return batch, completion_loss(base, batch)


def sweep(args, root: Path) -> dict:
    """Fine-tune and reload every requested method; return the rows and the base model's loss."""
    from llmforge_finetune.methods import METHODS

    methods = args.methods.split(",") if args.methods else list(METHODS)
    batch, base_loss = probe_batch(args)
    rows = []
    for method in methods:
        print(f"budget sweep: {method}", file=sys.stderr, flush=True)
        output = root / method
        summary = finetune(args, method, output)
        row = {"method": method, **summary}
        if "error" not in summary:
            try:
                row["reloaded_loss"] = round(reload_loss(args, method, output, batch), 4)
            except Exception as error:  # noqa: BLE001 - a failed reload is a result of this check, not a crash
                row["error"] = f"reloading {output} failed: {type(error).__name__}: {error}"
            record = json.loads((output / "forge_run.json").read_text())
            row["budget_match"] = record["budget"]
        rows.append(row)
    return {"model": args.model, "data": args.data, "limit": args.limit, "budget": args.budget, "steps": args.steps,
            "batch_size": args.batch_size, "base_loss_on_probe": round(base_loss, 4), "rows": rows}


def print_table(result: dict) -> None:
    print(f"model {result['model']}, budget {result['budget']}, {result['steps']} steps of {result['batch_size']} "
          f"examples; base loss on the probe batch {result['base_loss_on_probe']}")
    print(f"{'method':8} {'size':>12} {'trainable':>11} {'vs budget':>9} {'tokens/s':>8} {'train loss':>10} "
          f"{'reloaded loss':>13}")
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['method']:8} failed: {row['error']}")
            continue
        size = f"{row['size_option']}={row['size']}" if row["size_option"] else "fixed"
        error = row["budget_match"]["relative_error"]
        print(f"{row['method']:8} {size:>12} {row['trainable_parameters']:>11,} {100 * error:>+8.1f}% "
              f"{row['tokens_per_second']:>8.0f} {row['final_train_loss']:>10.4f} {row['reloaded_loss']:>13.4f}")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="forge-budget-sweep-") as scratch:
        root = args.output or Path(scratch)
        result = sweep(args, root)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    if any("error" in row for row in result["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
