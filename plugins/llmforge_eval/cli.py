"""The `forge eval` group: scoring (a thin click layer over `llmforge_eval.evaluate.evaluate`) and its diagnostics.

`forge eval --model ...` scores models; the subcommands (`forge eval spectra`, ...) are added
with `eval_command.add_command` at the end of this module.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from llmforge_eval.evaluate import DEFAULT_DTYPE

_HELP_TASKS = "Comma list of task names (see --list-tasks)."


def _split(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def _print_task_list(task_files, as_json: bool) -> None:
    from llmforge_eval.evaluate import task_registry

    registry = task_registry(task_files)
    rows = [{"name": spec.name, "kind": spec.kind, "metric": spec.metric_name, "data": spec.data,
             "description": spec.description, "source": spec.source} for spec in registry.values()]
    rows.sort(key=lambda row: row["name"])
    if as_json:
        click.echo(json.dumps({"schema": "llmforge.eval-tasks/1", "tasks": rows}, indent=2, sort_keys=True))
        return
    for row in rows:
        click.echo(f"{row['name']:<14} {row['kind']:<16} {row['metric']:<14} {row['description']}")


def _silence_progress_bars() -> None:
    """Turn off the progress bars of transformers and huggingface_hub (GGUF conversion, weight loading)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    else:
        # Read when transformers is imported; cheaper than importing it when every score is cached.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


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
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the JSON report to this file.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
@click.option("--no-cache", is_flag=True, help="Recompute every score; neither read nor write cached scores.")
@click.option("--list-tasks", is_flag=True, help="List the available tasks and exit.")
@click.pass_context
def eval_command(ctx, models, target, general, baseline, limit, seed, batch_size, task_files, data_dir, dtype,
                 as_json, output, quiet, no_cache, list_tasks):
    """Evaluate models on target and general tasks and report scores, standard errors and deltas.

    The target score (plasticity) is the mean over --target tasks, and the general score (stability)
    is the mean over --general tasks. With --baseline, every score also gets its delta against the
    baseline model. Scores are cached per model, task and settings, so a repeated run returns at once
    without loading the model.

    \b
    forge eval --model smollm2-135m --target arith --general facts
    forge eval --model ./adapter --baseline smollm2-135m --target arith --general facts -o report.json
    forge eval --list-tasks

    The subcommands below run diagnostics instead of scoring; `forge eval COMMAND --help` describes each.
    """
    from llmforge.checkpoint import write_json
    from llmforge_eval.evaluate import evaluate
    from llmforge_eval.report import format_table

    if ctx.invoked_subcommand is not None:
        return
    if list_tasks:
        _print_task_list(task_files, as_json)
        return
    if not models:
        raise click.UsageError("Missing option '--model' (or use --list-tasks).")

    if quiet:
        _silence_progress_bars()
    else:
        logging.basicConfig(level=logging.INFO, format="forge eval: %(message)s")
    report = evaluate(models, target=_split(target), general=_split(general), baseline=baseline, limit=limit,
                      batch_size=batch_size, task_files=task_files, data_dir=data_dir, dtype=dtype, seed=seed,
                      use_cache=not no_cache, progress=not quiet)

    if output:
        write_json(output, report)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        click.echo(format_table(report))


# Diagnostics subcommands, each a thin click layer in its own module.
