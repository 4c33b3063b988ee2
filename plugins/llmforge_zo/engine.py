"""The built-in scoring backend: all probed states of a step in one batched forward of a frozen model.

`TorchScorer` swaps every trained linear module for a `StateLinear`, which computes
x W^T + (x down^T) up^T with a different low-rank delta for each block of rows. The batch is
repeated once per state, state-major, so row block s of every layer is computed under state s.
One forward of S * R rows then scores S states. Scoring runs under `torch.inference_mode` in the chosen dtype
(bf16 by default) and reads logits only where the loss needs them, in fp32. Nothing is written
into the base weights while scoring; `set_weight` changes them between steps (after a LoZO fold
or an exact MeZO perturbation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmforge.errors import ForgeError

from llmforge_zo.objective import OutputHead, ScoringBatch, StateScores, output_head, state_losses
from llmforge_zo.packing import DEFAULT_BIN_TOKENS, pack
from llmforge_zo.states import StackedStates

ALL_LINEAR = "all-linear"


class StateLinear(torch.nn.Module):
    """A frozen linear layer plus one low-rank delta per block of rows, set before each forward."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.down_t: torch.Tensor | None = None
        self.up_t: torch.Tensor | None = None
        self.states = 1

    def set_delta(self, down: torch.Tensor | None, up: torch.Tensor | None, states: int) -> None:
        """Set the deltas: down r x in (shared) or S x r x in, up S x out x r; None clears them."""
        self.states = states
        if down is None:
            self.down_t = self.up_t = None
            return
        dtype = self.weight.dtype
        self.down_t = down.to(dtype).transpose(-1, -2).contiguous()
        self.up_t = up.to(dtype).transpose(-1, -2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.down_t is None:
            return y

        by_state = x.reshape(self.states, -1, x.shape[-1])
        if self.down_t.dim() == 2:
            hidden = by_state @ self.down_t
        else:
            hidden = torch.bmm(by_state, self.down_t)
        return y + torch.bmm(hidden, self.up_t).view_as(y)


def find_targets(model, target_modules: str = ALL_LINEAR) -> list[str]:
    """Return the names of the linear modules to train: all inside the decoder, or those named.

    "all-linear" takes every nn.Linear except the output layer (the LM head); a comma-separated
    list such as "q_proj,v_proj" takes modules whose last name component is listed.
    """
    head = model.get_output_embeddings()
    linear = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not head]
    if target_modules == ALL_LINEAR:
        chosen = linear
    else:
        requested = {part.strip() for part in target_modules.split(",") if part.strip()}
        chosen = [name for name in linear if name.rsplit(".", 1)[-1] in requested]
    if not chosen:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ForgeError(f"--target-modules {target_modules!r} matches no linear module of the model; "
                         f"its linear modules are {', '.join(kinds)}")
    return chosen


class TorchScorer:
    """Scores stacked adapter states on a frozen Hugging Face causal LM (the "torch" backend)."""

    name = "torch"

    def __init__(self, model, targets: list[str], dtype: torch.dtype = torch.bfloat16, *, packing: bool = True,
                 bin_tokens: int = DEFAULT_BIN_TOKENS):
        self.dtype = dtype
        self.packing = packing
        self.bin_tokens = bin_tokens
        modules = dict(model.named_modules())
        # In fp32 these are the layers' own weight tensors, so a method that updates them in
        # place updates the scorer too. In bf16 the cast below gives the layers new tensors.
        self.initial = {name: modules[name].weight.detach().float() for name in targets}

        model.requires_grad_(False)
        model.to(dtype).eval()
        self.layers: dict[str, StateLinear] = {}
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            layer = StateLinear(modules[name])
            setattr(modules[parent_name] if parent_name else model, child, layer)
            self.layers[name] = layer

        self.model = model
        self.body = getattr(model, model.base_model_prefix)
        head = output_head(model)
        self.head = OutputHead(head.weight.detach().float(), head.softcap)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Return (out_features, in_features) of every trained module."""
        return {name: (layer.out_features, layer.in_features) for name, layer in self.layers.items()}

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Overwrite the frozen weight of module `name` (cast to the scoring dtype)."""
        layer_weight = self.layers[name].weight.data
        if weight.data_ptr() != layer_weight.data_ptr():
            layer_weight.copy_(weight)

    def score(self, states: StackedStates, batch: ScoringBatch) -> StateScores:
        """Return the loss of every state on `batch`, from one forward of all states' rows."""
        count = states.count
        try:
            for name, layer in self.layers.items():
                delta = states.deltas.get(name)
                layer.set_delta(None if delta is None else delta.down, None if delta is None else delta.up, count)
            with torch.inference_mode():
                if self.packing:
                    return self._score_packed(batch, count)
                return self._score_padded(batch, count)
        finally:
            for layer in self.layers.values():
                layer.set_delta(None, None, 1)

    def _score_padded(self, batch: ScoringBatch, count: int) -> StateScores:
        input_ids = batch.input_ids.repeat(count, 1)
        attention_mask = batch.attention_mask.repeat(count, 1)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return state_losses(batch, hidden.reshape(count, -1, hidden.shape[-1]), self.head)

    def _score_packed(self, batch: ScoringBatch, count: int) -> StateScores:
        # Filler tokens of a bin are masked out and never read, so any id will do.
        packed = pack(batch.input_ids, batch.attention_mask, pad_id=0, max_tokens=self.bin_tokens)
        mask = packed.attention_mask(self.dtype)
        hidden = self.body(input_ids=packed.input_ids.repeat(count, 1),
                           position_ids=packed.position_ids.repeat(count, 1),
                           attention_mask=mask.repeat(count, 1, 1, 1)).last_hidden_state
        return state_losses(batch, hidden.reshape(count, -1, hidden.shape[-1]), self.head, packed.locate)


def torch_backend(model, targets: list[str], dtype: torch.dtype, **options) -> TorchScorer:
    """Build the built-in engine's scorer; this is the factory that `forge_zo_backends` registers as "torch"."""
    return TorchScorer(model, targets, dtype, **options)
