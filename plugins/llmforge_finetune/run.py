"""One fine-tuning run end to end: plan the method and its size, train, write the output, cache the task vector."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.checkpoint import check_output_directory
from llmforge.errors import ForgeError

from llmforge_finetune.methods import MethodSettings, MethodSpec, get_method
from llmforge_finetune.train import TrainSettings

logger = logging.getLogger(__name__)

RECORD_SCHEMA = "llmforge.finetune.run/1"


@dataclass
class FinetuneRequest:
    """Everything a fine-tuning run needs; the `forge finetune` options map onto these fields.

    `data` and `output` may be None only for a dry run. `budget` makes the run choose the
    method's size option whose trainable-parameter count is nearest to it.
    """

    model: str
    data: str | None
    output: Path | None
    fmt: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    completion_template: str | None = None
    method: MethodSettings = field(default_factory=MethodSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    budget: int | None = None
    max_length: int = 256
    limit: int | None = None
    overwrite: bool = False
    progress: bool = True
    dry_run: bool = False

    def validate(self) -> tuple[MethodSpec, dict[str, Any]]:
        """Raise ForgeError on invalid settings before anything is loaded; return the method and its option values."""
        spec = get_method(self.method.method)
        values = spec.resolve(self.method)
        if self.budget is not None and spec.size_option and getattr(self.method, spec.size_option) is not None:
            flag = "--rank" if spec.size_option == "rank" else "--block-size"
            raise ForgeError(f"pass either --budget or {flag} for --method {spec.name}, not both; "
                             f"--budget chooses {flag}")
        self.train.validate()
        if self.max_length < 2:
            raise ForgeError(f"invalid --max-length {self.max_length}; it must be at least 2 tokens")
        if self.limit is not None and self.limit <= 0:
            raise ForgeError(f"invalid --limit {self.limit}; it must be a positive number of records")
        if self.dry_run:
            return spec, values
        if self.data is None or self.output is None:
            raise ForgeError("missing --data or --output; both are required unless --dry-run is given")
        check_output_directory(Path(self.output), overwrite=self.overwrite)
        return spec, values


def stored_base_reference(reference: str) -> str:
    """Return the base reference to store in the output: built-in names as given, paths made absolute."""
    path = Path(reference).expanduser()
    if path.exists():
        return str(path.resolve())
    return reference


def training_precision(spec: MethodSpec, settings: TrainSettings) -> TrainSettings:
    """Return the settings with fp32 precision when the method cannot train with bf16 master weights."""
    if settings.precision == "fp32" or spec.supports_bf16:
        return settings
    logger.warning("%s edits its parameters between steps, which bf16 master weights would undo; training in fp32",
                   spec.title)
    return dataclasses.replace(settings, precision="fp32")


def plan_run(request: FinetuneRequest, cache) -> dict[str, Any]:
    """Resolve the method's options and size (matching --budget) and count parameters, without loading weights."""
    from transformers import AutoConfig

    from llmforge.models import resolve

    from llmforge_finetune.budget import count_parameters, match_budget, memory_estimate

    spec, values = request.validate()
    resolved = resolve(request.model, cache=cache)
    if resolved.is_adapter:
        raise ForgeError(f"{request.model} is an adapter; fine-tune its base model {resolved.base.reference} instead")
    model_config = AutoConfig.from_pretrained(str(resolved.path))

    match = None
    if request.budget is not None:
        match = match_budget(model_config, spec, values, request.budget)
        if match.matched:
            values = {**values, spec.size_option: match.size}
        else:
            logger.warning("--method %s has no size option, so --budget %d cannot be matched; it trains %d parameters",
                           spec.name, request.budget, match.trainable)

    try:
        trainable, total = count_parameters(model_config, spec, values)
    except (ValueError, TypeError) as error:
        raise ForgeError(f"cannot attach {spec.title} adapters to {request.model} with options {values}: "
                         f"{error}") from error
    settings = training_precision(spec, request.train)
    memory = memory_estimate(model_config, total=total, trainable=trainable, full=spec.name == "full",
                             precision=settings.precision, batch_size=settings.batch_size,
                             max_length=request.max_length)
    size = values.get(spec.size_option) if spec.size_option else None
    return {
        "method": spec.name, "title": spec.title, "model": request.model, "options": values,
        "size_option": spec.size_option, "size": size, "trainable_parameters": trainable,
        "total_parameters": total, "trainable_fraction": round(trainable / total, 6),
        "budget": match.as_dict() if match else None, "precision": settings.precision,
        "lr": settings.lr, "memory": memory, "model_dir": resolved.path,
    }


def run_finetune(request: FinetuneRequest, *, command: list[str] | None = None, cache=None) -> dict[str, Any]:
    """Fine-tune `request.model` with the requested method and write the output directory; return the summary.

    With `request.dry_run` it returns the plan (method, size, exact trainable count, memory
    estimate) and neither trains nor writes. Otherwise nothing is written under
    `request.output` unless the whole run succeeds, and the run's task vector goes into the cache.
    """
    from llmforge.cache import Cache

    cache = cache or Cache()
    plan = plan_run(request, cache)
    if request.dry_run:
        plan.pop("model_dir")
        return {"dry_run": True, **plan}
    return _train_and_write(request, plan, command, cache)


def _train_and_write(request: FinetuneRequest, plan: dict, command, cache) -> dict[str, Any]:
    import torch

    from llmforge.checkpoint import file_digest
    from llmforge.data import TokenizeStats, read_records, resolve_data_path, to_examples, tokenize_examples
    from llmforge.models import load_model, load_tokenizer

    from llmforge_finetune.adapters import adalora_hooks, count_trainable, initial_lora_factors, wrap_model
    from llmforge_finetune.output import write_run
    from llmforge_finetune.train import train

    spec = get_method(plan["method"])
    settings = training_precision(spec, request.train)
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

    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    loaded = load_model(request.model, dtype=dtype, cache=cache)
    torch.manual_seed(settings.seed)
    total_steps = settings.total_steps(math.ceil(len(tokenized) / settings.batch_size))
    trained = wrap_model(loaded.model, spec, plan["options"], total_steps=total_steps)
    initial_factors = initial_lora_factors(trained) if spec.mutated_init else None
    trainable = count_trainable(trained)
    step_hook, regularizer = adalora_hooks(trained, spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = train(trained, tokenized, settings, pad_token_id=pad_id, progress=request.progress,
                   step_hook=step_hook, regularizer=regularizer)

    inputs = {"base_model": loaded.digest, "data": file_digest(data_path)}
    summary = {
        "output": str(Path(request.output).resolve()),
        "method": spec.name,
        "size_option": plan["size_option"],
        "size": plan["size"],
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "trainable_parameters": trainable,
        # Averaged over the last 10 steps because one micro-batch's loss is noisy.
        "final_train_loss": round(result.final_loss, 6) if result.final_loss is not None else None,
        "final_train_loss_steps": min(10, len(result.loss_curve)),
        "last_step_loss": round(result.loss_curve[-1], 6) if result.loss_curve else None,
    }
    fields = {
        "schema": RECORD_SCHEMA,
        "base_reference": stored_base_reference(request.model),
        "base_digest": loaded.digest,
        "data": {"spec": request.data, "path": str(Path(data_path).resolve()), "digest": inputs["data"], "records": len(records),
                 "examples": stats.total, "truncated": stats.truncated, "dropped": stats.dropped,
                 "format": request.fmt, "columns": request.columns, "prompt_template": request.prompt_template,
                 "completion_template": request.completion_template, "max_length": request.max_length},
        "inputs": inputs,
        "seed": settings.seed,
        "method_options": plan["options"],
        "budget": plan["budget"],
        "hyperparameters": {**plan["options"], **result.settings},
        "loss_curve": result.loss_curve,
        **summary,
    }
    write_run(request, spec, trained, base_digest=loaded.digest, base_dir=plan["model_dir"], tokenizer=tokenizer,
              fields=fields, command=command, cache=cache, initial_factors=initial_factors)
    return summary
