"""One fine-tuning run end to end: plan the method and its size, train, write the output, cache the task vector."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.checkpoint import check_output_apart, check_output_directory
from llmforge.cli import silence_progress_bars
from llmforge.data import OVERLONG_POLICIES
from llmforge.errors import ForgeError
from llmforge.models import stored_reference

from llmforge_finetune.methods import MethodSettings, MethodSpec, get_method
from llmforge_finetune.train import TrainSettings

logger = logging.getLogger(__name__)

RECORD_SCHEMA = "llmforge.finetune.run/1"
# The name of the process count among --resume's settings, as torchrun and accelerate launch set it.
WORLD_SIZE_SETTING = "WORLD_SIZE"


@dataclass
class FinetuneRequest:
    """Everything a fine-tuning run needs; the `forge finetune` options map onto these fields.

    `data` and `output` may be None only for a dry run. `budget` makes the run choose the
    method's size option whose trainable-parameter count is nearest to it. `overlong` is
    "truncate" or "reject", what happens to examples longer than `max_length` tokens.
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
    overlong: str = "truncate"
    limit: int | None = None
    overwrite: bool = False
    progress: bool = True
    dry_run: bool = False
    eval_split: float = 0.0
    eval_data: str | None = None
    eval_every: int | None = None
    save_every: int | None = None
    resume: bool = False
    merge: bool = False

    def validate(self) -> tuple[MethodSpec, dict[str, Any]]:
        """Raise ForgeError on invalid settings before anything is loaded; return the method and its option values."""
        spec = get_method(self.method.method)
        values = spec.resolve(self.method)
        if self.budget is not None and spec.size_option and getattr(self.method, spec.size_option) is not None:
            flag = "--rank" if spec.size_option == "rank" else "--block-size"
            raise ForgeError(f"pass either --budget or {flag} for --method {spec.name}, not both; "
                             f"--budget chooses {flag}")
        self.train.validate()
        if self.merge and spec.name == "full":
            raise ForgeError("--merge applies to adapter methods; --method full already writes the whole model")
        if self.max_length < 2:
            raise ForgeError(f"invalid --max-length {self.max_length}; it must be at least 2 tokens")
        if self.overlong not in OVERLONG_POLICIES:
            raise ForgeError(f"invalid --overlong {self.overlong!r}; use one of: {', '.join(OVERLONG_POLICIES)}")
        if self.limit is not None and self.limit <= 0:
            raise ForgeError(f"invalid --limit {self.limit}; it must be a positive number of records")
        self._validate_loop_options()
        if self.dry_run:
            return spec, values
        if self.data is None or self.output is None:
            raise ForgeError("missing --data or --output; both are required unless --dry-run is given")
        check_output_directory(Path(self.output), overwrite=self.overwrite)
        check_output_apart(self.output, {"model": self.model, "training data": self.data, "eval data": self.eval_data})
        return spec, values

    def _validate_loop_options(self) -> None:
        if not 0 <= self.eval_split < 1:
            raise ForgeError(f"invalid --eval-split {self.eval_split}; it must be a fraction in [0, 1)")
        if self.eval_split > 0 and self.eval_data is not None:
            raise ForgeError("pass either --eval-split or --eval-data, not both")
        if self.eval_every is not None and self.eval_every <= 0:
            raise ForgeError(f"invalid --eval-every {self.eval_every}; it must be a positive number of steps")
        if self.eval_every is not None and self.eval_split == 0 and self.eval_data is None:
            raise ForgeError("--eval-every needs held-out data: pass --eval-split F or --eval-data PATH")
        if self.save_every is not None and self.save_every <= 0:
            raise ForgeError(f"invalid --save-every {self.save_every}; it must be a positive number of steps")


def training_precision(spec: MethodSpec, settings: TrainSettings) -> TrainSettings:
    """Return the settings with fp32 precision when the method cannot train with bf16 master weights."""
    if settings.precision == "fp32" or spec.supports_bf16:
        return settings
    logger.warning("%s edits its parameters between steps, which bf16 master weights would undo; training in fp32",
                   spec.title)
    return dataclasses.replace(settings, precision="fp32")


def _vera_features(model_config, spec: MethodSpec, values: dict[str, Any]) -> int:
    """Return VeRA's per-token intermediate values (rank per adapted layer), warning when the rank passes the width.

    Each VeRA layer projects its input to `rank` values with a frozen random matrix, so above the
    model's hidden size a larger rank adds trainable scales but mostly memory and time.
    """
    from llmforge_finetune.budget import targeted_shapes

    if spec.name != "vera":
        return 0
    rank = values["rank"]
    if rank > model_config.hidden_size:
        logger.warning("VeRA --rank %d is above the hidden size %d: every adapted layer keeps a (tokens x %d) "
                       "intermediate, so memory and time grow with the rank; a smaller --budget or --rank is cheaper",
                       rank, model_config.hidden_size, rank)
    return rank * len(targeted_shapes(model_config, spec, values))


def plan_run(request: FinetuneRequest, cache) -> dict[str, Any]:
    """Resolve the method's options and size (matching --budget) and count parameters, without loading weights."""
    from transformers import AutoConfig

    from llmforge.models import resolve

    from llmforge_finetune.budget import check_target_modules, count_parameters, match_budget, memory_estimate

    spec, values = request.validate()
    resolved = resolve(request.model, cache=cache)
    if resolved.is_adapter:
        raise ForgeError(f"{request.model} is an adapter; fine-tune its base model {resolved.base.reference} instead")
    model_config = AutoConfig.from_pretrained(str(resolved.path), trust_remote_code=False)
    check_max_length(request.max_length, model_config, request.model)
    check_target_modules(model_config, values, request.model)

    match = None
    if request.budget is not None:
        match = match_budget(model_config, spec, values, request.budget, model_name=request.model)
        if match.matched:
            values = {**values, spec.size_option: match.size}
        else:
            logger.warning("--method %s has no size option, so --budget %d cannot be matched; it trains %d parameters "
                           "(%.2fx the budget)", spec.name, request.budget, match.trainable,
                           match.trainable / request.budget)

    try:
        trainable, total = count_parameters(model_config, spec, values)
    except (ValueError, TypeError) as error:
        raise ForgeError(f"cannot attach {spec.title} adapters to {request.model} with options {values}: "
                         f"{error}") from error
    settings = training_precision(spec, request.train)
    memory = memory_estimate(model_config, total=total, trainable=trainable, full=spec.name == "full",
                             precision=settings.precision, batch_size=settings.batch_size,
                             max_length=request.max_length, adapter_features=_vera_features(model_config, spec, values))
    size = values.get(spec.size_option) if spec.size_option else None
    return {
        "method": spec.name, "title": spec.title, "model": request.model, "options": values,
        "size_option": spec.size_option, "size": size, "trainable_parameters": trainable,
        "total_parameters": total, "trainable_fraction": round(trainable / total, 6),
        "budget": match.as_dict() if match else None, "precision": settings.precision,
        "lr": settings.lr, "memory": memory, "model_dir": resolved.path,
    }


def check_max_length(max_length: int, model_config, model_name: str) -> None:
    """Raise ForgeError when --max-length exceeds the model's max_position_embeddings."""
    limit = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ForgeError(f"invalid --max-length {max_length}: {model_name} accepts at most {limit} tokens "
                         f"(max_position_embeddings in its config.json); pass --max-length {limit} or less")


def run_finetune(request: FinetuneRequest, *, command: list[str] | None = None,
                 cache=None) -> dict[str, Any] | None:
    """Fine-tune `request.model` with the requested method and write the output directory; return the summary.

    With `request.dry_run` it returns the plan (method, size, exact trainable count, memory
    estimate) and neither trains nor writes. Otherwise nothing is written under
    `request.output` unless the whole run succeeds, and the run's task vector goes into the cache.
    In a data-parallel run (`torchrun`, `accelerate launch`) only rank 0 writes and returns the
    summary; the other ranks return None.
    """
    from llmforge.cache import Cache

    if not request.progress:
        # Before plan_run, whose first use of a built-in model converts its GGUF file with a progress bar.
        silence_progress_bars()
    cache = cache or Cache()
    plan = plan_run(request, cache)
    if request.dry_run:
        plan.pop("model_dir")
        return {"dry_run": True, **plan}
    return _train_and_write(request, plan, command, cache)


def split_held_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Return (train, held-out): a seeded random `fraction` of the examples (at least one) is held out."""
    import random

    if fraction == 0:
        return list(examples), []
    held_count = max(1, round(fraction * len(examples)))
    if held_count >= len(examples):
        raise ForgeError(f"invalid --eval-split {fraction}: it holds out {held_count} of {len(examples)} examples, "
                         "which leaves none to train on; lower it or add data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:held_count])
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def resume_settings(request: FinetuneRequest, spec: MethodSpec, plan: dict, settings: TrainSettings, *,
                    model_digest: str, data_digest: str, eval_digest: str | None,
                    world_size: int = 1) -> dict[str, Any]:
    """Return the settings that decide the trained weights, keyed by option flag, for comparison on --resume.

    The number of data-parallel processes is included: each rank's share of a batch and its
    random generator state are saved for that number.
    """
    from llmforge_finetune.methods import OPTION_FLAGS

    values = {
        "--model": model_digest, "--data": data_digest, "--format": request.fmt, "--column": request.columns,
        "--prompt-template": request.prompt_template, "--completion-template": request.completion_template,
        "--max-length": request.max_length, "--limit": request.limit, "--eval-split": request.eval_split,
        "--eval-data": eval_digest, "--method": spec.name, WORLD_SIZE_SETTING: world_size,
    }
    for name, value in plan["options"].items():
        values[OPTION_FLAGS.get(name, "--" + name.replace("_", "-"))] = value
    for name, value in dataclasses.asdict(settings).items():
        flag = {"precision": "--bf16/--no-bf16", "packing": "--packing/--no-packing"}.get(name)
        values[flag or "--" + name.replace("_", "-")] = value
    return values


def _read_tokenized(spec_or_path: str, request: FinetuneRequest, tokenizer, *, limit: int | None = None):
    """Read, format and tokenize a data file; return (path, record count, tokenized examples, stats)."""
    from llmforge.data import TokenizeStats, read_records, resolve_data_path, to_examples, tokenize_examples
    from llmforge.readers import where

    path = resolve_data_path(spec_or_path)
    records = read_records(path).head(limit)
    examples = to_examples(records, tokenizer, fmt=request.fmt, columns=request.columns,
                           prompt_template=request.prompt_template, completion_template=request.completion_template)
    stats = TokenizeStats()
    tokenized = tokenize_examples(examples, tokenizer, max_length=request.max_length, stats=stats,
                                  overlong=request.overlong,
                                  locations=[where(records, index) for index in range(len(records))])
    return path, len(records), tokenized, stats


def check_training_set(train_count: int, request: FinetuneRequest, *, records: int, stats, held_out: int) -> None:
    """Raise ForgeError when fewer training examples remain than --batch-size, saying where the others went."""
    batch_size = request.train.batch_size
    if train_count >= batch_size:
        return

    origin = f"{records} records" + (f" after --limit {request.limit}" if request.limit is not None else "")
    if stats.dropped:
        origin += f", {stats.dropped} dropped as too long for --max-length {request.max_length}"
    if held_out:
        origin += f", {held_out} held out by --eval-split {request.eval_split}"
    raise ForgeError(f"the training set has {train_count} examples ({origin}), fewer than --batch-size "
                     f"{batch_size}; pass --batch-size {train_count} or less, or add data")


def _open_partial(request: FinetuneRequest, spec: MethodSpec, plan: dict, settings: TrainSettings, cache, world):
    """Digest the inputs and open the run's OUTPUT.partial directory, before any weights are loaded."""
    from llmforge.checkpoint import file_digest
    from llmforge.data import resolve_data_path
    from llmforge.models import model_digest

    from llmforge_finetune.resume import PartialRun

    data_digest = file_digest(resolve_data_path(request.data))
    eval_digest = file_digest(resolve_data_path(request.eval_data)) if request.eval_data else None
    values = resume_settings(request, spec, plan, settings, model_digest=model_digest(request.model, cache=cache),
                             data_digest=data_digest, eval_digest=eval_digest, world_size=world.size)
    return PartialRun.open(Path(request.output), values, save_every=request.save_every, resume=request.resume,
                           overwrite=request.overwrite, main=world.is_main)


def checkpoint_writer(spec: MethodSpec, trained, *, initial_factors, base_reference: str, base_digest: str):
    """Return save(directory, step): a PEFT adapter directory, or for `full` the trainable parameters as safetensors."""
    from llmforge.checkpoint import save_tensors, write_json

    from llmforge_finetune.adapters import save_adapter

    def save(directory: Path, step: int) -> None:
        note = {"step": step, "method": spec.name, "base_reference": base_reference, "base_digest": base_digest}
        if spec.name == "full":
            tensors = {name: p for name, p in trained.named_parameters() if p.requires_grad}
            save_tensors(directory / "trainable.safetensors", tensors)
            note["contents"] = ("trainable parameters of the full model at this step, by parameter name; "
                                "the other files of the model are those of the base")
        else:
            save_adapter(trained, directory, spec, initial_factors)
        write_json(directory / "forge_checkpoint.json", note)

    return save


def _train_and_write(request: FinetuneRequest, plan: dict, command, cache) -> dict[str, Any] | None:
    """Train and write the output; return the summary, or None on the ranks other than 0 of a data-parallel run.

    Under `torchrun` or `accelerate launch` every process trains on its share of each batch, and
    rank 0 alone writes OUTPUT.partial, the output directory and the cache entry while the other
    ranks wait for it.
    """
    from llmforge_finetune.distributed import World

    world = World.from_environment(connect=False)
    world.check_batch_size(request.train.batch_size)
    try:
        return _train_on_rank(request, plan, command, cache, world)
    finally:
        world.close()


def _train_on_rank(request: FinetuneRequest, plan: dict, command, cache, world) -> dict[str, Any] | None:
    import torch

    from llmforge.models import load_model, load_tokenizer

    from llmforge_finetune.adapters import adalora_hooks, count_trainable, initial_lora_factors, wrap_model
    from llmforge_finetune.output import write_run
    from llmforge_finetune.train import HeldOut, train

    spec = get_method(plan["method"])
    settings = training_precision(spec, request.train)
    partial = _open_partial(request, spec, plan, settings, cache, world)
    if not world.is_main:
        silence_progress_bars()

    tokenizer = load_tokenizer(request.model, cache=cache)
    data_path, record_count, tokenized, stats = _read_tokenized(request.data, request, tokenizer, limit=request.limit)
    tokenized, held_out = split_held_out(tokenized, request.eval_split, settings.seed)
    check_training_set(len(tokenized), request, records=record_count, stats=stats, held_out=len(held_out))
    if request.eval_data is not None:
        held_out = _read_tokenized(request.eval_data, request, tokenizer)[2]

    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    loaded = load_model(request.model, dtype=dtype, cache=cache)
    torch.manual_seed(settings.seed)
    total_steps = settings.total_steps(math.ceil(len(tokenized) / settings.batch_size))
    trained = wrap_model(loaded.model, spec, plan["options"], total_steps=total_steps)
    initial_factors = initial_lora_factors(trained) if spec.mutated_init else None
    base_reference = stored_reference(request.model)
    if spec.name != "full":
        trained.peft_config["default"].base_model_name_or_path = base_reference
    partial.save_checkpoint = checkpoint_writer(spec, trained, initial_factors=initial_factors,
                                                base_reference=base_reference, base_digest=loaded.digest)
    step_hook, regularizer = adalora_hooks(trained, spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = train(trained, tokenized, settings, pad_token_id=pad_id, progress=request.progress,
                   step_hook=step_hook, regularizer=regularizer,
                   held_out=HeldOut(held_out, request.eval_every) if held_out else None, partial=partial,
                   world=world)
    if not world.is_main:
        world.barrier()
        return None

    summary = _summary(request, spec, plan, result, count_trainable(trained), partial, world)
    fields = _record_fields(request, plan, settings, result, partial, summary, base_reference=base_reference,
                            base_digest=loaded.digest, data=(data_path, record_count, stats),
                            examples=(len(tokenized), len(held_out)))
    checkpoints = partial.directory / "checkpoints"
    write_run(request, spec, trained, base_digest=loaded.digest, base_dir=plan["model_dir"], tokenizer=tokenizer,
              fields=fields, command=command, cache=cache, initial_factors=initial_factors,
              checkpoints_dir=checkpoints if checkpoints.is_dir() else None)
    partial.discard()
    world.barrier()
    return summary


def _record_fields(request: FinetuneRequest, plan: dict, settings: TrainSettings, result, partial, summary: dict, *,
                   base_reference: str, base_digest: str, data: tuple, examples: tuple[int, int]) -> dict[str, Any]:
    """Return the run record's fields: inputs, data statistics, hyper-parameters, curves and the summary."""
    from llmforge.checkpoint import file_digest

    data_path, record_count, stats = data
    train_examples, eval_examples = examples
    inputs = {"base_model": base_digest, "data": file_digest(data_path)}
    return {
        "schema": RECORD_SCHEMA,
        "base_reference": base_reference,
        "base_digest": base_digest,
        "data": {"spec": request.data, "path": str(Path(data_path).resolve()), "digest": inputs["data"],
                 "records": record_count, "examples": stats.total, "truncated": stats.truncated,
                 "dropped": stats.dropped, "format": request.fmt, "columns": request.columns,
                 "prompt_template": request.prompt_template, "completion_template": request.completion_template,
                 "max_length": request.max_length, "overlong": request.overlong, "train_examples": train_examples,
                 "eval_examples": eval_examples, "eval_split": request.eval_split, "eval_data": request.eval_data},
        "inputs": inputs,
        "seed": settings.seed,
        "method_options": plan["options"],
        "budget": plan["budget"],
        "hyperparameters": {**plan["options"], **result.settings},
        "loss_curve": result.loss_curve,
        "eval_curve": result.eval_curve,
        "eval_every": request.eval_every,
        "save_every": request.save_every,
        "resumes": partial.resumes,
        **summary,
    }


def _summary(request: FinetuneRequest, spec: MethodSpec, plan: dict, result, trainable: int, partial, world) -> dict:
    """Return the run's summary; `tokens` and `tokens_per_second` count the tokens of all processes."""
    return {
        "output": str(Path(request.output).resolve()),
        "merged_model": str(Path(request.output).resolve() / "merged") if request.merge else None,
        "method": spec.name,
        "size_option": plan["size_option"],
        "size": plan["size"],
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "world_size": world.size,
        # Examples per optimizer step over all processes, and examples per forward pass of one process.
        "global_batch": request.train.batch_size * request.train.grad_accum,
        "micro_batch_per_process": request.train.batch_size // world.size,
        "trainable_parameters": trainable,
        # Averaged over the last 10 steps because one micro-batch's loss is noisy.
        "final_train_loss": round(result.final_loss, 6) if result.final_loss is not None else None,
        "final_train_loss_steps": min(10, len(result.loss_curve)),
        "last_step_loss": round(result.loss_curve[-1], 6) if result.loss_curve else None,
        "final_eval_loss": result.final_eval_loss,
        "checkpoints": [f"checkpoints/step-{step:06d}" for step in partial.checkpoint_steps()],
        "resumed_from_step": partial.restored.step if partial.restored is not None else None,
    }
