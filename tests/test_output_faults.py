"""Fault injection on output writes: writers killed with SIGKILL at random moments, and a full disk.

The kill tests run writers in child processes, so that SIGKILL hits the real file operations of
llmforge.checkpoint and of `forge edit merge`. The writer script below derives every output's
content from a generation number stored in the output, so the test can check what it reads back
byte for byte. The disk-full tests make writes fail with ENOSPC, from a real small tmpfs where the
system allows one and always from a hook in the child process that fails writes after a byte budget.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import FORGE
from llmforge.checkpoint import (RUN_RECORD_NAME, DiskFullError, atomic_directory, atomic_write, file_digest,
                                 load_tensors, save_task_vector, save_tensors)
from llmforge.staging import remove_stale_staging, staging_prefix

REPOSITORY = Path(__file__).resolve().parents[1]

WRITER_SOURCE = r'''
"""Output writer of test_output_faults: each output's content follows from its generation number.

Usage: writer.py serve ROOT. It imports torch once and then reads commands on stdin. "write FIRST LOG"
forks a child that writes generations FIRST, FIRST + 1, ... into ROOT until it is killed, appending
"enter G NAME" and "done G" lines to LOG, and prints the child's pid. "reap PID" waits for that child
and prints "reaped", so that the pid no longer exists when the test looks at ROOT.
"""

import itertools
import os
import random
import sys

import torch

from llmforge.checkpoint import RUN_RECORD_NAME, atomic_directory, atomic_write, save_tensors, write_json

# Generation G writes TARGETS[G % 6]: directories through atomic_directory, files through save_tensors
# and atomic_write.
TARGETS = ("model-0", "vector-0.safetensors", "model-1", "notes-0.bin", "model-2", "vector-1.safetensors")
DIRECTORY_FILES = {"model.safetensors", "config.json", "notes.bin", RUN_RECORD_NAME}
CHUNK_BYTES = 256 << 10


# Random bytes made once, before the server forks, so that a writer spends its time writing.
RANDOM_BYTES = random.Random(0).randbytes(8 << 20)


def payload(generation):
    """Return the 1 to 3 MB of a generation: a slice of RANDOM_BYTES at an offset that depends on it."""
    size = (1 + generation % 3) << 20
    offset = (generation * 7919) % (len(RANDOM_BYTES) - size)
    return RANDOM_BYTES[offset:offset + size]


def tensors(generation):
    """Return the tensors of a generation: float32 weights and uint8 bytes, halves of its payload."""
    data = payload(generation)
    half = len(data) // 2
    return {"weight": torch.frombuffer(bytearray(data[:half]), dtype=torch.float32),
            "bytes": torch.frombuffer(bytearray(data[half:]), dtype=torch.uint8)}


def notes(generation):
    return f"generation {generation}\n".encode() + payload(generation)[-(1 << 20):]


def config(generation):
    return {"generation": generation, "hidden_size": 32}


def write_notes(path, generation):
    """Write notes(generation) to ``path`` through atomic_write, in flushed chunks."""
    data = notes(generation)
    with atomic_write(path) as handle:
        for start in range(0, len(data), CHUNK_BYTES):
            handle.write(data[start:start + CHUNK_BYTES])
            handle.flush()


def write_output(root, name, generation):
    """Write one output of ``generation`` to ROOT/NAME, replacing what is there."""
    path = root / name
    if name.endswith(".safetensors"):
        save_tensors(path, tensors(generation), {"generation": str(generation)})
    elif name.endswith(".bin"):
        write_notes(path, generation)
    else:
        with atomic_directory(path, overwrite=True) as staging:
            save_tensors(staging / "model.safetensors", tensors(generation), {"generation": str(generation)})
            write_json(staging / "config.json", config(generation))
            write_notes(staging / "notes.bin", generation)
            write_json(staging / RUN_RECORD_NAME, {"generation": generation})


def write_forever(root, first, log):
    handle = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for generation in itertools.count(first):
        name = TARGETS[generation % len(TARGETS)]
        os.write(handle, f"enter {generation} {name}\n".encode())
        write_output(root, name, generation)
        os.write(handle, f"done {generation}\n".encode())


def serve(root):
    print("ready", flush=True)
    for line in iter(sys.stdin.readline, ""):
        command, *arguments = line.split()
        if command == "write":
            pid = os.fork()
            if pid == 0:
                try:
                    write_forever(root, int(arguments[0]), arguments[1])
                finally:
                    os._exit(1)
            print(pid, flush=True)
        elif command == "reap":
            os.waitpid(int(arguments[0]), 0)
            print("reaped", flush=True)


if __name__ == "__main__":
    from pathlib import Path

    serve(Path(sys.argv[2]))
'''

FAULT_SOURCE = r'''
"""Disk-full child of test_output_faults: writes under one directory fail with ENOSPC.

Usage: faults.py api DIR [--real] | faults.py cli FORGE_ARGS... with FAULT_DIR and FAULT_LIMIT set.
The hook counts the bytes written to files under DIR against one budget. The write that exceeds it
writes what fits, and the next one raises OSError(ENOSPC), as on a full file system. It covers files
opened with the built-in open() (shutil copies through open() once its sendfile path is off) and
os.write and os.copy_file_range on their descriptors. safetensors.torch.save_file writes from Rust,
so under the hook it serializes in memory and writes through open(). With --real no hook is
installed, and DIR is expected to be a small file system.
"""

import builtins
import errno
import io
import json
import os
import shutil
import sys
from pathlib import Path

_open, _os_write = builtins.open, os.write
_budget = {"directory": None, "remaining": 0}


def is_limited(fd):
    try:
        return _budget["directory"] in Path(os.readlink(f"/proc/self/fd/{fd}")).parents
    except OSError:
        return False


def limited_write(fd, data):
    if not is_limited(fd):
        return _os_write(fd, data)
    view = memoryview(data).cast("B")
    if view.nbytes and not _budget["remaining"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    written = _os_write(fd, view[:_budget["remaining"]])
    _budget["remaining"] -= written
    return written


def limited_copy_file_range(source, destination, count, offset_source=None, offset_destination=None):
    """Copy through limited_write, so that the budget also covers copies made by the kernel."""
    if not is_limited(destination) or offset_destination is not None:
        return _copy_file_range(source, destination, count, offset_source, offset_destination)
    data = os.read(source, count) if offset_source is None else os.pread(source, count, offset_source)
    return limited_write(destination, data)


_copy_file_range = os.copy_file_range


class LimitedFileIO(io.FileIO):
    def write(self, data):
        return limited_write(self.fileno(), data)


def limited_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
    writing = any(flag in mode for flag in "wax+")
    if isinstance(file, int) or not writing or _budget["directory"] not in Path(os.path.abspath(file)).parents:
        return _open(file, mode, buffering, encoding, errors, newline, closefd, opener)
    raw = LimitedFileIO(file, mode.replace("b", "").replace("t", ""), closefd=closefd, opener=opener)
    buffered = io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)
    if "b" in mode:
        return buffered
    return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, newline=newline)


def save_file_through_open(tensors, filename, metadata=None):
    from safetensors.torch import save

    with open(filename, "wb") as handle:
        handle.write(save(tensors, metadata=metadata))


def install(directory, limit):
    """Fail writes under ``directory`` with ENOSPC once ``limit`` bytes are written there."""
    import safetensors.torch

    _budget.update(directory=Path(os.path.abspath(directory)), remaining=limit)
    builtins.open = io.open = limited_open
    os.write, os.copy_file_range = limited_write, limited_copy_file_range
    shutil._USE_CP_SENDFILE = False
    safetensors.torch.save_file = save_file_through_open


def run_api_cases(directory, limit, real):
    """Write through atomic_write, save_tensors and atomic_directory into a full DIR; print one JSON line each."""
    import torch

    from llmforge.checkpoint import RUN_RECORD_NAME, atomic_directory, atomic_write, save_tensors, write_json
    from llmforge.errors import ForgeError

    def write_notes():
        with atomic_write(directory / "notes.bin") as handle:
            for _ in range(8):
                handle.write(os.urandom(256 << 10))

    def write_vector():
        save_tensors(directory / "vector.safetensors", {"w": torch.ones(1 << 19)})

    def write_model():
        with atomic_directory(directory / "model") as staging:
            write_json(staging / "config.json", {"hidden_size": 32})
            save_tensors(staging / "model.safetensors", {"w": torch.ones(1 << 19)})
            write_json(staging / RUN_RECORD_NAME, {})

    (directory / "notes.bin").write_bytes(b"old notes\n")
    for case, write in (("atomic_write", write_notes), ("save_tensors", write_vector), ("atomic_directory", write_model)):
        if not real:
            install(directory, limit)
        try:
            write()
            error = None
        except ForgeError as raised:
            error = raised
        entries = {path.relative_to(directory).as_posix(): path.stat().st_size for path in directory.rglob("*")}
        print(json.dumps({"case": case, "error": type(error).__name__, "message": str(error),
                          "entries": entries, "notes": (directory / "notes.bin").read_bytes().decode()}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "api":
        run_api_cases(Path(sys.argv[2]), 512 << 10, "--real" in sys.argv)
    else:
        install(os.environ["FAULT_DIR"], int(os.environ["FAULT_LIMIT"]))
        from llmforge.cli import main

        sys.argv = ["forge", *sys.argv[2:]]
        main()
'''

# The kill test: KILLS writers of one root directory, each killed after a seeded random delay.
KILLS = 44
KILL_SEED = 11
MAX_KILL_DELAY_SECONDS = 0.3
# Generations of the writes that the test itself makes after a kill; the writers use 1000 * trial upward.
REWRITE_FIRST = 1_000_000
# The merge kill test: MERGE_KILLS runs of `forge edit merge`, killed at most this long after staging begins.
MERGE_KILLS = 6
MAX_MERGE_KILL_DELAY_SECONDS = 0.25

STAGING_NAME = re.compile(r"\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[A-Za-z0-9_]+\.(?P<kind>tmp|old)")


def load_script(tmp_path: Path, name: str, source: str) -> tuple[Path, ModuleType]:
    """Write a child script into ``tmp_path`` and import it, so the test uses its content functions too."""
    script = tmp_path / f"{name}.py"
    script.write_text(source)
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return script, module


def child_env(**variables: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **variables}


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: tensor.numpy().tobytes() for name, tensor in tensors.items()}


def read_generation(writer: ModuleType, path: Path) -> int:
    """Return the generation of the complete output at ``path``; fail the test when it is incomplete."""
    from llmforge.checkpoint import read_metadata

    if path.name.endswith(".safetensors"):
        generation = int(read_metadata(path)["generation"])
        assert tensor_bytes(load_tensors(path)) == tensor_bytes(writer.tensors(generation)), path
        return generation
    if path.name.endswith(".bin"):
        first_line = path.read_bytes().split(b"\n", 1)[0].decode()
        generation = int(first_line.removeprefix("generation "))
        assert path.read_bytes() == writer.notes(generation), path
        return generation

    assert (path / RUN_RECORD_NAME).is_file(), f"{path} has no run record"
    generation = json.loads((path / RUN_RECORD_NAME).read_text())["generation"]
    files = {file.relative_to(path).as_posix() for file in path.rglob("*")}
    assert files == writer.DIRECTORY_FILES, f"{path} has files {sorted(files)}"
    model = path / "model.safetensors"
    assert int(read_metadata(model)["generation"]) == generation, path
    assert tensor_bytes(load_tensors(model)) == tensor_bytes(writer.tensors(generation)), path
    assert json.loads((path / "config.json").read_text()) == writer.config(generation), path
    assert (path / "notes.bin").read_bytes() == writer.notes(generation), path
    return generation


def staging_entries(root: Path) -> list[re.Match]:
    """Return the staging entries in ``root``; fail on any other entry that is not a final output name."""
    entries = []
    for name in sorted(os.listdir(root)):
        match = STAGING_NAME.fullmatch(name)
        if match is not None:
            entries.append(match)
        else:
            assert not name.startswith("."), f"{name} is neither an output nor a staging entry"
    return entries


def kill_writer(server: subprocess.Popen, log: Path, first: int, delay: float) -> tuple[int, bool]:
    """Let the server fork a writer, SIGKILL it after ``delay`` seconds and have it reaped.

    Returns the writer's pid and whether the kill landed inside a write, between "enter" and "done".
    """
    server.stdin.write(f"write {first} {log}\n")
    server.stdin.flush()
    pid = int(server.stdout.readline())
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    server.stdin.write(f"reap {pid}\n")
    server.stdin.flush()
    assert server.stdout.readline() == "reaped\n"
    lines = log.read_text().splitlines() if log.exists() else []
    return pid, bool(lines) and lines[-1].startswith("enter ")


def check_after_kill(writer: ModuleType, root: Path, pid: int, rewrite_generation: int) -> tuple[int, bool]:
    """Check ROOT after a writer was killed, then write each target it left staging entries of once more.

    Returns how many staging entries the kill left and whether one was a ".old" directory of an
    output that the kill had moved aside.
    """
    left = staging_entries(root)
    assert {int(match["pid"]) for match in left} <= {pid}, "staging entries of earlier writers remain"
    targets = {match["target"] for match in left}
    assert targets <= set(writer.TARGETS), targets
    for name in sorted(set(os.listdir(root)) - {match.string for match in left}):
        read_generation(writer, root / name)
    moved_aside = any(match["kind"] == "old" and not (root / match["target"]).exists() for match in left)

    for number, target in enumerate(sorted(targets)):
        writer.write_output(root, target, rewrite_generation + number)
    assert staging_entries(root) == []
    for name in os.listdir(root):
        read_generation(writer, root / name)
    return len(left), moved_aside


@pytest.mark.slow
def test_killed_writers_leave_outputs_whole(tmp_path):
    script, writer = load_script(tmp_path, "output_fault_writer", WRITER_SOURCE)
    root = tmp_path / "outputs"
    root.mkdir()
    rng = random.Random(KILL_SEED)
    kills_mid_write = kills_leaving_staging = kills_moving_aside = 0

    server = subprocess.Popen([sys.executable, str(script), "serve", str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert server.stdout.readline() == "ready\n"
        for trial in range(KILLS):
            log = tmp_path / f"writer-{trial}.log"
            pid, mid_write = kill_writer(server, log, 1000 * trial, rng.uniform(0.0, MAX_KILL_DELAY_SECONDS))
            kills_mid_write += mid_write
            left, moved_aside = check_after_kill(writer, root, pid, REWRITE_FIRST + 10 * trial)
            kills_leaving_staging += left > 0
            kills_moving_aside += moved_aside
    finally:
        server.stdin.close()
        server.wait(timeout=60)

    # Every target was written, and most kills must land inside a write, or the test shows little.
    assert sorted(os.listdir(root)) == sorted(writer.TARGETS)
    print(f"{kills_mid_write} of {KILLS} kills landed inside a write, {kills_leaving_staging} left staging "
          f"entries, {kills_moving_aside} came between the two renames of an overwrite")
    assert kills_mid_write >= KILLS // 2, kills_mid_write
    assert kills_leaving_staging >= KILLS // 4, kills_leaving_staging


# The real command: forge edit merge


def make_task_vector(base: Path, path: Path) -> Path:
    from llmforge.models import model_digest

    weights = {}
    for file in sorted(base.glob("*.safetensors")):
        weights.update(load_tensors(file))
    save_task_vector(path, {name: torch.full(tensor.shape, 0.01) for name, tensor in weights.items()},
                     base_digest=model_digest(str(base)), tuned_digest="sha256:tuned", extra={"layout": "dense"})
    return path


def kill_merge(command: list[str], output: Path, delay: float, env: dict[str, str]) -> tuple[int, bool]:
    """Start `forge edit merge`, SIGKILL it ``delay`` seconds after its staging directory appears.

    Returns the pid and whether the kill came while the staging directory existed and the command ran.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    pattern = f".{output.name}.*-{process.pid}-*.tmp"  # the staging directory of this run, not of a killed one
    while not list(output.parent.glob(pattern)) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    mid_write = process.poll() is None and bool(list(output.parent.glob(pattern)))
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, -signal.SIGKILL), stderr
    return process.pid, mid_write


@pytest.mark.slow
def test_killed_merge_leaves_no_partial_output(tiny_model_dir, tmp_path, forge_env):
    vector = make_task_vector(tiny_model_dir, tmp_path / "tv.safetensors")
    output = tmp_path / "out" / "merged"
    output.parent.mkdir()
    command = [str(FORGE), "edit", "merge", "--base", str(tiny_model_dir), "--vector", str(vector), "-o", str(output),
               "--overwrite", "--quiet"]
    env = {**forge_env, "OMP_NUM_THREADS": "1"}
    rng = random.Random(KILL_SEED)
    kills_mid_write = 0
    complete_digests = set()

    for _ in range(MERGE_KILLS):
        pid, mid_write = kill_merge(command, output, rng.uniform(0.0, MAX_MERGE_KILL_DELAY_SECONDS), env)
        kills_mid_write += mid_write
        left = staging_entries(output.parent)
        assert {match["target"] for match in left} <= {"merged"}, left
        if mid_write:
            # The run removed the staging entries of the runs killed before it, then made its own.
            assert {int(match["pid"]) for match in left} == {pid}, left
        if output.exists():
            assert (output / RUN_RECORD_NAME).is_file(), "the output exists without its run record"
            complete_digests.add(file_digest(output / "model.safetensors"))

    # One more merge into the same output removes every staging entry the killed runs left.
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert os.listdir(output.parent) == ["merged"]
    record = json.loads((output / RUN_RECORD_NAME).read_text())
    assert record["merged_tensors"] > 0
    # Every output that a kill left under the final name has the weights of a finished merge.
    assert complete_digests <= {file_digest(output / "model.safetensors")}
    print(f"{kills_mid_write} of {MERGE_KILLS} merge kills landed while the staging directory existed")
    assert kills_mid_write >= MERGE_KILLS // 2, kills_mid_write


# Stale staging entries, one case at a time


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def staging_name(target: Path, pid: int, kind: str, host: str | None = None) -> Path:
    """Return the path of a staging entry of ``target`` owned by ``pid`` on ``host`` (default: this host)."""
    host = host or staging_prefix(target).removeprefix(f".{target.name}.").split("-")[0]
    return target.with_name(f".{target.name}.{host}-{pid}-abc_12.{kind}")


def test_stale_staging_removed_only_for_dead_owners(tmp_path):
    target = tmp_path / "notes.bin"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other_host = "0" * 8 if staging_name(target, 1, "tmp") != staging_name(target, 1, "tmp", "0" * 8) else "1" * 8
        dead = staging_name(target, dead_pid(), "tmp")
        kept_entries = [staging_name(target, live.pid, "tmp"),
                staging_name(target, dead_pid(), "tmp", other_host),
                tmp_path / ".notes.bin.abc_12.tmp",  # written before staging names carried an owner
                staging_name(tmp_path / "notes.bin.gz", dead_pid(), "tmp")]  # staging of another target
        for path in [dead, *kept_entries]:
            path.write_bytes(b"partial")

        with atomic_write(target) as handle:
            handle.write(b"notes")

        assert not dead.exists()
        assert sorted(tmp_path.iterdir()) == sorted([target, *kept_entries])
    finally:
        live.kill()
        live.wait()


def test_stale_staging_directory_removed_on_next_write(tmp_path):
    target = tmp_path / "merged"
    stale = staging_name(target, dead_pid(), "tmp")
    (stale / "nested").mkdir(parents=True)
    (stale / "nested" / "model.safetensors").write_bytes(b"partial")

    with atomic_directory(target) as staging:
        assert not target.exists()
        (staging / RUN_RECORD_NAME).write_text("{}")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_killed_overwrite_gets_old_output_back(tmp_path):
    target = tmp_path / "merged"
    retired = staging_name(target, dead_pid(), "old")
    (retired / "merged").mkdir(parents=True)
    (retired / "merged" / RUN_RECORD_NAME).write_text('{"generation": 1}')

    assert remove_stale_staging(target) == [retired]

    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]
    assert json.loads((target / RUN_RECORD_NAME).read_text()) == {"generation": 1}


def test_run_record_written_last_in_every_output():
    """Every `with atomic_directory(...)` block that keeps the default marker ends by writing the run record."""
    blocks = 0
    for source in sorted([*REPOSITORY.glob("llmforge/**/*.py"), *REPOSITORY.glob("plugins/**/*.py")]):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if not isinstance(node, ast.With):
                continue
            calls = [item.context_expr for item in node.items if isinstance(item.context_expr, ast.Call)]
            staged = [call for call in calls if getattr(call.func, "id", None) == "atomic_directory"]
            if not staged or any(keyword.arg == "marker" for keyword in staged[0].keywords):
                continue
            blocks += 1
            last = node.body[-1]
            where = f"{source.relative_to(REPOSITORY)}:{last.lineno}"
            assert isinstance(last, ast.Expr) and isinstance(last.value, ast.Call), where
            assert getattr(last.value.func, "id", None) == "write_json", where
            assert "RUN_RECORD_NAME" in ast.unparse(last.value.args[0]), where
    assert blocks >= 8


# Disk full


def make_tuned_copy(base: Path, path: Path) -> Path:
    """Copy the tiny model with every floating-point weight shifted by 0.01, as a stand-in for a fine-tune."""
    shutil.copytree(base, path)
    for file in path.glob("*.safetensors"):
        shifted = {name: tensor + 0.01 if tensor.is_floating_point() else tensor
                   for name, tensor in load_tensors(file).items()}
        save_tensors(file, shifted, {"format": "pt"})
    return path


def check_api_cases(lines: list[str], directory: Path) -> None:
    """Check the lines of `faults.py api`: each write raised DiskFullError and left DIR as it was."""
    cases = [json.loads(line) for line in lines]
    assert [case["case"] for case in cases] == ["atomic_write", "save_tensors", "atomic_directory"]
    names = {"atomic_write": "notes.bin", "save_tensors": "vector.safetensors", "atomic_directory": "model"}
    for case in cases:
        assert case["error"] == DiskFullError.__name__, case
        assert case["message"] == (f"cannot write {directory / names[case['case']]}: no space left on device; "
                                   "free space on its file system or write the output elsewhere"), case
        assert case["entries"] == {"notes.bin": 10}, case
        assert case["notes"] == "old notes\n", case


def check_cli_result(returncode: int, stderr: str, output: Path) -> None:
    assert returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"Error: cannot write {output}: no space left on device; free space on its file system" in stderr


def test_disk_full_injected_api(tmp_path):
    script, _ = load_script(tmp_path, "faults", FAULT_SOURCE)
    directory = tmp_path / "full"
    directory.mkdir()

    result = subprocess.run([sys.executable, str(script), "api", str(directory)], capture_output=True, text=True,
                            env=child_env(), timeout=300)

    assert result.returncode == 0, result.stderr
    check_api_cases(result.stdout.splitlines(), directory)
    assert os.listdir(directory) == ["notes.bin"]


def test_disk_full_injected_cli(tiny_model_dir, tmp_path, forge_env):
    script, _ = load_script(tmp_path, "faults", FAULT_SOURCE)
    tuned = make_tuned_copy(tiny_model_dir, tmp_path / "tuned")
    directory = tmp_path / "full"
    directory.mkdir()
    output = directory / "tv.safetensors"

    result = subprocess.run([sys.executable, str(script), "cli", "edit", "diff", "--base", str(tiny_model_dir),
                             "--tuned", str(tuned), "-o", str(output), "--quiet"], capture_output=True, text=True,
                            env={**forge_env, **child_env(FAULT_DIR=str(directory), FAULT_LIMIT=str(1 << 20))},
                            timeout=300)

    check_cli_result(result.returncode, result.stderr, output)
    assert os.listdir(directory) == []


def mount_namespace_flags(mount_point: Path) -> list[str] | None:
    """Return the unshare flags under which this process can mount a tmpfs, or None.

    As root, a private mount namespace (-m) suffices. Other users need the user namespace of -r,
    which makes them root inside it where the kernel allows unprivileged user namespaces.
    """
    if shutil.which("unshare") is None:
        return None
    for flags in (["-m"], ["-r", "-m"]) if os.geteuid() == 0 else (["-r", "-m"],):
        probe = subprocess.run(["unshare", *flags, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh",
                                str(mount_point)], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return flags
    return None


SMALL_FILESYSTEM_SCRIPT = r'''
set -u
mount -t tmpfs -o size=1m tmpfs "$DIR" || exit 90
"$PYTHON" "$FAULTS" api "$DIR" --real > "$RESULTS/api.jsonl" 2> "$RESULTS/api.err"
echo $? > "$RESULTS/api.rc"
rm -f "$DIR/notes.bin"
"$FORGE" edit diff --base "$BASE" --tuned "$TUNED" -o "$DIR/tv.safetensors" --quiet 2> "$RESULTS/cli.err"
echo $? > "$RESULTS/cli.rc"
ls -A "$DIR" > "$RESULTS/cli.ls"
'''


def test_disk_full_small_filesystem(tiny_model_dir, tmp_path, forge_env):
    directory = tmp_path / "small"
    directory.mkdir()
    flags = mount_namespace_flags(directory)
    if flags is None:
        pytest.skip("cannot mount a tmpfs here: unshare is missing or mount namespaces are not allowed")
    script, _ = load_script(tmp_path, "faults", FAULT_SOURCE)
    tuned = make_tuned_copy(tiny_model_dir, tmp_path / "tuned")
    results = tmp_path / "results"
    results.mkdir()

    # The tmpfs of 1 MB exists only inside the mount namespace, so the script records what it finds there.
    env = {**forge_env, **child_env(DIR=str(directory), PYTHON=sys.executable, FAULTS=str(script), FORGE=str(FORGE),
                                    BASE=str(tiny_model_dir), TUNED=str(tuned), RESULTS=str(results))}
    run = subprocess.run(["unshare", *flags, "bash", "-c", SMALL_FILESYSTEM_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)

    assert run.returncode == 0, run.stderr
    assert (results / "api.rc").read_text().strip() == "0", (results / "api.err").read_text()
    check_api_cases((results / "api.jsonl").read_text().splitlines(), directory)
    check_cli_result(int((results / "cli.rc").read_text()), (results / "cli.err").read_text(),
                     directory / "tv.safetensors")
    assert (results / "cli.ls").read_text() == ""
    assert os.listdir(directory) == []
