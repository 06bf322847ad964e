"""The covariance sums of a Run's open pass: fed by the capture hooks, checkpointed beside the rows
they cover (so a crash loses at most STATISTICS_CHECKPOINT seconds of them), and saved when the
pass ends, added up across processes."""

from __future__ import annotations

import time
from pathlib import Path

from .disk.statistics import save_sums, sums_name
from .distributed import reduce_sums
from .statistics import CovarianceSums

STATISTICS_CHECKPOINT = 60.0  # seconds between saves of an open pass's statistics (crash safety)


class PassSums:
    """K-FAC's A and S sums of the open pass on this process; nothing when the log gathers none."""

    def __init__(self, root: Path, gather: bool, process_index: int, session: int):
        self.root, self.gather = root, gather
        self.process_index, self.session = process_index, session
        self.sums: CovarianceSums | None = None
        self.recounted_ids: list = []  # rows committed by another session, whose statistics these sums count
        self.saved = time.monotonic()

    def begin(self) -> None:
        self.sums = CovarianceSums() if self.gather else None
        self.recounted_ids = []
        self.saved = time.monotonic()

    @property
    def observer(self):
        """What the capture hooks call with each module's activations and output gradients."""
        return self.sums.observe if self.sums is not None else None

    def discard(self) -> None:
        if self.sums is not None:
            self.sums.discard_batch()

    def close_batch(self, factor) -> None:
        if self.sums is not None:
            self.sums.close_batch(factor)

    def recounted(self, ids: list) -> None:
        """These ids' rows were committed by a crashed session that lost their statistics; the
        batch just closed counted them, and the saved sums say so (no later session counts them again)."""
        if self.sums is not None:
            self.recounted_ids.extend(ids)

    def due(self) -> bool:
        """Whether a checkpoint is due (STATISTICS_CHECKPOINT seconds since the last save)."""
        return self.sums is not None and time.monotonic() - self.saved > STATISTICS_CHECKPOINT

    def partial_file(self, pass_index: int) -> Path:
        return self.root / sums_name(pass_index, self.process_index, self.session, partial=True)

    def checkpoint(self, pass_index: int, writer) -> None:
        """Save the sums so far, in step with the committed rows: a resumed run counts them when
        this process dies before the pass ends."""
        if self.sums is None or self.sums.empty:
            return
        covered = 0
        if writer is not None:
            writer.flush()  # the rows these statistics saw are committed before they are saved
            covered = writer.segment.committed_rows
        save_sums(
            self.partial_file(pass_index),
            self.sums.to_host(),
            attrs={"rows_covered": covered},
            recounted=self.recounted_ids,
        )
        self.saved = time.monotonic()

    def end(self, world, pass_index: int) -> str | None:
        """Add up every process's sums (collective) and, on process 0, save them; the file's name
        to list in the manifest, or None."""
        sums = self.sums.to_host() if self.sums is not None else None
        recounted = self.recounted_ids
        if sums is not None and world.distributed:
            sums = reduce_sums(world, sums)
            recounted = [i for ids in world.gather(recounted) for i in ids]
        self.sums, self.recounted_ids = None, []
        if sums and self.process_index == 0:
            file = sums_name(pass_index, self.process_index, self.session)
            save_sums(self.root / file, sums, recounted=recounted)
            return file
        return None
