"""Write a finished run: the adapter or model directory, its run record, and its task vector in the cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from llmforge.checkpoint import write_merged_model
from llmforge.errors import ForgeError

from llmforge_finetune.methods import MethodSpec

# With --merge, the adapter output contains the merged model (an HF model directory) under this name.
MERGED_DIRECTORY = "merged"


def full_model_digest(directory: Path) -> str:
    """Return the digest that `llmforge.models.model_digest` gives an HF directory, without caching file digests.

    The directory is a temporary output about to be renamed, so no cache entry may name its path.
    """
    from llmforge.models import directory_model_digest

    return directory_model_digest(directory, None)


def full_task_vector(model, base_dir: Path) -> dict[str, Any]:
    """Return tuned minus base for every parameter of a fully fine-tuned model, in fp32.

    Base tensors are read one at a time from the base directory's safetensors files, so the base
    model is never loaded twice. A tied parameter appears once, under its first name.
    """
    import torch

    from llmforge.checkpoint import WeightFiles

    vector = {}
    with WeightFiles(base_dir) as base:
        for name, parameter in model.named_parameters():
            if name not in base:
                raise ForgeError(f"parameter {name} of the fine-tuned model is not in the base weights in {base_dir}")
            vector[name] = parameter.detach().to(torch.float32) - base.tensor(name).to(torch.float32)
    return vector


def write_run(request, spec: MethodSpec, trained, *, base_digest: str, base_dir: Path, tokenizer, fields: dict,
              command, cache, initial_factors: dict | None, checkpoints_dir: Path | None = None) -> None:
    """Write the output directory atomically and store the run's task vector in the cache.

    `checkpoints_dir` (the intermediate checkpoints in OUTPUT.partial) is hard-linked into the
    output as checkpoints/, so the partial directory can be removed afterwards.

    Adapters are keyed CacheKey("task-vector", {base, adapter}, {}); full fine-tuning, whose
    output is a whole model, CacheKey("task-vector", {base, tuned}, {}). The run record names the key.
    """
    from llmforge.cache import CacheKey
    from llmforge.checkpoint import (
        TASK_VECTOR_FORMAT,
        TASK_VECTOR_FORMAT_VERSION,
        atomic_directory,
        run_record,
        write_json,
    )
    from llmforge.models import RUN_RECORD_NAME, adapter_digest

    from llmforge_finetune.adapters import adapter_task_vector, save_adapter

    with atomic_directory(request.output, overwrite=request.overwrite) as directory:
        if spec.name == "full":
            trained.save_pretrained(str(directory))
            tokenizer.save_pretrained(str(directory))
            tuned = full_model_digest(directory)
            inputs = {"base": base_digest, "tuned": tuned}
            compute = lambda: full_task_vector(trained, base_dir)  # noqa: E731
            digest_field = {"model_digest": tuned}
        else:
            trained.peft_config["default"].base_model_name_or_path = fields["base_reference"]
            save_adapter(trained, directory, spec, initial_factors)
            # The files are renamed unchanged, so their digest here is the final one.
            tuned = adapter_digest(directory, base_digest, None)
            inputs = {"base": base_digest, "adapter": tuned}
            compute = lambda: adapter_task_vector(trained, spec, initial_factors)  # noqa: E731
            digest_field = {"adapter_digest": tuned}

        key = CacheKey("task-vector", inputs, {})
        metadata = {"format": TASK_VECTOR_FORMAT, "format_version": TASK_VECTOR_FORMAT_VERSION,
                    "base_digest": base_digest, "tuned_digest": tuned, "method": spec.name}
        vector = cache.get_or_compute(key, compute, metadata=metadata)
        if request.merge:
            write_merged_model(base_dir, vector, directory / MERGED_DIRECTORY, tokenizer)
            digest_field["merged_model_digest"] = full_model_digest(directory / MERGED_DIRECTORY)

        if checkpoints_dir is not None:
            shutil.copytree(checkpoints_dir, directory / "checkpoints", copy_function=os.link)
        record = run_record(command, **fields, **digest_field, task_vector_cache_key=key.as_dict())
        write_json(directory / RUN_RECORD_NAME, record)
