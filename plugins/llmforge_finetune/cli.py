"""The `forge finetune` command: parse options, run `run_finetune`, print the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmforge.cli import parse_columns, partial_run_hint, set_resume_hint, unescape_template
from llmforge.data import EXAMPLE_FORMATS

from llmforge_finetune.methods import METHODS, MethodSettings, get_method
from llmforge_finetune.run import FinetuneRequest
from llmforge_finetune.train import TrainSettings



def print_methods(as_json: bool) -> None:
    """Print every method with its options and defaults."""
    methods = [spec.describe() for spec in METHODS.values()]
    if as_json:
        click.echo(json.dumps({"schema": "llmforge.finetune.methods/1", "methods": methods}, indent=2, sort_keys=True))
        return
    for method in methods:
        defaults = ", ".join(f"{name}={value}" for name, value in method["defaults"].items()) or "none"
        size = method["size_option"] or "none (fixed count)"
        click.echo(f"{method['name']:8} {method['title']}: {method['summary']}")
        click.echo(f"{'':8} options: {' '.join(method['options']) or 'none'}; defaults: {defaults}; "
                   f"size option: {size}; lr {method['lr']:g}")


def print_plan(plan: dict) -> None:
    """Print a dry run's plan as text on stdout."""
    memory = plan["memory"]
    size = f"{plan['size_option'].replace('_', '-')} {plan['size']}" if plan["size_option"] else "no size option"
    click.echo(f"method: {plan['method']} ({plan['title']}), {size}")
    click.echo(f"trainable parameters: {plan['trainable_parameters']:,} of {plan['total_parameters']:,} "
               f"({100 * plan['trainable_fraction']:.3f}%)")
    if plan["budget"] is not None:
        budget = plan["budget"]
        state = "nearest size" if budget["matched"] else "cannot be matched: the method has no size option"
        click.echo(f"budget: {budget['budget']:,} ({state}; off by {100 * budget['relative_error']:+.2f}%)")
    click.echo(f"memory estimate ({plan['precision']}): {memory['total_gib']:.3f} GiB")
    for name, value in memory["bytes"].items():
        click.echo(f"  {name}: {value / 2**20:.1f} MiB")
    click.echo(f"  ({memory['activations_note']})")


@click.command(name="finetune")
@click.option("--model", "model", help="Base model reference: a built-in name, HF directory or .gguf file (required).")
@click.option("--data", help="Training data: a .jsonl/.json/.csv/.tsv/.txt file, or demo:NAME (not needed for --dry-run).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Directory to write: a PEFT adapter, or an HF model for --method full; plus forge_run.json.")
@click.option("--format", "fmt", type=click.Choice(EXAMPLE_FORMATS), default="auto", show_default=True,
              help="Record format; auto detects it from the field names.")
@click.option("--prompt-template", callback=unescape_template,
              help='Prompt built from record fields, e.g. "Question: {question}\\nAnswer:" (\\n and \\t are unescaped).')
@click.option("--completion-template", callback=unescape_template,
              help='Completion built from record fields, e.g. " {answer}".')
@click.option("--column", "columns", multiple=True, metavar="FIELD=NAME",
              help="Read the format's FIELD from the record field NAME, e.g. prompt=question (repeatable).")
@click.option("--method", type=click.Choice(list(METHODS)), default="lora", show_default=True,
              help="Fine-tuning method; --list-methods shows each one's options and defaults.")
@click.option("--list-methods", is_flag=True, help="List the methods with their options and defaults, and exit.")
@click.option("--rank", type=int, help="Rank r (LoRA family, AdaLoRA target rank, VeRA); default 8, VeRA 256.")
@click.option("--alpha", type=float, help="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) for rslora); default 16 (AdaLoRA 8).")
@click.option("--dropout", type=float, help="Adapter dropout probability; default 0.05 for the LoRA family, else 0.")
@click.option("--block-size", type=int, help="Block size of OFT (default 32), BOFT (8) and MiSS (64).")
@click.option("--target-modules",
              help="Linear modules to adapt: all-linear (default), or comma-separated names such as q_proj,v_proj.")
@click.option("--budget",
              help="Trainable-parameter budget such as 2.4M, 500k or 1e6; chooses --rank or --block-size to match it.")
@click.option("--dry-run", is_flag=True,
              help="Print the method, chosen size, exact trainable count and a memory estimate; train and write nothing.")
@click.option("--steps", type=int, help="Number of optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, help="Number of passes over the data; exclusive with --steps.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, help="Peak learning rate of AdamW (default 2e-4, 5e-5 for --method full).")
@click.option("--warmup-steps", type=int, help="Linear warmup length in steps (default: 5% of the run, at most 100).")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
              help="Learning-rate schedule after warmup.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping threshold (L2 norm).")
@click.option("--max-length", type=int, default=256, show_default=True,
              help="Maximum tokens per example (prompt, completion and EOS); --overlong sets what happens to longer ones.")
@click.option("--overlong", type=click.Choice(["truncate", "reject"]), default="truncate", show_default=True,
              help="Examples longer than --max-length: truncate cuts them (with a warning and counts in forge_run.json); "
                   "reject exits with an error naming the first one.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the adapter init, data order and dropout.")
@click.option("--bf16/--no-bf16", default=True, show_default=True,
              help="Run the model and trainable weights in bf16 with fp32 master weights; --no-bf16 runs fp32.")
@click.option("--packing/--no-packing", default=True, show_default=True,
              help="Pack each micro-batch into one row of real tokens with attention kept inside each example, so "
                   "no padding is computed; --no-packing pads each example to the batch's longest.")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch (default: torch's choice, one per core). Use 1 when other jobs share the CPU.")
@click.option("--limit", type=int, help="Use only the first N records of the data file.")
@click.option("--eval-split", type=float, default=0.0, show_default=True,
              help="Fraction of the examples held out (chosen with --seed) for a held-out loss; 0 turns it off.")
@click.option("--eval-data", help="Held-out data file (same format options as --data); exclusive with --eval-split.")
@click.option("--eval-every", type=int,
              help="Compute the held-out loss every N steps (always after the last step when there is held-out data).")
@click.option("--save-every", type=int,
              help="Save a checkpoint every N steps: the adapter (or, for --method full, the trainable weights as "
                   "safetensors) ends up in OUTPUT/checkpoints/step-NNNNNN/.")
@click.option("--resume", is_flag=True,
              help="Continue an unfinished run from its last checkpoint in OUTPUT.partial/, the in-progress directory "
                   "beside OUTPUT. It contains checkpoints/step-NNNNNN/ and the newest state-NNNNNN/ with trainable "
                   "weights, AdamW state, scheduler step, torch and Python random states, data order position and "
                   "the run settings; other settings than the saved ones are rejected (after a NaN stop, --lr and "
                   "--max-grad-norm may change). A finished run removes OUTPUT.partial/.")
@click.option("--merge", is_flag=True,
              help="Also write the merged model (base weights plus the adapter's update) as an HF model directory "
                   "in OUTPUT/merged/.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary (or the dry-run plan, or the method list) as one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary on stderr.")
def finetune_command(model, data, output, fmt, prompt_template, completion_template, columns, method, list_methods,
                     rank, alpha, dropout, block_size, target_modules, budget, dry_run, steps, epochs, batch_size,
                     grad_accum, lr, warmup_steps, schedule, max_grad_norm, max_length, overlong, seed, bf16, packing,
                     threads, limit, eval_split, eval_data, eval_every, save_every, resume, merge, overwrite, as_json,
                     quiet):
    """Fine-tune a model with a PEFT method (or fully) on a data file and write the result.

    The loss covers completion tokens only (all tokens for plain text). PEFT methods write a
    PEFT adapter directory (adapter_config.json, adapter_model.safetensors); --method full
    writes a Hugging Face model directory. Both contain forge_run.json, the run record with the
    command, versions, input digests, method options, hyper-parameters, loss curve, held-out
    loss curve and throughput. With --save-every, the run keeps its in-progress state in
    OUTPUT.partial/ so that --resume can continue it after a crash or kill. Other forge commands accept the directory as a model reference. The run's task
    vector (fine-tuned minus base weights) is stored in the cache.

    Example: forge finetune --model smollm2-135m --data demo:arith/train.jsonl -o arith-oft --method oft --budget 2.4M
    """
    from llmforge_finetune.run import run_finetune

    if list_methods:
        print_methods(as_json)
        return
    if model is None:
        raise click.UsageError("Missing option '--model'.")
    if not dry_run and (data is None or output is None):
        raise click.UsageError("Missing option '--data' or '-o/--output' (both are required unless --dry-run is given).")
    set_resume_hint(None if dry_run else partial_run_hint(output, saves=save_every is not None))
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    from llmforge_finetune.budget import parse_budget

    spec = get_method(method)
    request = FinetuneRequest(
        model=model, data=data, output=output, fmt=fmt, columns=parse_columns(columns),
        prompt_template=prompt_template, completion_template=completion_template,
        method=MethodSettings(method=method, rank=rank, alpha=alpha, dropout=dropout, block_size=block_size,
                              target_modules=target_modules),
        train=TrainSettings(steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                            lr=spec.lr if lr is None else lr, warmup_steps=warmup_steps, schedule=schedule,
                            max_grad_norm=max_grad_norm, seed=seed, precision="bf16" if bf16 else "fp32",
                            packing=packing),
        budget=None if budget is None else parse_budget(budget), max_length=max_length, overlong=overlong, limit=limit,
        overwrite=overwrite, progress=not quiet, dry_run=dry_run, eval_split=eval_split, eval_data=eval_data,
        eval_every=eval_every, save_every=save_every, resume=resume, merge=merge,
    )
    summary = run_finetune(request, command=["forge", *sys.argv[1:]] if sys.argv else None)
    if summary is None:
        return  # a rank other than 0 of a data-parallel run: rank 0 prints the summary

    if dry_run:
        if as_json:
            click.echo(json.dumps({"schema": "llmforge.finetune.plan/1", **summary}, indent=2, sort_keys=True))
        else:
            print_plan(summary)
        return
    if not quiet:
        loss = summary["final_train_loss"]
        click.echo(f"finetune: {summary['method']}, {summary['steps']} steps, {summary['tokens']} tokens in "
                   f"{summary['seconds']:.1f} s ({summary['tokens_per_second']:.0f} tokens/s), "
                   f"{summary['trainable_parameters']} trainable parameters, "
                   f"loss {loss:.4f} (mean of the last {summary['final_train_loss_steps']} steps)"
                   + ("" if summary["final_eval_loss"] is None else f", held-out loss {summary['final_eval_loss']:.4f}")
                   + f"; output written to {summary['output']}", err=True)
    if as_json:
        click.echo(json.dumps({"schema": "llmforge.finetune.summary/1", **summary}, indent=2, sort_keys=True))
