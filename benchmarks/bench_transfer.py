"""Benchmark: a bico transfer against fine-tuning the new base model directly, in one run.

Inputs are a version pair and an old fine-tune, as examples/transfer-version-pair.mk builds them:
the old base (--source-base), its task fine-tune (--source-tuned) and the new version
(--target-base). The script then runs, each in its own subprocess and its own empty FORGE_CACHE:

- transfer: `forge transfer --align bico`, calibration included (both bases are loaded and one
  forward-backward pass of each is made on --calib-tokens of the task data);
- direct: `forge finetune` of the new base on the same task data, with the old fine-tune's
  settings (--ft-steps, --ft-lr).

One `forge eval` then scores the new base, the transfer and the direct fine-tune on the target
task. Reported: the wall-time ratio transfer / direct and the fraction of the direct fine-tune's
gain over the new base that the transfer recovers, (transfer - base) / (direct - base).
Goals: a time ratio of at most 1/20 and a recovered fraction of at least 0.8.

    python benchmarks/bench_transfer.py --source-tuned OUT/old-tuned --target-base OUT/new-base [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_GOAL = 1 / 20
GAIN_GOAL = 0.8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-base", default="smollm2-135m", help="old base model reference")
    parser.add_argument("--source-tuned", required=True, help="the old base's task fine-tune (adapter or model)")
    parser.add_argument("--target-base", required=True, help="the new version of the base model")
    parser.add_argument("--task-data", default="demo:arith/train.jsonl", help="fine-tuning and calibration data")
    parser.add_argument("--ft-steps", default="300", help="optimizer steps of the direct fine-tune")
    parser.add_argument("--ft-lr", default="1e-3", help="learning rate of the direct fine-tune")
    parser.add_argument("--calib-tokens", default="4096", help="calibration tokens of the transfer")
    parser.add_argument("--target", default="arith", help="eval task that measures the gain")
    parser.add_argument("--limit", default="200", help="examples of the eval task")
    parser.add_argument("--workdir", type=Path, help="directory for outputs (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def forge(args: list[str], cache: Path) -> float:
    """Run one forge command with its own cache; return its wall time in seconds."""
    env = dict(os.environ, FORGE_CACHE=str(cache))
    command = [str(Path(sys.executable).parent / "forge"), *args]
    log("$ " + " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_both(options: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Time the bico transfer and the direct fine-tune, each in an empty cache."""
    transfer = forge(["transfer", "--source-base", options.source_base, "--source-tuned", options.source_tuned,
                      "--target-base", options.target_base, "--calib", options.task_data,
                      "--calib-tokens", options.calib_tokens, "--align", "bico", "--quiet",
                      "-o", str(workdir / "transfer")], workdir / "cache-transfer")
    direct = forge(["finetune", "--model", options.target_base, "--data", options.task_data,
                    "--steps", options.ft_steps, "--lr", options.ft_lr, "--quiet",
                    "-o", str(workdir / "direct")], workdir / "cache-direct")
    return {"transfer": transfer, "direct": direct}


def target_scores(options: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Score the new base, the transfer and the direct fine-tune on the target task."""
    report = workdir / "report.json"
    forge(["eval", "--baseline", options.target_base, "--model", options.target_base,
           "--model", str(workdir / "transfer"), "--model", str(workdir / "direct"),
           "--target", options.target, "--limit", options.limit, "--quiet", "-o", str(report)],
          workdir / "cache-eval")
    by_reference = {result["reference"]: result["summary"]["target_score"]
                    for result in json.loads(report.read_text())["results"]}
    return {"base": by_reference[options.target_base], "transfer": by_reference[str(workdir / "transfer")],
            "direct": by_reference[str(workdir / "direct")]}


def summarise(seconds: dict[str, float], scores: dict[str, float]) -> dict:
    gain = scores["direct"] - scores["base"]
    recovered = (scores["transfer"] - scores["base"]) / gain if gain > 0 else None
    ratio = seconds["transfer"] / seconds["direct"]
    return {"seconds": seconds, "scores": scores, "time_ratio": ratio, "gain_recovered": recovered,
            "goals": {"time_ratio": TIME_GOAL, "gain_recovered": GAIN_GOAL},
            "met": {"time_ratio": ratio <= TIME_GOAL,
                    "gain_recovered": recovered is not None and recovered >= GAIN_GOAL}}


def main(argv=None) -> int:
    options = parse_args(argv)
    # The eval report names each model by the reference it was given, so paths are made absolute.
    for name in ("source_tuned", "target_base"):
        if Path(getattr(options, name)).exists():
            setattr(options, name, str(Path(getattr(options, name)).resolve()))
    with tempfile.TemporaryDirectory(prefix="forge-bench-transfer-") as scratch:
        workdir = options.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = summarise(run_both(options, workdir), target_scores(options, workdir))

    if options.json:
        print(json.dumps(summary, indent=2))
        return 0
    seconds, scores = summary["seconds"], summary["scores"]
    print(f"bico transfer {seconds['transfer']:.0f} s, direct fine-tune {seconds['direct']:.0f} s: "
          f"time ratio {summary['time_ratio']:.3f} (goal <= {TIME_GOAL:.3f})")
    recovered = summary["gain_recovered"]
    recovered_text = "n/a (the direct fine-tune did not improve on the base)" if recovered is None else f"{recovered:.2f}"
    print(f"{options.target}: new base {scores['base']:.3f}, transfer {scores['transfer']:.3f}, "
          f"direct {scores['direct']:.3f}; gain recovered {recovered_text} (goal >= {GAIN_GOAL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
