"""Writing rows: a segment file's writer, and the background thread that feeds it."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from ..errors import WriterError
from .files import FLAG_NONFINITE, replace_atomic
from .hdf5_files import abandon

logger = logging.getLogger("logix")


RESERVE_SLACK = 64 << 10  # bytes reserved past a batch's chunks, for the metadata that grows with them
RESERVE_STEP = 16 << 20  # the file grows ahead by at least this much (sparse; given back at close)
WAKE_BYTES = 4 << 20  # rows queued before the writer is woken early
QUEUE_BYTES = 256 << 20  # rows that may wait for the writer, by default (pinned host memory on a GPU)
STAGE_BYTES = 4 << 20  # rows staged in memory before they are written, if no commit comes first


class SegmentWriter:
    """Appends rows to one segment file; owned by exactly one thread at a time."""

    def __init__(self, path: Path, width: int, dtype: str, id_kind: str, attrs: dict):
        """Build the file under a temporary name and rename it once it is in SWMR mode, so that a
        crash at any moment leaves either no segment or a well-formed one."""
        self.path = path
        path.parent.mkdir(exist_ok=True)  # segments/ of a log that exists: a deleted log is not remade
        if path.exists():
            raise FileExistsError(f"segment {path} exists already")
        building = path.with_name(f".{path.name}.building")
        building.unlink(missing_ok=True)  # left by a crash during an earlier creation
        self.file = h5py.File(building, "x", libver="latest")
        try:
            self._build(width, dtype, id_kind, attrs)
        except BaseException:
            abandon(self.file)  # a full disk must not leave a file open for HDF5 to crash on at exit
            building.unlink(missing_ok=True)
            raise
        replace_atomic(building, path)
        self.rows = 0  # rows taken (written or staged)
        self.written = 0  # rows in the file
        self.committed_rows = 0
        self.nonfinite = 0
        self._staged: list[tuple] = []
        self._staged_bytes = 0
        self._block: np.ndarray | None = None  # the staged rows joined, reused from write to write

    def _build(self, width: int, dtype: str, id_kind: str, attrs: dict) -> None:
        self.file.attrs.update(attrs)
        itemsize = np.dtype(dtype).itemsize
        chunk_rows = int(max(1, min(4096, (1 << 20) // (width * itemsize))))

        def column(name, dt, shape=()):  # fletcher32: a flipped bit is a read error, not another number
            checksum = h5py.check_string_dtype(np.dtype(dt)) is None  # HDF5 cannot filter variable-length strings
            return self.file.create_dataset(
                name, (0, *shape), maxshape=(None, *shape), dtype=dt, chunks=(chunk_rows, *shape), fletcher32=checksum
            )

        self.chunk_rows = chunk_rows
        self.row_bytes = width * itemsize + 8 + 1 + 8  # grads, an int id, flags and step
        self.grads = column("grads", dtype, (width,))
        self.ids = column("ids", "i8" if id_kind == "int" else h5py.string_dtype("utf-8"))
        self.flags = column("flags", "u1")
        self.step = column("step", "i8")
        self.committed = self.file.create_dataset("committed", data=np.zeros(1, dtype="i8"))
        self.file.swmr_mode = True
        self.file.flush()

    def append(self, ids, grads, step: int, flags: np.ndarray | None) -> None:
        """Take a batch of rows, all at training step `step`: a host array, or rows still to be
        formed (anything with `shape`, `nbytes` and a static `fill_many(items, out)`, such as
        PendingRows: formed at the write, the staged ones of a kind together); `flags` uint8 per
        row, or None for rows to be flagged when written (CPU rows).

        They are staged and written with those staged before them at `write_staged`, at the
        latest when STAGE_BYTES are staged or at the next commit: rows are readable only once
        committed, so holding them until then loses nothing a crash would not, and one HDF5 write
        per column for several batches keeps h5py's per-call work (done under the GIL, so taken
        from the training thread) off most steps."""
        n = grads.shape[0]
        if n == 0:
            return
        self._staged.append((ids, grads, step, flags))
        self._staged_bytes += grads.nbytes
        self.rows += n
        if self._staged_bytes >= STAGE_BYTES:
            self.write_staged()

    def write_staged(self) -> None:
        """Write the staged rows, one append per column; rows staged without flags (CPU rows) are
        flagged here, in one pass over the joined block."""
        if not self._staged:
            return
        staged, self._staged, self._staged_bytes = self._staged, [], 0
        if self.ids.dtype.kind == "O":  # strings
            ids: list | np.ndarray = [i for batch in staged for i in batch[0]]
        else:
            ids = np.concatenate([np.asarray(batch[0], dtype="i8") for batch in staged])
        grads = self._joined([batch[1] for batch in staged])
        steps = np.repeat([batch[2] for batch in staged], [batch[1].shape[0] for batch in staged]).astype("i8")
        flags = self._flags(staged, grads)
        bad = int(np.count_nonzero(flags))
        if bad:
            self.nonfinite += bad
            logger.warning("logix: %d row(s) with non-finite gradients flagged in %s", bad, self.path.name)
        start, end = self.written, self.written + len(ids)
        self._reserve(ids, end)
        for ds, values in ((self.grads, grads), (self.ids, ids), (self.flags, flags), (self.step, steps)):
            append_rows(ds, start, values)
        self.written = end

    def _joined(self, parts: list) -> np.ndarray:
        """The staged batches' rows as one block: host arrays copied in, rows still to be formed
        (logix.call_groups.PendingRows) formed straight into it. The block is kept for the next
        write (HDF5 has copied it by then): a new one per write would be new pages to fault in."""
        if len(parts) == 1 and isinstance(parts[0], np.ndarray):
            return parts[0]
        n = sum(part.shape[0] for part in parts)
        if self._block is None or len(self._block) < n:
            self._block = np.empty((n, self.grads.shape[1]), dtype=self.grads.dtype)
        block, at = self._block[:n], 0
        for kind, run in itertools.groupby(parts, key=type):
            run = list(run)
            end = at + sum(part.shape[0] for part in run)
            if kind is np.ndarray:
                np.concatenate(run, out=block[at:end])
            else:
                kind.fill_many(run, block[at:end])
            at = end
        return block

    @staticmethod
    def _flags(staged: list[tuple], grads: np.ndarray) -> np.ndarray:
        """(rows,) uint8 flags of the joined block: those a batch came with, else computed here."""
        if all(batch[3] is None for batch in staged):
            return nonfinite_flags_np(grads)
        parts, at = [], 0
        for batch in staged:
            n = batch[1].shape[0]
            parts.append(batch[3] if batch[3] is not None else nonfinite_flags_np(grads[at : at + n]))
            at += n
        return np.concatenate(parts)

    def _reserve(self, ids, end: int) -> None:
        """Make room in the file for the chunks rows up to `end` need, before HDF5 writes them.

        HDF5 records a new end of file before it writes a new chunk: if a file-size limit then
        refuses the write, the file ends before its recorded end and no longer opens, its committed
        rows with it. Growing the file first (sparse: no blocks are allocated) makes the limit refuse
        here, while the file is whole, and a write a full disk refuses later leaves a hole in an
        uncommitted chunk, never a file shorter than its recorded end."""
        new_chunks = -(-end // self.chunk_rows) - -(-self.written // self.chunk_rows)
        strings = sum(len(str(i).encode()) + 32 for i in ids) if self.ids.dtype.kind == "O" else 0
        need = new_chunks * self.chunk_rows * self.row_bytes + strings + RESERVE_SLACK
        descriptor = self.file.id.get_vfd_handle()
        allocated = self.file.id.get_filesize()  # HDF5's end of allocated space: new chunks go here
        size = os.fstat(descriptor).st_size
        if size >= allocated + need:
            return
        # in steps, one call per several MB, never past a file-size limit before the rows need it
        # (growing past one sends SIGXFSZ, which ends the process unless it is ignored)
        target = allocated + max(need, RESERVE_STEP)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            target = max(min(target, limit), allocated + need)
        try:
            os.ftruncate(descriptor, target)
        except OSError:
            if target == allocated + need:
                raise
            os.ftruncate(descriptor, allocated + need)  # a full disk may refuse the step, not the rows

    def commit(self) -> None:
        """Make every appended row durable for readers: data first, then the counter. A segment
        whose file was deleted (with its log directory, say) fails here: writes to it would go on
        succeeding into a file no one can open."""
        self.write_staged()
        self.file.flush()
        self.committed[0] = self.rows
        self.file.flush()
        self._check_still_there()
        self.committed_rows = self.rows

    def _check_still_there(self) -> None:
        try:
            same = os.stat(self.path).st_ino == os.fstat(self.file.id.get_vfd_handle()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise FileNotFoundError(
                errno.ENOENT, "the segment file was deleted or replaced while being written", str(self.path)
            )

    def close(self) -> None:
        """Commit and close the file; if the disk refuses the commit, abandon the file (see
        logix.disk.hdf5_files) and raise: the rows committed before stay readable."""
        if not self.file.id.valid:
            return
        try:
            self.commit()
        except BaseException:
            abandon(self.file)
            raise
        allocated = self.file.id.get_filesize()  # HDF5's end before close: the recorded end is no less
        self.file.close()
        trim_to_recorded_end(self.path, allocated)

    def abandon(self) -> None:
        """Close the file without writing to it again, after the disk refused a write."""
        self._staged, self._staged_bytes = [], 0
        abandon(self.file)


def append_rows(ds: h5py.Dataset, start: int, values) -> None:
    """Grow `ds` to hold `values` from row `start` on and write them. Numeric columns go through
    HDF5's own calls (extent, hyperslab, write): h5py's Dataset.resize and __setitem__ spend about a
    quarter of a write's time in Python (0.5 of 1.9 ms for 640 rows of 672 floats and their three
    one-number columns), and the writer thread takes that time from training through the GIL."""
    n = len(values)
    if not isinstance(values, np.ndarray) or values.dtype != ds.dtype:  # strings: h5py converts them
        ds.resize(start + n, axis=0)
        ds[start : start + n] = values
        return
    values = np.ascontiguousarray(values)
    ds.id.set_extent((start + n, *values.shape[1:]))
    space = ds.id.get_space()
    space.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
    ds.id.write(h5py.h5s.create_simple(values.shape), space, values)


def nonfinite_rows(rows: Tensor) -> Tensor:
    """(B,) bool: which rows hold a NaN or an infinity.

    On a CPU, `isfinite(rows).all(dim=1)` is a slow reduction (5.5 ms for 256 rows of 8,832
    floats, longer than the MLP's training step); a row's float32 sum is cheap and not finite
    whenever one of its values is not, so only rows whose sum is not finite (those, or an overflow
    of the sum) are checked one value at a time. On an accelerator the exact check is cheap and
    needs no host sync, which the recheck would.
    """
    if rows.device.type != "cpu":
        return ~torch.isfinite(rows).all(dim=1)
    suspect = ~torch.isfinite(rows.sum(dim=1, dtype=torch.float32))
    if bool(suspect.any()):
        suspect[suspect.clone()] = ~torch.isfinite(rows[suspect]).all(dim=1)
    return suspect


def nonfinite_flags(rows: Tensor) -> Tensor:
    """(B,) uint8: FLAG_NONFINITE for the rows that hold a NaN or an infinity, else 0."""
    return nonfinite_rows(rows).to(torch.uint8) * FLAG_NONFINITE


def nonfinite_flags_np(rows: np.ndarray) -> np.ndarray:
    """(B,) uint8 flags of host rows, as nonfinite_flags: a float32 sum per row, each suspect row
    rechecked value by value. In numpy, once per write of several batches, on the writer thread."""
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = ~np.isfinite(rows.sum(axis=1, dtype=np.float32))
    if suspect.any():
        suspect[suspect] = ~np.isfinite(rows[suspect]).all(axis=1)
    return suspect.astype(np.uint8) * np.uint8(FLAG_NONFINITE)


@dataclass
class Batch:
    ids: list | np.ndarray
    grads: object  # a host tensor (pinned, maybe still being filled by a CUDA copy) or CPU rows still to be formed
    flags: torch.Tensor | None  # uint8 per row, FLAG_NONFINITE where not finite; None: the writer flags them
    step: int
    ready: object | None = None  # a torch.cuda.Event recorded after the copy, or None


_COMMIT = object()  # a queue item asking the writer to commit now


class BackgroundWriter:
    """A thread that owns a SegmentWriter and drains a bounded queue of batches into it.

    `put` blocks while the queue holds `queue_size` batches or `queue_bytes` bytes of rows (a
    batch larger than that alone still passes), so a slow disk slows training instead of growing
    memory or dropping rows. A failure in the thread is kept and re-raised in the training thread
    at the next `put` or at `close`; rows committed before it stay readable.

    The thread is not woken for every batch: it drains whatever is queued every POLL seconds, or at
    once when the queue is half full (in batches or bytes), WAKE_BYTES of rows wait, or a flush or
    the end asks for it. A writer woken per batch takes the GIL from the training thread at every
    step, and on few cores the hand-offs cost more than the writing.
    """

    POLL = 0.02

    def __init__(
        self, segment: SegmentWriter, queue_size: int = 16, commit_interval: float = 1.0, queue_bytes: int = QUEUE_BYTES
    ):
        self.segment = segment
        self.commit_interval = commit_interval
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.queue_bytes = queue_bytes
        self.held = 0  # bytes of rows put and not yet taken by the writer thread
        self._room = threading.Condition()
        self.wake = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=f"logix-writer-{segment.path.name}", daemon=True)
        self.thread.start()

    def put(self, batch: Batch) -> None:
        size = 0 if batch is _COMMIT else batch.grads.nbytes
        while True:
            self._raise_if_failed()
            if self._hold(size):
                break
        while True:
            self._raise_if_failed()
            if self._enqueue(batch):
                break
        if batch is _COMMIT or self._should_wake():
            self.wake.set()

    def _enqueue(self, item) -> bool:
        """Queue an item, waiting at most 0.1 s for room (the writer woken to make it)."""
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            self.wake.set()
        try:
            self.queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def _hold(self, size: int) -> bool:
        """Count `size` bytes as queued, waiting at most 0.1 s for the writer to take enough to
        stay within queue_bytes (nothing held: any batch fits)."""
        with self._room:
            if self.held and self.held + size > self.queue_bytes:
                self.wake.set()
                self._room.wait(0.1)
                if self.held and self.held + size > self.queue_bytes:
                    return False
            self.held += size
            return True

    def _release(self, size: int) -> None:
        with self._room:
            self.held -= size
            self._room.notify_all()

    def _should_wake(self) -> bool:
        """Half the queue's batches or bytes, or WAKE_BYTES of rows, are waiting (memory stays small)."""
        return 2 * self.queue.qsize() >= self.queue.maxsize or self.held >= min(WAKE_BYTES, self.queue_bytes // 2)

    def flush(self) -> None:
        """Block until every queued batch is written and committed."""
        self.put(_COMMIT)
        self.queue.join()
        self._raise_if_failed()

    def close(self) -> SegmentWriter:
        """Write everything queued, commit, close the file; re-raise a writer failure."""
        if self.thread.is_alive():
            self._put_end()
            self.thread.join()
        self._raise_if_failed()
        return self.segment

    def _put_end(self) -> None:
        """The end marker, queued even after a failure (close must not raise before the join)."""
        while not self._enqueue(None):
            pass
        self.wake.set()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise WriterError(
                f"writing {self.segment.path} failed: {self.error!r}. The "
                f"{self.segment.committed_rows} rows committed before the failure are kept."
            ) from self.error

    def _loop(self) -> None:
        """Write what is queued at each wake; commit at most once per interval, and at the latest
        one interval after the last write even if no batch follows (a stalled job loses nothing)."""
        last_commit = time.monotonic()
        while True:
            self.wake.wait(self.POLL)
            self.wake.clear()
            while True:
                try:
                    batch = self.queue.get_nowait()
                except queue.Empty:
                    break
                try:
                    if batch is None:
                        self._close_segment()
                        return
                    if self.error is None:  # else keep draining so put() never blocks on a dead writer
                        last_commit = self._take(batch, last_commit)
                finally:
                    if isinstance(batch, Batch):
                        self._release(batch.grads.nbytes)  # staged or written: its queue bytes are free
                    self.queue.task_done()
            self._write_staged()  # what this wake took, in one append per column
            uncommitted = self.segment.rows > self.segment.committed_rows and self.error is None
            if uncommitted and time.monotonic() - last_commit >= self.commit_interval:
                last_commit = self._take(_COMMIT, last_commit)

    def _take(self, batch, last_commit: float) -> float:
        """Stage a batch (or commit, for _COMMIT); returns the time of the last commit."""
        try:
            if batch is not _COMMIT:
                if batch.ready is not None:
                    batch.ready.synchronize()
                flags = None if batch.flags is None else batch.flags.numpy()  # None: CPU rows, flagged when written
                grads = batch.grads.numpy() if isinstance(batch.grads, Tensor) else batch.grads  # else: formed later
                self.segment.append(batch.ids, grads, batch.step, flags)
            if batch is _COMMIT or time.monotonic() - last_commit >= self.commit_interval:
                self.segment.commit()
                return time.monotonic()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self.error = e
            self.segment.abandon()  # no more writes: the rows committed so far stay as they are
        return last_commit

    def _write_staged(self) -> None:
        if self.error is None:
            try:
                self.segment.write_staged()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e
                self.segment.abandon()

    def _close_segment(self) -> None:
        try:
            self.segment.close()
        except BaseException as e:  # noqa: BLE001
            if self.error is None:
                self.error = e


_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def trim_to_recorded_end(path: Path, at_least: int) -> None:
    """Give back the space reserved past the end HDF5 recorded at close (SegmentWriter._reserve).

    The end is read from the superblock (versions 2 and 3, the ones libver="latest" writes: base
    address and end-of-file address after the 12-byte header); any other layout, or an end short of
    `at_least` (what HDF5 had allocated before closing), is left as it is."""
    with open(path, "r+b") as f:
        head = f.read(48)
        if len(head) < 48 or head[:8] != _SIGNATURE or head[8] not in (2, 3) or head[9] != 8:
            return
        base, _, end = (int.from_bytes(head[12 + 8 * k : 20 + 8 * k], "little") for k in range(3))
        recorded = base + end
        if at_least <= recorded < os.fstat(f.fileno()).st_size:
            f.truncate(recorded)
