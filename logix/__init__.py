"""logix: training-data attribution logged from your own PyTorch training loop.

run = logix.init("runs/digits", rank=16)   # a log directory
run.watch(model)
with run.capture(ids):                      # around each batch's forward and backward
    loss.backward()
run.finalize()
log = logix.open("runs/digits")            # read back, in any later process
"""

__version__ = "0.1.0"

from .capture import Capture  # noqa: E402
from .config import Config  # noqa: E402
from .data import WithIds  # noqa: E402
from .errors import (  # noqa: E402
    CaptureError,
    ConfigError,
    DuplicateIdError,
    LogFormatError,
    LogInUseError,
    LogixError,
    MissingExtraError,
    ModelMismatchError,
    NotInLogError,
    StatisticsError,
    WriterError,
)
from .influence import Scores, SelfInfluence, TopK  # noqa: E402
from .labels import sampled_labels  # noqa: E402
from .log import Log, ModuleInfo, PassInfo  # noqa: E402
from .query import Query  # noqa: E402
from .run import Run, init  # noqa: E402


def open(path, pass_name=None) -> Log:  # noqa: A001 - the public name the docs promise
    """Open a log read-only (the latest pass unless `pass_name` is given)."""
    return Log(path, pass_name=pass_name)


__all__ = [
    "Capture",
    "CaptureError",
    "Config",
    "ConfigError",
    "DuplicateIdError",
    "Log",
    "LogFormatError",
    "LogInUseError",
    "LogixError",
    "MissingExtraError",
    "ModelMismatchError",
    "NotInLogError",
    "ModuleInfo",
    "PassInfo",
    "Query",
    "Run",
    "Scores",
    "SelfInfluence",
    "StatisticsError",
    "TopK",
    "WithIds",
    "WriterError",
    "init",
    "open",
    "sampled_labels",
]
