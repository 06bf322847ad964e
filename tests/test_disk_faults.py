"""The disk refuses a write mid-training: a full disk, a file-size limit, a deleted log directory,
a read-only directory. Each gives the training process a WriterError (a LogixError), keeps every
row committed before the fault bit-identical to a clean run's, and lets the process exit cleanly:
HDF5 used to crash the interpreter at exit (SIGSEGV, status 139) over the file it could not close.

Each case runs the training in a subprocess, so the exit status is the process's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import logix

WORKER = r"""
import json, os, resource, shutil, signal, sys, torch
import torch.nn.functional as F
from torch import nn
import logix

mode, path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "file-size":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2))
committed, error = [], None
try:
    run = logix.init(path, rank="full", statistics="kfac", commit_interval=60.0)
    run.watch(model)
    for step in range(400):
        ids = list(range(step * 8, step * 8 + 8))
        with run.capture(ids):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        if step % 3 == 2:
            run.flush()
            committed = list(range(step * 8 + 8))
        if mode == "deleted" and step == 7:
            shutil.rmtree(path)
    run.finalize()
except logix.LogixError as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"committed": committed, "error": error}))
"""


def run_worker(mode: str, path: Path, limit: int = 0) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(path), str(limit)], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return done, (json.loads(lines[-1]) if lines else {})


def reference_rows(tmp_path: Path, n: int) -> dict:
    """Rows of the same batches, logged on a disk with room (each step sees the same x, y)."""
    done, report = run_worker("clean", tmp_path / "reference")
    assert done.returncode == 0 and report["error"] is None, done.stderr[-2000:]
    log = logix.open(tmp_path / "reference")
    return {int(i): row for i, row in zip(log.ids, log.rows()) if int(i) < n}


def assert_committed_rows_kept(path: Path, report: dict, tmp_path: Path) -> None:
    assert report["committed"], "the fault came before anything was committed: make the limit larger"
    log = logix.open(path)
    got = {int(i): row for i, row in zip(log.ids, log.rows())}
    assert set(report["committed"]) <= set(got)
    want = reference_rows(tmp_path, len(report["committed"]))
    for i in report["committed"]:
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=0)


def assert_clean_exit(done: subprocess.CompletedProcess, report: dict) -> None:
    assert done.returncode == 0, f"status {done.returncode}: {done.stderr[-3000:]}"
    assert report.get("error", "").startswith("WriterError"), report


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """An 8 MB tmpfs mounted for the test, where the machine allows it (root, a kernel with tmpfs)."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_a_writer_error_and_keeps_the_committed_rows(tiny_tmpfs, tmp_path):
    done, report = run_worker("full", tiny_tmpfs / "log")
    assert_clean_exit(done, report)
    assert_committed_rows_kept(tiny_tmpfs / "log", report, tmp_path)


def test_a_file_size_limit_is_a_writer_error_and_keeps_the_committed_rows(tmp_path):
    done, report = run_worker("file-size", tmp_path / "log", limit=4_000_000)
    assert_clean_exit(done, report)
    assert_committed_rows_kept(tmp_path / "log", report, tmp_path)


def test_a_deleted_log_directory_is_a_writer_error_at_the_next_commit(tmp_path):
    """Writes to a deleted file succeed into the void; the commit after the deletion notices."""
    done, report = run_worker("deleted", tmp_path / "log")
    assert_clean_exit(done, report)
    assert len(report["committed"]) <= 9 * 8  # step 8's flush, the first after the deletion, failed
    assert not (tmp_path / "log").exists()


def test_a_read_only_directory_is_a_writer_error_before_anything_is_written(tmp_path):
    if os.geteuid() == 0:  # root writes through permissions: use a read-only tmpfs instead
        target = tmp_path / "ro"
        target.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
    try:
        done, report = run_worker("clean", target / "log")
        assert done.returncode == 0, done.stderr[-3000:]
        assert report["error"] is not None and report["committed"] == [], report
        assert report["error"].split(":")[0] in ("WriterError", "ConfigError"), report
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        else:
            target.chmod(0o755)


WATCH_WORKER = r"""
import sys, torch, logix
from torch import nn
model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))  # 128 KB of projections at rank 16
try:
    run = logix.init(sys.argv[1], rank=16)
    run.watch(model)
    print("watched")
except logix.LogixError as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_a_disk_full_during_watch_is_a_writer_error(tmp_path):
    """The projections do not fit: a WriterError at watch, and the process exits cleanly (it used
    to segfault inside HDF5's close)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        done = subprocess.run(
            [sys.executable, "-c", WATCH_WORKER, str(mount / "log")], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith("WriterError: writing") and "projections" in done.stdout, done.stdout
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
