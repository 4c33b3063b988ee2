"""`forge edit sae train` and `forge edit sae info`: TopK SAEs per layer in the SAELens layout.

`train_saes` and `describe_saes` are the plain functions behind the two commands.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from llmforge.cli import parse_columns, print_json, set_resume_hint, silence_progress_bars

RECORD_SCHEMA = "llmforge.edit.sae/1"
# Fewer optimizer steps than this per layer draw a warning; the run measured in docs/edit.md used 150.
FEW_STEPS = 50
FORMATS = ["auto", "text", "prompt-completion", "instruction", "chat"]


@dataclass
class SAETrainRequest:
    """Everything one `forge edit sae train` run needs; the options map onto these fields."""

    model: str
    data: str
    output: Path
    layers: str | None = None
    tokens: int = 200_000
    max_length: int = 256
    skip_bos: bool = True
    fmt: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True


def _warn_few_steps(settings, tokens: int) -> None:
    """Warn when the settings give fewer than FEW_STEPS optimizer steps per layer on `tokens` activations."""
    from llmforge_edit.sae import HELD_OUT_FRACTION

    steps = settings.total_steps(tokens - max(1, int(tokens * HELD_OUT_FRACTION)))
    if steps < FEW_STEPS:
        logging.getLogger(__name__).warning(
            "%d tokens give only %d Adam steps per layer at --batch-size %d and --epochs %g; the SAE will be far "
            "from converged. Raise --tokens or --epochs, lower --batch-size, or set --steps", tokens, steps,
            settings.batch_size, settings.epochs)


def train_saes(request: SAETrainRequest, settings, command: list[str] | None = None) -> dict[str, Any]:
    """Collect (or reuse) the activations, train one SAE per layer, write them atomically; return the summary."""
    from llmforge.checkpoint import RUN_RECORD_NAME, atomic_directory, check_output_directory, run_record, write_json
    from llmforge.errors import ForgeError
    from llmforge.models import load_tokenizer, stored_reference

    from llmforge_edit.activations import ActivationRequest, TextSource, cached_activations, hook_name, model_shape, parse_layers
    from llmforge_edit.sae import MIN_TRAINING_TOKENS, train_sae
    from llmforge_edit.saelens import saelens_config, write_sae

    settings.check()
    if request.tokens < MIN_TRAINING_TOKENS:
        raise ForgeError(f"invalid --tokens {request.tokens}; SAE training needs at least {MIN_TRAINING_TOKENS} "
                         "tokens, so that the held-out share measures the explained variance")
    if request.max_length < 2:
        raise ForgeError(f"invalid --max-length {request.max_length}; it must be at least 2")
    check_output_directory(request.output, overwrite=request.overwrite)
    layers = parse_layers(request.layers, model_shape(request.model).num_layers)
    source = TextSource(request.data, request.fmt, request.columns)
    activation_request = ActivationRequest(request.model, source, tokens=request.tokens, max_length=request.max_length,
                                           skip_bos=request.skip_bos, dtype=settings.dtype, progress=request.progress)
    activations, description = cached_activations(activation_request, layers)
    _warn_few_steps(settings, description["tokens"])

    results = {}
    for layer in layers:
        bar = _bar(f"layer {layer}", settings.total_steps(len(activations[layer])), request.progress)
        results[layer] = train_sae(activations[layer], settings, progress=bar.update)
        bar.close()

    tokenizer = load_tokenizer(request.model)
    prepend_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    rows = [_layer_row(layer, results[layer]) for layer in layers]
    with atomic_directory(request.output, overwrite=request.overwrite) as directory:
        for layer in layers:
            config = saelens_config(results[layer].sae, layer=layer, model_name=stored_reference(request.model),
                                    context_size=request.max_length, prepend_bos=prepend_bos,
                                    dataset_path=request.data)
            write_sae(directory / hook_name(layer), results[layer].sae, config)
        fields = {"schema": RECORD_SCHEMA, "model": stored_reference(request.model), "data": request.data,
                  "activations": {**description, "max_length": request.max_length, "skip_bos": request.skip_bos,
                                  "token_budget": request.tokens, "hook": "blocks.L.hook_resid_post"},
                  "settings": asdict(settings), "seed": settings.seed, "layers": rows}
        write_json(directory / RUN_RECORD_NAME, run_record(command, **fields))
    return {"output": str(request.output), "activations": fields["activations"], "settings": fields["settings"],
            "layers": rows}


def _layer_row(layer: int, result) -> dict[str, Any]:
    from llmforge_edit.activations import hook_name

    return {"layer": layer, "hook_name": hook_name(layer), "path": hook_name(layer), "d_in": result.sae.d_in,
            "d_sae": result.sae.d_sae, "k": result.sae.k, "explained_variance": round(result.explained_variance, 6),
            "dead_fraction": round(result.dead_fraction, 6), "final_loss": round(result.final_loss, 6),
            "steps": result.steps, "train_tokens": result.train_tokens, "held_out_tokens": result.held_out_tokens,
            "resampled_features": result.resampled, "seconds": round(result.seconds, 3)}


def _bar(description: str, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", disable=not enabled, leave=False)


def describe_saes(path: Path, model: str | None = None) -> dict[str, Any]:
    """Read an SAE directory (ours or a published SAELens one) and return each SAE's layer, sizes and quality.

    With `model`, ForgeError names the first SAE whose width or layer does not fit that model.
    """
    import json

    from llmforge.checkpoint import RUN_RECORD_NAME

    from llmforge_edit.activations import model_shape
    from llmforge_edit.saelens import read_sae_set

    stored = read_sae_set(path, model_shape(model) if model else None)
    quality: dict[str, dict] = {}
    record_path = path / RUN_RECORD_NAME
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        quality = {str(path / row["path"]): row for row in record.get("layers", [])}
    saes = []
    for item in stored:
        recorded = quality.get(item.directory, {})
        saes.append({"layer": item.layer, "hook_name": item.hook_name, "path": item.directory,
                     "architecture": item.sae.architecture, "d_in": item.sae.d_in, "d_sae": item.sae.d_sae,
                     "k": item.sae.k, "explained_variance": recorded.get("explained_variance"),
                     "dead_fraction": recorded.get("dead_fraction")})
    return {"schema": "llmforge.edit.sae-info/1", "directory": str(path), "saes": saes}


# The commands


@click.group(name="sae")
def sae_group() -> None:
    """Train and inspect sparse autoencoders on the residual stream, stored in the SAELens layout."""


@sae_group.command(name="train")
@click.option("--model", required=True, help="Model reference: a built-in name, HF directory, .gguf file or adapter.")
@click.option("--data", required=True, help="Text to collect activations on: a .jsonl/.json/.csv/.tsv/.txt file or demo:NAME.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Directory to write: one blocks.L.hook_resid_post/ SAELens directory per layer, plus forge_run.json.")
@click.option("--layers", default="all", show_default=True, help="Decoder layers: all, 0,4,8 or ranges such as 2-5.")
@click.option("--tokens", type=int, default=200_000, show_default=True,
              help="Token budget: activations collected per layer (5% are held out for explained variance).")
@click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per sequence; a longer text is split into consecutive windows of this length.")
@click.option("--skip-bos/--keep-bos", default=True, show_default=True,
              help="Leave out the activation of a leading BOS token, whose norm is far above the others.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Record format (as in forge finetune); each record's prompt and completion form one text.")
@click.option("--column", "columns", multiple=True, metavar="FIELD=NAME",
              help="Read the format's FIELD from the record field NAME (repeatable).")
@click.option("--expansion", type=int, default=8, show_default=True, help="Dictionary size as a multiple of the hidden size.")
@click.option("--k", type=int, default=32, show_default=True, help="Features active per token (TopK).")
@click.option("--steps", type=int, help="Adam steps per layer; overrides --epochs.")
@click.option("--epochs", type=float, default=2.0, show_default=True,
              help="Passes over the training tokens per layer (2 reach an explained variance near 0.9 on 200k tokens).")
@click.option("--batch-size", type=int, default=4096, show_default=True, help="Tokens per Adam step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--dead-tokens", type=int, default=100_000, show_default=True,
              help="A feature that has not fired for this many training tokens is dead and gets resampled.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split, batch order and initialisation.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Dtype of the model forward and of the SAE encoder product; SAE weights and Adam stay float32.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: one per core).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory written by forge.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_command(model, data, output, layers, tokens, max_length, skip_bos, fmt, columns, expansion, k, steps, epochs,
                  batch_size, lr, dead_tokens, seed, dtype, threads, overwrite, as_json, quiet):
    """Train one TopK SAE per decoder layer on residual-stream activations (blocks.L.hook_resid_post).

    The model runs once over --data and the activations of all requested layers are cached
    (bfloat16), so a second run with other SAE options reuses them. Prints each layer's
    explained variance on held-out tokens and the fraction of dead features.

    Example: forge edit sae train --model smollm2-135m --data text.txt --layers 0-5 -o saes
    """
    from llmforge_edit.sae import TrainSettings

    set_resume_hint("Rerun the same command: it reuses the activations if their collection had finished (they are "
                    "cached), and trains the SAEs again.")
    if quiet:
        silence_progress_bars()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    settings = TrainSettings(expansion=expansion, k=k, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
                             seed=seed, dtype=dtype, dead_tokens=dead_tokens)
    request = SAETrainRequest(model=model, data=data, output=output, layers=layers, tokens=tokens,
                              max_length=max_length, skip_bos=skip_bos, fmt=fmt, columns=parse_columns(columns),
                              overwrite=overwrite, progress=not quiet)
    summary = train_saes(request, settings, command=["forge", *sys.argv[1:]] if sys.argv else None)
    if as_json:
        print_json({"schema": "llmforge.edit.sae-summary/1", **summary})
        return
    for row in summary["layers"]:
        click.echo(f"layer {row['layer']:>3}  d_sae {row['d_sae']}  k {row['k']}  explained variance "
                   f"{row['explained_variance']:.4f}  dead {row['dead_fraction']:.4f}  {row['seconds']:.1f} s")
    cached = summary["activations"]["layers_from_cache"]
    click.echo(f"activations: {summary['activations']['tokens']} tokens per layer, {cached} of "
               f"{len(summary['layers'])} layers from the cache")
    click.echo(f"output: {summary['output']}")


@sae_group.command(name="info")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--model", help="Check that every SAE fits this model: d_in equals its hidden size and the layer exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def info_command(directory, model, as_json):
    """Print each SAE's layer, hook, sizes and recorded quality (explained variance, dead fraction).

    DIRECTORY is one SAELens directory (cfg.json + sae_weights.safetensors) or a directory of them.
    """
    document = describe_saes(directory, model)
    if as_json:
        print_json(document)
        return
    for row in document["saes"]:
        layer = "-" if row["layer"] is None else row["layer"]
        quality = "-" if row["explained_variance"] is None else f"{row['explained_variance']:.4f}"
        dead = "-" if row["dead_fraction"] is None else f"{row['dead_fraction']:.4f}"
        click.echo(f"layer {layer:>3}  {row['hook_name'] or '-'}  {row['architecture']}  d_in {row['d_in']}  "
                   f"d_sae {row['d_sae']}  k {row['k'] if row['k'] is not None else '-'}  "
                   f"explained variance {quality}  dead {dead}")
