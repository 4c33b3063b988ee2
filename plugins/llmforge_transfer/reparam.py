"""Exact re-parameterisations of Llama-style models, the test targets of `forge transfer`.

A re-parameterised target computes the same logits as its source, but its weights live in other
coordinates, so the task vector that transfer must find is known exactly. The construction:

1. Fold every RMSNorm gain into the linear layers that read the norm's output (q/k/v after
   input_layernorm, gate/up after post_attention_layernorm, lm_head after the final norm) and set
   the gains to 1. The LM head is untied from the embeddings first, because only the head takes
   the final norm's gain.
2. Rotate the residual stream by a seeded random orthogonal matrix Q: a target hidden state is
   h_B = Q h_A. Every matrix that writes the stream (embedding rows, o_proj, down_proj) becomes
   Q W, so the embedding matrix becomes E Q^T. Every matrix that reads it (q/k/v, gate/up,
   lm_head) becomes W Q^T. RMSNorm with unit gains commutes with Q because Q keeps the norm.
3. Optionally permute the MLP units (rows of gate/up, columns of down) and the attention heads.
   Head permutations keep grouped-query attention consistent: the key/value heads are permuted,
   each query head moves with its key/value group, and the query heads inside a group are
   shuffled too. Whole heads move, so the rotary pairs inside each head stay intact.

`reparameterise(state, spec)` applies the construction to a state dict, and
`map_task_vector(state, vector, spec)` returns reparameterise(A + tau) - reparameterise(A), the
exact task vector of the target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.")
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
ATTENTION_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
# The largest logit difference that `check_same_logits` accepts, relative to the largest logit.
LOGIT_TOLERANCE = 1e-4


@dataclass
class Reparameterisation:
    """The random parts of one re-parameterisation, drawn once from a seed and shared by model and vector."""

    rotation: Any
    mlp_permutations: list[Any]
    kv_head_permutations: list[Any]
    query_head_permutations: list[Any]
    num_layers: int


def llama_shape(config) -> dict[str, int]:
    """Return the sizes the re-parameterisation needs from a Llama config; ForgeError for other architectures."""
    if getattr(config, "model_type", None) not in {"llama", "mistral", "qwen2"}:
        raise ForgeError(f"make-test-target supports Llama-style models only, not model_type "
                         f"{getattr(config, 'model_type', None)!r}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "tied": int(bool(getattr(config, "tie_word_embeddings", False)))}


def draw_reparameterisation(shape: dict[str, int], *, seed: int, permute_mlp: bool,
                            permute_heads: bool) -> Reparameterisation:
    """Draw a Haar-random orthogonal Q (QR of a Gaussian, signs fixed) and the optional permutations."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(shape["hidden"], shape["hidden"], generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    rotation = q * torch.sign(torch.diagonal(r)).unsqueeze(0)

    group = shape["heads"] // shape["kv_heads"]
    mlp, kv, query = [], [], []
    for _ in range(shape["layers"]):
        mlp.append(torch.randperm(shape["intermediate"], generator=generator) if permute_mlp
                   else torch.arange(shape["intermediate"]))
        if permute_heads:
            kv.append(torch.randperm(shape["kv_heads"], generator=generator))
            query.append(torch.stack([torch.randperm(group, generator=generator) for _ in range(shape["kv_heads"])]))
        else:
            kv.append(torch.arange(shape["kv_heads"]))
            query.append(torch.arange(group).repeat(shape["kv_heads"], 1))
    return Reparameterisation(rotation, mlp, kv, query, shape["layers"])


def _head_rows(head_order, head_dim: int):
    """Expand an order of heads into the order of their rows (head_dim rows per head)."""
    import torch

    return (head_order.unsqueeze(1) * head_dim + torch.arange(head_dim).unsqueeze(0)).reshape(-1)


def _query_head_order(kv_order, query_order):
    """Old query-head index of each new query head: new group j contains old group kv_order[j], shuffled."""
    group = query_order.shape[1]
    return (kv_order.unsqueeze(1) * group + query_order).reshape(-1)


def _fold_and_rotate_readers(state: dict, prefix: str, readers, gain, rotation) -> None:
    for reader in readers:
        name = f"{prefix}{reader}.weight"
        state[name] = state[name] * gain.unsqueeze(0) @ rotation.T


def _reparameterise_layer(state: dict, index: int, spec: Reparameterisation, shape: dict[str, int]) -> None:
    import torch

    prefix = f"model.layers.{index}."
    rotation = spec.rotation
    attention_gain = state[f"{prefix}input_layernorm.weight"]
    mlp_gain = state[f"{prefix}post_attention_layernorm.weight"]

    _fold_and_rotate_readers(state, prefix, ATTENTION_READERS, attention_gain, rotation)
    _fold_and_rotate_readers(state, prefix, MLP_READERS, mlp_gain, rotation)
    state[f"{prefix}input_layernorm.weight"] = torch.ones_like(attention_gain)
    state[f"{prefix}post_attention_layernorm.weight"] = torch.ones_like(mlp_gain)
    state[f"{prefix}self_attn.o_proj.weight"] = rotation @ state[f"{prefix}self_attn.o_proj.weight"]
    state[f"{prefix}mlp.down_proj.weight"] = rotation @ state[f"{prefix}mlp.down_proj.weight"]

    units = spec.mlp_permutations[index]
    state[f"{prefix}mlp.gate_proj.weight"] = state[f"{prefix}mlp.gate_proj.weight"][units]
    state[f"{prefix}mlp.up_proj.weight"] = state[f"{prefix}mlp.up_proj.weight"][units]
    state[f"{prefix}mlp.down_proj.weight"] = state[f"{prefix}mlp.down_proj.weight"][:, units]

    kv_rows = _head_rows(spec.kv_head_permutations[index], shape["head_dim"])
    query_rows = _head_rows(_query_head_order(spec.kv_head_permutations[index], spec.query_head_permutations[index]),
                            shape["head_dim"])
    state[f"{prefix}self_attn.q_proj.weight"] = state[f"{prefix}self_attn.q_proj.weight"][query_rows]
    state[f"{prefix}self_attn.k_proj.weight"] = state[f"{prefix}self_attn.k_proj.weight"][kv_rows]
    state[f"{prefix}self_attn.v_proj.weight"] = state[f"{prefix}self_attn.v_proj.weight"][kv_rows]
    state[f"{prefix}self_attn.o_proj.weight"] = state[f"{prefix}self_attn.o_proj.weight"][:, query_rows]


def reparameterise(state: dict[str, "torch.Tensor"], spec: Reparameterisation,
                   shape: dict[str, int]) -> dict[str, "torch.Tensor"]:
    """Return the re-parameterised state dict in float64, with an untied `lm_head.weight`.

    For a tied source the head starts as a copy of the embedding, whatever `lm_head.weight` holds. Biases of q/k/v (Qwen2) are permuted with their rows; any other tensor is copied unchanged.
    """
    import torch

    state = {name: tensor.to(torch.float64).clone() for name, tensor in state.items()}
    if shape["tied"] or LM_HEAD not in state:
        state[LM_HEAD] = state[EMBEDDING].clone()
    rotation = spec.rotation

    for index in range(spec.num_layers):
        _reparameterise_layer(state, index, spec, shape)
        _permute_biases(state, index, spec, shape)

    final_gain = state[FINAL_NORM]
    state[LM_HEAD] = state[LM_HEAD] * final_gain.unsqueeze(0) @ rotation.T
    state[FINAL_NORM] = torch.ones_like(final_gain)
    state[EMBEDDING] = state[EMBEDDING] @ rotation.T
    return state


def _permute_biases(state: dict, index: int, spec: Reparameterisation, shape: dict[str, int]) -> None:
    prefix = f"model.layers.{index}.self_attn."
    kv_rows = _head_rows(spec.kv_head_permutations[index], shape["head_dim"])
    query_rows = _head_rows(_query_head_order(spec.kv_head_permutations[index], spec.query_head_permutations[index]),
                            shape["head_dim"])
    for name, rows in (("q_proj", query_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        if f"{prefix}{name}.bias" in state:
            state[f"{prefix}{name}.bias"] = state[f"{prefix}{name}.bias"][rows]
    if f"{prefix}o_proj.bias" in state:
        state[f"{prefix}o_proj.bias"] = spec.rotation @ state[f"{prefix}o_proj.bias"]


def map_task_vector(state: dict[str, "torch.Tensor"], vector: dict[str, "torch.Tensor"],
                    spec: Reparameterisation, shape: dict[str, int]) -> dict[str, "torch.Tensor"]:
    """Return the exact target task vector reparameterise(A + tau) - reparameterise(A), in float64.

    A tied source has no `lm_head.weight`, so an embedding update of tau also updates the head, and
    the result has an `lm_head.weight` entry. Gain updates are folded into the readers' updates,
    so the target's norm gains get zero updates.
    """
    import torch

    tuned = {name: tensor.to(torch.float64) + vector[name].to(torch.float64) if name in vector
             else tensor for name, tensor in state.items()}
    unknown = sorted(set(vector) - set(state))
    if unknown:
        raise ForgeError(f"the task vector has tensor {unknown[0]!r}, which the source model does not have")
    base_target = reparameterise(state, spec, shape)
    tuned_target = reparameterise(tuned, spec, shape)
    return {name: tuned_target[name] - base_target[name] for name in base_target}


# Building and checking a target model


def check_same_logits(source_model, target_model, input_ids, *, tolerance: float = LOGIT_TOLERANCE) -> float:
    """Return the max logit difference relative to the max logit; ForgeError when it exceeds `tolerance`."""
    import torch

    with torch.no_grad():
        source_logits = source_model(input_ids=input_ids).logits.double()
        target_logits = target_model(input_ids=input_ids).logits.double()
    difference = float((source_logits - target_logits).abs().max() / source_logits.abs().max().clamp_min(1e-30))
    if not difference <= tolerance:
        raise ForgeError(f"the re-parameterised model's logits differ from the source's by {difference:.3g} "
                         f"(relative to the largest logit), more than {tolerance:g}; the model is not a "
                         "Llama-style model that this construction covers")
    return difference


def build_target_model(source_model, spec: Reparameterisation, shape: dict[str, int]):
    """Return a model of the source's class and dtype with the re-parameterised weights and untied embeddings."""
    import copy

    config = copy.deepcopy(source_model.config)
    config.tie_word_embeddings = False
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False
    dtype = next(source_model.parameters()).dtype
    target = type(source_model)(config).to(dtype).eval()

    state = reparameterise(source_model.state_dict(), spec, shape)
    missing, unexpected = target.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()},
                                                 strict=False)
    if unexpected or [name for name in missing if not name.endswith("rotary_emb.inv_freq")]:
        raise ForgeError(f"the re-parameterised weights do not fit the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return target


CHECK_PROMPTS = ("The capital of France is", "def add(a, b):\n    return", "Once upon a time, there")


def make_test_target(model: str, output: Path, *, seed: int = 0, permute_mlp: bool = False,
                     permute_heads: bool = False, overwrite: bool = False, cache=None) -> dict[str, Any]:
    """Write an exact re-parameterisation of `model` to `output` (atomically) after checking its logits.

    Returns the run record, which is also written as forge_run.json.
    """
    from llmforge.checkpoint import RUN_RECORD_NAME, atomic_directory, run_record, write_json
    from llmforge.models import load_model, stored_reference

    loaded = load_model(model, cache=cache)
    if loaded.is_adapter:
        raise ForgeError(f"{model} is a PEFT adapter; make-test-target needs a whole model")
    shape = llama_shape(loaded.model.config)
    spec = draw_reparameterisation(shape, seed=seed, permute_mlp=permute_mlp, permute_heads=permute_heads)
    target = build_target_model(loaded.model, spec, shape)

    input_ids = loaded.tokenizer(list(CHECK_PROMPTS), return_tensors="pt", padding=True)["input_ids"]
    difference = check_same_logits(loaded.model, target, input_ids)

    record = run_record(schema="llmforge.transfer.test-target/1", source=stored_reference(model), source_digest=loaded.digest, seed=seed,
                        permute_mlp=permute_mlp, permute_heads=permute_heads,
                        max_relative_logit_difference=difference, prompts=list(CHECK_PROMPTS))
    with atomic_directory(output, overwrite=overwrite) as directory:
        target.save_pretrained(str(directory))
        loaded.tokenizer.save_pretrained(str(directory))
        write_json(directory / RUN_RECORD_NAME, record)
    return record
