"""Benchmark: warm load of smollm2-135m from the cache against a cold load of its GGUF file.

Both are measured in this process, after the imports, so the ratio is what counts on a noisy
machine. The target is a warm load at most 1/10 of the cold one.

    python benchmarks/bench_model_load.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmforge.cache import Cache
from llmforge.models import BUILTIN_MODELS, builtin_gguf_path, load_model


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm loads to take the median of")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="forge-bench-") as root:
        cache = Cache(root)
        gguf = builtin_gguf_path(BUILTIN_MODELS["smollm2-135m"], cache)

        def gguf_load():
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)

        cold_seconds, _ = timed(gguf_load)
        first_seconds, _ = timed(lambda: load_model("smollm2-135m", cache=cache))
        warm = [timed(lambda: load_model("smollm2-135m", cache=cache))[0] for _ in range(args.repeats)]

    warm_seconds = statistics.median(warm)
    result = {
        "cold_gguf_load_s": round(cold_seconds, 3),
        "first_forge_load_with_conversion_s": round(first_seconds, 3),
        "warm_forge_load_s": round(warm_seconds, 3),
        "warm_over_cold": round(warm_seconds / cold_seconds, 4),
        "target_warm_over_cold": 0.1,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, value in result.items():
            print(f"{name:<36} {value}")


if __name__ == "__main__":
    main()
