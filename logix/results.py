"""What scoring returns: Scores, TopK and SelfInfluence, with ids in one convention and
save/load as plain HDF5 datasets (logix.disk.results)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .disk.results import read_result, write_result
from .errors import ConfigError


def as_ids(ids) -> np.ndarray:
    """ids in the results' convention, as `Log.ids` gives them: int64, or an object array of str."""
    if isinstance(ids, Tensor):
        ids = ids.numpy()
    array = np.asarray(ids)
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "U":  # a list of str: numpy picks fixed-width unicode; ids stay Python str
        return array.astype(object)
    if array.size == 0:
        return array if array.dtype.kind == "O" else array.astype(np.int64)
    if array.dtype.kind == "O" and isinstance(array.flat[0], str):  # Log.ids' form for string ids
        return array
    if array.dtype.kind == "O" and isinstance(array.flat[0], (int, np.integer)):
        return array.astype(np.int64)
    raise TypeError(f"ids must be ints or strings, got an array of {array.dtype}")


def check_top_k(k, largest) -> None:
    """k a positive int, largest a bool: what every top-k here takes."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"top_k must be a positive int, got {k!r}")
    if not isinstance(largest, bool):
        raise ConfigError(f"largest must be True or False, got {largest!r}")


def _values(values) -> Tensor:
    return values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))


class _Saved:
    """save(path) / load(path): a result as plain HDF5 datasets (logix.disk.results)."""

    def _saved_fields(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    def save(self, path) -> None:
        fields = {k: v if isinstance(v, Tensor) else as_ids(v) for k, v in self._saved_fields().items()}
        write_result(path, type(self).__name__, fields)

    @classmethod
    def load(cls, path):
        fields = read_result(path, cls.__name__)
        return cls(**{k: v if isinstance(v, Tensor) else as_ids(v) for k, v in fields.items()})


def _same_queries(parts) -> np.ndarray | None:
    """The query ids every part shares; parts scored for different queries cannot be merged."""
    first = parts[0].query_ids
    for part in parts[1:]:
        same = part.query_ids is None if first is None else np.array_equal(part.query_ids, first)
        if not same:
            raise ConfigError("the parts were scored for different queries: merge parts of the same query only")
    return first


class _TopKFields(NamedTuple):
    ids: np.ndarray
    values: Tensor


class TopK(_Saved, _TopKFields):
    """The k best train ids and their scores, best first: a named tuple, so `ids, values = top` unpacks.

    ids: numpy (int64, or object str, as `Log.ids`), values: a torch tensor of the same shape,
    (Q, k) per query (row q for query_ids[q]) or (k,) from `SelfInfluence.top_k`. `query_ids`
    (numpy, or None for a self-influence top-k) is an attribute, not a field, so unpacking gives two.
    """

    query_ids: np.ndarray | None = None  # also the value when a tuple method builds one without __new__

    def __new__(cls, ids, values, query_ids=None):
        self = super().__new__(cls, as_ids(ids), _values(values))
        self.query_ids = None if query_ids is None else as_ids(query_ids)
        return self

    def _saved_fields(self) -> dict:
        fields = {"ids": self.ids, "values": self.values, "query_ids": self.query_ids}
        return {k: v for k, v in fields.items() if v is not None}

    def _replace(self, **changes) -> TopK:  # the tuple's own would drop query_ids
        return type(self)(changes.get("ids", self.ids), changes.get("values", self.values), self.query_ids)

    def __repr__(self) -> str:
        k = self.values.shape[-1]
        if self.query_ids is None:
            return f"TopK(k={k})"
        return f"TopK(queries={len(self.query_ids)}, k={k})"

    @classmethod
    def merge(cls, parts: list[TopK], largest: bool = True) -> TopK:
        """The top-k over all parts (shards of the train rows scored separately for the same queries)."""
        if not isinstance(largest, bool):
            raise ConfigError(f"largest must be True or False, got {largest!r}")
        query_ids = _same_queries(parts)
        k = max(part.values.shape[-1] for part in parts)
        values = torch.cat([part.values for part in parts], dim=-1)
        ids = np.concatenate([part.ids for part in parts], axis=-1)
        values, index = torch.topk(values, min(k, values.shape[-1]), dim=-1, largest=largest)
        return cls(np.take_along_axis(ids, index.numpy(), axis=-1), values, query_ids)


@dataclass(repr=False)
class Scores(_Saved):
    """values[q, i]: influence of train example train_ids[i] on query query_ids[q] (+ = helps).

    values: a (Q, N) float32 torch tensor; query_ids, train_ids: numpy (int64, or object str, as `Log.ids`).
    """

    values: Tensor  # (Q, N) float32
    query_ids: np.ndarray
    train_ids: np.ndarray

    def __post_init__(self):
        self.values = _values(self.values)
        self.query_ids, self.train_ids = as_ids(self.query_ids), as_ids(self.train_ids)

    def __repr__(self) -> str:
        return f"Scores(queries={len(self.query_ids)}, train={len(self.train_ids)})"

    @classmethod
    def merge(cls, parts: list[Scores]) -> Scores:
        """The scores of all parts side by side (shards of the train rows, in shard order)."""
        query_ids = _same_queries(parts)
        values = torch.cat([part.values for part in parts], dim=1)
        return cls(values, query_ids, np.concatenate([part.train_ids for part in parts]))

    def top_k(self, k: int, largest: bool = True) -> TopK:
        """The k most helpful train ids per query (largest=False: the k most harmful)."""
        check_top_k(k, largest)
        k = min(k, self.values.shape[1])
        values, index = torch.topk(self.values, k, dim=1, largest=largest)
        return TopK(self.train_ids[index.numpy()], values, self.query_ids)


@dataclass(repr=False)
class SelfInfluence(_Saved):
    """values[i] = g_i^T (F + lambda I)^{-1} g_i for train id ids[i]: high = atypical or mislabeled.

    values: an (N,) float64 torch tensor; ids: numpy (int64, or object str, as `Log.ids`).
    """

    values: Tensor  # (N,) float64
    ids: np.ndarray

    def __post_init__(self):
        self.values, self.ids = _values(self.values), as_ids(self.ids)

    def __repr__(self) -> str:
        return f"SelfInfluence(train={len(self.ids)})"

    def top_k(self, k: int, largest: bool = True) -> TopK:
        """TopK (ids, values) of the k highest (or lowest) self-influences; its query_ids is None."""
        check_top_k(k, largest)
        k = min(k, len(self.ids))
        values, index = torch.topk(self.values, k, largest=largest)
        return TopK(self.ids[index.numpy()], values)
