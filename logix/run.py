"""The writer-side face of logix: `init` a log, `watch` a model, `capture` batches, `finalize`.

    run = logix.init("runs/digits", rank=16)
    run.watch(model)
    for ids, x, y in loader:
        with run.capture(ids):
            F.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad()
    run.finalize()

Each capture turns the batch's backward pass into one row per example: the LoGra-projected
gradient of that example's own loss, with the user's loss reduction divided out. Rows go through
a bounded queue to a background writer; training waits only when the writer falls behind.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import passes
from .capture import Capture, LossSpec, refuse_unentered, running
from .config import Config
from .disk.files import PROJECTIONS
from .disk.projections import read_projections, write_projections
from .distributed import World
from .engines import attacher_for
from .errors import CaptureError, ConfigError, LogixError
from .finalize import check_rows_readable, finalize_pass, passes_to_finalize
from .hooks import Watched, warn_if_compiled
from .intake import PassIntake, check_step
from .layout import ProjectionFit, RowLayout, check_same_modules
from .log_directory import LogDirectory, now
from .pass_ids import PassIds, check_on_duplicate
from .pass_sums import PassSums
from .pass_writer import QUEUE_BYTES, PassWriter, WriterOptions
from .training_record import TrainingRecord

logger = logging.getLogger("logix")

_open_runs: weakref.WeakSet = weakref.WeakSet()


def init(
    path: str | Path,
    rank: int | str | tuple = 64,
    dtype: str = "float32",
    projection: str = "gaussian",
    seed: int = 0,
    statistics: str | Sequence[str] | None = None,
    *,
    row_bytes: int | None = None,
    resume: bool = False,
    distributed: bool | None = None,
    on_duplicate: str = "error",
    queue_size: int = 16,
    commit_interval: float = 1.0,
    queue_bytes: int = QUEUE_BYTES,
) -> Run:
    """Create a log at `path` (a directory), or add a session to the log already there.

    statistics: curvature to gather for attribution, "kfac", "ekfac" and/or "raw" (see Config).
    row_bytes: with rank="auto" (and projection="pca"), the bytes a stored row may take; each
        module's ranks are then chosen in `run.fit_projections()` from the measured covariances.
    An existing log must have been written with the same rank, dtype, projection, seed,
    statistics and row_bytes.
    resume: continue the log after a crash or a restart from a checkpoint: captures go on in the
        latest unfinalized pass (or the one `start_pass` names), in a new segment, and ids that
        pass already committed are skipped rather than written twice.
    distributed: None (default) logs with every rank of torch.distributed when it is initialised
        (call logix.init on every rank, after init_process_group); False logs from this process
        alone, as rank 0 of its own log (e.g. a logging pass run on one rank only).
    on_duplicate: "error" (default) refuses an id seen before in the same pass; "skip" drops its
        row silently (for samplers that pad the last batch with repeats). Under torch.distributed,
        repeats are always skipped: DDP's and Accelerate's samplers pad the last batches with them.
    queue_size / queue_bytes: batches, and bytes of rows (default 256 MiB; pinned host memory on a
        GPU), the writer may lag behind before training waits for it; a larger batch goes alone.
    commit_interval: seconds between commits; rows are committed at the latest this long after written.
    """
    config = Config(
        rank=rank, dtype=dtype, projection=projection, seed=seed, statistics=statistics, row_bytes=row_bytes
    )
    return Run(
        path,
        config,
        resume=resume,
        distributed=distributed,
        on_duplicate=on_duplicate,
        writer=WriterOptions(queue_size, commit_interval, queue_bytes),
    )


class Run:
    """An open log being written by this process. Create it with `logix.init`.

    Under torch.distributed every rank opens the run (same path and config), watches the same
    modules and captures its own batches into its own segments; rank 0 owns the manifest, and
    finalize all-reduces the statistics and records every rank's segments.
    """

    def __init__(
        self,
        path: str | Path,
        config: Config,
        *,
        resume: bool = False,
        distributed: bool | None = None,
        on_duplicate: str = "error",
        writer: WriterOptions | None = None,
    ):
        check_on_duplicate(on_duplicate)  # before the log is opened: a refused run leaves no session behind
        writer = writer or WriterOptions()
        self.path = Path(path)
        self.config = config
        self.resume = bool(resume)
        self.on_duplicate = on_duplicate
        if distributed not in (None, True, False):
            raise ConfigError(f"distributed must be None, True or False, got {distributed!r}")
        self.world = World.alone() if distributed is False else World()
        if distributed and not self.world.distributed:
            raise ConfigError("distributed=True but torch.distributed is not initialised with more than one rank")
        self.process_index = self.world.process_index
        self._ids = PassIds(on_duplicate, self.world.distributed, self.process_index)
        self._layout = RowLayout(config)  # what a row holds, once a model is watched
        self._training: TrainingRecord | None = None  # steps and learning rates, with watch(optimizer=)
        self._fitting = None
        self._pass: dict | None = None
        self._session_passes: set[str] = set()
        self._failed_passes: set[str] = set()
        self._closed = False
        self._last_capture: Capture | None = None
        self._created: Capture | None = None  # the latest capture handed out, to check it was entered
        self._directory = LogDirectory(self.path, config, self.world)
        self._manifest = self._directory.manifest
        self.session = self._manifest["sessions"] - 1
        self._pass_sums = PassSums(self.path, config.factors, self.process_index, self.session)
        self._rows = PassWriter(self.path, config.dtype, self.process_index, self.session, writer)
        self._intake = PassIntake(self._directory, self.world, self._ids, self._pass_sums, self._rows)
        _open_runs.add(self)

    @property
    def step(self) -> int:
        """The training step the next rows are recorded at: optimizer steps with watch(optimizer=),
        else captures."""
        return self._intake.step

    @step.setter
    def step(self, value: int) -> None:
        self._intake.step = value

    def _save_manifest(self) -> None:
        self._directory.save()

    # -- choosing what to log ----------------------------------------------------------------------

    def watch(
        self,
        model: nn.Module,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        include_frozen: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> list[str]:
        """Choose the modules to log; returns their (normalised) names.

        Hooks are not installed here: they exist only inside `capture`. `include`/`exclude` are
        glob patterns on module names (`exclude=["lm_head"]`). Frozen modules are skipped unless
        `include_frozen`. With `optimizer`, each row records the optimizer step it belongs to;
        otherwise the step counts captures.
        """
        self._check_open()
        if self.watched:
            raise ConfigError("this run already watches a model; one model per run")
        stored = read_projections(self.path / PROJECTIONS) if self._manifest["modules"] else {}
        layout = RowLayout(self.config)
        logged = {m["name"]: m for m in self._manifest["modules"]}
        layout.choose(model, include, exclude, include_frozen, logged, stored)
        self.config.check_width(layout.width)
        check_same_modules(self.world.gather(layout.entries()), self._manifest["modules"], self.path)
        self._layout = layout
        if not self._manifest["modules"] and not layout.pending:  # else written once fit_projections has run
            self._write_modules()
        warn_if_compiled(model)
        attach = attacher_for(model)  # an engine (DeepSpeed's) whose backward an adapter follows
        if attach is not None:
            attach(self, model)
        if optimizer is not None:
            self._training = TrainingRecord(optimizer, self._count_step)
            self._intake.steps_by_capture = False
        logger.info("logix: watching %d modules, %d numbers per row", len(layout.watched), layout.width)
        return [w.name for w in layout.watched]

    @property
    def watched(self) -> list[Watched]:
        """The watched modules, with their ranks, projections and places in a row."""
        return self._layout.watched

    def _write_modules(self) -> None:
        """The row layout and projections, written once: the log's rows mean this from now on."""
        if self.process_index == 0:
            write_projections(self.path / PROJECTIONS, self._layout.projections())
        self._manifest["modules"] = self._layout.entries()
        self._manifest["width"] = self._layout.width
        self._save_manifest()

    @contextmanager
    def fit_projections(self):
        """A statistics-only pass that builds PCA projections (projection="pca"); nothing is logged.

        Inside the block, run captures as in logging. Sides with rank below their dimension get the
        top eigenvectors of that side's full covariance (activations for P_in, output gradients for
        P_out); sides wider than logix.projection.PCA_MAX_DIM keep their Gaussian projection.
        """
        self._check_open()
        if self.config.projection != "pca":
            raise ConfigError("fit_projections needs logix.init(..., projection='pca')")
        if not self.watched:
            raise CaptureError("call run.watch(model) before run.fit_projections()")
        if not self._layout.pending:
            raise ConfigError("this log's projections are already fitted (they are stored in the log)")
        self._fitting = ProjectionFit(self._layout)
        try:
            yield self
            self._refuse_unentered()
            self._fitting.finish(self.world)
        finally:
            self._fitting = None
        self._write_modules()
        logger.info(
            "logix: PCA projections fitted for %d modules, %d numbers per row", len(self.watched), self._layout.width
        )

    def _count_step(self) -> None:
        self._intake.count_step()

    # -- passes ----------------------------------------------------------------------------------

    def start_pass(
        self,
        name: str | None = None,
        *,
        step: int | None = None,
        lr: float | None = None,
        checkpoint: str | None = None,
        curvature_for: str | None = None,
        **meta: Any,
    ) -> str:
        """End the current pass (its rows are written out) and start a new one.

        A pass is an epoch, a segment of training, or a logging pass at a fixed checkpoint; ids
        are unique within it and may repeat across passes. Its metadata (training step, learning
        rate, checkpoint path, anything JSON-serialisable) is kept in the manifest. With
        `logix.init(..., resume=True)`, naming an existing unfinalized pass continues it.
        Under torch.distributed every rank calls this together.

        curvature_for: make this a curvature pass for an earlier pass: capture gradients at labels
        drawn from the model (`logix.sampled_labels`), at that pass's checkpoint, and that pass's
        statistics come from these rows (the true Fisher / GGN for cross-entropy) wherever
        `curvature="auto"`. A curvature pass is never scored as training data.
        """
        self._check_open()
        self._refuse_unentered()
        existing = passes.pass_to_continue(self._manifest["passes"], name, self.resume, self.path)
        if existing is not None:
            self._end_pass()
            self._continue_pass(existing)
            return name
        meta = {"step": self.step if step is None else check_step(step), "lr": lr, "checkpoint": checkpoint, **meta}
        entry = passes.new_pass(self._manifest["passes"], name, meta, curvature_for, self.config.statistics, self.path)
        self._end_pass()
        self.step = meta["step"]
        meta["started"] = now()
        self._pass = entry
        self._manifest["passes"].append(entry)
        self._begin_pass(set())
        return entry["name"]

    def _continue_pass(self, p: dict) -> None:
        """Resume a pass: adopt segments a crash left out of the manifest, skip ids already committed."""
        covered_rows = passes.adopt_crashed(self.path, p, self.session, bool(self.config.factors))
        covered, rows_only = passes.committed_ids_of(self.path, p, covered_rows)
        self._pass = p
        self.step = max(self.step, int(p["meta"].get("step") or 0))
        skipped = (covered + rows_only).total()
        logger.info("logix: resuming pass %r: %d rows already committed will be skipped", p["name"], skipped)
        self._begin_pass(covered, rows_only)

    def _begin_pass(self, committed, rows_only=()) -> None:
        """committed: ids to skip; rows_only: ids whose rows are committed but whose statistics were
        lost in a crash: their rows are skipped, their statistics counted when they come again."""
        self._pass_sums.begin()
        self._session_passes.add(self._pass["name"])
        self._ids.begin(committed, rows_only, draws="curvature_for" in self._pass["meta"])
        self._intake.pass_entry = self._pass
        if self._training is not None:
            self._training.begin(self._pass["meta"])
        self._save_manifest()

    def _default_pass(self) -> None:
        """The pass a capture lands in when none was started: a resumed one, or a new one."""
        self.start_pass(passes.pass_to_resume(self._manifest["passes"]) if self.resume else None)

    def _end_pass(self) -> None:
        """Drain and close the pass's writer, and keep its statistics; collective across ranks.

        A writer failure leaves the pass unfinalizable (on every rank) and re-raises here.
        """
        if self._pass is None:
            return
        if self._training is not None:
            self._training.end()
        p = self._pass
        segment, error = self._rows.close()
        passes.record_closed_segment(self.path, p, segment)
        self._ids.report_skipped(p["name"], self.world.distributed)
        mine = [s for s in p["segments"] if s["rank"] == self.process_index and s["session"] == self.session]
        report = {"segments": mine, "failed": error is not None, "id_kind": self._manifest["id_kind"]}
        reports = self.world.gather(report)
        if passes.gather_segments(p, reports):
            self._failed_passes.add(p["name"])
        self._manifest["id_kind"] = self._manifest["id_kind"] or next(
            (r["id_kind"] for r in reports if r["id_kind"]), None
        )
        file = self._pass_sums.end(self.world, p["index"])  # collective: every process's sums added up
        if file is not None:
            p.setdefault("statistics_parts", []).append(file)
        self._pass = self._intake.pass_entry = None
        self._save_manifest()
        self._pass_sums.partial_file(p["index"]).unlink(missing_ok=True)  # the final sums are listed now
        if error is not None:
            raise error

    # -- capture ---------------------------------------------------------------------------------

    def capture(
        self,
        ids: Sequence | Tensor,
        *,
        mask: Tensor | None = None,
        reduction: str = "mean",
        scale: float | Tensor | None = None,
        scaler: Any = None,
        step: int | None = None,
    ) -> Capture:
        """Log one batch: run its forward and `loss.backward()` inside this context.

        ids: one per example (ints, strings or a 1-D int tensor), unique within the pass.
        mask: (B, T) attention mask of 0/1 values (bool or numbers); positions where it is 0 are left out.
        reduction / scale / scaler: how the backpropagated loss relates to the examples' own
            losses: loss = scale * mean_i(loss_i) for "mean", scale * sum_i(loss_i) for "sum",
            further multiplied by scaler.get_scale() when a GradScaler is passed. For sequences,
            an example's own loss is the sum over its label tokens: a loss averaged over all
            tokens of the batch is reduction="sum", scale=1/num_tokens.
        step: the training step recorded with the rows, an int (default: the run's step counter).
        """
        self._check_open()
        self._refuse_unentered()
        if not self.watched:
            raise CaptureError("call run.watch(model) before run.capture(...)")
        loss, step = LossSpec(mask, reduction, scale, scaler), check_step(step)  # before any pass starts
        if self._fitting is not None:
            self._created = self._fitting.capture(ids, loss)
            return self._created
        if self._layout.pending:
            raise CaptureError("projection='pca': run a statistics pass inside `with run.fit_projections():` first")
        if self._pass is None:
            self._default_pass()
        self._last_capture = Capture(
            self.watched,
            ids,
            loss,
            check=self._intake.check,
            accept=lambda ids, rows, factor: self._intake.accept(ids, rows, factor, step),
            observer=self._pass_sums.observer,
            discard=self._pass_sums.discard,
        )
        self._created = self._last_capture
        return self._last_capture

    def _refuse_unentered(self) -> None:
        """The last capture must have been entered: one that never ran its block logged nothing."""
        cap, self._created = self._created, None
        refuse_unentered(cap)

    @property
    def active_capture(self) -> Capture | None:
        """The capture whose block is running now, if any (framework adapters hook its loss)."""
        return running(self._last_capture)

    # -- the end -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every captured row is written and committed, and checkpoint the pass's statistics
        (the pass stays open)."""
        self._check_open()
        self._refuse_unentered()
        self._rows.flush()
        if self._pass is not None:
            self._pass_sums.checkpoint(self._pass["index"], self._rows.writer)

    def finalize(self) -> None:
        """Write out every row and mark this session's passes complete. Idempotent.

        If the last capture was never entered, its batch is missing: the run is closed without
        finalizing (committed rows kept; resume=True continues the pass) and CaptureError raised.
        """
        if self._closed:
            return
        try:
            self._refuse_unentered()
        except CaptureError as e:
            self.close()
            raise CaptureError(f"{e}. The run is closed without finalizing; its committed rows are kept") from None
        self.close(finalized=True)

    def close(self, finalized: bool = False) -> None:
        """Write out and commit every row without marking passes complete (as after a crash)."""
        if self._closed:
            return
        self._closed = True
        if self._training is not None:
            self._training.remove()  # no more steps; the open pass's record is settled by _end_pass
        try:
            self._end_pass()
        finally:
            try:
                if finalized:
                    self._finalize_on_rank0()
            finally:
                self._save_manifest()
                self._directory.release()
                _open_runs.discard(self)
                self.world.barrier()  # no rank returns before rank 0 has written the final manifest

    def _finalize_on_rank0(self) -> None:
        """Rank 0 derives the statistics from every rank's segments; the others learn how it went."""
        error = None
        if self.process_index == 0:
            try:
                for p in passes_to_finalize(self._manifest, self._session_passes, self._failed_passes, self.resume):
                    if p["name"] not in self._session_passes:  # ended by the crashed job before this one resumed
                        passes.adopt_crashed(self.path, p, self.session, bool(self.config.factors))
                    self._finalize_pass(p)
            except Exception as e:
                error = e
        outcome = self.world.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if outcome is not None:
            raise LogixError(f"rank 0 could not finalize {self.path}: {outcome}")

    def _finalize_pass(self, p: dict) -> None:
        """Derive the pass's curvature (if asked) and mark it complete."""
        self._save_manifest()  # a kill during the statistics pass leaves every segment listed: resumable
        if self.config.statistics and p["segments"]:
            p["statistics"] = finalize_pass(self.path, self._manifest, p, self.config.statistics)
        elif p["segments"]:
            check_rows_readable(self.path, self._manifest, p)
        p["finalized"] = True

    def _check_open(self) -> None:
        if self._closed:
            raise CaptureError(f"the run on {self.path} is finalized or closed; open a new one with logix.init")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.close()

    def __repr__(self) -> str:
        name = self._pass["name"] if self._pass else None
        return f"Run({str(self.path)!r}, pass={name!r}, modules={len(self.watched)}, closed={self._closed})"


@atexit.register
def _close_open_runs() -> None:
    """Commit what is queued if the user never called finalize (passes stay unfinalized)."""
    for run in list(_open_runs):
        try:
            run.world = World.alone(run.process_index)  # other ranks may be gone: no collectives at exit
            run.close()
        except Exception as e:  # noqa: BLE001 - nothing to raise to at interpreter exit
            logger.error("logix: closing %s at exit failed: %s", run.path, e)
