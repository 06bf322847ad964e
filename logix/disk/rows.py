"""A pass's rows on disk: its segments' index (ids, flags, steps, committed counts), read and
checked once, and its gradients streamed in blocks or read whole.

Segments open read-only (SWMR while a writer holds them, logix.disk.segments.open_segment), so a
pass can be read while training still writes it: only the rows below each segment's `committed`
counter, as it was when the index was read, are ever returned. Blocks are read one HDF5 read each
on a background thread, ahead of the consumer, and float16 storage is converted to float32 there.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import ConfigError, LogFormatError
from .files import FLAG_NONFINITE
from .manifest import SegmentInfo
from .segments import open_segment, read_index, read_rows

BLOCK_BYTES = 64 << 20  # default size of the blocks scoring streams


def default_block_rows(width: int) -> int:
    """Rows per block so that a float32 block is about BLOCK_BYTES (at least 64 rows)."""
    return max(64, BLOCK_BYTES // max(1, 4 * width))


RING_SLOTS = 3  # blocks alive at once while streaming: the caller's, one queued, one being read


class ConversionRing:
    """float32 buffers that float16 blocks are converted into, reused in turn.

    Safe while at most `slots` blocks are alive at once: the one the caller holds, the ones queued
    by `prefetched` (slots - 2) and the one being converted.
    """

    def __init__(self, slots: int):
        self.slots = slots
        self.buffers: list[np.ndarray] = []
        self.turn = 0

    def convert(self, block: np.ndarray) -> np.ndarray:
        i, self.turn = self.turn, (self.turn + 1) % self.slots
        if i == len(self.buffers):
            self.buffers.append(np.empty(block.shape, dtype=np.float32))
        buffer = self.buffers[i]
        if buffer.shape[0] < block.shape[0] or buffer.shape[1:] != block.shape[1:]:
            buffer = self.buffers[i] = np.empty(block.shape, dtype=np.float32)
        out = buffer[: block.shape[0]]
        torch.from_numpy(out).copy_(torch.from_numpy(block))
        return out


def prefetched(blocks, depth: int = 1):
    """Iterate `blocks` on a background thread, `depth` items ahead of the consumer.

    h5py reads and numpy conversions run there while the consumer's GEMMs (which release the GIL)
    run here. Errors re-raise in the consumer; stopping early stops the thread.
    """
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in blocks:
                while not stop.is_set():
                    try:
                        ahead.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ahead.put(done)
        except BaseException as e:  # handed to the consumer
            ahead.put(e)

    thread = threading.Thread(target=produce, name="logix-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to put, then let it finish
            try:
                ahead.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def index_problems(root: Path, name: str, ids: np.ndarray, flags: np.ndarray, draws: bool = False) -> list[str]:
    """What is wrong with a pass's index (its committed rows' ids and flags, all segments together):
    flags holding unknown bits, ids appearing twice (the writer does neither, except in a curvature
    pass, `draws`, where each row of an id is one more draw of labels). `logix.open` refuses a pass
    with any; `logix verify` lists them."""
    problems = []
    if np.any(flags & ~np.uint8(FLAG_NONFINITE)):
        problems.append(f"pass {name!r} of {root}: row flags hold unknown values; a segment is damaged")
    if not draws and len(twice := repeated(ids)):
        problems.append(
            f"pass {name!r} of {root}: ids {twice[:5].tolist()} appear more than once; "
            "a segment or the manifest is damaged"
        )
    return problems


def repeated(values: np.ndarray) -> np.ndarray:
    """The values that appear more than once, sorted, each once. Found by sorting: numpy 2's
    hash-based np.unique takes 40 times as long on half a million int ids (0.2 s against 5 ms), a
    cost every finalize and every logix.open of the pass paid."""
    ordered = np.sort(values)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


class PassRows:
    """The committed rows of one pass: its segments, in order, as they were when this was made.

    ids, flags, steps: one per committed row, flagged rows included; counts: committed rows per
    segment. Made from the manifest's description of the pass (its segments, the row width, the
    storage dtype, the id kind, whether ids repeat: `draws`, a curvature pass), each segment checked
    against it (logix.disk.segments.check_segment).
    """

    def __init__(
        self,
        root: Path,
        name: str,
        segments: Sequence[SegmentInfo],
        width: int,
        dtype: str,
        id_kind: str | None,
        draws: bool = False,
    ):
        self.root, self.name, self.segments, self.width = root, name, tuple(segments), width
        self.ids, self.flags, self.steps, self.counts = self._read_index(dtype, id_kind)
        problems = index_problems(self.root, self.name, self.ids, self.flags, draws)
        if problems:
            raise LogFormatError(problems[0])

    @property
    def valid(self) -> np.ndarray:
        """One bool per committed row, False where the row is flagged non-finite."""
        return (self.flags & FLAG_NONFINITE) == 0

    def blocks(
        self,
        columns: slice | None = None,
        block_rows: int | None = None,
        rows: slice | None = None,
        check_finite: bool = True,
        recycle: bool = False,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(ids, float32 rows) over the valid rows in order, `block_rows` at a time (what
        `Log.blocks` gives: see there), read on a background thread one block ahead."""
        if block_rows is None:
            block_rows = default_block_rows(self.width)
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise ConfigError(f"block_rows must be a positive int, got {block_rows!r}")
        ring = ConversionRing(RING_SLOTS) if recycle else None
        return prefetched(self._blocks(columns, int(block_rows), rows, check_finite, ring), depth=RING_SLOTS - 2)

    def read(self, columns: slice) -> np.ndarray:
        """float32 (committed rows, columns): every committed row, flagged ones included."""
        parts, offset = [], 0
        for segment, n in zip(self.segments, self.counts):
            with open_segment(self.root / segment.file, self.root) as f:
                parts.append(self._grads(f, segment, 0, n, columns, self.flags[offset : offset + n]))
            offset += n
        width = columns.stop - columns.start
        return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)

    def _blocks(self, columns, block_rows: int, rows, check_finite: bool, ring: ConversionRing | None):
        columns = columns or slice(0, self.width)
        lo, hi, _ = (rows or slice(None)).indices(len(self.ids))
        offset = 0
        for segment, n in zip(self.segments, self.counts):
            first, last = max(lo - offset, 0), min(hi - offset, n)
            if first >= last:
                offset += n
                continue
            with open_segment(self.root / segment.file, self.root) as f:
                for start in range(first, last, block_rows):
                    end = min(last, start + block_rows)
                    flags = self.flags[offset + start : offset + end]
                    valid = (flags & FLAG_NONFINITE) == 0
                    block = self._grads(f, segment, start, end, columns, flags, check_finite, ring)
                    ids = self.ids[offset + start : offset + end]
                    if not valid.all():  # a copy only when some rows are flagged
                        ids, block = ids[valid], block[valid]
                    yield ids, torch.from_numpy(block)
            offset += n

    def _read_index(self, dtype: str, id_kind: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        ids, flags, steps, counts = [], [], [], []
        for segment in self.segments:
            expected = dict(width=self.width, dtype=dtype, id_kind=id_kind, rows=segment.rows)
            segment_ids, segment_flags, segment_steps = read_index(self.root / segment.file, self.root, **expected)
            ids.append(segment_ids)
            flags.append(segment_flags)
            steps.append(segment_steps)
            counts.append(len(segment_ids))
        if not ids:
            return np.zeros(0, dtype="i8"), np.zeros(0, dtype="u1"), np.zeros(0, dtype="i8"), counts
        return np.concatenate(ids), np.concatenate(flags), np.concatenate(steps), counts

    def _grads(
        self,
        f: h5py.File,
        segment: SegmentInfo,
        start: int,
        end: int,
        columns: slice,
        flags: np.ndarray,
        check_finite: bool = True,
        ring: ConversionRing | None = None,
    ) -> np.ndarray:
        """float32 rows [start, end) of a segment; rows not flagged must be finite (else: damage)."""
        path = self.root / segment.file
        try:
            grads = f["grads"]
            if columns == slice(0, grads.shape[1]):
                block = read_rows(grads, np.s_[start:end])  # whole rows: a plain hyperslab read
            else:
                block = read_rows(grads, np.s_[start:end, columns])
            if block.dtype != np.float32:  # float16 storage: torch converts several times faster than numpy
                block = ring.convert(block) if ring is not None else torch.from_numpy(block).float().numpy()
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise LogFormatError(f"segment {path}: rows {start}..{end} cannot be read: {e}") from e
        if not check_finite:
            return block
        valid = (flags & FLAG_NONFINITE) == 0
        finite = np.isfinite(block.sum(axis=1, dtype=np.float64))  # NaN/Inf propagate; float64 cannot overflow
        if not np.all(finite[valid]):
            row = start + int(np.flatnonzero(valid & ~finite)[0])
            raise LogFormatError(f"segment {path} is damaged: row {row} holds non-finite numbers but is not flagged")
        return block
