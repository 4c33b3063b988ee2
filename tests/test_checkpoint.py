"""Checkpoint IO: atomic writes, safetensors header checks, task vectors, run records."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from llmforge.checkpoint import (
    atomic_directory,
    atomic_write,
    compute_task_vector,
    load_task_vector,
    load_tensors,
    read_metadata,
    run_record,
    save_task_vector,
    save_tensors,
    tensors_digest,
    write_json,
)
from llmforge.errors import ForgeError


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(4, 3, generator=generator),
        "bias": torch.randn(3, generator=generator).to(torch.bfloat16),
        "steps": torch.arange(5),
    }


def test_save_load_roundtrip(tmp_path):
    tensors = sample_tensors()
    save_tensors(tmp_path / "t.safetensors", tensors, {"note": "x"})

    loaded = load_tensors(tmp_path / "t.safetensors")

    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert read_metadata(tmp_path / "t.safetensors") == {"note": "x"}


def test_loaded_tensors_do_not_write_back(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": torch.zeros(3)})

    loaded = load_tensors(path)
    loaded["w"] += 1

    assert torch.equal(load_tensors(path)["w"], torch.zeros(3))


def test_digest_depends_on_content_not_order():
    tensors = sample_tensors()
    reordered = dict(reversed(list(tensors.items())))
    changed = {**tensors, "weight": tensors["weight"] + 1e-3}

    assert tensors_digest(tensors) == tensors_digest(reordered)
    assert tensors_digest(tensors) != tensors_digest(changed)


@pytest.mark.parametrize("cut", [1, 7, 20, -1, -8])
def test_truncated_safetensors_rejected(tmp_path, cut):
    path = tmp_path / "t.safetensors"
    save_tensors(path, sample_tensors())
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])

    with pytest.raises(ForgeError, match="truncated|corrupt|damaged"):
        load_tensors(path)


def test_header_with_lying_offsets_rejected(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"w": torch.zeros(4)})
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["w"]["data_offsets"] = [0, 64]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])

    with pytest.raises(ForgeError, match="offsets"):
        load_tensors(path)


def test_huge_header_length_rejected(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")

    with pytest.raises(ForgeError, match="corrupt safetensors header"):
        load_tensors(path)


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as handle:
            handle.write("new")
            raise RuntimeError("interrupted")

    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_directory_refuses_existing(tmp_path):
    target = tmp_path / "run"
    target.mkdir()

    with pytest.raises(ForgeError, match="already exists.*--overwrite"):
        with atomic_directory(target):
            pass


def test_atomic_directory_failure_leaves_nothing(tmp_path):
    target = tmp_path / "run"

    with pytest.raises(RuntimeError):
        with atomic_directory(target) as work:
            (work / "adapter_model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed")

    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_overwrite_replaces(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "forge_run.json").write_text("{}")

    with atomic_directory(target, overwrite=True) as work:
        (work / "new.txt").write_text("new")

    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_task_vector_roundtrip(tmp_path):
    base = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    tuned = {"a": torch.full((2, 2), 3.0), "b": torch.ones(3)}
    vector = compute_task_vector(base, tuned)
    save_task_vector(tmp_path / "tv.safetensors", vector, base_digest="sha256:b", tuned_digest="sha256:t")

    loaded, metadata = load_task_vector(tmp_path / "tv.safetensors")

    assert torch.equal(loaded["a"], torch.full((2, 2), 2.0))
    assert torch.equal(loaded["b"], torch.ones(3))
    assert metadata["base_digest"] == "sha256:b"
    assert metadata["tuned_digest"] == "sha256:t"
    assert metadata["format_version"] == "1"


def test_task_vector_shape_mismatch_rejected():
    with pytest.raises(ForgeError, match="shape"):
        compute_task_vector({"a": torch.ones(2)}, {"a": torch.ones(3)})


def test_plain_safetensors_is_not_task_vector(tmp_path):
    save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(1)})

    with pytest.raises(ForgeError, match="not a forge task vector"):
        load_task_vector(tmp_path / "x.safetensors")


def test_run_record_has_versions(tmp_path):
    record = run_record(["forge", "x"], seed=3)
    write_json(tmp_path / "r.json", record)

    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["command"] == ["forge", "x"]
    assert loaded["seed"] == 3
    assert torch.__version__.startswith(loaded["versions"]["torch"].split("+")[0])
    assert loaded["versions"]["llmforge"] == "0.1.0"


def test_overwrite_refuses_foreign_directory(tmp_path):
    target = tmp_path / "victim"
    target.mkdir()
    (target / "data.txt").write_text("precious")

    with pytest.raises(ForgeError, match="not written by forge"):
        with atomic_directory(target, overwrite=True):
            pass

    assert (target / "data.txt").read_text() == "precious"


def test_overwrite_refuses_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "forge_run.json").write_text("{}")

    with pytest.raises(ForgeError, match="current directory"):
        with atomic_directory(tmp_path / ".", overwrite=True):
            pass


def test_outputs_follow_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "run") as work:
            save_tensors(work / "w.safetensors", {"w": torch.ones(1)})
            write_json(work / "forge_run.json", {})
    finally:
        os.umask(old)

    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "run" / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run" / "forge_run.json").stat().st_mode & 0o777 == 0o644
