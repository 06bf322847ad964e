"""resume=True: a restarted job continues its pass in a new segment and never logs an id twice;
skipped examples (already committed, or repeated) stay out of the rows and the statistics."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.disk import MANIFEST
from logix.disk.statistics import load_sums


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


X = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))


def capture(run, net, ids) -> None:
    ids = list(ids)
    with run.capture(ids):
        F.cross_entropy(net(X[ids]), Y[ids]).backward()
    net.zero_grad()


def rows_by_id(log) -> dict:
    return {int(i): g for i, g in zip(log.ids, log.gradients("2"))}


def sums(path) -> dict:
    manifest = json.loads((path / MANIFEST).read_text())
    return load_sums([path / f for f in manifest["passes"][0]["statistics_parts"]])


def test_resume_continues_the_pass_in_a_new_segment_and_skips_committed_ids(tmp_path):
    net = model()
    run = logix.init(tmp_path / "log", rank="full", statistics="kfac")
    run.watch(net)
    run.start_pass("epoch0")
    for start in range(0, 20, 5):
        capture(run, net, range(start, start + 5))
    run.close()  # the job stops here without finalizing (a crash or a restart)
    assert not logix.open(tmp_path / "log").current.finalized

    resumed = logix.init(tmp_path / "log", rank="full", statistics="kfac", resume=True)
    resumed.watch(net)
    for start in range(10, 40, 5):  # restarted from an earlier checkpoint: 10..19 come again
        capture(resumed, net, range(start, start + 5))
    resumed.finalize()

    log = logix.open(tmp_path / "log")
    assert [p.name for p in log.passes] == ["epoch0"] and log.current.finalized
    assert sorted(log.ids.tolist()) == list(range(40))
    assert len(log.current.segments) == 2

    reference = logix.init(tmp_path / "ref", rank="full", statistics="kfac")
    reference.watch(net)
    for start in range(0, 40, 5):
        capture(reference, net, range(start, start + 5))
    reference.finalize()
    expected = rows_by_id(logix.open(tmp_path / "ref"))
    for i, row in rows_by_id(log).items():
        torch.testing.assert_close(row, expected[i])
    # the statistics saw every example exactly once across the two sessions
    got, want = sums(tmp_path / "log"), sums(tmp_path / "ref")
    for name in want:
        for key in ("a_sum", "s_sum", "a_count", "s_count"):
            torch.testing.assert_close(got[name][key], want[name][key])


def test_resume_adopts_a_segment_the_manifest_never_listed(tmp_path):
    net = model()
    run = logix.init(tmp_path / "log", rank=3)
    run.watch(net)
    capture(run, net, range(0, 8))
    run.close()
    manifest = json.loads((tmp_path / "log" / MANIFEST).read_text())
    manifest["passes"][0]["segments"] = []  # as if the process died before recording its segment
    (tmp_path / "log" / MANIFEST).write_text(json.dumps(manifest))

    resumed = logix.init(tmp_path / "log", rank=3, resume=True)
    resumed.watch(net)
    capture(resumed, net, range(4, 12))
    resumed.finalize()
    log = logix.open(tmp_path / "log")
    assert sorted(log.ids.tolist()) == list(range(12))


def test_resume_named_pass_and_refusals(tmp_path):
    net = model()
    run = logix.init(tmp_path / "log", rank=3)
    run.watch(net)
    run.start_pass("a")
    capture(run, net, range(5))
    run.start_pass("b")
    capture(run, net, range(5))
    run.close()

    again = logix.init(tmp_path / "log", rank=3)
    again.watch(net)
    with pytest.raises(logix.ConfigError, match="resume=True"):
        again.start_pass("a")
    again.close()

    resumed = logix.init(tmp_path / "log", rank=3, resume=True)
    resumed.watch(net)
    resumed.start_pass("a")
    capture(resumed, net, range(3, 8))
    resumed.finalize()  # finalizes "a" only: "b" was not touched by this session
    log = logix.open(tmp_path / "log")
    assert sorted(log.select("a").ids.tolist()) == list(range(8))
    assert log.pass_info("a").finalized and not log.pass_info("b").finalized

    last = logix.init(tmp_path / "log", rank=3, resume=True)
    last.watch(net)
    with pytest.raises(logix.ConfigError, match="finalized"):
        last.start_pass("a")
    last.close()


def test_skipped_repeats_stay_out_of_the_statistics(tmp_path):
    net = model()
    run = logix.init(tmp_path / "skip", rank="full", statistics="kfac", on_duplicate="skip")
    run.watch(net)
    capture(run, net, range(0, 6))
    capture(run, net, [4, 5, 6, 7, 7, 8])  # 4, 5 logged before; 7 twice in the batch
    run.finalize()
    plain = logix.init(tmp_path / "plain", rank="full", statistics="kfac")
    plain.watch(net)
    capture(plain, net, range(0, 6))
    capture(plain, net, [6, 7, 8])
    plain.finalize()
    assert logix.open(tmp_path / "skip").ids.tolist() == list(range(9))
    got, want = sums(tmp_path / "skip"), sums(tmp_path / "plain")
    for name in want:
        for key in ("a_sum", "s_sum", "a_count", "s_count"):
            torch.testing.assert_close(got[name][key], want[name][key])


CRASHING_WORKER = """
import os, sys, torch
sys.path.insert(0, {tests!r})
import test_resume as t
import logix
net = t.model()
run = logix.init({path!r}, rank="full", statistics="kfac")
run.watch(net)
run.start_pass("epoch0")
for start in range(0, 20, 5):
    t.capture(run, net, range(start, start + 5))
run.flush()  # rows committed and statistics checkpointed
t.capture(run, net, range(20, 25))  # captured after the checkpoint: rows may or may not land
os._exit(1)  # dies without closing: no atexit, no final statistics
"""


def test_statistics_checkpointed_before_a_crash_count_after_resume(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "log"
    code = CRASHING_WORKER.format(tests=str(Path(__file__).parent), path=str(path))
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 1
    crashed = logix.open(path)
    assert not crashed.current.finalized and set(range(20)) <= set(crashed.ids.tolist())
    assert f"rows={len(crashed)}" in repr(crashed) and "NOT finalized" in repr(crashed)

    net = model()
    resumed = logix.init(path, rank="full", statistics="kfac", resume=True)
    resumed.watch(net)
    for start in range(0, 40, 5):
        capture(resumed, net, range(start, start + 5))
    resumed.finalize()
    log = logix.open(path)
    assert sorted(log.ids.tolist()) == list(range(40))

    reference = logix.init(tmp_path / "ref", rank="full", statistics="kfac")
    reference.watch(net)
    for start in range(0, 40, 5):
        capture(reference, net, range(start, start + 5))
    reference.finalize()
    got, want = sums(path), sums(tmp_path / "ref")
    batch_20_committed = 20 in set(crashed.ids.tolist())
    for name in want:
        # ids 0-19 come from the crashed session's checkpoint, 20-39 from the resumed session, except
        # ids 20-24 when the crash left their rows committed (skipped on resume, never in a checkpoint)
        examples = want[name]["s_count"] - (5 if batch_20_committed else 0)
        torch.testing.assert_close(got[name]["s_count"], examples)
        if not batch_20_committed:
            for key in ("a_sum", "s_sum", "a_count"):
                torch.testing.assert_close(got[name][key], want[name][key])


UNCHECKPOINTED_WORKER = """
import os, sys, time, torch
sys.path.insert(0, {tests!r})
import test_resume as t
import logix
net = t.model()
run = logix.init({path!r}, rank="full", statistics="kfac", commit_interval=0.05)
run.watch(net)
run.start_pass("epoch0")
for start in range(0, 20, 5):
    t.capture(run, net, range(start, start + 5))
time.sleep(1.0)  # the writer commits the rows on its own; the statistics are never checkpointed
os._exit(1)
"""


@pytest.mark.parametrize("revisits", [1, 3])
def test_statistics_recounted_on_resume_are_counted_once_however_often_the_pass_is_revisited(tmp_path, revisits):
    """A crash left rows committed whose statistics were lost: the next session counts their
    statistics when they come again. Later sessions that revisit the pass must not count them again
    (each used to: 20 rows and three revisits gave four times the counts)."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "log"
    code = UNCHECKPOINTED_WORKER.format(tests=str(Path(__file__).parent), path=str(path))
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 1
    assert sorted(logix.open(path).ids.tolist()) == list(range(20))
    net = model()
    for session in range(revisits + 1):
        resumed = logix.init(path, rank="full", statistics="kfac", resume=True)
        resumed.watch(net)
        for start in range(0, 20, 5):
            capture(resumed, net, range(start, start + 5))
        if session < revisits:
            resumed.close()  # ends cleanly without finalizing: its sums are listed, the pass stays open
        else:
            resumed.finalize()
    reference = logix.init(tmp_path / "ref", rank="full", statistics="kfac")
    reference.watch(net)
    for start in range(0, 20, 5):
        capture(reference, net, range(start, start + 5))
    reference.finalize()
    got, want = sums(path), sums(tmp_path / "ref")
    for name in want:
        for key in ("a_sum", "s_sum", "a_count", "s_count"):
            torch.testing.assert_close(got[name][key], want[name][key])


def test_resume_never_finalizes_a_pass_whose_committed_rows_cannot_be_read(tmp_path):
    """A pass without statistics is finalized without reading its rows, so finalize reads each
    segment's last committed rows first: a damaged last chunk is an error, not a finalized pass."""
    import h5py

    path = tmp_path / "log"
    net = model()
    crashed = logix.init(path, rank="full")
    crashed.watch(net)
    crashed.start_pass("p0")
    for start in range(0, 20, 5):
        capture(crashed, net, range(start, start + 5))
    crashed.close()  # as after a crash: p0 is not finalized
    segment = path / logix.open(path).pass_info("p0").segments[0].file
    with h5py.File(segment, "r") as f:
        grads = f["grads"]
        last = grads.id.get_num_chunks() - 1
        info = grads.id.get_chunk_info(last)
    with open(segment, "r+b") as f:  # one flipped byte in the first row of the last chunk
        f.seek(info.byte_offset + 3)
        byte = f.read(1)
        f.seek(info.byte_offset + 3)
        f.write(bytes([byte[0] ^ 0x5A]))
    resumed = logix.init(path, rank="full", resume=True)
    resumed.watch(net)
    resumed.start_pass("p1")
    capture(resumed, net, range(0, 5))
    with pytest.raises(logix.LogFormatError, match="p000-r0-s000.h5"):
        resumed.finalize()
    assert not any(p.finalized for p in logix.open(path).passes if p.name == "p0")


def test_a_resumed_curvature_pass_keeps_each_draw_once(tmp_path):
    """A curvature pass takes an id once per draw; a job that stops in its third draw and restarts
    its draws from the first skips the rows it had committed, and ends with exactly 4 per id."""
    net = model()

    def draw(run, ids, seed):  # the same labels for a draw whichever session captures it
        labels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(seed))
        with run.capture(list(ids)):
            F.cross_entropy(net(X[list(ids)]), labels[list(ids)]).backward()
        net.zero_grad()

    def in_curvature_pass(path):  # a run that logged "train" and is now in its curvature pass
        run = logix.init(path, rank="full", statistics="kfac")
        run.watch(net)
        run.start_pass("train")
        capture(run, net, range(40))
        run.start_pass("train/fisher", curvature_for="train")
        return run

    run = in_curvature_pass(tmp_path / "log")
    for seed in (0, 1):
        draw(run, range(40), seed)
    draw(run, range(20), 2)
    run.close()  # stopped in the third draw, without finalizing

    resumed = logix.init(tmp_path / "log", rank="full", statistics="kfac", resume=True)
    resumed.watch(net)
    for seed in range(4):  # the draws again from the start
        draw(resumed, range(40), seed)
    resumed.finalize()

    reference = in_curvature_pass(tmp_path / "ref")
    for seed in range(4):
        draw(reference, range(40), seed)
    reference.finalize()

    got, want = (logix.open(p, pass_name="train/fisher") for p in (tmp_path / "log", tmp_path / "ref"))
    assert got.current.finalized and len(got) == len(want) == 160
    assert sorted(got.ids.tolist()) == sorted(want.ids.tolist())
    key = lambda log: sorted(zip(log.ids.tolist(), log.gradients("2").reshape(len(log), -1).tolist()))  # noqa: E731
    assert key(got) == key(want)  # the same rows: each (id, draw) once
