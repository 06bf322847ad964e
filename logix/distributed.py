"""What a Run needs from `torch.distributed`: who it is, and a few small exchanges between ranks.

Every rank logs its own rows to its own segment files; rank 0 owns the manifest. The exchanges
(configs and module lists at init/watch, ids per capture, covariance sums and segment lists at
the end of a pass) are small, so they go over a gloo group on the CPU even when training uses
NCCL: they never wait on the GPU's queue of work. A single process (or torch.distributed not
initialised) is the world of one, where every exchange is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, LogixError


class World:
    """The ranks logging one log together (a world of one without torch.distributed)."""

    def __init__(self):
        self.size = 1
        self.process_index = 0  # torch.distributed's rank: which process this is
        self._group = None
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                f"this process was launched as one of {launched} (WORLD_SIZE) but torch.distributed is not "
                "initialised yet: create the Accelerator / call init_process_group before logix.init, so that "
                "the ranks share one log instead of overwriting each other's manifest "
                "(or pass distributed=False to log from this process alone)"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.size = dist.get_world_size()
            self.process_index = dist.get_rank()
            # every rank creates the group in the same order: this is itself collective
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    @classmethod
    def alone(cls, process_index: int = 0) -> World:
        """This process on its own, exchanging nothing (distributed=False, or closing at exit)."""
        world = cls.__new__(cls)
        world.size, world.process_index, world._group = 1, process_index, None
        return world

    @property
    def distributed(self) -> bool:
        if self.size > 1 and not dist.is_initialized():
            raise LogixError(
                "torch.distributed was shut down while a logix run was open: "
                "call run.finalize() before destroy_process_group()"
            )
        return self.size > 1

    def gather(self, obj: Any) -> list:
        """Every rank's `obj` (JSON-like values), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        """Sum CPU tensors across ranks, in place (one flat buffer, one collective)."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self._group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._group)


def reduce_sums(world: World, sums: dict[str, dict[str, torch.Tensor]]) -> dict:
    """All-reduce host covariance sums ({module: {a_sum, ...}}); a module a rank never saw counts as zeros."""
    if not world.distributed:
        return sums
    shapes: dict[str, dict[str, list]] = {}
    for part in world.gather({name: {key: list(v.shape) for key, v in entry.items()} for name, entry in sums.items()}):
        shapes.update(part)
    full = {}
    for name in sorted(shapes):
        mine = sums.get(name, {})
        full[name] = {
            key: mine[key].double().clone() if key in mine else torch.zeros(shape, dtype=torch.float64)
            for key, shape in sorted(shapes[name].items())
        }
    world.all_reduce([value for name in sorted(full) for value in full[name].values()])
    return full
