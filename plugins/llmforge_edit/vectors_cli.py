"""The `forge edit diff` and `forge edit merge` commands: parse options, call vectors.py and merge.py, print the result."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llmforge.cli import print_json, set_resume_hint, silence_progress_bars

# How many tensors the text summary of a low-rank diff lists, lowest retained energy first.
LOWEST_ENERGY_SHOWN = 5


def _print_diff_summary(summary: dict) -> None:
    layout = summary["layout"] if summary["rank"] is None else f"{summary['layout']}, rank {summary['rank']}"
    click.echo(f"task vector: {summary['tensors']} tensors ({layout}), {summary['parameters']:,} parameters "
               f"stored as {summary['stored_values']:,} values")
    if "retained_energy" in summary:
        click.echo(f"retained energy ||tau_r||^2 / ||tau||^2: {summary['retained_energy']:.4f} overall")
        ratios = sorted(summary["retained_energy_per_tensor"].items(), key=lambda item: item[1])
        for name, ratio in ratios[:LOWEST_ENERGY_SHOWN]:
            click.echo(f"  {ratio:.4f}  {name}")
    click.echo(f"output: {summary['output']}")


@click.command(name="diff")
@click.option("--base", required=True, help="Base model reference: a built-in name, HF directory or .gguf file.")
@click.option("--tuned", required=True,
              help="Fine-tuned model reference: an HF directory, .gguf file, built-in name or PEFT adapter directory.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Task vector file to write (.safetensors).")
@click.option("--rank", type=click.IntRange(min=1),
              help="Store each 2-D update as its rank-R truncated SVD; 1-D updates stay dense. [default: dense]")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary, with per-tensor energy, as one JSON document.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def diff_command(base, tuned, output, rank, overwrite, as_json, quiet):
    """Write the task vector tuned minus base as a safetensors file.

    For a PEFT adapter the vector is the merged model minus its base, for the weights the adapter
    changes. For two whole models it covers every floating-point tensor, in fp32. With --rank
    each 2-D update is stored as truncated SVD factors (NAME.svd_u, NAME.svd_s, NAME.svd_vh), and
    the share of the update's squared Frobenius norm that they keep is reported per tensor and
    overall. Results are cached by the input digests, so a second run reads the cache.

    Example: forge edit diff --base smollm2-135m --tuned runs/lora -o lora.tv.safetensors --rank 16
    """
    from llmforge_edit.vectors import write_task_vector

    set_resume_hint("Rerun the same command; a task vector computed before the interrupt comes from the cache.")
    if quiet:
        silence_progress_bars()
    summary = write_task_vector(base, tuned, output, rank=rank, overwrite=overwrite)
    if as_json:
        print_json(summary)
    else:
        _print_diff_summary(summary)


@click.command(name="merge")
@click.option("--base", required=True, help="Base model reference that the task vectors were computed against.")
@click.option("--vector", "vectors", required=True, multiple=True, metavar="PATH[:weight=W,density=D]",
              help="A task vector file from `forge edit diff`, with its weight (default 1) and density, the "
                   "fraction of entries kept by pruning methods (in (0, 1], default 1). Repeatable.")
@click.option("--method", default="task_arithmetic", show_default=True,
              help="Merge method: task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, or one that a "
                   "plugin adds through the forge_merge_methods hook.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="HF model directory to write, with forge_run.json.")
@click.option("--lambda", "scale", type=float, default=1.0, show_default=True,
              help="Factor applied to the combined update before it is added to the base.")
@click.option("--normalize/--no-normalize", default=None,
              help="Divide the combined update by the sum of the weights that took part. [default: on for ties only]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random pruning of dare_linear and dare_ties.")
@click.option("--layers", help="Update only these decoder layers, e.g. 0-5,9; other tensors keep the base values.")
@click.option("--modules", help="Update only tensors of these modules, e.g. q_proj,v_proj; others keep the base values.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def merge_command(base, vectors, method, output, scale, normalize, seed, layers, modules, overwrite, as_json, quiet):
    """Merge task vectors into a base model and write the result as an HF model directory.

    The merged weights are base + lambda * delta, where the method combines the vectors' updates
    tensor by tensor with mergekit's semantics. Tensors are read and written one at a time, and
    nothing is written when any input is invalid.

    Example: forge edit merge --base smollm2-135m --vector math.safetensors:weight=0.7,density=0.5
    --vector code.safetensors:weight=0.3,density=0.5 --method ties -o merged
    """
    from llmforge_edit.merge import MergeRequest, parse_vector_spec, run_merge

    set_resume_hint("Rerun the same command; the merge starts over, because only the digests of its inputs are cached.")
    if quiet:
        silence_progress_bars()
    request = MergeRequest(base=base, vectors=[parse_vector_spec(text) for text in vectors], output=output,
                           method=method, scale=scale, normalize=normalize, seed=seed, layers=layers,
                           modules=modules, overwrite=overwrite)
    record = run_merge(request, command=["forge", *sys.argv[1:]] if sys.argv else None)
    if as_json:
        print_json(record)
    else:
        click.echo(f"merged {len(request.vectors)} task vectors into {record['merged_tensors']} tensors of "
                   f"{base} with {method} (lambda {scale:g})")
        click.echo(f"output: {output}")
