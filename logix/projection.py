"""Projection matrices for LoGra: P_in (k_in x d_in) and P_out (k_out x d_out) per module.

PCA projections are the top eigenvectors of a side's full covariance, measured in a
statistics-only pass (`Run.fit_projections`); sides wider than PCA_MAX_DIM stay Gaussian. With
rank="auto" the same pass also chooses each module's ranks within a row budget (allocate_ranks).

Gaussian entries N(0, 1/k) keep norms in expectation. They come from a private CPU
`torch.Generator` seeded from (base seed, module name, side): the global RNG is never touched, so
dropout and the training trajectory are unchanged, and any process rebuilds the same matrices.
A side whose rank is at least its dimension is the identity, represented as None.
"""

from __future__ import annotations

import hashlib
import heapq
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


def leading_directions(vectors: Tensor, k: int) -> Tensor:
    """(k, d) float32: the last k columns of eigh's eigenvectors (the top k), as orthonormal rows."""
    return vectors[:, -k:].flip(1).T.contiguous().float()


def auto_projection(vectors: Tensor, k: int, d: int, sketch: Tensor | None) -> Tensor | None:
    """rank="auto": a side's projection from the eigenvectors of its measured covariance. The
    identity where k is the whole side; where the side was measured through a Gaussian sketch,
    the sketch's top directions composed with the sketch."""
    if sketch is None:
        return None if k >= d else leading_directions(vectors, k)
    return (leading_directions(vectors, k).double() @ sketch.double()).float()


AUTO_SKETCH = 1024  # rank="auto": a side wider than PCA_MAX_DIM is measured through a Gaussian sketch this wide


def allocate_ranks(spectra: dict[str, tuple[Tensor, Tensor]], budget: int) -> dict[str, tuple[int, int]]:
    """rank="auto": (k_in, k_out) per module, at most `budget` numbers per row in all.

    spectra: per module the eigenvalues of A (activations) and S (output gradients), any order.
    Under K-FAC a module's gradient covariance is A (x) S, so the top k_in x k_out PCA block keeps
    (sum of the top k_in of A) x (sum of the top k_out of S) of the row's squared norm. Starting
    from 1 x 1 per module, each step widens the side that keeps the most of that norm per number it
    adds to the row, until the next step would pass the budget (greedy).
    """
    if budget < len(spectra):
        raise ValueError(f"a row budget of {budget} numbers cannot give {len(spectra)} modules one number each")
    cumulative = {}
    for name, (eig_a, eig_s) in spectra.items():
        sides = []
        for values in (eig_a, eig_s):
            v = values.double().clamp_min(0.0).sort(descending=True).values
            sides.append(torch.cat([v.new_zeros(1), v.cumsum(0)]).tolist())
        cumulative[name] = sides
    ranks = {name: [1, 1] for name in spectra}
    used = len(spectra)
    heap: list = []

    def push(name: str) -> None:
        (ca, cs), (ka, ks) = cumulative[name], ranks[name]
        for side, cost, gain in (
            (0, ks, (ca[ka + 1] - ca[ka]) * cs[ks] if ka + 1 < len(ca) else 0.0),
            (1, ka, (cs[ks + 1] - cs[ks]) * ca[ka] if ks + 1 < len(cs) else 0.0),
        ):
            if gain:  # a direction with no variance adds only zeros to the row
                heapq.heappush(heap, (-gain / cost, name, side, (ka, ks), cost))

    for name in spectra:
        push(name)
    while heap:
        _, name, side, priced_at, cost = heapq.heappop(heap)
        if tuple(ranks[name]) != priced_at:
            continue  # stale: the module has grown since this step was priced
        if used + cost > budget:
            continue  # too wide for what is left; a cheaper step may still fit
        ranks[name][side] += 1
        used += cost
        push(name)
    return {name: (k[0], k[1]) for name, k in ranks.items()}
