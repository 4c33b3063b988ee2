"""Residual-stream activations of every decoder layer, collected in one pass and cached per layer.

The hook point is the output of decoder block L, before the next block's input norm. That is
TransformerLens's and SAELens's ``blocks.L.hook_resid_post``. In Hugging Face terms it is
``output_hidden_states=True``'s ``hidden_states[L + 1]`` for every layer but the last: HF returns
the last layer's output after the model's final norm, while these activations are taken before it.

Activations are stored in bfloat16, half the size of float32. bfloat16 keeps float32's exponent
range, so the large outlier dimensions of residual streams cannot overflow as they could in
float16. Its 8-bit mantissa adds a relative error of at most 2^-9 per value, far below an SAE's
reconstruction error.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ACTIVATION_KIND = "edit-sae-activations"
# Bump when the collected tensors change for the same inputs, so old cache entries are not reused.
# Version 3 splits a long text into windows of max_length tokens; version 2 cut it to its first window.
ACTIVATION_VERSION = 3
HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"
MODEL_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def hook_name(layer: int) -> str:
    """Return the SAELens hook name of the residual stream after decoder block `layer`."""
    return HOOK_TEMPLATE.format(layer=layer)


@dataclass
class ModelShape:
    """The widths an SAE must match: residual width and number of decoder layers."""

    hidden_size: int
    num_layers: int


def model_shape(reference: str, cache=None) -> ModelShape:
    """Read hidden_size and num_hidden_layers from a model's config.json without loading its weights."""
    from llmforge.models import resolve_model_dir

    config_path = resolve_model_dir(reference, cache=cache) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ForgeError(f"cannot read the model config {config_path}: {error}") from None
    config = config.get("text_config", config)  # multimodal configs nest the language model's settings
    try:
        return ModelShape(int(config["hidden_size"]), int(config["num_hidden_layers"]))
    except (KeyError, TypeError, ValueError):
        raise ForgeError(f"{config_path} has no hidden_size and num_hidden_layers; "
                         "SAEs need a decoder-only transformer") from None


def parse_layers(spec: str | None, num_layers: int, *, option: str = "--layers") -> list[int]:
    """Parse a layer list ("all", "3", "0,4,8" or ranges such as "2-5") into sorted layer indices.

    `option` names the flag in error messages. Raises ForgeError for bad syntax, a reversed range
    or an index outside [0, num_layers).
    """
    if spec is None or spec.strip().lower() == "all":
        return list(range(num_layers))
    layers: set[int] = set()
    for part in (piece.strip() for piece in spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ForgeError(f"invalid {option} {spec!r}: use all, numbers such as 0,4,8 or ranges such as 2-5")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first > last:
            raise ForgeError(f"invalid {option} range {part!r}: the start is after the end")
        if last >= num_layers:
            raise ForgeError(f"layer {last} in {option} is out of range: the model has {num_layers} "
                             f"decoder layers, numbered 0 to {num_layers - 1}")
        layers.update(range(first, last + 1))
    return sorted(layers)


# Reading the text


@dataclass
class TextSource:
    """A data file and how its records become text: the `forge finetune` formats and column mapping."""

    data: str
    fmt: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    completion_template: str | None = None

    def digest(self) -> str:
        from llmforge.checkpoint import file_digest
        from llmforge.data import resolve_data_path

        return file_digest(resolve_data_path(self.data))

    def check(self) -> None:
        """Raise ForgeError unless the data file exists, has a known file format and contains records.

        Reads the file but loads no tokenizer, so a bad data set fails before any model runs.
        """
        from llmforge.data import read_records, resolve_data_path
        from llmforge.readers import READ_FORMATS

        path = resolve_data_path(self.data)
        suffix = path.suffix.lower().lstrip(".")
        if suffix not in (*READ_FORMATS, "text"):
            raise ForgeError(f"cannot tell the file format of {self.data} from its suffix {path.suffix!r}; rename "
                             f"it to one of: {', '.join('.' + name for name in READ_FORMATS)} (.txt for plain text)")
        read_records(path)

    def texts(self, tokenizer) -> list[str]:
        """Return one text per record: the example's prompt followed by its completion.

        Records with an empty completion, which training data rejects, are kept as their prompt.
        """
        from llmforge.data import read_records, resolve_data_path, to_examples

        records = read_records(resolve_data_path(self.data))
        try:
            examples = to_examples(records, tokenizer, **self._options())
        except ForgeError as error:
            # NOTE: to_examples has no option to allow empty completions, so its message is matched.
            if "empty completion" not in str(error):
                raise
            examples = [self._example(records, index, tokenizer) for index in range(len(records))]
        if not any(example.prompt + example.completion for example in examples):
            raise ForgeError(f"every record of {self.data} renders to an empty text; check the file and --format")
        return [example.prompt + example.completion for example in examples if example.prompt + example.completion]

    def _options(self) -> dict[str, Any]:
        return {"fmt": self.fmt, "columns": self.columns, "prompt_template": self.prompt_template,
                "completion_template": self.completion_template}

    def cache_params(self) -> dict[str, Any]:
        """Return the settings that change the text, for activation cache keys."""
        params: dict[str, Any] = {"format": self.fmt, "columns": dict(sorted(self.columns.items()))}
        # Set only when given, so that the keys of runs without templates stay as they were.
        for name in ("prompt_template", "completion_template"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        return params

    def _example(self, records, index: int, tokenizer):
        from llmforge.data import Example, to_examples

        try:
            return to_examples(records[index:index + 1], tokenizer, **self._options())[0]
        except ForgeError as error:
            if "empty completion" not in str(error):
                raise
            # The prompt alone: render the record with a placeholder completion and drop it again.
            record = {**records[index], "output": " ", "completion": " ", "answer": " "}
            try:
                example = to_examples([record], tokenizer, **self._options())[0]
            except ForgeError as second:
                if "empty completion" not in str(second):
                    raise
                return Example("", "")  # an empty text record: nothing to collect, so it is skipped
            return Example(example.prompt, "")


def tokenize_texts(texts: Sequence[str], tokenizer, *, max_length: int, token_budget: int,
                   skip_bos: bool) -> tuple[list[list[int]], int]:
    """Tokenize texts into sequences of at most max_length tokens until `token_budget` tokens are collected.

    A text longer than max_length becomes consecutive windows, each its own sequence, so a long
    document yields all its tokens and not only the first max_length. When the tokenizer puts a
    BOS token in front of a text, every window starts with BOS, so each window has the same kind
    of first position and `skip_bos` drops the BOS activation of each. With `skip_bos`, a leading
    BOS token is not counted, because its activation is not collected. Returns the sequences and
    the number of tokens they contribute.
    """
    bos = tokenizer.bos_token_id
    sequences, total = [], 0
    for text in texts:
        for ids in _windows(list(tokenizer(text, add_special_tokens=True)["input_ids"]), bos, max_length):
            counted = len(ids) - (1 if skip_bos and ids[0] == bos else 0)
            if counted <= 0:
                continue
            sequences.append(ids)
            total += counted
            if total >= token_budget:
                return sequences, token_budget
    return sequences, total


def _windows(ids: list[int], bos: int | None, max_length: int) -> list[list[int]]:
    """Split token ids into windows of at most max_length tokens, each starting with BOS when `ids` does."""
    prefix = [bos] if bos is not None and ids[:1] == [bos] else []
    body = ids[len(prefix):]
    step = max_length - len(prefix)
    if not body:
        return [prefix] if prefix else []
    return [prefix + body[start:start + step] for start in range(0, len(body), step)]


# Collecting


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: the rest of the model is not needed."""


def decoder_stack(model):
    """Return (decoder model without the LM head, its list of decoder layers) of a causal LM or peft model."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ForgeError(f"cannot find the decoder layers of {type(base).__name__}: its decoder "
                         f"{type(decoder).__name__} has no `layers` module list")
    return decoder, layers


def collect_activations(model, sequences: Sequence[Sequence[int]], layers: Sequence[int], *, token_budget: int,
                        pad_token_id: int, bos_token_id: int | None, skip_bos: bool, batch_size: int = 8,
                        progress: Callable[[int], None] | None = None) -> dict[int, "torch.Tensor"]:
    """Run the sequences through the model and return {layer: (tokens, hidden) bfloat16 tensor}.

    Padding positions are skipped, and so is a leading BOS token with `skip_bos`. The forward
    stops after the deepest requested layer. `progress` receives the number of tokens kept per batch.
    """
    import torch

    decoder, stack = decoder_stack(model)
    deepest = max(layers)
    buffers: dict[int, torch.Tensor] = {}
    filled = 0
    batch_state: dict[str, Any] = {}

    def capture(layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            rows = hidden[batch_state["mask"]][: batch_state["take"]]
            if layer not in buffers:
                buffers[layer] = torch.empty(token_budget, rows.shape[-1], dtype=torch.bfloat16)
            buffers[layer][filled:filled + len(rows)] = rows.to(torch.bfloat16)
            if layer == deepest:
                raise _StopForward
        return hook

    # Batches of similar lengths waste little compute on padding; the order of the rows does not matter.
    by_length = sorted(sequences, key=len)
    handles = [stack[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        with torch.inference_mode():
            for start in range(0, len(by_length), batch_size):
                if filled >= token_budget:
                    break
                input_ids, attention_mask = _pad(by_length[start:start + batch_size], pad_token_id)
                mask = attention_mask.bool()
                if skip_bos and bos_token_id is not None:
                    mask[:, 0] &= input_ids[:, 0] != bos_token_id
                batch_state["mask"] = mask
                batch_state["take"] = min(int(mask.sum()), token_budget - filled)
                try:
                    decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _StopForward:
                    pass
                filled += batch_state["take"]
                if progress is not None:
                    progress(batch_state["take"])
    finally:
        for handle in handles:
            handle.remove()
    return {layer: buffers[layer][:filled] for layer in layers}


def _pad(sequences: Sequence[Sequence[int]], pad_token_id: int):
    import torch

    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


# The cache


@dataclass
class ActivationRequest:
    """The inputs of one activation collection: model, text, token budget and hook settings."""

    model: str
    source: TextSource
    tokens: int = 200_000
    max_length: int = 256
    skip_bos: bool = True
    dtype: str = "bf16"
    batch_size: int = 8
    progress: bool = True


def activation_key(model_digest: str, data_digest: str, request: ActivationRequest, layer: int):
    """Cache key of one layer's activations; every setting that changes the tensor is a parameter."""
    from llmforge.cache import CacheKey

    params = {"layer": layer, "hook": "resid_post", "tokens": request.tokens, "max_length": request.max_length,
              "skip_bos": request.skip_bos, "dtype": request.dtype, **request.source.cache_params(),
              "version": ACTIVATION_VERSION}
    return CacheKey(ACTIVATION_KIND, {"model": model_digest, "data": data_digest}, params)


def cached_activations(request: ActivationRequest, layers: Sequence[int], cache=None) -> tuple[dict[int, "torch.Tensor"], dict[str, Any]]:
    """Return {layer: activations} from the cache, running the model once for the layers not cached yet.

    Returns the tensors and a description: digests, how many layers came from the cache, tokens.
    """
    from llmforge.cache import Cache
    from llmforge.models import model_digest

    cache = cache or Cache()
    digest = model_digest(request.model, cache=cache)
    data_digest = request.source.digest()
    keys = {layer: activation_key(digest, data_digest, request, layer) for layer in layers}
    missing = [layer for layer in layers if cache.lookup(keys[layer]) is None]

    collected = _run_model(request, missing, cache) if missing else {}
    metadata = {"hook": "resid_post", "dtype": "bfloat16"}
    activations = {}
    for layer in layers:
        entry = cache.get_or_compute(keys[layer], lambda layer=layer: {"activations": collected[layer]}, metadata)
        activations[layer] = entry["activations"]
    collected.clear()

    description = {"model_digest": digest, "data_digest": data_digest, "layers_from_cache": len(layers) - len(missing),
                   "tokens": int(next(iter(activations.values())).shape[0]) if activations else 0}
    if activations and description["tokens"] < request.tokens:
        logger.warning("%s: collected %d of the %d tokens asked for by --tokens; the data set has no more text",
                       request.source.data, description["tokens"], request.tokens)
    return activations, description


def _run_model(request: ActivationRequest, layers: Sequence[int], cache) -> dict[int, "torch.Tensor"]:
    from llmforge.models import load_model

    loaded = load_model(request.model, dtype=MODEL_DTYPES[request.dtype], cache=cache)
    tokenizer = loaded.tokenizer
    texts = request.source.texts(tokenizer)
    sequences, available = tokenize_texts(texts, tokenizer, max_length=request.max_length,
                                          token_budget=request.tokens, skip_bos=request.skip_bos)
    if available < 2:
        raise ForgeError(f"{request.source.data} gives {available} usable tokens; SAE training needs more text")

    bar = _progress_bar(available, request.progress)
    try:
        return collect_activations(loaded.model, sequences, layers, token_budget=available,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                   skip_bos=request.skip_bos, batch_size=request.batch_size, progress=bar.update)
    finally:
        bar.close()


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="activations", unit="tok", disable=not enabled, leave=False)

