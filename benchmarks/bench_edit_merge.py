"""Benchmark: a two-vector task-arithmetic merge through forge and through mergekit.

The script builds two "tuned" copies of the base model (smollm2-135m by default): each adds
seeded Gaussian noise, 1% of the tensor's standard deviation, to a seeded random half of the
floating-point tensors, plus the token embedding, the largest tensor. Then, in one run and on the
same weights, it merges both into the base with weight 1 and lambda 1 in float32:

- forge: `forge edit diff` for each tuned model, then `forge edit merge --method task_arithmetic`;
  the two diffs are reported on their own and in forge's total. Each forge repeat uses a fresh
  FORGE_CACHE, so the diffs are computed, not read from the cache.
- mergekit: `mergekit-yaml` with a task_arithmetic config (CPU, dtype float32), which computes
  the task vectors itself.

Every command runs in its own subprocess with OMP_NUM_THREADS=1 (see --threads). Wall time and
peak resident memory (ru_maxrss from wait4, which counts resident file-backed pages too) are
taken per subprocess. The sides alternate which runs first in each repeat. The results are
ratios (the ratio of the medians, and each repeat's ratio), because absolute times on a shared
machine vary from run to run. Every output tensor of forge must match mergekit's within bf16 rounding of
mergekit's value (|a - b| <= 2^-8 |b|). Goals: forge at least 2x faster than mergekit (reported
for the merge alone and for diffs + merge), and a peak resident memory of the merge of at most
1.2x the size of the base model's weight files.

    python benchmarks/bench_edit_merge.py [--model smollm2-135m] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Noise standard deviation, as a fraction of each perturbed tensor's standard deviation.
NOISE_SCALE = 0.01
# The output comparison tolerates the unit roundoff of bfloat16 (8 significant bits).
BF16_ROUNDING = 2.0 ** -8
SPEED_GOAL = 2.0
MEMORY_GOAL = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model reference")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of tensors each tuned model perturbs")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of every subprocess")
    parser.add_argument("--workdir", type=Path, help="directory for models and outputs (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Inputs


def build_tuned_model(base_dir: Path, output: Path, seed: int, fraction: float) -> list[str]:
    """Write base + seeded noise on a random `fraction` of the tensors (and the embedding); return the changed names."""
    import torch
    from safetensors.torch import save_file

    from llmforge.checkpoint import WeightFiles

    output.mkdir(parents=True)
    for path in base_dir.iterdir():
        weights = path.name.endswith((".safetensors", ".safetensors.index.json"))
        if path.is_file() and not weights and path.name != "forge_source.json":
            shutil.copyfile(path, output / path.name)

    generator = torch.Generator().manual_seed(seed)
    changed, tensors = [], {}
    with WeightFiles(base_dir) as base:
        names = base.names()
        chosen = torch.rand(len(names), generator=generator) < fraction
        for name, pick in zip(names, chosen.tolist()):
            tensor = base.tensor(name)
            if base.is_floating(name) and (pick or "embed_tokens" in name):
                noise = torch.randn(tensor.shape, generator=generator) * (NOISE_SCALE * float(tensor.float().std()))
                tensor = (tensor.float() + noise).to(tensor.dtype)
                changed.append(name)
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    return changed


def write_mergekit_config(path: Path, base_dir: Path, tuned: list[Path]) -> None:
    import yaml

    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base_dir),
        "models": [{"model": str(model), "parameters": {"weight": 1.0}} for model in tuned],
        "parameters": {"lambda": 1.0, "normalize": False},
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


# Measurement


# A small process that runs each measured command. ru_maxrss of a child includes the peak of the
# process it was started from (Linux keeps the old memory's peak across exec), so the commands
# must not be started from this script once it has imported torch and built models.
RUNNER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    request = json.loads(line)
    start = time.perf_counter()
    process = subprocess.Popen(request["command"], env=request["env"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_kib": usage.ru_maxrss,
                      "exit_code": os.waitstatus_to_exitcode(status), "stderr": stderr.decode(errors="replace")}),
          flush=True)
"""


class Runner:
    """The runner process; `run` returns one command's wall seconds and peak resident memory in MiB."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def run(self, command: list[str], env: dict[str, str]) -> dict:
        log("$ " + " ".join(command))
        self.process.stdin.write(json.dumps({"command": command, "env": env}) + "\n")
        self.process.stdin.flush()
        result = json.loads(self.process.stdout.readline())
        if result["exit_code"] != 0:
            raise SystemExit(f"{command[0]} failed with exit code {result['exit_code']}:\n{result['stderr'][-4000:]}")
        return {"seconds": result["seconds"], "peak_rss_mib": result["peak_rss_kib"] / 1024}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def tool(name: str) -> str:
    """Return the console script `name` of this interpreter's environment."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise SystemExit(f"{name} not found next to {sys.executable}; install the bench extra: pip install -e '.[bench]'")
    return str(path)


def run_forge(runner: Runner, base_dir: Path, tuned: list[Path], work: Path, env: dict[str, str]) -> dict:
    env = {**env, "FORGE_CACHE": str(work / "cache")}
    vectors = [work / f"tv{index}.safetensors" for index in range(len(tuned))]
    diffs = [runner.run([tool("forge"), "edit", "diff", "--base", str(base_dir), "--tuned", str(model),
                           "-o", str(vector), "--quiet"], env)
             for model, vector in zip(tuned, vectors)]
    command = [tool("forge"), "edit", "merge", "--base", str(base_dir), "--method", "task_arithmetic",
               "--lambda", "1", "-o", str(work / "merged"), "--quiet"]
    for vector in vectors:
        command += ["--vector", f"{vector}:weight=1"]
    merge = runner.run(command, env)
    return {"diff_seconds": sum(diff["seconds"] for diff in diffs),
            "diff_peak_rss_mib": max(diff["peak_rss_mib"] for diff in diffs),
            "merge_seconds": merge["seconds"], "merge_peak_rss_mib": merge["peak_rss_mib"],
            "seconds": sum(diff["seconds"] for diff in diffs) + merge["seconds"],
            "peak_rss_mib": max(merge["peak_rss_mib"], *(diff["peak_rss_mib"] for diff in diffs))}


def run_mergekit(runner: Runner, config: Path, work: Path, env: dict[str, str]) -> dict:
    return runner.run([tool("mergekit-yaml"), str(config), str(work / "merged"), "--quiet"], env)


# Output comparison


def compare_outputs(forge_dir: Path, mergekit_dir: Path, base_dir: Path) -> dict:
    """Compare every tensor of the two merged models; count those that differ from the base."""
    import torch

    from llmforge.checkpoint import WeightFiles

    worst_abs = worst_rel = 0.0
    outside, changed = [], 0
    with WeightFiles(forge_dir) as ours, WeightFiles(mergekit_dir) as theirs, WeightFiles(base_dir) as base:
        if set(ours.names()) != set(theirs.names()):
            raise SystemExit(f"the outputs have different tensors: only forge {sorted(set(ours.names()) - set(theirs.names()))}, "
                             f"only mergekit {sorted(set(theirs.names()) - set(ours.names()))}")
        for name in ours.names():
            forge_value, mergekit_value = ours.tensor(name).float(), theirs.tensor(name).float()
            difference = (forge_value - mergekit_value).abs()
            magnitude = mergekit_value.abs()
            worst_abs = max(worst_abs, float(difference.max()))
            worst_rel = max(worst_rel, float((difference / magnitude.clamp_min(torch.finfo(torch.float32).tiny)).max()))
            if bool((difference > BF16_ROUNDING * magnitude).any()):
                outside.append(name)
            changed += int(not torch.equal(forge_value, base.tensor(name).float()))
        count = len(ours.names())
    return {"tensors": count, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
            "outside_bf16_rounding": outside, "changed_from_base": changed}


# Report


def summarize(forge_runs: list[dict], mergekit_runs: list[dict], model_mib: float) -> dict:
    def median(runs, key):
        return statistics.median(run[key] for run in runs)

    forge = {key: median(forge_runs, key) for key in forge_runs[0]}
    mergekit = {key: median(mergekit_runs, key) for key in mergekit_runs[0]}
    return {
        "forge": forge,
        "mergekit": mergekit,
        "speedup_total_per_repeat": [theirs["seconds"] / ours["seconds"] for ours, theirs in zip(forge_runs, mergekit_runs)],
        "speedup_merge_only_per_repeat": [theirs["seconds"] / ours["merge_seconds"]
                                          for ours, theirs in zip(forge_runs, mergekit_runs)],
        "speedup_total": mergekit["seconds"] / forge["seconds"],
        "speedup_merge_only": mergekit["seconds"] / forge["merge_seconds"],
        "forge_merge_rss_over_model": forge["merge_peak_rss_mib"] / model_mib,
        "forge_diff_rss_over_model": forge["diff_peak_rss_mib"] / model_mib,
        "mergekit_rss_over_model": mergekit["peak_rss_mib"] / model_mib,
    }


def describe(result: dict) -> str:
    forge, mergekit, summary = result["runs"]["forge"], result["runs"]["mergekit"], result["summary"]
    rows = [("forge edit diff x2", "diff_seconds", "diff_peak_rss_mib"),
            ("forge edit merge", "merge_seconds", "merge_peak_rss_mib"),
            ("forge total", "seconds", "peak_rss_mib")]
    lines = [f"{'side':22} {'wall s (each run)':>28} {'median':>8} {'peak RSS MiB':>13}"]
    for label, seconds, rss in rows:
        times = " ".join(f"{run[seconds]:.2f}" for run in forge)
        lines.append(f"{label:22} {times:>28} {summary['forge'][seconds]:8.2f} {summary['forge'][rss]:13.0f}")
    times = " ".join(f"{run['seconds']:.2f}" for run in mergekit)
    lines.append(f"{'mergekit-yaml':22} {times:>28} {summary['mergekit']['seconds']:8.2f} "
                 f"{summary['mergekit']['peak_rss_mib']:13.0f}")
    comparison = result["comparison"]
    lines += [
        f"model weights: {result['model_mib']:.0f} MiB; tensors changed from the base: {comparison['changed_from_base']}",
        f"speedup mergekit / forge (ratio of medians): {summary['speedup_total']:.2f}x with the diffs, "
        f"{summary['speedup_merge_only']:.2f}x merge only (goal >= {SPEED_GOAL}x)",
        "  per repeat: " + ", ".join(f"{total:.2f}x / {alone:.2f}x" for total, alone in
                                     zip(summary["speedup_total_per_repeat"], summary["speedup_merge_only_per_repeat"])),
        f"peak RSS / model weights: forge merge {summary['forge_merge_rss_over_model']:.2f}, forge diff "
        f"{summary['forge_diff_rss_over_model']:.2f}, mergekit {summary['mergekit_rss_over_model']:.2f} "
        f"(goal for the merge <= {MEMORY_GOAL})",
        f"outputs: max |forge - mergekit| {comparison['max_abs_diff']:.3g}, max relative {comparison['max_rel_diff']:.3g}; "
        f"tensors outside bf16 rounding: {len(comparison['outside_bf16_rounding'])} of {comparison['tensors']}",
        "load average before / after: " + " / ".join(f"{load:.2f}" for load in result["load_average"]),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    runner = Runner()  # before torch is imported here
    try:
        result = measure(runner, args)
    finally:
        runner.close()
    print(json.dumps(result, indent=2) if args.json else describe(result))


def measure(runner: Runner, args: argparse.Namespace) -> dict:
    from llmforge.models import resolve_model_dir

    load_before = os.getloadavg()[0]
    base_dir = resolve_model_dir(args.model)
    model_mib = sum(path.stat().st_size for path in base_dir.glob("*.safetensors")) / 2**20
    env = {**os.environ, "OMP_NUM_THREADS": args.threads}

    with tempfile.TemporaryDirectory(prefix="bench-edit-merge-", dir=args.workdir) as temporary:
        root = Path(temporary)
        log(f"building two tuned copies of {base_dir}")
        tuned = [root / "tuned-a", root / "tuned-b"]
        for seed, model in enumerate(tuned, start=1):
            build_tuned_model(base_dir, model, seed, args.fraction)
        config = root / "mergekit.yaml"
        write_mergekit_config(config, base_dir, tuned)

        forge_runs, mergekit_runs = [], []
        for repeat in range(args.repeats):
            order = ("forge", "mergekit") if repeat % 2 == 0 else ("mergekit", "forge")
            for side in order:
                work = root / f"{side}-{repeat}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                if side == "forge":
                    forge_runs.append(run_forge(runner, base_dir, tuned, work, env))
                else:
                    mergekit_runs.append(run_mergekit(runner, config, work, env))
            comparison = compare_outputs(root / f"forge-{repeat}" / "merged", root / f"mergekit-{repeat}" / "merged", base_dir)
            if comparison["outside_bf16_rounding"]:
                raise SystemExit(f"forge and mergekit differ beyond bf16 rounding in {comparison['outside_bf16_rounding']}")
            for side in ("forge", "mergekit"):
                shutil.rmtree(root / f"{side}-{repeat}")

    return {"model": args.model, "model_mib": model_mib, "threads": args.threads, "repeats": args.repeats,
            "load_average": [load_before, os.getloadavg()[0]],
            "runs": {"forge": forge_runs, "mergekit": mergekit_runs}, "comparison": comparison,
            "summary": summarize(forge_runs, mergekit_runs, model_mib)}


if __name__ == "__main__":
    main()
