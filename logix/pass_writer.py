"""The open pass's segment on this process: created with the pass's first rows, fed one host copy
per batch (logix.host_copy), committed by a background thread, closed when the pass ends."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .call_groups import PendingRows
from .disk.files import SCHEMA_VERSION
from .disk.segments import segment_name
from .disk.writer import QUEUE_BYTES, BackgroundWriter, SegmentWriter
from .errors import ConfigError
from .host_copy import HostCopies


@dataclass(frozen=True)
class WriterOptions:
    """How far the background writer may lag behind training, and how often it commits."""

    queue_size: int = 16  # batches
    commit_interval: float = 1.0  # seconds
    queue_bytes: int = QUEUE_BYTES  # bytes of rows (pinned host memory on a GPU)

    def __post_init__(self):
        for name in ("queue_size", "queue_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int of at least 1, got {value!r}")
        value = self.commit_interval
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"commit_interval must be a non-negative number of seconds, got {value!r}")


class PassWriter:
    """Rows of the open pass on their way to this process's segment file."""

    def __init__(self, root: Path, dtype: str, process_index: int, session: int, options: WriterOptions):
        self.root, self.dtype = root, dtype
        self.process_index, self.session = process_index, session
        self.options = options
        self.host = HostCopies(dtype)
        self.writer: BackgroundWriter | None = None

    def open(self, p: dict, width: int, id_kind: str) -> dict | None:
        """The pass's segment, created at its first batch: then its manifest entry (to list before
        any row is queued), else None."""
        if self.writer is not None:
            return None
        file = segment_name(p["index"], self.process_index, self.session)
        attrs = {
            "pass": p["name"],
            "rank": self.process_index,
            "session": self.session,
            "schema_version": SCHEMA_VERSION,
        }
        segment = SegmentWriter(self.root / file, width, self.dtype, id_kind, attrs)
        o = self.options
        self.writer = BackgroundWriter(segment, o.queue_size, o.commit_interval, o.queue_bytes)
        return {"file": file, "rank": self.process_index, "session": self.session}

    def put(self, ids: list, rows: PendingRows, step: int) -> None:
        self.writer.put(self.host.batch(ids, rows, step))

    def flush(self) -> None:
        """Every queued row written and committed."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> tuple[SegmentWriter | None, BaseException | None]:
        """Drain and close the segment: (its writer, or None if the pass wrote nothing here; the
        error closing raised, if any, for the caller to raise once the pass is recorded)."""
        writer, self.writer = self.writer, None
        if writer is None:
            return None, None
        try:
            writer.close()
        except BaseException as e:  # noqa: BLE001 - re-raised by Run._end_pass after the manifest is saved
            return writer.segment, e
        return writer.segment, None
