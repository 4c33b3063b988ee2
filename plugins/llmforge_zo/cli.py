"""The `forge zo` command: parse options into a ZORequest, run it, print the summary."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llmforge.cli import parse_columns, print_json, silence_progress_bars, unescape_template
from llmforge.data import EXAMPLE_FORMATS

from llmforge_zo.settings import METHODS



def _print_summary(summary: dict) -> None:
    settings = summary["settings"]
    click.echo(f"zo: {settings['method']}, {summary['steps']} steps of batch {settings['batch_size']} "
               f"x {2 * settings['queries']} states, {summary['seconds_per_step']:.3f} s/step, "
               f"final probe loss {summary['final_loss']:.4f}")
    for label, evaluation in (("zero-shot", summary["zero_shot"]), ("final", summary["final"])):
        if evaluation:
            accuracy = f"accuracy {evaluation['accuracy']:.4f}, " if "accuracy" in evaluation else ""
            click.echo(f"{label}: {accuracy}dev loss {evaluation['loss']:.4f} ({evaluation['examples']} examples)")
    click.echo(f"output: {summary['output']}")


@click.command(name="zo")
@click.option("--model", required=True, help="Base model reference: a built-in name, HF directory or .gguf file.")
@click.option("--data", required=True, help="Training data: a .jsonl/.json/.csv/.tsv/.txt file, or demo:NAME.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Directory to write: a PEFT adapter (mezo-lora) or an HF model, plus forge_run.json.")
@click.option("--method", type=click.Choice(METHODS), default="lozo", show_default=True,
              help="mezo: full-parameter SPSA; mezo-lora: SPSA on LoRA factors; lozo: low-rank U V^T "
                   "perturbations of full weights; lozo-m: lozo with momentum.")
@click.option("--template", callback=unescape_template,
              help='Classification prompt filled from record fields, ending in the cue, e.g. "{sentence} It was".')
@click.option("--verbalizers", help="Classification labels and their words, e.g. 0=terrible,1=great; "
                                    "without it the objective is the LM loss on completions.")
@click.option("--label-field", default="label", show_default=True, help="Record field holding the label.")
@click.option("--single-token", type=click.Choice(["auto", "require"]), default="auto", show_default=True,
              help="auto scores multi-token words one row per option; require rejects them.")
@click.option("--format", "fmt", type=click.Choice(EXAMPLE_FORMATS), default="auto", show_default=True,
              help="Record format of the LM objective (as in forge finetune).")
@click.option("--prompt-template", callback=unescape_template, help="LM objective: prompt built from record fields.")
@click.option("--completion-template", callback=unescape_template,
              help="LM objective: completion built from record fields.")
@click.option("--column", "columns", multiple=True, metavar="FIELD=NAME",
              help="LM objective: read the format's FIELD from the record field NAME (repeatable).")
@click.option("--steps", type=int, default=1000, show_default=True, help="Number of zeroth-order steps.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Examples per step.")
@click.option("--queries", type=int, default=1, show_default=True,
              help="Directions q per step; the 2q states are scored in one forward and the estimates averaged.")
@click.option("--eps", type=float, help="Perturbation scale (default 1e-3; mezo-lora 1e-2).")
@click.option("--lr", type=float, help="Constant learning rate (default: mezo-lora 1e-3, lozo and lozo-m 1e-5, mezo 1e-6).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True,
              help="Decoupled weight decay on the trained weights (lozo: forces a dense update every step).")
@click.option("--rank", type=int, help="LoRA rank (mezo-lora, default 8), rank of U V^T (lozo, default 2), or "
                                       "factor rank of --perturbation factorised (default 64).")
@click.option("--alpha", type=float, help="LoRA alpha of mezo-lora; the update is scaled by alpha/rank (default 2 x rank).")
@click.option("--nu", type=int, default=50, show_default=True, help="lozo: steps between redraws of V.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="lozo-m: momentum coefficient.")
@click.option("--perturbation", type=click.Choice(["exact", "factorised"]), default="exact", show_default=True,
              help="mezo only. exact: dense Gaussian noise written into the weights, two forwards per query; "
                   "factorised: a rank --rank stand-in U V^T / sqrt(rank) scored as adapters in one forward.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]),
              help="Scoring dtype of the frozen base; the trained state is always fp32. [default: bf16]")
@click.option("--target-modules", default="all-linear", show_default=True,
              help="Linear modules to train: all-linear or names such as q_proj,v_proj.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order, noise and LoRA init.")
@click.option("--max-length", type=int, default=256, show_default=True, help="Maximum tokens per example.")
@click.option("--limit", type=int, help="Use only the first N training records.")
@click.option("--eval-data", help="Dev set in the training data's format: accuracy (classification) or loss.")
@click.option("--eval-limit", type=int, help="Use only the first N dev records.")
@click.option("--eval-every", type=int, help="Evaluate on --eval-data every N steps (always at step 0 and at the end).")
@click.option("--eval-batch-size", type=int, default=32, show_default=True, help="Dev examples per forward.")
@click.option("--save-every", type=int, help="Save the trainable state to OUTPUT.partial/ every N steps.")
@click.option("--resume", is_flag=True, help="Continue an unfinished run from OUTPUT.partial/ with the same settings.")
@click.option("--backend", default="torch", show_default=True,
              help="Scoring backend; plugins add more through the forge_zo_backends hook.")
@click.option("--packing/--no-packing", default=True, show_default=True,
              help="Pack each batch's examples into dense rows so no padding is computed.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: one per core).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def zo_command(model, data, output, method, template, verbalizers, label_field, single_token, fmt, prompt_template,
               completion_template, columns, steps, batch_size, queries, eps, lr, weight_decay, rank, alpha, nu,
               momentum, perturbation, dtype, target_modules, seed, max_length, limit, eval_data, eval_limit,
               eval_every, eval_batch_size, save_every, resume, backend, packing, threads, overwrite, as_json, quiet):
    """Fine-tune a model without backpropagation: zeroth-order (MeZO, LoZO) steps scored as batched inference.

    Each step draws q random directions and scores the 2q nearby parameter states on one batch.
    Every state is an adapter on the frozen base, so one batched forward scores them all. The
    loss difference of each +/- pair is a projected gradient, and the trained weights move along
    the directions by it. Classification by verbalizers reads all options from one forward per prompt.

    Writes a PEFT adapter (mezo-lora) or an HF model (mezo, lozo, lozo-m) with forge_run.json,
    and caches the task vector.

    Example (SST-2): forge zo --model smollm2-135m --method lozo --data sst2/train.tsv
    --template "{sentence} It was" --verbalizers 0=terrible,1=great --eval-data sst2/dev.tsv -o sst2-lozo
    """
    from llmforge_zo.run import ZORequest, run_zo
    from llmforge_zo.settings import ZOSettings

    if quiet:
        silence_progress_bars()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    settings = ZOSettings(method=method, eps=eps, lr=lr, weight_decay=weight_decay, steps=steps,
                          batch_size=batch_size, queries=queries, rank=rank, alpha=alpha, nu=nu, momentum=momentum,
                          perturbation=perturbation, dtype=dtype, target_modules=target_modules, seed=seed)
    request = ZORequest(model=model, data=data, output=output, settings=settings, template=template,
                        verbalizers=verbalizers, label_field=label_field, single_token=single_token, fmt=fmt,
                        columns=parse_columns(columns), prompt_template=prompt_template,
                        completion_template=completion_template, max_length=max_length, limit=limit,
                        eval_data=eval_data, eval_limit=eval_limit, eval_every=eval_every,
                        eval_batch_size=eval_batch_size, save_every=save_every, resume=resume, overwrite=overwrite,
                        backend=backend, packing=packing, progress=not quiet)
    summary = run_zo(request, command=["forge", *sys.argv[1:]] if sys.argv else None)
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)
