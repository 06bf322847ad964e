"""Progress bars for long reads of a log (scoring, self-influence): shown on a terminal, silent in
logs and pipes unless asked for."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from .errors import ConfigError


def check_progress(progress) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress must be True, False or None, got {progress!r}")


def progress_bar(total: int, progress: bool | None, what: str):
    """A tqdm bar over `total` rows; progress=None shows it only when stderr is a terminal."""
    check_progress(progress)
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=what, unit="rows", disable=disable, leave=False)
