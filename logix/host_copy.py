"""Rows on their way to the writer: on a CPU, still to be formed (by the writer thread); on CUDA,
formed, cast to the stored dtype, flagged where not finite and copied into pinned host memory on a
side stream so the copy overlaps the next step's kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .call_groups import PendingRows
from .disk.writer import Batch, nonfinite_flags


class HostCopies:
    """One device-to-host copy per batch (pinned and asynchronous on CUDA)."""

    def __init__(self, dtype: str):
        self.dtype = torch.float16 if dtype == "float16" else torch.float32
        self.streams: dict = {}  # CUDA device -> the side stream that copies rows to the host

    def batch(self, ids: list, pending: PendingRows, step: int) -> Batch:
        """Rows for the writer, in the stored dtype. On a CPU, the writer thread forms them and flags
        the non-finite ones (off the training thread); on an accelerator they are formed and flagged
        there, then copied."""
        if pending.device is None or pending.device.type == "cpu":
            return Batch(ids=ids, grads=pending.stored_as(self.dtype), flags=None, step=step)
        rows = pending.assemble()
        if rows.dtype is not self.dtype:
            rows = rows.to(self.dtype)
        if rows.device.type != "cuda":  # another accelerator: a plain copy, flagged by the writer
            return Batch(ids=ids, grads=rows.cpu(), flags=None, step=step)
        flags = nonfinite_flags(rows)  # after the cast: overflow too
        rows, flags, ready = self._copy(rows, flags)
        return Batch(ids=ids, grads=rows, flags=flags, step=step, ready=ready)

    def _copy(self, rows: Tensor, flags: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Start copying a batch into pinned host memory on a side stream and return at once.

        The writer thread waits on the returned event before it reads the host tensors.
        record_stream keeps the caching allocator from handing the device tensors to the next
        step before the copy has read them.
        """
        device = rows.device
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the rows are finished before they are read
        with torch.cuda.stream(stream):
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            host_flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host_flags.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        rows.record_stream(stream)
        flags.record_stream(stream)
        return host, host_flags, ready
