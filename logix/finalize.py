"""Finalizing a pass, downhill: from what the run holds in memory to one statistics file.

    Run._finalize_pass
      finalize_pass(root, manifest, entry, wanted)
        PassRows(root, the entry's segments, the manifest's width / dtype / id kind)   (logix.disk.rows)
        statistics.derive(modules, rows.blocks(), sums, ...)      curvature arrays, one read of the rows
        curvature.build_curvature + Preconditioner.from_curvature  the same arrays, ready to apply
        curvature.self_influences(rows.blocks(), ...)             self-influences, one more read
        disk.statistics.write_statistics                          the file, in one atomic replace

The rows are read straight from the pass's segments as the run lists them (no reader of the
log directory is opened: the log may be half-written); the statistics code only computes, and
the disk wing alone reads and writes files.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .config import Config
from .curvature import Preconditioner, build_curvature, default_damping, self_influences
from .disk.manifest import ModuleInfo, SegmentInfo
from .disk.rows import PassRows
from .disk.statistics import load_sums, preconditioners, statistics_name, write_statistics
from .errors import StatisticsError
from .statistics import derive


def finalize_pass(root: Path, manifest: dict, entry: dict, wanted: tuple, block_rows: int | None = None) -> str | None:
    """Derive a pass's curvature from its partial sums and rows, and the self-influences under every
    preconditioner that allows; write them as the pass's statistics file (one atomic replace) and
    return its name (None when no statistics are wanted).

    manifest: the run's manifest (its modules, width, config and id kind); entry: the pass's entry
    in it (its name, index, segments and statistics_parts, the sums files relative to root).
    wanted: the config's statistics. Reads the rows once for EK-FAC's Lambda* and the raw Fisher,
    once more for the self-influences.
    """
    if not wanted:
        return None
    name = entry["name"]
    modules = {m["name"]: ModuleInfo(**m) for m in manifest["modules"]}
    rows = pass_rows(root, manifest, entry)
    parts = entry.get("statistics_parts", [])
    sums = load_sums([root / p for p in parts]) if parts else {}
    derived, raw_modules = derive(modules, rows.blocks(block_rows=block_rows, recycle=True), sums, wanted, name)
    # self-influence at default damping, kept so normalised scores never recompute it
    available = preconditioners(wanted, raw=bool(raw_modules) and len(raw_modules) == len(modules))
    pres = {
        pre: Preconditioner.from_curvature(
            modules, pre, build_curvature(modules, list(modules), pre, lambda m: _Held(derived[m]))
        )
        for pre in available
    }
    blocks = rows.blocks(block_rows=block_rows, recycle=True)
    _, values = self_influences(blocks, pres, int(rows.valid.sum()), progress=False, id_dtype=rows.ids.dtype)
    file = statistics_name(entry["index"])
    attrs = {}
    for pre in pres:
        rule, factor = default_damping(pre)
        attrs[pre] = dict(damping_rule=rule, damping_factor=factor, curvature="own")
    write_statistics(root / file, derived, values, attrs)
    return file


def pass_rows(root: Path, manifest: dict, entry: dict) -> PassRows:
    """The pass's committed rows, from the segments the run lists and the manifest's layout."""
    segments = [SegmentInfo(**s) for s in entry["segments"]]
    dtype = Config.from_json(manifest["config"]).dtype
    draws = "curvature_for" in entry.get("meta", {})
    return PassRows(root, entry["name"], segments, int(manifest["width"]), dtype, manifest.get("id_kind"), draws)


def check_rows_readable(root: Path, manifest: dict, entry: dict) -> None:
    """Read each segment's index and its last committed rows (the chunk a kill may have torn), so
    that a pass whose committed rows cannot be read is never marked finalized (a pass with
    statistics reads every row anyway)."""
    rows = pass_rows(root, manifest, entry)
    end = 0
    for n in rows.counts:
        end += n
        if n:
            for _ in rows.blocks(rows=slice(end - 1, end), check_finite=False):
                pass


class _Held:
    """One module's derived arrays, read like a statistics file's group (curvature.build_curvature)."""

    def __init__(self, arrays: dict[str, Tensor]):
        self.arrays = arrays

    def has(self, key: str) -> bool:
        return key in self.arrays

    def array(self, key: str, shape: tuple, eigenvalues: bool = False) -> Tensor:
        value = self.arrays[key].double()
        if tuple(value.shape) != shape:
            raise StatisticsError(f"{key} has shape {tuple(value.shape)}, expected {shape}")
        return value


def passes_to_finalize(manifest: dict, ours: set[str], failed: set[str], resume: bool) -> list[dict]:
    """The passes a session's finalize completes, in order: those it wrote (unless its writer
    failed in them), and, when it resumed a crashed job, the unfinalized passes that job had ended
    before the point this session took over."""
    indices = [p["index"] for p in manifest["passes"] if p["name"] in ours]
    resumed_at = min(indices, default=len(manifest["passes"]))
    return [
        p
        for p in manifest["passes"]
        if p["name"] in ours - failed or (resume and not p["finalized"] and p["index"] < resumed_at)
    ]
