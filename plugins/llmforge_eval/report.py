"""The evaluation report: a JSON document (schema "llmforge.eval/1") and a compact text table.

Per model and task: score, standard error, 95% interval, n, metric, whether the score came from the
cache, and with a baseline the delta (model minus baseline). The interval of a proportion (accuracy,
exact or numeric match) is the Wilson score interval, which stays inside [0, 1] even for small n or
scores near 0 or 1. A perplexity gets the normal interval score +- 1.96 stderr from its delta-method
standard error. `ci95_method` names the interval ("wilson" or "normal"). Per model: the
target score and the general score (means over the target and the general tasks) and their deltas.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

SCHEMA = "llmforge.eval/1"
Z_95 = 1.959964
PROPORTION_METRICS = ("acc", "acc_norm", "exact_match", "numeric_match")


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion p observed on n trials (n >= 1)."""
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    # The exact bounds are 0 at p = 0 and 1 at p = 1, which rounding would miss by about 1e-17.
    low = 0.0 if p <= 0.0 else max(0.0, center - half_width)
    high = 1.0 if p >= 1.0 else min(1.0, center + half_width)
    return low, high


def _task_result(result: dict[str, Any], role: str, baseline_result: dict[str, Any] | None) -> dict[str, Any]:
    entry = {**result, "role": role}
    stderr = result.get("stderr")
    if result.get("metric") in PROPORTION_METRICS and result.get("n"):
        entry["ci95"] = list(wilson_interval(result["score"], result["n"]))
        entry["ci95_method"] = "wilson"
    elif stderr is not None and math.isfinite(stderr):
        entry["ci95"] = [result["score"] - Z_95 * stderr, result["score"] + Z_95 * stderr]
        entry["ci95_method"] = "normal"
    if baseline_result is not None:
        entry["delta"] = result["score"] - baseline_result["score"]
    return entry


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(task_results: dict[str, dict], tasks, baseline_summary: dict | None) -> dict[str, Any]:
    """Mean score over the target tasks and over the general tasks, plus deltas against the baseline.

    Only tasks whose score is higher-is-better (accuracies) enter a mean; perplexity tasks are listed
    under `excluded_from_mean` because averaging a perplexity with an accuracy means nothing.
    """
    summary: dict[str, Any] = {"excluded_from_mean": []}
    for role in ("target", "general"):
        scores = []
        for task in tasks:
            if task.role != role:
                continue
            result = task_results[task.spec.name]
            if result.get("higher_is_better", True):
                scores.append(result["score"])
            else:
                summary["excluded_from_mean"].append(task.spec.name)
        summary[f"{role}_score"] = _mean(scores)
        summary[f"{role}_tasks"] = len(scores)
        if baseline_summary is not None:
            ours, theirs = summary[f"{role}_score"], baseline_summary[f"{role}_score"]
            summary[f"{role}_delta"] = None if ours is None or theirs is None else ours - theirs
    return summary


def build_report(tasks, entries: dict[str, dict], models: Sequence[str], baseline: str | None,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """Assemble the report document from per-model entries (from `evaluate_model`)."""
    from llmforge.checkpoint import run_record

    baseline_entry = entries.get(baseline) if baseline else None
    baseline_summary = summarize(baseline_entry["tasks"], tasks, None) if baseline_entry else None

    results = []
    for reference, entry in entries.items():
        is_baseline = reference == baseline
        compare = None if (baseline_entry is None or is_baseline) else baseline_entry["tasks"]
        task_results = {
            task.spec.name: _task_result(entry["tasks"][task.spec.name], task.role,
                                         compare[task.spec.name] if compare else None)
            for task in tasks
        }
        summary = summarize(entry["tasks"], tasks, None if is_baseline else baseline_summary)
        model_info = {key: value for key, value in entry.items() if key != "tasks"}
        results.append({**model_info, "is_baseline": is_baseline, "tasks": task_results, "summary": summary})

    inputs = {
        "models": [{"reference": ref, "digest": entries[ref]["digest"]} for ref in models],
        "baseline": {"reference": baseline, "digest": baseline_entry["digest"]} if baseline_entry else None,
        "tasks": [{"name": t.spec.name, "role": t.role, "kind": t.spec.kind, "metric": t.spec.metric_name,
                   "digest": t.digest, "data": str(t.data_path), "source": t.spec.source} for t in tasks],
        **settings,
    }
    return {"schema": SCHEMA, "inputs": inputs, "results": results, "run": run_record()}


def _format(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """Render the report as a compact table: one row per model and task, then one summary row per model."""
    header = f"{'model':<28} {'task':<14} {'role':<8} {'metric':<14} {'score':>9} {'stderr':>8} {'n':>5} {'delta':>9} cached"
    lines = [header]
    for entry in report["results"]:
        name = entry["reference"] + (" (baseline)" if entry["is_baseline"] else "")
        for task, result in entry["tasks"].items():
            lines.append(
                f"{name[-28:]:<28} {task:<14} {result['role']:<8} {result['metric']:<14} "
                f"{_format(result['score']):>9} {_format(result.get('stderr')):>8} {result['n']:>5} "
                f"{_format(result.get('delta'), signed=True):>9} {'yes' if result.get('cached') else 'no'}"
            )

    lines.append("")
    lines.append(f"{'model':<28} {'target':>9} {'general':>9} {'d-target':>9} {'d-general':>9}")
    for entry in report["results"]:
        summary = entry["summary"]
        lines.append(
            f"{entry['reference'][-28:]:<28} {_format(summary['target_score']):>9} {_format(summary['general_score']):>9} "
            f"{_format(summary.get('target_delta'), signed=True):>9} {_format(summary.get('general_delta'), signed=True):>9}"
        )
    return "\n".join(lines)
