"""`forge eval spectra`: a thin click layer over `llmforge_eval.spectra.spectra_report`."""

from __future__ import annotations

import sys

import click

from llmforge.cli import set_resume_hint
from llmforge_eval.cli_common import check_report_target, emit_report, plots_directory, split_list


@click.command(name="spectra")
@click.option("--model", "models", multiple=True, required=True, metavar="REF",
              help="Fine-tuned model: PEFT adapter dir, HF model dir (full fine-tune or merged) or built-in name; "
                   "repeat to compare runs in one report.")
@click.option("--base", metavar="REF",
              help="Base model the updates are measured against. Default: the adapter's base, or the base in the "
                   "model directory's forge run record; required for other model directories.")
@click.option("--modules", metavar="NAMES", help="Comma list of module types to analyse (e.g. q_proj,v_proj). "
              "Default: every updated linear weight.")
@click.option("--window", type=int, default=5, show_default=True,
              help="Width of the moving average in the spectral smoothness (odd number of singular indices).")
@click.option("--padding", type=click.Choice(["reflect", "symmetric", "edge"]), default="reflect", show_default=True,
              help="How the moving average extends dP and E at their ends (as numpy.pad names the modes).")
@click.option("--normalize", type=click.Choice(["none", "mean"]), default="none", show_default=True,
              help="Divide dP and E by their mean before the smoothness is taken (mean), or keep raw values (none).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the JSON report to this file; "
              "the PNG plots go beside it unless --plots is given.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write spectra-profiles.png and spectra-layers.png into this directory.")
@click.option("--quiet", is_flag=True, help="No progress bar on stderr.")
def spectra_command(models, base, modules, window, padding, normalize, as_json, output, plots_dir, quiet):
    """Measure how each updated linear weight moved against the base weight's singular directions.

    For every base weight W0 = U S V^T and update dW: retention drift |u_i^T W_ft v_i - s_i|, update
    energy ||dW v_i||, effective rank ||dW||_F^2 / ||dW||_2^2, spectral smoothness (mean deviation of
    the drift and energy profiles from their moving average; lower is smoother) and the relative
    norm ||dW||_F / ||W0||_F. The table gives unweighted means per module type and per layer.
    Results are cached per base, tuned model and settings.

    \b
    forge eval spectra --model ./lora-run --model ./oft-run -o spectra.json
    forge eval spectra --model ./full-run --base smollm2-135m --modules q_proj,v_proj --plots plots/
    """

    from llmforge_eval.spectra import SpectraSettings, format_table, spectra_report
    from llmforge_eval.spectra_plots import write_plots

    check_report_target(output, "llmforge.eval.spectra", {"model": models, "base": base})
    set_resume_hint("Rerun the same command to continue: the models analysed before the interrupt are cached and reused.")
    settings = SpectraSettings(window=window, padding=padding, normalize=normalize, modules=tuple(split_list(modules)))
    report = spectra_report(models, base, settings, progress=not quiet, command=sys.argv)

    directory = plots_directory(plots_dir, output)
    if directory is not None:
        report["plots"] = [str(path) for path in write_plots(report, directory)]
    emit_report(report, output=output, as_json=as_json, format_table=format_table)
