"""Projection matrices for LoGra: P_in (k_in x d_in) and P_out (k_out x d_out) per module.

Gaussian entries N(0, 1/k) keep norms in expectation. They come from a private CPU
`torch.Generator` seeded from (base seed, module name, side): the global RNG is never touched, so
dropout and the training trajectory are unchanged, and any process rebuilds the same matrices.
A side whose rank is at least its dimension is the identity, represented as None.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor


def side_rank(rank: int | str, dim: int) -> int:
    """The projected size of a side: min(rank, dim), with "full" meaning dim."""
    return dim if rank == "full" else min(int(rank), dim)


def module_seed(base_seed: int, module_name: str, side: str) -> int:
    """A stable 63-bit seed; independent of Python's hash randomisation and of the process."""
    digest = hashlib.sha256(f"{base_seed}:{module_name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def gaussian(k: int, d: int, seed: int) -> Tensor | None:
    """A (k, d) float32 matrix with N(0, 1/k) entries, or None (identity) when k >= d."""
    if k >= d:
        return None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(k, d, generator=generator, dtype=torch.float32) / math.sqrt(k)
