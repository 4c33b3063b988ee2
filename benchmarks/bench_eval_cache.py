"""Benchmark: a repeated `forge eval` of the same model and task against the first, uncached run.

Both runs go through the same `evaluate` call in this process with one fresh cache; the second
must come from the cache without loading the model, so the ratio shows what the cache saves.

    python benchmarks/bench_eval_cache.py [--model smollm2-135m] [--limit 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from llmforge.cache import Cache
from llmforge.models import load_model
from llmforge_eval.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model reference to evaluate")
    parser.add_argument("--limit", type=int, default=50, help="examples per task")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="forge-bench-") as root:
        cache = Cache(root)
        load_model(args.model, cache=cache)  # converts a GGUF model once, outside the timed runs

        timings, reports = [], []
        for _ in range(2):
            start = time.perf_counter()
            reports.append(evaluate([args.model], target=["arith"], general=["facts"], limit=args.limit, cache=cache))
            timings.append(time.perf_counter() - start)

    second = reports[1]["results"][0]
    result = {
        "first_run_s": round(timings[0], 3),
        "repeated_run_s": round(timings[1], 3),
        "repeated_over_first": round(timings[1] / timings[0], 4),
        "repeated_run_all_cached": all(task["cached"] for task in second["tasks"].values()),
        "repeated_run_loaded_weights": second["weights_loaded"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, value in result.items():
            print(f"{name:<28} {value}")


if __name__ == "__main__":
    main()
