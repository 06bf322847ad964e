"""What a row holds: the watched modules, each side's rank and projection, and their place in the
row. Chosen when a model is watched (Gaussian projections, or those a log already stores), or, for
PCA projections and rank="auto", fitted from a statistics pass (`Run.fit_projections`)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from .capture import Capture, LossSpec
from .config import Config
from .distributed import World, reduce_sums
from .errors import CaptureError, ConfigError, ModelMismatchError
from .hooks import Watched, select_modules
from .projection import (
    AUTO_SKETCH,
    PCA_MAX_DIM,
    allocate_ranks,
    auto_projection,
    gaussian,
    leading_directions,
    module_seed,
    pca_fits,
    side_rank,
)
from .statistics import CovarianceSums, eigh, factors


class RowLayout:
    """The watched modules of a Run and, until they are fitted, which sides still need PCA."""

    def __init__(self, config: Config):
        self.config = config
        self.watched: list[Watched] = []
        self.pending: dict[str, tuple[bool, bool]] = {}  # module -> (fit P_in, fit P_out)

    @property
    def width(self) -> int:
        return sum(w.width for w in self.watched)

    def choose(
        self,
        model: nn.Module,
        include: Iterable[str] | None,
        exclude: Iterable[str],
        include_frozen: bool,
        logged: dict[str, dict],
        stored: dict[str, tuple],
    ) -> None:
        """The modules to log, with the ranks and projections the log already has (logged: its
        manifest's modules by name; stored: its projections) or new ones."""
        auto = self.config.rank == "auto"
        offset = 0
        for name, module, kind in select_modules(model, include, exclude, include_frozen):
            try:
                d_in, d_out = kind.dims(module)
            except (AttributeError, IndexError, TypeError, ValueError) as e:
                raise ConfigError(
                    f"cannot read the dimensions of module {name!r} ({kind.name}): {e}; if its weights are "
                    "partitioned (DeepSpeed ZeRO-3), watch the model before deepspeed.initialize, or exclude it"
                ) from e
            if not auto:
                k_in, k_out = side_rank(self.config.rank_in, d_in), side_rank(self.config.rank_out, d_out)
            elif name in logged:  # ranks chosen when the log was started
                k_in, k_out = logged[name]["k_in"], logged[name]["k_out"]
            else:  # chosen in fit_projections; until then the sides are measured whole
                k_in, k_out = d_in, d_out
            if name in stored:
                p_in, p_out = stored[name]
            else:
                p_in = gaussian(k_in, d_in, module_seed(self.config.seed, name, "in"))
                p_out = gaussian(k_out, d_out, module_seed(self.config.seed, name, "out"))
                if auto:
                    self.pending[name] = (True, True)
                elif self.config.projection == "pca":
                    self.pending[name] = (pca_fits(k_in, d_in), pca_fits(k_out, d_out))
            self.watched.append(Watched(name, module, kind, d_in, d_out, k_in, k_out, offset, p_in, p_out))
            offset += k_in * k_out

    def entries(self) -> list[dict]:
        """The manifest's description of each watched module and its place in a row."""
        return [
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
            for w in self.watched
        ]

    def projections(self) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        return {w.name: (w.proj_in, w.proj_out) for w in self.watched}

    def fitting(self) -> list[Watched]:
        """The modules as the fitting pass captures them: each side to fit measured whole (or,
        with rank="auto", past PCA_MAX_DIM through a Gaussian sketch), the others as they are."""
        auto = self.config.rank == "auto"
        out = []
        for w in self.watched:
            fit_in, fit_out = self.pending[w.name]
            if auto:
                p_in, p_out = self._sketches(w)
                k_in, k_out = (w.d_in if p is None else AUTO_SKETCH for p in (p_in, p_out))
            else:
                p_in, k_in = (None, w.d_in) if fit_in else (w.proj_in, w.k_in)
                p_out, k_out = (None, w.d_out) if fit_out else (w.proj_out, w.k_out)
            out.append(Watched(w.name, w.module, w.kind, w.d_in, w.d_out, k_in, k_out, 0, p_in, p_out))
        return out

    def _sketches(self, w: Watched) -> tuple[Tensor | None, Tensor | None]:
        """rank="auto": the Gaussian sketch a side wider than PCA_MAX_DIM is measured through (seeded
        like a projection, so the fit rebuilds the one the fitting pass used), else None."""
        return tuple(
            gaussian(AUTO_SKETCH, d, module_seed(self.config.seed, w.name, side)) if d > PCA_MAX_DIM else None
            for d, side in ((w.d_in, "in"), (w.d_out, "out"))
        )

    def fit(self, sums: dict) -> dict[str, tuple]:
        """From the fitting pass's covariance sums: each module's (k_in, k_out, P_in, P_out), the
        top eigenvectors of each fitted side, and with rank="auto" the ranks (allocate_ranks)."""
        auto = self.config.rank == "auto"
        bases = {}
        for w in self.watched:
            if w.name not in sums:
                raise CaptureError(f"module {w.name!r} received no gradient during fit_projections")
            a, s = factors(sums[w.name], w.name)
            bases[w.name] = (eigh(a, w.name, "A"), eigh(s, w.name, "S"))
        if auto:
            try:
                chosen = allocate_ranks(
                    {n: (ea, es) for n, ((ea, _), (es, _)) in bases.items()}, self.config.row_numbers
                )
            except ValueError as e:
                raise ConfigError(f"rank='auto': row_bytes={self.config.row_bytes} is too small: {e}") from None
        fitted = {}
        for w in self.watched:
            fit_in, fit_out = self.pending[w.name]
            (_, vec_a), (_, vec_s) = bases[w.name]
            if auto:
                k_in, k_out = chosen[w.name]
                sketch_in, sketch_out = self._sketches(w)
                p_in = auto_projection(vec_a, k_in, w.d_in, sketch_in)
                p_out = auto_projection(vec_s, k_out, w.d_out, sketch_out)
            else:
                k_in, k_out = w.k_in, w.k_out
                p_in = leading_directions(vec_a, k_in) if fit_in else w.proj_in
                p_out = leading_directions(vec_s, k_out) if fit_out else w.proj_out
            fitted[w.name] = (k_in, k_out, p_in, p_out)
        return fitted

    def adopt(self, fitted: dict[str, tuple]) -> None:
        """Take the fitted ranks and projections (the same on every process) and lay the row out anew."""
        offset = 0
        for w in self.watched:
            w.k_in, w.k_out, w.proj_in, w.proj_out = fitted[w.name]
            w.offset, offset = offset, offset + w.k_in * w.k_out
            w._cache.clear()
        self.pending = {}


class ProjectionFit:
    """A statistics-only pass that fits a layout's PCA projections (`run.fit_projections`): its
    captures feed covariance sums and log nothing."""

    def __init__(self, layout: RowLayout):
        self.layout = layout
        self.watched = layout.fitting()
        self.sums = CovarianceSums()

    def capture(self, ids, loss: LossSpec) -> Capture:
        return Capture(
            self.watched,
            ids,
            loss,
            accept=lambda ids, rows, factor: self.sums.close_batch(factor),
            observer=self.sums.observe,
            discard=self.sums.discard_batch,
            keep_rows=False,
        )

    def finish(self, world: World) -> None:
        """Fit from every process's sums and adopt the result, bit-identical on every process
        (process 0's, whatever each process's eigh returned)."""
        sums = reduce_sums(world, self.sums.to_host())
        self.layout.adopt(world.broadcast(self.layout.fit(sums)))


def module_differences(logged: list[dict], asked: list[dict]) -> str:
    """What differs between the logged modules and the watched ones, with their shapes."""

    def shape(m: dict) -> str:  # the gradient matrix logix logs, a bias column included
        return f"{m['kind']} {m['d_out']}x{m['d_in']}"

    before, now = {m["name"]: m for m in logged}, {m["name"]: m for m in asked}
    parts = [f"missing {n} {shape(m)}" for n, m in before.items() if n not in now][:5]
    parts += [f"new {n} {shape(m)}" for n, m in now.items() if n not in before][:5]
    parts += [
        f"{n} logged as {shape(before[n])}, now {shape(now[n])}"
        for n in before
        if n in now and shape(before[n]) != shape(now[n])
    ][:5]
    if not parts and list(before) != list(now):
        parts.append(f"the same modules in another order (logged {list(before)[:5]}, now {list(now)[:5]})")
    if not parts:
        parts.append("the projected sizes differ (another rank= or the same model with other include/exclude)")
    advice = "Watch the same model with the same include/exclude, or write to a new path"
    return "; ".join(parts) + f" (gradient shapes d_out x d_in). {advice}"


def check_same_modules(per_process: list[list[dict]], logged: list[dict], path) -> None:
    """Every process watches the same modules (their manifest entries), and they are the ones the
    log already holds, if it holds any; ModelMismatchError says what differs."""
    modules = per_process[0]
    differ = [r for r, m in enumerate(per_process) if m != modules]
    if differ:
        names = [{m["name"] for m in m_list} for m_list in per_process]
        raise ModelMismatchError(
            f"ranks {differ} watch different modules than rank 0 "
            f"(rank 0 only: {sorted(names[0] - names[differ[0]])[:5]}, "
            f"rank {differ[0]} only: {sorted(names[differ[0]] - names[0])[:5]}, or different shapes); "
            "every rank must watch the same model with the same include/exclude"
        )
    if logged and modules != logged:
        raise ModelMismatchError(
            f"the model does not match the modules logged in {path}: {module_differences(logged, modules)}"
        )
