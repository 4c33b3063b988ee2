"""Write a finished zeroth-order run: a PEFT adapter (mezo-lora) or an HF model, its record, its task vector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError


def write_lora_adapter(directory: Path, method, *, base_reference: str) -> None:
    """Write the trained LoRA factors as a PEFT adapter that `peft.PeftModel.from_pretrained` loads."""
    from peft import LoraConfig

    from llmforge.checkpoint import save_tensors

    settings = method.settings
    module_kinds = sorted({name.rsplit(".", 1)[-1] for name in method.names})
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=module_kinds,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_reference)
    config.save_pretrained(str(directory))

    tensors = {}
    for name in method.names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = method.a[name]
        tensors[f"base_model.model.{name}.lora_B.weight"] = method.b[name]
    save_tensors(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})


def write_output(output: Path, method, *, loaded, base_dir: Path, base_reference: str, record: dict[str, Any],
                 cache, overwrite: bool) -> dict[str, Any]:
    """Write the output directory atomically, cache the task vector, and return the digests written.

    The task vector is keyed like `forge finetune`'s: CacheKey("task-vector", {base, adapter}) for
    an adapter and {base, tuned} for a whole model, so other commands find it by those digests.
    """
    from llmforge.cache import CacheKey
    from llmforge.checkpoint import (
        RUN_RECORD_NAME,
        TASK_VECTOR_FORMAT,
        TASK_VECTOR_FORMAT_VERSION,
        WeightFiles,
        atomic_directory,
        write_json,
        write_merged_model,
    )
    from llmforge.models import adapter_digest, directory_model_digest

    with WeightFiles(base_dir) as base:
        vector = method.task_vector(base.tensor)
    with atomic_directory(output, overwrite=overwrite) as directory:
        if method.settings.method == "mezo-lora":
            write_lora_adapter(directory, method, base_reference=base_reference)
            tuned = adapter_digest(directory, loaded.digest, None)
            inputs, digests = {"base": loaded.digest, "adapter": tuned}, {"adapter_digest": tuned}
        else:
            write_merged_model(base_dir, vector, directory, loaded.tokenizer)
            tuned = directory_model_digest(directory, None)
            inputs, digests = {"base": loaded.digest, "tuned": tuned}, {"model_digest": tuned}

        key = CacheKey("task-vector", inputs, {})
        metadata = {"format": TASK_VECTOR_FORMAT, "format_version": TASK_VECTOR_FORMAT_VERSION,
                    "base_digest": loaded.digest, "tuned_digest": tuned, "method": method.settings.method}
        cache.get_or_compute(key, lambda: vector, metadata=metadata)
        write_json(directory / RUN_RECORD_NAME, {**record, **digests, "task_vector_cache_key": key.as_dict()})
    return {**digests, "task_vector_cache_key": key.as_dict()}


def check_trainable_base(reference: str, cache) -> None:
    """Reject a PEFT adapter as the model before any weight is loaded: forge zo trains a base model or a new LoRA on one."""
    from llmforge.models import resolve

    resolved = resolve(reference, cache=cache)
    if resolved.is_adapter:
        raise ForgeError(f"--model {reference} is a PEFT adapter, and forge zo trains a whole model or a new LoRA "
                         f"on one. Pass its base model ({resolved.base.reference}), or merge the adapter into a "
                         "model directory first (peft's merge_and_unload) and pass that")
