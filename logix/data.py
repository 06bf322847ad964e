"""Giving examples stable ids: wrap any map-style dataset so each item carries its index."""

from __future__ import annotations

from torch.utils.data import Dataset

from .errors import ConfigError


class WithIds(Dataset):
    """`WithIds(dataset)[i]` is `(i, *dataset[i])` for tuple items, `{**dataset[i], key: i}` for dicts.

    With the default collate function a loader then yields `ids, x, y` (ids an int tensor), ready
    for `run.capture(ids)`. The index is the id: it is stable across epochs, shuffling and
    processes, so logs from different runs line up.

    `prefix` makes string ids, f"{prefix}{i}" (a list of str per batch): one namespace per dataset,
    for a log whose passes train on several datasets (pre-training, then fine-tuning), where the
    same index means different examples. A log holds one kind of id, so give every dataset a prefix.
    """

    def __init__(self, dataset, key: str = "id", prefix: str | None = None):
        if prefix is not None and not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a string, got {prefix!r}")
        self.dataset = dataset
        self.key = key
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        i = index if self.prefix is None else f"{self.prefix}{index}"
        if isinstance(item, dict):
            if self.key in item:
                raise ConfigError(f"dataset items already have a field {self.key!r}; pass WithIds(ds, key=...)")
            return {**item, self.key: i}
        if isinstance(item, (tuple, list)):
            return (i, *item)
        return i, item
