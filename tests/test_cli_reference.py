"""The command-line reference page: it matches every command's --help, and drift is reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from llmforge.cli_reference import REGENERATE, help_text, render_reference, walk_commands

REPOSITORY = Path(__file__).resolve().parents[1]
PAGE = REPOSITORY / "docs" / "cli.md"


def _run_generator(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "llmforge.cli_reference", *args]
    return subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)


@click.group()
def sample_cli() -> None:
    """A sample tree."""


@sample_cli.group(name="edit")
def sample_edit() -> None:
    """Edit things."""


@sample_edit.command(name="merge")
@click.option("--lambda", "lambda_", type=float, default=1.0, show_default=True, help="Scale of the update.")
def sample_merge(lambda_: float) -> None:
    """Merge things."""


def test_checked_in_page_matches_commands():
    result = _run_generator("--check")

    assert result.returncode == 0, f"docs/cli.md is out of date with the commands; run `{REGENERATE}`.\n{result.stderr}"


def test_check_reports_drift(tmp_path):
    page = tmp_path / "cli.md"
    assert _run_generator(str(page)).returncode == 0
    page.write_text(page.read_text().replace("Show the full traceback", "Show a traceback"))

    result = _run_generator("--check", str(page))

    assert result.returncode == 1
    assert f"out of date: {page}" in result.stderr
    assert REGENERATE in result.stderr


def test_every_loaded_command_has_a_section():
    from llmforge.cli import cli

    headings = {line for line in PAGE.read_text().splitlines() if line.startswith("## ")}

    paths = [" ".join(path) for path, _ in walk_commands(cli)]
    assert {"forge finetune", "forge zo", "forge edit merge", "forge transfer", "forge eval"} <= set(paths)
    assert {f"## {path}" for path in paths} <= headings


def test_help_text_equals_what_the_command_prints():
    rendered = help_text(sample_cli, ("forge", "edit", "merge"))

    printed = CliRunner().invoke(sample_cli, ["edit", "merge", "--help"], prog_name="forge", terminal_width=100)

    assert printed.exit_code == 0
    assert rendered.strip() == printed.output.strip()
    assert "Usage: forge edit merge [OPTIONS]" in rendered
    assert "[default: 1.0]" in rendered


def test_sections_follow_the_tree_in_order():
    page = render_reference(sample_cli)

    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert headings == ["## forge", "## forge edit", "## forge edit merge"]
    assert "- [`forge edit merge`](#forge-edit-merge)" in page
