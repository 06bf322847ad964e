"""One writing job per log: an exclusive `flock` on `<log>/writer.lock`, held from `logix.init` to close.

Two jobs appending to one log would each rewrite the manifest and drop the other's passes, so a
second writer is refused at once, naming the holder. The kernel releases a `flock` when its holder
dies, SIGKILL included, so a crashed job never blocks `resume=True`. The file also records who
holds it (host, pid, start time) as JSON, for the error message and for readers.

A reader tells a live log from a crashed one by asking for a shared lock without waiting: refused
means a writer holds the file now. That needs only read permission on the file.

What `flock` promises depends on the file system: on local disks, and on NFSv4 and most cluster
file systems mounted with lock support, it excludes writers on every host. Where the file system
refuses locks (ENOLCK, EOPNOTSUPP: e.g. NFS without a lock daemon, Lustre mounted without
`flock`), logix warns and writes without the guard. Some mounts (Lustre's `localflock`, old NFS
with `local_lock`) grant locks that other hosts never see: there only one host is excluded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError, LogInUseError
from .untrusted import outside_problem

logger = logging.getLogger("logix")

LOCK_FILE = "writer.lock"
RETRY_SECONDS = 0.5  # a reader's shared lock lasts microseconds; wait out one before refusing
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_held: dict[str, WriterLock] = {}  # this process's locks, by resolved log path
_held_guard = threading.Lock()


@dataclass(frozen=True)
class Writer:
    """The job that holds (or last held) a log's writer lock."""

    pid: int | None
    host: str | None
    started: str | None

    def __str__(self) -> str:
        if self.pid is None:
            return "a job that has not yet recorded itself"
        here = self.host == socket.gethostname() and self.pid == os.getpid()
        who = "this process" if here else "process"
        return f"{who} (pid {self.pid}) on host {self.host or '?'} since {self.started or '?'}"

    @classmethod
    def parse(cls, text: bytes) -> Writer:
        try:
            data = json.loads(text.decode("utf-8"))
            pid = data.get("pid")
            return cls(pid if isinstance(pid, int) else None, str(data.get("host")), str(data.get("started")))
        except (ValueError, AttributeError):  # empty (being written) or not ours: nothing to name
            return cls(None, None, None)


class WriterLock:
    """This process's exclusive hold on one log; `release` (or the process's death) ends it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.key = str(self.root.resolve())
        self.fd: int | None = None
        self.guarded = False  # False where the file system refused locks (the job writes unguarded)

    @classmethod
    def acquire(cls, root: Path) -> WriterLock:
        """Take the log's writer lock, or raise LogInUseError naming the job that holds it."""
        lock = cls(root)
        with _held_guard:
            mine = _held.get(lock.key)
            if mine is not None:
                raise LogInUseError(
                    f"{root} is already being written by a Run of this process ({mine.describe()}); "
                    "finalize or close that run before opening the log again"
                )
            lock._take()
            _held[lock.key] = lock
        return lock

    def _take(self) -> None:
        try:
            self.fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot create {self.root / LOCK_FILE}: {e.strerror}; logix needs write access") from e
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.guarded = True
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                holder = Writer.parse(os.pread(self.fd, 4096, 0))
                os.close(self.fd)
                self.fd = None
                raise LogInUseError(
                    f"{self.root} is being written by {holder}; one job writes a log at a time. "
                    "Wait for it to finish, or write to another path (a killed job releases the log at once)"
                ) from None
            except OSError as e:
                if e.errno not in UNSUPPORTED:
                    os.close(self.fd)
                    self.fd = None
                    raise
                logger.warning(
                    "logix: the file system of %s refuses file locks (%s): nothing stops a second job from "
                    "writing this log and losing rows; make sure only one job writes it",
                    self.root,
                    e.strerror,
                )
                break
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record, 0)

    def describe(self) -> str:
        return str(Writer.parse(os.pread(self.fd, 4096, 0))) if self.fd is not None else "released"

    def release(self) -> None:
        """Let the next job write. The holder record stays in the file: it names the last writer."""
        with _held_guard:
            if _held.get(self.key) is self:
                del _held[self.key]
            if self.fd is not None:
                if self.guarded:  # unlock first: a child forked since (a DataLoader worker) shares the lock
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) drops its copies without unlocking: the parent still
    writes, and when the parent dies the lock must go with it, not live on in its workers."""
    global _held_guard
    _held_guard = threading.Lock()  # another thread may have held it at the fork
    for lock in _held.values():
        if lock.fd is not None:
            os.close(lock.fd)
            lock.fd = None
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def find_writer(root: Path) -> Writer | None:
    """The job writing the log at `root` now, or None if no job holds its lock.

    Needs only read access. Raises OSError when it cannot tell: the lock file is unreadable, or the
    file system refuses locks, the lock file is not a regular file inside the log.
    """
    fd = _open_record(root)
    if fd is None:
        return None  # never written by a logix that locks, or never opened for writing
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return Writer.parse(os.pread(fd, 4096, 0))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def last_writer(root: Path) -> Writer | None:
    """The job that last held the log's lock, from its record (None if there is none)."""
    try:
        fd = _open_record(root)
        if fd is None:
            return None
        try:
            text = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
    except OSError:
        return None
    writer = Writer.parse(text)
    return writer if writer.pid is not None else None


def _open_record(root: Path) -> int | None:
    """A read-only descriptor of the log's lock file, or None where there is none. Only a regular
    file inside the log is opened (a FIFO would block, a link could lead anywhere): OSError else."""
    path = Path(root) / LOCK_FILE
    problem = outside_problem(root, path)
    if problem is not None:
        raise OSError(errno.EPERM, f"{path} {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since it was looked at
        os.close(fd)
        raise OSError(errno.EPERM, f"{path} is not a regular file: refused")
    return fd


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
