"""Reading a log: `logix.open(path)` gives a read-only snapshot of every committed row.

`Log` is the user-facing view: which pass it reads, that pass's ids, steps and flags, its
gradients as tensors (whole, per module, or streamed in blocks), and attribution over it (query,
influence, self-influence). The files themselves are read by the disk wing: each pass's rows by a
`logix.disk.rows.PassRows`, made at open (or at `refresh()`) from the manifest, so the view sees
exactly the rows below each segment's `committed` counter then, also while training still writes.
The reader never needs the model's code and never executes anything from the files (JSON and
HDF5 datasets only).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import across_training, token_split
from . import complexity as ifcomp
from .config import Config
from .curvature import (
    Preconditioner,
    check_curvature,
    check_damping,
    default_damping,
    resolve_preconditioner,
    self_influence_values,
    statistics_file,
)
from .disk.files import FLAG_NONFINITE, PROJECTIONS
from .disk.lock import Writer, find_writer
from .disk.manifest import ModuleInfo, SegmentInfo, read_manifest
from .disk.projections import check_projections, read_projections
from .disk.rows import BLOCK_BYTES as BLOCK_BYTES  # where the CLI and benchmarks import them from
from .disk.rows import PassRows
from .disk.rows import default_block_rows as default_block_rows
from .disk.statistics import read_self_influence
from .distributed import World
from .errors import ConfigError, LogFormatError, NotInLogError
from .influence import ScoreOptions, score
from .progress import check_progress
from .query import Query
from .results import Scores, SelfInfluence

logger = logging.getLogger("logix")


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


def _stored_under_default(attrs, preconditioner: str) -> bool:
    """Whether stored self-influences say they were computed with today's default damping."""
    rule, factor = attrs.get("damping_rule"), attrs.get("damping_factor")
    if isinstance(rule, bytes):
        rule = rule.decode("utf-8", "replace")
    try:
        return (rule, float(factor)) == default_damping(preconditioner)
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
        self._rows: dict[str, PassRows] = {}
        self._stats_files = {p["name"]: p["statistics"] for p in manifest["passes"] if p.get("statistics")}
        self._self_influence_cache = {}
        passes = []
        for p in manifest["passes"]:
            segments = tuple(SegmentInfo(**s) for s in p["segments"])
            draws = "curvature_for" in p.get("meta", {})  # a curvature pass: an id's rows are its draws
            rows = PassRows(self.path, p["name"], segments, self.width, self.config.dtype, self.id_kind, draws)
            self._rows[p["name"]] = rows
            passes.append(
                PassInfo(
                    name=p["name"],
                    index=p["index"],
                    meta=p.get("meta", {}),
                    segments=segments,
                    finalized=bool(p.get("finalized", False)),
                    rows=len(rows.ids),
                    nonfinite=int((rows.flags & FLAG_NONFINITE).astype(bool).sum()),
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
        for p in self.passes if isinstance(name, str) else ():  # an array's == would not say yes or no
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

    def _pass_rows(self) -> PassRows:
        return self._rows[self._require_pass().name]

    def _index(self, what: str, empty_dtype: str, valid_only: bool = True) -> np.ndarray:
        if self.current is None:
            return np.zeros(0, dtype=empty_dtype)
        values = getattr(self._rows[self.current.name], what)
        return values[self._valid()] if valid_only else values

    def _valid(self) -> np.ndarray:
        return self._rows[self.current.name].valid

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
        return self._index("ids", "i8")

    @property
    def steps(self) -> np.ndarray:
        """Training step of each valid row, aligned with `ids`."""
        return self._index("steps", "i8")

    @property
    def flagged_ids(self) -> np.ndarray:
        """Ids whose rows were flagged (non-finite gradient): kept on disk, left out of `ids`."""
        return self._index("ids", "i8", valid_only=False)[~self._valid()] if self.current else self.ids

    @property
    def committed_ids(self) -> np.ndarray:
        """Ids of every committed row, flagged ones included: the order of `include_flagged=True`."""
        return self._index("ids", "i8", valid_only=False)

    def __len__(self) -> int:
        return len(self.ids)

    def _module(self, name: str) -> ModuleInfo:
        if not isinstance(name, str) or name not in self.modules:  # a list or a set is no name (nor hashable)
            raise NotInLogError(f"module {name!r} is not in this log; logged modules: {list(self.modules)}")
        return self.modules[name]

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
        return self._pass_rows().blocks(columns, block_rows, rows, check_finite, recycle)

    def _read(self, columns: slice, include_flagged: bool) -> torch.Tensor:
        block = self._pass_rows().read(columns)
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
        damping_factor: float | None = None,
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
        aggregate: str | None = None,
        query_groups=None,
    ):
        """Influence of every train row of the pass on every query row (+ = the train example helps).

        Returns Scores (values (Q, N), query_ids, train_ids); with top_k, a TopK computed while
        streaming, never holding Q x N. preconditioner: auto (the default: row where the pass's
        curvature pass has it, else ekfac, else kfac, else raw, whichever the pass has statistics
        for first, else identity) | identity | raw | kfac | ekfac | row. damping: an absolute
        lambda (float, or {module: float}); default damping_factor (None: 0.1) x each module
        block's trace over its unprojected dimension d_in d_out (its mean eigenvalue at rank
        full); for row, damping_factor (None: 0.3) x its trace / D.
        mode: dot | cosine | relative. modules / train_ids: restrict the score to some modules or
        some train ids. shard=(i, n): score only the i-th of n equal slices of the train rows
        (merge the parts with Scores.merge / TopK.merge). across_ranks: under torch.distributed,
        each rank scores its slice and every rank returns the merged
        result (every rank must pass the same query). progress: a tqdm bar (default: on a TTY).
        curvature: whose statistics precondition: "own" (the pass's rows: the empirical Fisher),
        "sampled" (its curvature pass, `start_pass(..., curvature_for=...)`), "auto" (the curvature
        pass where there is one, else own).

        aggregate="sum" | "mean": one score per train example for the whole query set (or, with
        query_groups, one label per query row, per group) instead of one per query: Scores of
        shape (G, N) whose query_ids are the group labels (or ["sum"] / ["mean"]); with top_k, the
        train examples that matter most to the group. Exact in every mode: the sum (mean) over the
        group's queries of the scores that mode gives. Streamed like top_k: one row per group in
        memory, never Q x N.
        """
        if not isinstance(across_ranks, bool):
            raise ConfigError(f"across_ranks must be True or False, got {across_ranks!r}")
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
            aggregate=aggregate,
            query_groups=query_groups,
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

    # IF-COMP: pNML predictions and complexity of new inputs (see logix.complexity)
    complexity = ifcomp.complexity
    choose_temperature = ifcomp.choose_temperature

    # a sequence's score split over its positions (see logix.token_split)
    token_influence = token_split.token_influence
    query_token_influence = token_split.query_token_influence

    def self_influence(
        self,
        preconditioner: str = "auto",
        damping=None,
        damping_factor: float | None = None,
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
        check_curvature(curvature)
        check_progress(progress)  # before the cache: a value found there draws no bar
        preconditioner = resolve_preconditioner(self, preconditioner, curvature)
        damping, damping_factor = check_damping(damping, damping_factor, self.modules)  # floats: the key hashes
        key = (self._require_pass().name, preconditioner, repr(damping), damping_factor, repr(modules), curvature)
        if key not in self._self_influence_cache:
            stored = None
            own = preconditioner == "identity" or statistics_file(self, curvature) == self._stats_files.get(
                self.current.name
            )
            default = damping_factor in (None, default_damping(preconditioner)[1])
            if damping is None and default and modules is None and own:
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
        if preconditioner != "identity" and not _stored_under_default(attrs, preconditioner):
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
        if self.modules and not os.path.lexists(path):  # anything else there is read_projections' to name
            raise LogFormatError(f"{path} is missing: the log's projections are lost")
        return check_projections(read_projections(path), self.modules.values(), path)

    def __repr__(self) -> str:
        name = self.current.name if self.current else None
        state = ""
        if self.current is not None and not self.current.finalized:
            state = ", being written" if self.writer is not None else ", NOT finalized"
        return f"Log({str(self.path)!r}, pass={name!r}, rows={len(self)}, modules={len(self.modules)}{state})"


def open_log(path: str | Path, pass_name: str | None = None) -> Log:
    """`logix.open`: a log read-only (the latest pass unless `pass_name` is given)."""
    return Log(path, pass_name=pass_name)
