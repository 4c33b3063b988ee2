"""Checkpoint IO: atomic writes, validated safetensors files, task vectors and run records.

Every write goes to a temporary file or directory next to its destination and is flushed with
fsync before it is renamed into place. A killed process therefore leaves the old file or the
new one, and never a half-written file under the final name. The temporary names carry the
writer's host and pid, and the next write to the same name removes the temporary entries of
writers that no longer run (see ``llmforge.staging``). A full disk raises DiskFullError, a
ForgeError that names the output, after the temporary entry is removed.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from llmforge.errors import ForgeError
from llmforge.safetensors_header import read_safetensors_header
from llmforge.staging import remove_stale_staging, staging_prefix

if TYPE_CHECKING:
    import torch

TASK_VECTOR_FORMAT = "llmforge.task_vector"
# Every forge output directory contains this run record; --overwrite replaces only such directories.
RUN_RECORD_NAME = "forge_run.json"
TASK_VECTOR_FORMAT_VERSION = "1"
# A long run keeps its resumable state in OUTPUT.partial beside its output until the output is written.
PARTIAL_SUFFIX = ".partial"



def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskFullError(ForgeError):
    """A write failed because its file system is full (ENOSPC) or the disk quota is used up (EDQUOT)."""


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(path: Path, error: BaseException) -> DiskFullError | None:
    """Return the DiskFullError that names ``path`` when ``error`` means a full disk, else None."""
    if isinstance(error, DiskFullError):
        number = error.errno
    elif isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        number = error.errno
    else:
        return None
    full = DiskFullError(f"cannot write {path}: {os.strerror(number).lower()}; free space on its file system "
                         "or write the output elsewhere")
    full.errno = number
    return full


@contextlib.contextmanager
def _replacing(path: Path, *, in_directory: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success fsync that file and rename it to ``path``.

    With ``in_directory`` the temporary file lies in a staging directory of its own, for writers
    that create more files beside the path they are given. On any error the staging file or
    directory is removed. A full disk raises DiskFullError naming ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = None
    try:
        if in_directory:
            staging = Path(tempfile.mkdtemp(prefix=staging_prefix(path), suffix=".tmp", dir=path.parent))
            temporary = staging / path.name
        else:
            handle, name = tempfile.mkstemp(prefix=staging_prefix(path), suffix=".tmp", dir=path.parent)
            staging = temporary = Path(name)
            os.fchmod(handle, 0o666 & ~_umask())
            os.close(handle)
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # writers such as safetensors recreate the file with mode 0600
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if staging is not None and in_directory:
            shutil.rmtree(staging, ignore_errors=True)
        elif staging is not None:
            staging.unlink(missing_ok=True)
        full = _disk_full(path, error)
        if full is not None:
            raise full from error
        raise
    if in_directory:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; on success fsync it and rename it to ``path``."""
    with _replacing(Path(path)) as temporary:
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle


def check_output_directory(path: Path, *, overwrite: bool, marker: str | None = RUN_RECORD_NAME) -> None:
    """Raise ForgeError unless ``path`` may become an output directory.

    A missing path is fine. An existing one needs ``overwrite``, and even then it must be empty or
    contain ``marker`` (a forge run record), so that --overwrite never deletes unrelated files.
    The current directory and its parents are never replaced.
    """
    if not path.exists():
        for parent in path.absolute().parents:
            if parent.exists() and not parent.is_dir():
                raise ForgeError(f"cannot create output directory {path}: its parent {parent} is a file; "
                                 "choose another path")
        return
    if not path.is_dir():
        raise ForgeError(f"output path {path} exists and is not a directory; remove it or choose another path")
    if not overwrite:
        raise ForgeError(f"output directory {path} already exists; choose another path or pass --overwrite")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ForgeError(f"output directory {path} is the current directory or one of its parents; choose a subdirectory")
    if marker is not None and any(path.iterdir()) and not (path / marker).is_file():
        raise ForgeError(
            f"--overwrite would delete {path}, which is not empty and has no {marker}, so it was not written by forge; "
            "remove it yourself or choose another path"
        )


def check_output_apart(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Raise ForgeError when the output is one of ``inputs`` (label: path), contains one, or lies inside one.

    The finished output replaces its path, so an input there would be deleted, and an output
    written inside an input model directory would change that model. Inputs that are None or not
    paths on disk (built-in model names, ``demo:`` data) are skipped.
    """
    target = Path(output).resolve()
    for label, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        resolved = Path(path).resolve()
        if resolved == target or target in resolved.parents:
            raise ForgeError(f"output {output} would replace the {label} {path}, an input of this command; "
                             "write the output elsewhere")
        if resolved in target.parents:
            raise ForgeError(f"output {output} lies inside the {label} {path}, an input of this command; "
                             "write the output elsewhere")


def check_report_output(output: str | os.PathLike, *, schema_prefix: str,
                        inputs: dict[str, str | os.PathLike | None]) -> None:
    """Raise ForgeError unless `output` may receive a JSON report whose schema starts with `schema_prefix`.

    An existing file is replaced only when it is such a report, so a mistyped -o cannot destroy
    weights, data or a config. Inputs are checked as in check_output_apart.
    """
    check_output_apart(output, inputs)
    path = Path(output)
    if not path.exists():
        return
    schema = ""
    try:
        with open(path, "rb") as handle:
            # A JSON report starts with "{", so weights and data files are rejected without reading them whole.
            head = handle.read(64)
            if head.lstrip().startswith(b"{"):
                schema = json.loads(head + handle.read()).get("schema", "")
    except (OSError, ValueError, AttributeError):
        schema = ""
    if path.is_dir() or not isinstance(schema, str) or not schema.startswith(schema_prefix):
        raise ForgeError(f"{output} exists and is not a {schema_prefix.rstrip('/')} report, so it is kept; "
                         "remove it or choose another -o path")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, marker: str | None = RUN_RECORD_NAME) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success rename it to ``path``.

    ``check_output_directory`` decides whether an existing ``path`` may be replaced; the old
    directory is replaced only after the new one is complete. Callers write the ``marker`` file
    (the run record) last, so an output with a marker is complete. On any error the temporary
    directory is removed and ``path`` is left as it was, and a full disk raises DiskFullError
    naming ``path``. Staging entries that killed writers of ``path`` left are removed first.
    """
    path = Path(path)
    remove_stale_staging(path)
    check_output_directory(path, overwrite=overwrite, marker=marker)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ForgeError(f"cannot create output directory {path}: a parent path is a file; choose another path") from None
    temporary = None
    try:
        temporary = Path(tempfile.mkdtemp(prefix=staging_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(temporary, 0o777 & ~_umask())
        yield temporary
        _publish_directory(temporary, path)
    except BaseException as error:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        full = _disk_full(path, error)
        if full is not None:
            raise full from error
        raise
    _fsync_directory(path.parent)


def _publish_directory(temporary: Path, path: Path) -> None:
    """Fsync every file in ``temporary`` and rename it to ``path``, replacing an existing ``path``.

    An existing output is first moved into a ".old" staging directory. A kill between the two
    renames leaves no ``path``, and the next write to ``path`` moves the old output back.
    """
    for file in temporary.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    if path.exists():
        retired = Path(tempfile.mkdtemp(prefix=staging_prefix(path), suffix=".old", dir=path.parent))
        os.replace(path, retired / path.name)
        os.replace(temporary, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, path)


def partial_directory(output: str | os.PathLike) -> Path:
    """Return the in-progress directory of a run writing `output`: OUTPUT.partial beside it."""
    output = Path(output)
    return output.with_name(output.name + PARTIAL_SUFFIX)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def file_digest(path: str | os.PathLike) -> str:
    """Return ``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def tensors_digest(tensors: dict[str, "torch.Tensor"]) -> str:
    """Return ``sha256:<hex>`` over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def save_tensors(path: str | os.PathLike, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, atomically. Metadata values must be strings."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    # safetensors 0.8 writes a ".tmpXXXXXX" file beside the path it is given and renames it. In a
    # staging directory, a kill leaves that file where the next write's sweep removes it.
    with _replacing(Path(path), in_directory=True) as temporary:
        try:
            save_file(contiguous, str(temporary), metadata=metadata)
        except Exception as error:
            # safetensors 0.8 reports a failed write as SafetensorError with "I/O error: ...
            # (os error N)" in the message, not as OSError.
            found = re.search(r"\(os error (\d+)\)", str(error))
            if type(error).__name__ != "SafetensorError" or found is None:
                raise
            number = int(found.group(1))
            raise OSError(number, os.strerror(number), str(path)) from error


def load_tensors(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """Read a safetensors file after checking its header.

    The tensors are views into a private (copy-on-write) memory map of the file: pages are read
    on first touch and writing to a tensor never changes the file.
    """
    import mmap

    import torch

    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"safetensors file not found: {path}")
    header = read_safetensors_header(path)
    with open(path, "rb") as handle:
        data_start = 8 + struct.unpack("<Q", handle.read(8))[0]
    dtypes = {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    }

    tensors = {}
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in dtypes:
            raise ForgeError(f"{path}: tensor {name!r} has dtype {entry['dtype']} that forge cannot load")
        begin, end = entry["data_offsets"]
        dtype = dtypes[entry["dtype"]]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(entry["shape"])
    return tensors


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the ``__metadata__`` strings of a safetensors file (empty when it has none)."""
    return dict(read_safetensors_header(path).get("__metadata__") or {})


def compute_task_vector(base_state: dict[str, "torch.Tensor"], tuned_state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Return tuned minus base for every parameter the two state dicts share, in float32.

    Parameters whose names or shapes differ raise ForgeError: a task vector only makes sense
    between two checkpoints of the same architecture.
    """
    import torch

    missing = sorted(set(base_state) ^ set(tuned_state))
    if missing:
        raise ForgeError(
            f"the base and fine-tuned models have different parameters (first: {missing[0]!r}); "
            "a task vector needs two checkpoints of the same architecture"
        )
    vector = {}
    for name, base in base_state.items():
        tuned = tuned_state[name]
        if base.shape != tuned.shape:
            raise ForgeError(f"parameter {name!r} has shape {tuple(base.shape)} in the base and {tuple(tuned.shape)} in the fine-tuned model")
        vector[name] = tuned.detach().to(torch.float32) - base.detach().to(torch.float32)
    return vector


def save_task_vector(
    path: str | os.PathLike,
    vector: dict[str, "torch.Tensor"],
    *,
    base_digest: str,
    tuned_digest: str,
    extra: dict[str, str] | None = None,
) -> None:
    """Write a task vector (fine-tuned minus base, per parameter) with its provenance metadata."""
    metadata = {
        "format": TASK_VECTOR_FORMAT,
        "format_version": TASK_VECTOR_FORMAT_VERSION,
        "base_digest": base_digest,
        "tuned_digest": tuned_digest,
        **(extra or {}),
    }
    save_tensors(path, vector, metadata)


def load_task_vector(path: str | os.PathLike) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Read a task vector written by ``save_task_vector``; reject other safetensors files."""
    metadata = read_metadata(path)
    if metadata.get("format") != TASK_VECTOR_FORMAT:
        raise ForgeError(f"{path} is not a forge task vector (metadata format is {metadata.get('format')!r})")
    if metadata.get("format_version") != TASK_VECTOR_FORMAT_VERSION:
        raise ForgeError(
            f"{path} has task-vector format version {metadata.get('format_version')!r}; "
            f"this forge reads version {TASK_VECTOR_FORMAT_VERSION}"
        )

    import torch

    tensors = load_tensors(path)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ForgeError(f"{path}: tensor {name!r} has NaN or infinite values; recompute the task vector "
                             "from finite weights")
    return tensors, metadata


class WeightFiles:
    """The safetensors files of an HF model directory, open for reading one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = directory
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        for path in sorted(directory.glob("*.safetensors")):
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():
                self._handles[name] = handle
        if not self._handles:
            raise ForgeError(f"{directory} has no safetensors weights; forge reads model weights from safetensors files only")

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return sorted(self._handles)

    def __contains__(self, name: str) -> bool:
        return name in self._handles

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[name].get_slice(name).get_shape())

    def is_floating(self, name: str) -> bool:
        return self._handles[name].get_slice(name).get_dtype() in {"F16", "BF16", "F32", "F64"}

    def tensor(self, name: str) -> "torch.Tensor":
        """Read tensor `name`; ForgeError names the directory when the weights lack it."""
        if name not in self._handles:
            raise ForgeError(f"tensor {name} is not in the weights in {self.directory}")
        return self._handles[name].get_tensor(name)


def write_merged_model(base_dir: Path, vector, directory: Path, tokenizer) -> None:
    """Write base weights plus the task vector as an HF model directory in `directory` (created if missing).

    Each base safetensors file is read, updated and written on its own, so at most one shard of
    weights is in memory besides the vector. Tensors keep the base's dtype.
    """
    import torch
    from safetensors import safe_open

    directory.mkdir(exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, directory / name)

    remaining = set(vector)
    for path in sorted(base_dir.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if key in vector:
                    tensor = (tensor.to(torch.float32) + vector[key]).to(tensor.dtype)
                    remaining.discard(key)
                tensors[key] = tensor
        save_tensors(directory / path.name, tensors, metadata={"format": "pt"})
    if remaining:
        raise ForgeError(f"cannot merge: {len(remaining)} task-vector tensors such as {sorted(remaining)[0]} are not "
                         f"in the base weights in {base_dir}")
    tokenizer.save_pretrained(str(directory))


def _package_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_record(command: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    """Return the provenance of a run: command line, package versions, time, plus ``fields``."""
    versions = {name: _package_version(name) for name in ("llmforge", "torch", "transformers", "peft", "safetensors")}
    versions["python"] = platform.python_version()
    return {
        "command": list(sys.argv) if command is None else command,
        "versions": versions,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
