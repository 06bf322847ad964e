"""The settings that define what a log's rows mean, validated and round-tripped through JSON.

Only settings that change the meaning of a row live here (rank, storage dtype, projection and its
seed): two sessions writing to one log must agree on them. Runtime knobs (queue size, what to do
with duplicate ids) are arguments of `logix.init` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Rank = int | str | tuple

DTYPES = ("float32", "float16")
STATISTICS = ("kfac", "ekfac", "raw", "row")
ROW_MAX_WIDTH = 8192  # widest row statistics="row" takes: its D x D Fisher in float64 is 512 MiB there
PROJECTION_METHODS = ("gaussian", "pca")


def _check_side(value: Any, what: str) -> int | str:
    if value == "full":
        return "full"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive int or 'full', got {value!r}")
    return value


@dataclass(frozen=True)
class Config:
    """What a log's rows mean.

    rank: projection size per side of each module. An int k gives k_in = k_out = k; a pair
        (k_in, k_out) sets the sides separately; "full" keeps the exact gradient. A side whose
        rank is at least its dimension is left unprojected (identity). "auto" chooses each
        module's sides from its measured covariances within `row_bytes` (projection="pca" only;
        see `Run.fit_projections`).
    row_bytes: with rank="auto", the bytes one stored row may take (all modules together).
    dtype: how rows are stored, "float32" or "float16" (half the disk; rows that overflow its
        range are flagged, not silently clipped).
    projection: "gaussian": entries N(0, 1/k) from a private generator seeded per module;
        "pca": top eigenvectors of each side's covariance, fitted in `Run.fit_projections()`.
    seed: base seed of the projections.
    statistics: curvature gathered for attribution: any of "kfac" (the factors A and S, gathered
        during capture), "ekfac" (also the corrected eigenvalues, from one read of the rows at
        finalize), "raw" (the dense projected Fisher per module, from the rows; only where
        k_in * k_out is small), "row" (one dense Fisher over the whole row, from the rows; rows of
        at most ROW_MAX_WIDTH numbers). A string means one of them; () gathers nothing.
    """

    rank: Rank = 64
    dtype: str = "float32"
    projection: str = "gaussian"
    seed: int = 0
    statistics: tuple = ()
    row_bytes: int | None = None

    def __post_init__(self) -> None:
        stats = self.statistics
        if stats is None:
            stats = ()
        elif isinstance(stats, str):
            stats = (stats,)
        if not isinstance(stats, (tuple, list)) or any(s not in STATISTICS for s in stats):
            raise ConfigError(f"statistics must be names from {STATISTICS}, got {self.statistics!r}")
        object.__setattr__(self, "statistics", tuple(sorted(set(stats))))
        rank = self.rank
        if isinstance(rank, list):
            rank = tuple(rank)
        if isinstance(rank, tuple):
            if len(rank) != 2:
                raise ConfigError(f"rank as a pair must be (k_in, k_out), got {self.rank!r}")
            rank = (_check_side(rank[0], "rank k_in"), _check_side(rank[1], "rank k_out"))
        elif rank != "auto":
            rank = _check_side(rank, "rank")
        object.__setattr__(self, "rank", rank)
        if rank == "auto":
            if self.projection != "pca":
                raise ConfigError("rank='auto' chooses ranks from PCA spectra: use projection='pca'")
            b = self.row_bytes
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ConfigError(f"rank='auto' needs row_bytes, a positive int (bytes per stored row), got {b!r}")
            self._refuse_wide(self.row_numbers, f"row_bytes={b} allows")
        elif self.row_bytes is not None:
            raise ConfigError(f"row_bytes is a budget for rank='auto'; with rank={self.rank!r} the row's size is fixed")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.projection not in PROJECTION_METHODS:
            raise ConfigError(f"projection must be one of {PROJECTION_METHODS}, got {self.projection!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {self.seed!r}")

    def check_width(self, width: int) -> None:
        """Refuse, before anything is logged, a row too wide for the statistics asked for (rank="auto"
        keeps within row_bytes, checked when the config is made)."""
        if self.rank != "auto":
            self._refuse_wide(width, "the watched modules give")

    def _refuse_wide(self, width: int, what: str) -> None:
        if "row" in self.statistics and width > ROW_MAX_WIDTH:
            raise ConfigError(
                f"statistics='row' builds a dense Fisher over the whole row, for rows of at most {ROW_MAX_WIDTH} "
                f"numbers; {what} {width}. Lower the rank (or row_bytes with rank='auto'), "
                "watch fewer modules, or use the per-module statistics ('ekfac')"
            )

    @property
    def factors(self) -> bool:
        """Whether capture gathers the K-FAC factors A and S."""
        return "kfac" in self.statistics or "ekfac" in self.statistics

    @property
    def row_numbers(self) -> int:
        """rank="auto": how many stored numbers fit in row_bytes."""
        return self.row_bytes // (2 if self.dtype == "float16" else 4)

    @property
    def rank_in(self) -> int | str:
        return self.rank[0] if isinstance(self.rank, tuple) else self.rank

    @property
    def rank_out(self) -> int | str:
        return self.rank[1] if isinstance(self.rank, tuple) else self.rank

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if isinstance(self.rank, tuple):
            out["rank"] = list(self.rank)
        out["statistics"] = list(self.statistics)
        if out["row_bytes"] is None:
            del out["row_bytes"]  # logs without rank="auto" keep the manifest they always had
        return out

    @classmethod
    def from_json(cls, data: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}; written by a newer logix?")
        return cls(**data)

    def differences(self, other: Config) -> list[str]:
        """Human-readable list of fields where two configs disagree."""
        mine, theirs = self.to_json(), other.to_json()
        keys = list(mine) + [k for k in theirs if k not in mine]
        return [
            f"{k}: {theirs.get(k)!r} in the log, {mine.get(k)!r} asked" for k in keys if mine.get(k) != theirs.get(k)
        ]
