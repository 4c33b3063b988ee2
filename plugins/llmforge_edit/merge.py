"""Merge task vectors into a base model, one tensor or block of rows at a time.

For each base tensor, the chosen method (merge_methods.py, or a plugin's through the
`forge_merge_methods` hook) combines the vectors' updates into one update delta, and the merged
tensor is base + lambda * delta, cast back to the base tensor's dtype. Base shards and vectors
are read with positioned reads and the output is written tensor by tensor, so peak memory stays
near one tensor per input rather than one model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from llmforge.checkpoint import RUN_RECORD_NAME, write_json
from llmforge.errors import ForgeError
from llmforge_edit.activations import parse_layers
from llmforge_edit.merge_methods import (
    BUILTIN_MERGE_METHODS,
    available_merge_methods,
    method_is_elementwise,
    method_uses_density,
)
from llmforge_edit.tensor_files import (
    ModelWeights,
    SafetensorsFile,
    SafetensorsWriter,
    as_torch,
    row_blocks,
    tensor_buffer,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Files of the base directory that the merged model directory gets unchanged, besides the weights.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
# The files of a fast tokenizer as transformers saves them. tokenizer.json is the tokenizer itself.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
CHAT_TEMPLATES_DIRECTORY = "additional_chat_templates"


# Tensor selection and seeds


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Return the decoder layer index of a parameter name: its first all-digit component ("model.layers.3..." -> 3)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def parse_modules(text: str) -> set[str]:
    """Parse "q_proj,v_proj" into module names. Raise ForgeError when the list is empty."""
    modules = {piece.strip() for piece in text.split(",") if piece.strip()}
    if not modules:
        raise ForgeError(f"invalid --modules {text!r}; give module names such as q_proj,v_proj")
    return modules


def tensor_selected(name: str, layers: set[int] | None, modules: set[str] | None) -> bool:
    """Tell whether the filters select a tensor: its layer is in `layers` and a name component is in `modules`."""
    if layers is not None and layer_index(name) not in layers:
        return False
    if modules is not None and not modules.intersection(name.split(".")):
        return False
    return True


def tensor_seed(seed: int, name: str) -> int:
    """Derive the random seed of one tensor from the merge seed and the tensor name.

    A tensor's random draws therefore do not depend on which other tensors the filters select.
    """
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class MergePlan:
    """How to compute the merged update of each selected tensor: the vectors, their options and the method."""

    vectors: Sequence
    weights: Sequence[float]
    densities: Sequence[float]
    method: Callable
    scale: float
    seed: int
    normalize: bool | None
    block_elements: int | None = None  # None: tensor_files.BLOCK_ELEMENTS

    def update_blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, int, "torch.Tensor"]]:
        """Yield (start, stop, lambda * update of rows [start, stop)) of one tensor.

        An elementwise method gets blocks of rows, so a large tensor such as the token embedding
        is never in memory whole. Any other method gets the whole tensor at once.
        """
        import torch

        generator = torch.Generator().manual_seed(tensor_seed(self.seed, name))
        if method_is_elementwise(self.method):
            blocks = row_blocks(shape, self.block_elements)
        else:
            blocks = iter([(0, shape[0] if shape else 1)])

        for start, stop in blocks:
            block_shape = (stop - start, *shape[1:]) if shape else ()
            deltas = [vector.rows(name, start, stop) if name in vector else torch.zeros(block_shape)
                      for vector in self.vectors]
            merged = self.method(deltas, weights=self.weights, densities=self.densities, generator=generator,
                                 normalize=self.normalize)
            del deltas
            if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != block_shape:
                raise ForgeError(f"the merge method returned {getattr(merged, 'shape', type(merged).__name__)} for "
                                 f"tensor {name!r} (rows {start} to {stop - 1}), whose shape is {block_shape}; fix "
                                 "the merge method")
            # A finite sum proves every entry finite, and costs less than the elementwise test.
            if not math.isfinite(float(merged.sum())) and not bool(torch.isfinite(merged).all()):
                raise ForgeError(f"the merged update of tensor {name!r} has NaN or infinite values; check the vectors "
                                 "and weights")
            merged = merged.to(torch.float32)
            yield start, stop, merged.mul_(self.scale) if self.scale != 1 else merged


def write_merged_weights(base_dir: Path, directory: Path, selected: set[str], plan: MergePlan) -> set[str]:
    """Write each base safetensors file to `directory` with base + lambda * update for the selected tensors.

    A file is written front to back from its header, one tensor or block of rows at a time.
    Tensors outside `selected` are copied byte for byte. Merged tensors keep the base dtype.
    Returns the names of the selected tensors whose update has a nonzero entry.
    """
    import torch

    changed: set[str] = set()
    for path in sorted(base_dir.glob("*.safetensors")):
        with SafetensorsFile(path) as base, open(directory / path.name, "wb") as handle:
            names = sorted(base.names(), key=lambda name: base.byte_range(name)[0])
            writer = SafetensorsWriter(handle, [(name, base.dtype(name), base.shape(name)) for name in names],
                                       {"format": "pt"})
            for name in names:
                if name not in selected:
                    writer.copy_from(base, name)
                    continue
                for start, stop, update in plan.update_blocks(name, base.shape(name)):
                    if name not in changed and bool(update.any()):
                        changed.add(name)
                    rows = as_torch(base.read(name, start, stop), base.dtype(name))
                    merged = rows.to(torch.float32).add_(update).to(rows.dtype)
                    writer.write(tensor_buffer(merged))
            writer.finish()
    return changed


def copy_tokenizer(base_dir: Path, directory: Path, reference: str, cache) -> None:
    """Copy the base's tokenizer files; without a tokenizer.json, load the tokenizer and save it instead.

    A fast tokenizer is complete in tokenizer.json plus the small files beside it, so copying them
    avoids importing transformers. Either way the output's tokenizer is the base's.
    """
    if not (base_dir / "tokenizer.json").is_file():
        from llmforge.models import load_tokenizer

        load_tokenizer(reference, cache=cache).save_pretrained(str(directory))
        return
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, directory / name)
    if (base_dir / CHAT_TEMPLATES_DIRECTORY).is_dir():
        shutil.copytree(base_dir / CHAT_TEMPLATES_DIRECTORY, directory / CHAT_TEMPLATES_DIRECTORY)


# The merge command's request and run


@dataclass
class VectorSpec:
    """One `--vector PATH[:weight=W,density=D]` option."""

    path: Path
    weight: float = 1.0
    density: float = 1.0


def parse_vector_spec(text: str) -> VectorSpec:
    """Parse PATH or PATH:weight=W,density=D. The options follow the last ':', and each is KEY=VALUE."""
    path, separator, options = text.rpartition(":")
    if not separator or "=" not in options:
        path, options = text, ""
    spec = VectorSpec(Path(path))

    seen_keys: set[str] = set()
    for option in (piece.strip() for piece in options.split(",") if piece.strip()):
        key, equals, value = option.partition("=")
        if not equals or key.strip() not in ("weight", "density"):
            raise ForgeError(f"invalid --vector option {option!r} in {text!r}; use PATH:weight=W,density=D")
        if key.strip() in seen_keys:
            raise ForgeError(f"--vector {text!r} sets {key.strip()} twice; give each option once")
        seen_keys.add(key.strip())
        try:
            number = float(value)
        except ValueError:
            raise ForgeError(f"invalid {key.strip()} {value!r} in --vector {text!r}; give a number") from None
        if not math.isfinite(number):
            raise ForgeError(f"invalid {key.strip()} {value!r} in --vector {text!r}; give a finite number")
        setattr(spec, key.strip(), number)

    if not 0 < spec.density <= 1:
        raise ForgeError(f"density {spec.density:g} of --vector {text!r} is outside (0, 1]; it is the fraction "
                         "of entries to keep")
    return spec


@dataclass
class MergeRequest:
    """Everything `forge edit merge` needs; the command's options map onto these fields."""

    base: str
    vectors: list[VectorSpec]
    output: Path
    method: str = "task_arithmetic"
    scale: float = 1.0  # --lambda
    normalize: bool | None = None
    seed: int = 0
    layers: str | None = None
    modules: str | None = None
    overwrite: bool = False


def _layer_count(base_dir: Path, names: Sequence[str]) -> int:
    """Return num_hidden_layers from config.json (or its text_config), else 1 + the largest layer index."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("num_hidden_layers"), int):
            return section["num_hidden_layers"]
    indices = [index for index in map(layer_index, names) if index is not None]
    return max(indices) + 1 if indices else 0


def _check_vector(vector, spec: VectorSpec, base_digest: str, base_reference: str, base) -> None:
    """Raise ForgeError unless the vector was computed against this base and all its tensors fit it."""
    if vector.base_digest != base_digest:
        raise ForgeError(f"task vector {spec.path} was computed against base {str(vector.base_digest)[:19]}..., "
                         f"not {base_reference} ({base_digest[:19]}...); pass its own base with --base")
    for name in vector.names():
        if name not in base:
            raise ForgeError(f"task vector {spec.path} updates tensor {name!r}, which is not in the base "
                             f"{base_reference}")
        if vector.shape(name) != base.shape(name):
            raise ForgeError(f"task vector {spec.path} has shape {vector.shape(name)} for tensor {name!r} but the "
                             f"base has {base.shape(name)}")


def _select_tensors(request: MergeRequest, base, base_dir: Path, vectors) -> list[str]:
    """Return the base tensors to update: those some vector changes and the filters select."""
    names = base.names()
    layers = set(parse_layers(request.layers, _layer_count(base_dir, names))) if request.layers is not None else None
    modules = parse_modules(request.modules) if request.modules is not None else None
    for module in sorted(modules or ()):
        if not any(module in name.split(".") for name in names):
            raise ForgeError(f"--modules {module!r} matches no tensor of the base model; use module names such as "
                             "q_proj or mlp")
    updated = set().union(*(vector.names() for vector in vectors))
    return [name for name in names if name in updated and tensor_selected(name, layers, modules)]


def _complete_config(directory: Path) -> None:
    """Add `architectures` to config.json when the base config lacks it, so that other tools can load the output."""
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("architectures"):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if architecture is None:
        raise ForgeError(f"the base config has no architectures and model type {config.get('model_type')!r} is "
                         "not a causal LM that transformers knows; add architectures to the base config.json")
    config["architectures"] = [architecture]
    write_json(path, config)


def _merge_method(request: MergeRequest) -> Callable:
    """Return the requested merge method after checking the options that do not need the files."""
    methods = available_merge_methods()
    if request.method not in methods:
        raise ForgeError(f"unknown merge method {request.method!r}; choose one of: {', '.join(sorted(methods))}")
    method = methods[request.method]
    if not request.vectors:
        raise ForgeError("no task vectors given; pass at least one --vector PATH")
    if not math.isfinite(request.scale):
        raise ForgeError(f"invalid --lambda {request.scale}; give a finite number")
    if not method_uses_density(method):
        for spec in request.vectors:
            if spec.density != 1:
                raise ForgeError(f"{request.method} does not prune, so density {spec.density:g} of {spec.path} has "
                                 "no effect; remove it or choose ties, dare_linear, dare_ties or magnitude_prune")
    return method


def _normalize_used(request: MergeRequest) -> bool | None:
    """Return the normalization the method applies: --normalize, else the built-in default; None for a plugin's own default."""
    if request.normalize is not None:
        return request.normalize
    if request.method in BUILTIN_MERGE_METHODS:
        return request.method == "ties"
    return None


def run_merge(request: MergeRequest, command: list[str] | None = None, cache=None) -> dict:
    """Validate the request, write base + lambda * merged update as an HF model directory, and return the run record.

    Peak memory is a few blocks of rows for elementwise methods such as task_arithmetic, and
    about the vectors' updates of the largest tensor plus the method's own copies for the others.
    """
    from llmforge.cache import Cache
    from llmforge.checkpoint import atomic_directory, check_output_apart, run_record
    from llmforge.models import cached_file_digest, directory_model_digest, model_digest, resolve, stored_reference

    from llmforge_edit.vectors import TaskVectorFile

    cache = cache or Cache()
    method = _merge_method(request)
    resolved = resolve(request.base, cache=cache)
    if resolved.is_adapter:
        raise ForgeError(f"the base {request.base} is a PEFT adapter; merge into a model, or write the adapter's "
                         "task vector with `forge edit diff` and merge it into the adapter's base")
    check_output_apart(request.output, {"base": resolved.path, **{
        f"task vector {number}": spec.path for number, spec in enumerate(request.vectors, start=1)}})
    base_digest = model_digest(request.base, cache=cache)

    with contextlib.ExitStack() as stack:
        base = stack.enter_context(ModelWeights(resolved.path))
        vectors = [stack.enter_context(TaskVectorFile(spec.path)) for spec in request.vectors]
        for vector, spec in zip(vectors, request.vectors):
            _check_vector(vector, spec, base_digest, request.base, base)
        names = _select_tensors(request, base, resolved.path, vectors)
        if not names:
            raise ForgeError("the merge would change no tensor: the vectors update no tensor that --layers and "
                             "--modules select; check those filters against the vectors' tensor names")
        # The vectors' file digests (a SHA-256 pass over each file unless cached) are computed on
        # another thread while this one merges. hashlib releases the GIL while it hashes large buffers.
        hashing = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        vector_digests = hashing.submit(lambda: [cached_file_digest(spec.path, cache) for spec in request.vectors])
        plan = MergePlan(vectors, [spec.weight for spec in request.vectors], [spec.density for spec in request.vectors],
                         method, scale=request.scale, seed=request.seed, normalize=request.normalize)

        with atomic_directory(request.output, overwrite=request.overwrite) as directory:
            for name in MODEL_FILES:
                if (resolved.path / name).is_file():
                    shutil.copyfile(resolved.path / name, directory / name)
            changed = write_merged_weights(resolved.path, directory, set(names), plan)
            if not changed:
                # Raised inside the atomic directory, so the copy of the base is removed again.
                raise ForgeError(f"the merge would change no tensor: every update of the {len(names)} selected "
                                 "tensors is zero; check the vectors (not all zero), the weights and --lambda (not 0)")
            copy_tokenizer(resolved.path, directory, request.base, cache)
            _complete_config(directory)
            record = run_record(
                command, schema="llmforge.edit.merge/1", base_reference=stored_reference(request.base),
                base_digest=base_digest,
                method=request.method, normalize=_normalize_used(request), seed=request.seed,
                layers=request.layers, modules=request.modules, merged_tensors=len(changed),
                vectors=[{"path": str(spec.path.resolve()), "file_digest": digest,
                          "tuned_digest": vector.tuned_digest, "layout": vector.layout, "weight": spec.weight,
                          "density": spec.density}
                         for spec, vector, digest in zip(request.vectors, vectors, vector_digests.result())],
                model_digest=directory_model_digest(directory, None), **{"lambda": request.scale},
            )
            write_json(directory / RUN_RECORD_NAME, record)
    return {**record, "output": str(request.output)}
