"""Layer diagnosis for `forge edit layers`: how specific each layer's SAE features are to a task.

For every layer with an SAE, the residual stream after the block (blocks.L.hook_resid_post) is
collected on task text and on general text and encoded by that layer's SAE. Per feature j, mu is
the mean activation over tokens, zeros included (statistic "mean"), or the fraction of tokens on
which the feature fires (statistic "rate"). The feature's specificity is

    s_j = (mu_task - mu_general) / (mu_task + mu_general + eps),

which lies in [-1, 1] for non-negative activations: near 1 for a feature that fires only on task
text and near -1 for one that fires only on general text. The layer's score is the mean of its m
largest s_j. This score is forge's own definition, not a published one.

Rare features are left out: a feature that fires on fewer than `min_rate` of the task tokens
takes no part. Without that floor, a feature seen on a handful of task tokens and on no general
token gets s_j near 1 by chance, and the top-m mean saturates near 1 in every layer. The default
floor of 0.01 means at least 200 firings in a 20,000-token budget, so a kept feature's task rate p
is estimated with a relative standard error sqrt((1 - p) / (n p)) of at most 7%. It is a rate and
not a count, so the set of kept features does not grow with the token budget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

    from llmforge_edit.activations import TextSource

SCORES_FORMAT = "llmforge.edit.layer_scores"
SCORES_FORMAT_VERSION = 1
STATISTICS = ("mean", "rate")
DEFAULT_TOKENS = 20_000
DEFAULT_TOP_M = 32
DEFAULT_MIN_RATE = 0.01
DEFAULT_EPS = 1e-6
# Tokens encoded at once; a chunk of (4096, d_sae) float32 features is 75 MB for d_sae = 4608.
ENCODE_CHUNK = 4096


# The score


@dataclass
class FeatureStatistics:
    """Per-feature statistics of one SAE over a set of tokens: mean activation and firing rate, float64."""

    mean: "torch.Tensor"
    rate: "torch.Tensor"
    tokens: int

    def values(self, statistic: str) -> "torch.Tensor":
        """Return mu for the statistic ("mean" or "rate")."""
        return self.mean if statistic == "mean" else self.rate


def feature_statistics(sae, activations: "torch.Tensor", chunk: int = ENCODE_CHUNK) -> FeatureStatistics:
    """Encode the (tokens, d_in) activations with the SAE and return each feature's mean activation and firing rate."""
    import torch

    if len(activations) == 0:
        raise ForgeError("no activations to encode; the text gave no tokens")
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    for start in range(0, len(activations), chunk):
        features = sae.encode(activations[start:start + chunk])
        total += features.sum(dim=0, dtype=torch.float64)
        fired += (features > 0).sum(dim=0).to(torch.float64)
    return FeatureStatistics(total / len(activations), fired / len(activations), len(activations))


def specificity(task_values: "torch.Tensor", general_values: "torch.Tensor", eps: float) -> "torch.Tensor":
    """Return s_j = (mu_task - mu_general) / (mu_task + mu_general + eps) per feature."""
    return (task_values - general_values) / (task_values + general_values + eps)


def score_layer(task: FeatureStatistics, general: FeatureStatistics, *, statistic: str, top_m: int,
                min_rate: float, eps: float) -> dict[str, Any]:
    """Score one layer: the mean s_j of its top_m features among those firing on at least min_rate of task tokens.

    A feature that never fires on task text takes no part, even with min_rate 0.

    Returns the score (None when no feature passes the floor), the number of features that pass
    (`eligible_features`), how many of those have s_j > 0 (`task_features`), and the top features.
    Ties in s_j are broken by the lower feature index.
    """
    import torch

    scores = specificity(task.values(statistic), general.values(statistic), eps)
    eligible = torch.nonzero((task.rate >= min_rate) & (task.rate > 0)).flatten()
    order = torch.sort(scores[eligible], descending=True, stable=True).indices
    top = eligible[order][:top_m]

    features = [{"feature": int(index), "specificity": float(scores[index]), "mu_task": float(task.values(statistic)[index]),
                 "mu_general": float(general.values(statistic)[index]), "rate_task": float(task.rate[index]),
                 "rate_general": float(general.rate[index])} for index in top.tolist()]
    return {"score": float(scores[top].mean()) if len(top) else None, "eligible_features": len(eligible),
            "task_features": int((scores[eligible] > 0).sum()), "top_features": features}


def rank_layers(rows: list[dict[str, Any]]) -> list[int]:
    """Set each row's `rank` (1 = highest score, None when unscored) and return the layers in rank order."""
    scored = sorted((row for row in rows if row["score"] is not None), key=lambda row: (-row["score"], row["layer"]))
    for row in rows:
        row["rank"] = None
    for rank, row in enumerate(scored, start=1):
        row["rank"] = rank
    return [row["layer"] for row in scored]


# The command's request and run


@dataclass
class LayerScoreRequest:
    """Everything one `forge edit layers` run needs; the command's options map onto these fields."""

    model: str
    sae_dir: Path
    task: "TextSource"
    general: "TextSource"
    tokens: int = DEFAULT_TOKENS
    max_length: int = 256
    skip_bos: bool = True
    dtype: str = "bf16"
    statistic: str = "mean"
    top_m: int = DEFAULT_TOP_M
    min_rate: float = DEFAULT_MIN_RATE
    eps: float = DEFAULT_EPS
    output: Path | None = None
    plot: Path | None = None
    overwrite: bool = False
    progress: bool = True


def check_request(request: LayerScoreRequest) -> None:
    """Raise ForgeError for an option outside its range, naming the option and the value."""
    if request.statistic not in STATISTICS:
        raise ForgeError(f"invalid --statistic {request.statistic!r}; choose one of: {', '.join(STATISTICS)}")
    if request.top_m < 1:
        raise ForgeError(f"invalid --top-m {request.top_m}; it is the number of features averaged, at least 1")
    if not 0 <= request.min_rate < 1:
        raise ForgeError(f"invalid --min-rate {request.min_rate}; give a fraction of task tokens in [0, 1)")
    if not request.eps > 0:
        raise ForgeError(f"invalid --eps {request.eps}; give a small positive number such as 1e-6")
    if request.tokens < 2 or request.max_length < 2:
        raise ForgeError(f"invalid --tokens {request.tokens} or --max-length {request.max_length}; both must be at least 2")
    for path, option in ((request.output, "-o"), (request.plot, "--plot")):
        if path is not None and Path(path).is_dir():
            raise ForgeError(f"output path {path} is a directory; give a file name")
        if path is not None and Path(path).exists() and not request.overwrite:
            raise ForgeError(f"{option} file {path} already exists; choose another path or pass --overwrite")
    if request.output is not None and request.plot is not None and Path(request.output).resolve() == Path(request.plot).resolve():
        raise ForgeError(f"-o and --plot name the same file {request.output}; give two paths")


def read_layer_saes(sae_dir: Path, model: str) -> dict[int, Any]:
    """Read the SAE directory and return {layer: StoredSAE}, checked against the model and the hook forge collects."""
    from llmforge_edit.activations import hook_name, model_shape
    from llmforge_edit.saelens import read_sae_set

    saes: dict[int, Any] = {}
    for item in read_sae_set(sae_dir, model_shape(model)):
        if item.layer is None:
            raise ForgeError(f"the SAE in {item.directory} names no layer (hook_name or hook_layer in cfg.json); "
                             "forge edit layers needs one SAE per decoder layer")
        if item.hook_name is not None and item.hook_name != hook_name(item.layer):
            raise ForgeError(f"the SAE in {item.directory} reads {item.hook_name!r}, but forge collects "
                             f"{hook_name(item.layer)!r}; use SAEs trained on the residual stream after each block")
        if item.layer in saes:
            raise ForgeError(f"{sae_dir} has two SAEs for layer {item.layer}: {saes[item.layer].directory} and "
                             f"{item.directory}; keep one")
        saes[item.layer] = item
    return saes


def collect_statistics(request: LayerScoreRequest, source: "TextSource", saes: dict[int, Any],
                       cache=None) -> tuple[dict[int, FeatureStatistics], dict[str, Any]]:
    """Return each layer's feature statistics on one text source, from cached (or newly collected) activations."""
    from llmforge_edit.activations import ActivationRequest, cached_activations

    activation_request = ActivationRequest(request.model, source, tokens=request.tokens, max_length=request.max_length,
                                           skip_bos=request.skip_bos, dtype=request.dtype, progress=request.progress)
    activations, description = cached_activations(activation_request, sorted(saes), cache=cache)

    statistics = {}
    for layer in sorted(saes):
        statistics[layer] = feature_statistics(saes[layer].sae, activations.pop(layer))
    return statistics, description


def score_layers(request: LayerScoreRequest, command: list[str] | None = None, cache=None) -> dict[str, Any]:
    """Score every layer that has an SAE, write the scores file and plot when requested, and return the record."""
    from llmforge.cache import Cache
    from llmforge.checkpoint import file_digest, run_record, write_json
    from llmforge.models import model_digest, stored_reference

    from llmforge_edit.saelens import SAE_WEIGHTS_NAME

    check_request(request)
    for source, option in ((request.task, "--task-data"), (request.general, "--general-data")):
        try:
            source.check()
        except ForgeError as error:
            raise ForgeError(f"{option}: {error}") from None
    cache = cache or Cache()
    saes = read_layer_saes(request.sae_dir, request.model)

    task, task_description = collect_statistics(request, request.task, saes, cache)
    general, general_description = collect_statistics(request, request.general, saes, cache)

    rows = []
    for layer in sorted(saes):
        result = score_layer(task[layer], general[layer], statistic=request.statistic, top_m=request.top_m,
                             min_rate=request.min_rate, eps=request.eps)
        rows.append({"layer": layer, **result})
    ranking = rank_layers(rows)

    record = run_record(
        command, schema=f"{SCORES_FORMAT}/{SCORES_FORMAT_VERSION}", format=SCORES_FORMAT,
        format_version=SCORES_FORMAT_VERSION, model=stored_reference(request.model),
        model_digest=model_digest(request.model, cache=cache), sae_dir=str(Path(request.sae_dir).resolve()),
        saes=[{"layer": layer, "path": saes[layer].directory, "d_in": saes[layer].sae.d_in,
               "d_sae": saes[layer].sae.d_sae, "architecture": saes[layer].sae.architecture,
               "weights_digest": file_digest(Path(saes[layer].directory) / SAE_WEIGHTS_NAME)} for layer in sorted(saes)],
        task_data=_data_entry(request.task, task_description),
        general_data=_data_entry(request.general, general_description),
        options={"statistic": request.statistic, "top_m": request.top_m, "min_rate": request.min_rate,
                 "eps": request.eps, "tokens": request.tokens, "max_length": request.max_length,
                 "skip_bos": request.skip_bos, "dtype": request.dtype, "hook": "blocks.L.hook_resid_post"},
        layers=rows, ranking=ranking,
    )
    if request.output is not None:
        write_json(request.output, record)
    if request.plot is not None:
        plot_scores(record, request.plot)
    return record


def _data_entry(source: "TextSource", description: dict[str, Any]) -> dict[str, Any]:
    entry = {"path": source.data, "digest": description["data_digest"], "format": source.fmt,
             "columns": dict(source.columns), "tokens": description["tokens"], "layers_from_cache": description["layers_from_cache"]}
    for name in ("prompt_template", "completion_template"):
        if getattr(source, name) is not None:
            entry[name] = getattr(source, name)
    return entry


# Reading the scores file and plotting it


def read_layer_scores(path: Path) -> dict[str, Any]:
    """Read a scores file written by `forge edit layers -o`; ForgeError when it is missing or of another format."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ForgeError(f"scores file not found: {path}; write one with `forge edit layers -o FILE`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ForgeError(f"cannot read the scores file {path}: {error}") from None
    if not isinstance(record, dict) or record.get("format") != SCORES_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ForgeError(f"{path} is not a forge layer-scores file (format is {found!r}); write one with "
                         "`forge edit layers -o FILE`")
    if record.get("format_version") != SCORES_FORMAT_VERSION:
        raise ForgeError(f"{path} has layer-scores format version {record.get('format_version')!r}; this forge "
                         f"reads version {SCORES_FORMAT_VERSION}")
    problem = _scores_problem(record)
    if problem is not None:
        raise ForgeError(f"{path} is not a valid layer-scores file: {problem}; write it again with "
                         "`forge edit layers -o FILE`")
    return record


def _scores_problem(record: dict[str, Any]) -> str | None:
    """Describe the first missing or malformed field that `forge edit apply` reads, or return None."""
    rows, ranking, saes = record.get("layers"), record.get("ranking"), record.get("saes")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        return "missing or malformed `layers` (a list of per-layer objects)"
    if not isinstance(ranking, list) or not all(isinstance(layer, int) for layer in ranking):
        return "missing or malformed `ranking` (a list of layer indices)"
    if not isinstance(saes, list) or not all(isinstance(entry, dict) and isinstance(entry.get("layer"), int)
                                             and isinstance(entry.get("d_sae"), int) for entry in saes):
        return "missing or malformed `saes` (a list of objects with layer and d_sae)"
    for row in rows:
        if not isinstance(row.get("layer"), int) or not isinstance(row.get("top_features"), list):
            return f"the entry {json.dumps(row)[:80]} in `layers` lacks an integer `layer` or a `top_features` list"
        for item in row["top_features"]:
            if not (isinstance(item, dict) and isinstance(item.get("feature"), int)
                    and isinstance(item.get("specificity"), (int, float))):
                return f"layer {row['layer']} has a top feature without an integer `feature` and a `specificity`"
    scored = {row["layer"] for row in rows}
    if not set(ranking) <= scored:
        return f"`ranking` lists layers {sorted(set(ranking) - scored)} that `layers` does not score"
    return None


def plot_scores(record: dict[str, Any], path: Path) -> None:
    """Write a bar chart of the layer scores as a PNG file, atomically; the top-ranked layer is highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmforge.checkpoint import atomic_write

    rows = record["layers"]
    layers = [row["layer"] for row in rows]
    scores = [row["score"] if row["score"] is not None else 0.0 for row in rows]
    colours = ["tab:orange" if row["rank"] == 1 else "tab:blue" for row in rows]

    figure, axis = plt.subplots(figsize=(max(5.0, 0.3 * len(rows) + 2), 3.6))
    axis.bar(layers, scores, color=colours)
    axis.set_xlabel("decoder layer")
    axis.set_ylabel(f"mean of top-{record['options']['top_m']} s_j")
    axis.set_title(f"{record['model']}: task specificity of SAE features ({record['options']['statistic']})")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    try:
        with atomic_write(path) as handle:
            figure.savefig(handle, format="png", dpi=110)
    finally:
        plt.close(figure)
