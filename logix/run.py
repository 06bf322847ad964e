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
import json
import logging
import warnings
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .capture import Capture, id_kind
from .config import Config
from .errors import CaptureError, ConfigError, DuplicateIdError, ModelMismatchError
from .hooks import Watched, select_modules
from .projection import gaussian, module_seed, pca_fits, principal_directions, side_rank
from .statistics import CovarianceSums, factors, finalize_pass, save_sums
from .storage import (
    FLAG_NONFINITE,
    FORMAT,
    MANIFEST,
    PROJECTIONS,
    SCHEMA_VERSION,
    BackgroundWriter,
    Batch,
    SegmentWriter,
    read_manifest,
    read_projections,
    segment_name,
    write_json_atomic,
    write_projections,
)

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
    on_duplicate: str = "error",
    queue_size: int = 16,
    commit_interval: float = 1.0,
) -> Run:
    """Create a log at `path` (a directory), or add a session to the log already there.

    statistics: curvature to gather for attribution, "kfac", "ekfac" and/or "raw" (see Config).
    An existing log must have been written with the same rank, dtype, projection, seed and
    statistics.
    on_duplicate: "error" (default) refuses an id seen before in the same pass; "skip" drops its
        row silently (for samplers that pad the last batch with repeats).
    queue_size: batches the writer may lag behind before training waits for it.
    commit_interval: seconds between commits; rows are committed at the latest this long after written.
    """
    config = Config(rank=rank, dtype=dtype, projection=projection, seed=seed, statistics=statistics)
    return Run(path, config, on_duplicate=on_duplicate, queue_size=queue_size, commit_interval=commit_interval)


class Run:
    """An open log being written by this process. Create it with `logix.init`."""

    def __init__(
        self,
        path: str | Path,
        config: Config,
        *,
        on_duplicate: str = "error",
        queue_size: int = 16,
        commit_interval: float = 1.0,
    ):
        if on_duplicate not in ("error", "skip"):
            raise ConfigError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError(f"queue_size must be an int of at least 1, got {queue_size!r}")
        if isinstance(commit_interval, bool) or not isinstance(commit_interval, (int, float)) or commit_interval < 0:
            raise ConfigError(f"commit_interval must be a non-negative number of seconds, got {commit_interval!r}")
        self.path = Path(path)
        self.config = config
        self.on_duplicate = on_duplicate
        self.queue_size = queue_size
        self.commit_interval = commit_interval
        self.rank = 0  # the process rank; set by the distributed integrations
        self.step = 0
        self.watched: list[Watched] = []
        self._optimizer_hook = None
        self._writer: BackgroundWriter | None = None
        self._sums: CovarianceSums | None = None
        self._pca_pending: dict[str, tuple[bool, bool]] = {}
        self._new_modules = None
        self._fitting = None
        self._pass: dict | None = None
        self._seen: set = set()
        self._session_passes: set[str] = set()
        self._failed_passes: set[str] = set()
        self._closed = False
        self._last_capture: Capture | None = None
        self._manifest = self._open_or_create()
        self.session = self._manifest["sessions"]
        self._manifest["sessions"] += 1
        self._save_manifest()
        _open_runs.add(self)

    # -- the log directory -----------------------------------------------------------------------

    def _open_or_create(self) -> dict:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file; a log is a directory: choose another path")
        if (self.path / MANIFEST).exists():
            manifest = read_manifest(self.path)
            logged = Config.from_json(manifest["config"])
            if logged != self.config:
                raise ConfigError(
                    f"{self.path} was written with another config ({'; '.join(self.config.differences(logged))}); "
                    "open it with the same settings or write to a new path"
                )
            return manifest
        if self.path.is_dir() and any(self.path.iterdir()):
            raise ConfigError(f"{self.path} exists, is not empty, and is not a logix log: refusing to write into it")
        self.path.mkdir(parents=True, exist_ok=True)
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "logix_version": __version__,
            "created": _now(),
            "config": self.config.to_json(),
            "id_kind": None,
            "width": 0,
            "modules": [],
            "sessions": 0,
            "passes": [],
        }

    def _save_manifest(self) -> None:
        write_json_atomic(self.path / MANIFEST, self._manifest)

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
        chosen = select_modules(model, include, exclude, include_frozen)
        stored = read_projections(self.path / PROJECTIONS) if self._manifest["modules"] else {}
        watched, offset = [], 0
        for name, module, kind in chosen:
            d_in, d_out = kind.dims(module)
            k_in, k_out = side_rank(self.config.rank_in, d_in), side_rank(self.config.rank_out, d_out)
            if name in stored:
                p_in, p_out = stored[name]
            else:
                p_in = gaussian(k_in, d_in, module_seed(self.config.seed, name, "in"))
                p_out = gaussian(k_out, d_out, module_seed(self.config.seed, name, "out"))
                if self.config.projection == "pca":
                    self._pca_pending[name] = (pca_fits(k_in, d_in), pca_fits(k_out, d_out))
            watched.append(Watched(name, module, kind, d_in, d_out, k_in, k_out, offset, p_in, p_out))
            offset += k_in * k_out
        modules = [
            {
                "name": w.name,
                "kind": w.kind.name,
                "d_in": w.d_in,
                "d_out": w.d_out,
                "k_in": w.k_in,
                "k_out": w.k_out,
                "offset": w.offset,
                "bias": w.kind.has_bias(w.module),
            }
            for w in watched
        ]
        if self._manifest["modules"]:
            if modules != self._manifest["modules"]:
                logged = {m["name"]: (m["d_out"], m["d_in"]) for m in self._manifest["modules"]}
                asked = {m["name"]: (m["d_out"], m["d_in"]) for m in modules}
                raise ModelMismatchError(
                    f"the model does not match the modules logged in {self.path}: "
                    f"missing {sorted(set(logged) - set(asked))}, new {sorted(set(asked) - set(logged))}, "
                    f"different shapes {sorted(n for n in set(logged) & set(asked) if logged[n] != asked[n])}"
                    " (or a different include/exclude selection)"
                )
        self.watched = watched
        self._new_modules = None
        if not self._manifest["modules"]:
            if self._pca_pending:
                self._new_modules = (modules, offset)  # written once fit_projections has run
            else:
                self._write_modules(modules, offset)
        _warn_if_compiled(model)
        if type(model).__name__ == "DeepSpeedEngine":
            from .integrations.deepspeed import attach  # measures engine.backward's loss scaling

            attach(self, model)
        if optimizer is not None:
            self._optimizer_hook = optimizer.register_step_post_hook(self._on_optimizer_step)
        logger.info("logix: watching %d modules, %d numbers per row", len(watched), offset)
        return [w.name for w in watched]

    def _write_modules(self, modules: list[dict], width: int) -> None:
        write_projections(self.path / PROJECTIONS, {w.name: (w.proj_in, w.proj_out) for w in self.watched})
        self._manifest["modules"] = modules
        self._manifest["width"] = width
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
        if not self._pca_pending:
            raise ConfigError("this log's projections are already fitted (they are stored in the log)")
        fit_watched = []
        for w in self.watched:
            fit_in, fit_out = self._pca_pending[w.name]
            p_in, k_in = (None, w.d_in) if fit_in else (w.proj_in, w.k_in)
            p_out, k_out = (None, w.d_out) if fit_out else (w.proj_out, w.k_out)
            fit_watched.append(Watched(w.name, w.module, w.kind, w.d_in, w.d_out, k_in, k_out, 0, p_in, p_out))
        self._fitting = (fit_watched, CovarianceSums())
        try:
            yield self
            sums = self._fitting[1].to_host()
        finally:
            self._fitting = None
        for w in self.watched:
            fit_in, fit_out = self._pca_pending[w.name]
            if w.name not in sums:
                raise CaptureError(f"module {w.name!r} received no gradient during fit_projections")
            a, s = factors(sums[w.name], w.name)
            if fit_in:
                w.proj_in = principal_directions(a, w.k_in, w.name, "A")
            if fit_out:
                w.proj_out = principal_directions(s, w.k_out, w.name, "S")
            w._cache.clear()
        self._pca_pending = {}
        self._write_modules(*self._new_modules)
        self._new_modules = None
        logger.info("logix: PCA projections fitted for %d modules", len(self.watched))

    def _on_optimizer_step(self, *args) -> None:
        self.step += 1

    # -- passes ----------------------------------------------------------------------------------

    def start_pass(
        self,
        name: str | None = None,
        *,
        step: int | None = None,
        lr: float | None = None,
        checkpoint: str | None = None,
        **meta: Any,
    ) -> str:
        """End the current pass (its rows are written out) and start a new one.

        A pass is an epoch, a segment of training, or a logging pass at a fixed checkpoint; ids
        are unique within it and may repeat across passes. Its metadata (training step, learning
        rate, checkpoint path, anything JSON-serialisable) is kept in the manifest.
        """
        self._check_open()
        index = len(self._manifest["passes"])
        name = name if name is not None else f"pass{index}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a pass name must be a non-empty string, got {name!r}")
        if name in {p["name"] for p in self._manifest["passes"]}:
            raise ConfigError(f"pass {name!r} already exists in {self.path}; pick a new name")
        meta = {"step": self.step if step is None else int(step), "lr": lr, "checkpoint": checkpoint, **meta}
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"pass metadata must be JSON-serialisable: {e}") from None
        self._end_pass()
        self.step = meta["step"]
        meta["started"] = _now()
        self._pass = {"name": name, "index": index, "meta": meta, "segments": [], "finalized": False}
        self._sums = CovarianceSums() if self.config.factors else None
        self._manifest["passes"].append(self._pass)
        self._session_passes.add(name)
        self._seen = set()
        self._save_manifest()
        return name

    def _end_pass(self) -> None:
        """Drain and close the pass's writer; a writer failure leaves the pass unfinalizable."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        entry = next(s for s in self._pass["segments"] if self.path / s["file"] == writer.segment.path)
        try:
            writer.close()
        except BaseException:
            self._failed_passes.add(self._pass["name"])
            raise
        finally:
            entry["rows"] = writer.segment.committed_rows
            self._save_sums()
            self._save_manifest()
        segment = writer.segment
        logger.info("logix: %s: %d rows (%d non-finite)", segment.path.name, segment.rows, segment.nonfinite)

    def _save_sums(self) -> None:
        """Keep this session's covariance sums of the pass beside its segment."""
        if self._sums is None or not self._sums.a_sum:
            return
        file = f"statistics/p{self._pass['index']:03d}-r{self.rank}-s{self.session:03d}.h5"
        save_sums(self.path / file, self._sums.to_host())
        self._pass.setdefault("statistics_parts", []).append(file)
        self._sums = CovarianceSums()

    def _check_id_kind(self, ids: list) -> str:
        kind = id_kind(ids)
        logged = self._manifest["id_kind"]
        if logged is not None and logged != kind:
            raise CaptureError(f"this log's ids are {logged}s; got {kind} ids")
        return kind

    def _writer_for_pass(self, id_kind: str) -> BackgroundWriter:
        if self._pass is None:
            self.start_pass()
        self._manifest["id_kind"] = id_kind
        if self._writer is None:
            file = segment_name(self._pass["index"], self.rank, self.session)
            attrs = {
                "pass": self._pass["name"],
                "rank": self.rank,
                "session": self.session,
                "schema_version": SCHEMA_VERSION,
            }
            segment = SegmentWriter(self.path / file, self._manifest["width"], self.config.dtype, id_kind, attrs)
            self._pass["segments"].append({"file": file, "rank": self.rank, "session": self.session})
            self._save_manifest()
            self._writer = BackgroundWriter(segment, self.queue_size, self.commit_interval)
        return self._writer

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
        mask: (B, T) attention mask; positions where it is 0 are left out.
        reduction / scale / scaler: how the backpropagated loss relates to the examples' own
            losses: loss = scale * mean_i(loss_i) for "mean", scale * sum_i(loss_i) for "sum",
            further multiplied by scaler.get_scale() when a GradScaler is passed. For sequences,
            an example's own loss is the sum over its label tokens: a loss averaged over all
            tokens of the batch is reduction="sum", scale=1/num_tokens.
        step: the training step recorded with the rows (default: the run's step counter).
        """
        self._check_open()
        if not self.watched:
            raise CaptureError("call run.watch(model) before run.capture(...)")
        if self._fitting is not None:
            fit_watched, sums = self._fitting
            return Capture(
                fit_watched,
                ids,
                mask=mask,
                reduction=reduction,
                scale=scale,
                scaler=scaler,
                accept=lambda ids, rows, factor: sums.close_batch(factor),
                observer=sums.observe,
                discard=sums.discard_batch,
                keep_rows=False,
            )
        if self._pca_pending:
            raise CaptureError("projection='pca': run a statistics pass inside `with run.fit_projections():` first")
        if self._pass is None:
            self.start_pass()
        self._last_capture = Capture(
            self.watched,
            ids,
            mask=mask,
            reduction=reduction,
            scale=scale,
            scaler=scaler,
            check=self._check_batch,
            accept=lambda ids, rows, factor: self._accept(ids, rows, factor, step),
            observer=self._sums.observe if self._sums is not None else None,
            discard=self._sums.discard_batch if self._sums is not None else lambda: None,
        )
        return self._last_capture

    @property
    def active_capture(self) -> Capture | None:
        """The capture whose block is running now, if any (framework adapters hook its loss)."""
        cap = self._last_capture
        return cap if cap is not None and cap.active else None

    def _check_batch(self, ids: list) -> None:
        """Refuse a batch before its forward: wrong id kind, or ids repeated within the pass."""
        self._check_id_kind(ids)
        if self.on_duplicate == "skip":
            return
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1}, key=str)[:5]
            raise DuplicateIdError(f"ids repeat within the batch: {dupes}")
        seen = [i for i in ids if i in self._seen]
        if seen:
            raise DuplicateIdError(
                f"ids {seen[:5]} were already logged in this pass; start a new pass with run.start_pass(), "
                "or pass on_duplicate='skip' to logix.init for samplers that repeat examples"
            )

    def _accept(self, ids: list, rows: Tensor, factor: float, step: int | None) -> None:
        """Queue a captured batch's rows (with on_duplicate='skip', first sightings only)."""
        if self._sums is not None:
            self._sums.close_batch(factor)
        if self.on_duplicate == "skip":
            seen, keep = set(self._seen), []
            for i in ids:
                keep.append(i not in seen)
                seen.add(i)
            if not all(keep):
                rows = rows[torch.tensor(keep, device=rows.device)]
                ids = [i for i, k in zip(ids, keep) if k]
        if ids:
            self._write(ids, rows, self.step if step is None else int(step))
            self._seen.update(ids)
        if self._optimizer_hook is None and step is None:
            self.step += 1

    def _write(self, ids: list, rows: Tensor, step: int) -> None:
        """One device-to-host copy per batch (pinned and asynchronous on CUDA), then the queue."""
        writer = self._writer_for_pass(self._check_id_kind(ids))
        dtype = torch.float16 if self.config.dtype == "float16" else torch.float32
        rows = rows.to(dtype)
        flags = (~torch.isfinite(rows).all(dim=1)).to(torch.uint8) * FLAG_NONFINITE  # after the cast: overflow too
        ready = None
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            host_flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host_flags.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, host_flags = rows, flags
        writer.put(Batch(ids=ids, grads=host, flags=host_flags, step=step, ready=ready))

    # -- the end -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every captured row is written and committed (the pass stays open)."""
        self._check_open()
        if self._writer is not None:
            self._writer.flush()

    def finalize(self) -> None:
        """Write out every row and mark this session's passes complete. Idempotent."""
        if self._closed:
            return
        self.close(finalized=True)

    def close(self, finalized: bool = False) -> None:
        """Write out and commit every row without marking passes complete (as after a crash)."""
        if self._closed:
            return
        self._closed = True
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None
        try:
            self._end_pass()
        finally:
            try:
                if finalized:
                    for p in self._manifest["passes"]:
                        if p["name"] in self._session_passes - self._failed_passes:
                            self._finalize_pass(p)
            finally:
                self._save_manifest()
                _open_runs.discard(self)

    def _finalize_pass(self, p: dict) -> None:
        """Derive the pass's curvature (if asked) and mark it complete."""
        self._save_manifest()  # the statistics pass reads the log through the manifest
        if self.config.statistics and p["segments"]:
            p["statistics"] = finalize_pass(self.path, p["name"], p.get("statistics_parts", []), self.config.statistics)
        p["finalized"] = True

    def _check_open(self) -> None:
        if self._closed:
            raise CaptureError(f"the run on {self.path} is finalized or closed; open a new one with logix.init")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finalized=exc_type is None)

    def __repr__(self) -> str:
        name = self._pass["name"] if self._pass else None
        return f"Run({str(self.path)!r}, pass={name!r}, modules={len(self.watched)}, closed={self._closed})"


def _warn_if_compiled(model: nn.Module) -> None:
    """Dynamo ignores hooks added after compilation unless told to guard on them."""
    if not hasattr(model, "_orig_mod"):
        return
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and getattr(dynamo.config, "skip_nnmodule_hook_guards", False):
        warnings.warn(
            "logix: this model is torch.compile'd and torch._dynamo.config.skip_nnmodule_hook_guards is True, "
            "so graphs compiled before a capture will skip logix's hooks (the capture then raises CaptureError). "
            "Set torch._dynamo.config.skip_nnmodule_hook_guards = False before the first compiled call.",
            stacklevel=3,
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@atexit.register
def _close_open_runs() -> None:
    """Commit what is queued if the user never called finalize (passes stay unfinalized)."""
    for run in list(_open_runs):
        try:
            run.close()
        except Exception as e:  # noqa: BLE001 - nothing to raise to at interpreter exit
            logger.error("logix: closing %s at exit failed: %s", run.path, e)
