"""The disk wing: every file of a log, its names, its checks and its writers live here.

A log is a directory:

    manifest.json        passes, segments, modules, config, schema version (written atomically)
    projections.h5       P_in / P_out per module, so any later process rebuilds them exactly
    segments/pNNN-rR-sSSS.h5   one per (pass, rank, session), written in SWMR mode
    statistics/          covariance sums per writer, and each finalized pass's curvature (statistics.py)
    writer.lock          held (flock) by the one job writing the log, naming it (lock.py)

Each segment holds `ids` (int64 or UTF-8), `grads` (N, D), `flags` (uint8), `step` (int64) and a
one-element `committed` dataset. The writer moves `committed` only after the rows below it are
written and flushed, so readers trust exactly the rows below it, even after a SIGKILL. A segment
opens only with `open_segment` (plainly, or in SWMR mode while a writer holds it). Nothing here is
pickled. A pass's rows are read through `PassRows` (logix.disk.rows): its segments' index once,
its gradients whole or in blocks.

A log is untrusted input: every file is read through logix.disk.untrusted, which opens nothing
outside the log directory (symlinks resolved, regular files only) and checks an HDF5 file whole
(no external links, external storage or virtual datasets; no dataset larger than its file) before
any of its data is read.
"""

from .files import (
    FLAG_NONFINITE,
    FORMAT,
    MANIFEST,
    PROJECTIONS,
    SCHEMA_VERSION,
    SEGMENTS,
    replace_atomic,
    write_json_atomic,
)
from .manifest import ModuleInfo, SegmentInfo, read_manifest
from .projections import check_projections, read_projections, write_projections
from .rows import PassRows, default_block_rows
from .segments import (
    check_segment,
    committed_ids,
    fletcher32_from_sums,
    open_segment,
    pass_segments,
    read_ids,
    read_rows,
    segment_name,
)
from .writer import BackgroundWriter, Batch, SegmentWriter

__all__ = [
    "BackgroundWriter",
    "Batch",
    "FLAG_NONFINITE",
    "FORMAT",
    "MANIFEST",
    "ModuleInfo",
    "PROJECTIONS",
    "PassRows",
    "SCHEMA_VERSION",
    "SEGMENTS",
    "SegmentInfo",
    "SegmentWriter",
    "check_projections",
    "check_segment",
    "committed_ids",
    "default_block_rows",
    "fletcher32_from_sums",
    "open_segment",
    "pass_segments",
    "read_ids",
    "read_manifest",
    "read_projections",
    "read_rows",
    "replace_atomic",
    "segment_name",
    "write_json_atomic",
    "write_projections",
]
