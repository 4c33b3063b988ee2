"""Pack a padded batch into a few dense rows, so the engine computes no padding.

Rows of a `ScoringBatch` are right-padded to the longest; short SST-2 prompts leave more than half
of a padded batch as padding. `pack` places the rows' real tokens into bins of at most
`max_tokens` tokens (first fit, longest first). Inside a bin, each example keeps its own
positions (0, 1, ...) and a block-diagonal causal mask keeps attention inside it. So every
token attends to exactly the tokens it would attend to alone. The mask is the additive 4-D form that Hugging Face
attention takes as given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Bins stay short because the block-diagonal mask makes attention cost grow with the square of a bin.
# NOTE: the 4-D mask replaces a model's own pattern, so a sliding window (Gemma 3) is not applied
# inside a bin. That changes results only for examples longer than the window.
DEFAULT_BIN_TOKENS = 512


@dataclass
class PackedRows:
    """Bins x width token ids, positions and mask, and where each original row starts (flat index)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    row_start: torch.Tensor

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def locate(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Return the flat index into bins * width of token `positions` of original `rows`."""
        return self.row_start[rows] + positions

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Return the additive bins x 1 x width x width mask: 0 inside an example's causal block, -inf-like elsewhere."""
        same = self.segments.unsqueeze(-1) == self.segments.unsqueeze(-2)
        causal = torch.ones(self.width, self.width, dtype=torch.bool).tril()
        # Padding (segment -1) attends to itself only, so that no softmax row is empty.
        allowed = (same & causal) | torch.eye(self.width, dtype=torch.bool)
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.unsqueeze(1)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int,
         max_tokens: int = DEFAULT_BIN_TOKENS) -> PackedRows:
    """Pack right-padded rows into bins of at most max(max_tokens, longest row) tokens."""
    lengths = attention_mask.sum(dim=1).tolist()
    capacity = max(max_tokens, max(lengths))
    bins: list[list[int]] = []
    filled: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        target = next((b for b, used in enumerate(filled) if used + lengths[row] <= capacity), None)
        if target is None:
            bins.append([])
            filled.append(0)
            target = len(bins) - 1
        bins[target].append(row)
        filled[target] += lengths[row]

    width = max(filled)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    segments = torch.full((len(bins), width), -1, dtype=torch.long)
    row_start = torch.zeros(len(lengths), dtype=torch.long)
    for number, rows in enumerate(bins):
        offset = 0
        for row in rows:
            length = lengths[row]
            ids[number, offset:offset + length] = input_ids[row, :length]
            positions[number, offset:offset + length] = torch.arange(length)
            segments[number, offset:offset + length] = row
            row_start[row] = number * width + offset
            offset += length
    return PackedRows(ids, positions, segments, row_start)
