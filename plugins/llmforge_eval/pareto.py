"""The Pareto frontier of models on (general score, target score), and its PNG plot.

A model is on the frontier when no other model scores at least as high on both axes and higher on
one. NOTE: the frontier is taken over every model in the run. A fair comparison of fine-tuning
methods puts models of similar trainable-parameter count in one run, and choosing them is up to
the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Mark the points (x, y) that no other point dominates, where higher is better on both axes.

    Two equal points do not dominate each other, so both stay on the frontier.
    """
    marks = []
    for index, (x, y) in enumerate(points):
        dominated = any(
            other_x >= x and other_y >= y and (other_x > x or other_y > y)
            for other_index, (other_x, other_y) in enumerate(points) if other_index != index
        )
        marks.append(not dominated)
    return marks


def pareto_table(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Build the report's Pareto section from per-model results that carry a `summary`.

    Models without a target score or a general score (no such tasks, or only perplexity tasks)
    have no point and are listed under `without_point`.
    """
    scored = [entry for entry in results
              if entry["summary"]["target_score"] is not None and entry["summary"]["general_score"] is not None]
    marks = pareto_frontier([(entry["summary"]["general_score"], entry["summary"]["target_score"])
                             for entry in scored])
    points = [{"reference": entry["reference"], "is_baseline": entry["is_baseline"],
               "general_score": entry["summary"]["general_score"], "target_score": entry["summary"]["target_score"],
               "on_frontier": mark} for entry, mark in zip(scored, marks)]
    with_point = {entry["reference"] for entry in scored}
    without = [entry["reference"] for entry in results if entry["reference"] not in with_point]
    return {"x": "general_score", "y": "target_score", "points": points, "without_point": without}


def point_label(reference: str) -> str:
    """Return a short plot label for a model reference: the last path component."""
    return Path(reference.rstrip("/")).name or reference


def write_pareto_plot(pareto: dict[str, Any], path: str | Path, *, title: str = "Target against general score") -> Path:
    """Render the target score against the general score with the frontier marked, as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmforge.checkpoint import atomic_write

    points = pareto["points"]
    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    try:
        others = [point for point in points if not point["on_frontier"]]
        frontier = sorted((point for point in points if point["on_frontier"]), key=lambda point: point["general_score"])
        axes.scatter([p["general_score"] for p in others], [p["target_score"] for p in others],
                     color="tab:gray", label="dominated", zorder=2)
        axes.scatter([p["general_score"] for p in frontier], [p["target_score"] for p in frontier],
                     color="tab:red", marker="*", s=140, label="Pareto frontier", zorder=3)
        axes.plot([p["general_score"] for p in frontier], [p["target_score"] for p in frontier],
                  color="tab:red", linestyle="--", linewidth=1, zorder=1)
        short = [point_label(point["reference"]) for point in points]
        for point, name in zip(points, short):
            # Two models in folders of the same name (run1/adapter, run2/adapter) keep their full references.
            label = name if short.count(name) == 1 else point["reference"]
            label += " (baseline)" if point["is_baseline"] else ""
            axes.annotate(label, (point["general_score"], point["target_score"]), textcoords="offset points",
                          xytext=(5, 5), fontsize=8)
        axes.set_xlabel("general score (stability, mean over general tasks)")
        axes.set_ylabel("target score (plasticity, mean over target tasks)")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize=8)
        figure.tight_layout()

        path = Path(path)
        with atomic_write(path, "wb") as handle:
            figure.savefig(handle, format="png")
    finally:
        plt.close(figure)
    return path
