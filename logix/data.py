"""Giving examples stable ids: wrap any map-style dataset so each item carries its index."""

from __future__ import annotations

from torch.utils.data import Dataset

from .errors import ConfigError


class WithIds(Dataset):
    """`WithIds(dataset)[i]` is `(i, *dataset[i])` for tuple items, `{**dataset[i], key: i}` for dicts.

    With the default collate function a loader then yields `ids, x, y` (ids an int tensor), ready
    for `run.capture(ids)`. The index is the id: it is stable across epochs, shuffling and
    processes, so logs from different runs line up.
    """

    def __init__(self, dataset, key: str = "id"):
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, dict):
            if self.key in item:
                raise ConfigError(f"dataset items already have a field {self.key!r}; pass WithIds(ds, key=...)")
            return {**item, self.key: index}
        if isinstance(item, (tuple, list)):
            return (index, *item)
        return index, item
