"""Shell completion: the checked-in scripts match the click tree, parse, and complete in real shells."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from llmforge.completion import SCRIPT_NAMES, SHELLS, builtin_plugin_names, command_spec, render_script

REPOSITORY = Path(__file__).resolve().parents[1]
COMPLETIONS = REPOSITORY / "completions"
REGENERATE = "python -m llmforge.completion"


def _builtin_plugin_environment() -> dict[str, str]:
    # The same plugin selection that `python -m llmforge.completion` uses for the checked-in files.
    return {**os.environ, "FORGE_LOAD_PLUGINS": ",".join(builtin_plugin_names())}


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, cwd=REPOSITORY, env=_builtin_plugin_environment(), capture_output=True, text=True, timeout=120)


@click.group()
@click.option("--verbose", is_flag=True, help="Log more.")
def sample_cli(verbose: bool) -> None:
    """A tree with every kind of value that the generator distinguishes."""


@sample_cli.command(name="train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--model", help="Base model. A second sentence.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output directory.")
@click.option("--data", type=click.File("r"), help="Data file.")
@click.option("--method", type=click.Choice(["lora", "full"]), help="Method.")
@click.option("--pair", nargs=2, help="Two values.")
@click.option("--tag", multiple=True, help="A tag. Repeat the option for more tags.")
@click.option("--secret", hidden=True)
def sample_train(**kwargs) -> None:
    """Train."""


@sample_cli.group(name="tools")
def sample_tools() -> None:
    """Tools."""


@sample_tools.command(name="convert")
@click.argument("sources", nargs=-1, type=click.Path())
def sample_convert(sources) -> None:
    """Convert."""


# --- the checked-in scripts ---------------------------------------------------------------------


def test_checked_in_scripts_match_tree():
    result = subprocess.run(
        [sys.executable, "-m", "llmforge.completion", "--check"], cwd=REPOSITORY, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, f"completions/ is out of date with the click tree; run `{REGENERATE}`.\n{result.stderr}"


def test_check_reports_drift(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmforge.completion", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (tmp_path / SCRIPT_NAMES["bash"]).write_text("# edited by hand\n")

    result = subprocess.run(
        [sys.executable, "-m", "llmforge.completion", "--check", str(tmp_path)], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 1
    assert f"out of date: {tmp_path / SCRIPT_NAMES['bash']}" in result.stderr
    assert SCRIPT_NAMES["zsh"] not in result.stderr
    assert REGENERATE in result.stderr


def test_completion_command_prints_checked_in_script():
    code = "import sys; sys.argv = ['forge', 'completion', sys.argv[1]]; from llmforge.cli import main; main()"

    for shell in SHELLS:
        result = _run_python(code, shell)

        assert result.returncode == 0, result.stderr
        assert result.stdout == (COMPLETIONS / SCRIPT_NAMES[shell]).read_text(), f"forge completion {shell} differs"


def test_completion_does_not_import_torch():
    code = (
        "import sys\n"
        "from llmforge.cli import cli\n"
        "from llmforge.completion import SHELLS, render_script\n"
        "for shell in SHELLS: render_script(cli, shell)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers', 'peft')))\n"
    )

    result = _run_python(code)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_shell_is_usage_error():
    from llmforge.cli import cli

    result = CliRunner().invoke(cli, ["completion", "tcsh"])

    assert result.exit_code == 2
    assert "Invalid value" in result.output


@pytest.mark.parametrize("shell", SHELLS)
def test_script_syntax(shell):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")

    result = subprocess.run([shell, "-n", str(COMPLETIONS / SCRIPT_NAMES[shell])], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr


# --- the tree walk ------------------------------------------------------------------------------


def test_command_spec_reads_options():
    spec = command_spec(sample_cli)
    train = next(command for command in spec.walk() if command.path == ("forge", "train"))
    options = {option.names: option for option in train.options}

    assert [command.path for command in spec.walk()] == [
        ("forge",),
        ("forge", "tools"),
        ("forge", "tools", "convert"),
        ("forge", "train"),
    ]
    assert ("--secret",) not in options
    assert options[("--method",)].value.choices == ("full", "lora")
    assert options[("--model",)].value.kind == "model"
    assert options[("--model",)].summary == "Base model"
    assert options[("--output", "-o")].value.kind == "directory"
    assert options[("--data",)].value.kind == "file"
    assert options[("--pair",)].nargs == 2
    assert options[("--tag",)].multiple
    assert options[("--help",)].nargs == 0
    assert train.arguments[0].value.kind == "file"


def test_render_is_deterministic():
    for shell in SHELLS:
        assert render_script(sample_cli, shell) == render_script(sample_cli, shell)


# --- bash ---------------------------------------------------------------------------------------

requires_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def bash_complete(script: Path, words: list[str], cwd: Path = REPOSITORY) -> list[str]:
    """Source a bash completion script, call _forge on the words and return COMPREPLY. The last word is completed."""
    program = 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); _forge; printf "%s\\n" "${COMPREPLY[@]}"'
    result = subprocess.run(["bash", "-c", program, "bash", str(script), *words], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.split("\n") if line]


@requires_bash
def test_bash_completes_checked_in_script():
    script = COMPLETIONS / SCRIPT_NAMES["bash"]

    assert bash_complete(script, ["forge", "ca"]) == ["cache"]
    assert {"gc", "info", "ls", "rm", "verify"} <= set(bash_complete(script, ["forge", "cache", ""]))
    assert "--dry-run" in bash_complete(script, ["forge", "cache", "gc", "--"])
    assert "--unused-days" in bash_complete(script, ["forge", "cache", "gc", "--"])
    assert bash_complete(script, ["forge", "--debug", "cache", "r"]) == ["rm"]
    assert bash_complete(script, ["forge", "completion", ""]) == ["bash", "fish", "zsh"]
    assert bash_complete(script, ["forge", "cache", "gc", "--unused-days", ""]) == []


@pytest.fixture
def sample_bash(tmp_path) -> Path:
    """The bash script of sample_cli, next to a file data.jsonl and a directory runs/."""
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "runs").mkdir()
    script = tmp_path / "sample.bash"
    script.write_text(render_script(sample_cli, "bash"))
    return script


SAMPLE_BASH_CASES = [
    (["forge", ""], ["tools", "train"]),
    (["forge", "tools", ""], ["convert"]),
    (["forge", "train", "--method", ""], ["full", "lora"]),
    (["forge", "train", "--method", "=", ""], ["full", "lora"]),
    (["forge", "train", "--method", "=", "l"], ["lora"]),
    (["forge", "train", "--model", "sm"], ["smollm2-135m"]),
    (["forge", "train", "--model", ""], ["data.jsonl", "gemma3-270m", "runs", "sample.bash", "smollm2-135m"]),
    (["forge", "train", "-o", ""], ["runs"]),
    (["forge", "train", "--data", "d"], ["data.jsonl"]),
    (["forge", "train", "--pair", "a", ""], []),
    (["forge", "train", "--pair", "a", "b", "--me"], ["--method"]),
    (["forge", "train", "--tag", "x", "--t"], ["--tag"]),
    (["forge", "train", "d"], ["data.jsonl"]),
    (["forge", "train", "--", "--"], []),
    (["forge", "tools", "convert", "a", "r"], ["runs"]),
]


@requires_bash
@pytest.mark.parametrize(("words", "expected"), SAMPLE_BASH_CASES)
def test_bash_completes_values(sample_bash, words, expected):
    assert sorted(bash_complete(sample_bash, words, cwd=sample_bash.parent)) == expected


# --- fish and zsh -------------------------------------------------------------------------------


def fish_complete(script: Path, line: str, cwd: Path = REPOSITORY) -> list[str]:
    """Return the candidates (without descriptions) that fish offers for a command line."""
    program = f"source {script}; complete -C {line!r}"
    result = subprocess.run(["fish", "--no-config", "-c", program], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return sorted(line.split("\t")[0] for line in result.stdout.split("\n") if line)


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes(tmp_path):
    script = COMPLETIONS / SCRIPT_NAMES["fish"]
    sample = tmp_path / "sample.fish"
    sample.write_text(render_script(sample_cli, "fish"))
    (tmp_path / "runs").mkdir()

    assert fish_complete(script, "forge ca") == ["cache"]
    assert {"gc", "info", "ls", "rm", "verify"} <= set(fish_complete(script, "forge cache "))
    assert "--dry-run" in fish_complete(script, "forge cache gc --")
    assert fish_complete(script, "forge cache gc --unused-days ") == []
    assert fish_complete(sample, "forge train --method ", tmp_path) == ["full", "lora"]
    assert fish_complete(sample, "forge train --pair a b --me", tmp_path) == ["--method"]
    assert "smollm2-135m" in fish_complete(sample, "forge train --model ", tmp_path)
    assert fish_complete(sample, "forge train -o ", tmp_path) == ["runs/"]


ZSH_CAPTURE = r"""
# Type $1 and a Tab into an interactive zsh under zpty. The compadd wrapper appends the candidates to $3.
zmodload zsh/zpty
zpty shell "zsh -f -i"
zpty -w shell "bindkey -e; fpath=($2 \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w shell 'compadd() { local -a found; builtin compadd -O found "$@"; print -l -- $found >>'$3'; builtin compadd "$@"; }'
# zle drops keys typed before its prompt is shown, so wait for a prompt that the echoed
# input cannot match (the quotes split it there).
zpty -w shell "PS1='RE''ADY> '"
zpty -r -m shell output '*READY> *'
zpty -w shell "$1"$'\t'$'\C-u'"print __done__ >> $3"
for i in {1..200}; do grep -q __done__ $3 2>/dev/null && break; sleep 0.05; done
zpty -d shell
"""


def zsh_complete(directory: Path, line: str, tmp_path: Path) -> set[str]:
    """Return the candidates that zsh's completion system adds for a command line."""
    output = tmp_path / "candidates.txt"
    output.unlink(missing_ok=True)
    subprocess.run(["zsh", "-f", "-c", ZSH_CAPTURE, "zsh", line, str(directory), str(output)], timeout=60, check=True)
    lines = set(output.read_text().split("\n"))
    assert "__done__" in lines, f"zsh did not finish completing {line!r}"
    return lines - {"", "__done__"}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes(tmp_path):
    sample_directory = tmp_path / "sample"
    sample_directory.mkdir()
    (sample_directory / "_forge").write_text(render_script(sample_cli, "zsh"))

    assert zsh_complete(COMPLETIONS, "forge ca", tmp_path) == {"cache"}
    assert zsh_complete(COMPLETIONS, "forge cache ", tmp_path) == {"gc", "info", "ls", "rm", "verify"}
    assert "--dry-run" in zsh_complete(COMPLETIONS, "forge cache gc --", tmp_path)
    assert zsh_complete(sample_directory, "forge train --method ", tmp_path) == {"full", "lora"}
    assert {"gemma3-270m", "smollm2-135m"} <= zsh_complete(sample_directory, "forge train --model ", tmp_path)
