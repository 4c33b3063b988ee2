"""Interpolation and rewinding: score a fine-tune along the path from its base model to the tuned weights.

Interpolation scores W(a) = W0 + a dW at each a in [0, 1], built in one of three ways:

- ``lora-scaling``: LoRA-family adapters (LoRA, rsLoRA, PiSSA and MiLoRA saved by forge, AdaLoRA) add
  scaling * B A x to the base output, so multiplying peft's ``LoraLayer.scaling[adapter]`` by a gives
  W0 + a dW exactly, with no merge.
- ``oft-cayley``: OFT adapters rotate the input side of each weight by R = Cayley(Q), Q skew-symmetric.
  The path scales the generator Q (by sqrt(a) by default, or by a) and rebuilds R, so every point
  is an orthogonal rotation. Linear interpolation of the merged weights would leave the rotation group.
- ``dense``: full fine-tunes and every other adapter type (DoRA, VeRA, IA3, BOFT, ...) get linear
  interpolation of the merged weights, W0 + a (W_ft - W0), for every parameter that changed.

Rewinding scores the checkpoints a ``forge finetune --save-every`` run kept in ``checkpoints/step-NNNNNN/``,
between the base model (step 0) and the final model. Scores of in-memory points are cached under
CacheKey("eval-interpolate-score", {base, tuned, task}, {point, path method, settings}).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from llmforge.cache import Cache, CacheKey
from llmforge.errors import ForgeError
from llmforge_eval.interpolation_path import (
    DEFAULT_OFT_SCALE,
    OFT_SCALES,
    PathModel,
    full_checkpoint_state,
    load_path_model,
    oft_rotation,
    planned_method,
)


logger = logging.getLogger(__name__)

# Re-exported: the CLI and the report read these names from this module.
__all__ = ["DEFAULT_OFT_SCALE", "OFT_SCALES", "PathPoint", "full_checkpoint_state", "interpolate", "load_path_model",
           "oft_rotation", "parse_alphas"]

SCHEMA = "llmforge.eval.interpolate/1"
SCORE_KIND = "eval-interpolate-score"
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Best trade-off: the highest general score among points whose target score is at most this many
# points (hundredths of a 0-1 score) below the best target score on the path.
DEFAULT_TOLERANCE = 1.0
# Bump when a change here changes the weights of a path point, so older cached scores are not reused.
PATH_VERSION = 1


@dataclass
class PathPoint:
    """One point of the path: an interpolation position a, or a training step of the rewinding path."""

    path: str  # "interpolation" or "rewind"
    label: str  # "a=0.25", "base", "step-000020", "final"
    alpha: float | None = None
    step: int | None = None
    reference: str | None = None  # a model reference on disk (base, final model, adapter checkpoint)
    trainable: Path | None = None  # the trainable.safetensors of a full fine-tuning checkpoint
    tasks: dict[str, dict] = field(default_factory=dict)


# Scores


@dataclass
class ScoreSettings:
    """The settings that every score of one run shares."""

    limit: int | None
    seed: int
    dtype: str
    batch_size: int
    use_cache: bool
    progress: bool


def point_key(inputs: dict[str, str], point: str, params: dict[str, Any], task, settings: ScoreSettings) -> CacheKey:
    """Cache key of one in-memory point's score on one task."""
    from llmforge_eval.evaluate import SCORER_VERSION

    params = {**params, "point": point, "limit": settings.limit, "seed": settings.seed, "dtype": settings.dtype,
              "scorer": SCORER_VERSION, "path_version": PATH_VERSION}
    return CacheKey(SCORE_KIND, {**inputs, "task": task.digest}, params)


def score_with_keys(keys: dict[str, CacheKey], tasks, prepare: Callable[[], Any], *, cache: Cache,
                    settings: ScoreSettings) -> dict[str, dict]:
    """Score every task under its cache key; `prepare()` returns the model to score and runs only on a miss."""
    from llmforge_eval.evaluate import score_task

    results: dict[str, dict] = {}
    if settings.use_cache:
        for task in tasks:
            cached = cache.lookup_json(keys[task.spec.name])
            if cached is not None:
                results[task.spec.name] = {**cached, "cached": True}

    for task in tasks:
        if task.spec.name in results:
            continue
        loaded = prepare()
        computed = []

        def compute(task=task, loaded=loaded, computed=computed) -> dict:
            computed.append(True)
            return score_task(loaded, task, limit=settings.limit, seed=settings.seed,
                              batch_size=settings.batch_size, progress=settings.progress)

        result = cache.get_or_compute_json(keys[task.spec.name], compute) if settings.use_cache else compute()
        results[task.spec.name] = {**result, "cached": not computed}
    return results


def score_reference(reference: str, tasks, *, cache: Cache, settings: ScoreSettings) -> dict[str, dict]:
    """Score a model reference on disk under the keys `forge eval` uses, so both commands share scores."""
    from llmforge.models import load_model, model_digest

    from llmforge_eval.evaluate import score_key

    digest = model_digest(reference, cache=cache)
    keys = {task.spec.name: score_key(digest, task, limit=settings.limit, seed=settings.seed,
                                      dtype=settings.dtype) for task in tasks}
    holder: list = []

    def prepare():
        if not holder:
            logger.info("loading %s (%s)", reference, settings.dtype)
            holder.append(load_model(reference, dtype=settings.dtype, cache=cache))
        return holder[0]

    return score_with_keys(keys, tasks, prepare, cache=cache, settings=settings)


# The path


def parse_alphas(text: str) -> list[float]:
    """Parse a comma list of path positions in [0, 1] ("none" for no interpolation) into sorted unique values."""
    if text.strip().lower() == "none":
        return []
    alphas = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ForgeError(f"Invalid --alphas value {item!r}: use numbers in [0, 1], e.g. 0,0.5,1.") from None
        if not 0.0 <= value <= 1.0:
            raise ForgeError(f"Invalid --alphas value {item!r}: every a must be in [0, 1] (0 is the base, 1 the tuned model).")
        alphas.add(value)
    if not alphas:
        raise ForgeError(f"Invalid --alphas {text!r}: give at least one number in [0, 1], or 'none' with --checkpoints.")
    return sorted(alphas)


def find_checkpoints(tuned_dir: Path) -> list[PathPoint]:
    """Return the rewinding points of a forge finetune output's checkpoints/step-NNNNNN/ folders, by step."""
    import re

    folder = tuned_dir / "checkpoints"
    points = []
    for directory in sorted(folder.glob("step-*")) if folder.is_dir() else []:
        match = re.fullmatch(r"step-(\d+)", directory.name)
        if match is None or not directory.is_dir():
            continue
        point = PathPoint("rewind", directory.name, step=int(match.group(1)))
        if (directory / "adapter_config.json").is_file():
            point.reference = str(directory)
        elif (directory / "trainable.safetensors").is_file():
            point.trainable = directory / "trainable.safetensors"
        else:
            raise ForgeError(f"checkpoint {directory} has neither adapter_config.json nor trainable.safetensors; "
                             "it is incomplete, so remove it")
        points.append(point)
    if not points:
        raise ForgeError(f"{tuned_dir} has no checkpoints/step-NNNNNN folders to rewind over; train with "
                         "`forge finetune --save-every N` to keep them, or drop --checkpoints")
    return sorted(points, key=lambda point: point.step)


@dataclass
class ModelPair:
    """The tuned model and its baseline, resolved on disk and digested."""

    tuned: str
    tuned_digest: str
    tuned_dir: Path
    adapter_dir: Path | None
    baseline: str
    baseline_digest: str


def _recorded_base(directory: Path) -> tuple[str | None, str | None]:
    from llmforge.checkpoint import RUN_RECORD_NAME

    path = directory / RUN_RECORD_NAME
    if not path.is_file():
        return None, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ForgeError(f"cannot read the run record {path} ({error}); repair or remove it") from None
    return record.get("base_reference"), record.get("base_digest")


def resolve_pair(tuned: str, baseline: str | None, cache: Cache) -> ModelPair:
    """Resolve the tuned model and the baseline; ForgeError when the tuned model was not trained from it."""
    from llmforge.models import model_digest, resolve

    resolved = resolve(tuned, cache=cache)
    if resolved.is_adapter:
        recorded, recorded_digest = resolved.base.reference, model_digest(resolved.base.reference, cache=cache)
    else:
        recorded, recorded_digest = _recorded_base(resolved.path)
    baseline = baseline or recorded
    if baseline is None:
        raise ForgeError(f"{tuned} names no base model (no adapter_config.json and no forge run record); "
                         "pass the model it was fine-tuned from with --baseline")
    if resolve(baseline, cache=cache).is_adapter:
        raise ForgeError(f"--baseline {baseline} is a PEFT adapter; pass the base model itself")

    baseline_digest = model_digest(baseline, cache=cache)
    if recorded_digest is not None and recorded_digest != baseline_digest:
        raise ForgeError(f"{tuned} was fine-tuned from {recorded} ({recorded_digest[:19]}...), not from --baseline "
                         f"{baseline} ({baseline_digest[:19]}...); pass --baseline {recorded}")
    return ModelPair(tuned, model_digest(tuned, cache=cache), resolved.path,
                     resolved.path if resolved.is_adapter else None, baseline, baseline_digest)


def score_interpolation(pair: ModelPair, alphas: Sequence[float], tasks, *, method: str, oft_scale: str,
                        base_scores: dict, cache: Cache, settings: ScoreSettings) -> list[PathPoint]:
    """Score W(a) at each a; the model is loaded once, and only when some score is not cached.

    W(0) is the base and W(1) the tuned model, so those two points take the scores of the models
    themselves (shared with `forge eval`). Built in memory they would differ by rounding: in
    bfloat16 the adapter's code path can flip a greedy token even at a = 0.
    """
    inputs = {"base": pair.baseline_digest, "tuned": pair.tuned_digest}
    params = {"method": method, **({"oft_scale": oft_scale} if method == "oft-cayley" else {})}
    holder: list[PathModel] = []
    points = []
    for alpha in alphas:
        point = PathPoint("interpolation", f"a={alpha:g}", alpha=alpha)
        if alpha in (0.0, 1.0):
            point.tasks = base_scores if alpha == 0.0 else score_reference(pair.tuned, tasks, cache=cache,
                                                                           settings=settings)
            points.append(point)
            continue
        keys = {task.spec.name: point_key(inputs, point.label, {**params, "alpha": alpha}, task, settings)
                for task in tasks}

        def prepare(alpha=alpha):
            if not holder:
                logger.info("loading %s for the %s path (%s)", pair.tuned, method, settings.dtype)
                holder.append(load_path_model(pair.tuned, pair.baseline, method, dtype=settings.dtype,
                                              oft_scale=oft_scale, cache=cache))
            holder[0].set_alpha(alpha)
            return holder[0].loaded

        point.tasks = score_with_keys(keys, tasks, prepare, cache=cache, settings=settings)
        points.append(point)
    return points


def score_rewinding(pair: ModelPair, base_scores: dict, tasks, *, cache: Cache,
                    settings: ScoreSettings) -> list[PathPoint]:
    """Score the base (step 0), each kept checkpoint and the final model."""
    from llmforge.checkpoint import file_digest
    from llmforge.models import load_model

    checkpoints = find_checkpoints(pair.tuned_dir)
    holder: list = []
    for point in checkpoints:
        if point.reference is not None:
            resolve_pair(point.reference, pair.baseline, cache)
            point.tasks = score_reference(point.reference, tasks, cache=cache, settings=settings)
            continue
        inputs = {"base": pair.baseline_digest, "checkpoint": file_digest(point.trainable)}
        keys = {task.spec.name: point_key(inputs, point.label, {"method": "checkpoint"}, task, settings)
                for task in tasks}

        def prepare(point=point):
            if not holder:
                holder.append(load_model(pair.baseline, dtype=settings.dtype, cache=cache))
            state = full_checkpoint_state(holder[0].model, point.trainable)
            holder[0].model.load_state_dict(state, strict=False)
            return holder[0]

        point.tasks = score_with_keys(keys, tasks, prepare, cache=cache, settings=settings)

    base = PathPoint("rewind", "base", step=0, reference=pair.baseline, tasks=base_scores)
    final = PathPoint("rewind", "final", reference=pair.tuned)
    final.tasks = score_reference(pair.tuned, tasks, cache=cache, settings=settings)
    return [base, *checkpoints, final]


def interpolate(tuned: str, *, target: Sequence[str], general: Sequence[str], baseline: str | None = None,
                alphas: Sequence[float] = DEFAULT_ALPHAS, checkpoints: bool = False, limit: int | None = None,
                seed: int = 0, batch_size: int = 16, task_files: Sequence[str | Path] = (),
                data_dir: str | Path | None = None, dtype: str | None = None, oft_scale: str = DEFAULT_OFT_SCALE,
                tolerance: float = DEFAULT_TOLERANCE, use_cache: bool = True, progress: bool = False,
                cache: Cache | None = None) -> dict[str, Any]:
    """Score the interpolation path (and with `checkpoints` the rewinding path); return the report document."""
    from llmforge_eval.evaluate import DEFAULT_DTYPE, check_task_data, select_tasks, task_registry
    from llmforge_eval.interpolate_report import build_report

    dtype = dtype or DEFAULT_DTYPE
    _check_options(alphas, checkpoints, limit, batch_size, dtype, oft_scale, tolerance)
    if not target or not general:
        raise ForgeError("Name target tasks with --target and general tasks with --general; the path is judged on both.")
    tasks = select_tasks(task_registry(task_files), target, general, data_dir)
    for task in tasks:
        check_task_data(task, limit=limit, seed=seed)

    cache = cache or Cache()
    pair = resolve_pair(tuned, baseline, cache)
    if pair.tuned_digest == pair.baseline_digest:
        raise ForgeError(f"{tuned} and --baseline {pair.baseline} are the same weights, so there is no path to score")
    method = planned_method(pair.adapter_dir)
    settings = ScoreSettings(limit, seed, dtype, batch_size, use_cache, progress)

    base_scores = score_reference(pair.baseline, tasks, cache=cache, settings=settings)
    points = score_interpolation(pair, alphas, tasks, method=method, oft_scale=oft_scale, base_scores=base_scores,
                                 cache=cache, settings=settings)
    if checkpoints:
        points += score_rewinding(pair, base_scores, tasks, cache=cache, settings=settings)

    options = {"alphas": list(alphas), "checkpoints": checkpoints, "limit": limit, "seed": seed, "dtype": dtype,
               "batch_size": batch_size, "cache": use_cache, "oft_scale": oft_scale, "tolerance": tolerance}
    return build_report(pair, method, tasks, base_scores, points, options)


def _check_options(alphas, checkpoints, limit, batch_size, dtype, oft_scale, tolerance) -> None:
    if not alphas and not checkpoints:
        raise ForgeError("Nothing to score: give --alphas, or --checkpoints to rewind over the run's checkpoints.")
    if any(not 0.0 <= alpha <= 1.0 for alpha in alphas):
        raise ForgeError(f"Invalid alphas {list(alphas)}: every a must be in [0, 1].")
    if limit is not None and limit < 1:
        raise ForgeError(f"Invalid --limit {limit}: use 1 or more.")
    if batch_size < 1:
        raise ForgeError(f"Invalid --batch-size {batch_size}: use 1 or more.")
    if dtype not in ("float32", "bfloat16"):
        raise ForgeError(f"Invalid dtype {dtype!r}: use float32 or bfloat16.")
    if oft_scale not in OFT_SCALES:
        raise ForgeError(f"Invalid --oft-scale {oft_scale!r}; expected one of {', '.join(OFT_SCALES)}.")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ForgeError(f"Invalid --tolerance {tolerance}: use a number of points, 0 or more.")
