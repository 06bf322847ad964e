"""Projection matrices for LoGra: P_in (k_in x d_in) and P_out (k_out x d_out) per module.

PCA projections are the top eigenvectors of a side's full covariance, measured in a
statistics-only pass (`Run.fit_projections`); sides wider than PCA_MAX_DIM stay Gaussian.

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


PCA_MAX_DIM = 4096  # a side wider than this keeps a Gaussian projection (a dense d x d covariance)


def pca_fits(k: int, d: int) -> bool:
    """Whether a side gets a PCA projection: it is projected at all, and narrow enough."""
    return k < d <= PCA_MAX_DIM


def principal_directions(covariance: Tensor, k: int, module_name: str, label: str) -> Tensor:
    """(k, d) float32: the top-k eigenvectors of a covariance, as orthonormal rows."""
    from .statistics import eigh

    _, vectors = eigh(covariance, module_name, label)
    return vectors[:, -k:].flip(1).T.contiguous().float()
