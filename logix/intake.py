"""Where a captured batch of the open pass goes, in the order it gets there.

Before the forward, the id policy (logix.pass_ids) refuses the batch or picks the examples to skip.
After the backward, the batch's statistics close (logix.pass_sums), and its rows go to this
process's segment (logix.pass_writer), whose manifest entry is listed before its first row. The
Capture (logix.capture) calls `check` and `accept`; the Run only says which pass is open.
"""

from __future__ import annotations

from torch import Tensor

from .call_groups import PendingRows
from .distributed import World
from .errors import CaptureError, ConfigError
from .log_directory import LogDirectory
from .pass_ids import PassIds, id_kind
from .pass_sums import PassSums
from .pass_writer import PassWriter
from .scalars import integer, shown


def check_step(step) -> int | None:
    """A training step as an int (None stays None): an int, a numpy integer or a 0-d integer
    tensor, in int64's range (rows store it as int64); a bool, a float or a string is refused."""
    if step is None:
        return None
    value = integer(step)
    if value is None:
        raise ConfigError(f"step must be an integer in int64's range (not a bool or a float), got {shown(step)}")
    return value


class PassIntake:
    """The open pass's intake on this process, and the step its rows are recorded at."""

    def __init__(self, directory: LogDirectory, world: World, ids: PassIds, sums: PassSums, rows: PassWriter):
        self.directory, self.world = directory, world
        self.ids, self.sums, self.rows = ids, sums, rows
        self.pass_entry: dict | None = None  # the open pass's manifest entry, set by the Run
        self._step = 0  # the training step of the next rows
        self.steps_by_capture = True  # False once an optimizer hook counts the steps
        self._keep: list[bool] | None = None  # the last check's choice, for its accept

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value) -> None:
        if value is None:
            raise ConfigError("step must be an integer, got None")
        self._step = check_step(value)

    def check_id_kind(self, ids: list) -> str:
        got = id_kind(ids)
        logged = self.directory.manifest["id_kind"]
        if logged is not None and logged != got:
            raise CaptureError(f"this log's ids are {logged}s; got {got} ids")
        return got

    def check(self, ids: list) -> list[bool] | None:
        """Before the forward: refuse a wrong id kind or a repeated id, or pick the examples to skip
        (logix.pass_ids); one small exchange of the step's ids under torch.distributed."""
        self.check_id_kind(ids)
        self._keep = self.ids.check(ids, self.world.gather(ids))
        return self._keep

    def accept(self, ids: list, rows: PendingRows, factor: float | Tensor, step: int | None) -> None:
        """Queue a captured batch's rows (formed by the writer, on a CPU), leaving out the examples
        `check` skipped; `step` was checked (check_step) before the capture began."""
        self.sums.close_batch(factor)
        (keep, recounted), self._keep = self.ids.rows_to_write(ids, self._keep), None
        self.sums.recounted(recounted)
        if keep is not None and not all(keep):
            rows = rows.select(keep)
            ids = [i for i, k in zip(ids, keep) if k]
        if ids:
            self._write(ids, rows, self.step if step is None else step)
            self.ids.wrote(ids)
        if self.sums.due():
            self.sums.checkpoint(self.pass_entry["index"], self.rows.writer)
        if self.steps_by_capture and step is None:
            self.count_step()

    def count_step(self) -> None:
        """One more training step (a capture without an optimizer hook, or an optimizer step)."""
        self._step += 1  # an int already: no check on the hot path

    def _write(self, ids: list, rows: PendingRows, step: int) -> None:
        """The batch's rows to the pass's segment, listed in the manifest first."""
        manifest = self.directory.manifest
        manifest["id_kind"] = self.check_id_kind(ids)
        entry = self.rows.open(self.pass_entry, manifest["width"], manifest["id_kind"])
        if entry is not None:
            self.pass_entry["segments"].append(entry)
            self.directory.save()
        self.rows.put(ids, rows, step)
