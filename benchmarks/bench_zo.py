"""Benchmark: forge zo's batched scoring engine against the conventional in-place loop, per method.

For each method, both paths run the same seed, the same SST-2 batches (--limit training
records, --batch-size 16) and the same number of steps on smollm2-135m, one after the other in
this process. The reference loop is tests/zo_reference.py: fp32 weights perturbed in place
(+eps, -2eps, +eps), noise regenerated from the seed four times, two padded forwards with full
logits per query. The engine scores all 2q states as adapters in one packed forward, in the
method's default scoring dtype or in --dtype.

Printed per method: seconds per step of each path with the breakdown (noise and perturbation,
forward, host sync, update), their ratio, and the final probe losses of both. It also prints
the engine step divided by one bare forward of all its states' rows without adapters, which is
the floor of a two-point estimate. Goals: ratio >= 5 for MeZO and LoZO; engine step <= 1.2 x the bare forward.

    python benchmarks/bench_zo.py [--methods lozo,mezo-lora,mezo,mezo-exact] [--steps 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
# "mezo" is full-parameter MeZO with factorised noise; "mezo-exact" with exact dense noise.
METHODS = {
    "lozo": {"method": "lozo"},
    "mezo-lora": {"method": "mezo-lora"},
    "mezo": {"method": "mezo", "perturbation": "factorised"},
    "mezo-exact": {"method": "mezo", "perturbation": "exact"},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model reference")
    parser.add_argument("--data", default=str(SST2), help="SST-2 style TSV (sentence, label)")
    parser.add_argument("--limit", type=int, default=1000, help="training records to draw batches from")
    parser.add_argument("--methods", default="lozo,mezo-lora,mezo,mezo-exact", help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per path (after one untimed step)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="engine scoring dtype (default: the method's)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def sst2_batches(tokenizer, args):
    from llmforge.readers import read_records
    from llmforge_zo.examples import batch_indices, classification_data, parse_verbalizers

    records = read_records(args.data)[:args.limit]
    data = classification_data(records, tokenizer, template="{sentence} It was",
                               verbalizer=parse_verbalizers("0=terrible,1=great"), label_field="label", max_length=128)
    return [data.batch(batch_indices(len(data), args.batch_size, seed=0, step=step)) for step in range(args.steps + 1)]


def per_step(times, steps: int) -> dict[str, float]:
    return {name: value / steps for name, value in times.as_dict().items() if name in ("noise", "forward", "sync", "update")}


def run_engine(settings, batches, args) -> dict:
    from llmforge.models import load_model
    from llmforge_zo.engine import TorchScorer, find_targets
    from llmforge_zo.methods import PhaseTimes, build_method
    from llmforge_zo.states import StackedStates

    model = load_model(args.model, dtype=torch.float32).model
    scorer = TorchScorer(model, find_targets(model), settings.torch_dtype)
    method = build_method(settings, scorer)
    method.step(0, batches[0], PhaseTimes())

    times, losses = PhaseTimes(), []
    start = time.perf_counter()
    for step, batch in enumerate(batches[1:], start=1):
        losses = method.step(step, batch, times)
    seconds = (time.perf_counter() - start) / args.steps

    bare = StackedStates(2 * settings.queries)
    start = time.perf_counter()
    for batch in batches[1:]:
        scorer.score(bare, batch)
    bare_forward = (time.perf_counter() - start) / args.steps
    return {"seconds_per_step": seconds, "phases": per_step(times, args.steps), "final_losses": losses[:2],
            "bare_forward": bare_forward}


def run_reference(settings, batches, args) -> dict:
    from llmforge.models import load_model
    from zo_reference import ReferenceLoop

    loop = ReferenceLoop(load_model(args.model, dtype=torch.float32).model, settings)
    loop.run(batches[:1])
    start = time.perf_counter()
    run = loop.run(batches[1:], first_step=1)
    seconds = (time.perf_counter() - start) / args.steps
    return {"seconds_per_step": seconds, "phases": per_step(run.times, args.steps), "final_losses": list(run.losses[-1])}


def measure(name: str, batches, args) -> dict:
    from llmforge_zo.settings import ZOSettings

    options = dict(METHODS[name])
    if args.dtype:
        options["dtype"] = args.dtype
    settings = ZOSettings(**options).resolved()
    engine = run_engine(settings, batches, args)
    reference = run_reference(settings, batches, args)
    return {"method": name, "dtype": settings.dtype, "engine": engine, "reference": reference,
            "speedup": reference["seconds_per_step"] / engine["seconds_per_step"],
            "step_over_bare_forward": engine["seconds_per_step"] / engine["bare_forward"]}


def describe(result: dict) -> str:
    lines = [f"{result['method']} (engine {result['dtype']}, reference fp32): "
             f"speedup {result['speedup']:.2f}x, engine step / bare forward {result['step_over_bare_forward']:.2f}"]
    for side in ("engine", "reference"):
        entry = result[side]
        phases = ", ".join(f"{phase} {value:.3f}" for phase, value in entry["phases"].items())
        lines.append(f"  {side:9} {entry['seconds_per_step']:.3f} s/step ({phases}); "
                     f"final L+ {entry['final_losses'][0]:.5f}, L- {entry['final_losses'][1]:.5f}")
    lines.append(f"  bare forward of all states: {result['engine']['bare_forward']:.3f} s")
    return "\n".join(lines)


def main(argv=None) -> None:
    from llmforge.models import load_tokenizer

    args = parse_args(argv)
    unknown = [name for name in args.methods.split(",") if name not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    batches = sst2_batches(load_tokenizer(args.model), args)
    results = []
    for name in args.methods.split(","):
        results.append(measure(name, batches, args))
        if not args.json:
            print(describe(results[-1]), flush=True)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
