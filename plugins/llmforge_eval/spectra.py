"""Weight-space diagnostics of a fine-tune: how each updated linear weight moved against the base's spectrum.

For a base weight W0 = U S V^T (fp32 SVD, `full_matrices=False`) and its update dW = W_ft - W0:

- retention profile P(i) = u_i^T W_ft v_i and retention drift dP(i) = |P(i) - s_i|;
- update energy E(i) = ||dW v_i||_2, how much the update acts along the base's i-th input direction;
- effective rank ||dW||_F^2 / ||dW||_2^2 (1 for a rank-1 update, at most rank(dW));
- spectral smoothness mean_i |x_i - MA(x)_i| of x = dP and x = E, with MA a centred moving average
  (5 wide, reflect padding by default); lower is smoother;
- relative update norm ||dW||_F / ||W0||_F.

Summaries per module type, per layer and over the model are unweighted arithmetic means over the
weights in the group. Results are cached per (base digest, tuned digest, settings).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from llmforge.cache import Cache
from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

SCHEMA = "llmforge.eval.spectra/1"
CACHE_KIND = "eval-spectra"
# Bump when the cached document changes, so old entries are not reused.
COMPUTATION_VERSION = "1"
PADDING_MODES = ("reflect", "symmetric", "edge")
NORMALIZATIONS = ("none", "mean")
# Per-weight scalars that the summaries average.
SUMMARY_FIELDS = ("relative_norm", "effective_rank", "smoothness_drift", "smoothness_energy", "mean_drift",
                  "mean_energy")


@dataclass(frozen=True)
class SpectraSettings:
    """Settings of the diagnostics; all of them enter the cache key.

    window: width of the centred moving average (odd). padding: how the sequence is extended at
    its ends, named as in numpy.pad ("reflect" mirrors without repeating the end sample:
    x2 x1 | x0 x1 x2). normalize: "mean" divides dP and E by their mean before the smoothness
    is taken, so the value does not depend on the update's scale. "none" keeps raw values.
    modules: module types to analyse (e.g. q_proj), empty for every updated linear weight.
    """

    window: int = 5
    padding: str = "reflect"
    normalize: str = "none"
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.window < 1 or self.window % 2 == 0:
            raise ForgeError(f"invalid smoothing window {self.window}; it must be an odd number >= 1")
        if self.padding not in PADDING_MODES:
            raise ForgeError(f"invalid padding {self.padding!r}; choose one of {', '.join(PADDING_MODES)}")
        if self.normalize not in NORMALIZATIONS:
            raise ForgeError(f"invalid normalization {self.normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")

    def as_dict(self) -> dict[str, Any]:
        return {"window": self.window, "padding": self.padding, "normalize": self.normalize,
                "modules": sorted(self.modules)}


# Sequence smoothing


def padded_indices(length: int, pad: int, mode: str) -> "torch.Tensor":
    """Return the indices of a sequence of `length` extended by `pad` samples on each side, as numpy.pad does."""
    import torch

    index = torch.arange(-pad, length + pad)
    if length == 1 or mode == "edge":
        return index.clamp(0, length - 1)
    if mode == "reflect":
        period = 2 * (length - 1)
        index = index.remainder(period)
        return torch.where(index >= length, period - index, index)
    period = 2 * length  # symmetric: the end sample repeats (x1 x0 | x0 x1)
    index = index.remainder(period)
    return torch.where(index >= length, period - 1 - index, index)


def moving_average(values: "torch.Tensor", window: int = 5, padding: str = "reflect") -> "torch.Tensor":
    """Return the centred `window`-wide moving average of a 1-D tensor, the same length as the input."""
    pad = window // 2
    extended = values[padded_indices(values.numel(), pad, padding)]
    return extended.unfold(0, window, 1).mean(dim=1)


def smoothness(values: "torch.Tensor", window: int = 5, padding: str = "reflect", normalize: str = "none") -> float:
    """Return mean_i |x_i - MA(x)_i|, the mean deviation of a sequence from its moving average."""
    values = values.double()
    if normalize == "mean":
        scale = values.mean()
        values = values / scale if scale > 0 else values
    return float((values - moving_average(values, window, padding)).abs().mean())


# One weight


def effective_rank(delta: "torch.Tensor") -> float:
    """Return ||dW||_F^2 / ||dW||_2^2 (the stable rank), 0 for an all-zero update.

    ||dW||_2^2 is the largest eigenvalue of the float64 Gram matrix on the smaller side, which
    is cheaper than a float64 SVD of dW.
    """
    import torch

    matrix = delta.double()
    if matrix.numel() == 0:
        return 0.0
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    top = float(torch.linalg.eigvalsh(gram)[-1])
    if top <= 0.0:
        return 0.0
    return float((matrix ** 2).sum()) / top


def weight_profiles(base: "torch.Tensor", delta: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """Return the singular values s, retention P, drift dP and energy E of one weight, each of length min(m, n)."""
    import torch

    base = base.to(torch.float32)
    delta = delta.to(torch.float32)
    u, s, vh = torch.linalg.svd(base, full_matrices=False)
    tuned = base + delta

    # P(i) = u_i^T W_ft v_i is the diagonal of U^T W_ft V: row i of U^T W_ft dotted with row i of V^T.
    retention = ((u.T @ tuned) * vh).sum(dim=1)
    energy = torch.linalg.vector_norm(delta @ vh.T, dim=0)
    return {"singular_values": s, "retention": retention, "drift": (retention - s).abs(), "energy": energy}


def weight_diagnostics(base: "torch.Tensor", delta: "torch.Tensor", settings: SpectraSettings = SpectraSettings()
                       ) -> tuple[dict[str, float], dict[str, "torch.Tensor"]]:
    """Return the scalar diagnostics of one weight and its profiles (see `weight_profiles`)."""
    import torch

    profiles = weight_profiles(base, delta)
    smoothing = {"window": settings.window, "padding": settings.padding, "normalize": settings.normalize}
    base_norm = float(torch.linalg.matrix_norm(base.double()))
    scalars = {
        "relative_norm": float(torch.linalg.matrix_norm(delta.double())) / base_norm if base_norm else math.inf,
        "effective_rank": effective_rank(delta),
        "smoothness_drift": smoothness(profiles["drift"], **smoothing),
        "smoothness_energy": smoothness(profiles["energy"], **smoothing),
        "mean_drift": float(profiles["drift"].double().mean()),
        "mean_energy": float(profiles["energy"].double().mean()),
    }
    return scalars, profiles


# One model


def _mean_profiles(stacks: dict[str, list[dict[str, "torch.Tensor"]]]) -> dict[str, dict[str, Any]]:
    """Average the profiles of each module type over its weights (elementwise, over the shortest length)."""
    import torch

    averaged = {}
    for kind, profiles in sorted(stacks.items()):
        length = min(p["drift"].numel() for p in profiles)
        averaged[kind] = {"count": len(profiles), "length": length}
        for field in ("singular_values", "drift", "energy"):
            stacked = torch.stack([p[field][:length].double() for p in profiles])
            averaged[kind][field] = [float(x) for x in stacked.mean(dim=0)]
    return averaged


def analyze_updates(updates: Iterable, settings: SpectraSettings, *, progress: bool = False) -> dict[str, Any]:
    """Return the per-weight diagnostics and per-module-type mean profiles of a stream of WeightUpdates.

    Raises ForgeError when `settings.modules` names a module type that no updated weight has.
    """
    from tqdm import tqdm

    requested = set(settings.modules)
    seen_types = set()
    weights = []
    stacks: dict[str, list] = defaultdict(list)
    for update in tqdm(updates, desc="spectra", unit="weight", disable=not progress):
        seen_types.add(update.module_type)
        if requested and update.module_type not in requested:
            continue
        scalars, profiles = weight_diagnostics(update.base, update.delta, settings)
        weights.append({"name": update.name, "module_type": update.module_type, "layer": update.layer,
                        "shape": list(update.delta.shape), **scalars})
        stacks[update.module_type].append(profiles)

    missing = sorted(requested - seen_types)
    if missing:
        raise ForgeError(f"unknown module {', '.join(missing)} in --modules: the updated weights have the module "
                         f"types {', '.join(sorted(seen_types)) or '(none)'}")
    if not weights:
        raise ForgeError("the tuned model changes no linear weight of its base, so there is nothing to analyse")
    return {"weights": weights, "profiles": _mean_profiles(stacks)}


def summarize(weights: Sequence[dict[str, Any]], group: Callable[[dict], Any]) -> list[dict[str, Any]]:
    """Return one row per group: the count and the unweighted mean of each summary field over its weights."""
    groups: dict[Any, list[dict]] = defaultdict(list)
    for weight in weights:
        groups[group(weight)].append(weight)

    rows = []
    for key in sorted(groups, key=lambda k: (k is None, k if k is not None else 0)):
        members = groups[key]
        row = {"group": key, "count": len(members)}
        for field in SUMMARY_FIELDS:
            row[field] = sum(m[field] for m in members) / len(members)
        rows.append(row)
    return rows


def model_spectra(tuned: str, base: str | None, settings: SpectraSettings, *, cache: Cache,
                  progress: bool = False) -> dict[str, Any]:
    """Return the diagnostics of one tuned model against its base, computed once per digests and settings."""
    from llmforge_eval import weights as weight_source

    source = weight_source.resolve_update(tuned, base, cache=cache)
    key = weight_source.update_cache_key(CACHE_KIND, source, {**settings.as_dict(), "version": COMPUTATION_VERSION})
    compute = lambda: analyze_updates(weight_source.weight_updates(tuned, base, cache=cache), settings,  # noqa: E731
                                      progress=progress)
    analysis = cache.get_or_compute_json(key, compute)

    weights = analysis["weights"]
    return {
        "reference": tuned,
        "base_reference": source.base_reference,
        "tuned_digest": source.tuned_digest,
        "base_digest": source.base_digest,
        "is_adapter": source.is_adapter,
        "cache_key": key.digest,
        "summary": summarize(weights, lambda w: "all")[0],
        "by_module_type": summarize(weights, lambda w: w["module_type"]),
        "by_layer": summarize(weights, lambda w: w["layer"]),
        "weights": weights,
        "profiles": analysis["profiles"],
    }


def spectra_report(models: Sequence[str], base: str | None = None, settings: SpectraSettings = SpectraSettings(),
                   *, cache: Cache | None = None, progress: bool = False, command: list[str] | None = None
                   ) -> dict[str, Any]:
    """Return the JSON report of the weight-space diagnostics of one or more tuned models."""
    from llmforge.checkpoint import run_record

    if not models:
        raise ForgeError("no model to analyse; pass at least one --model")
    cache = cache or Cache()
    entries = [model_spectra(model, base, settings, cache=cache, progress=progress) for model in models]
    return {
        "schema": SCHEMA,
        "settings": {**settings.as_dict(), "summary_statistic": "unweighted mean over the weights of each group"},
        "models": entries,
        "record": run_record(command),
    }


def with_modules(settings: SpectraSettings, modules: Iterable[str]) -> SpectraSettings:
    """Return `settings` restricted to the given module types."""
    return dataclasses.replace(settings, modules=tuple(sorted(set(modules))))


# Text output


def _row(label: str, row: dict[str, Any]) -> str:
    return (f"{label:<14} {row['count']:>4} {row['relative_norm']:>9.4f} {row['effective_rank']:>8.2f} "
            f"{row['smoothness_drift']:>10.3g} {row['smoothness_energy']:>10.3g} {row['mean_drift']:>10.3g} "
            f"{row['mean_energy']:>10.3g}")


def format_table(report: dict[str, Any]) -> str:
    """Return the text report: per model, one row per module type and one per layer."""
    header = (f"{'group':<14} {'n':>4} {'rel_norm':>9} {'eff_rank':>8} {'smooth_dP':>10} {'smooth_E':>10} "
              f"{'mean_dP':>10} {'mean_E':>10}")
    lines = []
    for entry in report["models"]:
        lines.append(f"model {entry['reference']} (base {entry['base_reference']}), "
                     f"{entry['summary']['count']} updated weights")
        lines.append(header)
        lines.extend(_row(str(row["group"]), row) for row in entry["by_module_type"])
        lines.extend(_row(f"layer {row['group']}" if row["group"] is not None else "other", row)
                     for row in entry["by_layer"])
        lines.append(_row("all", entry["summary"]))
        lines.append("")
    lines.append("Rows are unweighted means over the weights of each group.")
    return "\n".join(lines)
