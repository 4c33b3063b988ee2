"""Seeded perturbation noise: every direction is a pure function of (seed, step, query, tensor).

Zeroth-order methods never store their random directions: they regenerate them from a seed
when the update needs them again (the MeZO seed trick). Here each tensor of each query of each
step gets its own generator, seeded from a hash of those indices. So the scoring engine, the
update and the reference loop in the test tree draw the same numbers in any order.

Three kinds of direction, one per family of methods:

- `lora_direction`: Gaussian dA (r x in) and dB (out x r) for the LoRA factors (MeZO-LoRA);
- `low_rank_direction`: U (out x r) drawn every step and V (in x r) drawn once per window of
  `nu` steps, the direction being scale * U V^T (LoZO; with nu = 1 and scale 1/sqrt(r) it is the
  high-rank factorised stand-in for MeZO's dense noise);
- `dense_direction`: a Gaussian matrix of the tensor's shape (exact MeZO).
"""

from __future__ import annotations

import hashlib
import struct

import torch


def stream_seed(*indices: int | str) -> int:
    """Return a 63-bit generator seed derived from `indices` (run seed, step, query, tensor, kind)."""
    payload = "\x1f".join(str(index) for index in indices).encode()
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] & (2**63 - 1)


def gaussian(shape: tuple[int, ...], *indices: int | str) -> torch.Tensor:
    """Draw a float32 standard-normal tensor from the stream named by `indices`."""
    generator = torch.Generator().manual_seed(stream_seed(*indices))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def lora_direction(seed: int, step: int, query: int, tensor: int, *, rank: int, in_features: int,
                   out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (dA, dB) of one LoRA module for one query of one step."""
    d_a = gaussian((rank, in_features), seed, step, query, tensor, "lora-A")
    d_b = gaussian((out_features, rank), seed, step, query, tensor, "lora-B")
    return d_a, d_b


def window_of(step: int, nu: int) -> int:
    """Return the index of the V window that `step` falls in (V is redrawn every `nu` steps)."""
    return step // nu


def low_rank_v(seed: int, window: int, tensor: int, *, rank: int, in_features: int) -> torch.Tensor:
    """Return V (in x r) of one matrix for one window; every query of the window shares it."""
    return gaussian((in_features, rank), seed, window, tensor, "low-rank-V")


def low_rank_u(seed: int, step: int, query: int, tensor: int, *, rank: int, out_features: int) -> torch.Tensor:
    """Return U (out x r) of one matrix for one query of one step."""
    return gaussian((out_features, rank), seed, step, query, tensor, "low-rank-U")


def dense_direction(seed: int, step: int, query: int, tensor: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Return exact MeZO noise z ~ N(0, I) of one tensor for one query of one step."""
    return gaussian(shape, seed, step, query, tensor, "dense")
