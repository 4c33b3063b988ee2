"""External commands: executables named forge-NAME on PATH, run by the installed `forge` script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import FORGE

PRINT_ARGUMENTS = 'for argument in "$@"; do printf "[%s]\\n" "$argument"; done\n'


def write_external(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    """Write a POSIX shell script named forge-NAME into directory with the given permission bits."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"forge-{name}"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(mode)
    return path


def path_env(forge_env: dict[str, str], *directories: Path) -> dict[str, str]:
    """Return forge_env with the directories put in front of PATH, in the order given."""
    return {**forge_env, "PATH": os.pathsep.join([*map(str, directories), forge_env.get("PATH", "")])}


def run_forge(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(FORGE), *args], capture_output=True, text=True, env=env, timeout=120, **kwargs)


def plugins_json(env: dict[str, str]) -> dict:
    result = run_forge("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not created within {seconds} s"
        time.sleep(0.05)


def test_arguments_reach_external_unchanged(tmp_path, forge_env):
    write_external(tmp_path / "bin", "show", PRINT_ARGUMENTS)
    arguments = ["--help", "-x", "--", "two words", "--debug", "", "-h"]

    result = run_forge("show", *arguments, env=path_env(forge_env, tmp_path / "bin"))

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"[{argument}]" for argument in arguments]


def test_exit_status_and_streams_pass_through(tmp_path, forge_env):
    write_external(tmp_path / "bin", "fail", """\
        read line
        echo "stdin: $line"
        echo "to stderr" >&2
        exit 3
    """)

    result = run_forge("fail", env=path_env(forge_env, tmp_path / "bin"), input="piped text\n")

    assert result.returncode == 3
    assert result.stdout == "stdin: piped text\n"
    assert result.stderr == "to stderr\n"


def test_killed_external_gives_128_plus_signal(tmp_path, forge_env):
    write_external(tmp_path / "bin", "die", "kill -TERM $$\n")

    result = run_forge("die", env=path_env(forge_env, tmp_path / "bin"))

    assert result.returncode == 128 + signal.SIGTERM


def test_missing_interpreter_exit_1(tmp_path, forge_env):
    external = tmp_path / "bin" / "forge-broken"
    external.parent.mkdir()
    external.write_text("#!/nonexistent/interpreter\n")
    external.chmod(0o755)

    result = run_forge("broken", env=path_env(forge_env, tmp_path / "bin"))

    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: failed to run the external command {external}: No such file or directory")
    assert "Traceback" not in result.stderr


def test_environment_names_cache_and_forge(tmp_path, forge_env):
    write_external(tmp_path / "bin", "env", 'echo "$FORGE_CACHE"\necho "$FORGE_EXECUTABLE"\n')
    env = {**path_env(forge_env, tmp_path / "bin"), "FORGE_CACHE": "relative-cache"}

    result = run_forge("env", env=env, cwd=tmp_path)

    cache, executable = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert cache == str(tmp_path / "relative-cache")
    assert executable == str(FORGE)


def test_default_cache_root_exported(tmp_path, forge_env):
    write_external(tmp_path / "bin", "env", 'echo "$FORGE_CACHE"\n')
    env = {**path_env(forge_env, tmp_path / "bin"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    del env["FORGE_CACHE"]

    result = run_forge("env", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "xdg" / "llmforge")


def test_external_calls_forge_back(tmp_path, forge_env):
    write_external(tmp_path / "bin", "nested", '"$FORGE_EXECUTABLE" plugins --json\n')

    result = run_forge("nested", env=path_env(forge_env, tmp_path / "bin"))

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [external["name"] for external in document["externals"]] == ["nested"]
    assert {plugin["name"] for plugin in document["plugins"]} >= {"finetune", "eval"}


def test_builtin_command_not_shadowed(tmp_path, forge_env):
    external = write_external(tmp_path / "bin", "finetune", "echo external ran\n")
    env = path_env(forge_env, tmp_path / "bin")

    result = run_forge("finetune", "--help", env=env)
    listing = run_forge("plugins", env=env)
    externals = plugins_json(env)["externals"]

    assert result.returncode == 0, result.stderr
    assert "Usage: forge finetune" in result.stdout
    assert "external ran" not in result.stdout
    assert externals == [{"name": "finetune", "path": str(external), "executable": True, "shadowed": True}]
    assert f"{external}  (shadowed by the command 'finetune'; never runs)" in listing.stdout


def test_non_executable_flagged_and_not_run(tmp_path, forge_env):
    external = write_external(tmp_path / "bin", "plain", "echo plain ran\n", mode=0o644)
    env = path_env(forge_env, tmp_path / "bin")

    result = run_forge("plain", env=env)
    listing = run_forge("plugins", env=env)
    externals = plugins_json(env)["externals"]

    assert result.returncode == 2
    assert "No such command 'plain'" in result.stderr
    assert externals == [{"name": "plain", "path": str(external), "executable": False, "shadowed": False}]
    assert f"{external}  (not executable; never runs)" in listing.stdout


def test_first_executable_on_path_runs(tmp_path, forge_env):
    write_external(tmp_path / "first", "dup", "echo first\n", mode=0o644)
    second = write_external(tmp_path / "second", "dup", "echo second\n")
    write_external(tmp_path / "third", "dup", "echo third\n")
    env = path_env(forge_env, tmp_path / "first", tmp_path / "second", tmp_path / "third")

    result = run_forge("dup", env=env)
    externals = plugins_json(env)["externals"]

    assert result.stdout == "second\n"
    assert externals == [{"name": "dup", "path": str(second), "executable": True, "shadowed": False}]


def test_unknown_command_exit_2(tmp_path, forge_env):
    write_external(tmp_path / "bin", "known", "echo known\n")

    result = run_forge("unknown", env=path_env(forge_env, tmp_path / "bin"))

    assert result.returncode == 2
    assert "No such command 'unknown'" in result.stderr
    assert result.stdout == ""


def test_help_lists_runnable_externals(tmp_path, forge_env):
    runnable = write_external(tmp_path / "bin", "hello", "echo hello\n")
    write_external(tmp_path / "bin", "finetune", "echo shadowed\n")
    write_external(tmp_path / "bin", "plain", "echo plain\n", mode=0o644)

    result = run_forge("--help", env=path_env(forge_env, tmp_path / "bin"))

    section = result.stdout.split("External commands (forge-NAME on PATH):")[1]
    assert result.returncode == 0
    assert section.split() == ["hello", str(runnable)]


def test_ctrl_c_left_to_external(tmp_path, forge_env):
    marker = tmp_path / "started"
    write_external(tmp_path / "bin", "wait", f"""\
        trap 'echo interrupted; exit 5' INT
        touch '{marker}'
        while :; do sleep 0.1; done
    """)
    # A new session makes forge and the external a process group of their own, as a terminal's
    # foreground job is, so killpg delivers SIGINT to both the way Ctrl-C does.
    process = subprocess.Popen([str(FORGE), "wait"], env=path_env(forge_env, tmp_path / "bin"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(marker)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    assert process.returncode == 5
    assert stdout == "interrupted\n"
    assert "Interrupted." not in stderr
    assert "Traceback" not in stderr


def test_sigterm_forwarded_to_external(tmp_path, forge_env):
    marker = tmp_path / "started"
    write_external(tmp_path / "bin", "sleep", f"touch '{marker}'\nexec sleep 60\n")
    process = subprocess.Popen([str(FORGE), "sleep"], env=path_env(forge_env, tmp_path / "bin"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(marker)
        process.send_signal(signal.SIGTERM)
        # The external keeps stdout open, so communicate returns only once it has ended too.
        process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the external kept running for 20 s after forge got SIGTERM")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    assert process.returncode == 128 + signal.SIGTERM
