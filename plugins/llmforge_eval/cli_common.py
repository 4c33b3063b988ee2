"""Helpers shared by the `forge eval` commands: option parsing, quiet mode and report output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from llmforge.cli import silence_progress_bars

__all__ = ["split_list", "silence_progress_bars", "plots_directory", "emit_report"]


def split_list(value: str | None) -> list[str]:
    """Split a comma list option such as "arith,facts" into its non-empty, stripped items."""
    return [name.strip() for name in (value or "").split(",") if name.strip()]


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
