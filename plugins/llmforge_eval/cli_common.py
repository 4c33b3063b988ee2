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


def check_report_target(output: str | Path | None, schema: str, inputs: dict[str, Any]) -> None:
    """Stop before any work when -o would replace an input, land inside an input model, or replace a non-report file.

    `schema` is the report's schema name without its version, such as ``llmforge.eval``. `inputs`
    maps labels to paths or to lists of paths (model references that are not paths are skipped).
    """
    from llmforge.checkpoint import check_report_output

    if not output:
        return
    flat: dict[str, Any] = {}
    for label, value in inputs.items():
        for index, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            flat[f"{label} {index + 1}" if isinstance(value, (list, tuple)) and len(value) > 1 else label] = item
    check_report_output(output, schema_prefix=f"{schema}/", inputs=flat)


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
