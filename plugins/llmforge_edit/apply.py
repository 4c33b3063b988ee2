"""Layer-selective task-vector edits for `forge edit apply`, with the SAE projection as a control.

`apply_vector` adds lambda * tau only to the parameters of the chosen decoder layers (tensors whose
name has the layer index as a component, such as model.layers.7.mlp.down_proj.weight). It writes
the model through `run_merge` (task_arithmetic, one vector, a layer filter). `--select` chooses:

- top-k, bottom-k: the k highest or lowest scored layers of a `forge edit layers` scores file;
- random-k: k distinct layers drawn from every decoder layer of the base, seeded;
- all: the whole vector, including tensors outside the decoder layers (embeddings, final norm);
- a list such as 3,7,12-14.

The projection (`--project sae`, the "scalpel" control) keeps only the part of tau that touches a
subspace of the residual stream. For each chosen layer, the SAE decoder rows of the layer's top
task features (the scores file's top features with s_j > 0) are orthonormalised into a basis P
(d_model x r). A matrix that writes to the stream (output size d_model: o_proj, down_proj) becomes
P P^T tau. A matrix that reads from it (input size d_model: q, k, v, gate and up projections)
becomes tau P P^T. A 1-D tensor of size d_model becomes P P^T tau, unless it is the bias of a
reading module. Other tensors are dropped and listed. The energy fraction
||P tau||^2 / ||tau||^2 is taken over every tensor of the chosen layers that the vector contains,
dropped ones included.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.errors import ForgeError
from llmforge_edit.activations import parse_layers

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

APPLY_SCHEMA = "llmforge.edit.apply/1"
RANKED_SELECTIONS = ("top-k", "bottom-k")
SELECTIONS = ("top-k", "bottom-k", "random-k", "all")
PROJECTIONS = ("sae",)
# Modules that add their output to the residual stream, and modules that read the stream (after a norm).
WRITE_MODULES = frozenset({"o_proj", "down_proj", "out_proj", "fc2", "wo", "w2"})
READ_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
                          "fc1", "wq", "wk", "wv", "w1", "w3"})
# Singular values below this fraction of the largest count as zero when the decoder rows are orthonormalised.
BASIS_TOLERANCE = 1e-6
MERGED_SUBDIRECTORY = "merged"
PROJECTED_VECTOR_NAME = "projected_task_vector.safetensors"


# Choosing layers


def choose_layers(select: str, k: int | None, *, num_layers: int, scores: dict | None = None,
                  seed: int = 0, candidates: list[int] | None = None) -> list[int]:
    """Return the sorted decoder layers that --select and --k choose.

    top-k and bottom-k rank the layers of `scores` (a scores file); random-k samples without
    replacement with `random.Random(seed)` from `candidates` (default: all `num_layers` layers).
    """
    if select not in SELECTIONS:
        return parse_layers(select, num_layers, option="--select")
    if select == "all":
        return list(range(num_layers))
    if k is None:
        raise ForgeError(f"--select {select} needs --k, the number of layers to choose")

    if select in RANKED_SELECTIONS:
        if scores is None:
            raise ForgeError(f"--select {select} ranks layers by their scores; pass --scores FILE from "
                             "`forge edit layers -o FILE`")
        ranking = list(scores["ranking"])
        if not ranking:
            raise ForgeError("the scores file ranks no layer, because no layer passed --min-rate in `forge edit "
                             "layers`; score again with more task text or a lower --min-rate")
        outside = [layer for layer in ranking if not 0 <= layer < num_layers]
        if outside:
            raise ForgeError(f"the scores file ranks layer {outside[0]}, but the base has {num_layers} decoder "
                             "layers; pass the scores of this base")
        _check_k(k, len(ranking), "the scores file ranks")
        return sorted(ranking[:k] if select == "top-k" else ranking[-k:])

    if candidates is None:
        _check_k(k, num_layers, "the base has")
        return sorted(random.Random(seed).sample(range(num_layers), k))
    _check_k(k, len(candidates), "the SAE directory has SAEs for")
    return sorted(random.Random(seed).sample(sorted(candidates), k))


def _check_k(k: int, available: int, owner: str) -> None:
    if not 1 <= k <= available:
        raise ForgeError(f"invalid --k {k}: {owner} {available} layers, so give a number from 1 to {available}")


# The projection


def feature_basis(decoder_rows: "torch.Tensor") -> "torch.Tensor":
    """Return an orthonormal basis (d_model, r) of the span of the decoder rows (n, d_model); r is their rank."""
    import torch

    if decoder_rows.shape[0] == 0:
        return torch.zeros(decoder_rows.shape[1], 0)
    _, singular, vh = torch.linalg.svd(decoder_rows.double(), full_matrices=False)
    rank = int((singular > BASIS_TOLERANCE * singular[0]).sum()) if float(singular[0]) > 0 else 0
    return vh[:rank].T.to(torch.float32).contiguous()


def residual_side(name: str, shape: tuple[int, ...], hidden_size: int) -> str | None:
    """Return how a tensor touches the residual stream: "write", "read" or "vector"; None when it cannot be projected.

    Known module names decide for matrices and biases. A matrix of another module counts as writing when
    only its output size is d_model and as reading when only its input size is, so a square matrix
    of an unknown module is not projected.
    """
    parts = set(name.split("."))
    if len(shape) == 1:
        # The bias of a module that reads the stream lives in that module's output space, not in the stream.
        return "vector" if shape[0] == hidden_size and not parts & READ_MODULES else None
    if len(shape) != 2:
        return None
    output_size, input_size = shape
    if parts & WRITE_MODULES:
        return "write" if output_size == hidden_size else None
    if parts & READ_MODULES:
        return "read" if input_size == hidden_size else None
    if output_size == hidden_size and input_size != hidden_size:
        return "write"
    if input_size == hidden_size and output_size != hidden_size:
        return "read"
    return None


def project_update(tau: "torch.Tensor", basis: "torch.Tensor", side: str) -> "torch.Tensor":
    """Project one update onto the basis P: P P^T tau for "write" and "vector", tau P P^T for "read"."""
    if side == "read":
        return (tau @ basis) @ basis.T
    return basis @ (basis.T @ tau)


def project_vector(vector, layers: list[int], bases: dict[int, "torch.Tensor"],
                   hidden_size: int) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """Project the vector's tensors in `layers` onto their layer's basis; return the tensors and the energy report.

    `vector` is an open TaskVectorFile. Tensors outside `layers` are left out, so the merge must be
    restricted to those layers. A layer's energy fraction is None when its part of tau is zero.
    `isotropic_fraction` = r / d_model is the expected fraction for an update with no preferred
    direction in the residual stream, the level that a fraction must exceed to mean anything.
    """
    from llmforge_edit.merge import layer_index

    tensors, per_layer = {}, {layer: {"energy": 0.0, "projected_energy": 0.0, "tensors": 0, "dropped": []} for layer in layers}
    for name in vector.names():
        layer = layer_index(name)
        if layer not in per_layer:
            continue
        tau = vector.tensor(name)
        entry = per_layer[layer]
        entry["energy"] += float(tau.double().pow(2).sum())
        entry["tensors"] += 1
        side = residual_side(name, tuple(tau.shape), hidden_size)
        if side is None:
            entry["dropped"].append(name)
            continue
        projected = project_update(tau, bases[layer], side)
        entry["projected_energy"] += float(projected.double().pow(2).sum())
        tensors[name] = projected.contiguous()

    total = sum(entry["energy"] for entry in per_layer.values())
    projected_total = sum(entry["projected_energy"] for entry in per_layer.values())
    report = {"energy_fraction": projected_total / total if total > 0 else None,
              "layers": [{"layer": layer,
                          "energy_fraction": entry["projected_energy"] / entry["energy"] if entry["energy"] > 0 else None,
                          "basis_rank": int(bases[layer].shape[1]),
                          "isotropic_fraction": int(bases[layer].shape[1]) / hidden_size, "tensors": entry["tensors"],
                          "dropped_tensors": entry["dropped"]} for layer, entry in per_layer.items()]}
    return tensors, report


def projection_bases(sae_dir: Path, scores: dict, layers: list[int], saes: dict) -> tuple[dict[int, "torch.Tensor"], list[dict]]:
    """Return the basis P of each chosen layer from its SAE and its top task features in the scores file.

    `saes` is `read_layer_saes(sae_dir, model)`. Raises ForgeError when a layer has no SAE, no
    scores or no task feature (s_j > 0), or when its SAE is not the one that the scores were
    computed with (another width or other weights), so feature indices would not match.
    """
    from llmforge.checkpoint import file_digest

    from llmforge_edit.saelens import SAE_WEIGHTS_NAME

    scored = {row["layer"]: row for row in scores["layers"]}
    recorded = {entry["layer"]: entry for entry in scores["saes"]}
    bases, features = {}, []
    for layer in layers:
        if layer not in saes:
            raise ForgeError(f"--project sae: {sae_dir} has no SAE for layer {layer}; choose layers that have SAEs")
        if layer not in scored:
            raise ForgeError(f"--project sae: the scores file has no scores for layer {layer}; score it with "
                             "`forge edit layers` first")
        if layer not in recorded:
            raise ForgeError(f"--project sae: the scores file lists no SAE for layer {layer} in `saes`; write it "
                             "again with `forge edit layers -o FILE`")
        sae = saes[layer].sae
        if sae.d_sae != recorded[layer]["d_sae"]:
            raise ForgeError(f"the SAE for layer {layer} in {sae_dir} has d_sae={sae.d_sae}, but the scores were "
                             f"computed with d_sae={recorded[layer]['d_sae']}; pass the SAE directory the scores used")
        if file_digest(Path(saes[layer].directory) / SAE_WEIGHTS_NAME) != recorded[layer]["weights_digest"]:
            raise ForgeError(f"the SAE for layer {layer} in {sae_dir} differs from the one the scores were computed "
                             f"with ({recorded[layer]['path']}); pass that SAE directory or score again")

        indices = [item["feature"] for item in scored[layer]["top_features"] if item["specificity"] > 0]
        if not indices:
            raise ForgeError(f"--project sae: layer {layer} has no task features in the scores file (no top feature "
                             "with s_j > 0), so the projection would remove all of tau there; choose other layers")
        outside = [index for index in indices if not 0 <= index < sae.d_sae]
        if outside:
            raise ForgeError(f"the scores file lists feature {outside[0]} for layer {layer}, but its SAE has "
                             f"d_sae={sae.d_sae} features; pass the scores and SAEs of one `forge edit layers` run")
        bases[layer] = feature_basis(sae.W_dec[indices])
        features.append({"layer": layer, "features": indices})
    return bases, features


# The command's request and run


@dataclass
class ApplyRequest:
    """Everything one `forge edit apply` run needs; the command's options map onto these fields."""

    base: str
    vector: Path
    select: str
    output: Path
    k: int | None = None
    scores: Path | None = None
    seed: int = 0
    scale: float = 1.0  # --lambda
    project: str | None = None
    sae_dir: Path | None = None
    overwrite: bool = False


def _check_inputs(request: ApplyRequest, base_digest: str) -> dict | None:
    """Check the options, the vector's base and the scores file's model; return the scores record or None."""
    from llmforge_edit.layers import read_layer_scores
    from llmforge_edit.vectors import TaskVectorFile

    if not math.isfinite(request.scale):
        raise ForgeError(f"invalid --lambda {request.scale}; give a finite number")
    if request.project is not None and request.project not in PROJECTIONS:
        raise ForgeError(f"invalid --project {request.project!r}; the projection forge offers is: sae")
    if request.project is not None and (request.sae_dir is None or request.scores is None):
        missing = "--sae SAE_DIR" if request.sae_dir is None else "--scores FILE"
        raise ForgeError(f"--project sae needs {missing}: the SAE decoder rows of each layer's top task features "
                         "from the scores file span the subspace")
    if request.k is not None and (request.select == "all" or request.select not in SELECTIONS):
        logger.warning("--k %d has no effect with --select %s; it is ignored", request.k, request.select)
    if request.project is None:
        if request.scores is not None and request.select not in RANKED_SELECTIONS:
            logger.warning("--scores has no effect with --select %s and no --project; it is only recorded",
                           request.select)
        if request.sae_dir is not None:
            logger.warning("--sae has no effect without --project sae; it is ignored")

    with TaskVectorFile(request.vector) as vector:
        if vector.base_digest != base_digest:
            raise ForgeError(f"task vector {request.vector} was computed against base {str(vector.base_digest)[:19]}..., "
                             f"not {request.base} ({base_digest[:19]}...); pass its own base with --base")
    if request.scores is None:
        return None
    scores = read_layer_scores(request.scores)
    if scores.get("model_digest") != base_digest:
        raise ForgeError(f"the scores file {request.scores} was computed on {scores.get('model')} "
                         f"({str(scores.get('model_digest'))[:19]}...), not on the base {request.base} "
                         f"({base_digest[:19]}...); score the base with `forge edit layers`")
    return scores


def _selection_entry(request: ApplyRequest, layers: list[int], scores: dict | None) -> dict[str, Any]:
    from llmforge.checkpoint import file_digest

    mode = request.select if request.select in SELECTIONS else "list"
    entry: dict[str, Any] = {"select": request.select, "mode": mode, "layers": layers,
                             "k": request.k if mode in ("top-k", "bottom-k", "random-k") else None,
                             "seed": request.seed if mode == "random-k" else None}
    if scores is not None:
        by_layer = {row["layer"]: row["score"] for row in scores["layers"]}
        entry.update(scores=str(Path(request.scores).resolve()), scores_digest=file_digest(request.scores),
                     layer_scores={str(layer): by_layer.get(layer) for layer in layers})
    return entry


def apply_vector(request: ApplyRequest, command: list[str] | None = None, cache=None) -> dict[str, Any]:
    """Add lambda * tau (or its projection) to the chosen layers of the base, write an HF directory, return the record."""
    from llmforge.cache import Cache
    from llmforge.checkpoint import (RUN_RECORD_NAME, atomic_directory, check_output_apart, check_output_directory,
                                     write_json)
    from llmforge.models import model_digest, resolve

    from llmforge_edit.activations import model_shape
    from llmforge_edit.layers import read_layer_saes

    cache = cache or Cache()
    resolved = resolve(request.base, cache=cache)
    if resolved.is_adapter:
        raise ForgeError(f"the base {request.base} is a PEFT adapter; apply the vector to a model")
    check_output_apart(request.output, {"base": resolved.path, "task vector": request.vector,
                                        "scores file": request.scores, "SAE directory": request.sae_dir})
    base_digest = model_digest(request.base, cache=cache)
    scores = _check_inputs(request, base_digest)
    shape = model_shape(request.base, cache=cache)
    saes = read_layer_saes(request.sae_dir, request.base) if request.project is not None else {}
    candidates = None
    if request.project is not None and request.select == "random-k":
        candidates = sorted(saes)
        logger.warning("--project sae: random-k draws from the %d layers that have an SAE in %s",
                       len(candidates), request.sae_dir)
    layers = choose_layers(request.select, request.k, num_layers=shape.num_layers, scores=scores, seed=request.seed,
                           candidates=candidates)
    whole = request.select == "all" and request.project is None
    bases, features = (projection_bases(request.sae_dir, scores, layers, saes)
                       if request.project is not None else ({}, []))
    check_output_directory(request.output, overwrite=request.overwrite)

    with atomic_directory(request.output, overwrite=request.overwrite) as staging:
        vector_path, projection = Path(request.vector), None
        if request.project is not None:
            vector_path = staging / PROJECTED_VECTOR_NAME
            projection = _write_projection(request.vector, vector_path, layers, bases, shape.hidden_size)
            projection.update(sae_dir=str(Path(request.sae_dir).resolve()), features=features)
        merged = _merge_into(staging, request, vector_path, None if whole else layers, command, cache)
        record = _apply_record(merged, request, _selection_entry(request, layers, scores), projection)
        write_json(staging / RUN_RECORD_NAME, record)
    return {**record, "output": str(request.output)}


def _write_projection(vector_path: Path, output: Path, layers: list[int], bases: dict, hidden_size: int) -> dict:
    """Write the projected vector as a dense task vector file and return the energy report."""
    from llmforge.checkpoint import save_task_vector

    from llmforge_edit.vectors import LAYOUT_DENSE, TaskVectorFile

    with TaskVectorFile(vector_path) as vector:
        tensors, report = project_vector(vector, layers, bases, hidden_size)
        save_task_vector(output, tensors, base_digest=vector.base_digest, tuned_digest=vector.tuned_digest,
                         extra={"layout": LAYOUT_DENSE, "computed_by": "forge edit apply --project sae"})
    # NOTE: the matrices that read the stream see the block's input: the residual before block L
    # (layer L-1's resid_post), scaled by the block's RMSNorm. Layer L's resid_post SAE is used in its place.
    report["read_side_basis"] = "the SAE of the same layer's resid_post, as a stand-in for the block input"
    return report


def _merge_into(staging: Path, request: ApplyRequest, vector_path: Path, layers: list[int] | None,
                command: list[str] | None, cache) -> dict:
    """Merge through run_merge into a subdirectory of `staging`, then move its files up into `staging`."""
    from llmforge_edit.merge import MergeRequest, VectorSpec, run_merge

    target = staging / MERGED_SUBDIRECTORY
    merge_request = MergeRequest(base=request.base, vectors=[VectorSpec(vector_path)], output=target,
                                 method="task_arithmetic", scale=request.scale,
                                 layers=None if layers is None else ",".join(map(str, layers)))
    record = run_merge(merge_request, command=command, cache=cache)
    for child in target.iterdir():
        os.replace(child, staging / child.name)
    target.rmdir()
    with contextlib.suppress(FileNotFoundError):
        (staging / PROJECTED_VECTOR_NAME).unlink()
    return record


def _apply_record(merged: dict, request: ApplyRequest, selection: dict, projection: dict | None) -> dict:
    from llmforge.checkpoint import file_digest

    from llmforge_edit.vectors import TaskVectorFile

    with TaskVectorFile(request.vector) as vector:
        source = {"path": str(Path(request.vector).resolve()), "file_digest": file_digest(request.vector),
                  "tuned_digest": vector.tuned_digest, "layout": vector.layout, "weight": 1.0, "density": 1.0}
    record = {key: value for key, value in merged.items() if key != "output"}
    record.update(schema=APPLY_SCHEMA, vectors=[source], selection=selection, selected_layers=selection["layers"],
                  projection=projection)
    return record
