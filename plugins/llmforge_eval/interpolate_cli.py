"""`forge eval interpolate`: a thin click layer over `llmforge_eval.interpolate.interpolate`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from llmforge.cli import set_resume_hint
from llmforge_eval.interpolate import DEFAULT_OFT_SCALE, DEFAULT_TOLERANCE, OFT_SCALES

PLOT_NAME = "interpolate.png"


@click.command(name="interpolate")
@click.option("--model", "tuned", required=True, metavar="TUNED",
              help="The fine-tuned model: a PEFT adapter dir or a model dir (e.g. a `forge finetune` output).")
@click.option("--baseline", metavar="BASE",
              help="The model it was fine-tuned from (a=0). Default: the adapter's base, or the base in the run record.")
@click.option("--target", required=True, metavar="TASKS", help="Target tasks (plasticity), comma list.")
@click.option("--general", required=True, metavar="TASKS", help="General-capability tasks (stability), comma list.")
@click.option("--alphas", default="0,0.25,0.5,0.75,1", show_default=True, metavar="LIST",
              help="Comma list of path positions a in [0, 1] (0 is the base, 1 the tuned model), "
                   "or 'none' to score only the checkpoints.")
@click.option("--checkpoints", is_flag=True,
              help="Also rewind: score the base, every checkpoints/step-NNNNNN the run kept (--save-every) "
                   "and the final model.")
@click.option("--oft-scale", type=click.Choice(OFT_SCALES), default=DEFAULT_OFT_SCALE, show_default=True,
              help="How a scales an OFT adapter's skew-symmetric generator Q: by sqrt(a), or by a.")
@click.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, show_default=True, metavar="POINTS",
              help="Best trade-off: the highest general score among points whose target score is at most this "
                   "many points (hundredths of a 0-1 score) below the best target score on the path.")
@click.option("--limit", type=int, metavar="N",
              help="Score N examples per task, drawn with --seed (perplexity: the first N windows). Default: all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed that draws the --limit sample.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per forward pass.")
@click.option("--task-file", "task_files", multiple=True, type=click.Path(dir_okay=False), metavar="SPEC",
              help="YAML or JSON task spec to add; repeatable.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="FORGE_DATA_DIR", metavar="DIR",
              help="Directory of the public data sets that specs name as {data_dir} [env: FORGE_DATA_DIR].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Weight and activation dtype for scoring. Default: the `forge eval` default (bfloat16).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the JSON report to this file (as everywhere in `forge eval`); the plot goes beside it.")
@click.option("--plots", type=click.Path(file_okay=False), metavar="DIR",
              help=f"Write the plot ({PLOT_NAME}) to this directory instead of beside --output.")
@click.option("--write-best", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the best trade-off point's model to DIR: a copied adapter for an adapter checkpoint "
                   "or the final adapter, else an HF model directory of its weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --write-best directory written by forge.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
@click.option("--no-cache", is_flag=True, help="Recompute every score; neither read nor write cached scores.")
def interpolate_command(tuned, baseline, target, general, alphas, checkpoints, oft_scale, tolerance, limit, seed,
                        batch_size, task_files, data_dir, dtype, as_json, output, plots, write_best, overwrite,
                        quiet, no_cache):
    """Score a fine-tune along the path from its base model, and name the best trade-off point.

    Interpolation scores W(a) = W0 + a dW at each --alphas value. A LoRA-family adapter is scaled
    exactly (its LoRA scaling times a). An OFT adapter follows the Cayley path: its generator is
    scaled, so every point stays a rotation. A full fine-tune or any other adapter type interpolates
    its merged weights linearly, and the report names the method. --checkpoints adds the rewinding
    path over the checkpoints a `forge finetune --save-every N` run kept.

    The best trade-off point is the point with the highest general score among the points whose
    target score is within --tolerance points of the best target score. Points that no other
    point beats on both scores form the Pareto frontier. -o writes the JSON report, as in
    `forge eval`, and --write-best DIR writes the best point's model.

    \b
    forge eval interpolate --model ./lora-run --target arith --general facts
    forge eval interpolate --model ./oft-run --target arith --general facts --checkpoints \\
        -o path.json --write-best ./best
    """

    from llmforge_eval.cli_common import check_report_target, emit_report, silence_progress_bars, split_list
    from llmforge_eval.interpolate import interpolate, parse_alphas
    from llmforge_eval.interpolate_report import format_table, write_plot, write_point_model

    check_report_target(output, "llmforge.eval.interpolate", {"fine-tuned model": tuned, "baseline": baseline,
                                                               "task file": task_files})
    set_resume_hint("With --no-cache no score was kept, so a rerun scores every point again." if no_cache else
                    "Rerun the same command to continue: the scores of the finished points and tasks are cached and reused.")
    if quiet:
        silence_progress_bars()
    else:
        logging.basicConfig(level=logging.INFO, format="forge eval interpolate: %(message)s")
    report = interpolate(tuned, target=split_list(target), general=split_list(general), baseline=baseline,
                         alphas=parse_alphas(alphas), checkpoints=checkpoints, limit=limit, seed=seed,
                         batch_size=batch_size, task_files=task_files, data_dir=data_dir, dtype=dtype,
                         oft_scale=oft_scale, tolerance=tolerance, use_cache=not no_cache, progress=not quiet)

    if write_best:
        report["written_model"] = write_point_model(report, write_best, overwrite=overwrite)
    plot_dir = None
    if plots:
        plot_dir = Path(plots)
    elif output:
        plot_dir = Path(output).parent
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        report["plot"] = str(plot_dir / PLOT_NAME)
        write_plot(report, plot_dir / PLOT_NAME)
    emit_report(report, output=output, as_json=as_json, format_table=format_table)
