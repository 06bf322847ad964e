"""Reading a log: `logix.open(path)` gives a read-only snapshot of every committed row.

The reader never needs the model's code and never executes anything from the files (JSON and
HDF5 datasets only). It reads segment files in SWMR mode, so it also works while training is still
writing; it sees exactly the rows below each segment's `committed` counter at open (or at
`refresh()`).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from . import across_training
from .config import Config
from .curvature import (
    CURVATURE_SOURCES,
    DAMPING_RULE,
    DEFAULT_DAMPING_FACTOR,
    Preconditioner,
    resolve_preconditioner,
    statistics_file,
)
from .disk import (
    FLAG_NONFINITE,
    PROJECTIONS,
    check_projections,
    check_segment,
    open_segment,
    read_ids,
    read_manifest,
    read_projections,
    read_rows,
)
from .disk.statistics import read_self_influence
from .distributed import World
from .errors import ConfigError, LogFormatError, NotInLogError
from .influence import ScoreOptions, score, self_influence_values
from .lock import Writer, find_writer
from .query import Query
from .results import Scores, SelfInfluence

logger = logging.getLogger("logix")


@dataclass(frozen=True)
class ModuleInfo:
    """A logged module: its gradient is (d_out, d_in) and each row holds a (k_out, k_in) block."""

    name: str
    kind: str
    d_in: int
    d_out: int
    k_in: int
    k_out: int
    offset: int
    bias: bool

    @property
    def width(self) -> int:
        return self.k_in * self.k_out

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.width)


@dataclass(frozen=True)
class SegmentInfo:
    """One segment file; `rows` is what its writer recorded at close (None if it never closed)."""

    file: str
    rank: int
    session: int
    rows: int | None = None


@dataclass(frozen=True)
class PassInfo:
    """One pass of logging: an epoch, a segment of training, or a pass at a fixed checkpoint."""

    name: str
    index: int
    meta: dict
    segments: tuple[SegmentInfo, ...]
    finalized: bool
    rows: int = 0  # committed rows at the time the log was opened
    nonfinite: int = 0  # committed rows flagged non-finite

    @property
    def curvature_for(self) -> str | None:
        """The pass this one is a curvature pass for (`start_pass(..., curvature_for=...)`), or None
        for a training pass."""
        return self.meta.get("curvature_for")


BLOCK_BYTES = 64 << 20  # default size of the blocks scoring streams


def default_block_rows(width: int) -> int:
    """Rows per block so that a float32 block is about BLOCK_BYTES (at least 64 rows)."""
    return max(64, BLOCK_BYTES // max(1, 4 * width))


RING_SLOTS = 3  # blocks alive at once while streaming: the caller's, one queued, one being read


class _ConversionRing:
    """float32 buffers that float16 blocks are converted into, reused in turn.

    Safe while at most `slots` blocks are alive at once: the one the caller holds, the ones queued
    by `_prefetched` (slots - 2) and the one being converted.
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


def _prefetched(blocks, depth: int = 1):
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


def _stored_under_default(attrs) -> bool:
    """Whether stored self-influences say they were computed with today's default damping."""
    rule, factor = attrs.get("damping_rule"), attrs.get("damping_factor")
    if isinstance(rule, bytes):
        rule = rule.decode("utf-8", "replace")
    try:
        return rule == DAMPING_RULE and float(factor) == DEFAULT_DAMPING_FACTOR
    except (TypeError, ValueError):
        return False


class Log:
    """Read-only view of a log directory, defaulting to its latest pass.

    log.ids, len(log), log.steps: the chosen pass's valid committed rows, in log order.
    log.gradients(name): float32 tensor (N, k_out, k_in) for one module, aligned with log.ids.
    log.passes / log.modules: what was logged.
    """

    def __init__(self, path: str | Path, pass_name: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise LogFormatError(f"{self.path}: no such directory; give the path that logix.init wrote")
        if not self.path.is_dir():
            raise LogFormatError(f"{self.path} is a file, not a logix log directory")
        self._pass_name = pass_name
        self.refresh()

    def refresh(self) -> Log:
        """Re-read the manifest and the committed counters (to see rows written since)."""
        manifest = read_manifest(self.path)
        self.config = Config.from_json(manifest["config"])
        self.id_kind = manifest.get("id_kind")
        self.width = int(manifest["width"])
        self.modules = {m["name"]: ModuleInfo(**m) for m in manifest["modules"]}
        self._ids, self._flags, self._steps, self._committed = {}, {}, {}, {}
        self._stats_files = {p["name"]: p["statistics"] for p in manifest["passes"] if p.get("statistics")}
        self._self_influence_cache = {}
        passes = []
        for p in manifest["passes"]:
            segments = tuple(SegmentInfo(**s) for s in p["segments"])
            ids, flags, steps, counts = self._read_index(segments)
            self._check_index(p["name"], ids, flags)
            self._committed[p["name"]] = counts
            self._ids[p["name"]], self._flags[p["name"]], self._steps[p["name"]] = ids, flags, steps
            passes.append(
                PassInfo(
                    name=p["name"],
                    index=p["index"],
                    meta=p.get("meta", {}),
                    segments=segments,
                    finalized=bool(p.get("finalized", False)),
                    rows=len(ids),
                    nonfinite=int((flags & FLAG_NONFINITE).astype(bool).sum()),
                )
            )
        self.passes = passes
        scored = [p for p in passes if p.curvature_for is None]
        if not passes:
            self.current = None
        elif self._pass_name is None:
            self.current = scored[-1] if scored else passes[-1]
        else:
            self.current = self.pass_info(self._pass_name)
        return self

    def pass_info(self, name: str | None = None) -> PassInfo:
        """The pass named `name`, or the one this view reads (an error when the log has none)."""
        if name is None:
            return self._require_pass()
        for p in self.passes:
            if p.name == name:
                return p
        raise NotInLogError(f"no pass named {name!r} in {self.path}; passes: {[p.name for p in self.passes]}")

    def curvature_pass(self) -> PassInfo | None:
        """The pass `run.start_pass(..., curvature_for=<the current pass>)` logged for the current
        pass (its gradients at labels drawn from the model), if there is one."""
        p = self._require_pass()
        return next((other for other in self.passes if other.curvature_for == p.name), None)

    def select(self, pass_name: str) -> Log:
        """The same log, reading another pass (from the index read at open or refresh: no re-read)."""
        view = copy.copy(self)
        view._pass_name = pass_name
        view.current = self.pass_info(pass_name)
        view._self_influence_cache = {}
        return view

    # -- the chosen pass -------------------------------------------------------------------------

    def _require_pass(self) -> PassInfo:
        if self.current is None:
            raise LogFormatError(f"{self.path} holds no pass yet: nothing was captured")
        return self.current

    def _index(self, what: dict, empty_dtype: str, valid_only: bool = True) -> np.ndarray:
        if self.current is None:
            return np.zeros(0, dtype=empty_dtype)
        values = what[self.current.name]
        return values[self._valid()] if valid_only else values

    def _valid(self) -> np.ndarray:
        return (self._flags[self.current.name] & FLAG_NONFINITE) == 0

    @property
    def valid_mask(self) -> np.ndarray:
        """One bool per committed row of the pass, False where the row is flagged (the rows `ids` leaves out)."""
        return self._valid() if self.current is not None else np.zeros(0, dtype=bool)

    @property
    def statistics_files(self) -> dict[str, str]:
        """The statistics file of each finalized pass that has one (relative to the log), by pass name."""
        return dict(self._stats_files)

    @property
    def ids(self) -> np.ndarray:
        """Ids of the pass's valid rows, in row order (int64, or str objects for string ids)."""
        return self._index(self._ids, "i8")

    @property
    def steps(self) -> np.ndarray:
        """Training step of each valid row, aligned with `ids`."""
        return self._index(self._steps, "i8")

    @property
    def flagged_ids(self) -> np.ndarray:
        """Ids whose rows were flagged (non-finite gradient): kept on disk, left out of `ids`."""
        return self._index(self._ids, "i8", valid_only=False)[~self._valid()] if self.current else self.ids

    @property
    def committed_ids(self) -> np.ndarray:
        """Ids of every committed row, flagged ones included: the order of `include_flagged=True`."""
        return self._index(self._ids, "i8", valid_only=False)

    def __len__(self) -> int:
        return len(self.ids)

    def gradients(self, module: str, include_flagged: bool = False) -> torch.Tensor:
        """float32 (N, k_out, k_in) rows of one module, aligned with `ids` (or `committed_ids`)."""
        info = self._module(module)
        return self._read(info.columns, include_flagged).reshape(-1, info.k_out, info.k_in)

    def rows(self, include_flagged: bool = False) -> torch.Tensor:
        """float32 (N, D): whole rows, each module's block flattened at its offset, aligned with `ids`."""
        return self._read(slice(0, self.width), include_flagged)

    def blocks(
        self,
        columns: slice | None = None,
        block_rows: int | None = None,
        rows: slice | None = None,
        check_finite: bool = True,
        recycle: bool = False,
    ):
        """Yield (ids, float32 rows) over the pass's valid rows in order, `block_rows` at a time.

        This is how scoring streams a log larger than memory: one HDF5 read per block, the next
        block read on a background thread while the caller works on this one (so reading from
        disk and computing overlap; at most three blocks are in memory). block_rows defaults to
        about BLOCK_BYTES of float32 rows. `rows` restricts to a range of the pass's stored rows
        (flagged rows included in the counting). check_finite=False skips the check that valid
        rows are finite, for callers that check their results instead. recycle=True converts
        float16 rows into three buffers used in turn instead of fresh memory each block (fresh
        memory costs a page fault per 4 KB, most of the conversion's time): a block is then only
        valid until the next one is asked for, so it suits callers that keep nothing of it.
        """
        if block_rows is None:
            block_rows = default_block_rows(self.width)
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise ConfigError(f"block_rows must be a positive int, got {block_rows!r}")
        ring = _ConversionRing(RING_SLOTS) if recycle else None
        return _prefetched(self._blocks(columns, int(block_rows), rows, check_finite, ring), depth=RING_SLOTS - 2)

    def _blocks(self, columns, block_rows: int, rows, check_finite: bool, ring: _ConversionRing | None = None):
        p = self._require_pass()
        columns = columns or slice(0, self.width)
        all_ids, all_flags = self._ids[p.name], self._flags[p.name]
        lo, hi, _ = (rows or slice(None)).indices(len(all_ids))
        offset = 0
        for segment, n in zip(p.segments, self._committed[p.name]):
            first, last = max(lo - offset, 0), min(hi - offset, n)
            if first >= last:
                offset += n
                continue
            with self._open(segment) as f:
                for start in range(first, last, block_rows):
                    end = min(last, start + block_rows)
                    flags = all_flags[offset + start : offset + end]
                    valid = (flags & FLAG_NONFINITE) == 0
                    block = self._grads(f, segment, start, end, columns, flags, check_finite, ring)
                    ids = all_ids[offset + start : offset + end]
                    if not valid.all():  # a copy only when some rows are flagged
                        ids, block = ids[valid], block[valid]
                    yield ids, torch.from_numpy(block)
            offset += n

    def _read(self, columns: slice, include_flagged: bool) -> torch.Tensor:
        block = self._read_columns(columns)
        return torch.from_numpy(block if include_flagged else block[self._valid()])

    # -- attribution -----------------------------------------------------------------------------

    def query(self, model) -> Query:
        """A Query capturing test gradients with this log's modules and projections (nothing written)."""
        return Query(self, model)

    def influence(
        self,
        query: Query,
        preconditioner: str = "auto",
        *,
        damping=None,
        damping_factor: float = DEFAULT_DAMPING_FACTOR,
        mode: str = "dot",
        top_k: int | None = None,
        largest: bool = True,
        modules=None,
        train_ids=None,
        shard: tuple[int, int] | None = None,
        across_ranks: bool = False,
        block_rows: int | None = None,
        progress: bool | None = None,
        curvature: str = "auto",
    ):
        """Influence of every train row of the pass on every query row (+ = the train example helps).

        Returns Scores (values (Q, N), query_ids, train_ids); with top_k, a TopK computed while
        streaming, never holding Q x N. preconditioner: auto (the default: ekfac, else kfac, else
        raw, whichever the pass has statistics for first, else identity) | identity | raw | kfac |
        ekfac. damping: an
        absolute lambda (float, or {module: float}); default damping_factor x each module block's
        trace over its unprojected dimension d_in d_out (its mean eigenvalue at rank full).
        mode: dot | cosine | relative. modules / train_ids: restrict the score to some modules or
        some train ids. shard=(i, n): score only the i-th of n equal slices of the train rows
        (merge the parts with Scores.merge / TopK.merge). across_ranks: under torch.distributed,
        each rank scores its slice and every rank returns the merged
        result (every rank must pass the same query). progress: a tqdm bar (default: on a TTY).
        curvature: whose statistics precondition: "own" (the pass's rows: the empirical Fisher),
        "sampled" (its curvature pass, `start_pass(..., curvature_for=...)`), "auto" (the curvature
        pass where there is one, else own).
        """
        if across_ranks:
            if shard is not None:
                raise ConfigError("pass shard or across_ranks, not both")
            world = World()
            shard = (world.process_index, world.size)
        options = ScoreOptions(
            preconditioner=preconditioner,
            damping=damping,
            damping_factor=damping_factor,
            mode=mode,
            top_k=top_k,
            largest=largest,
            modules=modules,
            train_ids=train_ids,
            block_rows=block_rows,
            progress=progress,
            shard=shard,
            curvature=curvature,
        )
        result = score(self, query, options)
        if not across_ranks or not world.distributed:
            return result
        parts = world.gather(result)
        if any(not np.array_equal(part.query_ids, parts[0].query_ids) for part in parts):
            raise ConfigError("across_ranks: the ranks scored different queries; capture the same query on every rank")
        return type(result).merge(parts, largest) if top_k is not None else Scores.merge(parts)

    # every pass of the log, each where training used it: see logix.across_training
    influence_across_training = across_training.influence_across_training
    self_influence_across_training = across_training.self_influence_across_training

    def self_influence(
        self,
        preconditioner: str = "auto",
        damping=None,
        damping_factor: float = DEFAULT_DAMPING_FACTOR,
        modules=None,
        *,
        block_rows: int | None = None,
        progress: bool | None = None,
        curvature: str = "auto",
    ) -> SelfInfluence:
        """g_i^T (F + lambda I)^{-1} g_i for every valid train row: rank by it to find mislabeled examples.
        preconditioner as in `influence` (default auto).

        Values finalize stored (the pass's own curvature, default damping, all modules) are read
        back when asked for exactly that, never for another curvature or damping.
        """
        if curvature not in CURVATURE_SOURCES:
            raise ConfigError(f"curvature must be one of {CURVATURE_SOURCES}, got {curvature!r}")
        preconditioner = resolve_preconditioner(self, preconditioner)
        key = (self._require_pass().name, preconditioner, repr(damping), damping_factor, repr(modules), curvature)
        if key not in self._self_influence_cache:
            stored = None
            own = preconditioner == "identity" or statistics_file(self, curvature) == self._stats_files.get(
                self.current.name
            )
            if damping is None and damping_factor == DEFAULT_DAMPING_FACTOR and modules is None and own:
                stored = self._stored_self_influence(preconditioner)
            if stored is None:
                pre = Preconditioner(self, preconditioner, damping, damping_factor, modules, curvature)
                ids, values = self_influence_values(self, pre, block_rows, progress)
                stored = SelfInfluence(values, ids)
            self._self_influence_cache[key] = stored
        return self._self_influence_cache[key]

    def _stored_self_influence(self, preconditioner: str):
        name = self._stats_files.get(self._require_pass().name)
        if name is None:
            return None
        path = self.path / name
        stored = read_self_influence(path, preconditioner)
        if stored is None:
            return None
        values, attrs = stored
        if preconditioner != "identity" and not _stored_under_default(attrs):
            return None  # another damping rule (an older logix): recomputed, never reused
        if len(values) != len(self):
            return None  # rows were added since finalize: recompute
        return SelfInfluence(values, self.ids)

    @property
    def writer(self) -> Writer | None:
        """The job writing this log now (pid, host, start time), or None when none is.

        A pass that is not finalized while no job writes the log was left by a crash (or by
        run.close()); `logix.init(path, ..., resume=True)` continues it. Needs only read access.
        """
        try:
            return find_writer(self.path)
        except OSError as e:
            logger.warning("logix: cannot tell whether a job is writing %s: %s", self.path, e)
            return None

    def projections(self) -> dict[str, tuple]:
        """{module: (P_in, P_out)} float32 tensors, None for an unprojected side."""
        path = self.path / PROJECTIONS
        if self.modules and not path.is_file():
            raise LogFormatError(f"{path} is missing: the log's projections are lost")
        return check_projections(read_projections(path), self.modules.values(), path)

    def __repr__(self) -> str:
        name = self.current.name if self.current else None
        state = ""
        if self.current is not None and not self.current.finalized:
            state = ", being written" if self.writer is not None else ", NOT finalized"
        return f"Log({str(self.path)!r}, pass={name!r}, rows={len(self)}, modules={len(self.modules)}{state})"

    # -- reading segments ------------------------------------------------------------------------

    def _module(self, name: str) -> ModuleInfo:
        if name not in self.modules:
            raise NotInLogError(f"module {name!r} is not in this log; logged modules: {list(self.modules)}")
        return self.modules[name]

    def _open(self, segment: SegmentInfo) -> h5py.File:
        return open_segment(self.path / segment.file)

    def _read_index(self, segments) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        ids, flags, steps, counts = [], [], [], []
        for segment in segments:
            path = self.path / segment.file
            with self._open(segment) as f:
                try:
                    n = check_segment(
                        f, path, width=self.width, dtype=self.config.dtype, id_kind=self.id_kind, rows=segment.rows
                    )
                    ids.append(read_ids(f["ids"], n, path))
                    flags.append(read_rows(f["flags"], np.s_[:n]))
                    steps.append(read_rows(f["step"], np.s_[:n]))
                except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
                    if isinstance(e, LogFormatError):
                        raise
                    raise LogFormatError(f"segment {path} cannot be read: {e}") from e
                counts.append(n)
        if not ids:
            return np.zeros(0, dtype="i8"), np.zeros(0, dtype="u1"), np.zeros(0, dtype="i8"), counts
        return np.concatenate(ids), np.concatenate(flags), np.concatenate(steps), counts

    def _check_index(self, name: str, ids: np.ndarray, flags: np.ndarray) -> None:
        """Flags hold only known bits, and no id appears twice in a pass (the writer never does it)."""
        if np.any(flags & ~np.uint8(FLAG_NONFINITE)):
            raise LogFormatError(f"pass {name!r} of {self.path}: row flags hold unknown values; a segment is damaged")
        unique = np.unique(ids)
        if len(unique) != len(ids):
            values, counts = np.unique(ids, return_counts=True)
            raise LogFormatError(
                f"pass {name!r} of {self.path}: ids {values[counts > 1][:5].tolist()} appear more than once; "
                "a segment or the manifest is damaged"
            )

    def _grads(
        self,
        f: h5py.File,
        segment: SegmentInfo,
        start: int,
        end: int,
        columns: slice,
        flags: np.ndarray,
        check_finite: bool = True,
        ring: _ConversionRing | None = None,
    ):
        """float32 rows [start, end) of a segment; rows not flagged must be finite (else: damage)."""
        path = self.path / segment.file
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

    def _read_columns(self, columns: slice) -> np.ndarray:
        p = self._require_pass()
        parts, offset = [], 0
        flags = self._flags[p.name]
        for segment, n in zip(p.segments, self._committed[p.name]):
            with self._open(segment) as f:
                parts.append(self._grads(f, segment, 0, n, columns, flags[offset : offset + n]))
            offset += n
        width = columns.stop - columns.start
        return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.float32)
