"""Fault injection on real commands: `forge finetune` and `forge transfer` killed at random moments, and a full cache.

The kill tests run each command in a child process that a server forks after it has imported torch,
transformers and forge once, so that a trial spends its time in the command and not in imports.
Each child is killed with SIGKILL after a seeded random delay within the command's run time, which
the test first measures on an uninterrupted run. After each kill the test checks what the command
left, reruns it (finetune with --resume when a saved state exists) and compares the result with the
uninterrupted run. The disk-full tests put FORGE_CACHE on a full file system and the output elsewhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner

from conftest import FORGE
from llmforge.checkpoint import RUN_RECORD_NAME, load_tensors, partial_directory, save_task_vector
from llmforge.cli import cli
from test_cache_faults import stray_paths
from test_output_faults import (FAULT_SOURCE, STAGING_NAME, child_env, load_script, make_tuned_copy,
                                mount_namespace_flags)

SERVER_SOURCE = r'''
"""Command server of test_command_faults: it imports forge once and forks one `forge` run per request.

It reads commands on stdin. "run [LOG, CACHE, ARGS]" (a JSON list) forks a child that runs forge
with ARGS and FORGE_CACHE=CACHE, its stdout and stderr going to LOG, and prints the child's pid.
"wait PID" waits for that child and prints its exit status, negative for the signal that ended it.
"""

import json
import os
import sys
import traceback

import peft  # noqa: F401
import torch  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401

# The plugins' modules come after llmforge.cli, which loads the plugins.
from llmforge.cli import main
import llmforge_finetune.run  # noqa: F401
import llmforge_transfer.transfer  # noqa: F401


def run(log, cache, arguments):
    """Run `forge ARGUMENTS` in this forked process and end it with forge's exit status."""
    status = 1
    try:
        descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
        os.environ["FORGE_CACHE"] = cache
        sys.argv = ["forge", *arguments]
        main()
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve():
    print("ready", flush=True)
    for line in iter(sys.stdin.readline, ""):
        command, argument = line.rstrip("\n").split(" ", 1)
        if command == "run":
            pid = os.fork()
            if pid == 0:
                run(*json.loads(argument))
            print(pid, flush=True)
        elif command == "wait":
            _, status = os.waitpid(int(argument), 0)
            print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    serve()
'''

KILL_SEED = 7
# A trial whose run finished before its kill is repeated with half the delay, up to this many runs in all.
MAX_ATTEMPTS = 3
FINETUNE_KILLS = 8
TRANSFER_KILLS = {"naive": 8, "bico": 4}
# Finetune: 8 steps of 4 examples, a state saved after every step but the last.
FINETUNE_STEPS = 8
STATE_FILES = {"trainer.json", "trainable.safetensors", "optimizer.safetensors", "rng.safetensors"}
CHECKPOINT_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "forge_checkpoint.json"}


class CommandServer:
    """The server process of SERVER_SOURCE, driven through its stdin and stdout."""

    def __init__(self, script: Path) -> None:
        self.process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=child_env(TOKENIZERS_PARALLELISM="false"))
        assert self.process.stdout.readline() == "ready\n"

    def request(self, line: str) -> int:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def start(self, log: Path, cache: Path, arguments: list[str]) -> int:
        return self.request("run " + json.dumps([str(log), str(cache), arguments]))

    def wait(self, pid: int) -> int:
        return self.request(f"wait {pid}")

    def run(self, log: Path, cache: Path, arguments: list[str]) -> int:
        return self.wait(self.start(log, cache, arguments))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    script, _ = load_script(tmp_path_factory.mktemp("server"), "command_server", SERVER_SOURCE)
    started = CommandServer(script)
    yield started
    started.close()


def is_running(pid: int) -> bool:
    """Tell whether a child of the server still runs. An exited child stays a zombie until the server waits for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Timeline:
    """Seconds from a run's start until its first and last sign of writing, and until it exited."""

    first_write: float
    last_write: float
    end: float


def measure_run(server: CommandServer, log: Path, cache: Path, arguments: list[str],
                writing: Callable[[], bool]) -> Timeline:
    """Run a command to its end, polling ``writing`` to find when it writes its output."""
    start = time.monotonic()
    pid = server.start(log, cache, arguments)
    seen = []
    while is_running(pid):
        if writing():
            seen.append(time.monotonic() - start)
        time.sleep(0.005)
    end = time.monotonic() - start
    assert server.wait(pid) == 0, log.read_text()
    assert seen, "the polling never saw the run write"
    return Timeline(seen[0], seen[-1], end)


@dataclass
class Kill:
    """When to kill a run: ``delay`` seconds after its start, or after its first write with ``after_first_write``."""

    delay: float
    after_first_write: bool


def plan_kills(rng: random.Random, timeline: Timeline, count: int) -> list[Kill]:
    """Return ``count`` kills: even trials anywhere in the run, odd ones anywhere in the span that it writes.

    The odd ones count from the first write that the trial's own run makes, because the time a run
    takes to get there varies by a third or more on a busy machine.
    """
    return [Kill(rng.uniform(0.0, timeline.end), False) if trial % 2 == 0 else
            Kill(rng.uniform(0.0, timeline.last_write - timeline.first_write), True) for trial in range(count)]


def kill_run(server: CommandServer, log: Path, cache: Path, arguments: list[str], kill: Kill,
             writing: Callable[[], bool]) -> tuple[int, int]:
    """Start a command, SIGKILL it as ``kill`` specifies and return its pid and exit status (0: it finished first)."""
    pid = server.start(log, cache, arguments)
    deadline = time.monotonic() + 120
    while kill.after_first_write and not writing() and is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(kill.delay)
    os.kill(pid, signal.SIGKILL)  # a zombie ignores it
    status = server.wait(pid)
    assert status in (0, -signal.SIGKILL), log.read_text()
    return pid, status


def kill_trial(server: CommandServer, directory: Path, trial: int, arguments: list[str], kill: Kill,
               writing: Callable[[], bool], output: Path, check_output: Callable[[Path], None],
               tally: "Tally") -> tuple[int, Path, Path]:
    """Kill one run of a trial as ``kill`` specifies and return its pid, cache and log.

    Each run gets a cache of its own. A run that finished before its kill is checked with
    ``check_output`` and removed, and the trial is repeated with half the delay, MAX_ATTEMPTS times at most.
    """
    for attempt in range(MAX_ATTEMPTS):
        cache, log = directory / f"cache-{trial}-{attempt}", directory / f"trial-{trial}-{attempt}.log"
        pid, status = kill_run(server, log, cache, arguments, kill, writing)
        if status != 0:
            return pid, cache, log

        tally.finished += 1
        check_output(output)
        assert sorted(path.name for path in output.parent.iterdir()) == [output.name]
        check_cache(cache)
        shutil.rmtree(output)
        kill = Kill(kill.delay / 2, kill.after_first_write)
    pytest.fail(f"trial {trial}: all {MAX_ATTEMPTS} runs finished before their kill")


def staging_of(directory: Path) -> list[Path]:
    """Return the staging entries in ``directory`` (see llmforge.staging)."""
    if not directory.is_dir():
        return []
    return [entry for entry in sorted(directory.iterdir()) if STAGING_NAME.fullmatch(entry.name)]


def assert_only_staging_of(entries: list[Path], pid: int) -> None:
    owners = {int(STAGING_NAME.fullmatch(entry.name)["pid"]) for entry in entries}
    assert owners <= {pid}, f"staging entries of other processes: {entries}"


def check_cache(cache: Path) -> None:
    """`forge cache verify` finds no problem, and nothing but records and blobs lies outside tmp/ and locks/."""
    result = CliRunner().invoke(cli, ["cache", "verify", "--json"], env={"FORGE_CACHE": str(cache)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["problems"] == []
    assert stray_paths(cache) == []


def tensor_files_equal(first: Path, second: Path) -> bool:
    """Tell whether two safetensors files hold the same names, dtypes, shapes and bytes."""
    from safetensors.torch import load_file

    one, other = load_file(first), load_file(second)
    return sorted(one) == sorted(other) and all(
        one[name].dtype == other[name].dtype and torch.equal(one[name], other[name]) for name in one)


@dataclass
class Tally:
    """How the kills of one test landed."""

    writing: int = 0
    computing: int = 0
    finished: int = 0
    resumed: list[int] = field(default_factory=list)
    stateless: int = 0

    def report(self, command: str, kills: int, timeline: Timeline) -> str:
        return (f"{command}: {kills} kills, {self.writing} while a staging entry existed, {self.computing} between "
                f"writes, {self.finished} runs finished before their kill; resumed from steps {self.resumed}, "
                f"{self.stateless} left no state; an uninterrupted run took {timeline.end:.2f} s and wrote from "
                f"{timeline.first_write:.2f} to {timeline.last_write:.2f} s")


# forge finetune


def finetune_arguments(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "-o", str(output), "--quiet", "--batch-size", "4",
            "--threads", "1", "--steps", str(FINETUNE_STEPS), "--save-every", "1", "--seed", "3", *extra]


def check_finetune_output(output: Path, reference: Path) -> None:
    """Check a finished finetune output: run record, adapter equal to ``reference``'s, and loadable checkpoints."""
    record = json.loads((output / RUN_RECORD_NAME).read_text())
    assert json.loads((output / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert tensor_files_equal(output / "adapter_model.safetensors", reference / "adapter_model.safetensors")
    assert record["loss_curve"] == json.loads((reference / RUN_RECORD_NAME).read_text())["loss_curve"]
    assert len(record["checkpoints"]) == FINETUNE_STEPS - 1
    for checkpoint in record["checkpoints"]:
        assert {path.name for path in (output / checkpoint).iterdir()} == CHECKPOINT_FILES, checkpoint
        load_tensors(output / checkpoint / "adapter_model.safetensors")


def check_partial_run(partial: Path, pid: int) -> list[Path]:
    """Check OUTPUT.partial after a kill: complete states and checkpoints, plus staging entries of ``pid`` only.

    Returns the staging entries.
    """
    left = staging_of(partial) + staging_of(partial / "checkpoints")
    assert_only_staging_of(left, pid)
    for entry in partial.iterdir() if partial.is_dir() else []:
        if entry in left or entry.name == "checkpoints":
            continue
        assert entry.name.startswith("state-"), f"unexpected {entry}"
        assert {path.name for path in entry.iterdir()} == STATE_FILES, entry
        json.loads((entry / "trainer.json").read_text())
        for name in STATE_FILES - {"trainer.json"}:
            load_tensors(entry / name)
    for checkpoint in (partial / "checkpoints").iterdir() if (partial / "checkpoints").is_dir() else []:
        if checkpoint not in left:
            assert {path.name for path in checkpoint.iterdir()} == CHECKPOINT_FILES, checkpoint
            load_tensors(checkpoint / "adapter_model.safetensors")
    return left


def rerun_finetune(server: CommandServer, log: Path, cache: Path, arguments: list[str], partial: Path,
                   tally: "Tally") -> None:
    """Rerun a killed finetune to its end: with --resume when a state was saved, else the same command.

    A run killed before its first state was complete leaves OUTPUT.partial without a state. The same
    command then exits with status 1 and advises --overwrite, and the test reruns it with --overwrite.
    """
    states = sorted(partial.glob("state-*"))
    if states:
        tally.resumed.append(int(states[-1].name.removeprefix("state-")))
        arguments = [*arguments, "--resume"]
    elif partial.exists():
        tally.stateless += 1
        assert server.run(log, cache, arguments) == 1, log.read_text()
        assert "with no saved state to resume; pass --overwrite to discard it" in log.read_text()
        arguments = [*arguments, "--overwrite"]
    assert server.run(log, cache, arguments) == 0, log.read_text()


@pytest.mark.slow
def test_killed_finetune_resumes_to_same_adapter(server, tiny_model_dir, qa_data, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    reference = tmp_path / "reference"
    timeline = measure_run(server, tmp_path / "reference.log", tmp_path / "cache-reference",
                           finetune_arguments(tiny_model_dir, qa_data, reference),
                           partial_directory(reference).exists)
    output, partial = runs / "adapter", partial_directory(runs / "adapter")
    arguments = finetune_arguments(tiny_model_dir, qa_data, output)
    tally = Tally()

    for trial, kill in enumerate(plan_kills(random.Random(KILL_SEED), timeline, FINETUNE_KILLS)):
        pid, cache, log = kill_trial(server, tmp_path, trial, arguments, kill, partial.exists, output,
                                     lambda finished: check_finetune_output(finished, reference), tally)

        # The output is missing or finished, and the only staging entries are the killed run's own.
        left = staging_of(runs)
        assert_only_staging_of(left, pid)
        assert {path.name for path in runs.iterdir()} - {entry.name for entry in left} <= {output.name, partial.name}
        if output.exists():
            check_finetune_output(output, reference)
        else:
            left += check_partial_run(partial, pid)
        left += [entry for entry in (cache / "tmp").glob(f"*.{pid}.*")]
        check_cache(cache)
        tally.writing += bool(left)
        tally.computing += not left

        # A rerun finishes, removes OUTPUT.partial and every staging entry, and trains the same adapter.
        if not output.exists():
            rerun_finetune(server, log, cache, arguments, partial, tally)
        elif staging_of(runs) or partial.exists():
            # Killed after the output was renamed into place, while OUTPUT.partial was removed: the
            # same command rejects the finished output, and a run with --overwrite sweeps what is left.
            assert server.run(log, cache, arguments) == 1
            assert "already exists; choose another path or pass --overwrite" in log.read_text()
            assert server.run(log, cache, [*arguments, "--overwrite"]) == 0, log.read_text()
        check_finetune_output(output, reference)
        assert sorted(path.name for path in runs.iterdir()) == [output.name]
        check_cache(cache)
        shutil.rmtree(output)

    print(tally.report("finetune", FINETUNE_KILLS, timeline))
    # At least a quarter of the kills must land in a write, or the test shows little.
    assert tally.writing >= FINETUNE_KILLS // 4, tally
    assert tally.computing >= 1, tally
    assert tally.resumed, tally


# forge transfer


@pytest.fixture(scope="module")
def transfer_inputs(tiny_model_dir, tmp_path_factory):
    """(target base, source task vector, calibration data): a rotated and permuted copy of the tiny model."""
    from llmforge.models import model_digest
    from llmforge_transfer.reparam import make_test_target

    directory = tmp_path_factory.mktemp("transfer-inputs")
    target = directory / "target"
    make_test_target(str(tiny_model_dir), target, seed=4, permute_mlp=True, permute_heads=True)
    generator = torch.Generator().manual_seed(0)
    vector = {name: 0.01 * torch.randn(tensor.shape, generator=generator)
              for name, tensor in load_tensors(tiny_model_dir / "model.safetensors").items()
              if tensor.is_floating_point()}
    vector_file = directory / "source.tv.safetensors"
    save_task_vector(vector_file, vector, base_digest=model_digest(str(tiny_model_dir)), tuned_digest="sha256:test")
    words = "river stone green seven music paper under bright window table old castle moon dance garden".split()
    rng = random.Random(0)
    calib = directory / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}) + "\n"
                             for _ in range(40)))
    return target, vector_file, calib


TRANSFER_FILES = ("model.safetensors", "transported_vector.safetensors")


def check_transfer_output(output: Path, reference: Path) -> None:
    """Check a finished transfer output: its run record and config, and tensors equal to ``reference``."""
    assert json.loads((output / RUN_RECORD_NAME).read_text())["output_digest"].startswith("sha256:")
    assert json.loads((output / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    for name in TRANSFER_FILES:
        assert tensor_files_equal(output / name, reference / name), name


@pytest.mark.slow
@pytest.mark.parametrize("align", TRANSFER_KILLS)
def test_killed_transfer_reruns_to_same_output(align, server, tiny_model_dir, transfer_inputs, tmp_path):
    target, vector_file, calib = transfer_inputs
    runs = tmp_path / "runs"
    runs.mkdir()

    def arguments(output: Path) -> list[str]:
        return ["transfer", "--source-base", str(tiny_model_dir), "--vector", str(vector_file), "--target-base",
                str(target), "--calib", str(calib), "--calib-tokens", "400", "--align", align, "-o", str(output),
                "--quiet"]

    reference = tmp_path / "reference"
    timeline = measure_run(server, tmp_path / "reference.log", tmp_path / "cache-reference", arguments(reference),
                           lambda: bool(staging_of(tmp_path)))
    output = runs / "out"
    kills = TRANSFER_KILLS[align]
    tally = Tally()

    for trial, kill in enumerate(plan_kills(random.Random(KILL_SEED + trial_offset(align)), timeline, kills)):
        pid, cache, log = kill_trial(server, tmp_path, trial, arguments(output), kill, lambda: bool(staging_of(runs)),
                                     output, lambda finished: check_transfer_output(finished, reference), tally)

        left = staging_of(runs)
        assert_only_staging_of(left, pid)
        assert {path.name for path in runs.iterdir()} - {entry.name for entry in left} <= {output.name}
        if output.exists():
            check_transfer_output(output, reference)
        left += [entry for entry in (cache / "tmp").glob(f"*.{pid}.*")]
        check_cache(cache)
        tally.writing += bool(left)
        tally.computing += not left

        if not output.exists():
            assert server.run(log, cache, arguments(output)) == 0, log.read_text()
        check_transfer_output(output, reference)
        assert sorted(path.name for path in runs.iterdir()) == [output.name]
        check_cache(cache)
        shutil.rmtree(output)

    print(tally.report(f"transfer --align {align}", kills, timeline))
    assert tally.writing >= kills // 4, tally
    assert tally.computing >= 1, tally


def trial_offset(align: str) -> int:
    return sorted(TRANSFER_KILLS).index(align)


# A full disk under the cache


def cache_full_message(cache: Path) -> str:
    return f"Error: cannot write to the cache in {cache}: no space left on device; free space on its file system"


def check_cache_full(returncode: int, stderr: str, cache: Path, output: Path) -> None:
    """Check a command that filled the cache: exit status 1, a message naming the cache, nothing half-written."""
    assert returncode == 1, stderr
    assert "Traceback" not in stderr
    assert cache_full_message(cache) in stderr, stderr
    assert "FORGE_CACHE" in stderr
    assert list(output.parent.iterdir()) == []
    check_cache(cache)
    assert list((cache / "tmp").iterdir()) == []


def test_cache_disk_full_injected(tiny_model_dir, tmp_path, forge_env):
    script, _ = load_script(tmp_path, "faults", FAULT_SOURCE)
    tuned = make_tuned_copy(tiny_model_dir, tmp_path / "tuned")
    cache = tmp_path / "full-cache"
    cache.mkdir()
    output = tmp_path / "out" / "tv.safetensors"
    output.parent.mkdir()

    # The cache takes the small digest records within its 1 MB budget, and then the 6 MB task vector fails.
    result = subprocess.run([sys.executable, str(script), "cli", "edit", "diff", "--base", str(tiny_model_dir),
                             "--tuned", str(tuned), "-o", str(output), "--quiet"], capture_output=True, text=True,
                            env={**forge_env, **child_env(FORGE_CACHE=str(cache), FAULT_DIR=str(cache),
                                                          FAULT_LIMIT=str(1 << 20))}, timeout=300)

    check_cache_full(result.returncode, result.stderr, cache, output)


@pytest.fixture
def embedding_adapter(tiny_model_dir, tmp_path):
    """A LoRA adapter on the tiny model's embedding and q_proj, whose dense task vector takes 6 MB."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    directory = tmp_path / "adapter"
    # peft warns about an adapter on tied embeddings, and that it saves the embedding layers with it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                   init_lora_weights=False))
        adapter.save_pretrained(directory)
    return directory


SMALL_CACHE_SCRIPT = r'''
set -u
mount -t tmpfs -o size=1m tmpfs "$CACHE" || exit 90
for case in pair adapter; do
    if [ "$case" = pair ]; then tuned="$TUNED"; else tuned="$ADAPTER"; fi
    "$FORGE" edit diff --base "$BASE" --tuned "$tuned" -o "$OUTPUT/$case.safetensors" --quiet 2> "$RESULTS/$case.err"
    echo $? > "$RESULTS/$case.rc"
    cp -a "$CACHE" "$RESULTS/$case-cache"
done
'''


def test_cache_disk_full_small_filesystem(tiny_model_dir, embedding_adapter, tmp_path, forge_env):
    cache = tmp_path / "small-cache"
    cache.mkdir()
    flags = mount_namespace_flags(cache)
    if flags is None:
        pytest.skip("cannot mount a tmpfs here: unshare is missing or mount namespaces are not allowed")
    tuned = make_tuned_copy(tiny_model_dir, tmp_path / "tuned")
    output, results = tmp_path / "out", tmp_path / "results"
    output.mkdir()
    results.mkdir()

    # The tmpfs of 1 MB exists only inside the mount namespace, so the script copies the cache out after each run.
    # Model pairs stream their task vector through open(), and adapters write it with safetensors.
    env = {**forge_env, **child_env(CACHE=str(cache), FORGE=str(FORGE), BASE=str(tiny_model_dir), TUNED=str(tuned),
                                    ADAPTER=str(embedding_adapter), OUTPUT=str(output), RESULTS=str(results),
                                    FORGE_CACHE=str(cache), PYTHONWARNINGS="ignore")}
    run = subprocess.run(["unshare", *flags, "bash", "-c", SMALL_CACHE_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)

    assert run.returncode == 0, run.stderr
    for case in ("pair", "adapter"):
        stderr = (results / f"{case}.err").read_text()
        assert int((results / f"{case}.rc").read_text()) == 1, stderr
        assert "Traceback" not in stderr
        assert cache_full_message(cache) in stderr, stderr
        check_cache(results / f"{case}-cache")
        assert list((results / f"{case}-cache" / "tmp").iterdir()) == []
    assert list(output.iterdir()) == []
