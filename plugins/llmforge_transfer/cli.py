"""The `forge transfer` group: a thin click layer over transfer.py and reparam.py."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from llmforge.cli import print_json, set_resume_hint, silence_progress_bars


@click.group(name="transfer", invoke_without_command=True)
@click.option("--source-base", metavar="REF", help="Base model the task vector was made on (built-in name, HF dir or .gguf).")
@click.option("--source-tuned", metavar="REF", help="Fine-tuned source model; the vector is it minus --source-base.")
@click.option("--vector", type=click.Path(dir_okay=False, exists=True),
              help="Task-vector file from `forge edit diff` against --source-base (instead of --source-tuned).")
@click.option("--target-base", metavar="REF", help="New base model to carry the vector to.")
@click.option("--calib", metavar="DATA",
              help="Calibration data file, in any format forge finetune reads; required unless --align naive.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="HF model directory to write, with transported_vector.safetensors and forge_run.json.")
@click.option("--align", type=click.Choice(["bico", "activations", "naive"]), default="bico", show_default=True,
              help="How the maps are estimated: input activations with output gradients (bico), activations on both "
                   "sides, or identity maps (naive, same shapes only).")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Factor applied to the transported vector.")
@click.option("--alpha-grid", metavar="A,B,...",
              help="Choose alpha from these values (0 is always scored) by the lowest loss on --alpha-data.")
@click.option("--alpha-data", metavar="DATA",
              help="Held-out data for --alpha-grid, in any format forge finetune reads; keep it apart from --calib.")
@click.option("--calib-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Calibration tokens to use (whole examples, up to this count).")
@click.option("--max-length", type=click.IntRange(min=2), default=256, show_default=True,
              help="Maximum tokens per calibration example; longer ones are truncated.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Calibration examples per forward-backward pass.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Dtype of both models during calibration; the sums are float64 either way.")
@click.option("--layer-map", default="proportional", show_default=True, metavar="proportional|FILE",
              help="Which source layer each target layer takes its update from: target layer j <- source layer "
                   "round(j (Ls-1)/(Lt-1)), or a JSON file of {\"TARGET_LAYER\": SOURCE_LAYER}.")
@click.option("--whiten", is_flag=True,
              help="Estimate each map on whitened coordinates, so that low-variance directions count as much as "
                   "high-variance ones; also sums auto-covariances, which triples the calibration memory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
@click.pass_context
def transfer_group(ctx, source_base, source_tuned, vector, target_base, calib, output, align, alpha, alpha_grid,
                   alpha_data, calib_tokens, max_length, batch_size, dtype, layer_map, whiten, overwrite, as_json,
                   quiet) -> None:
    """Move a task vector from one base model to another without training.

    One forward-backward pass of both base models on the same calibration batches gives, per
    linear layer, orthogonal maps of its input and output coordinates. The source update tau_A
    becomes Q_out tau_A Q_in^T and is added to the target, scaled by --alpha. The calibration
    statistics are cached by the model and data digests.

    \b
    forge transfer --source-base old --source-tuned old-sst2 --target-base new --calib calib.jsonl -o new-sst2
    forge transfer make-test-target --model smollm2-135m -o rotated --permute-mlp --permute-heads
    """
    from llmforge_transfer.alpha import parse_alpha_grid
    from llmforge_transfer.calibration import CalibrationSettings
    from llmforge_transfer.transfer import TransferRequest, run_transfer

    if ctx.invoked_subcommand is not None:
        return
    # naive adds the vector unchanged, so only the aligned methods read calibration data.
    needs_calib = align != "naive"
    missing = [flag for flag, value in (("--source-base", source_base), ("--target-base", target_base),
                                        ("--calib", calib if needs_calib else ""), ("--output", output))
               if value is None]
    if missing:
        raise click.UsageError(f"Missing option '{missing[0]}'.")
    set_resume_hint("Rerun the same command; calibration statistics computed before the interrupt come from the "
                    "cache, and the rest starts over.")
    if quiet:
        silence_progress_bars()
    else:
        logging.basicConfig(level=logging.INFO, format="forge transfer: %(message)s")
    settings = CalibrationSettings(calib_tokens=calib_tokens, max_length=max_length, batch_size=batch_size,
                                   dtype=dtype, layer_map=layer_map, whiten=whiten)
    request = TransferRequest(source_base=source_base, target_base=target_base, calib=calib, output=output,
                              source_tuned=source_tuned, vector=vector, align=align, alpha=alpha,
                              alpha_grid=parse_alpha_grid(alpha_grid) if alpha_grid else None, alpha_data=alpha_data,
                              settings=settings, overwrite=overwrite)
    record = run_transfer(request, command=["forge", *sys.argv[1:]] if sys.argv else None)
    if as_json:
        print_json(record)
        return
    residuals = [report["input_residual"] for report in record["layers"].values()]
    if residuals:
        click.echo(f"aligned {len(residuals)} linear layers with {align}; largest input residual {max(residuals):.3g}")
    if "alpha_search" in record:
        click.echo(f"alpha {record['alpha']} chosen by held-out loss: " + ", ".join(
            f"{alpha} {loss:.4f}" for alpha, loss in record["alpha_search"]["losses"].items()))
    click.echo(f"output: {output}")


@transfer_group.command(name="make-test-target")
@click.option("--model", required=True, help="Source model reference: a built-in name, HF directory or .gguf file.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="HF model directory to write, with forge_run.json.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the rotation and the permutations.")
@click.option("--permute-mlp", is_flag=True, help="Also permute the MLP units of every layer.")
@click.option("--permute-heads", is_flag=True,
              help="Also permute the attention heads of every layer, keeping grouped-query groups together.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars on stderr.")
def make_test_target_command(model, output, seed, permute_mlp, permute_heads, overwrite, as_json, quiet):
    """Write an exact re-parameterisation of a Llama-style model: same logits, other coordinates.

    RMSNorm gains are folded into the linear layers that follow them, the residual stream is
    rotated by a seeded random orthogonal matrix, and MLP units and attention heads are optionally
    permuted. The logits of a few prompts are compared with the source's before anything is written.

    Example: forge transfer make-test-target --model smollm2-135m -o rotated --permute-mlp --permute-heads
    """
    from llmforge_transfer.reparam import make_test_target

    set_resume_hint("Rerun the same command; it starts over.")
    if quiet:
        silence_progress_bars()
    record = make_test_target(model, output, seed=seed, permute_mlp=permute_mlp, permute_heads=permute_heads,
                              overwrite=overwrite)
    if as_json:
        print_json(record)
    else:
        click.echo(f"max logit difference {record['max_relative_logit_difference']:.3g} (relative to the largest logit)")
        click.echo(f"output: {output}")
