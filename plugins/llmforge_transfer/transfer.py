"""forge transfer: align two base models on calibration data and carry a task vector across.

`run_transfer` loads the models and takes the source vector (tuned minus base, or a task-vector
file). It computes or reads the cached calibration statistics and builds the maps of align.py.
It writes the target with alpha * tau_B applied, tau_B on its own, and forge_run.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError

from llmforge_transfer.align import ALIGN_METHODS, check_naive_shapes, layer_maps, rank_warnings, transport_vector
from llmforge_transfer.calibration import CalibrationSettings, calibration_statistics

logger = logging.getLogger(__name__)

TRANSPORTED_VECTOR = "transported_vector.safetensors"


@dataclass
class TransferRequest:
    """The inputs of one transfer; exactly one of `source_tuned` and `vector` is set."""

    source_base: str
    target_base: str
    calib: str | None
    output: Path
    source_tuned: str | None = None
    vector: str | None = None
    align: str = "bico"
    alpha: float = 1.0
    # With a grid, alpha is chosen on the held-out file alpha_data instead (see alpha.py).
    alpha_grid: list[float] | None = None
    alpha_data: str | None = None
    settings: CalibrationSettings = field(default_factory=CalibrationSettings)
    overwrite: bool = False


def _source_vector(request: TransferRequest, source, cache) -> tuple[dict[str, Any], str]:
    """Return the source task vector and the digest of the tuned model it came from."""
    from llmforge.checkpoint import compute_task_vector, load_task_vector
    from llmforge.models import load_model

    if (request.source_tuned is None) == (request.vector is None):
        raise ForgeError("pass exactly one of --source-tuned and --vector")
    if request.vector is not None:
        vector, metadata = load_task_vector(request.vector)
        if metadata.get("base_digest") != source.digest:
            raise ForgeError(f"the task vector {request.vector} was computed against base {metadata.get('base_digest')}, "
                             f"not the source base {request.source_base} ({source.digest}); pass its own base "
                             "with --source-base")
        return dict(vector), metadata.get("tuned_digest", "")
    tuned = load_model(request.source_tuned, dtype=request.settings.dtype, cache=cache)
    tuned_model = tuned.model
    if tuned.is_adapter:
        if tuned.base_digest != source.digest:
            raise ForgeError(f"the adapter {request.source_tuned} was trained on {tuned.base_reference} "
                             f"({tuned.base_digest}), not on the source base {request.source_base} ({source.digest}); "
                             "pass its own base with --source-base")
        tuned_model = tuned_model.merge_and_unload()
    vector = compute_task_vector(source.model.state_dict(), tuned_model.state_dict())
    return {name: update for name, update in vector.items() if bool(update.any())}, tuned.digest


def _calibration_settings(request: TransferRequest) -> dict[str, Any]:
    """Return the calibration settings of this alignment: output gradients for bico, outputs for activations."""
    output_side = "gradients" if request.align == "bico" else "outputs"
    return {**request.settings.__dict__, "output_side": output_side}


def transport(request: TransferRequest, source, target, vector: dict, cache) -> tuple[dict, dict, list, list]:
    """Return (tau_B, per-layer report, skipped source tensors, warnings) for loaded base models."""
    if request.align not in ALIGN_METHODS:
        raise ForgeError(f"invalid --align {request.align!r}; use one of: {', '.join(ALIGN_METHODS)}")
    target_state = target.model.state_dict()
    if request.align == "naive":
        check_naive_shapes(vector, target_state)
        return dict(vector), {}, [], []

    settings = CalibrationSettings(**_calibration_settings(request))
    statistics, matched = calibration_statistics(source, target, request.calib, settings, cache=cache)
    config = target.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    logger.info("computing the maps of %d linear layers and transporting the vector", len(matched))
    reports: dict[str, dict] = {}
    warnings: list[str] = []

    def maps():
        for name, q_in, q_out, report in layer_maps(statistics, matched, head_dim=head_dim, method=request.align):
            reports[name] = report
            for warning in rank_warnings(name, report, int(statistics["tokens"])):
                logger.warning("%s", warning)
                warnings.append(warning)
            yield name, q_in, q_out

    transported, skipped = transport_vector(
        vector, source.model.state_dict(), target_state, maps(),
        source_tied=bool(source.model.config.tie_word_embeddings),
        target_tied=bool(config.tie_word_embeddings))
    if skipped:
        logger.warning("%d source tensors have no rule and are not transported, such as %s", len(skipped), skipped[0])
    return transported, reports, skipped, warnings


def _search_alpha(request: TransferRequest, target, transported: dict) -> tuple[float, dict[str, Any]]:
    """Return the alpha of the grid with the lowest held-out loss, and the search record."""
    from llmforge.checkpoint import file_digest
    from llmforge.data import resolve_data_path

    from llmforge_transfer.alpha import search_alpha
    from llmforge_transfer.calibration import calibration_batches

    batches = calibration_batches(request.alpha_data, target.tokenizer, request.settings)
    best, scores = search_alpha(target.model, transported, request.alpha_grid, batches)
    logger.info("alpha %s has the lowest held-out loss (%s)", best,
                ", ".join(f"{alpha}: {loss:.4f}" for alpha, loss in scores.items()))
    return best, {"data": str(request.alpha_data), "data_digest": file_digest(resolve_data_path(request.alpha_data)),
                  "metric": "mean LM loss of the completion tokens", "losses": scores}


def run_transfer(request: TransferRequest, *, command: list[str] | None = None, cache=None) -> dict[str, Any]:
    """Transfer the task vector and write the output directory atomically; return the run record."""
    import torch

    from llmforge.cache import Cache
    from llmforge.checkpoint import (RUN_RECORD_NAME, atomic_directory, check_output_apart, check_output_directory,
                                     run_record, save_task_vector, write_json, write_merged_model)
    from llmforge.models import directory_model_digest, load_model, resolve, stored_reference

    cache = cache or Cache()
    check_output_directory(Path(request.output), overwrite=request.overwrite)
    check_output_apart(request.output, {
        "source base": resolve(request.source_base, cache=cache).path,
        "target base": resolve(request.target_base, cache=cache).path,
        "source fine-tuned model": resolve(request.source_tuned, cache=cache).path if request.source_tuned else None,
        "task vector": request.vector, "calibration data": request.calib, "held-out data": request.alpha_data})
    if (request.alpha_grid is None) != (request.alpha_data is None):
        raise ForgeError("--alpha-grid and --alpha-data go together: the grid is scored on the held-out data")
    source = load_model(request.source_base, dtype=request.settings.dtype, cache=cache)
    target = load_model(request.target_base, dtype=request.settings.dtype, cache=cache)
    if source.is_adapter or target.is_adapter:
        raise ForgeError("--source-base and --target-base must be whole models, not PEFT adapters")
    vector, tuned_digest = _source_vector(request, source, cache)
    transported, reports, skipped, warnings = transport(request, source, target, vector, cache)
    transported = {name: update.to(torch.float32).contiguous() for name, update in transported.items()}

    record = run_record(command, schema="llmforge.transfer/1", source_base=stored_reference(request.source_base), source_digest=source.digest,
                        source_tuned_digest=tuned_digest, target_base=stored_reference(request.target_base),
                        target_digest=target.digest, align=request.align, alpha=request.alpha,
                        calibration=None if request.align == "naive" else _calibration_settings(request), layers=reports, skipped_tensors=skipped,
                        warnings=warnings)
    alpha = request.alpha
    if request.alpha_grid is not None:
        alpha, record["alpha_search"] = _search_alpha(request, target, transported)
        record["alpha"] = alpha
    scaled = {name: alpha * update for name, update in transported.items()}
    with atomic_directory(request.output, overwrite=request.overwrite) as directory:
        write_merged_model(target.path, scaled, directory, target.tokenizer)
        output_digest = directory_model_digest(directory, None)
        save_task_vector(directory / TRANSPORTED_VECTOR, transported, base_digest=target.digest,
                         tuned_digest=output_digest,
                         extra={"alpha": repr(alpha), "align": request.align,
                                "source_base_digest": source.digest})
        record["output_digest"] = output_digest
        write_json(directory / RUN_RECORD_NAME, record)
    return record
