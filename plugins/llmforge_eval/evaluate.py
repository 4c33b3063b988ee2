"""Evaluate models on tasks: the task registry, cached per-task scores, and the report document.

`evaluate` is the plain-Python entry point behind `forge eval`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llmforge.cache import Cache, CacheKey
from llmforge.errors import ForgeError
from llmforge_eval.loading import BaseHost, ModelInfo, check_adapter_bases, describe_model
from llmforge_eval.report import build_report
from llmforge_eval.tasks import (
    TaskSpec,
    coerce_spec,
    expand_selection,
    field_value,
    load_spec_file,
    load_suites,
    read_task_records,
    render,
    render_references,
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
SCORER_VERSION = 3


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
    """Look up the named tasks, resolve their data files and compute their digests (before any model loads).

    Each item of `target` and `general` is a task name or a suite name (see `llmforge_eval.tasks.load_suites`).
    """
    suites = load_suites()
    selected, seen = [], set()
    for role, items in (("target", target), ("general", general)):
        for name in expand_selection(items, registry, suites):
            if name in seen:
                raise ForgeError(f"Task {name!r} is named more than once in --target/--general (directly or in a suite).")
            seen.add(name)
            spec = registry[name]
            path = resolve_data_path(spec, data_dir)
            selected.append(SelectedTask(spec, role, path, task_digest(spec, path)))
    return selected


def check_task_data(task: SelectedTask, *, limit: int | None, seed: int) -> None:
    """Check, before any model loads, that a task has examples after --limit and that its records contain
    every field its templates read. ForgeError names the task, the data file and the field."""
    from llmforge_eval.multiple_choice import build_examples

    spec = task.spec
    if spec.kind == "perplexity" and not spec.text_field:
        if not task.data_path.read_text(encoding="utf-8-sig").strip():
            raise ForgeError(f"Task {spec.name!r} has no text to score: {task.data_path} is empty.")
        return

    records = read_task_records(task.data_path)
    records = [records[i] for i in sample_indices(len(records), limit, seed)]
    if not records:
        after_limit = f" after --limit {limit}" if limit is not None else ""
        raise ForgeError(f"Task {spec.name!r} has no examples{after_limit}: {task.data_path} contains no records.")

    try:
        if spec.kind == "multiple_choice":
            build_examples(spec, records)
        elif spec.kind == "generate":
            for index, record in enumerate(records):
                where = f"task {spec.name!r}, record {index + 1}"
                render(spec.prompt, record, where)
                render_references(spec.reference, record, where)
        else:
            for index, record in enumerate(records):
                field_value(record, spec.text_field, f"task {spec.name!r}, record {index + 1}")
    except ForgeError as error:
        raise ForgeError(f"{error} Data file: {task.data_path}.") from None


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


def _new_entry(info: ModelInfo) -> dict[str, Any]:
    entry = {"reference": info.reference, "digest": info.digest, "tasks": {}, "weights_loaded": False}
    if info.is_adapter:
        entry.update(base_reference=info.base_reference, base_digest=info.base_digest)
    return entry


def _score_missing(loaded, entry: dict, tasks: Sequence[SelectedTask], keys: dict[str, CacheKey], *,
                   cache: Cache, use_cache: bool, options: dict[str, Any]) -> None:
    """Score `loaded` on each task in turn, storing every score in the cache as soon as it is computed.

    A run that is interrupted therefore resumes after the last finished task.
    """
    for task in tasks:
        computed = []

        def compute(task=task, computed=computed) -> dict:
            computed.append(True)
            return score_task(loaded, task, **options)

        result = cache.get_or_compute_json(keys[task.spec.name], compute) if use_cache else compute()
        entry["tasks"][task.spec.name] = {**result, "cached": not computed}
        logger.info("scored %s on %s: %s %.4f (n=%d, %.1f s)", task.spec.name, entry["reference"], result["metric"],
                    result["score"], result["n"], result.get("seconds", 0.0))


def score_models(infos: Sequence[ModelInfo], tasks: Sequence[SelectedTask], *, cache: Cache, use_cache: bool,
                 limit: int | None, seed: int, dtype: str, batch_size: int,
                 progress: bool) -> tuple[dict[str, dict], list[dict]]:
    """Score every model on every task and return (entries by reference, base-model loads).

    Cached scores are read first. Models with scores left to compute are grouped by the weights
    they need: a base model is loaded once for itself and all of its adapters, and a group whose
    scores are all cached loads nothing.
    """
    entries, keys, missing = {}, {}, {}
    for info in infos:
        entries[info.reference] = _new_entry(info)
        keys[info.reference] = {task.spec.name: score_key(info.digest, task, limit=limit, seed=seed, dtype=dtype)
                                for task in tasks}
        for task in tasks:
            cached = cache.lookup_json(keys[info.reference][task.spec.name]) if use_cache else None
            if cached is not None:
                entries[info.reference]["tasks"][task.spec.name] = {**cached, "cached": True}
        missing[info.reference] = [task for task in tasks if task.spec.name not in entries[info.reference]["tasks"]]

    groups: dict[str, list[ModelInfo]] = {}
    for info in infos:
        if missing[info.reference]:
            groups.setdefault(info.host_digest, []).append(info)

    loads = []
    options = {"limit": limit, "seed": seed, "batch_size": batch_size, "progress": progress}
    for host_digest, members in groups.items():
        host = BaseHost(members[0].host_reference, dtype=dtype, cache=cache)
        # Plain models first: they need no adapter, so the adapters are attached only afterwards.
        for info in sorted(members, key=lambda member: member.is_adapter):
            loaded = host.with_adapter(info) if info.is_adapter else host.plain()
            entry = entries[info.reference]
            entry["weights_loaded"] = True
            _score_missing(loaded, entry, missing[info.reference], keys[info.reference], cache=cache,
                           use_cache=use_cache, options=options)
        loads.append({"reference": members[0].host_reference, "digest": host_digest, "loads": host.loads,
                      "models": [member.reference for member in members]})
        logger.info("loaded %s %d time(s) for %d model(s)", members[0].host_reference, host.loads, len(members))
        del host

    for entry in entries.values():
        entry["tasks"] = {task.spec.name: entry["tasks"][task.spec.name] for task in tasks}
    return entries, loads


def evaluate(models: Sequence[str], *, target: Sequence[str] = (), general: Sequence[str] = (),
             baseline: str | None = None, limit: int | None = None, batch_size: int = 16,
             task_files: Sequence[str | Path] = (), data_dir: str | Path | None = None,
             dtype: str = DEFAULT_DTYPE, seed: int = 0, use_cache: bool = True, progress: bool = False,
             cache: Cache | None = None) -> dict[str, Any]:
    """Evaluate each model (and the baseline) on the target and general tasks; return the report document.

    `target` and `general` list task or suite names. Every input is checked before any model loads.
    """
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
    for task in tasks:
        check_task_data(task, limit=limit, seed=seed)

    cache = cache or Cache()
    references = list(dict.fromkeys(([baseline] if baseline else []) + list(models)))
    infos = [describe_model(reference, cache) for reference in references]
    check_adapter_bases(infos, infos[0] if baseline else None)

    entries, loads = score_models(infos, tasks, cache=cache, use_cache=use_cache, limit=limit, seed=seed,
                                  dtype=dtype, batch_size=batch_size, progress=progress)
    settings = {"limit": limit, "seed": seed, "dtype": dtype, "batch_size": batch_size, "cache": use_cache,
                "selection": {"target": list(target), "general": list(general)}}
    report = build_report(tasks, entries, list(models), baseline, settings)
    report["loads"] = loads
    return report
