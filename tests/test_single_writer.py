"""One writing job per log: a second writer is refused, a dead one never blocks, readers can tell.

Writers run in child processes (`WRITER` below) so that a second job, a SIGKILL and a reader
without write permission are what they are in real use.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix import LogInUseError
from logix.cli import main as cli_main
from logix.disk.lock import LOCK_FILE, find_writer, last_writer

WRITER = textwrap.dedent(
    """
    import os, sys
    import torch, torch.nn.functional as F
    from torch import nn
    import logix

    path, first_id = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    run = logix.init(path, rank="full", statistics="kfac", resume=True)
    run.watch(model)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with run.capture(list(range(first_id, first_id + 6))):
        F.cross_entropy(model(x), y).backward()
    run.flush()
    if len(sys.argv) > 3:  # a DataLoader-style worker forked while the run holds the log
        forked, started = os.pipe()
        if os.fork() == 0:
            os.write(started, b"1")  # after the fork handlers ran
            import time
            time.sleep(60)
            os._exit(0)
        os.read(forked, 1)
    print("ready", os.getpid(), flush=True)
    sys.stdin.readline()  # the test says when to finish
    run.finalize()
    print("done", flush=True)
    """
)


class Writer:
    """A logging job in a child process that holds the log until told to finish (or killed)."""

    def __init__(self, path: Path, first_id: int = 0, fork_worker: bool = False):
        args = [sys.executable, "-c", WRITER, str(path), str(first_id)] + (["fork"] if fork_worker else [])
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        self.proc = subprocess.Popen(args, text=True, **pipes)
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["ready"], f"the writer did not start: {line} {self.proc.stderr.read()}"
        self.pid = int(line[1])

    def finish(self) -> None:
        out, err = self.proc.communicate("finalize\n", timeout=120)
        assert self.proc.returncode == 0 and "done" in out, err

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    return model, torch.randn(6, 4), torch.randint(0, 2, (6,))


def capture(run, model, x, y, ids) -> None:
    with run.capture(ids):
        F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("resume", [True, False])
def test_a_second_job_is_refused_naming_the_holder_and_nothing_is_lost(tmp_path, resume):
    path = tmp_path / "live"
    first = Writer(path)
    with pytest.raises(LogInUseError) as refused:
        logix.init(path, rank="full", statistics="kfac", resume=resume)
    message = str(refused.value)
    assert f"pid {first.pid}" in message and socket.gethostname() in message and "since 20" in message, message
    assert find_writer(path).pid == first.pid
    first.finish()
    log = logix.open(path)
    assert [p.name for p in log.passes] == ["pass0"] and log.passes[0].finalized
    assert sorted(log.ids.tolist()) == list(range(6))
    assert cli_main(["verify", "-q", str(path)]) == 0
    # the log is free again: a later session adds to it
    model, x, y = model_and_batch()
    with logix.init(path, rank="full", statistics="kfac") as run:
        run.watch(model)
        capture(run, model, x, y, list(range(6)))
    assert [p.name for p in logix.open(path).passes] == ["pass0", "pass1"]


def test_a_second_init_in_the_same_process_is_refused_until_the_first_closes(tmp_path):
    model, x, y = model_and_batch()
    path = tmp_path / "log"
    run = logix.init(path, rank="full")
    run.watch(model)
    capture(run, model, x, y, list(range(6)))
    for resume in (False, True):
        with pytest.raises(LogInUseError, match=rf"already being written by a Run of this process.*pid {os.getpid()}"):
            logix.init(path, rank="full", resume=resume)
    with pytest.raises(LogInUseError):  # the same log under another spelling of its path
        logix.init(tmp_path / "." / "log", rank="full")
    run.finalize()
    again = logix.init(path, rank="full")
    again.watch(model)
    capture(again, model, x, y, list(range(6)))
    again.finalize()
    assert [p.rows for p in logix.open(path).passes] == [6, 6]


def test_a_killed_holder_never_blocks_resume(tmp_path):
    path = tmp_path / "log"
    writer = Writer(path)
    assert find_writer(path).pid == writer.pid
    writer.kill()  # SIGKILL: no cleanup ran, the kernel released the lock
    assert find_writer(path) is None
    assert last_writer(path).pid == writer.pid  # the record names who wrote last
    model, x, y = model_and_batch()
    run = logix.init(path, rank="full", statistics="kfac", resume=True)  # at once, no waiting
    run.watch(model)
    capture(run, model, x, y, list(range(6, 12)))
    run.finalize()
    log = logix.open(path)
    assert sorted(log.ids.tolist()) == list(range(12)) and log.passes[-1].finalized


def test_a_forked_worker_does_not_keep_a_dead_holders_lock(tmp_path):
    """DataLoader workers are forked while the run holds the log; the lock dies with the run's process."""
    path = tmp_path / "log"
    writer = Writer(path, fork_worker=True)
    children = subprocess.run(["pgrep", "-P", str(writer.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the writer forked no worker"
    try:
        writer.kill()
        assert find_writer(path) is None
        logix.init(path, rank="full", statistics="kfac", resume=True).close()
    finally:
        for child in children:
            os.kill(int(child), signal.SIGKILL)


def test_a_forked_worker_does_not_keep_the_lock_after_finalize(tmp_path):
    path = tmp_path / "log"
    model, x, y = model_and_batch()
    run = logix.init(path, rank="full")
    run.watch(model)
    capture(run, model, x, y, list(range(6)))
    run.flush()
    child = os.fork()
    if child == 0:  # a worker that outlives the epoch (persistent_workers=True)
        try:
            import time

            time.sleep(30)
        finally:
            os._exit(0)
    try:
        run.finalize()
        assert find_writer(path) is None
        logix.init(path, rank="full").close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def _as_nobody(fn):
    """Run fn() in a forked child with no write permission anywhere in the log; returns its JSON result."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        code = 0
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            result = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result, code = {"error": f"{type(e).__name__}: {e}"}, 1
        os.write(write, json.dumps(result).encode())
        os._exit(code)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(child, 0)
    return json.loads(data)


@pytest.fixture
def shared_dir():
    """A lab directory other users may read: world-traversable, files following a 022 umask."""
    root = Path(tempfile.mkdtemp(prefix="logix-shared-"))
    root.chmod(0o755)
    old = os.umask(0o022)
    yield root
    os.umask(old)
    subprocess.run(["rm", "-rf", str(root)], check=False)


def test_a_reader_without_write_permission_tells_a_live_log_from_a_crashed_one(shared_dir):
    path = shared_dir / "live"
    writer = Writer(path)

    def look():
        import contextlib
        import io

        assert not os.access(path / "manifest.json", os.W_OK) or os.geteuid() != 65534
        log = logix.open(path)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = cli_main(["info", str(path)])
        w = log.writer
        return {"writer": None if w is None else w.pid, "repr": repr(log), "info": out.getvalue(), "status": status}

    live = _as_nobody(look)
    assert "error" not in live, live
    assert live["writer"] == writer.pid and "being written" in live["repr"]
    info = " ".join(live["info"].split())
    assert f"writer pid {writer.pid} on host {socket.gethostname()} since 20" in info, info
    assert f"pass 'pass0' is being written by pid {writer.pid}" in info and "resume=True" not in info, info
    assert "crashed" not in info, info
    writer.kill()
    dead = _as_nobody(look)
    assert "error" not in dead, dead
    assert dead["writer"] is None and "NOT finalized" in dead["repr"]
    info = " ".join(dead["info"].split())
    assert "writer none" in info and "crashed or killed" in info and "resume=True" in info, info


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_every_file_of_the_log_follows_the_umask(tmp_path, umask):
    model, x, y = model_and_batch()
    old = os.umask(umask)
    try:
        path = tmp_path / "log"
        run = logix.init(path, rank=2, statistics=["ekfac", "raw"])
        run.watch(model)
        capture(run, model, x, y, list(range(6)))
        run.flush()  # statistics checkpoint: a partial-sums file
        assert list((path / "statistics").glob("*.partial.h5")), "no checkpoint was written"
        run.finalize()
        resumed = logix.init(path, rank=2, statistics=["ekfac", "raw"])
        resumed.watch(model)
        capture(resumed, model, x, y, list(range(6)))
        resumed.finalize()
        modes = _modes(path)
    finally:
        os.umask(old)
    names = set(modes)
    assert {"manifest.json", "projections.h5", LOCK_FILE, "segments", "statistics"} <= names, names
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (want_dir if (path / name if name != "." else path).is_dir() else want_file)
    }
    assert not wrong, f"umask {oct(umask)}: files {oct(want_file)}, folders {oct(want_dir)}; wrong: {wrong}"


def test_file_systems_without_locks_warn_and_still_log(tmp_path, monkeypatch, caplog):
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    model, x, y = model_and_batch()
    with caplog.at_level(logging.WARNING, logger="logix"):
        with logix.init(tmp_path / "log", rank="full") as run:
            run.watch(model)
            capture(run, model, x, y, list(range(6)))
    assert "refuses file locks" in caplog.text and "No locks available" in caplog.text
    assert len(logix.open(tmp_path / "log")) == 6


def test_a_lock_file_left_in_a_new_directory_is_not_foreign(tmp_path):
    """A job killed between taking the lock and writing the first manifest leaves only the lock."""
    path = tmp_path / "log"
    path.mkdir()
    (path / LOCK_FILE).write_text('{"pid": 1, "host": "elsewhere", "started": "2026-01-01"}')
    model, x, y = model_and_batch()
    with logix.init(path, rank="full") as run:
        run.watch(model)
        capture(run, model, x, y, list(range(6)))
    assert len(logix.open(path)) == 6
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(logix.ConfigError, match="is not a logix log"):
        logix.init(tmp_path / "foreign", rank="full")
    assert not (tmp_path / "foreign" / LOCK_FILE).exists(), "a foreign directory got a lock file"
