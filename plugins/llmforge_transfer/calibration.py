"""Calibration statistics for transfer: paired cross-covariances of two base models' linear layers.

Both models run forward and backward on the same token batches (LM loss on the completion tokens,
data formats as forge finetune), with weights frozen. A forward hook on every matched nn.Linear
takes its input x and, for the output side, either its output y or (through a tensor hook) the
output gradient g. Per matched layer pair the float64 sums C_in = sum x_B x_A^T and C_out =
sum g_B g_A^T (or sum y_B y_A^T) are accumulated batch by batch, so memory is bounded by one
batch of activations per model plus the d_B x d_A sums.

Inputs of layers that read an RMSNorm output (q/k/v, gate/up, lm_head) are divided by the norm's
gain before they are summed. Alignment thus works on the gain-free normalized stream, which an
orthogonal change of coordinates maps exactly. align.py folds the gains back in.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError

logger = logging.getLogger(__name__)

LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
LM_HEAD = "lm_head"
# Linear layers that read the same input share one input statistic, stored under the first name.
SHARED_INPUTS = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                 "mlp.up_proj": "mlp.gate_proj"}
# The RMSNorm whose output each linear layer reads; these layers are aligned on gain-free inputs.
NORM_OF_READER = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
                  "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
                  "mlp.up_proj": "post_attention_layernorm"}
FINAL_NORM = "model.norm"
CACHE_KIND = "transfer-calibration"


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration settings besides the two models and the data file; all of them are part of the cache key."""

    output_side: str = "gradients"
    calib_tokens: int = 4096
    max_length: int = 256
    batch_size: int = 4
    dtype: str = "float32"
    layer_map: str = "proportional"
    whiten: bool = False


def norm_of(linear: str) -> str | None:
    """Return the RMSNorm module name whose gain the linear layer reads, or None."""
    if linear == LM_HEAD:
        return FINAL_NORM
    match = LAYER_PATTERN.match(linear)
    if match and match.group(2) in NORM_OF_READER:
        return f"model.layers.{match.group(1)}.{NORM_OF_READER[match.group(2)]}"
    return None


def input_key(linear: str) -> str:
    """Return the linear layer under whose name the input statistic of `linear` is stored."""
    match = LAYER_PATTERN.match(linear)
    if match and match.group(2) in SHARED_INPUTS:
        return f"model.layers.{match.group(1)}.{SHARED_INPUTS[match.group(2)]}"
    return linear


def linear_layers(model) -> dict[str, Any]:
    """Return the nn.Linear modules of a causal LM by name."""
    import torch

    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _layer_count(names) -> int:
    indices = [int(match.group(1)) for match in map(LAYER_PATTERN.match, names) if match]
    return max(indices) + 1 if indices else 0


def _read_layer_map(spec: str, target_layers: int, source_layers: int) -> dict[int, int]:
    if spec == "proportional":
        if target_layers == 1:
            return {0: 0}
        return {j: round(j * (source_layers - 1) / (target_layers - 1)) for j in range(target_layers)}
    try:
        document = json.loads(Path(spec).read_text(encoding="utf-8"))
        mapping = {int(target): int(source) for target, source in document.items()}
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise ForgeError(f"invalid --layer-map {spec}: {error}; pass 'proportional' or a JSON file of "
                         '{"TARGET_LAYER": SOURCE_LAYER}') from None
    for target, source in mapping.items():
        if not (0 <= target < target_layers and 0 <= source < source_layers):
            raise ForgeError(f"--layer-map {spec} maps target layer {target} to source layer {source}, but the "
                             f"target has {target_layers} layers and the source {source_layers}")
    return mapping


def match_linear_layers(source_names, target_names, layer_map: str = "proportional") -> dict[str, str]:
    """Map each target linear layer to its source layer: decoder layers by `layer_map`, others by name.

    Raises ForgeError when no layer matches.
    """
    source_names, target_names = set(source_names), set(target_names)
    mapping = _read_layer_map(layer_map, _layer_count(target_names), _layer_count(source_names))
    matched = {}
    for name in sorted(target_names):
        match = LAYER_PATTERN.match(name)
        if match is None:
            source = name
        elif int(match.group(1)) in mapping:
            source = f"model.layers.{mapping[int(match.group(1))]}.{match.group(2)}"
        else:
            continue
        if source in source_names:
            matched[name] = source
    if not any(LAYER_PATTERN.match(name) for name in matched):
        raise ForgeError(f"no linear layer of the target matches one of the source (target layers such as "
                         f"{sorted(target_names)[:2]}, source layers such as {sorted(source_names)[:2]}); "
                         "transfer needs two models of one architecture family")
    return matched


def check_same_tokenizer(source_tokenizer, target_tokenizer, source: str, target: str) -> None:
    """Raise ForgeError unless both tokenizers have the same vocabulary and special tokens."""
    source_vocab, target_vocab = source_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if source_vocab != target_vocab:
        differing = sorted(set(source_vocab.items()) ^ set(target_vocab.items()))
        token, _ = differing[0]
        raise ForgeError(f"the tokenizers of {source} and {target} differ ({len(source_vocab)} and "
                         f"{len(target_vocab)} tokens; first difference at token {token!r}); transfer pairs "
                         "token positions of both models, so it needs one tokenizer")
    for attribute in ("bos_token_id", "eos_token_id"):
        if getattr(source_tokenizer, attribute) != getattr(target_tokenizer, attribute):
            raise ForgeError(f"the tokenizers of {source} and {target} have different {attribute} "
                             f"({getattr(source_tokenizer, attribute)} and {getattr(target_tokenizer, attribute)})")


def calibration_batches(path: str, tokenizer, settings: CalibrationSettings) -> list:
    """Tokenize the calibration file and return padded batches holding about `calib_tokens` tokens."""
    from llmforge.data import collate, read_records, resolve_data_path, to_examples, tokenize_examples

    records = read_records(resolve_data_path(path))
    examples = tokenize_examples(to_examples(records, tokenizer), tokenizer, max_length=settings.max_length)
    kept, tokens = [], 0
    for example in examples:
        if tokens >= settings.calib_tokens:
            break
        kept.append(example)
        tokens += len(example.input_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate(kept[start:start + settings.batch_size], pad) for start in range(0, len(kept), settings.batch_size)]


def _gains(model, names) -> dict[str, Any]:
    import torch

    modules = dict(model.named_modules())
    gains = {}
    for name in names:
        norm = norm_of(name)
        if norm is not None and norm in modules:
            gain = modules[norm].weight.detach().to(torch.float64)
            if bool((gain.abs() < 1e-12).any()):
                raise ForgeError(f"the RMSNorm gain {norm}.weight has zero entries, so the inputs of {name} "
                                 "cannot be mapped to gain-free coordinates")
            gains[name] = gain
    return gains


def _run_pass(model, batch, names, output_side: str, on_input, on_output) -> None:
    """Run one forward (and, for gradients, backward) pass with hooks on the named linear layers.

    `on_input(name, x)` and `on_output(name, value)` get the rows of the real (non-padding) tokens
    in the model's dtype. No input is reported for lm_head's output side.
    """
    import torch

    modules = linear_layers(model)
    mask = batch.attention_mask.bool()
    handles = []

    def hook(name):
        def forward_hook(module, inputs, output):
            on_input(name, inputs[0].detach()[mask])
            if name == LM_HEAD:
                return
            if output_side == "outputs":
                on_output(name, output.detach()[mask])
            else:
                output.register_hook(lambda grad: on_output(name, grad[mask]))
        return forward_hook

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        embeddings = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(output_side == "gradients")
        logits = model(inputs_embeds=embeddings, attention_mask=batch.attention_mask).logits
        if output_side == "gradients":
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     batch.labels[:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()


def _accumulate(sums: dict, key: str, target_rows, source_rows, whiten: bool) -> None:
    import torch

    if key not in sums:
        sums[key] = torch.zeros(target_rows.shape[1], source_rows.shape[1], dtype=torch.float64)
        sums[key + ".norm_source"] = torch.zeros(1, dtype=torch.float64)
        sums[key + ".norm_target"] = torch.zeros(1, dtype=torch.float64)
        if whiten:
            sums[key + ".auto_source"] = torch.zeros(source_rows.shape[1], source_rows.shape[1], dtype=torch.float64)
            sums[key + ".auto_target"] = torch.zeros(target_rows.shape[1], target_rows.shape[1], dtype=torch.float64)
    sums[key] += target_rows.T @ source_rows
    sums[key + ".norm_source"] += source_rows.square().sum()
    sums[key + ".norm_target"] += target_rows.square().sum()
    if whiten:
        sums[key + ".auto_source"] += source_rows.T @ source_rows
        sums[key + ".auto_target"] += target_rows.T @ target_rows


def accumulate_statistics(source_model, target_model, batches, matched: dict[str, str],
                          output_side: str, whiten: bool = False) -> dict[str, Any]:
    """Return the summed cross-covariances of every matched layer pair over all batches.

    Keys: "in/TARGET_LAYER" (one per shared input) and "out/TARGET_LAYER" (none for lm_head, whose
    output map is the identity on the shared vocabulary), each [d_target, d_source] in float64, with
    ".norm_source" and ".norm_target" sums of squares beside them, and "tokens". With `whiten`,
    each key also gets the auto-covariances ".auto_source" [d_source, d_source] and ".auto_target".

    Per batch, the source pass keeps its rows in the model's dtype, and the target pass adds each
    product to the sums as soon as its hook fires. So only one model's rows are held at a time.
    Rows are converted to float64 (exactly) before the products, and the inputs of norm readers are
    divided by their gain.
    """
    import torch

    for model in (source_model, target_model):
        model.requires_grad_(False)
    input_layers = sorted({input_key(name) for name in matched})
    output_layers = sorted(name for name in matched if name != LM_HEAD)
    source_gains = _gains(source_model, [matched[name] for name in input_layers])
    target_gains = _gains(target_model, input_layers)
    source_input_layers = {matched[name] for name in input_layers}
    source_layers = sorted(source_input_layers | {matched[name] for name in output_layers})
    sums: dict[str, Any] = {"tokens": torch.zeros(1, dtype=torch.float64)}

    def gain_free(rows, name, gains):
        rows = rows.to(torch.float64)
        return rows / gains[name] if name in gains else rows

    for batch in batches:
        source_inputs, source_outputs = {}, {}

        def keep_input(name, x):
            if name in source_input_layers:
                source_inputs[name] = x

        _run_pass(source_model, batch, source_layers, output_side, keep_input, source_outputs.__setitem__)

        def add_input(name, x):
            if name in input_layers:
                _accumulate(sums, f"in/{name}", gain_free(x, name, target_gains),
                            gain_free(source_inputs[matched[name]], matched[name], source_gains), whiten)

        def add_output(name, value):
            if name in matched:
                _accumulate(sums, f"out/{name}", value.to(torch.float64),
                            source_outputs[matched[name]].to(torch.float64), whiten)

        _run_pass(target_model, batch, sorted(set(input_layers) | set(output_layers)), output_side,
                  add_input, add_output)
        sums["tokens"] += int(batch.attention_mask.sum())
    return sums


def calibration_statistics(source, target, calib: str, settings: CalibrationSettings,
                           *, cache) -> tuple[dict[str, Any], dict[str, str]]:
    """Return the statistics of `accumulate_statistics` and the layer matching, cached by digests and settings.

    `source` and `target` are llmforge.models.LoadedModel; the tokenizers must match.
    """
    import dataclasses

    from llmforge.cache import CacheKey
    from llmforge.checkpoint import file_digest
    from llmforge.data import resolve_data_path

    check_same_tokenizer(source.tokenizer, target.tokenizer, source.reference, target.reference)
    matched = match_linear_layers(linear_layers(source.model), linear_layers(target.model), settings.layer_map)
    params = dataclasses.asdict(settings)
    if settings.layer_map != "proportional":
        params["layer_map"] = file_digest(settings.layer_map)
    key = CacheKey(CACHE_KIND, inputs={"source": source.digest, "target": target.digest,
                                       "data": file_digest(resolve_data_path(calib))}, params=params)

    # NOTE: the float64 sums take 8 d_B d_A bytes per map, about 2.2 GB for smollm2-135m. Saving them
    # to the cache copies them once more, so peak memory grows with the square of the widths.
    def compute() -> dict[str, Any]:
        batches = calibration_batches(calib, source.tokenizer, settings)
        logger.info("calibrating on %d batches (%d tokens)", len(batches), sum(batch.tokens for batch in batches))
        return accumulate_statistics(source.model, target.model, batches, matched, settings.output_side,
                                     settings.whiten)

    return cache.get_or_compute(key, compute), matched
