"""Helpers shared by the `forge eval` commands: option parsing, quiet mode and report output."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click


def split_list(value: str | None) -> list[str]:
    """Split a comma list option such as "arith,facts" into its non-empty, stripped items."""
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def silence_progress_bars() -> None:
    """Turn off the progress bars of transformers and huggingface_hub (GGUF conversion, weight loading)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    else:
        # Read when transformers is imported; cheaper than importing it when every score is cached.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def plots_directory(plots_dir: str | Path | None, output: str | Path | None) -> Path | None:
    """Return where plots go: --plots DIR, else the directory of the -o report file, else None (no plots)."""
    if plots_dir:
        return Path(plots_dir)
    if output:
        return Path(output).parent
    return None


def emit_report(report: dict[str, Any], *, output: str | Path | None, as_json: bool,
                format_table: Callable[[dict[str, Any]], str]) -> None:
    """Write the report to the -o file when given, then print it on stdout as JSON (--json) or as a text table."""
    from llmforge.checkpoint import write_json

    if output:
        write_json(output, report)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        click.echo(format_table(report))
