"""`forge eval drift`: the drift report of `llmforge_eval.drift` as a document, a table and plots."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import click

from llmforge.cli import set_resume_hint
from llmforge.errors import ForgeError
from llmforge_eval.cli_common import check_report_target, emit_report, plots_directory
from llmforge_eval.drift import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPS,
    DEFAULT_MAX_TOKENS,
    METRIC_NAMES,
    METRICS_VERSION,
    SCHEMA,
    CAPTURE_VERSION,
    DriftSettings,
)

# Metrics of the text table, with their column headings, and of the plots, with their axis labels.
_TABLE_COLUMNS = (("procrustes", "procrustes"), ("procrustes_raw", "raw"), ("gram_distortion", "gram"),
                  ("cka", "cka"), ("csd_rel", "csd_rel"), ("csd_norm", "csd_norm"))
_PLOTTED = (("procrustes", "Procrustes residual"), ("cka", "linear CKA"))


def _metrics_key(run, digest: str):
    from llmforge.cache import CacheKey

    settings = run.settings
    params = {"modules": sorted(settings.module_types) if settings.module_types else "all", "dtype": settings.dtype,
              "eps": settings.eps, "capture": CAPTURE_VERSION, "version": METRICS_VERSION}
    return CacheKey("eval-drift-metrics", {"base": run.baseline_digest, "tuned": digest, "tokens": run.tokens}, params)


def _mean(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    means = {}
    for name in METRIC_NAMES:
        values = [row[name] for row in rows if row[name] is not None]
        means[name] = sum(values) / len(values) if values else None
    return means


def _model_entry(run, source) -> dict[str, Any]:
    from llmforge_eval.drift import summarise

    computed = {}

    def compute() -> dict[str, Any]:
        rows, cached = run.compare(source.tuned_reference, source.tuned_digest)
        computed.update(cached)
        return {"modules": rows}

    result = run.cache.get_or_compute_json(_metrics_key(run, source.tuned_digest), compute)
    rows = result["modules"]
    cached = {"metrics": not computed, "activations": computed.get("activations", True),
              "base_activations": computed.get("base_activations", True)}
    return {"reference": source.tuned_reference, "digest": source.tuned_digest, "is_adapter": source.is_adapter,
            "cached": cached, "mean": _mean(rows), "by_layer": summarise(rows, "layer"),
            "by_module_type": summarise(rows, "module_type"), "modules": rows}


def drift_report(models: Sequence[str], baseline: str, data: str, *, limit: int | None = None, seed: int = 0,
                 settings: DriftSettings | None = None, data_dir: str | None = None, task_files: Sequence[str] = (),
                 cache=None, progress: bool = False) -> dict[str, Any]:
    """Measure the activation drift of each model against the baseline on the prompts of `data`.

    Every model is checked (resolved, and an adapter's base compared with the baseline) before
    any weights load. Captures and metrics are cached, so a repeated run reads them back.
    """
    from llmforge.cache import Cache
    from llmforge.checkpoint import run_record
    from llmforge.models import load_tokenizer
    from llmforge_eval.drift import DriftRun, read_prompts, tokenize_prompts
    from llmforge_eval.weights import resolve_update

    if not models:
        raise ForgeError("No model to compare: pass --model REF at least once.")
    settings = settings or DriftSettings()
    settings.check()
    cache = cache or Cache()
    sources = [resolve_update(reference, baseline, cache=cache) for reference in dict.fromkeys(models)]

    prompts = read_prompts(data, limit=limit, seed=seed, data_dir=data_dir, task_files=task_files)
    sequences = tokenize_prompts(load_tokenizer(baseline, cache=cache), prompts.texts, settings.max_tokens)
    run = DriftRun(baseline, sequences, settings, cache, progress)
    entries = [_model_entry(run, source) for source in sources]

    return {
        "schema": SCHEMA,
        "baseline": {"reference": baseline, "digest": run.baseline_digest},
        "data": {"source": data, "kind": prompts.kind, "digest": prompts.digest, "prompts": len(sequences),
                 "tokens": sum(len(ids) for ids in sequences), "tokens_digest": run.tokens},
        "settings": {"limit": limit, "seed": seed, "max_tokens": settings.max_tokens, "dtype": settings.dtype,
                     "modules": list(settings.module_types) if settings.module_types else "all",
                     "eps": settings.eps, "batch_size": settings.batch_size, "activation_storage": "float32",
                     "metric_dtype": "float64"},
        "models": entries,
        "run": run_record(),
    }


# Output


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_table(report: dict[str, Any]) -> str:
    """Render the report as text: per model, the means by module type and by layer, then over all modules."""
    data = report["data"]
    lines = [f"baseline {report['baseline']['reference']}; {data['prompts']} prompts, {data['tokens']} tokens "
             f"from {data['source']}"]
    heading = "  ".join(f"{title:>10}" for _, title in _TABLE_COLUMNS)
    for entry in report["models"]:
        lines += ["", f"model {entry['reference']}", f"{'group':<16}{'modules':>8}  {heading}"]
        groups = [(row["module_type"], row) for row in entry["by_module_type"]]
        groups += [(f"layer {row['layer']}", row) for row in entry["by_layer"]]
        groups.append(("all", {**entry["mean"], "modules": len(entry["modules"])}))
        for label, row in groups:
            cells = "  ".join(f"{_cell(row[name]):>10}" for name, _ in _TABLE_COLUMNS)
            lines.append(f"{label:<16}{row['modules']:>8}  {cells}")
    return "\n".join(lines)


def _slug(reference: str) -> str:
    name = Path(reference.rstrip("/")).name or reference
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def _save_figure(figure, path: Path) -> None:
    from llmforge.checkpoint import atomic_write

    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=110)


def _plot_lines(series: dict[str, dict[str, list[tuple[int, float]]]], title: str, path: Path) -> None:
    """Draw one panel per plotted metric with one line per series key; `series[key][metric]` lists (layer, value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(_PLOTTED), figsize=(5 * len(_PLOTTED), 3.6), squeeze=False)
    for axis, (metric, label) in zip(axes[0], _PLOTTED):
        for name, values in series.items():
            points = values[metric]
            axis.plot([layer for layer, _ in points], [value for _, value in points], marker="o", label=name)
        axis.set_xlabel("decoder layer")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    try:
        _save_figure(figure, path)
    finally:
        plt.close(figure)


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write one PNG per model (a line per module type) and, for several models, one comparing their layer means."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, entry in enumerate(report["models"], start=1):
        series: dict[str, dict[str, list]] = {}
        for row in entry["modules"]:
            for metric, _ in _PLOTTED:
                series.setdefault(row["module_type"], {m: [] for m, _ in _PLOTTED})[metric].append(
                    (row["layer"], row[metric]))
        path = directory / f"drift-{number}-{_slug(entry['reference'])}.png"
        _plot_lines(series, f"{entry['reference']} against {report['baseline']['reference']}", path)
        paths.append(path)

    if len(report["models"]) > 1:
        series = {entry["reference"]: {metric: [(row["layer"], row[metric]) for row in entry["by_layer"]]
                                       for metric, _ in _PLOTTED} for entry in report["models"]}
        path = directory / "drift-models.png"
        _plot_lines(series, f"layer means against {report['baseline']['reference']}", path)
        paths.append(path)
    return paths


def _module_list(value: str | None) -> tuple[str, ...] | None:
    names = tuple(name.strip() for name in (value or "").split(",") if name.strip())
    return names or None


@click.command(name="drift")
@click.option("--model", "models", multiple=True, required=True, metavar="REF",
              help="Fine-tuned model (PEFT adapter dir or HF dir) to compare with the baseline; repeatable.")
@click.option("--baseline", required=True, metavar="REF", help="The base model the fine-tunes started from.")
@click.option("--data", required=True, metavar="TASK_OR_FILE",
              help="Eval task name (its prompts), or a JSONL/JSON/CSV/TXT file or demo:NAME with a 'text' or "
                   "'prompt' field.")
@click.option("--limit", type=int, metavar="N", help="Use N prompts drawn with --seed. Default: all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed that draws the --limit sample.")
@click.option("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Cap on the tokens captured, over all prompts; memory and cache size grow linearly with it.")
@click.option("--modules", metavar="NAMES",
              help="Comma list of linear module names to compare (e.g. q_proj,v_proj). Default: every linear "
                   "module of the decoder layers.")
@click.option("--eps", type=float, default=DEFAULT_EPS, show_default=True,
              help="Added to E||W0 h||^2 in the CSD_rel denominator.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Dtype the models run in; captured activations are stored as float32 either way.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Prompts per forward pass.")
@click.option("--task-file", "task_files", multiple=True, type=click.Path(dir_okay=False), metavar="SPEC",
              help="YAML or JSON task spec that --data may name; repeatable.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="FORGE_DATA_DIR", metavar="DIR",
              help="Directory of the public data sets that task specs name as {data_dir} [env: FORGE_DATA_DIR].")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the JSON report (and the plots beside it).")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the PNG plots here (default: beside the -o report; none without -o or --plots).")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
def drift_command(models, baseline, data, limit, seed, max_tokens, modules, eps, dtype, batch_size, task_files,
                  data_dir, as_json, output, plots_dir, quiet):
    """Compare the activations of fine-tuned models with their base model, per linear module.

    Both models run on the same prompts (padding removed, at most --max-tokens tokens). For each
    linear module of each decoder layer the report gives the Procrustes residual (centred, after
    the best rotation, and raw without it), the Gram distortion of the row-normalised activations
    and linear CKA. It adds the capability-conditioned drift CSD_rel and CSD_norm of the weight
    update on the base model's module inputs, and summarises everything per layer and per module
    type. Activations
    and results are cached, so a second model against the same base captures the base once.

    \b
    forge eval drift --model ./lora --baseline smollm2-135m --data facts
    forge eval drift --model ./lora --model ./oft --baseline smollm2-135m --data prompts.jsonl -o drift.json
    """

    check_report_target(output, "llmforge.eval.drift", {"model": models, "baseline": baseline, "data": data,
                                                         "task file": task_files})
    set_resume_hint("Rerun the same command to continue: the activations captured before the interrupt are cached "
                    "per model and reused.")
    if quiet:
        from llmforge_eval.cli_common import silence_progress_bars

        silence_progress_bars()
    else:
        logging.basicConfig(level=logging.INFO, format="forge eval drift: %(message)s")
    settings = DriftSettings(max_tokens=max_tokens, module_types=_module_list(modules), dtype=dtype, eps=eps,
                             batch_size=batch_size)
    report = drift_report(models, baseline, data, limit=limit, seed=seed, settings=settings, data_dir=data_dir,
                          task_files=task_files, progress=not quiet)

    directory = plots_directory(plots_dir, output)
    if directory is not None:
        report["plots"] = [str(path) for path in write_plots(report, directory)]
    emit_report(report, output=output, as_json=as_json, format_table=format_table)
