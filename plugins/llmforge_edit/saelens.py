"""SAEs on disk in the SAELens layout: one directory per hook with cfg.json and sae_weights.safetensors."""

from __future__ import annotations

from dataclasses import dataclass

from llmforge.errors import ForgeError

from llmforge_edit.sae import ARCHITECTURES, SparseAutoencoder


SAE_CONFIG_NAME = "cfg.json"
SAE_WEIGHTS_NAME = "sae_weights.safetensors"
HOOK_LAYER_PATTERN = r"^blocks\.(\d+)\."


def saelens_config(sae: SparseAutoencoder, *, layer: int, model_name: str, context_size: int, prepend_bos: bool,
                   dataset_path: str) -> dict:
    """Return a cfg.json for a TopK SAE on `blocks.LAYER.hook_resid_post`, in SAELens's pre-6.0 flat layout.

    SAELens 6 reads this layout through its pre-6.0 conversion: it takes k from
    activation_fn_kwargs when architecture is "topk" and moves model_name, hook_name and the
    data keys into its metadata. The flat keys are the ones SAELens 5 requires, hook_layer included.
    """
    from llmforge_edit.activations import hook_name

    return {
        "architecture": "topk", "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": sae.k}, "k": sae.k,
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "rescale_acts_by_decoder_norm": False,
        "finetuning_scaling_factor": False, "normalize_activations": "none",
        "model_name": model_name, "hook_name": hook_name(layer), "hook_layer": layer, "hook_head_index": None,
        "context_size": context_size, "prepend_bos": prepend_bos, "dataset_path": dataset_path,
        "dataset_trust_remote_code": False, "sae_lens_training_version": None, "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
    }


def write_sae(directory, sae: SparseAutoencoder, config: dict) -> None:
    """Write cfg.json and sae_weights.safetensors (float32, SAELens tensor names) into `directory`."""
    from pathlib import Path

    from llmforge.checkpoint import save_tensors, write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / SAE_WEIGHTS_NAME, {name: tensor.float() for name, tensor in sae.tensors().items()})
    write_json(directory / SAE_CONFIG_NAME, config)


@dataclass
class StoredSAE:
    """An SAE read from a SAELens directory, with the layer and hook it was trained on."""

    directory: str
    sae: SparseAutoencoder
    config: dict
    layer: int | None
    hook_name: str | None


def read_sae(directory) -> StoredSAE:
    """Read one SAELens directory (cfg.json + sae_weights.safetensors), flat pre-6.0 or nested 6.x config."""
    import json
    import re
    from pathlib import Path

    directory = Path(directory)
    try:
        raw = json.loads((directory / SAE_CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ForgeError(f"cannot read the SAE config {directory / SAE_CONFIG_NAME}: {error}") from None
    config = {**(raw.get("metadata") or {}), **raw}
    architecture = _architecture(config, directory)
    sae = _read_weights(directory, config, architecture)

    name = config.get("hook_name") or config.get("hook_point")
    layer = config.get("hook_layer", config.get("hook_point_layer"))
    if not isinstance(layer, int) and isinstance(name, str) and re.match(HOOK_LAYER_PATTERN, name):
        layer = int(re.match(HOOK_LAYER_PATTERN, name).group(1))
    return StoredSAE(str(directory), sae, raw, layer if isinstance(layer, int) else None, name)


def _architecture(config: dict, directory) -> str:
    architecture = config.get("architecture", "standard")
    activation = config.get("activation_fn_str") or config.get("activation_fn")
    if architecture == "standard" and activation == "topk":
        architecture = "topk"  # SAELens 5 stored TopK SAEs as "standard" with a topk activation function
    if architecture not in ARCHITECTURES:
        raise ForgeError(f"{directory}: SAE architecture {architecture!r} is not supported; "
                         f"forge reads {', '.join(ARCHITECTURES)}")
    if config.get("normalize_activations") not in (None, "none", False):
        raise ForgeError(f"{directory}: normalize_activations={config['normalize_activations']!r} needs a scaling "
                         "factor that cfg.json does not contain; fold it into the weights first")
    return architecture


def _read_weights(directory, config: dict, architecture: str) -> SparseAutoencoder:
    from llmforge.checkpoint import load_tensors

    tensors = load_tensors(directory / SAE_WEIGHTS_NAME)
    required = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture == "jumprelu" else [])
    missing = [name for name in required if name not in tensors]
    if missing:
        raise ForgeError(f"{directory / SAE_WEIGHTS_NAME} lacks the tensors {', '.join(missing)}; "
                         "an SAELens file names them W_enc, b_enc, W_dec, b_dec")
    d_in, d_sae = config.get("d_in"), config.get("d_sae")
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ForgeError(f"{directory}: {name} has shape {tuple(tensors[name].shape)}, but cfg.json's "
                             f"d_in={d_in} and d_sae={d_sae} give {shape}")

    k = config.get("k") or (config.get("activation_fn_kwargs") or {}).get("k")
    if architecture == "topk" and not isinstance(k, int):
        raise ForgeError(f"{directory}: a topk SAE needs k in cfg.json (k or activation_fn_kwargs.k)")
    if architecture == "topk" and not 1 <= k <= d_sae:
        raise ForgeError(f"{directory}: cfg.json sets k={k}, but a topk SAE keeps from 1 to d_sae={d_sae} "
                         "features per token; fix k in cfg.json")
    return SparseAutoencoder(
        W_enc=tensors["W_enc"].float(), b_enc=tensors["b_enc"].float(), W_dec=tensors["W_dec"].float(),
        b_dec=tensors["b_dec"].float(), architecture=architecture, k=k if architecture == "topk" else None,
        threshold=tensors["threshold"].float() if architecture == "jumprelu" else None,
        apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=bool(config.get("rescale_acts_by_decoder_norm", False)),
    )


def read_sae_set(path, shape=None) -> list[StoredSAE]:
    """Read an SAE directory, or a directory of them (one per layer), sorted by layer.

    With `shape` (a ModelShape), raise ForgeError when an SAE's d_in differs from the model's
    hidden size or its layer does not exist in the model.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_dir():
        raise ForgeError(f"SAE directory not found: {path}")
    directories = [path] if (path / SAE_CONFIG_NAME).is_file() else sorted(
        child for child in path.iterdir() if (child / SAE_CONFIG_NAME).is_file())
    if not directories:
        raise ForgeError(f"{path} contains no SAE: expected {SAE_CONFIG_NAME} in it or in its subdirectories")
    stored = sorted((read_sae(directory) for directory in directories),
                    key=lambda item: (item.layer is None, item.layer or 0, item.directory))
    for item in stored if shape is not None else []:
        where = f"the SAE for layer {item.layer}" if item.layer is not None else f"the SAE in {item.directory}"
        if item.sae.d_in != shape.hidden_size:
            raise ForgeError(f"{where} ({item.directory}) reads activations of width d_in={item.sae.d_in}, but the "
                             f"model's hidden size is {shape.hidden_size}; use SAEs trained on this model")
        if item.layer is not None and not 0 <= item.layer < shape.num_layers:
            raise ForgeError(f"{where} ({item.directory}) is for layer {item.layer}, but the model has "
                             f"{shape.num_layers} decoder layers, numbered 0 to {shape.num_layers - 1}")
    return stored
