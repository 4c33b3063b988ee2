"""Activation-space drift between a fine-tuned model and its base, per linear module of the decoder layers.

Both models run on the same prompts. Forward hooks record the token-level outputs X of every
selected linear module (X0 for the base, X1 for the tuned model) and, in the base, the module
inputs h. Per module:

- Procrustes residual: with both X centred per feature, min over orthogonal R of
  ||X1 R - X0||_F / ||X0||_F, where R = U V^T from the SVD X1^T X0 = U S V^T. The raw residual
  is the same ratio with R = I (also on centred X).
- Gram distortion: with Z the rows of X scaled to unit norm (not centred),
  ||Z1 Z1^T - Z0 Z0^T||_F / ||Z0 Z0^T||_F.
- Linear CKA: ||X0^T X1||_F^2 / (||X0^T X0||_F ||X1^T X1||_F) on centred X.
- Capability-conditioned drift, with W0 the base weight and dW the update:
  CSD_rel = E||dW h||^2 / (E||W0 h||^2 + eps) and CSD_norm = E||dW h||^2 / (||dW||_F^2 E||h||^2).

Activations are captured in float32 and cached as float32 safetensors (see `capture_key`), and
the metrics are computed in float64.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from llmforge.cache import CacheKey
from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

SCHEMA = "llmforge.eval.drift/1"
# The token cap bounds memory and cache size: a capture stores T x (sum of module widths) float32
# values. For smollm2-135m's 210 linear modules at 2048 tokens that is about 1.3 GB of outputs plus
# 1.2 GB of base inputs (computed from the module widths). Once T exceeds a module's width, the
# Procrustes SVD of that module no longer grows with T.
DEFAULT_MAX_TOKENS = 2048
# Added to E||W0 h||^2 in CSD_rel, so a module whose base output is zero on the data gives a finite value.
DEFAULT_EPS = 1e-8
DEFAULT_BATCH_SIZE = 8
# Bump when the capture or the metrics change, so that older cache entries are not reused.
CAPTURE_VERSION = 1
METRICS_VERSION = 1
METRIC_NAMES = ("procrustes", "procrustes_raw", "gram_distortion", "cka", "csd_rel", "csd_norm")


# Metrics


def _centre(x: "torch.Tensor") -> "torch.Tensor":
    return x - x.mean(dim=0, keepdim=True)


def procrustes_residuals(x0: "torch.Tensor", x1: "torch.Tensor") -> tuple[float, float]:
    """Return (Procrustes residual, raw residual) of X1 against X0 (tokens x features, same shape).

    With fewer tokens T than features, both centred X are first replaced by the T x T factors B of
    the QR decompositions X^T = Q B. That keeps the norms and the singular values of X1^T X0, so the
    minimum over R is the same, and the SVD shrinks to T x T.

    NOTE: the SVD that gives R runs in float32 because it dominates the cost (1-2 s for a
    1536 x 1536 matrix on one CPU core, twice that in float64). The residual itself is then
    computed in float64 with that R, so an R that is off by float32 rounding moves it by about 1e-6.
    """
    import torch

    x0 = _centre(x0.double())
    x1 = _centre(x1.double())
    scale = torch.linalg.matrix_norm(x0)
    if scale == 0:
        raise ForgeError("the base activations are constant over the tokens, so the Procrustes residual is undefined")
    raw = torch.linalg.matrix_norm(x1 - x0) / scale

    if x0.shape[0] < x0.shape[1]:
        x0 = torch.linalg.qr(x0.T).R.T
        x1 = torch.linalg.qr(x1.T).R.T
    u, _, vh = torch.linalg.svd((x1.T @ x0).float(), full_matrices=False)
    rotation = (u @ vh).double()
    residual = torch.linalg.matrix_norm(x1 @ rotation - x0) / scale
    return float(residual), float(raw)


def _unit_rows(x: "torch.Tensor") -> "torch.Tensor":
    norms = x.norm(dim=1, keepdim=True)
    return x / norms.clamp_min(1e-300)  # all-zero rows stay zero


def _product_norms(a: "torch.Tensor", b: "torch.Tensor") -> tuple[float, float, float]:
    """Return ||A^T A||_F^2, ||B^T B||_F^2 and ||A^T B||_F^2 for A, B of shape (tokens, features).

    With fewer tokens than features the token x token kernels K = X X^T give the same values
    (||A^T A||_F = ||K_A||_F and ||A^T B||_F^2 = <K_A, K_B>) at a lower cost.
    """
    if a.shape[0] < a.shape[1]:
        kernel_a, kernel_b = a @ a.T, b @ b.T
        return float(kernel_a.pow(2).sum()), float(kernel_b.pow(2).sum()), float((kernel_a * kernel_b).sum())
    return float((a.T @ a).pow(2).sum()), float((b.T @ b).pow(2).sum()), float((a.T @ b).pow(2).sum())


def gram_distortion(x0: "torch.Tensor", x1: "torch.Tensor") -> float:
    """Return ||Z1 Z1^T - Z0 Z0^T||_F / ||Z0 Z0^T||_F with Z the rows of X scaled to unit norm.

    ||A A^T - B B^T||_F^2 equals ||A^T A||_F^2 + ||B^T B||_F^2 - 2 ||A^T B||_F^2, computed in
    float64, so the smaller of the token and feature spaces is enough.
    """
    gram0, gram1, cross = _product_norms(_unit_rows(x0.double()), _unit_rows(x1.double()))
    if gram0 == 0:
        raise ForgeError("the base activations are all zero, so the Gram distortion is undefined")
    return math.sqrt(max(gram0 + gram1 - 2 * cross, 0.0) / gram0)


def linear_cka(x0: "torch.Tensor", x1: "torch.Tensor") -> float:
    """Return linear CKA ||X0^T X1||_F^2 / (||X0^T X0||_F ||X1^T X1||_F) of centred X (0 when either X is constant)."""
    self0, self1, cross = _product_norms(_centre(x0.double()), _centre(x1.double()))
    denominator = math.sqrt(self0) * math.sqrt(self1)
    return cross / denominator if denominator > 0 else 0.0


def capability_drift(h: "torch.Tensor", base_weight: "torch.Tensor", delta: "torch.Tensor", *,
                     eps: float = DEFAULT_EPS) -> tuple[float, float]:
    """Return (CSD_rel, CSD_norm) for module inputs h (tokens x in), base weight W0 and update dW (out x in).

    Expectations are means over the tokens. CSD_norm is 0 when dW = 0 or h = 0, because then
    both its numerator and its denominator are 0.
    """
    import torch

    h = h.double()
    update_energy = float((h @ delta.double().T).pow(2).sum(dim=1).mean())
    base_energy = float((h @ base_weight.double().T).pow(2).sum(dim=1).mean())
    input_energy = float(h.pow(2).sum(dim=1).mean())
    update_norm = float(torch.linalg.matrix_norm(delta.double()) ** 2)

    relative = update_energy / (base_energy + eps)
    normaliser = update_norm * input_energy
    normalised = update_energy / normaliser if normaliser > 0 else 0.0
    return relative, normalised


def module_metrics(x0, x1, h=None, base_weight=None, delta=None, *, eps: float = DEFAULT_EPS) -> dict[str, float | None]:
    """Return every metric of one module; the CSD values are None when h or W0 is not given."""
    if tuple(x0.shape) != tuple(x1.shape):
        raise ForgeError(f"activation shapes differ: {tuple(x0.shape)} in the base, {tuple(x1.shape)} in the tuned model")

    residual, raw = procrustes_residuals(x0, x1)
    metrics: dict[str, float | None] = {
        "procrustes": residual,
        "procrustes_raw": raw,
        "gram_distortion": gram_distortion(x0, x1),
        "cka": linear_cka(x0, x1),
        "csd_rel": None,
        "csd_norm": None,
    }
    if h is not None and base_weight is not None:
        import torch

        delta = torch.zeros_like(base_weight) if delta is None else delta
        metrics["csd_rel"], metrics["csd_norm"] = capability_drift(h, base_weight, delta, eps=eps)
    return metrics


def summarise(rows: Sequence[dict[str, Any]], group: str) -> list[dict[str, Any]]:
    """Return the mean of each metric over the rows that share `group` ("layer" or "module_type")."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[group], []).append(row)

    summary = []
    for value in sorted(groups, key=lambda item: (item is None, str(item) if group != "layer" else item)):
        members = groups[value]
        entry = {group: value, "modules": len(members)}
        for name in METRIC_NAMES:
            values = [row[name] for row in members if row[name] is not None]
            entry[name] = sum(values) / len(values) if values else None
        summary.append(entry)
    return summary


# Prompts and tokens


@dataclass(frozen=True)
class Prompts:
    """The prompt texts of a run with a description of their source and a digest of it."""

    texts: list[str]
    source: str
    kind: str  # "task" or "file"
    digest: str


def read_prompts(data: str, *, limit: int | None, seed: int, data_dir: str | None = None,
                 task_files: Sequence[str] = ()) -> Prompts:
    """Read the prompts of an eval task (by name) or of a data file; `limit` draws that many with `seed`.

    A task gives its rendered prompts (multiple_choice, generate) or its text split on blank
    lines (perplexity). A file gives the "text" field of each record, else its "prompt" field.
    """
    from llmforge_eval.evaluate import task_registry
    from llmforge_eval.tasks import sample_indices

    if limit is not None and limit < 1:
        raise ForgeError(f"Invalid --limit {limit}: use 1 or more.")
    registry = task_registry(task_files)
    if data in registry:
        texts, digest = _task_texts(registry[data], data_dir)
        kind = "task"
    else:
        texts, digest = _file_texts(data, registry)
        kind = "file"

    texts = [texts[i] for i in sample_indices(len(texts), limit, seed)]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ForgeError(f"No prompt text in {data} after --limit {limit}; pass data with non-empty prompts.")
    return Prompts(texts, data, kind, digest)


def _task_texts(spec, data_dir: str | None) -> tuple[list[str], str]:
    from llmforge_eval.perplexity import read_text
    from llmforge_eval.tasks import read_task_records, render, resolve_data_path, task_digest

    path = resolve_data_path(spec, data_dir)
    digest = task_digest(spec, path)
    if spec.kind == "perplexity":
        return [part.strip() for part in read_text(spec, path).split("\n\n") if part.strip()], digest
    where = f"task {spec.name!r} ({spec.source})"
    return [render(spec.prompt, record, where) for record in read_task_records(path)], digest


def _file_texts(data: str, registry: dict) -> tuple[list[str], str]:
    from pathlib import Path

    from llmforge.checkpoint import file_digest
    from llmforge.data import read_records

    if not data.startswith("demo:") and not Path(data).expanduser().is_file():
        raise ForgeError(f"--data {data!r} is neither a task name nor an existing file; pass a file, demo:NAME, "
                         f"or one of the tasks: {', '.join(sorted(registry))}.")
    from llmforge.data import resolve_data_path

    path = resolve_data_path(data)
    texts = []
    for number, record in enumerate(read_records(path), start=1):
        if "text" in record:
            field = "text"
        elif "prompt" in record:
            field = "prompt"
        else:
            raise ForgeError(f"{path}: record {number} has no 'text' or 'prompt' field (fields: {sorted(record)}).")
        texts.append(str(record[field]))
    return texts, file_digest(path)


def tokenize_prompts(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Tokenize each text and keep whole prompts until `max_tokens`; the last prompt kept is cut to fit.

    Cutting the end of a prompt leaves the activations of its earlier tokens unchanged, because
    the models are causal.
    """
    if max_tokens < 2:
        raise ForgeError(f"Invalid --max-tokens {max_tokens}: use 2 or more.")
    sequences, total = [], 0
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])[: max_tokens - total]
        if ids:
            sequences.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    if total < 2:
        raise ForgeError("The prompts give fewer than 2 tokens; drift needs more data.")
    return sequences


def tokens_digest(sequences: Sequence[Sequence[int]]) -> str:
    """Return "sha256:<hex>" over the token ids of every sequence, in order."""
    text = json.dumps([list(ids) for ids in sequences], separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# Capture


def decoder_layers(model) -> tuple[str, Any]:
    """Return (name, module) of the ModuleList of decoder layers (its length is config.num_hidden_layers)."""
    import torch

    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise ForgeError(f"Cannot find the decoder layers of {type(model).__name__}: no module list of "
                     f"config.num_hidden_layers ({count}) layers.")


def linear_modules(model, module_types: Sequence[str] | None = None) -> dict[str, tuple[int, str]]:
    """Map the name of every torch.nn.Linear inside a decoder layer to (layer index, module type).

    `module_types` keeps only modules whose own name is listed (e.g. q_proj); ForgeError names
    an unknown type.
    """
    import torch

    stack_name, stack = decoder_layers(model)
    found: dict[str, tuple[int, str]] = {}
    for index, layer in enumerate(stack):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                found[f"{stack_name}.{index}.{name}"] = (index, name.rsplit(".", 1)[-1])

    available = sorted({module_type for _, module_type in found.values()})
    unknown = sorted(set(module_types or ()) - set(available))
    if unknown:
        raise ForgeError(f"Unknown module {unknown[0]!r} in --modules; the decoder layers have: {', '.join(available)}.")
    if module_types:
        found = {name: entry for name, entry in found.items() if entry[1] in module_types}
    return found


def _unwrapped(model):
    """Return the transformers model inside a peft model, with the adapter layers in place."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def capture_activations(model, sequences: Sequence[Sequence[int]], names: Sequence[str], *, pad_token_id: int,
                        with_inputs: bool, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, "torch.Tensor"]:
    """Run the prompts and return "output.NAME" (and "input.NAME") float32 tensors of shape (tokens, features).

    Sequences are right-padded into batches and only the rows of real tokens are kept. Positions
    count from the start of each row, so padding after a prompt changes none of its activations.
    """
    import torch

    root = _unwrapped(model)
    modules = dict(root.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ForgeError(f"{type(root).__name__} has no module {missing[0]}, which the baseline has; "
                         "pass a model of the baseline's architecture.")

    parts: dict[str, list] = {f"{kind}.{name}": [] for name in names for kind in ("output", "input")[: 1 + with_inputs]}
    state: dict[str, Any] = {}

    def hook_for(name: str) -> Callable:
        def hook(module, args, output):
            mask = state["mask"]
            parts[f"output.{name}"].append(output[mask].float().cpu())
            if with_inputs:
                parts[f"input.{name}"].append(args[0][mask].float().cpu())
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start:start + batch_size]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.bool)
                for row, ids in enumerate(batch):
                    input_ids[row, :len(ids)] = torch.tensor(ids)
                    mask[row, :len(ids)] = True
                state["mask"] = mask.to(device)
                model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(chunks).contiguous() for key, chunks in parts.items()}


def capture_key(model_digest: str, tokens: str, module_types: Sequence[str] | None, *, dtype: str,
                with_inputs: bool) -> CacheKey:
    """Cache key of one capture: model and token digests plus the settings that change the tensors.

    The entry contains float32 tensors whatever `dtype` the model ran in: float32 keeps the small
    differences between a base and a tuned model well above rounding, at twice bfloat16's size.
    """
    params = {"modules": sorted(module_types) if module_types else "all", "dtype": dtype,
              "inputs": with_inputs, "version": CAPTURE_VERSION}
    return CacheKey("eval-drift-activations", {"model": model_digest, "tokens": tokens}, params)


# One run: the baseline against each tuned model


@dataclass
class DriftSettings:
    """Settings of one drift run; all but `batch_size` are part of the cache keys."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    module_types: tuple[str, ...] | None = None
    dtype: str = "float32"
    eps: float = DEFAULT_EPS
    batch_size: int = DEFAULT_BATCH_SIZE

    def check(self) -> None:
        """Raise ForgeError on a value that no run accepts."""
        if self.max_tokens < 2:
            raise ForgeError(f"Invalid --max-tokens {self.max_tokens}: use 2 or more.")
        if self.batch_size < 1:
            raise ForgeError(f"Invalid --batch-size {self.batch_size}: use 1 or more.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ForgeError(f"Invalid dtype {self.dtype!r}: use float32 or bfloat16.")
        if not self.eps >= 0:
            raise ForgeError(f"Invalid --eps {self.eps}: use 0 or a positive number.")


class DriftRun:
    """The captures of one run: the baseline's, computed or read once, then each tuned model's."""

    def __init__(self, baseline: str, sequences: list[list[int]], settings: DriftSettings, cache, progress: bool):
        from llmforge.models import model_digest

        self.baseline = baseline
        self.baseline_digest = model_digest(baseline, cache=cache)
        self.sequences = sequences
        self.tokens = tokens_digest(sequences)
        self.settings = settings
        self.cache = cache
        self.progress = progress
        self.base_capture: dict[str, "torch.Tensor"] | None = None
        self.base_cached = True

    def capture(self, reference: str, digest: str, *, with_inputs: bool) -> tuple[dict[str, "torch.Tensor"], bool]:
        """Return the cached capture of a model (computing it once) and whether it came from the cache."""
        import logging

        from llmforge.models import load_model

        settings = self.settings
        key = capture_key(digest, self.tokens, settings.module_types, dtype=settings.dtype, with_inputs=with_inputs)
        computed = []

        def compute() -> dict[str, "torch.Tensor"]:
            computed.append(True)
            logging.getLogger(__name__).info("capturing activations of %s (%s)", reference, settings.dtype)
            loaded = load_model(reference, dtype=settings.dtype, cache=self.cache)
            if with_inputs:
                names = sorted(linear_modules(_unwrapped(loaded.model), settings.module_types))
            else:
                names = self.module_names()
            return capture_activations(loaded.model, self.sequences, names, with_inputs=with_inputs,
                                       pad_token_id=loaded.tokenizer.pad_token_id, batch_size=settings.batch_size)

        tensors = self.cache.get_or_compute(key, compute, metadata={"model": reference, "tokens": self.tokens})
        return tensors, not computed

    def base(self) -> dict[str, "torch.Tensor"]:
        """Return the baseline's outputs and inputs, captured at most once per run."""
        if self.base_capture is None:
            self.base_capture, self.base_cached = self.capture(self.baseline, self.baseline_digest, with_inputs=True)
        return self.base_capture

    def module_names(self) -> list[str]:
        """Return the captured module names, in layer order."""
        from llmforge_eval.weights import layer_index

        names = [key.removeprefix("output.") for key in self.base() if key.startswith("output.")]
        return sorted(names, key=lambda name: (layer_index(name) or 0, name))

    def compare(self, reference: str, digest: str) -> tuple[list[dict[str, Any]], dict[str, bool]]:
        """Return the metric rows of one tuned model against the baseline, and which parts came from the cache."""
        from tqdm import tqdm

        from llmforge_eval.weights import layer_index, module_type, weight_updates

        base = self.base()
        tuned, tuned_cached = self.capture(reference, digest, with_inputs=False)
        names = set(self.module_names())
        rows: dict[str, dict[str, Any]] = {}

        def add_row(name: str, base_weight=None, delta=None) -> None:
            metrics = module_metrics(base[f"output.{name}"], tuned[f"output.{name}"], base[f"input.{name}"],
                                     base_weight, delta, eps=self.settings.eps)
            rows[name] = {"name": name, "layer": layer_index(name), "module_type": module_type(f"{name}.weight"),
                          "updated": delta is not None, **metrics}
            bar.update()

        with tqdm(total=len(names), desc=f"drift {reference}", unit="module", disable=not self.progress,
                  leave=False) as bar:
            for update in weight_updates(reference, self.baseline, cache=self.cache):
                name = update.name.removesuffix(".weight")
                if name in names:
                    add_row(name, update.base, update.delta)
            for name in sorted(names - set(rows)):
                # The fine-tune left this weight unchanged (dW = 0), so both CSD values are 0.
                add_row(name)
                rows[name]["csd_rel"] = rows[name]["csd_norm"] = 0.0

        ordered = [rows[name] for name in self.module_names()]
        return ordered, {"activations": tuned_cached, "base_activations": self.base_cached}
