"""logix: training-data attribution logged from your own PyTorch training loop.

run = logix.init("runs/digits", rank=16)   # a log directory
run.watch(model)
with run.capture(ids):                      # around each batch's forward and backward
    loss.backward()
run.finalize()
log = logix.open("runs/digits")            # read back, in any later process
"""

from .capture import Capture
from .complexity import Complexity
from .config import Config
from .data import WithIds
from .errors import (
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
from .labels import sampled_labels
from .log import Log, ModuleInfo, PassInfo
from .log import open_log as open  # noqa: A004 - the public name the docs promise
from .query import Query
from .report import report
from .results import Scores, SelfInfluence, TopK
from .run import Run, init
from .token_split import TokenScores
from .version import __version__

__all__ = [
    "__version__",
    "Capture",
    "CaptureError",
    "Complexity",
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
    "TokenScores",
    "TopK",
    "WithIds",
    "WriterError",
    "init",
    "open",
    "report",
    "sampled_labels",
]
