"""One zeroth-order run end to end: load, build the objective, step, evaluate, checkpoint, write."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError
from llmforge.models import stored_reference

from llmforge_zo.settings import ZOSettings

logger = logging.getLogger(__name__)

RECORD_SCHEMA = "llmforge.zo.run/1"
# Test hook: the process kills itself with SIGKILL right after saving the state of this step.
KILL_AFTER_STEP_VARIABLE = "LLMFORGE_ZO_KILL_AFTER_STEP"
SINGLE_TOKEN_POLICIES = ("auto", "require")


@dataclass
class ZORequest:
    """Everything a `forge zo` run needs; the command's options map onto these fields.

    With `verbalizers` ("0=terrible,1=great") the objective is classification: `template` fills a
    prompt from each record and `label_field` names the label. Without them it is the language-
    model loss on completions, read with the `forge finetune` formats (`fmt`, `columns`, templates).
    """

    model: str
    data: str
    output: Path
    settings: ZOSettings = field(default_factory=ZOSettings)
    template: str | None = None
    verbalizers: str | None = None
    label_field: str = "label"
    single_token: str = "auto"
    fmt: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    completion_template: str | None = None
    max_length: int = 256
    limit: int | None = None
    eval_data: str | None = None
    eval_limit: int | None = None
    eval_every: int | None = None
    eval_batch_size: int = 32
    save_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    backend: str = "torch"
    packing: bool = True
    progress: bool = True

    @property
    def classifies(self) -> bool:
        return self.verbalizers is not None

    def validate(self) -> ZOSettings:
        """Raise ForgeError on an invalid request before anything is loaded; return the resolved settings."""
        settings = self.settings.resolved()
        if self.template is not None and not self.classifies:
            raise ForgeError("--template fills classification prompts and needs --verbalizers; for completions use "
                             "--prompt-template and --completion-template")
        if self.classifies and not self.template:
            raise ForgeError('--verbalizers needs --template, the prompt that ends in the cue, e.g. "{sentence} It was"')
        if self.single_token not in SINGLE_TOKEN_POLICIES:
            raise ForgeError(f"invalid --single-token {self.single_token!r}; use one of: {', '.join(SINGLE_TOKEN_POLICIES)}")
        if self.max_length < 2:
            raise ForgeError(f"invalid --max-length {self.max_length}; a prompt and a scored token need at least 2")
        for flag, value in {"--limit": self.limit, "--eval-limit": self.eval_limit, "--eval-every": self.eval_every,
                            "--save-every": self.save_every, "--eval-batch-size": self.eval_batch_size}.items():
            if value is not None and value <= 0:
                raise ForgeError(f"invalid {flag} {value}; it must be a positive number")
        if self.eval_every is not None and self.eval_data is None:
            raise ForgeError("--eval-every needs --eval-data, the dev set to evaluate on")
        return settings


def load_examples(spec: str, request: ZORequest, tokenizer, *, limit: int | None, warn: bool = True):
    """Read a data file into ClassificationData or CompletionData, as the request's objective needs."""
    from llmforge.data import read_records, resolve_data_path, to_examples, tokenize_examples

    from llmforge_zo.examples import CompletionData, classification_data, pad_id_of, parse_verbalizers

    records = read_records(resolve_data_path(spec)).head(limit)
    if request.classifies:
        return classification_data(records, tokenizer, template=request.template,
                                   verbalizer=parse_verbalizers(request.verbalizers), label_field=request.label_field,
                                   max_length=request.max_length, single_token=request.single_token,
                                   warn_options=warn)
    examples = to_examples(records, tokenizer, fmt=request.fmt, columns=request.columns,
                           prompt_template=request.prompt_template, completion_template=request.completion_template)
    locations = [records.where(index) for index in range(len(records))]
    tokenized = tokenize_examples(examples, tokenizer, max_length=request.max_length, locations=locations)
    return CompletionData(tokenized, pad_id_of(tokenizer))


def evaluate(method, data, batch_size: int) -> dict[str, float]:
    """Score the trained point on a dev set: accuracy and loss (classification) or loss (completions)."""
    total_loss, correct, count, classifies = 0.0, 0, 0, False
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        batch = data.batch(indices)
        scores = method.scorer.score(method.current(), batch)
        total_loss += scores.losses.item() * len(indices)
        if batch.classifies:
            classifies = True
            correct += int(scores.correct(batch.labels)[0])
        count += len(indices)

    result = {"loss": total_loss / count, "examples": count}
    if classifies:
        result["accuracy"] = correct / count
    return result


def run_settings(request: ZORequest, settings: ZOSettings, model_digest: str, data_digest: str) -> dict[str, Any]:
    """Return the settings that --resume must find unchanged (they decide the trained weights), by option name.

    The model and the data are compared by content digest.
    """
    return {"model": model_digest, "data": data_digest, **settings.as_dict(),
            "template": request.template, "verbalizers": request.verbalizers, "label_field": request.label_field,
            "format": request.fmt, "columns": request.columns, "prompt_template": request.prompt_template,
            "completion_template": request.completion_template, "max_length": request.max_length,
            "limit": request.limit, "backend": request.backend, "packing": request.packing}


def run_zo(request: ZORequest, *, command: list[str] | None = None, cache=None) -> dict[str, Any]:
    """Run zeroth-order fine-tuning for `request`, write its output, and return the run summary."""
    import torch

    from llmforge.cache import Cache
    from llmforge.checkpoint import check_output_apart, check_output_directory, file_digest, run_record
    from llmforge.data import resolve_data_path
    from llmforge.models import load_model, resolve_model_dir

    from llmforge_zo.backends import get_backend
    from llmforge_zo.checkpoints import History, PartialRun
    from llmforge_zo.engine import find_targets
    from llmforge_zo.examples import batch_indices
    from llmforge_zo.methods import build_method
    from llmforge_zo.output import check_trainable_base, write_output

    settings = request.validate()
    if not request.resume:
        check_output_directory(request.output, overwrite=request.overwrite)
    check_output_apart(request.output, {"model": request.model, "training data": request.data,
                                        "eval data": request.eval_data})
    factory = get_backend(request.backend)
    cache = cache or Cache()
    check_trainable_base(request.model, cache)

    loaded = load_model(request.model, dtype=torch.float32, cache=cache)
    train = load_examples(request.data, request, loaded.tokenizer, limit=request.limit)
    batch_indices(len(train), settings.batch_size, seed=settings.seed, step=0)  # rejects data smaller than a batch
    dev = None
    if request.eval_data is not None:
        dev = load_examples(request.eval_data, request, loaded.tokenizer, limit=request.eval_limit, warn=False)

    targets = find_targets(loaded.model, settings.target_modules)
    scorer = factory(loaded.model, targets, settings.torch_dtype, packing=request.packing)
    method = build_method(settings, scorer)
    data_digest = file_digest(resolve_data_path(request.data))
    partial = PartialRun(request.output, run_settings(request, settings, loaded.digest, data_digest))
    restored = partial.open(resume=request.resume, overwrite=request.overwrite)
    history, start = History(), 0
    if restored is not None:
        method.load_state_tensors(restored.tensors, restored.step)
        history, start = restored.history, restored.step
        logger.info("resuming %s at step %d of %d", request.output, start, settings.steps)

    times = train_steps(method, train, dev, request, settings, history, partial, start)
    final = evaluate(method, dev, request.eval_batch_size) if dev is not None else None

    record = run_record_fields(request, settings, loaded, data_digest, history, times, final, len(train), targets)
    written = write_output(request.output, method, loaded=loaded, base_dir=resolve_model_dir(request.model, cache=cache),
                           base_reference=stored_reference(request.model), record=run_record(command, **record),
                           cache=cache, overwrite=request.overwrite or request.resume)
    partial.discard()
    return {**record, **written, "output": str(request.output)}


def train_steps(method, train, dev, request: ZORequest, settings: ZOSettings, history, partial, start: int):
    """Run steps `start`..settings.steps - 1 with evaluation and checkpoints; return the phase times."""
    from tqdm.auto import tqdm

    from llmforge_zo.methods import PhaseTimes

    times = PhaseTimes()
    if dev is not None and start == 0:
        history.evaluations.append({"step": 0, **evaluate(method, dev, request.eval_batch_size)})

    bar = tqdm(total=settings.steps, initial=start, desc="zo", unit="step", disable=not request.progress)
    if dev is not None and start == 0:
        _note(bar, request, f"step 0 (zero-shot): {_describe(history.evaluations[-1])}")
    started = time.perf_counter()
    try:
        _step_loop(method, train, dev, request, settings, history, partial, start, times, bar)
    except KeyboardInterrupt:
        bar.close()
        print(_interrupt_message(len(history.losses), partial), file=sys.stderr)
        raise
    bar.close()
    times.wall, times.steps = time.perf_counter() - started, settings.steps - start
    return times


def _step_loop(method, train, dev, request: ZORequest, settings: ZOSettings, history, partial, start: int,
               times, bar) -> None:
    from llmforge_zo.examples import batch_indices
    from llmforge_zo.methods import NonFiniteLoss

    for step in range(start, settings.steps):
        batch = train.batch(batch_indices(len(train), settings.batch_size, seed=settings.seed, step=step))
        try:
            losses = method.step(step, batch, times)
        except NonFiniteLoss as error:
            raise ForgeError(_non_finite_message(error, partial)) from None
        history.losses.append([step, sum(losses) / len(losses)])
        bar.update(1)
        bar.set_postfix(loss=f"{history.losses[-1][1]:.4f}")

        done = step + 1
        if dev is not None and request.eval_every and done % request.eval_every == 0 and done < settings.steps:
            history.evaluations.append({"step": done, **evaluate(method, dev, request.eval_batch_size)})
            _note(bar, request, f"step {done}: {_describe(history.evaluations[-1])}")
        if request.save_every and done % request.save_every == 0 and done < settings.steps:
            partial.save(done, method.state_tensors(), history)
            if os.environ.get(KILL_AFTER_STEP_VARIABLE) == str(done):
                os.kill(os.getpid(), signal.SIGKILL)


def _interrupt_message(steps_done: int, partial) -> str:
    latest = partial.latest()
    if latest is None:
        return (f"interrupted after step {steps_done}; no state was saved, so a rerun starts over "
                "(pass --save-every N to make a run resumable)")
    return (f"interrupted after step {steps_done}; the state of the last save is in {partial.directory}, "
            "so rerun the same command with --resume to continue from it")


def _note(bar, request: ZORequest, message: str) -> None:
    """Print a progress note on stderr above the bar, unless --quiet."""
    if request.progress:
        bar.write(message, file=sys.stderr)


def _describe(evaluation: dict) -> str:
    accuracy = f"accuracy {evaluation['accuracy']:.4f}, " if "accuracy" in evaluation else ""
    return f"{accuracy}loss {evaluation['loss']:.4f} on {evaluation['examples']} dev examples"


def _non_finite_message(error, partial) -> str:
    latest = partial.latest()
    where = (f"the last saved state ({latest.name}) stays in {partial.directory}; resume it with --resume"
             if latest else "no state was saved (pass --save-every N to keep one)")
    return (f"a probed loss is NaN or infinite at step {error.step} ({error.losses}); the weights were not "
            f"updated. Lower --lr or --eps, or check the data; {where}")


def run_record_fields(request: ZORequest, settings: ZOSettings, loaded, data_digest: str, history, times,
                      final, train_size: int, targets: list[str]) -> dict[str, Any]:
    """Return what the run record and the summary report."""
    steps_run = max(1, times.steps)
    per_step = {name: value / steps_run for name, value in times.as_dict().items()}
    zero_shot = history.evaluations[0] if history.evaluations and history.evaluations[0]["step"] == 0 else None
    return {
        "schema": RECORD_SCHEMA,
        "base_reference": stored_reference(request.model),
        "base_digest": loaded.digest,
        "data": request.data, "data_digest": data_digest, "train_examples": train_size,
        "eval_data": request.eval_data,
        "objective": "classification" if request.classifies else "language-model",
        "template": request.template, "verbalizers": request.verbalizers, "label_field": request.label_field,
        "settings": settings.as_dict(), "backend": request.backend, "packing": request.packing,
        "trained_modules": len(targets),
        "steps": settings.steps, "final_loss": history.losses[-1][1] if history.losses else None,
        "zero_shot": zero_shot, "final": final, "evaluations": history.evaluations,
        "loss_curve": history.losses, "resumed_at": history.resumed_at,
        # Step time leaves out dev evaluations and checkpoint saves; the wall time covers everything.
        "seconds_per_step": sum(per_step.values()), "phase_seconds_per_step": per_step,
        "wall_seconds": times.wall,
    }
