"""A log directory opened for writing: its writer lock and its manifest, owned by process 0.

Process 0 refuses a path that is a file or holds something other than a log, takes the writer
lock (logix.disk.lock), reads the manifest (or starts one), checks the config against it and counts the
session; every other process receives that manifest. From then on only process 0 writes it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from .config import Config
from .disk.files import FORMAT, MANIFEST, SCHEMA_VERSION, write_json_atomic
from .disk.lock import LOCK_FILE, WriterLock
from .disk.manifest import read_manifest
from .distributed import World
from .errors import ConfigError, LogInUseError, LogixError, refused_writes
from .version import __version__


class LogDirectory:
    """The log at `path` as this process writes it: `manifest` (a dict every process keeps in
    memory), `save()` (process 0 writes it atomically) and `release()` (the lock, at the end)."""

    def __init__(self, path: Path, config: Config, world: World):
        self.path = path
        self.config = config
        self.world = world
        self.lock: WriterLock | None = None  # process 0's hold on the log, from open to release
        self._check_processes_agree()
        self.manifest = self._open_on_process0()

    def save(self) -> None:
        """Process 0 owns the manifest; the other processes keep their copy in memory only."""
        if self.world.process_index == 0:
            with refused_writes(self.path / MANIFEST):
                write_json_atomic(self.path / MANIFEST, self.manifest)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_processes_agree(self) -> None:
        configs = self.world.gather(self.config.to_json())
        differ = [
            f"rank {r}: {'; '.join(self.config.differences(Config.from_json(c)))}"
            for r, c in enumerate(configs)
            if c != configs[0]
        ]
        if differ:
            raise ConfigError(f"the ranks opened {self.path} with different configs (against rank 0): {differ}")

    def _open_on_process0(self) -> dict:
        """Process 0 opens or creates the log and counts the session; the others get its manifest."""
        outcome, error = None, None
        if self.world.process_index == 0:
            try:
                refuse_foreign_directory(self.path)
                make_directory(self.path)
                self.lock = WriterLock.acquire(self.path)
                manifest = self._read_or_start()
                manifest["sessions"] += 1
                with refused_writes(self.path / MANIFEST):
                    write_json_atomic(self.path / MANIFEST, manifest)
                outcome = manifest
            except LogixError as e:
                error = e
                self.release()
            except BaseException:
                self.release()
                raise
        outcome = self.world.broadcast(outcome if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if isinstance(outcome, str):
            kind = LogInUseError if outcome.startswith(LogInUseError.__name__) else ConfigError
            raise kind(f"rank 0 could not open {self.path}: {outcome}")
        return outcome

    def _read_or_start(self) -> dict:
        """The manifest of the log at `path`, or a new one; called with the writer lock held."""
        for leftover in self.path.glob(f".{MANIFEST}.*.tmp"):  # left by a crash; no writer is active but us
            leftover.unlink(missing_ok=True)
        if (self.path / MANIFEST).exists():
            manifest = read_manifest(self.path)
            logged = Config.from_json(manifest["config"])
            if logged != self.config and not manifest["modules"] and not manifest["passes"]:
                manifest["config"] = self.config.to_json()  # nothing was logged under the old one (a refused watch)
            elif logged != self.config:
                raise ConfigError(
                    f"{self.path} was written with another config ({'; '.join(self.config.differences(logged))}); "
                    "open it with the same settings or write to a new path"
                )
            return manifest
        refuse_foreign_directory(self.path)
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "logix_version": __version__,
            "created": now(),
            "config": self.config.to_json(),
            "id_kind": None,
            "width": 0,
            "modules": [],
            "sessions": 0,
            "passes": [],
        }


def refuse_foreign_directory(path: Path) -> None:
    """A path that is a file, or a directory holding anything but a log, is not written into."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; a log is a directory: choose another path")
    if not path.is_dir() or (path / MANIFEST).exists():
        return
    foreign = [p.name for p in path.iterdir() if p.name != LOCK_FILE and not p.name.startswith(f".{MANIFEST}.")]
    if foreign:
        raise ConfigError(f"{path} exists, is not empty, and is not a logix log: refusing to write into it")


def make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {path}: {e.strerror}; logix needs write access") from e


def now() -> str:
    """The time a manifest records (pass starts, the log's creation): UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
