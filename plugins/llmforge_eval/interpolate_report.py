"""Outputs of `forge eval interpolate`: the report document with its Pareto frontier and best trade-off point,
the text table, the PNG plot, and the model of the best point written to disk.

The best trade-off point is the point with the highest general score among the points whose target
score is at most `tolerance` points (hundredths of a 0-1 score) below the best target score on the
path. Ties go to the higher target score, then to the point listed first (the smaller a, or the
earlier step). A point is on the Pareto frontier when no other point has a target score and a
general score at least as high, with one of them strictly higher.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from llmforge.cache import Cache
from llmforge.errors import ForgeError

MODEL_RECORD_SCHEMA = "llmforge.eval.interpolate-model/1"
METHOD_NOTES = {
    "lora-scaling": "exact W0 + a dW: the LoRA scaling of every adapter layer is multiplied by a",
    "oft-cayley": "OFT Cayley path: the skew-symmetric generator Q is scaled and R = Cayley(Q) rebuilt, "
                  "so every point is an orthogonal rotation of the base weights",
    "dense": "linear interpolation of the merged weights, W0 + a (W_ft - W0), for every changed parameter",
}


def _task_entry(result: dict[str, Any], role: str, base: dict[str, Any]) -> dict[str, Any]:
    return {**result, "role": role, "delta": result["score"] - base["score"]}


def pareto_flags(pairs: list[tuple[float | None, float | None]]) -> list[bool]:
    """Flag the (target, general) pairs that no other pair dominates; pairs with a missing score are never flagged."""
    flags = []
    for index, (target, general) in enumerate(pairs):
        if target is None or general is None:
            flags.append(False)
            continue
        dominated = any(
            other_target is not None and other_general is not None
            and other_target >= target and other_general >= general
            and (other_target > target or other_general > general)
            for other_index, (other_target, other_general) in enumerate(pairs) if other_index != index
        )
        flags.append(not dominated)
    return flags


def best_tradeoff(pairs: list[tuple[float | None, float | None]], tolerance: float) -> int | None:
    """Return the index of the best trade-off point (see the module docstring), or None without scores."""
    scored = [(index, target, general) for index, (target, general) in enumerate(pairs)
              if target is not None and general is not None]
    if not scored:
        return None
    best_target = max(target for _, target, _ in scored)
    # A tiny slack keeps a point exactly `tolerance` points below the best from being lost to rounding.
    floor = best_target - tolerance / 100.0 - 1e-12
    candidates = [entry for entry in scored if entry[1] >= floor]
    return max(candidates, key=lambda entry: (entry[2], entry[1], -entry[0]))[0]


def _adapter_notes(pair, method: str) -> list[str]:
    notes = [f"path method {method}: {METHOD_NOTES[method]}"]
    if pair.adapter_dir is None:
        return notes
    config = json.loads((pair.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if method == "oft-cayley" and config.get("use_cayley_neumann"):
        notes.append("the adapter was trained with peft's truncated Neumann series for the Cayley transform; "
                     "the path uses the exact transform, so a=1 differs slightly from the adapter")
    if method == "dense":
        notes.append(f"adapter type {config.get('peft_type')} has no exact scaled form here, so the path "
                     "interpolates its merged weights linearly")
    return notes


def build_report(pair, method: str, tasks, base_scores: dict, points: list, options: dict) -> dict[str, Any]:
    """Assemble the report document: baseline scores, every path point with deltas, the frontier and the best point."""
    from llmforge.checkpoint import run_record

    from llmforge_eval.interpolate import SCHEMA
    from llmforge_eval.report import summarize

    roles = {task.spec.name: task.role for task in tasks}
    base_summary = summarize(base_scores, tasks, None)
    rows = []
    for point in points:
        rows.append({
            "path": point.path, "label": point.label, "alpha": point.alpha, "step": point.step,
            "reference": point.reference, "checkpoint": str(point.trainable) if point.trainable else None,
            "tasks": {name: _task_entry(result, roles[name], base_scores[name]) for name, result in point.tasks.items()},
            "summary": summarize(point.tasks, tasks, base_summary),
        })

    pairs = [(row["summary"]["target_score"], row["summary"]["general_score"]) for row in rows]
    for row, flag in zip(rows, pareto_flags(pairs)):
        row["pareto"] = flag
    best = best_tradeoff(pairs, options["tolerance"])
    for index, row in enumerate(rows):
        row["best"] = index == best

    inputs = {
        "tuned": {"reference": pair.tuned, "digest": pair.tuned_digest,
                  "kind": "adapter" if pair.adapter_dir is not None else "model"},
        "baseline": {"reference": pair.baseline, "digest": pair.baseline_digest},
        "tasks": [{"name": t.spec.name, "role": t.role, "kind": t.spec.kind, "metric": t.spec.metric_name,
                   "digest": t.digest, "data": str(t.data_path)} for t in tasks],
        **options,
    }
    tolerance = options["tolerance"]
    rule = (f"highest general score among the points whose target score is at most {tolerance:g} "
            f"point{'' if tolerance == 1 else 's'} below the best target score on the path. Ties go to the "
            "higher target score, then to the point listed first")
    return {
        "schema": SCHEMA, "inputs": inputs, "path_method": method if options["alphas"] else None,
        "notes": _adapter_notes(pair, method) if options["alphas"] else [],
        "baseline": {"tasks": {name: {**result, "role": roles[name]} for name, result in base_scores.items()},
                     "summary": base_summary},
        "points": rows,
        "best": None if best is None else {"index": best, "path": rows[best]["path"], "label": rows[best]["label"],
                                           "rule": rule},
        "run": run_record(),
    }


# Text and plot


def _format(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_table(report: dict[str, Any]) -> str:
    """Render the path as a table: one row per point with scores, deltas, frontier and best marks."""
    base = report["baseline"]["summary"]
    lines = [f"baseline {report['inputs']['baseline']['reference']}: target {_format(base['target_score'])}, "
             f"general {_format(base['general_score'])}",
             f"{'path':<14} {'point':<12} {'target':>8} {'general':>8} {'d-target':>9} {'d-general':>9}  pareto best"]
    for row in report["points"]:
        summary = row["summary"]
        lines.append(
            f"{row['path']:<14} {row['label']:<12} {_format(summary['target_score']):>8} "
            f"{_format(summary['general_score']):>8} {_format(summary.get('target_delta'), True):>9} "
            f"{_format(summary.get('general_delta'), True):>9}  {'*' if row['pareto'] else '':<6} "
            f"{'<-' if row['best'] else ''}"
        )
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if report["best"] is not None:
        lines.append(f"best trade-off: {report['best']['path']} {report['best']['label']} ({report['best']['rule']})")
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Write a PNG of target score against general score along each path, frontier and best point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmforge.checkpoint import atomic_write

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for path_name, style in (("interpolation", "o-"), ("rewind", "s--")):
        rows = [row for row in report["points"] if row["path"] == path_name
                and row["summary"]["target_score"] is not None and row["summary"]["general_score"] is not None]
        if not rows:
            continue
        xs = [row["summary"]["target_score"] for row in rows]
        ys = [row["summary"]["general_score"] for row in rows]
        axes.plot(xs, ys, style, label=path_name, alpha=0.8)
        for row, x, y in zip(rows, xs, ys):
            axes.annotate(row["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if row["pareto"]:
                axes.scatter([x], [y], s=120, facecolors="none", edgecolors="black", linewidths=1.0)
            if row["best"]:
                axes.scatter([x], [y], s=200, marker="*", color="gold", edgecolors="black", zorder=5,
                             label="best trade-off")

    base = report["baseline"]["summary"]
    if base["target_score"] is not None and base["general_score"] is not None:
        axes.axvline(base["target_score"], color="grey", linestyle=":", linewidth=0.8)
        axes.axhline(base["general_score"], color="grey", linestyle=":", linewidth=0.8)
    axes.set_xlabel("target score (plasticity)")
    axes.set_ylabel("general score (stability)")
    axes.set_title("Path from the base to the tuned model (circled: Pareto frontier)", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


# The best point's model


def _point_model(report: dict[str, Any], row: dict[str, Any], cache: Cache):
    """Build the plain model (float32) of an in-memory point: an interpolation position or a full checkpoint."""
    import torch

    from llmforge.models import load_model

    from llmforge_eval.interpolate import full_checkpoint_state, load_path_model

    tuned, baseline = report["inputs"]["tuned"]["reference"], report["inputs"]["baseline"]["reference"]
    if row["path"] == "interpolation":
        path_model = load_path_model(tuned, baseline, report["path_method"], dtype="float32",
                                     oft_scale=report["inputs"]["oft_scale"], cache=cache)
        path_model.set_alpha(row["alpha"])
        model = path_model.loaded.model
        if hasattr(model, "merge_and_unload"):
            with torch.no_grad():
                model = model.merge_and_unload()
        return model, path_model.loaded.tokenizer

    loaded = load_model(row["reference"] if row["reference"] else baseline, dtype="float32", cache=cache)
    if row["checkpoint"]:
        loaded.model.load_state_dict(full_checkpoint_state(loaded.model, Path(row["checkpoint"])), strict=False)
    return loaded.model, loaded.tokenizer


def write_point_model(report: dict[str, Any], directory: str | Path, *, overwrite: bool = False,
                      cache: Cache | None = None) -> dict[str, Any]:
    """Write the best point's model atomically: an adapter point's adapter files copied, else an HF model directory.

    Returns {"path", "label", "format", "digest"}; the directory also gets a forge run record naming
    the point, the tuned model and the baseline (as `base_reference`).
    """
    from llmforge.checkpoint import RUN_RECORD_NAME, atomic_directory, run_record, write_json
    from llmforge.models import adapter_digest, directory_model_digest, resolve

    if report["best"] is None:
        raise ForgeError("No point has both a target and a general score, so there is no best point to write.")
    cache = cache or Cache()
    row = report["points"][report["best"]["index"]]
    baseline = report["inputs"]["baseline"]
    source = resolve(row["reference"], cache=cache) if row["reference"] else None

    with atomic_directory(Path(directory), overwrite=overwrite) as temporary:
        if source is not None and source.is_adapter:
            for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
                if (source.path / name).is_file():
                    shutil.copyfile(source.path / name, temporary / name)
            written = {"format": "peft-adapter", "digest": adapter_digest(temporary, baseline["digest"], None)}
        else:
            model, tokenizer = _point_model(report, row, cache)
            model.save_pretrained(str(temporary))
            tokenizer.save_pretrained(str(temporary))
            written = {"format": "hf-model", "digest": directory_model_digest(temporary, None)}
        record = run_record(schema=MODEL_RECORD_SCHEMA, point={k: row[k] for k in ("path", "label", "alpha", "step")},
                            tuned=report["inputs"]["tuned"], base_reference=baseline["reference"],
                            base_digest=baseline["digest"], summary=row["summary"])
        write_json(temporary / RUN_RECORD_NAME, record)
    return {"path": str(Path(directory).resolve()), "label": row["label"], "path_kind": row["path"], **written}
