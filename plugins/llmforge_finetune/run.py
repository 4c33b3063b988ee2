"""One fine-tuning run end to end: load, train, and write the adapter, its run record and its task vector."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError

from llmforge_finetune.lora import LoraSettings
from llmforge_finetune.train import TrainSettings

logger = logging.getLogger(__name__)

RUN_RECORD_NAME = "forge_run.json"
RECORD_SCHEMA = "llmforge.finetune.run/1"


@dataclass
class FinetuneRequest:
    """Everything a fine-tuning run needs; the `forge finetune` options map onto these fields."""

    model: str
    data: str
    output: Path
    fmt: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    completion_template: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    max_length: int = 256
    limit: int | None = None
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise ForgeError on invalid settings before anything is loaded."""
        self.lora.validate()
        self.train.validate()
        if self.max_length < 2:
            raise ForgeError(f"invalid --max-length {self.max_length}; it must be at least 2 tokens")
        if self.limit is not None and self.limit <= 0:
            raise ForgeError(f"invalid --limit {self.limit}; it must be a positive number of records")
        if Path(self.output).exists() and not self.overwrite:
            raise ForgeError(f"output directory {self.output} already exists; choose another path or pass --overwrite")


def stored_base_reference(reference: str) -> str:
    """Return the base reference to store in the adapter: built-in names as given, paths made absolute."""
    path = Path(reference).expanduser()
    if path.exists():
        return str(path.resolve())
    return reference


def run_finetune(request: FinetuneRequest, *, command: list[str] | None = None, cache=None) -> dict[str, Any]:
    """Fine-tune `request.model` with LoRA and write the adapter directory; return the run summary.

    Nothing is written under `request.output` unless the whole run succeeds. The task vector of
    the run goes into the shared cache under CacheKey("task-vector", {base, adapter}, {}).
    """
    import torch

    from llmforge.cache import Cache
    from llmforge.checkpoint import file_digest
    from llmforge.data import TokenizeStats, read_records, resolve_data_path, to_examples, tokenize_examples
    from llmforge.models import load_model, load_tokenizer

    from llmforge_finetune.lora import count_trainable, wrap_with_lora
    from llmforge_finetune.train import train

    request.validate()
    cache = cache or Cache()
    if not request.progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    data_path = resolve_data_path(request.data)
    records = read_records(data_path)
    if request.limit is not None:
        records = records[:request.limit]
    tokenizer = load_tokenizer(request.model, cache=cache)
    examples = to_examples(records, tokenizer, fmt=request.fmt, columns=request.columns,
                           prompt_template=request.prompt_template, completion_template=request.completion_template)
    stats = TokenizeStats()
    tokenized = tokenize_examples(examples, tokenizer, max_length=request.max_length, stats=stats)

    dtype = torch.bfloat16 if request.train.precision == "bf16" else torch.float32
    loaded = load_model(request.model, dtype=dtype, cache=cache)
    if loaded.is_adapter:
        raise ForgeError(f"{request.model} is an adapter; fine-tune its base model {loaded.base_reference} instead")

    torch.manual_seed(request.train.seed)
    peft_model = wrap_with_lora(loaded.model, request.lora)
    trainable = count_trainable(peft_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = train(peft_model, tokenized, request.train, pad_token_id=pad_id, progress=request.progress)

    inputs = {"base_model": loaded.digest, "data": file_digest(data_path)}
    summary = {
        "output": str(Path(request.output).resolve()),
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "trainable_parameters": trainable,
        "final_train_loss": result.final_loss,
    }
    fields = {
        "schema": RECORD_SCHEMA,
        "method": "lora",
        "base_reference": stored_base_reference(request.model),
        "base_digest": loaded.digest,
        "data": {"spec": request.data, "path": str(data_path), "digest": inputs["data"], "records": len(records),
                 "examples": stats.total, "truncated": stats.truncated, "dropped": stats.dropped,
                 "format": request.fmt, "columns": request.columns, "prompt_template": request.prompt_template,
                 "completion_template": request.completion_template, "max_length": request.max_length},
        "inputs": inputs,
        "seed": request.train.seed,
        "hyperparameters": {**request.lora.as_dict(), **result.settings},
        "loss_curve": result.loss_curve,
        **summary,
    }
    _write_output(request, peft_model, loaded.digest, fields, command, cache)
    return summary


def _write_output(request: FinetuneRequest, peft_model, base_digest: str, fields: dict, command, cache) -> None:
    """Write the adapter and run record atomically and store the task vector in the cache."""
    from llmforge.cache import CacheKey
    from llmforge.checkpoint import (
        TASK_VECTOR_FORMAT,
        TASK_VECTOR_FORMAT_VERSION,
        atomic_directory,
        run_record,
        write_json,
    )
    from llmforge.models import adapter_digest

    from llmforge_finetune.lora import lora_task_vector

    peft_model.peft_config["default"].base_model_name_or_path = fields["base_reference"]
    with atomic_directory(request.output, overwrite=request.overwrite) as directory:
        peft_model.save_pretrained(str(directory))
        # The files are renamed unchanged, so their digest here is the final one.
        adapter = adapter_digest(directory, base_digest, None)
        key = CacheKey("task-vector", {"base": base_digest, "adapter": adapter}, {})
        metadata = {"format": TASK_VECTOR_FORMAT, "format_version": TASK_VECTOR_FORMAT_VERSION,
                    "base_digest": base_digest, "tuned_digest": adapter, "method": "lora"}
        cache.get_or_compute(key, lambda: lora_task_vector(peft_model), metadata=metadata)

        record = run_record(command, **fields, adapter_digest=adapter,
                            task_vector_cache_key=key.as_dict())
        write_json(directory / RUN_RECORD_NAME, record)
