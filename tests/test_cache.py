"""The shared tensor cache: compute once, concurrent processes, kill safety, verify and gc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmforge.cache import Cache, CacheKey
from llmforge.errors import ForgeError


def test_get_or_compute_runs_once(tmp_path):
    cache = Cache(tmp_path)
    key = CacheKey("task-vector", {"base": "sha256:aa"}, {"rank": 8})
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(6.0).reshape(2, 3)}

    first = cache.get_or_compute(key, compute)
    second = cache.get_or_compute(key, compute)

    assert calls == [1]
    assert torch.equal(first["w"], second["w"])


def test_keys_differ_by_params():
    base = CacheKey("eval-score", {"model": "sha256:1"}, {"limit": 10})
    other = CacheKey("eval-score", {"model": "sha256:1"}, {"limit": 20})

    assert base.digest != other.digest
    assert base.digest == CacheKey("eval-score", {"model": "sha256:1"}, {"limit": 10}).digest


@pytest.mark.parametrize("kind", ["../escape", "a/b", "", "UPPER", "x" * 80])
def test_kind_cannot_name_paths(kind):
    with pytest.raises(ValueError, match="invalid cache kind"):
        CacheKey(kind)


def test_failed_compute_leaves_no_entry(tmp_path):
    cache = Cache(tmp_path)
    key = CacheKey("eval-score")

    def compute():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_compute_json(key, compute)

    assert cache.lookup(key) is None
    assert list(cache.tmp.iterdir()) == []
    assert cache.verify() == []


def test_directory_entries(tmp_path):
    cache = Cache(tmp_path)

    def fill(directory: Path):
        (directory / "config.json").write_text("{}")
        (directory / "sub").mkdir()
        (directory / "sub" / "x.txt").write_text("x")

    path = cache.get_or_compute_dir(CacheKey("converted-model"), fill)

    assert (path / "sub" / "x.txt").read_text() == "x"
    assert cache.verify() == []


def test_verify_finds_corrupt_blob(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_compute(CacheKey("task-vector"), lambda: {"w": torch.ones(4)})
    blob = next(cache.blobs.iterdir())
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))

    problems = cache.verify()

    assert len(problems) == 1
    assert "content digest" in problems[0]["problem"]


def test_verify_finds_dangling_record(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_compute_json(CacheKey("eval-score"), lambda: {"acc": 1.0})
    for blob in cache.blobs.iterdir():
        blob.unlink()

    problems = cache.verify()

    assert [p["problem"] for p in problems] == [problems[0]["problem"]]
    assert "missing" in problems[0]["problem"]


def test_record_cannot_name_blob_outside(tmp_path):
    cache = Cache(tmp_path / "cache")
    key = CacheKey("eval-score")
    cache.get_or_compute_json(key, lambda: {"acc": 1.0})
    outside = tmp_path / "secret.json"
    outside.write_text('{"acc": 0.0}')
    ref = cache.ref_path(key)
    record = json.loads(ref.read_text())
    record["blob"] = "../../secret.json"
    ref.write_text(json.dumps(record))

    found = cache.lookup_json(key)
    problems = cache.verify()

    assert found is None
    assert [problem["entry"] for problem in problems] == [str(ref)]
    assert "names no valid blob" in problems[0]["problem"]
    with pytest.raises(ForgeError, match="not a content digest"):
        cache.blob_path(record)


def test_edited_json_entry_is_not_served(tmp_path):
    cache = Cache(tmp_path)
    key = CacheKey("eval-score", {"model": "sha256:1"})
    cache.get_or_compute_json(key, lambda: {"acc": 0.25})
    blob = cache.blob_path(cache.lookup(key))
    blob.write_text('{"acc": 0.99}')

    with pytest.raises(ForgeError, match=f"forge cache rm {key.digest[:16]}"):
        cache.lookup_json(key)
    with pytest.raises(ForgeError, match="is corrupt"):
        cache.get_or_compute_json(key, lambda: {"acc": 0.25})

    cache.remove([cache.ref_path(key)])
    assert cache.get_or_compute_json(key, lambda: {"acc": 0.25}) == {"acc": 0.25}


def test_remove_and_gc(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_compute_json(CacheKey("eval-score", {}, {"n": 1}), lambda: {"acc": 1.0})
    cache.get_or_compute_json(CacheKey("eval-score", {}, {"n": 2}), lambda: {"acc": 0.5})
    (cache.tmp / "stale.json").write_text("partial")
    os.utime(cache.tmp / "stale.json", (0, 0))

    refs = [ref for ref, _ in cache.records()]
    cache.remove(refs[:1])
    removed = cache.gc()

    assert len(cache.records()) == 1
    assert len(list(cache.blobs.iterdir())) == 1
    assert cache.tmp / "stale.json" in removed
    assert cache.verify() == []


def test_find_rejects_non_hex(tmp_path):
    with pytest.raises(ForgeError, match="invalid cache key"):
        Cache(tmp_path).find("../../etc")


WORKER = """
import sys, time, json, os
from llmforge.cache import Cache, CacheKey
cache = Cache(sys.argv[1])
log = sys.argv[2]
def compute():
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    return {"key": sys.argv[3], "payload": list(range(1000))}
result = cache.get_or_compute_json(CacheKey("eval-score", {}, {"name": sys.argv[3]}), compute)
assert result["key"] == sys.argv[3]
assert len(result["payload"]) == 1000
"""


def test_concurrent_processes_compute_once(tmp_path):
    log = tmp_path / "calls.log"
    names = ["same", "same", "same", "other"]
    processes = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "cache"), str(log), name]) for name in names
    ]
    codes = [process.wait(timeout=60) for process in processes]

    assert codes == [0, 0, 0, 0]
    assert len(log.read_text().split()) == 2
    assert Cache(tmp_path / "cache").verify() == []


WRITER = """
import sys, torch
from llmforge.cache import Cache, CacheKey
cache = Cache(sys.argv[1])
for index in range(10_000):
    cache.get_or_compute(CacheKey("task-vector", {}, {"i": index}), lambda: {"w": torch.randn(256, 256)})
"""


@pytest.mark.parametrize("delay", [0.8, 1.1, 1.4, 1.7, 2.0])
def test_killed_writer_leaves_no_corrupt_entry(tmp_path, delay):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()

    cache = Cache(tmp_path)
    assert cache.verify() == []
    for ref, record in cache.records():
        assert record is not None, ref
        assert json.loads(ref.read_text())["format"] == "tensors"


def test_lookup_json_reads_without_computing(tmp_path):
    cache = Cache(tmp_path / "cache")
    key = CacheKey("eval-score", {"model": "sha256:" + "0" * 64}, {"limit": 5})

    assert cache.lookup_json(key) is None
    cache.put_json(key, {"score": 0.5})
    assert cache.lookup_json(key) == {"score": 0.5}
    assert cache.lookup_json(CacheKey("eval-score", {"model": "sha256:" + "0" * 64}, {"limit": 6})) is None
