"""Padded batches of token ids for scoring, shared by the three task kinds."""

from __future__ import annotations

import math
from typing import Iterator, Sequence


def batches_by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Yield index batches of at most `batch_size`, longest sequences first, so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def left_padded(sequences: Sequence[Sequence[int]], pad_token_id: int, device="cpu"):
    """Stack token-id lists with padding on the left; return input ids, attention mask and position ids.

    Left padding puts the last token of every row at the same column, so the logits of a row's final
    tokens are the batch's last columns. The position ids count real tokens only, which keeps each
    row's positions the same as when it runs alone.
    """
    import torch

    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, width - len(sequence):] = 1

    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def pad_token_id(tokenizer) -> int:
    """Return the tokenizer's padding id, else its end-of-sequence id; padding is masked out either way."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def model_device(model):
    """Return the device of the model's first parameter."""
    return next(model.parameters()).device


def proportion_stderr(p: float, n: int) -> float:
    """Standard error of a proportion p measured on n examples: sqrt(p (1 - p) / n)."""
    if n == 0:
        return float("nan")
    return math.sqrt(p * (1.0 - p) / n)


def context_limit(model, default: int = 2048) -> int:
    """Return the model's maximum sequence length (max_position_embeddings in its config)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or default)
