"""PNG plots of a `forge eval spectra` report: the mean profiles per module type and the per-layer summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PROFILES_PLOT = "spectra-profiles.png"
LAYERS_PLOT = "spectra-layers.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _save(figure, path: Path) -> None:
    """Render the figure to a temporary PNG in the target directory, then rename it over `path`."""
    from llmforge.checkpoint import atomic_write

    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)


def model_labels(report: dict[str, Any]) -> list[str]:
    """Return a legend label per model: the last path component, or the whole reference when those collide."""
    short = [os.path.basename(str(entry["reference"]).rstrip("/")) or str(entry["reference"])
             for entry in report["models"]]
    if len(set(short)) < len(short):
        return [str(entry["reference"]) for entry in report["models"]]
    return short


def plot_profiles(report: dict[str, Any], path: Path) -> None:
    """Plot the mean retention drift dP(i) and update energy E(i) against i, one column per module type.

    Each line is one model of the report; the profiles are averaged over the layers of the module type.
    """
    pyplot = _pyplot()
    kinds = sorted({kind for entry in report["models"] for kind in entry["profiles"]})
    figure, axes = pyplot.subplots(2, len(kinds), figsize=(3.2 * len(kinds), 6), squeeze=False)

    labels = model_labels(report)
    for column, kind in enumerate(kinds):
        for entry, label in zip(report["models"], labels):
            profile = entry["profiles"].get(kind)
            if profile is None:
                continue
            axes[0][column].plot(profile["drift"], label=label, linewidth=1)
            axes[1][column].plot(profile["energy"], label=label, linewidth=1)
        axes[0][column].set_title(kind)
        axes[1][column].set_xlabel("singular index i")
    axes[0][0].set_ylabel("retention drift |P(i) - s_i|")
    axes[1][0].set_ylabel("update energy ||dW v_i||")
    axes[0][-1].legend(fontsize="small")
    figure.suptitle("Mean over layers, per module type")
    figure.tight_layout()
    _save(figure, path)
    pyplot.close(figure)


def plot_layers(report: dict[str, Any], path: Path) -> None:
    """Plot effective rank and the two spectral smoothness values against the layer index, one line per model."""
    pyplot = _pyplot()
    panels = [("effective_rank", "effective rank"), ("smoothness_drift", "smoothness of dP"),
              ("smoothness_energy", "smoothness of E")]
    figure, axes = pyplot.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)

    from matplotlib.ticker import MaxNLocator

    for entry, label in zip(report["models"], model_labels(report)):
        rows = [row for row in entry["by_layer"] if row["group"] is not None]
        for axis, (field, _) in zip(axes[0], panels):
            axis.plot([row["group"] for row in rows], [row[field] for row in rows], marker="o", markersize=3,
                      linewidth=1, label=label)
    for axis, (_, title) in zip(axes[0], panels):
        axis.set_title(title)
        axis.set_xlabel("layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize="small")
    figure.suptitle("Mean over the module types of each layer")
    figure.tight_layout()
    _save(figure, path)
    pyplot.close(figure)


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write both plots into `directory` (created if missing) and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / PROFILES_PLOT, directory / LAYERS_PLOT]
    plot_profiles(report, paths[0])
    plot_layers(report, paths[1])
    return paths
