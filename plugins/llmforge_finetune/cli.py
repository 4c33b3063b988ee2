"""The `forge finetune` command: parse options, run `run_finetune`, print the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmforge.errors import ForgeError

from llmforge_finetune.lora import LoraSettings
from llmforge_finetune.run import FinetuneRequest
from llmforge_finetune.train import TrainSettings

FORMATS = ["auto", "text", "prompt-completion", "instruction", "chat"]


def parse_columns(values: tuple[str, ...]) -> dict[str, str]:
    """Parse repeated FIELD=NAME options into {FIELD: NAME}."""
    columns = {}
    for value in values:
        target, separator, source = value.partition("=")
        if not separator or not target.strip() or not source.strip():
            raise ForgeError(f"invalid --column {value!r}; use FIELD=NAME, for example prompt=question")
        columns[target.strip()] = source.strip()
    return columns


def unescape_template(ctx, param, value: str | None) -> str | None:
    """Turn the escapes \\n and \\t typed in a shell into a newline and a tab."""
    if value is None:
        return None
    return value.replace("\\n", "\n").replace("\\t", "\t")


@click.command(name="finetune")
@click.option("--model", "model", required=True, help="Base model reference: a built-in name, HF directory or .gguf file.")
@click.option("--data", required=True, help="Training data: a .jsonl/.json/.csv/.tsv/.txt file, or demo:NAME.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Adapter directory to write (PEFT layout plus forge_run.json).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Record format; auto detects it from the field names.")
@click.option("--prompt-template", callback=unescape_template,
              help='Prompt built from record fields, e.g. "Question: {question}\\nAnswer:" (\\n and \\t are unescaped).')
@click.option("--completion-template", callback=unescape_template,
              help='Completion built from record fields, e.g. " {answer}".')
@click.option("--column", "columns", multiple=True, metavar="FIELD=NAME",
              help="Read the format's FIELD from the record field NAME, e.g. prompt=question (repeatable).")
@click.option("--method", type=click.Choice(["lora"]), default="lora", show_default=True, help="PEFT method (only LoRA so far).")
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha; the update is scaled by alpha/r.")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="Dropout on the LoRA input.")
@click.option("--target-modules", default="all-linear", show_default=True,
              help="Linear modules to adapt: all-linear, or comma-separated names such as q_proj,v_proj.")
@click.option("--steps", type=int, help="Number of optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, help="Number of passes over the data; exclusive with --steps.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate of AdamW.")
@click.option("--warmup-steps", type=int, help="Linear warmup length in steps (default: 5% of the run, at most 100).")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
              help="Learning-rate schedule after warmup.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping threshold (L2 norm).")
@click.option("--max-length", type=int, default=256, show_default=True,
              help="Maximum tokens per example; longer examples are truncated and counted.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the LoRA init, data order and dropout.")
@click.option("--bf16/--no-bf16", default=True, show_default=True,
              help="Run the frozen base and LoRA factors in bf16 with fp32 master weights; --no-bf16 runs fp32.")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch (default: torch's choice, one per core). Use 1 when other jobs share the CPU.")
@click.option("--limit", type=int, help="Use only the first N records of the data file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary on stderr.")
def finetune_command(model, data, output, fmt, prompt_template, completion_template, columns, method, rank, alpha,
                     dropout, target_modules, steps, epochs, batch_size, grad_accum, lr, warmup_steps, schedule,
                     max_grad_norm, max_length, seed, bf16, threads, limit, overwrite, as_json, quiet):
    """Fine-tune a model with LoRA on a data file and write a PEFT adapter directory.

    The loss covers completion tokens only (all tokens for plain text). The output directory
    contains adapter_config.json, adapter_model.safetensors and forge_run.json, the run record
    with the command, versions, input digests, hyper-parameters, loss curve and throughput.
    Other forge commands accept the directory as a model reference. The run's task vector is
    stored in the cache.

    Example: forge finetune --model smollm2-135m --data demo:arith/train.jsonl -o arith-lora --steps 300
    """
    from llmforge_finetune.run import run_finetune

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    request = FinetuneRequest(
        model=model, data=data, output=output, fmt=fmt, columns=parse_columns(columns),
        prompt_template=prompt_template, completion_template=completion_template,
        lora=LoraSettings(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules),
        train=TrainSettings(steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                            warmup_steps=warmup_steps, schedule=schedule, max_grad_norm=max_grad_norm, seed=seed,
                            precision="bf16" if bf16 else "fp32"),
        max_length=max_length, limit=limit, overwrite=overwrite, progress=not quiet,
    )
    summary = run_finetune(request, command=["forge", *sys.argv[1:]] if sys.argv else None)

    if not quiet:
        loss = summary["final_train_loss"]
        click.echo(f"finetune: {summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']:.1f} s "
                   f"({summary['tokens_per_second']:.0f} tokens/s), {summary['trainable_parameters']} trainable "
                   f"parameters, final loss {loss:.4f}; adapter written to {summary['output']}", err=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
