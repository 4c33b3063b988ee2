"""Fault injection for the shared cache: writers killed with SIGKILL, and four processes sharing one cache.

Both tests run the writer script below in child processes, so that a kill or a race hits the real
file operations of llmforge.cache. The script derives every entry's content from the index in its
key, so any process can check what it reads back byte for byte.
"""

from __future__ import annotations

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
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from conftest import FORGE
from llmforge.cache import Cache

WRITER_SOURCE = r'''
"""Cache writer of test_cache_faults: every entry's content follows from the index in its key.

Usage: writer.py write FIRST | rewrite INDEX... | worker CALLS_FILE WORKER. The cache is $FORGE_CACHE.
"""

import functools
import hashlib
import itertools
import json
import os
import random
import struct
import sys
import time

from llmforge.cache import Cache, CacheKey

# Indices from TORCH_FIRST on are tensor entries made by get_or_compute, which needs torch.
TORCH_FIRST = 1000
# The kill test uses indices below 500 within each thousand: entries of 1 to 3 MB, and put_json.
# The concurrency test uses the rest: entries of 64 to 192 KB, each made through a compute callback.
SHARED_FIRST = 500
CHUNK_BYTES = 256 << 10
ROUND_STRIDE = 20


def kind_of(index):
    if index >= TORCH_FIRST:
        return "torch"
    kinds = ("stream", "json", "dir", "put") if index < SHARED_FIRST else ("stream", "json", "dir")
    return kinds[index % len(kinds)]


def keys_of(index):
    """Return the keys of one index. A tensor entry gets a second key with identical content."""
    kind = kind_of(index)
    aliases = (0, 1) if kind in ("stream", "torch") else (0,)
    return [CacheKey(f"fault-{kind}", {}, {"index": index, "alias": alias}) for alias in aliases]


@functools.lru_cache(maxsize=4)
def payload(index):
    unit = 1 << 20 if index % 1000 < SHARED_FIRST else 64 << 10
    return random.Random(index).randbytes((1 + index % 3) * unit)


def canonical(document):
    return json.dumps(document, sort_keys=True).encode()


def document(index):
    return {"index": index, "hex": payload(index).hex()}


def safetensors_bytes(data):
    """Encode ``data`` as a safetensors file with one U8 tensor named "data"."""
    header = json.dumps({"data": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def expected_files(index):
    """Map each file of the entry to its bytes: "" names a single-file blob, "w" the tensor."""
    kind, data = kind_of(index), payload(index)
    if kind == "stream":
        return {"": safetensors_bytes(data)}
    if kind in ("json", "put"):
        return {"": canonical(document(index))}
    if kind == "dir":
        half = len(data) // 2
        return {"part-0.bin": data[:half], "nested/part-1.bin": data[half:], "index.json": canonical({"index": index})}
    return {"w": data}


def files_digest(files):
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}|{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def read_directory(path):
    return {file.relative_to(path).as_posix(): file.read_bytes() for file in path.rglob("*") if file.is_file()}


def read_tensors(tensors):
    return {name: tensor.numpy().tobytes() for name, tensor in tensors.items()}


def read_blob(kind, blob):
    """Read a blob back into the form of expected_files. A damaged safetensors file raises ForgeError."""
    from llmforge.checkpoint import load_tensors
    from llmforge.safetensors_header import read_safetensors_header

    if kind == "torch":
        return read_tensors(load_tensors(blob))
    if kind in ("json", "put"):
        return {"": canonical(json.loads(blob.read_text()))}
    if kind == "dir":
        return read_directory(blob)
    read_safetensors_header(blob)
    return {"": blob.read_bytes()}


def write_chunks(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for start in range(0, len(data), CHUNK_BYTES):
            handle.write(data[start:start + CHUNK_BYTES])
            handle.flush()


def make_entry(cache, key, on_compute):
    """Get the entry of ``key`` through the cache API of its kind, computing it if absent, and return the API's result.

    ``on_compute(key)`` runs first in each producer, so it counts the computations. put_json has no
    producer, so for "put" it runs when the key had no entry just before the call.
    """
    index = key.params["index"]
    kind = kind_of(index)

    if kind == "stream":
        def write(path):
            on_compute(key)
            write_chunks(path, expected_files(index)[""])

        return cache.get_or_write_tensors(key, write)

    if kind == "json":
        def compute_document():
            on_compute(key)
            return document(index)

        return cache.get_or_compute_json(key, compute_document)

    if kind == "put":
        if cache.lookup(key) is None:
            on_compute(key)
        cache.put_json(key, document(index))
        return cache.lookup_json(key)

    if kind == "dir":
        def fill(path):
            on_compute(key)
            for name, data in expected_files(index).items():
                write_chunks(path / name, data)

        return cache.get_or_compute_dir(key, fill)

    import torch

    def compute_tensors():
        on_compute(key)
        return {"w": torch.frombuffer(bytearray(payload(index)), dtype=torch.uint8)}

    return cache.get_or_compute(key, compute_tensors)


def read_result(kind, result):
    """Turn what make_entry returned into the form of expected_files."""
    if kind == "torch":
        return read_tensors(result)
    if kind in ("json", "put"):
        return {"": canonical(result)}
    if kind == "dir":
        return read_directory(result)
    return read_blob(kind, result)


def worker_indices(round_number, worker):
    """Return the indices one of four workers requests in a round: some shared by all, some by two, some its own."""
    base = SHARED_FIRST + ROUND_STRIDE * round_number
    torch_base = TORCH_FIRST + SHARED_FIRST + 4 * round_number
    everyone = [base + j for j in range(6)] + [torch_base + j for j in range(2)]
    pair = [base + 6 + 3 * (worker // 2) + j for j in range(3)] + [torch_base + 2 + worker // 2]
    own = [base + 12 + 2 * worker + j for j in range(2)]
    return everyone + pair + own


def run_writer(first):
    """Write entries FIRST, FIRST + 1, ... until killed, printing when each key's producer starts and returns."""
    cache = Cache()
    if first >= TORCH_FIRST:
        import torch  # noqa: F401 (imported before "ready", so the kill delay does not include it)
    print("ready", flush=True)
    for index in itertools.count(first):
        print(f"start {index}", flush=True)
        for key in keys_of(index):
            make_entry(cache, key, lambda key: print("entered", flush=True))
            print("stored", flush=True)


def report_computed(key):
    print(f"computed {key.params['index']} {key.params['alias']}", flush=True)


def run_rewrite(indices):
    """Request every key of ``indices`` again and check what the cache returns."""
    cache = Cache()
    for index in indices:
        for key in keys_of(index):
            if read_result(kind_of(index), make_entry(cache, key, report_computed)) != expected_files(index):
                sys.exit(f"entry {index} alias {key.params['alias']} reads back different content")


def run_worker(calls_file, worker):
    """Serve rounds read from stdin: request this worker's keys in a shuffled order, print digests of what came back."""
    import torch  # noqa: F401

    def count_call(key):
        line = f"{key.params['index']} {key.params['alias']} {worker}\n".encode()
        handle = os.open(calls_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(handle, line)
        finally:
            os.close(handle)
        # A slow producer holds the key lock longer, so other workers asking for the key wait on it.
        time.sleep(random.uniform(0.01, 0.04))

    cache = Cache()
    print("ready", flush=True)
    for line in sys.stdin:
        round_number = int(line)
        keys = [key for index in worker_indices(round_number, worker) for key in keys_of(index)]
        random.Random(100 * round_number + worker).shuffle(keys)
        for key in keys:
            files = read_result(kind_of(key.params["index"]), make_entry(cache, key, count_call))
            read = {"index": key.params["index"], "alias": key.params["alias"], "digest": files_digest(files)}
            print(json.dumps(read), flush=True)
        print("done", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "write":
        run_writer(int(sys.argv[2]))
    elif mode == "rewrite":
        run_rewrite([int(index) for index in sys.argv[2:]])
    else:
        run_worker(sys.argv[2], int(sys.argv[3]))
'''

# The kill test: 10 caches, each hit by 5 killed writers in turn. The last cache gets torch entries.
KILL_GROUPS = 10
KILLS_PER_GROUP = 5
KILL_SEED = 8
MAX_KILL_DELAY_SECONDS = 0.3
# The concurrency test: 4 workers, which request a new set of keys in each round.
WORKERS = 4
ROUNDS = 6

RECORD_NAME = re.compile(r"[0-9a-f]{64}\.json")
BLOB_NAME = re.compile(r"[0-9a-f]{64}(\.safetensors|\.json)?")


def load_writer(tmp_path: Path) -> tuple[Path, ModuleType]:
    """Write the writer script into ``tmp_path`` and import it, so the test uses its content functions too."""
    script = tmp_path / "cache_fault_writer.py"
    script.write_text(WRITER_SOURCE)
    spec = importlib.util.spec_from_file_location("cache_fault_writer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return script, module


def cache_env(root: Path) -> dict[str, str]:
    return {**os.environ, "FORGE_CACHE": str(root), "OMP_NUM_THREADS": "1"}


def kill_writer(script: Path, root: Path, first: int, delay: float) -> tuple[set[int], bool]:
    """Start a writer and SIGKILL it ``delay`` seconds after it is ready.

    Returns the indices it started and whether the kill landed inside a producer call, that is
    while an entry was being computed, written, hashed, published or recorded.
    """
    process = subprocess.Popen([sys.executable, str(script), "write", str(first)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=cache_env(root))
    try:
        ready = process.stdout.readline()
        if ready == "ready\n":
            time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=60)

    assert ready == "ready\n", stderr
    assert process.returncode == -signal.SIGKILL, f"the writer ended by itself: {stderr}"
    lines = stdout.splitlines()
    started = {int(line.split()[1]) for line in lines if line.startswith("start ")}
    return started, bool(lines) and lines[-1] == "entered"


def stray_paths(root: Path) -> list[Path]:
    """Return what a killed writer left outside tmp/ and locks/: anything that is neither a record nor a blob."""
    stray = [path for path in root.glob("*") if path.name not in {"blobs", "refs", "locks", "tmp"}]
    stray += [path for path in (root / "blobs").glob("*") if not BLOB_NAME.fullmatch(path.name)]
    stray += [path for path in (root / "refs").rglob("*") if path.is_file() and not RECORD_NAME.fullmatch(path.name)]
    return stray


def assert_entries_whole(writer: ModuleType, root: Path) -> None:
    """Check that every entry the cache lists matches its digest and reads back as the content of its key."""
    cache = Cache(root)
    assert cache.verify() == []
    assert stray_paths(root) == []

    for ref, record in cache.records():
        assert record is not None, f"{ref} is not a valid record"
        index = record["params"]["index"]
        files = writer.read_blob(writer.kind_of(index), cache.blob_path(record))
        expected = writer.expected_files(index)
        assert writer.files_digest(files) == writer.files_digest(expected), f"{ref} reads back different content"


def missing_keys(writer: ModuleType, root: Path, indices: set[int]) -> set[tuple[int, int]]:
    cache = Cache(root)
    keys = [key for index in indices for key in writer.keys_of(index)]
    return {(key.params["index"], key.params["alias"]) for key in keys if cache.lookup(key) is None}


def verify_with_cli(root: Path) -> None:
    result = subprocess.run([str(FORGE), "cache", "verify", "--json"], capture_output=True, text=True,
                            env=cache_env(root), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["problems"] == []


@pytest.mark.slow
def test_killed_writers_leave_cache_whole(tmp_path):
    script, writer = load_writer(tmp_path)
    rng = random.Random(KILL_SEED)
    kills_mid_write = 0

    for group in range(KILL_GROUPS):
        root = tmp_path / f"cache-{group}"
        first = writer.TORCH_FIRST if group == KILL_GROUPS - 1 else 0
        started: set[int] = set()

        for _ in range(KILLS_PER_GROUP):
            indices, mid_write = kill_writer(script, root, first, rng.uniform(0.0, MAX_KILL_DELAY_SECONDS))
            started |= indices
            kills_mid_write += mid_write
            assert_entries_whole(writer, root)

        verify_with_cli(root)

        # A new process writes every started key again: it computes exactly the ones the kills left missing.
        missing = missing_keys(writer, root, started)
        rewrite = subprocess.run([sys.executable, str(script), "rewrite", *map(str, sorted(started))],
                                 capture_output=True, text=True, env=cache_env(root), timeout=300)
        assert rewrite.returncode == 0, rewrite.stderr
        lines = rewrite.stdout.splitlines()
        computed = {tuple(map(int, line.split()[1:])) for line in lines if line.startswith("computed ")}
        assert computed == missing
        assert missing_keys(writer, root, started) == set()
        assert_entries_whole(writer, root)
        shutil.rmtree(root, ignore_errors=True)

    # Most kills must land while an entry is being written, or the test shows little.
    print(f"{kills_mid_write} of {KILL_GROUPS * KILLS_PER_GROUP} kills landed inside a producer call")
    assert kills_mid_write >= KILL_GROUPS * KILLS_PER_GROUP // 2, kills_mid_write


def start_worker(script: Path, root: Path, calls: Path, worker: int, stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), "worker", str(calls), str(worker)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=cache_env(root))


def test_four_processes_share_one_cache(tmp_path):
    script, writer = load_writer(tmp_path)
    root, calls = tmp_path / "cache", tmp_path / "calls.log"
    logs = [open(tmp_path / f"worker-{worker}.err", "w") for worker in range(WORKERS)]
    workers = [start_worker(script, root, calls, worker, logs[worker]) for worker in range(WORKERS)]
    reads: list[dict] = []

    try:
        for process in workers:
            assert process.stdout.readline() == "ready\n"
        for round_number in range(ROUNDS):
            # All four start a round together, each with its keys in its own order.
            for process in workers:
                process.stdin.write(f"{round_number}\n")
                process.stdin.flush()
            for process in workers:
                for line in iter(process.stdout.readline, "done\n"):
                    assert line, "a worker ended before the round was done"
                    reads.append(json.loads(line))
        for process in workers:
            process.stdin.close()
        codes = [process.wait(timeout=60) for process in workers]
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()

    assert codes == [0] * WORKERS, [(tmp_path / f"worker-{worker}.err").read_text() for worker in range(WORKERS)]

    requested = {(key.params["index"], key.params["alias"])
                 for round_number in range(ROUNDS) for worker in range(WORKERS)
                 for index in writer.worker_indices(round_number, worker) for key in writer.keys_of(index)}
    counts = Counter(tuple(map(int, line.split()[:2])) for line in calls.read_text().splitlines())
    assert {key: count for key, count in counts.items() if count != 1} == {}
    assert set(counts) == requested

    expected = {index: writer.files_digest(writer.expected_files(index)) for index, _ in requested}
    wrong = [read for read in reads if read["digest"] != expected[read["index"]]]
    assert wrong == []
    assert len(reads) == sum(len(writer.keys_of(index)) for round_number in range(ROUNDS)
                             for worker in range(WORKERS) for index in writer.worker_indices(round_number, worker))

    verify_with_cli(root)
    assert_entries_whole(writer, root)
    # Keys of identical content share one blob.
    assert len(list((root / "blobs").iterdir())) == len(expected)
