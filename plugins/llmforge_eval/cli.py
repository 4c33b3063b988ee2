"""The `forge eval` group: scoring (a thin click layer over `llmforge_eval.evaluate.evaluate`) and its diagnostics.

`forge eval --model ...` scores models; the subcommands (`forge eval spectra`, ...) are added
with `eval_command.add_command` at the end of this module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from llmforge.cli import set_resume_hint

from llmforge_eval.cli_common import check_report_target, emit_report, silence_progress_bars, split_list
from llmforge_eval.evaluate import DEFAULT_DTYPE

_HELP_TASKS = "Comma list of task or suite names (see --list-tasks)."


def _print_task_list(task_files, as_json: bool) -> None:
    from llmforge_eval.evaluate import task_registry
    from llmforge_eval.tasks import load_suites

    registry = task_registry(task_files)
    rows = [{"name": spec.name, "kind": spec.kind, "metric": spec.metric_name, "data": spec.data,
             "description": spec.description, "source": spec.source} for spec in registry.values()]
    rows.sort(key=lambda row: row["name"])
    suites = [{"name": name, **suite} for name, suite in sorted(load_suites().items())]
    if as_json:
        document = {"schema": "llmforge.eval-tasks/2", "tasks": rows, "suites": suites}
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    # Columns as wide as their longest entry, so that a plugin's long task name keeps them aligned.
    name_width = max([14, *(len(row["name"]) for row in rows), *(len(suite["name"]) for suite in suites)])
    kind_width = max([16, *(len(row["kind"]) for row in rows)])
    metric_width = max([14, *(len(row["metric"]) for row in rows)])
    click.echo("tasks:")
    for row in rows:
        click.echo(f"  {row['name']:<{name_width}} {row['kind']:<{kind_width}} {row['metric']:<{metric_width}} "
                   f"{row['description']}")
    click.echo("suites:")
    for suite in suites:
        click.echo(f"  {suite['name']:<{name_width}} {','.join(suite['tasks']):<31} {suite['description']}")


def _plot_path(plot: str | None, output: str | None) -> Path | None:
    """Return where the Pareto plot goes: --plot, else beside -o as NAME.pareto.png, else nowhere."""
    if plot:
        return Path(plot)
    if output:
        return Path(output).with_suffix(".pareto.png")
    return None


@click.group(name="eval", invoke_without_command=True)
@click.option("--model", "models", multiple=True, metavar="REF",
              help="Model to evaluate (built-in name, HF dir, .gguf file or PEFT adapter dir); repeatable.")
@click.option("--target", metavar="TASKS", help=f"Target tasks (plasticity). {_HELP_TASKS}")
@click.option("--general", metavar="TASKS", help=f"General-capability tasks (stability). {_HELP_TASKS}")
@click.option("--baseline", metavar="REF", help="Reference model; the report adds deltas (model minus baseline).")
@click.option("--limit", type=int, metavar="N",
              help="Score N examples per task, drawn with --seed (perplexity: the first N windows). Default: all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed that draws the --limit sample.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per forward pass.")
@click.option("--task-file", "task_files", multiple=True, type=click.Path(dir_okay=False), metavar="SPEC",
              help="YAML or JSON task spec to add; repeatable. Without --target/--general these run as general tasks.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="FORGE_DATA_DIR", metavar="DIR",
              help="Directory of the public data sets that specs name as {data_dir} [env: FORGE_DATA_DIR].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=DEFAULT_DTYPE, show_default=True,
              help="Weight and activation dtype for scoring.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the JSON report to this file, and the Pareto plot beside it as NAME.pareto.png.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the PNG plot of target against general score, Pareto frontier marked, to FILE.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
@click.option("--no-cache", is_flag=True, help="Recompute every score; neither read nor write cached scores.")
@click.option("--list-tasks", is_flag=True, help="List the available tasks and suites and exit.")
@click.pass_context
def eval_command(ctx, models, target, general, baseline, limit, seed, batch_size, task_files, data_dir, dtype,
                 as_json, output, plot, quiet, no_cache, list_tasks):
    """Evaluate models on target and general tasks and report scores, standard errors and deltas.

    The target score (plasticity) is the mean over --target tasks, and the general score (stability)
    is the mean over --general tasks; perplexity tasks are reported but left out of the means. With
    --baseline, every score also gets its delta against the baseline model, and every accuracy or
    match rate a two-proportion z-test against it. The summary marks the Pareto frontier of (general, target).

    Adapters are applied to their base model without merging, and a base model is loaded once for
    all of its adapters. Scores are cached per model, task and settings, so a repeated run returns at
    once without loading a model, and an interrupted run resumes after the last finished task.

    \b
    forge eval --model smollm2-135m --target demo-target --general demo-general
    forge eval --model ./lora --model ./oft --baseline smollm2-135m --target math --general general \\
        --data-dir ../data -o report.json
    forge eval --list-tasks

    The subcommands below run diagnostics instead of scoring; `forge eval COMMAND --help` describes each.
    """
    from llmforge_eval.evaluate import evaluate
    from llmforge_eval.pareto import write_pareto_plot
    from llmforge_eval.report import format_table

    if ctx.invoked_subcommand is not None:
        return
    if list_tasks:
        _print_task_list(task_files, as_json)
        return
    if not models:
        raise click.UsageError("Missing option '--model' (or use --list-tasks).")
    check_report_target(output, "llmforge.eval", {"model": models, "baseline": baseline, "task file": task_files})
    set_resume_hint("With --no-cache no score was kept, so a rerun scores every task again." if no_cache else
                    "Rerun the same command to continue: the scores of the tasks that finished are cached and reused.")

    if quiet:
        silence_progress_bars()
    else:
        logging.basicConfig(level=logging.INFO, format="forge eval: %(message)s")
    report = evaluate(models, target=split_list(target), general=split_list(general), baseline=baseline, limit=limit,
                      batch_size=batch_size, task_files=task_files, data_dir=data_dir, dtype=dtype, seed=seed,
                      use_cache=not no_cache, progress=not quiet)

    plot_path = _plot_path(plot, output)
    if plot_path is not None:
        if report["pareto"]["points"]:
            report["plots"] = {"pareto": str(write_pareto_plot(report["pareto"], plot_path))}
        else:
            logging.getLogger(__name__).warning("skipped the Pareto plot: no model has both a target score and a general score")
    emit_report(report, output=output, as_json=as_json, format_table=format_table)


# Diagnostics subcommands, each a thin click layer in its own module.
from llmforge_eval.spectra_cli import spectra_command  # noqa: E402

eval_command.add_command(spectra_command)
from llmforge_eval.drift_cli import drift_command  # noqa: E402

eval_command.add_command(drift_command)
from llmforge_eval.interpolate_cli import interpolate_command  # noqa: E402

eval_command.add_command(interpolate_command)
