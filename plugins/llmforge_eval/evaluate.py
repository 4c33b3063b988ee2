"""Evaluate models on tasks: the task registry, cached per-task scores, and the report document.

`evaluate` is the plain-Python entry point behind `forge eval`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llmforge.cache import Cache, CacheKey
from llmforge.errors import ForgeError
from llmforge_eval.report import build_report
from llmforge_eval.tasks import (
    TaskSpec,
    coerce_spec,
    load_spec_file,
    read_task_records,
    resolve_data_path,
    sample_indices,
    task_digest,
)

logger = logging.getLogger(__name__)

# bfloat16 is the default because it scored the demo tasks 2-4x faster than float32 with smollm2-135m
# and batch size 16. The machine was a 2-core CPU with AVX-512 bf16, shared with other jobs. Arith (200
# examples) took 26 s against 57 s, and facts (76 questions) 5.6 s against 26 s. Scores barely moved:
# facts accuracy was 0.724 in both, arith 0.090 against 0.095 (one example of 200). Use --dtype float32
# to compare with float32 results; the dtype is part of the cache key and of the report.
DEFAULT_DTYPE = "bfloat16"

# Bump when a change to the scoring code changes scores, so that older cached scores are not reused.
# 2: generate tasks accept any answer of a list reference field instead of the list's repr.
SCORER_VERSION = 2


@dataclass(frozen=True)
class SelectedTask:
    """A task chosen for this run: its spec, role, resolved data file and digest."""

    spec: TaskSpec
    role: str
    data_path: Path
    digest: str


def task_registry(task_files: Sequence[str | Path] = ()) -> dict[str, TaskSpec]:
    """Collect task specs from every plugin's `forge_eval_tasks` hook, then from the given spec files.

    Raises ForgeError when two specs share a name.
    """
    from llmforge.plugins import get_plugin_manager

    registry: dict[str, TaskSpec] = {}
    manager = get_plugin_manager()
    for hook in manager.hook.forge_eval_tasks.get_hookimpls():
        for item in hook.function() or []:
            _register(registry, coerce_spec(item, source=f"plugin {hook.plugin_name}"))
    for path in task_files:
        _register(registry, load_spec_file(path))
    return registry


def _register(registry: dict[str, TaskSpec], spec: TaskSpec) -> None:
    if spec.name in registry:
        raise ForgeError(
            f"Duplicate task name {spec.name!r}: defined in {registry[spec.name].source} and in {spec.source}; "
            "rename one of them."
        )
    registry[spec.name] = spec


def select_tasks(registry: dict[str, TaskSpec], target: Sequence[str], general: Sequence[str],
                 data_dir: str | Path | None) -> list[SelectedTask]:
    """Look up the named tasks, resolve their data files and compute their digests (before any model loads)."""
    selected, seen = [], set()
    for role, names in (("target", target), ("general", general)):
        for name in names:
            if name not in registry:
                raise ForgeError(f"Unknown task {name!r}; available: {', '.join(sorted(registry))}. "
                                 "See `forge eval --list-tasks`, or add one with --task-file.")
            if name in seen:
                raise ForgeError(f"Task {name!r} is named more than once in --target/--general.")
            seen.add(name)
            spec = registry[name]
            path = resolve_data_path(spec, data_dir)
            selected.append(SelectedTask(spec, role, path, task_digest(spec, path)))
    return selected


def score_task(loaded, task: SelectedTask, *, limit: int | None, seed: int, batch_size: int,
               progress: bool) -> dict[str, Any]:
    """Score one loaded model on one task; the result carries the elapsed seconds."""
    from tqdm import tqdm

    from llmforge_eval.generation import score_generate
    from llmforge_eval.multiple_choice import score_multiple_choice
    from llmforge_eval.perplexity import score_perplexity

    spec = task.spec
    started = time.perf_counter()
    with tqdm(desc=f"{spec.name}", unit="seq", disable=not progress, leave=False) as bar:
        if spec.kind == "perplexity":
            result = score_perplexity(loaded.model, loaded.tokenizer, spec, task.data_path, batch_size, limit, bar)
        else:
            records = read_task_records(task.data_path)
            records = [records[i] for i in sample_indices(len(records), limit, seed)]
            scorer = score_multiple_choice if spec.kind == "multiple_choice" else score_generate
            result = scorer(loaded.model, loaded.tokenizer, spec, records, batch_size, bar)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def score_key(model_digest: str, task: SelectedTask, *, limit: int | None, seed: int, dtype: str) -> CacheKey:
    """Cache key of one score: model and task digests plus every setting that changes the score."""
    params = {"limit": limit, "seed": seed, "dtype": dtype, "scorer": SCORER_VERSION}
    return CacheKey("eval-score", {"model": model_digest, "task": task.digest}, params)


def _read_cached(cache: Cache, key: CacheKey) -> dict | None:
    record = cache.lookup(key)
    if record is None:
        return None
    return json.loads(cache.blob_path(record).read_text())


def evaluate_model(reference: str, tasks: Sequence[SelectedTask], *, cache: Cache, use_cache: bool,
                   limit: int | None, seed: int, dtype: str, batch_size: int, progress: bool) -> dict[str, Any]:
    """Score one model reference on every task, loading its weights only when some score is not cached."""
    from llmforge.models import load_model, model_digest, resolve

    resolved = resolve(reference, cache=cache)
    digest = model_digest(reference, cache=cache)
    keys = {task.spec.name: score_key(digest, task, limit=limit, seed=seed, dtype=dtype) for task in tasks}
    results: dict[str, dict] = {}
    if use_cache:
        for task in tasks:
            cached = _read_cached(cache, keys[task.spec.name])
            if cached is not None:
                results[task.spec.name] = {**cached, "cached": True}

    missing = [task for task in tasks if task.spec.name not in results]
    loaded = None
    if missing:
        logger.info("loading %s (%s) for %d task(s)", reference, dtype, len(missing))
        loaded = load_model(reference, dtype=dtype, cache=cache)

    for task in missing:
        options = {"limit": limit, "seed": seed, "batch_size": batch_size, "progress": progress}
        computed = []

        def compute(task=task, options=options, computed=computed) -> dict:
            computed.append(True)
            return score_task(loaded, task, **options)

        if use_cache:
            result = cache.get_or_compute_json(keys[task.spec.name], compute)
        else:
            result = compute()
        results[task.spec.name] = {**result, "cached": not computed}

    entry = {"reference": reference, "digest": digest, "tasks": results, "weights_loaded": loaded is not None}
    if resolved.is_adapter:
        entry.update(base_reference=resolved.base.reference,
                     base_digest=model_digest(resolved.base.reference, cache=cache))
    return entry


def evaluate(models: Sequence[str], *, target: Sequence[str] = (), general: Sequence[str] = (),
             baseline: str | None = None, limit: int | None = None, batch_size: int = 16,
             task_files: Sequence[str | Path] = (), data_dir: str | Path | None = None,
             dtype: str = DEFAULT_DTYPE, seed: int = 0, use_cache: bool = True, progress: bool = False,
             cache: Cache | None = None) -> dict[str, Any]:
    """Evaluate each model (and the baseline) on the target and general tasks; return the report document."""
    if not models:
        raise ForgeError("No model to evaluate: pass --model REF at least once.")
    if limit is not None and limit < 1:
        raise ForgeError(f"Invalid --limit {limit}: use 1 or more.")
    if batch_size < 1:
        raise ForgeError(f"Invalid --batch-size {batch_size}: use 1 or more.")
    if dtype not in ("float32", "bfloat16"):
        raise ForgeError(f"Invalid dtype {dtype!r}: use float32 or bfloat16.")

    registry = task_registry(task_files)
    if not target and not general:
        general = [load_spec_file(path).name for path in task_files]
    if not target and not general:
        raise ForgeError("No task selected: name tasks with --target and/or --general (see --list-tasks).")
    tasks = select_tasks(registry, target, general, data_dir)

    cache = cache or Cache()
    references = list(dict.fromkeys(([baseline] if baseline else []) + list(models)))
    settings = {"limit": limit, "seed": seed, "dtype": dtype, "batch_size": batch_size}
    entries = {}
    for reference in references:
        entries[reference] = evaluate_model(reference, tasks, cache=cache, use_cache=use_cache, progress=progress,
                                            limit=limit, seed=seed, dtype=dtype, batch_size=batch_size)

    return build_report(tasks, entries, list(models), baseline, {**settings, "cache": use_cache})
