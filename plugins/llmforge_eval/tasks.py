"""Evaluation task specs: validated definitions read from YAML/JSON files or dicts, and their data.

A spec names one task of one kind:

- ``multiple_choice``: score each choice's continuation by log-likelihood given the prompt;
- ``generate``: greedy generation, answer extraction, exact or numeric match;
- ``perplexity``: rolling-window perplexity over a text.

Templates such as ``prompt`` use ``{field}`` placeholders that read a record's field; a dotted
name reads a nested field (``{question.stem}``), and ``{{`` / ``}}`` are literal braces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.checkpoint import file_digest
from llmforge.errors import ForgeError

KINDS = ("multiple_choice", "generate", "perplexity")
EXTRACTORS = ("last_number", "first_line", "none")
GENERATE_METRICS = ("exact_match", "numeric_match")
# "squad" is the SQuAD-style answer normalisation: lowercase, drop ASCII punctuation and the articles
# a/an/the, collapse whitespace. It applies to exact_match only.
NORMALIZATIONS = ("none", "squad")
CHOICE_METRICS = ("acc", "acc_norm")
DATA_DIR_ENV = "FORGE_DATA_DIR"
SUITES_FILE = Path(__file__).parent / "suites.yaml"

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_.]*)\}")


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task; `source` names the file or plugin it came from (not part of the digest)."""

    name: str
    kind: str
    data: str
    description: str = ""
    prompt: str = ""
    # multiple_choice: a list of literal choices, or the record field that contains the choice list.
    choices: list[str] | str | None = None
    choice_text: str | None = None
    choice_label: str | None = None
    continuation: str = " {choice}"
    answer: str | None = None
    answer_map: dict[str, int] | None = None
    # generate; a reference that is a single placeholder of a list field gives several accepted answers
    reference: str | None = None
    reference_extract: str = "none"
    extract: str = "none"
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    normalize: str = "none"
    # perplexity
    text_field: str | None = None
    max_length: int = 512
    stride: int = 256
    metric: str | None = None
    source: str = field(default="<dict>", compare=False)

    @property
    def metric_name(self) -> str:
        """The metric that `score` reports for this task."""
        if self.metric:
            return self.metric
        return {"multiple_choice": "acc", "generate": "exact_match", "perplexity": "perplexity"}[self.kind]


_FIELDS = {f.name for f in dataclasses.fields(TaskSpec)} - {"source"}
_REQUIRED = ("name", "kind", "data")


def parse_spec(raw: dict[str, Any], source: str = "<dict>") -> TaskSpec:
    """Validate one raw spec mapping and build a TaskSpec; ForgeError names the field and the source."""
    if not isinstance(raw, dict):
        raise ForgeError(f"Invalid task spec in {source}: expected a mapping, got {type(raw).__name__}.")

    # YAML allows keys of any scalar type, so sort by their text.
    unknown = sorted(set(raw) - _FIELDS, key=str)
    if unknown:
        raise ForgeError(
            f"Unknown field {unknown[0]!r} in task spec {source}; allowed fields: {', '.join(sorted(_FIELDS))}."
        )
    for name in _REQUIRED:
        if not raw.get(name):
            raise ForgeError(f"Missing field {name!r} in task spec {source}.")

    if isinstance(raw.get("answer_map"), dict):
        # YAML reads {0: 0} with integer keys; answers are looked up by their string form.
        raw = {**raw, "answer_map": {str(key): value for key, value in raw["answer_map"].items()}}
    spec = TaskSpec(**raw, source=source)
    _check_types(spec)
    _check_values(spec)
    return spec


_TYPES = {
    "name": str, "kind": str, "data": str, "description": str, "prompt": str, "choices": (list, str, type(None)),
    "choice_text": (str, type(None)), "choice_label": (str, type(None)), "continuation": str,
    "answer": (str, type(None)), "answer_map": (dict, type(None)), "reference": (str, type(None)),
    "reference_extract": str, "extract": str, "stop": list, "max_new_tokens": int, "normalize": str,
    "text_field": (str, type(None)),
    "max_length": int, "stride": int, "metric": (str, type(None)),
}


def _check_types(spec: TaskSpec) -> None:
    for name, expected in _TYPES.items():
        value = getattr(spec, name)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ForgeError(f"Invalid value {value!r} for field {name!r} in task spec {spec.source}.")
    for name in ("stop", "choices"):
        value = getattr(spec, name)
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ForgeError(f"Invalid field {name!r} in task spec {spec.source}: expected a list of strings.")
    if spec.answer_map is not None and not all(isinstance(v, int) for v in spec.answer_map.values()):
        raise ForgeError(f"Invalid field 'answer_map' in task spec {spec.source}: values must be choice indices.")


def _check_values(spec: TaskSpec) -> None:
    where = f"task {spec.name!r} ({spec.source})"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", spec.name):
        raise ForgeError(f"Invalid task name {spec.name!r} in {spec.source}: use letters, digits, '_', '.', '-'.")
    if spec.kind not in KINDS:
        raise ForgeError(f"Invalid kind {spec.kind!r} in {where}; expected one of {', '.join(KINDS)}.")

    if spec.kind == "multiple_choice":
        _require_fields(spec, ("prompt", "choices", "answer"), where)
        if spec.metric not in (None, *CHOICE_METRICS):
            raise ForgeError(f"Invalid metric {spec.metric!r} in {where}; expected one of {', '.join(CHOICE_METRICS)}.")
    elif spec.kind == "generate":
        _require_fields(spec, ("prompt", "reference"), where)
        if spec.metric not in (None, *GENERATE_METRICS):
            raise ForgeError(f"Invalid metric {spec.metric!r} in {where}; expected one of {', '.join(GENERATE_METRICS)}.")
        for name in ("extract", "reference_extract"):
            check_extractor(getattr(spec, name), f"{name} of {where}")
        if spec.max_new_tokens < 1:
            raise ForgeError(f"Invalid max_new_tokens {spec.max_new_tokens} in {where}; use 1 or more.")
        if spec.normalize not in NORMALIZATIONS:
            raise ForgeError(f"Invalid normalize {spec.normalize!r} in {where}; expected one of {', '.join(NORMALIZATIONS)}.")
        if spec.normalize != "none" and spec.metric_name != "exact_match":
            raise ForgeError(f"Invalid normalize {spec.normalize!r} in {where}: it applies to exact_match only.")
    else:
        if spec.metric not in (None, "perplexity"):
            raise ForgeError(f"Invalid metric {spec.metric!r} in {where}; perplexity tasks report 'perplexity'.")
        if not 0 < spec.stride <= spec.max_length:
            raise ForgeError(f"Invalid stride {spec.stride} in {where}: use 1 to max_length ({spec.max_length}).")


def _require_fields(spec: TaskSpec, names: tuple[str, ...], where: str) -> None:
    for name in names:
        if getattr(spec, name) in (None, ""):
            needed = ", ".join(repr(item) for item in names)
            raise ForgeError(f"Missing field {name!r} in {where}: {spec.kind} tasks need {needed}.")


def check_extractor(name: str, where: str) -> None:
    """Raise ForgeError unless `name` is a known answer extractor or a compilable `regex:` pattern."""
    if name.startswith("regex:"):
        try:
            re.compile(name[len("regex:"):])
        except re.error as error:
            raise ForgeError(f"Invalid regular expression in {where}: {error}.") from error
        return
    if name not in EXTRACTORS:
        raise ForgeError(f"Invalid extractor {name!r} in {where}; expected one of {', '.join(EXTRACTORS)} or 'regex:PATTERN'.")


def load_spec_file(path: str | Path) -> TaskSpec:
    """Read a YAML or JSON spec file (one mapping) and validate it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"Task file not found: {path}. Check the path given to --task-file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ForgeError(f"Invalid task file {path}: byte {error.start} is not UTF-8; save the file as UTF-8.") from None
    try:
        raw = _parse_spec_text(text)
    except yaml.YAMLError as error:
        raise ForgeError(f"Invalid YAML/JSON in task file {path}: {error}") from error
    except RecursionError:
        raise ForgeError(f"Invalid YAML/JSON in task file {path}: lists or mappings nested too deeply.") from None
    except ValueError as error:  # an integer of more than 4300 digits, or a YAML date such as 2020-13-45
        raise ForgeError(f"Invalid YAML/JSON in task file {path}: {error}") from None
    return parse_spec(raw, source=str(path))


def _parse_spec_text(text: str) -> Any:
    """Parse JSON text with the json module and any other text as YAML.

    PyYAML reads the escapes that json.dumps writes for a character outside the Basic Multilingual
    Plane ("\\ud83d\\ude00") as two lone surrogates, so JSON is not left to it.
    """
    import yaml

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def coerce_spec(item: dict | str | Path, source: str) -> TaskSpec:
    """Build a TaskSpec from what a `forge_eval_tasks` hook returns: a spec dict or a spec file path."""
    if isinstance(item, TaskSpec):
        return item
    if isinstance(item, (str, Path)):
        if not Path(item).is_file():
            raise ForgeError(f"task file not found: {item}, returned by the forge_eval_tasks hook of {source}; "
                             "fix or reinstall that plugin")
        return load_spec_file(item)
    if not isinstance(item, Mapping):
        raise ForgeError(f"the forge_eval_tasks hook of {source} returned {item!r}, which is not a spec dict, "
                         "a spec file path or a TaskSpec; fix that plugin")
    return parse_spec(dict(item), source=source)


def resolve_data_path(spec: TaskSpec, data_dir: str | Path | None = None) -> Path:
    """Locate the spec's data file: `demo:NAME`, `{data_dir}/...`, or a path relative to the spec file.

    A relative data directory (--data-dir or $FORGE_DATA_DIR) is relative to the current directory.
    Only a relative `data` path without {data_dir} is relative to the folder of the spec file.
    """
    where = f"task {spec.name!r} ({spec.source})"
    data = spec.data

    if data.startswith("demo:"):
        from llmforge.data import resolve_data_path as resolve_demo

        return Path(resolve_demo(data))

    if "{data_dir}" in data:
        data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
        if not data_dir:
            raise ForgeError(f"Task {spec.name!r} reads {data}: pass --data-dir DIR or set ${DATA_DIR_ENV}.")
        data_dir = Path(data_dir).expanduser().absolute()
        if not data_dir.is_dir():
            raise ForgeError(f"Data directory not found: {data_dir} (needed by {where}).")
        data = data.replace("{data_dir}", str(data_dir))

    path = Path(data).expanduser()
    if not path.is_absolute() and spec.source not in ("<dict>", "") and Path(spec.source).is_file():
        path = (Path(spec.source).parent / path).resolve()
    if not path.is_file():
        raise ForgeError(f"Data file not found: {path} (needed by {where}).")
    return path


def task_digest(spec: TaskSpec, data_path: Path) -> str:
    """Return the digest of the normalised spec plus the data file's content.

    The data location and the description are left out, so the same spec over the same bytes gets
    the same digest wherever the data directory is.
    """
    normalised = dataclasses.asdict(spec)
    for name in ("source", "data", "description"):
        normalised.pop(name)
    # Leaving out the default keeps the digests, and so the cached scores, of specs written before the field.
    if normalised["normalize"] == "none":
        normalised.pop("normalize")
    normalised["data_digest"] = file_digest(data_path)

    text = json.dumps(normalised, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def render(template: str, record: dict, where: str) -> str:
    """Fill `{field}` placeholders in `template` from `record`."""

    def substitute(match: re.Match) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        return str(field_value(record, match.group(1), where))

    return _PLACEHOLDER.sub(substitute, template)


def render_references(template: str, record: dict, where: str) -> list[str]:
    """Fill a reference template; a template that is one placeholder of a list field gives one item per answer."""
    match = _PLACEHOLDER.fullmatch(template.strip())
    if match is None or match.group(1) is None:
        return [render(template, record, where)]

    value = field_value(record, match.group(1), where)
    if not isinstance(value, list):
        return [render(template, record, where)]
    if not value or not all(isinstance(item, (str, int, float)) for item in value):
        raise ForgeError(f"Invalid reference list {value!r} in a record of {where}: "
                         "expected a non-empty list of strings or numbers.")
    return [str(item) for item in value]


def field_value(record: dict, dotted: str, where: str) -> Any:
    """Read a (dotted) field from a record; ForgeError when it is missing."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ForgeError(f"Missing field {dotted!r} in a record of {where}; fields are {sorted(record)}.")
        value = value[part]
    return value


def read_task_records(path: Path) -> list[dict]:
    """Read JSONL, JSON-array or TSV/CSV records (through llmforge.data.read_records)."""
    from llmforge.data import read_records

    return list(read_records(path))


def sample_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """Return the indices of the examples to score: all of them, or `limit` drawn with `seed`, in file order."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def load_suites(path: Path = SUITES_FILE) -> dict[str, dict[str, Any]]:
    """Read the named task suites: {name: {"description": str, "tasks": [task names]}}."""
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    suites = {}
    for name, entry in raw.items():
        tasks = entry.get("tasks") if isinstance(entry, dict) else None
        if not isinstance(tasks, list) or not tasks or not all(isinstance(task, str) for task in tasks):
            raise ForgeError(f"Invalid suite {name!r} in {path}: 'tasks' must be a non-empty list of task names.")
        suites[str(name)] = {"description": str(entry.get("description", "")), "tasks": list(tasks)}
    return suites


def expand_selection(items: list[str] | tuple[str, ...], registry: dict[str, TaskSpec],
                     suites: dict[str, dict[str, Any]]) -> list[str]:
    """Replace each suite name in `items` by its tasks and check that every task exists.

    Raises ForgeError for a name that is neither a task nor a suite, a name that is both, and a suite
    that lists an unknown task.
    """
    names = []
    for item in items:
        if item in registry and item in suites:
            raise ForgeError(f"{item!r} names both a task ({registry[item].source}) and a suite; "
                             "rename the task in its spec file.")
        if item in registry:
            names.append(item)
        elif item in suites:
            for task in suites[item]["tasks"]:
                if task not in registry:
                    raise ForgeError(f"Suite {item!r} lists the unknown task {task!r}; available tasks: "
                                     f"{', '.join(sorted(registry))}.")
                names.append(task)
        else:
            raise ForgeError(f"Unknown task or suite {item!r}; tasks: {', '.join(sorted(registry))}; suites: "
                             f"{', '.join(sorted(suites))}. See `forge eval --list-tasks`, or add a task with --task-file.")
    return names
