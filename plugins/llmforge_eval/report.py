"""The evaluation report: a JSON document (schema "llmforge.eval/2") and a compact text table.

Per model and task: score, standard error, 95% interval, n, metric, whether the score came from the
cache, and with a baseline the delta (model minus baseline), its standard error and a significance
test. The interval of a proportion (accuracy, exact or numeric match) is the Wilson score interval,
which stays inside [0, 1] even for small n or scores near 0 or 1. A perplexity gets the normal
interval score +- 1.96 stderr from its delta-method standard error. `ci95_method` names the interval
("wilson" or "normal").

Per model: the target score and the general score (means over the target and the general tasks),
their standard errors, and with a baseline their deltas. Across models: the Pareto frontier of
(general score, target score). There is no combined single score.

Standard errors of means and deltas treat tasks, and a model and its baseline, as independent
samples: SE(mean of k scores) = sqrt(sum SE_i^2) / k and SE(a - b) = sqrt(SE_a^2 + SE_b^2).
A model and its baseline answer the same questions, which correlates their scores, so the delta's
standard error is an overestimate when the correlation is positive.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from llmforge_eval.pareto import pareto_table

SCHEMA = "llmforge.eval/2"
Z_95 = 1.959964
PROPORTION_METRICS = ("acc", "acc_norm", "exact_match", "numeric_match")
Z_TEST = "two-proportion z-test (pooled), two-sided"
PERPLEXITY_TEST_NOTE = (
    "No test: a two-proportion z-test needs a share of correct answers, and a perplexity is the "
    "exponential of a mean token loss. Both models score the same windows, so a paired test on the "
    "per-window losses would apply, but the cached perplexity result does not keep them."
)


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion p observed on n trials (n >= 1)."""
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    # The exact bounds are 0 at p = 0 and 1 at p = 1, which rounding would miss by about 1e-17.
    low = 0.0 if p <= 0.0 else max(0.0, center - half_width)
    high = 1.0 if p >= 1.0 else min(1.0, center + half_width)
    return low, high


def two_proportion_z_test(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """Return (z, two-sided p-value) for the difference p1 - p2 of two proportions.

    The standard error uses the pooled proportion p = (p1 n1 + p2 n2) / (n1 + n2):
    z = (p1 - p2) / sqrt(p (1 - p) (1/n1 + 1/n2)) and p-value = erfc(|z| / sqrt(2)). When both
    proportions are 0 or both are 1 the difference is 0 and the result is (0.0, 1.0).
    """
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return 0.0, 1.0
    z = (p1 - p2) / math.sqrt(variance)
    return z, math.erfc(abs(z) / math.sqrt(2.0))


def mean_stderr(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of the mean of independent scores: sqrt(sum of squared errors) / count."""
    if not stderrs or any(value is None or not math.isfinite(value) for value in stderrs):
        return None
    return math.sqrt(sum(value * value for value in stderrs)) / len(stderrs)


def difference_stderr(first: float | None, second: float | None) -> float | None:
    """Standard error of a difference of two independent estimates."""
    if first is None or second is None or not (math.isfinite(first) and math.isfinite(second)):
        return None
    return math.sqrt(first * first + second * second)


def _interval(result: dict[str, Any]) -> dict[str, Any]:
    stderr = result.get("stderr")
    if result.get("metric") in PROPORTION_METRICS and result.get("n"):
        return {"ci95": list(wilson_interval(result["score"], result["n"])), "ci95_method": "wilson"}
    if stderr is not None and math.isfinite(stderr):
        return {"ci95": [result["score"] - Z_95 * stderr, result["score"] + Z_95 * stderr], "ci95_method": "normal"}
    return {}


def _comparison(result: dict[str, Any], baseline_result: dict[str, Any]) -> dict[str, Any]:
    comparison = {"delta": result["score"] - baseline_result["score"],
                  "delta_stderr": difference_stderr(result.get("stderr"), baseline_result.get("stderr"))}
    if result.get("metric") in PROPORTION_METRICS:
        z, p_value = two_proportion_z_test(result["score"], result["n"], baseline_result["score"], baseline_result["n"])
        comparison["test"] = {"name": Z_TEST, "z": z, "p_value": p_value}
    else:
        comparison["test"] = {"name": None, "z": None, "p_value": None, "note": PERPLEXITY_TEST_NOTE}
    return comparison


def _task_result(result: dict[str, Any], role: str, baseline_result: dict[str, Any] | None) -> dict[str, Any]:
    entry = {**result, "role": role, **_interval(result)}
    if baseline_result is not None:
        entry.update(_comparison(result, baseline_result))
    return entry


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(task_results: dict[str, dict], tasks, baseline_summary: dict | None) -> dict[str, Any]:
    """Mean score and its standard error over the target tasks and over the general tasks, plus deltas.

    Only tasks whose score is higher-is-better (accuracies) enter a mean; perplexity tasks are listed
    under `excluded_from_mean` because averaging a perplexity with an accuracy means nothing.
    """
    summary: dict[str, Any] = {"excluded_from_mean": []}
    for role in ("target", "general"):
        scores, stderrs = [], []
        for task in tasks:
            if task.role != role:
                continue
            result = task_results[task.spec.name]
            if result.get("higher_is_better", True):
                scores.append(result["score"])
                stderrs.append(result.get("stderr"))
            else:
                summary["excluded_from_mean"].append(task.spec.name)
        summary[f"{role}_score"] = _mean(scores)
        summary[f"{role}_stderr"] = mean_stderr(stderrs)
        summary[f"{role}_tasks"] = len(scores)
        if baseline_summary is not None:
            ours, theirs = summary[f"{role}_score"], baseline_summary[f"{role}_score"]
            summary[f"{role}_delta"] = None if ours is None or theirs is None else ours - theirs
            summary[f"{role}_delta_stderr"] = difference_stderr(summary[f"{role}_stderr"],
                                                                baseline_summary[f"{role}_stderr"])
    return summary


def build_report(tasks, entries: dict[str, dict], models: Sequence[str], baseline: str | None,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """Assemble the report document from per-model entries (from `llmforge_eval.evaluate.score_models`)."""
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

    pareto = pareto_table(results)
    for entry in results:
        marks = [point["on_frontier"] for point in pareto["points"] if point["reference"] == entry["reference"]]
        entry["summary"]["on_pareto_frontier"] = marks[0] if marks else None

    inputs = {
        "models": [{"reference": ref, "digest": entries[ref]["digest"]} for ref in models],
        "baseline": {"reference": baseline, "digest": baseline_entry["digest"]} if baseline_entry else None,
        "tasks": [{"name": t.spec.name, "role": t.role, "kind": t.spec.kind, "metric": t.spec.metric_name,
                   "digest": t.digest, "data": str(t.data_path), "source": t.spec.source} for t in tasks],
        **settings,
    }
    return {"schema": SCHEMA, "inputs": inputs, "results": results, "pareto": pareto, "run": run_record()}


def _format(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _task_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"{'model':<28} {'task':<14} {'role':<8} {'metric':<14} {'score':>9} {'stderr':>8} {'n':>5} "
             f"{'delta':>9} {'z':>7} {'p':>7} cached"]
    for entry in report["results"]:
        name = entry["reference"] + (" (baseline)" if entry["is_baseline"] else "")
        for task, result in entry["tasks"].items():
            test = result.get("test") or {}
            lines.append(
                f"{name[-28:]:<28} {task:<14} {result['role']:<8} {result['metric']:<14} "
                f"{_format(result['score']):>9} {_format(result.get('stderr')):>8} {result['n']:>5} "
                f"{_format(result.get('delta'), signed=True):>9} {_format(test.get('z'), 2, signed=True):>7} "
                f"{_format(test.get('p_value'), 4):>7} {'yes' if result.get('cached') else 'no'}"
            )
    return lines


def _summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"{'model':<28} {'target':>9} {'+-':>7} {'general':>9} {'+-':>7} {'d-target':>9} {'d-general':>9} pareto"]
    for entry in report["results"]:
        summary = entry["summary"]
        mark = {True: "*", False: "", None: "-"}[summary.get("on_pareto_frontier")]
        lines.append(
            f"{entry['reference'][-28:]:<28} {_format(summary['target_score']):>9} "
            f"{_format(summary.get('target_stderr')):>7} {_format(summary['general_score']):>9} "
            f"{_format(summary.get('general_stderr')):>7} {_format(summary.get('target_delta'), signed=True):>9} "
            f"{_format(summary.get('general_delta'), signed=True):>9} {mark}"
        )
    return lines


def format_table(report: dict[str, Any]) -> str:
    """Render the report as text: one row per model and task, then the per-model summary with the Pareto marks.

    In the summary, the "+-" columns are standard errors. A "*" marks the Pareto frontier of
    (general score, target score), and a "-" marks a model without both scores.
    """
    lines = _task_lines(report)
    lines.append("")
    lines.extend(_summary_lines(report))
    excluded = sorted({name for entry in report["results"] for name in entry["summary"]["excluded_from_mean"]})
    if excluded:
        lines.append(f"not in the means (lower is better): {', '.join(excluded)}")
    if any(entry["summary"].get("target_delta") is not None for entry in report["results"]):
        lines.append(f"z, p: {Z_TEST}, each model against the baseline. Perplexity tasks have no test.")
    return "\n".join(lines)
