"""Exceptions raised by logix. Every one names what went wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class LogixError(Exception):
    """Base class for all logix errors."""


class ConfigError(LogixError, ValueError):
    """A setting is invalid, or differs from the one an existing log was written with."""


class CaptureError(LogixError, RuntimeError):
    """A capture context was used in a way that cannot give correct per-example gradients."""


class DuplicateIdError(CaptureError):
    """An id was logged twice within one pass."""


class ModelMismatchError(LogixError, ValueError):
    """The watched model does not match the modules an existing log was written for."""


class WriterError(LogixError, RuntimeError):
    """The background writer failed; rows committed before the failure are kept."""


class LogFormatError(LogixError, OSError):
    """A log on disk is missing, damaged, or from an unsupported schema version."""


class StatisticsError(LogixError, ArithmeticError):
    """A covariance is not finite or has no data; named by module, never handed to eigh."""


class NotInLogError(LogixError, KeyError):
    """A pass, module or id that was asked for is not in the log (also a KeyError, as a lookup miss)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


class LogInUseError(LogixError, RuntimeError):
    """Another job (or another Run in this process) is writing the log; one writer at a time."""


class MissingExtraError(LogixError, ImportError):
    """An integration needs a package that is not installed; the message names the extra to install."""


@contextmanager
def refused_writes(path) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a file-size limit, a deleted or read-only
    directory) becomes a WriterError naming it."""
    try:
        yield
    except OSError as e:
        if isinstance(e, LogixError):
            raise
        raise WriterError(f"writing {path} failed: {e.strerror or e}; what was written before is kept") from e
