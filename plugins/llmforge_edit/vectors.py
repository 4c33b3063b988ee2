"""Task vectors: tuned minus base weights, dense or low-rank, computed once and cached by the input digests.

A task vector file is a safetensors file with the metadata of `llmforge.checkpoint.save_task_vector`
(format, format_version, base_digest, tuned_digest) plus `layout`:

- "dense": one fp32 tensor per parameter, under the parameter's name. Between two whole models
  the file contains every floating-point tensor of the base, changed or not (the content that
  `forge finetune --method full` caches under the same key). For a PEFT adapter it holds only the
  weights that the adapter changes. A parameter that is missing from the file has a zero update.
- "low-rank": each 2-D update NAME of shape [m, n] is stored as its rank-r truncated SVD in three
  tensors: NAME.svd_u [m, r], NAME.svd_s [r] and NAME.svd_vh [r, n]. Its update is then
  svd_u @ diag(svd_s) @ svd_vh. 1-D tensors, and 2-D tensors with min(m, n) <= r (where the SVD
  would be exact), stay dense under their own name. The metadata adds `rank` and
  `retained_energy`, a JSON object with the overall and per-tensor ratio ||tau_r||^2 / ||tau||^2.

A file without a `layout` field is dense. `TaskVectorFile` reads either layout as dense fp32
updates, one tensor or block of rows at a time, which is how `forge edit merge` consumes vectors.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from llmforge.cache import Cache, CacheKey
from llmforge.checkpoint import (
    WeightFiles,
    TASK_VECTOR_FORMAT,
    TASK_VECTOR_FORMAT_VERSION,
    atomic_write,
    load_tensors,
    read_metadata,
    save_task_vector,
)
from llmforge.errors import ForgeError
from llmforge_edit.tensor_files import (
    ModelWeights,
    SafetensorsFile,
    SafetensorsWriter,
    as_float32,
    as_torch,
    element_count,
    row_blocks,
)

if TYPE_CHECKING:
    import torch

LAYOUT_DENSE = "dense"
LAYOUT_LOW_RANK = "low-rank"
# The dense vector shares its key with `forge finetune` and `forge zo`; the low-rank one has its own kind.
TASK_VECTOR_KIND = "task-vector"
LOW_RANK_KIND = "task-vector-low-rank"
LOW_RANK_FILE = "task_vector.safetensors"
SVD_U, SVD_S, SVD_VH = ".svd_u", ".svd_s", ".svd_vh"
ADAPTER_PREFIX = "base_model.model."


@dataclass
class VectorSource:
    """A (base, tuned) pair resolved to directories and content digests; `tuned_dir` is an adapter directory when `is_adapter`."""

    base_reference: str
    tuned_reference: str
    base_digest: str
    tuned_digest: str
    base_dir: Path
    tuned_dir: Path
    is_adapter: bool

    @property
    def cache_inputs(self) -> dict[str, str]:
        """The inputs of the task-vector cache key, as `forge finetune` writes them."""
        tuned_role = "adapter" if self.is_adapter else "tuned"
        return {"base": self.base_digest, tuned_role: self.tuned_digest}


# Resolving the pair


def resolve_pair(base: str, tuned: str, *, cache: Cache) -> VectorSource:
    """Resolve a base and a tuned model reference, without reading weights.

    Raises ForgeError when the base is an adapter, when an adapter was trained on another base,
    or when both references are the same weights.
    """
    from llmforge.models import model_digest, resolve

    base_resolved = resolve(base, cache=cache)
    if base_resolved.is_adapter:
        raise ForgeError(f"the base {base} is a PEFT adapter; pass the model it was trained on as --base")
    base_digest = model_digest(base, cache=cache)
    tuned_resolved = resolve(tuned, cache=cache)
    tuned_digest = model_digest(tuned, cache=cache)

    if tuned_resolved.is_adapter:
        adapter_base = model_digest(tuned_resolved.base.reference, cache=cache)
        if adapter_base != base_digest:
            raise ForgeError(
                f"the adapter {tuned} was trained on {tuned_resolved.base.reference} ({adapter_base[:19]}...), "
                f"not on {base} ({base_digest[:19]}...); pass its own base with --base"
            )
    if tuned_digest == base_digest:
        raise ForgeError(f"{tuned} and the base {base} are the same weights, so the task vector would be zero")

    return VectorSource(base, tuned, base_digest, tuned_digest, base_resolved.path, tuned_resolved.path,
                        tuned_resolved.is_adapter)


def _model_type(directory: Path) -> str | None:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


# Dense task vectors


def write_model_pair_delta(source: VectorSource, path: Path, metadata: dict[str, str]) -> None:
    """Write tuned minus base in fp32 for every floating-point tensor of two model directories to `path`.

    Each tensor is read, subtracted and written in blocks of rows, so memory stays at a few blocks
    whatever the model size, and torch is not imported. Different architectures, tensor names or
    shapes raise ForgeError naming the first tensor that differs. Integer tensors (such as position
    ids) are skipped.
    """
    base_type, tuned_type = _model_type(source.base_dir), _model_type(source.tuned_dir)
    if base_type and tuned_type and base_type != tuned_type:
        raise ForgeError(f"{source.tuned_reference} is a {tuned_type} model but the base {source.base_reference} "
                         f"is a {base_type} model; a task vector needs two checkpoints of one architecture")

    with ModelWeights(source.base_dir) as base, ModelWeights(source.tuned_dir) as tuned:
        differing = sorted(set(base.names()) ^ set(tuned.names()))
        if differing:
            owner = source.base_reference if differing[0] in base else source.tuned_reference
            raise ForgeError(f"tensor {differing[0]!r} is only in {owner}; a task vector needs two checkpoints "
                             "of one architecture with the same tensors")
        for name in base.names():
            if base.shape(name) != tuned.shape(name):
                raise ForgeError(f"tensor {name!r} has shape {base.shape(name)} in the base {source.base_reference} "
                                 f"but {tuned.shape(name)} in {source.tuned_reference}")
        names = [name for name in base.names() if base.is_floating(name)]

        with open(path, "wb") as handle:
            writer = SafetensorsWriter(handle, [(name, "F32", base.shape(name)) for name in names], metadata)
            for name in names:
                for start, stop in row_blocks(base.shape(name)):
                    tuned_rows = as_float32(tuned.read(name, start, stop), tuned.dtype(name))
                    writer.write(tuned_rows - as_float32(base.read(name, start, stop), base.dtype(name)))
            writer.finish()


def _plain_lora_config(config: dict[str, Any]) -> bool:
    """Tell whether an adapter's update is exactly scaling * B @ A per layer, with one scaling per adapter."""
    return (
        str(config.get("peft_type", "")).upper() == "LORA"
        and not config.get("use_dora")
        and not config.get("rank_pattern")
        and not config.get("alpha_pattern")
        and not config.get("modules_to_save")
        and not config.get("lora_bias")
        and not config.get("trainable_token_indices")
        and not config.get("target_parameters")
    )


def lora_delta(source: VectorSource) -> dict[str, "torch.Tensor"] | None:
    """Return scaling * B @ A per adapted weight of a plain LoRA adapter, or None for any other adapter.

    scaling is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, as peft 0.21 sets it.
    The adapter's weights are read from its file; no model is loaded.
    """
    import math

    import torch
    from safetensors import safe_open

    config = json.loads((source.tuned_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if not _plain_lora_config(config):
        return None
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    factors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(source.tuned_dir / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            module, _, kind = key.removeprefix(ADAPTER_PREFIX).rpartition(".lora_")
            if kind not in ("A.weight", "B.weight") or not key.startswith(ADAPTER_PREFIX):
                return None
            factors.setdefault(module, {})[kind[0]] = handle.get_tensor(key).to(torch.float32)

    vector = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != rank:
            return None
        delta = scaling * (pair["B"] @ pair["A"])
        vector[f"{module}.weight"] = (delta.T if config.get("fan_in_fan_out") else delta).contiguous()
    return vector


def peft_merge_delta(source: VectorSource, cache: Cache) -> dict[str, "torch.Tensor"]:
    """Return merged minus base weights of any peft adapter, merging one copied layer at a time in fp32.

    This covers the additive (LoRA family) and the multiplicative (DoRA, OFT, BOFT, IA3) adapters.
    Modules that the adapter replaces whole (modules_to_save) contribute replacement minus original.
    """
    import copy

    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from llmforge.models import load_model

    loaded = load_model(source.tuned_reference, dtype=torch.float32, cache=cache)
    vector = {}
    with torch.no_grad():
        for name, module in loaded.model.get_base_model().named_modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "get_base_layer"):
                layer = copy.deepcopy(module)
                before = {key: value.detach().clone() for key, value in layer.get_base_layer().named_parameters()}
                layer.merge(adapter_names=list(module.active_adapters))
                after = dict(layer.get_base_layer().named_parameters())
                for key, value in before.items():
                    delta = after[key].detach().float() - value.float()
                    if key == "weight" or bool(delta.any()):
                        vector[f"{name}.{key}"] = delta.contiguous()
            elif hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
                replacement = module.modules_to_save[module.active_adapters[0]]
                for key, value in module.original_module.named_parameters():
                    vector[f"{name}.{key}"] = (dict(replacement.named_parameters())[key].float() - value.float()).contiguous()
    if not vector:
        raise ForgeError(f"the adapter {source.tuned_dir} has no peft tuner layers, so it changes no weight")
    return vector


def adapter_delta(source: VectorSource, cache: Cache) -> dict[str, "torch.Tensor"]:
    """Return the adapter's update per base weight: B @ A * scaling for plain LoRA, else peft's merge."""
    vector = lora_delta(source)
    if vector is None:
        vector = peft_merge_delta(source, cache)

    with WeightFiles(source.base_dir) as base:
        for name, delta in vector.items():
            if name not in base:
                raise ForgeError(f"the adapter {source.tuned_dir} updates {name!r}, which is not in the base "
                                 f"{source.base_reference}; pass the adapter's own base with --base")
            if base.shape(name) != tuple(delta.shape):
                raise ForgeError(f"the adapter {source.tuned_dir} updates {name!r} with shape {tuple(delta.shape)}, "
                                 f"but the base {source.base_reference} has {base.shape(name)}; the adapter was "
                                 "made for another base, so pass that base with --base")
    return vector


def dense_task_vector_file(source: VectorSource, cache: Cache) -> Path:
    """Return the cached dense task vector file, computing it once under the shared task-vector cache key."""
    metadata = {"format": TASK_VECTOR_FORMAT, "format_version": TASK_VECTOR_FORMAT_VERSION,
                "base_digest": source.base_digest, "tuned_digest": source.tuned_digest,
                "computed_by": "forge edit diff"}
    key = CacheKey(TASK_VECTOR_KIND, source.cache_inputs, {})
    if source.is_adapter:
        cache.get_or_compute(key, lambda: adapter_delta(source, cache), metadata=metadata)
        return cache.blob_path(cache.lookup(key))
    return cache.get_or_write_tensors(key, lambda path: write_model_pair_delta(source, path, metadata), metadata)


def dense_task_vector(source: VectorSource, cache: Cache) -> dict[str, "torch.Tensor"]:
    """Return the dense task vector as memory-mapped tensors of its cache entry (see `dense_task_vector_file`)."""
    return load_tensors(dense_task_vector_file(source, cache))


def copy_task_vector(source_path: Path, output: Path, metadata: dict[str, str]) -> None:
    """Write the tensors of `source_path` to `output` with new metadata, copying the data without reading it into memory."""
    with SafetensorsFile(source_path) as source, atomic_write(output) as handle:
        names = sorted(source.names(), key=lambda name: source.byte_range(name)[0])
        writer = SafetensorsWriter(handle, [(name, source.dtype(name), source.shape(name)) for name in names],
                                   metadata)
        for name in names:
            writer.copy_from(source, name)
        writer.finish()


# Low-rank task vectors


def truncate_svd(vector: dict[str, "torch.Tensor"], rank: int) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """Factor each 2-D update into its rank-`rank` truncated SVD, and return the tensors and the energy report.

    The report contains `overall` (the sum of the retained ||tau_r||^2 over the sum of ||tau||^2) and
    `tensors` (that ratio per parameter). A zero update counts as fully kept (ratio 1).
    """
    import torch

    tensors, ratios = {}, {}
    retained_total = energy_total = 0.0
    for name in sorted(vector):
        delta = vector[name].to(torch.float32)
        energy = float(delta.double().pow(2).sum())
        if delta.dim() != 2 or min(delta.shape) <= rank:
            tensors[name] = delta.contiguous()
            retained = energy
        else:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            tensors[name + SVD_U] = u[:, :rank].contiguous()
            tensors[name + SVD_S] = s[:rank].contiguous()
            tensors[name + SVD_VH] = vh[:rank].contiguous()
            retained = min(float(s[:rank].double().pow(2).sum()), energy)
        ratios[name] = retained / energy if energy > 0 else 1.0
        retained_total += retained
        energy_total += energy
    overall = retained_total / energy_total if energy_total > 0 else 1.0
    return tensors, {"overall": overall, "tensors": ratios}


def _low_rank_file(source: VectorSource, rank: int, cache: Cache) -> Path:
    """Return the cached low-rank task vector file for `rank`, writing it from the dense vector once."""

    def fill(directory: Path) -> None:
        tensors, energy = truncate_svd(dense_task_vector(source, cache), rank)
        save_task_vector(directory / LOW_RANK_FILE, tensors, base_digest=source.base_digest,
                         tuned_digest=source.tuned_digest,
                         extra={"layout": LAYOUT_LOW_RANK, "rank": str(rank), "retained_energy": json.dumps(energy)})

    key = CacheKey(LOW_RANK_KIND, source.cache_inputs, {"rank": rank})
    return cache.get_or_compute_dir(key, fill) / LOW_RANK_FILE


def write_task_vector(base: str, tuned: str, output: Path, *, rank: int | None = None, overwrite: bool = False,
                      cache: Cache | None = None) -> dict[str, Any]:
    """Write the task vector tuned minus base to `output`, dense or low-rank with `rank`, and return its summary."""
    cache = cache or Cache()
    if rank is not None and rank < 1:
        raise ForgeError(f"invalid --rank {rank}; use a positive integer")
    if output.exists() and not overwrite:
        raise ForgeError(f"output file {output} already exists; choose another path or pass --overwrite")
    if output.is_dir():
        raise ForgeError(f"output path {output} is a directory; give a file name such as tv.safetensors")

    source = resolve_pair(base, tuned, cache=cache)
    _check_output_outside_inputs(output, source)
    if rank is None:
        metadata = {"format": TASK_VECTOR_FORMAT, "format_version": TASK_VECTOR_FORMAT_VERSION,
                    "base_digest": source.base_digest, "tuned_digest": source.tuned_digest,
                    "layout": LAYOUT_DENSE, "computed_by": "forge edit diff"}
        copy_task_vector(dense_task_vector_file(source, cache), output, metadata)
    else:
        cached = _low_rank_file(source, rank, cache)
        with atomic_write(output) as handle, open(cached, "rb") as stored:
            shutil.copyfileobj(stored, handle, 1 << 22)
    return summarize_task_vector(output)


def _check_output_outside_inputs(output: Path, source: VectorSource) -> None:
    """Raise ForgeError when the output path is an input model file or lies inside an input model directory.

    Replacing an input would destroy it, and a new .safetensors file in a model directory would be
    read as part of that model's weights.
    """
    target = Path(output).resolve()
    for label, path in (("base", source.base_dir), ("tuned model", source.tuned_dir)):
        path = Path(path).resolve()
        if target == path or (path.is_dir() and path in target.parents):
            raise ForgeError(f"output path {output} is inside the {label} {path}, an input of this diff; "
                             "write the task vector elsewhere")


def summarize_task_vector(path: Path) -> dict[str, Any]:
    """Describe a task vector file: layout, rank, digests, parameter and stored value counts, and retained energy."""
    with TaskVectorFile(path) as vector:
        parameters = sum(element_count(vector.shape(name)) for name in vector.names())
        stored = sum(element_count(shape) for shape in vector.stored_shapes().values())
        summary = {
            "schema": "llmforge.edit.diff/1",
            "output": str(path),
            "layout": vector.layout,
            "rank": vector.rank,
            "base_digest": vector.base_digest,
            "tuned_digest": vector.tuned_digest,
            "tensors": len(vector.names()),
            "parameters": parameters,
            "stored_values": stored,
        }
    energy = read_metadata(path).get("retained_energy")
    if energy is not None:
        report = json.loads(energy)
        summary["retained_energy"] = report["overall"]
        summary["retained_energy_per_tensor"] = report["tensors"]
    return summary


# Reading either layout


class TaskVectorFile:
    """A task vector file, dense or low-rank, open for reading dense fp32 updates one tensor or block of rows at a time.

    The file is read with positioned reads (see `llmforge_edit.tensor_files`), so an update that
    has been read and dropped no longer takes memory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ForgeError(f"task vector file not found: {self.path}")
        self._file = SafetensorsFile(self.path)
        self.metadata = self._file.metadata
        if self.metadata.get("format") != TASK_VECTOR_FORMAT:
            self.close()
            raise ForgeError(f"{self.path} is not a forge task vector (metadata format is "
                             f"{self.metadata.get('format')!r}); create one with `forge edit diff`")
        if self.metadata.get("format_version") != TASK_VECTOR_FORMAT_VERSION:
            self.close()
            raise ForgeError(f"{self.path} has task-vector format version {self.metadata.get('format_version')!r}; "
                             f"this forge reads version {TASK_VECTOR_FORMAT_VERSION}")
        self.layout = self.metadata.get("layout", LAYOUT_DENSE)
        if self.layout not in (LAYOUT_DENSE, LAYOUT_LOW_RANK):
            self.close()
            raise ForgeError(f"{self.path} has the unknown layout {self.layout!r}; expected dense or low-rank")
        self._shapes = {name: self._file.shape(name) for name in self._file.names()}
        self._parameters = self._index_parameters()

    def __enter__(self) -> "TaskVectorFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def base_digest(self) -> str | None:
        return self.metadata.get("base_digest")

    @property
    def tuned_digest(self) -> str | None:
        return self.metadata.get("tuned_digest")

    @property
    def rank(self) -> int | None:
        return int(self.metadata["rank"]) if "rank" in self.metadata else None

    def _index_parameters(self) -> dict[str, tuple[int, ...]]:
        """Map each parameter name to its shape, and check that every factored update has all three factors."""
        parameters = {}
        for name, shape in self._shapes.items():
            if self.layout == LAYOUT_LOW_RANK and name.endswith((SVD_U, SVD_S, SVD_VH)):
                continue
            parameters[name] = shape
        for name in self._shapes:
            if self.layout != LAYOUT_LOW_RANK or not name.endswith(SVD_U):
                continue
            parameter = name.removesuffix(SVD_U)
            u, s, vh = (self._shapes.get(parameter + suffix) for suffix in (SVD_U, SVD_S, SVD_VH))
            if s is None or vh is None or len(u) != 2 or len(vh) != 2 or s != (u[1],) or vh[0] != u[1]:
                self.close()
                raise ForgeError(f"{self.path}: the low-rank factors of {parameter!r} are missing or have "
                                 f"mismatched shapes (svd_u {u}, svd_s {s}, svd_vh {vh}); recreate the file")
            parameters[parameter] = (u[0], vh[1])
        return parameters

    def names(self) -> list[str]:
        """Return the names of the parameters that this vector updates."""
        return sorted(self._parameters)

    def __contains__(self, name: str) -> bool:
        return name in self._parameters

    def shape(self, name: str) -> tuple[int, ...]:
        return self._parameters[name]

    def stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the shapes of the tensors as stored in the file (the factors, for low-rank updates)."""
        return dict(self._shapes)

    def _stored(self, name: str, start: int = 0, stop: int | None = None) -> "torch.Tensor":
        import torch

        return as_torch(self._file.read(name, start, stop), self._file.dtype(name)).to(torch.float32)

    def tensor(self, name: str) -> "torch.Tensor":
        """Return the dense fp32 update of one parameter, multiplying the factors out for a low-rank one."""
        return self.rows(name, 0, None)

    def rows(self, name: str, start: int, stop: int | None) -> "torch.Tensor":
        """Return rows [start, stop) of dimension 0 of the dense fp32 update (all rows when stop is None)."""
        if name in self._shapes:
            return self._stored(name, start, stop)
        u = self._stored(name + SVD_U, start, stop)
        return (u * self._stored(name + SVD_S)) @ self._stored(name + SVD_VH)

    def items(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        for name in self.names():
            yield name, self.tensor(name)


def load_dense_task_vector(path: str | Path) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Read a task vector file of either layout as dense fp32 tensors, and return (vector, metadata)."""
    with TaskVectorFile(path) as vector:
        return dict(vector.items()), dict(vector.metadata)
