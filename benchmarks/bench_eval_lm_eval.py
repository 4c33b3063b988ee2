"""Benchmark: forge's multiple-choice scoring against lm-evaluation-harness on ARC-Easy.

Both sides score the first --limit questions of ../shared/data/arc_easy/test.jsonl with the same
smollm2-135m weights (forge's converted HF directory) in bfloat16, at the same batch size, with
the prompt "Question: {stem}\\nAnswer:" and " {choice}" continuations. lm-eval runs its HF model
(`HFLM`) on a task defined in a temporary YAML file that reads the same JSONL file, so nothing is
downloaded. forge runs `score_multiple_choice`, which puts each question's context once in a row
followed by all its choices. Each side is timed from the first scored request to the last,
after its model is loaded, and reports examples (questions) per second, accuracy and
length-normalised accuracy. Target: forge at least 3x lm-eval's examples/s, accuracies within
0.5 points.

    pip install -e '.[bench]'    # lm-evaluation-harness
    python benchmarks/bench_eval_lm_eval.py [--limit 500] [--batch-size 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc_easy" / "test.jsonl"

TASK_YAML = """task: forge_bench_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model reference (forge resolves it to an HF dir)")
    parser.add_argument("--data", type=Path, default=DATA, help="ARC-Easy test JSONL")
    parser.add_argument("--limit", type=int, default=500, help="first N questions")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of both sides")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def run_lm_eval(model_dir: Path, args) -> dict:
    """Score with lm-evaluation-harness's HFLM in bfloat16; return examples/s and accuracies."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(model_dir), dtype="bfloat16", batch_size=args.batch_size, device="cpu")
    with tempfile.TemporaryDirectory(prefix="forge-bench-lm-eval-") as task_dir:
        Path(task_dir, "forge_bench_arc_easy.yaml").write_text(TASK_YAML.format(data=args.data.resolve()))
        manager = TaskManager(include_path=task_dir)
        start = time.perf_counter()
        output = simple_evaluate(model=model, tasks=["forge_bench_arc_easy"], limit=args.limit,
                                 task_manager=manager, log_samples=False)
        seconds = time.perf_counter() - start
    metrics = output["results"]["forge_bench_arc_easy"]
    return {"seconds": seconds, "examples_per_second": args.limit / seconds,
            "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}


def run_forge(args) -> dict:
    """Score with forge's multiple-choice scorer in bfloat16; return examples/s and accuracies."""
    import torch

    from llmforge.data import read_records
    from llmforge.models import load_model

    from llmforge_eval.evaluate import task_registry
    from llmforge_eval.multiple_choice import score_multiple_choice

    loaded = load_model(args.model, dtype=torch.bfloat16)
    spec = task_registry()["arc_easy"]
    records = read_records(args.data)[:args.limit]
    start = time.perf_counter()
    result = score_multiple_choice(loaded.model, loaded.tokenizer, spec, records, args.batch_size)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples_per_second": args.limit / seconds,
            "acc": result["metrics"]["acc"], "acc_norm": result["metrics"]["acc_norm"]}


def main() -> None:
    args = parse_args()
    if not args.data.is_file():
        raise SystemExit(f"ARC-Easy data not found at {args.data}; pass --data PATH")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from llmforge.models import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    lm_eval = run_lm_eval(model_dir, args)
    forge = run_forge(args)
    result = {
        "questions": args.limit, "batch_size": args.batch_size, "dtype": "bfloat16",
        "forge": forge, "lm_eval": lm_eval,
        "forge_over_lm_eval": forge["examples_per_second"] / lm_eval["examples_per_second"],
        "acc_difference_points": 100 * (forge["acc"] - lm_eval["acc"]),
        "acc_norm_difference_points": 100 * (forge["acc_norm"] - lm_eval["acc_norm"]),
        "target_ratio": 3.0, "target_accuracy_difference_points": 0.5,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for side in ("forge", "lm_eval"):
        values = result[side]
        print(f"{side:8} {values['examples_per_second']:7.2f} examples/s  acc {values['acc']:.4f}  "
              f"acc_norm {values['acc_norm']:.4f}  ({values['seconds']:.1f} s)")
    print(f"forge / lm-eval: {result['forge_over_lm_eval']:.2f}x (target 3x); accuracy differences "
          f"{result['acc_difference_points']:+.2f} / {result['acc_norm_difference_points']:+.2f} points "
          "(target within 0.5)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
