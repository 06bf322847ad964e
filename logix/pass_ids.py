"""Which ids of a pass are logged, skipped or refused: the id policy of a Run.

Within a pass an id is logged once. A repeat is an error (DuplicateIdError), or is skipped with
on_duplicate="skip" and always under torch.distributed, where the samplers of DDP and Accelerate
pad the last batches with repeats (when two processes get the same id in one step, the lower
process keeps it). A resumed pass skips the ids it had committed; those whose statistics a crash
lost are still counted in the statistics when they come again, but their rows are not rewritten.

A curvature pass (`start_pass(..., curvature_for=...)`) is the exception: each capture of an id
there is one more draw of labels from the model, so every one is logged, and a resumed curvature
pass skips each id as many times as it had committed rows of it.
"""

from __future__ import annotations

import logging
from collections import Counter

from .errors import ConfigError, DuplicateIdError

logger = logging.getLogger("logix")


def id_kind(ids: list) -> str:
    """ "str" for string ids, else "int" (a log holds one kind)."""
    return "str" if ids and isinstance(ids[0], str) else "int"


def check_on_duplicate(on_duplicate: str) -> None:
    if on_duplicate not in ("error", "skip"):
        raise ConfigError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")


class PassIds:
    """The ids one process has logged, seen elsewhere and must skip, for the open pass."""

    def __init__(self, on_duplicate: str, distributed: bool, process_index: int):
        self.refuse_repeats = on_duplicate == "error" and not distributed
        self.process_index = process_index
        self.begin(set())

    def begin(self, committed, rows_only=(), draws: bool = False) -> None:
        """A new (or resumed) pass. committed: ids to skip; rows_only: ids whose rows are committed
        but whose statistics were lost: their rows are skipped, their statistics counted (each an
        iterable of ids, or a Counter of them). draws: a curvature pass, where ids repeat."""
        self.logged: set = set()  # ids this process logged in the pass
        self.elsewhere: set = set()  # ids other processes captured in the pass
        self.draws = draws
        self.committed = Counter(committed) if draws else set(committed)
        self.rows_only = Counter(rows_only)  # small: only a crash leaves any
        self.skipped = 0

    def check(self, ids: list, everyone: list[list]) -> list[bool] | None:
        """Before the forward: refuse a repeat, or pick the examples to skip (None: keep all).
        everyone: each process's ids of this step, in process order (just `[ids]` alone).

        An id is skipped if this process logged it, it came earlier in the batch, another process
        captured it in an earlier step, a lower process has it in this step, or the pass had
        committed it before a resume. The usual batch, none of these, is settled with set
        operations at C speed; the sets that grow with the pass are never copied."""
        if self.draws:
            return self._check_draws(ids)
        lower = set()  # this step's ids of the lower processes (they keep a shared id)
        for theirs in everyone[: self.process_index]:
            lower.update(theirs)
        batch = set(ids)
        if self.refuse_repeats:
            if len(batch) != len(ids):
                dupes = sorted({i for i in ids if ids.count(i) > 1}, key=str)[:5]
                raise DuplicateIdError(f"ids repeat within the batch: {dupes}")
            seen = [] if batch.isdisjoint(self.logged) else [i for i in ids if i in self.logged]
            if seen:
                raise DuplicateIdError(
                    f"ids {seen[:5]} were already logged in this pass; start a new pass with run.start_pass(), "
                    "or pass on_duplicate='skip' to logix.init for samplers that repeat examples"
                )
        keep = None
        known = (self.logged, self.elsewhere, lower, self.committed)
        if len(batch) != len(ids) or not all(batch.isdisjoint(k) for k in known):
            keep, here = [], set()
            for i in ids:
                keep.append(i not in here and not any(i in k for k in known))
                here.add(i)
            self.skipped += keep.count(False)
            keep = None if all(keep) else keep
        for index, theirs in enumerate(everyone):  # after the checks: this step's ids are not "earlier"
            if index != self.process_index:
                self.elsewhere.update(theirs)
        return keep

    def _check_draws(self, ids: list) -> list[bool] | None:
        """A curvature pass: every capture of an id is logged (one more draw), except as many as a
        resumed pass had committed."""
        if not self.committed:
            return None
        keep = [not _take_one(self.committed, i) for i in ids]
        self.skipped += keep.count(False)
        return None if all(keep) else keep

    def rows_to_write(self, ids: list, keep: list[bool] | None) -> tuple[list[bool] | None, list]:
        """After the backward: also leave out rows a crash had committed. Returns (which rows to
        write, the ids among them whose statistics were counted here for a row already committed)."""
        if not self.rows_only:
            return keep, []
        counted = keep or [True] * len(ids)
        keep, recounted = [], []
        for i, k in zip(ids, counted):
            again = k and _take_one(self.rows_only, i)
            keep.append(k and not again)
            if again:
                recounted.append(i)
        self.skipped += len(recounted)
        return keep, recounted

    def wrote(self, ids: list) -> None:
        if not self.draws:  # a curvature pass never refuses a repeat: nothing to remember
            self.logged.update(ids)

    def report_skipped(self, pass_name: str, distributed: bool) -> None:
        """Say at the pass's end how many ids were skipped; warn when a process skipped more than it
        logged under torch.distributed (a new epoch without run.start_pass())."""
        if not self.skipped:
            return
        logged = len(self.logged)
        if distributed and self.skipped > max(logged // 2, 64):
            logger.warning(
                "logix: pass %r: rank %d skipped %d ids already logged in the pass and logged %d; "
                "a new epoch needs run.start_pass()",
                pass_name,
                self.process_index,
                self.skipped,
                logged,
            )
        logger.info("logix: pass %r: skipped %d ids logged before", pass_name, self.skipped)


def _take_one(counts: Counter, i) -> bool:
    """Use up one of id i's counts, if it has any left (an id used up leaves the Counter, so an
    empty one says at once that nothing is left to skip)."""
    left = counts.get(i, 0)
    if left > 1:
        counts[i] = left - 1
    elif left == 1:
        del counts[i]
    return left > 0
