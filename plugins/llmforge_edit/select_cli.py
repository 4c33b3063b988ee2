"""The `forge edit layers` and `forge edit apply` commands: parse options, call layers.py and apply.py, print the result."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llmforge.cli import parse_columns, print_json, set_resume_hint, silence_progress_bars, unescape_template

FORMATS = ["auto", "text", "prompt-completion", "instruction", "chat"]


def _format_score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_scores(record: dict, output: Path | None, plot: Path | None) -> None:
    click.echo(f"{'layer':>5}  {'score':>7}  {'rank':>4}  {'task features':>13}  {'eligible':>8}")
    for row in record["layers"]:
        rank = "-" if row["rank"] is None else row["rank"]
        click.echo(f"{row['layer']:>5}  {_format_score(row['score']):>7}  {rank:>4}  {row['task_features']:>13}  "
                   f"{row['eligible_features']:>8}")
    click.echo(f"ranking (best first): {', '.join(map(str, record['ranking'])) or 'none'}")
    unscored = [str(row["layer"]) for row in record["layers"] if row["score"] is None]
    if unscored:
        click.echo(f"unscored (no feature fires on --min-rate of the task tokens): {', '.join(unscored)}")
    task, general = record["task_data"], record["general_data"]
    click.echo(f"tokens per layer: task {task['tokens']}, general {general['tokens']}")
    for path, label in ((output, "scores"), (plot, "plot")):
        if path is not None:
            click.echo(f"{label}: {path}")


@click.command(name="layers")
@click.option("--model", required=True, help="Model reference: a built-in name, HF directory or .gguf file.")
@click.option("--sae", "sae_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="SAE directory from `forge edit sae train` (or SAELens directories); every layer in it is scored.")
@click.option("--task-data", required=True,
              help="Task text: a .jsonl/.json/.csv/.tsv/.txt file or demo:NAME; a .txt file gives one text per "
                   "paragraph (paragraphs are separated by blank lines).")
@click.option("--general-data", required=True, help="General text to compare with, read with --general-format.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Record format of --task-data (as in forge finetune); each record's prompt and completion form one text.")
@click.option("--column", "columns", multiple=True, metavar="FIELD=NAME",
              help="Read the task format's FIELD from the record field NAME (repeatable).")
@click.option("--prompt-template", callback=unescape_template,
              help="Task prompt template with {field} placeholders, e.g. 'Question: {question}\\nAnswer:'.")
@click.option("--completion-template", callback=unescape_template,
              help="Task completion template with {field} placeholders, e.g. ' {answer}'.")
@click.option("--general-format", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Record format of --general-data.")
@click.option("--tokens", type=int, default=20_000, show_default=True,
              help="Token budget per data set: activations collected on the task text and on the general text.")
@click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per sequence; a longer text is split into consecutive windows of this length.")
@click.option("--skip-bos/--keep-bos", default=True, show_default=True,
              help="Leave out the activation of a leading BOS token, as `forge edit sae train` does.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Dtype of the model forward.")
@click.option("--statistic", type=click.Choice(["mean", "rate"]), default="mean", show_default=True,
              help="mu per feature: the mean activation over tokens, or the fraction of tokens it fires on.")
@click.option("--top-m", type=int, default=32, show_default=True,
              help="A layer's score is the mean specificity s_j of its top-m features.")
@click.option("--min-rate", type=float, default=0.01, show_default=True,
              help="Leave out features that fire on less than this fraction of the task tokens (rare features "
                   "reach s_j near 1 by chance).")
@click.option("--eps", type=float, default=1e-6, show_default=True, help="eps in the denominator of s_j.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the scores as JSON, the file `forge edit apply --scores` reads.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Write a bar chart of the layer scores as PNG.")
@click.option("--overwrite", is_flag=True, help="Replace existing -o and --plot files.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: one per core).")
@click.option("--json", "as_json", is_flag=True, help="Print the full record, with each layer's top features, as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def layers_command(model, sae_dir, task_data, general_data, fmt, columns, prompt_template, completion_template,
                   general_format, tokens, max_length, skip_bos, dtype, statistic, top_m, min_rate, eps, output, plot,
                   overwrite, threads, as_json, quiet):
    """Rank decoder layers by how task-specific their SAE features are.

    For each layer with an SAE, the residual stream (blocks.L.hook_resid_post) is collected on
    the task text and on the general text, through the activation cache that `forge edit sae
    train` uses. Per feature j, s_j = (mu_task - mu_general) / (mu_task + mu_general + eps).
    Features that fire on less than --min-rate of the task tokens are left out, and the layer's
    score is the mean of its top-m s_j. This score is forge's own default, not a published one.

    Example: forge edit layers --model smollm2-135m --sae saes --task-data math.jsonl
    --general-data wiki.txt -o scores.json --plot scores.png
    """
    from llmforge_edit.activations import TextSource
    from llmforge_edit.layers import LayerScoreRequest, score_layers

    set_resume_hint("Rerun the same command: it reuses the activations collected before the interrupt (they are "
                    "cached per data set), and scores the layers again.")
    if quiet:
        silence_progress_bars()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    task = TextSource(task_data, fmt, parse_columns(columns), prompt_template, completion_template)
    request = LayerScoreRequest(model=model, sae_dir=sae_dir, task=task, general=TextSource(general_data, general_format),
                                tokens=tokens, max_length=max_length, skip_bos=skip_bos, dtype=dtype,
                                statistic=statistic, top_m=top_m, min_rate=min_rate, eps=eps, output=output,
                                plot=plot, overwrite=overwrite, progress=not quiet)
    record = score_layers(request, command=["forge", *sys.argv[1:]] if sys.argv else None)
    if as_json:
        print_json(record)
    else:
        _print_scores(record, output, plot)


def _print_apply(record: dict, base: str) -> None:
    selection = record["selection"]
    layers = ", ".join(map(str, selection["layers"]))
    scope = "the whole vector" if record["layers"] is None else f"layers {layers}"
    click.echo(f"applied lambda {record['lambda']:g} * tau to {scope} of {base} ({selection['mode']}): "
               f"{record['merged_tensors']} tensors changed")
    projection = record["projection"]
    if projection is not None:
        click.echo(f"projection onto SAE task features: energy ||P tau||^2 / ||tau||^2 = "
                   f"{_format_score(projection['energy_fraction'])} overall")
        for row in projection["layers"]:
            click.echo(f"  layer {row['layer']:>3}  energy {_format_score(row['energy_fraction'])}  basis rank "
                       f"{row['basis_rank']} (r / d_model {row['isotropic_fraction']:.4f})  dropped "
                       f"{len(row['dropped_tensors'])} of {row['tensors']} tensors")
    click.echo(f"output: {record['output']}")


@click.command(name="apply")
@click.option("--base", required=True, help="Base model reference that the task vector was computed against.")
@click.option("--vector", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Task vector file from `forge edit diff`.")
@click.option("--select", required=True, metavar="top-k|bottom-k|random-k|all|LIST",
              help="Layers to edit: the k best or worst scored layers, k random layers, the whole vector, or "
                   "indices and ranges such as 3,7,12-14.")
@click.option("--k", type=int, help="Number of layers for top-k, bottom-k and random-k.")
@click.option("--scores", type=click.Path(path_type=Path, dir_okay=False),
              help="Scores file from `forge edit layers -o`; needed by top-k, bottom-k and --project.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random-k draw.")
@click.option("--lambda", "scale", type=float, default=1.0, show_default=True,
              help="Factor applied to the task vector; 1 adds the raw vector.")
@click.option("--project", type=click.Choice(["sae"]),
              help="Project tau onto the span of each chosen layer's top task features (needs --sae and --scores).")
@click.option("--sae", "sae_dir", type=click.Path(path_type=Path, file_okay=False),
              help="SAE directory the scores were computed with; used by --project sae.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="HF model directory to write, with forge_run.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory written by forge.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def apply_command(base, vector, select, k, scores, seed, scale, project, sae_dir, output, overwrite, as_json, quiet):
    """Add a task vector to chosen decoder layers of the base only, and write an HF model directory.

    The edited weights are base + lambda * tau in the chosen layers and the base elsewhere
    (--select all adds the whole vector). Layers come from a scores file (top-k, bottom-k), a
    seeded draw (random-k) or a list. --project sae keeps only the part of tau in the span of
    the SAE decoder rows of each layer's top task features and reports the energy it keeps.

    Example: forge edit apply --base smollm2-135m --vector math.safetensors --select top-k --k 3
    --scores scores.json -o edited
    """
    from llmforge_edit.apply import ApplyRequest, apply_vector

    set_resume_hint("Rerun the same command; the edit starts over, because only the digests of its inputs are cached.")
    if quiet:
        silence_progress_bars()
    request = ApplyRequest(base=base, vector=vector, select=select.strip(), output=output, k=k, scores=scores,
                           seed=seed, scale=scale, project=project, sae_dir=sae_dir, overwrite=overwrite)
    record = apply_vector(request, command=["forge", *sys.argv[1:]] if sys.argv else None)
    if as_json:
        print_json(record)
    else:
        _print_apply(record, base)
