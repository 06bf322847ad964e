"""The on-disk log: round trips through logix.open and plain h5py, dtypes, flags, passes, steps,
sessions, the run as a context manager, concurrent readers, writer failure and backpressure, and
damaged logs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients, projected
from torch import nn

import logix
import logix.disk
from logix import (
    CaptureError,
    ConfigError,
    DuplicateIdError,
    LogFormatError,
    ModelMismatchError,
    ModuleInfo,
    WriterError,
)
from logix.disk.files import FLAG_NONFINITE
from logix.disk.writer import nonfinite_flags_np, nonfinite_rows

NAMES = ["0", "2"]
FULL_MODULES = {
    "0": ModuleInfo("0", "linear", d_in=5, d_out=5, k_in=5, k_out=5, offset=0, bias=True),
    "2": ModuleInfo("2", "linear", d_in=6, d_out=3, k_in=6, k_out=3, offset=25, bias=True),
}


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def example_loss(out, y):
    return F.cross_entropy(out, y)


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def step(run, model, ids, x, y, **kwargs) -> None:
    """One captured batch, with the batch-mean cross-entropy the capture assumes by default."""
    with run.capture(ids, **kwargs):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad()


def exact(model, x, y) -> dict[str, torch.Tensor]:
    return exact_gradients(model, example_loss, x, y)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.float(), rtol=1e-4, atol=1e-5)


def read_segment(path) -> dict:
    """Everything below `committed`, read with plain h5py as the docs promise."""
    with h5py.File(path, "r", swmr=True) as f:
        n = int(f["committed"][0])
        ids = f["ids"]
        return {
            "n": n,
            "committed_shape": f["committed"].shape,
            "ids": ids.asstr()[:n] if ids.dtype.kind == "O" else ids[:n],
            "grads": f["grads"][:n],
            "grads_dtype": f["grads"].dtype,
            "flags": f["flags"][:n],
            "step": f["step"][:n],
            "attrs": dict(f.attrs),
        }


def make_log(path, model, batches, **init_kwargs):
    """Log `batches` = [(ids, x, y), ...] into one pass and finalize."""
    run = logix.init(path, **init_kwargs)
    run.watch(model)
    for ids, x, y in batches:
        step(run, model, ids, x, y)
    run.finalize()
    return logix.open(path)


# -- round trip ----------------------------------------------------------------------------------


def test_round_trip_full_rank(tmp_path):
    model = tiny_model()
    (x1, y1), (x2, y2) = batch(4, 1), batch(3, 2)
    run = logix.init(tmp_path / "log", rank="full")
    assert run.watch(model) == NAMES
    step(run, model, [0, 1, 2, 3], x1, y1)
    step(run, model, torch.tensor([4, 5, 6]), x2, y2)
    run.finalize()

    log = logix.open(tmp_path / "log")
    assert list(log.ids) == [0, 1, 2, 3, 4, 5, 6]
    assert len(log) == 7
    assert list(log.steps) == [0, 0, 0, 0, 1, 1, 1]
    assert list(log.committed_ids) == list(log.ids)
    assert list(log.flagged_ids) == []
    assert log.modules == FULL_MODULES
    assert log.width == 43

    [p] = log.passes
    assert (p.name, p.index, p.finalized, p.rows, p.nonfinite) == ("pass0", 0, True, 7, 0)
    assert [(s.file, s.rank, s.session, s.rows) for s in p.segments] == [("segments/p000-r0-s000.h5", 0, 0, 7)]
    assert log.current == p

    # At rank "full" each row is the exact gradient of that example's own loss.
    want = exact(model, torch.cat([x1, x2]), torch.cat([y1, y2]))
    for name in NAMES:
        assert_close(log.gradients(name), want[name])

    # The same numbers through plain h5py.
    seg = read_segment(tmp_path / "log" / p.segments[0].file)
    assert seg["n"] == 7 and seg["committed_shape"] == (1,)
    assert seg["grads_dtype"] == np.float32
    assert seg["grads"].shape == (7, 43)
    assert list(seg["ids"]) == list(log.ids)
    assert list(seg["flags"]) == [0] * 7
    assert list(seg["step"]) == list(log.steps)
    assert seg["attrs"]["pass"] == "pass0" and seg["attrs"]["session"] == 0
    for name, info in log.modules.items():
        block = seg["grads"][:, info.offset : info.offset + info.k_out * info.k_in]
        assert torch.equal(log.gradients(name), torch.from_numpy(block).reshape(7, info.k_out, info.k_in))
    assert torch.equal(log.rows(), torch.from_numpy(seg["grads"]))

    manifest = json.loads((tmp_path / "log" / "manifest.json").read_text())
    assert manifest["schema_version"] == logix.disk.SCHEMA_VERSION == 1
    assert manifest["format"] == "logix-log"
    assert manifest["config"] == {
        "rank": "full",
        "dtype": "float32",
        "projection": "gaussian",
        "seed": 0,
        "statistics": [],
    }
    assert manifest["width"] == 43 and manifest["id_kind"] == "int"
    assert [m["name"] for m in manifest["modules"]] == NAMES
    assert manifest["passes"][0]["segments"][0]["rows"] == 7


@pytest.mark.parametrize("rank", [2, (3, 2)])
def test_projected_rows_equal_projected_exact_gradients(tmp_path, rank):
    model = tiny_model()
    x, y = batch(5, 3)
    log = make_log(tmp_path / "log", model, [(list(range(5)), x, y)], rank=rank)
    k_in, k_out = (rank, rank) if isinstance(rank, int) else rank
    assert [(m.k_in, m.k_out, m.offset) for m in log.modules.values()] == [
        (k_in, min(k_out, 5), 0),
        (k_in, min(k_out, 3), k_in * min(k_out, 5)),
    ]
    want = exact(model, x, y)
    projections = log.projections()
    for name in NAMES:
        p_in, p_out = projections[name]
        assert_close(log.gradients(name), projected(want[name], p_in, p_out))


def test_string_ids_round_trip(tmp_path):
    model = tiny_model()
    ids = ["plain", "", "α-β γ", "日本語 🎉", "x" * 20_000, "tab\tand\nnewline"]
    x, y = batch(len(ids), 4)
    log = make_log(tmp_path / "log", model, [(ids, x, y)], rank="full")
    assert list(log.ids) == ids
    assert json.loads((tmp_path / "log" / "manifest.json").read_text())["id_kind"] == "str"
    assert list(read_segment(tmp_path / "log" / log.current.segments[0].file)["ids"]) == ids
    assert_close(log.gradients("2"), exact(model, x, y)["2"])


def test_int_ids_round_trip_and_id_kinds_do_not_mix(tmp_path):
    model = tiny_model()
    ids = [-7, 0, 2**62, np.int64(12)]
    x, y = batch(4, 5)
    run = logix.init(tmp_path / "log", rank=2)
    run.watch(model)
    step(run, model, ids, x, y)
    with pytest.raises(CaptureError, match="int"):
        step(run, model, ["a", "b", "c", "d"], x, y)
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert log.ids.dtype == np.int64
    assert list(log.ids) == [-7, 0, 2**62, 12]


# -- dtype and flags -----------------------------------------------------------------------------


def test_float16_rows_are_float32_rows_cast_and_overflow_is_flagged(tmp_path):
    model = tiny_model()
    x, y = batch(4, 6)
    x[2] *= 1e6
    with torch.no_grad():
        y[2] = model(x[2:3]).argmin()  # a confidently wrong example: its gradient is huge, not zero
    batches = [([0, 1, 2, 3], x, y)]
    log32 = make_log(tmp_path / "f32", model, batches, rank="full", dtype="float32")
    log16 = make_log(tmp_path / "f16", model, batches, rank="full", dtype="float16")

    rows32 = log32.rows()
    assert torch.isfinite(rows32).all()
    assert rows32[2].abs().max() > 65504  # precondition: example 2 overflows float16
    assert rows32[[0, 1, 3]].abs().max() < 65504
    assert list(log32.ids) == [0, 1, 2, 3] and log32.current.nonfinite == 0

    seg = read_segment(tmp_path / "f16" / log16.current.segments[0].file)
    assert seg["grads_dtype"] == np.float16
    assert list(seg["flags"]) == [0, 0, 1, 0]
    assert torch.equal(log16.rows(include_flagged=True), rows32.half().float())

    assert log16.current.nonfinite == 1 and log16.current.rows == 4
    assert list(log16.ids) == [0, 1, 3] and len(log16) == 3
    assert list(log16.flagged_ids) == [2]
    assert list(log16.committed_ids) == [0, 1, 2, 3]  # the order of include_flagged=True
    assert torch.equal(log16.rows(), rows32[[0, 1, 3]].half().float())
    for name, info in log16.modules.items():
        want = rows32[:, info.columns].half().float().reshape(4, info.k_out, info.k_in)
        assert torch.equal(log16.gradients(name), want[[0, 1, 3]])
        assert torch.equal(log16.gradients(name, include_flagged=True), want)
    assert not torch.isfinite(log16.gradients("2", include_flagged=True)[2]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rows_are_flagged_and_excluded(tmp_path, bad):
    model = tiny_model()
    x, y = batch(4, 7)
    x[1, 0] = bad
    log = make_log(tmp_path / "log", model, [([10, 11, 12, 13], x, y)], rank="full")
    assert list(log.ids) == [10, 12, 13] and len(log) == 3
    assert list(log.steps) == [0, 0, 0]
    assert list(log.flagged_ids) == [11]
    assert list(log.committed_ids) == [10, 11, 12, 13]
    assert list(read_segment(tmp_path / "log" / log.current.segments[0].file)["flags"]) == [0, 1, 0, 0]
    assert log.current.rows == 4 and log.current.nonfinite == 1

    good = [0, 2, 3]
    want = exact(model, x[good], y[good])
    for name in NAMES:
        assert_close(log.gradients(name), want[name])
        everything = log.gradients(name, include_flagged=True)
        assert everything.shape[0] == 4
        assert_close(everything[good], want[name])
    assert not torch.isfinite(log.rows(include_flagged=True)[1]).all()
    assert torch.isfinite(log.rows()).all() and log.rows().shape[0] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nonfinite_rows_finds_exactly_the_rows_with_a_nan_or_an_infinity(dtype):
    """The fast check (a row's sum) must neither miss a bad row nor flag a finite row whose sum
    overflows, nor two infinities of opposite signs that the sum turns into NaN."""
    big = torch.finfo(dtype).max
    rows = torch.zeros(7, 300, dtype=dtype)
    rows[1, 5] = float("nan")
    rows[2, :] = big  # finite values whose sum overflows
    rows[3, 299] = float("inf")
    rows[4, 0], rows[4, 1] = float("inf"), float("-inf")
    rows[5, :150], rows[5, 150:] = big, -big  # sums to zero in exact arithmetic
    rows[6, 10] = float("-inf")
    want = torch.tensor([False, True, False, True, True, False, True])
    assert torch.equal(nonfinite_rows(rows), want)
    assert torch.equal(nonfinite_rows(rows[[0, 2, 5]]), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(nonfinite_rows(rows), ~torch.isfinite(rows).all(dim=1))
    # the writer thread's numpy version (CPU rows are flagged there, a joined block at a time)
    flags = nonfinite_flags_np(rows.numpy())
    assert flags.dtype == np.uint8
    np.testing.assert_array_equal(flags, want.numpy().astype(np.uint8) * FLAG_NONFINITE)
    np.testing.assert_array_equal(nonfinite_flags_np(rows[[0, 2, 5]].numpy()), np.zeros(3, np.uint8))


# -- passes --------------------------------------------------------------------------------------


def test_passes_metadata_selection_and_repeated_ids(tmp_path):
    model = tiny_model()
    (x1, y1), (x2, y2) = batch(3, 8), batch(3, 9)
    run = logix.init(tmp_path / "log", rank="full")
    run.watch(model)
    assert run.start_pass("epoch0", step=10, lr=0.1, checkpoint="ckpt/0.pt", note="warmup", extra={"a": [1, 2]}) == (
        "epoch0"
    )
    step(run, model, [0, 1, 2], x1, y1)
    run.start_pass("epoch1", lr=0.05)
    step(run, model, [0, 1, 2], x2, y2)  # the same ids again, in another pass
    run.finalize()

    log = logix.open(tmp_path / "log")
    assert [p.name for p in log.passes] == ["epoch0", "epoch1"]
    assert [p.index for p in log.passes] == [0, 1]
    assert all(p.finalized for p in log.passes)
    assert [p.segments[0].file for p in log.passes] == ["segments/p000-r0-s000.h5", "segments/p001-r0-s000.h5"]
    meta0, meta1 = log.passes[0].meta, log.passes[1].meta
    assert {k: v for k, v in meta0.items() if k != "started"} == {
        "step": 10,
        "lr": 0.1,
        "checkpoint": "ckpt/0.pt",
        "note": "warmup",
        "extra": {"a": [1, 2]},
    }
    assert {k: v for k, v in meta1.items() if k != "started"} == {"step": 11, "lr": 0.05, "checkpoint": None}
    assert isinstance(meta0["started"], str) and meta0["started"]

    # Default: the latest pass.
    assert log.current.name == "epoch1"
    assert list(log.ids) == [0, 1, 2]
    assert list(log.steps) == [11, 11, 11]
    assert_close(log.gradients("0"), exact(model, x2, y2)["0"])

    for first in (logix.open(tmp_path / "log", pass_name="epoch0"), log.select("epoch0")):
        assert first.current.name == "epoch0"
        assert list(first.ids) == [0, 1, 2]
        assert list(first.steps) == [10, 10, 10]
        assert_close(first.gradients("0"), exact(model, x1, y1)["0"])
        assert_close(first.gradients("2"), exact(model, x1, y1)["2"])
    with pytest.raises(logix.NotInLogError, match=r"no pass named 'epoch9'.*passes: \['epoch0', 'epoch1'\]"):
        log.select("epoch9")


def test_duplicate_id_in_a_pass_raises_and_writes_nothing_of_that_batch(tmp_path):
    model = tiny_model()
    (xa, ya), (xb, yb), (xc, yc) = batch(2, 10), batch(2, 11), batch(2, 12)
    run = logix.init(tmp_path / "log", rank="full")
    run.watch(model)
    step(run, model, [0, 1], xa, ya)
    with pytest.raises(DuplicateIdError, match=r"\[1\]"):
        step(run, model, [1, 2], xb, yb)  # 1 was logged by an earlier batch
    with pytest.raises(DuplicateIdError, match=r"\[3\]"):
        step(run, model, [3, 3], xb, yb)  # 3 repeats within the batch
    step(run, model, [2, 3], xc, yc)  # the run goes on; 2 and 3 were never written
    run.finalize()

    log = logix.open(tmp_path / "log")
    assert list(log.ids) == [0, 1, 2, 3]
    assert list(log.steps) == [0, 0, 1, 1]
    want = exact(model, torch.cat([xa, xc]), torch.cat([ya, yc]))
    for name in NAMES:
        assert_close(log.gradients(name), want[name])


def test_on_duplicate_skip_keeps_the_first_occurrence(tmp_path):
    model = tiny_model()
    (xa, ya), (xb, yb) = batch(2, 13), batch(4, 14)
    run = logix.init(tmp_path / "log", rank="full", on_duplicate="skip")
    run.watch(model)
    step(run, model, [0, 1], xa, ya)
    step(run, model, [1, 2, 2, 3], xb, yb)  # 1 seen before; 2 twice in the batch
    step(run, model, [0, 1], xa, ya)  # nothing new: nothing written, no error
    run.finalize()

    log = logix.open(tmp_path / "log")
    assert list(log.ids) == [0, 1, 2, 3]
    assert list(log.steps) == [0, 0, 1, 1]
    # Rows are each example's own gradient even though the batch mean ran over 4 examples.
    want = exact(model, torch.stack([xa[0], xa[1], xb[1], xb[3]]), torch.stack([ya[0], ya[1], yb[1], yb[3]]))
    for name in NAMES:
        assert_close(log.gradients(name), want[name])


def test_repeated_pass_name_raises_config_error(tmp_path):
    model = tiny_model()
    x, y = batch(2, 15)
    run = logix.init(tmp_path / "log", rank=2)
    run.watch(model)
    run.start_pass("a")
    step(run, model, [0, 1], x, y)
    with pytest.raises(ConfigError, match="'a'"):
        run.start_pass("a")
    with pytest.raises(ConfigError):
        run.start_pass("")
    run.finalize()

    run2 = logix.init(tmp_path / "log", rank=2)  # a later session cannot reuse the name either
    run2.watch(model)
    with pytest.raises(ConfigError, match="'a'"):
        run2.start_pass("a")
    run2.close()

    log = logix.open(tmp_path / "log")
    assert [p.name for p in log.passes] == ["a"]
    assert list(log.ids) == [0, 1]


def test_run_keeps_working_after_a_rejected_pass_name(tmp_path):
    model = tiny_model()
    x, y = batch(4, 16)
    run = logix.init(tmp_path / "log", rank=2)
    run.watch(model)
    run.start_pass("a")
    step(run, model, [0, 1], x[:2], y[:2])
    with pytest.raises(ConfigError):
        run.start_pass("a")
    step(run, model, [2, 3], x[2:], y[2:])  # still pass "a"
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert [p.name for p in log.passes] == ["a"]
    assert list(log.ids) == [0, 1, 2, 3]


# -- steps ---------------------------------------------------------------------------------------


def test_steps_follow_the_optimizer(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(1, 17)
    run = logix.init(tmp_path / "log", rank=2)
    run.watch(model, optimizer=opt)

    def train(ids, **kwargs):
        with run.capture(ids, **kwargs):
            F.cross_entropy(model(x), y).backward()

    train([0])
    opt.step()
    opt.zero_grad()
    train([1])  # two captures in one optimizer step (gradient accumulation)
    train([2])
    opt.step()
    opt.zero_grad()
    train([3], step=77)  # explicit wins
    opt.step()
    opt.zero_grad()
    train([4])
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert list(log.ids) == [0, 1, 2, 3, 4]
    assert list(log.steps) == [0, 1, 1, 77, 3]


def test_steps_count_captures_without_an_optimizer(tmp_path):
    model = tiny_model()
    x, y = batch(1, 18)
    run = logix.init(tmp_path / "log", rank=2)
    run.watch(model)
    for i in range(3):
        step(run, model, [i], x, y)
    step(run, model, [3], x, y, step=77)
    run.start_pass("second", step=50)
    step(run, model, [0], x, y)
    step(run, model, [1], x, y)
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert list(log.select("pass0").steps) == [0, 1, 2, 77]
    assert list(log.steps) == [50, 51]
    assert log.current.meta["step"] == 50


# -- sessions ------------------------------------------------------------------------------------


def test_new_session_adds_segments_and_passes(tmp_path):
    path = tmp_path / "log"
    model = tiny_model()
    (x1, y1), (x2, y2) = batch(3, 19), batch(2, 20)
    with logix.init(path, rank=2) as run:
        run.watch(model)
        run.start_pass("a", lr=1.0)
        step(run, model, [0, 1, 2], x1, y1)
    before = logix.open(path)
    grads_a = {name: before.gradients(name) for name in NAMES}

    model = tiny_model()  # another instance of the same architecture
    with logix.init(path, rank=2) as run:
        assert run.session == 1
        run.watch(model)
        run.start_pass("b")
        step(run, model, [0, 1], x2, y2)

    log = logix.open(path)
    assert [p.name for p in log.passes] == ["a", "b"]
    assert all(p.finalized for p in log.passes)
    assert [(s.file, s.session) for p in log.passes for s in p.segments] == [
        ("segments/p000-r0-s000.h5", 0),
        ("segments/p001-r0-s001.h5", 1),
    ]
    assert sorted(f.name for f in (path / "segments").iterdir()) == ["p000-r0-s000.h5", "p001-r0-s001.h5"]
    assert json.loads((path / "manifest.json").read_text())["sessions"] == 2

    a = log.select("a")
    assert list(a.ids) == [0, 1, 2] and a.current.meta["lr"] == 1.0
    for name in NAMES:
        assert torch.equal(a.gradients(name), grads_a[name])
    # The second session projects with the stored matrices.
    assert list(log.ids) == [0, 1]
    want = exact(model, x2, y2)
    for name, (p_in, p_out) in log.projections().items():
        assert_close(log.gradients(name), projected(want[name], p_in, p_out))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rank": 4}, "rank"), ({"rank": "full"}, "rank"), ({"dtype": "float16"}, "dtype"), ({"seed": 1}, "seed")],
)
def test_a_different_config_raises_naming_the_field(tmp_path, kwargs, field):
    path = tmp_path / "log"
    model = tiny_model()
    x, y = batch(2, 21)
    make_log(path, model, [([0, 1], x, y)], rank=2)
    manifest = (path / "manifest.json").read_text()
    settings = {"rank": 2, **kwargs}
    with pytest.raises(ConfigError, match=f"{field}: "):
        logix.init(path, **settings)
    assert (path / "manifest.json").read_text() == manifest
    assert list(logix.open(path).ids) == [0, 1]


def test_watching_a_different_model_raises_model_mismatch(tmp_path):
    path = tmp_path / "log"
    model = tiny_model()
    x, y = batch(2, 22)
    make_log(path, model, [([0, 1], x, y)], rank=2)
    projections = (path / "projections.h5").read_bytes()

    run = logix.init(path, rank=2)
    with pytest.raises(ModelMismatchError):
        run.watch(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)))
    with pytest.raises(ModelMismatchError):
        run.watch(model, exclude=["2"])  # a different selection of the same model
    run.close()

    assert (path / "projections.h5").read_bytes() == projections
    log = logix.open(path)
    assert list(log.ids) == [0, 1]
    assert list(log.modules) == NAMES


def test_paths_that_are_not_logs_are_refused(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("hello")
    with pytest.raises(ConfigError, match="file"):
        logix.init(file)
    assert file.read_text() == "hello"

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        logix.init(other)
    assert sorted(p.name for p in other.iterdir()) == ["data.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with logix.init(empty, rank=2) as run:  # an empty directory is fine
        run.watch(tiny_model())
    log = logix.open(empty)
    assert len(log) == 0 and log.passes == []


# -- the run's lifetime --------------------------------------------------------------------------


def test_context_manager_finalizes_on_clean_exit(tmp_path):
    model = tiny_model()
    x, y = batch(3, 23)
    with logix.init(tmp_path / "log", rank="full") as run:
        run.watch(model)
        step(run, model, [0, 1, 2], x, y)
    with pytest.raises(CaptureError):
        run.capture([9])
    log = logix.open(tmp_path / "log")
    assert log.current.finalized is True
    assert list(log.ids) == [0, 1, 2]
    assert_close(log.gradients("0"), exact(model, x, y)["0"])


def test_context_manager_commits_but_does_not_finalize_when_the_body_raises(tmp_path):
    model = tiny_model()
    (x1, y1), (x2, y2) = batch(2, 24), batch(2, 25)
    with pytest.raises(RuntimeError, match="boom"):
        with logix.init(tmp_path / "log", rank="full") as run:
            run.watch(model)
            step(run, model, [0, 1], x1, y1)
            step(run, model, [2, 3], x2, y2)
            raise RuntimeError("boom")
    log = logix.open(tmp_path / "log")
    assert log.current.finalized is False
    assert list(log.ids) == [0, 1, 2, 3]
    assert log.current.segments[0].rows == 4
    want = exact(model, torch.cat([x1, x2]), torch.cat([y1, y2]))
    for name in NAMES:
        assert_close(log.gradients(name), want[name])


READER = """
import json, sys, h5py
root = sys.argv[1]
manifest = json.load(open(root + "/manifest.json"))
out = []
for p in manifest["passes"]:
    for s in p["segments"]:
        with h5py.File(root + "/" + s["file"], "r", swmr=True) as f:
            n = int(f["committed"][0])
            out.append({"ids": f["ids"][:n].tolist(), "grads": f["grads"][:n].tolist()})
print(json.dumps(out))
"""


def slow_writer(monkeypatch, seconds: float) -> list[int]:
    """Make every append sleep first; returns a one-element list counting finished appends."""
    original = logix.disk.SegmentWriter.append
    done = [0]

    def slow_append(self, *args, **kwargs):
        time.sleep(seconds)
        original(self, *args, **kwargs)
        done[0] += 1

    monkeypatch.setattr(logix.disk.SegmentWriter, "append", slow_append)
    return done


def test_flush_makes_rows_visible_to_a_concurrent_reader(tmp_path, monkeypatch):
    slow_writer(monkeypatch, 0.05)  # flush has to wait for the writer
    path = tmp_path / "log"
    model = tiny_model()
    x, y = batch(6, 26)
    run = logix.init(path, rank="full", commit_interval=60.0)
    run.watch(model)
    step(run, model, [0, 1], x[:2], y[:2])
    step(run, model, [2, 3], x[2:4], y[2:4])
    run.flush()

    log = logix.open(path)
    assert list(log.ids) == [0, 1, 2, 3]
    assert log.current.finalized is False
    want = exact(model, x, y)
    assert_close(log.gradients("0"), want["0"][:4])

    # Another process with nothing but h5py sees the same committed rows while the writer holds the file.
    result = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [segment] = json.loads(result.stdout)
    assert segment["ids"] == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.asarray(segment["grads"], dtype=np.float32), log.rows().numpy())

    step(run, model, [4, 5], x[4:], y[4:])
    run.flush()
    assert list(log.ids) == [0, 1, 2, 3]  # a snapshot until refreshed
    assert log.refresh() is log
    assert list(log.ids) == [0, 1, 2, 3, 4, 5]
    for name in NAMES:
        assert_close(log.gradients(name), want[name])
    run.finalize()
    assert logix.open(path).current.finalized is True


# -- the background writer -----------------------------------------------------------------------


def failing_on_call(monkeypatch, failing_call: int) -> list[int]:
    original = logix.disk.SegmentWriter.append
    calls = [0]

    def append(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == failing_call:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(logix.disk.SegmentWriter, "append", append)
    return calls


def run_into_writer_failure(path, model, monkeypatch):
    """Batch [0, 1] is written; the writer fails on batch [2, 3]. Returns the run and batch 1."""
    failing_on_call(monkeypatch, 2)
    x, y = batch(8, 27)
    run = logix.init(path, rank="full")
    run.watch(model)
    step(run, model, [0, 1], x[:2], y[:2])
    run.flush()
    with pytest.raises(WriterError, match="disk full") as info:
        for k in range(1, 4):  # surfaces at a later capture or at the flush
            step(run, model, [2 * k, 2 * k + 1], x[2 * k : 2 * k + 2], y[2 * k : 2 * k + 2])
        run.flush()
    assert isinstance(info.value.__cause__, OSError)
    assert "2 rows committed" in str(info.value)
    return run, (x[:2], y[:2])


def test_writer_failure_surfaces_and_earlier_rows_survive(tmp_path, monkeypatch):
    path = tmp_path / "log"
    model = tiny_model()
    run, (x, y) = run_into_writer_failure(path, model, monkeypatch)
    with contextlib.suppress(WriterError):  # finalize may report the failure again, nothing else
        run.finalize()
    with pytest.raises(CaptureError):
        run.capture([100])

    log = logix.open(path)
    assert list(log.ids) == [0, 1]
    assert read_segment(path / log.current.segments[0].file)["n"] == 2
    want = exact(model, x, y)
    for name in NAMES:
        assert_close(log.gradients(name), want[name])


def test_a_pass_whose_writer_failed_is_not_finalized(tmp_path, monkeypatch):
    path = tmp_path / "log"
    run, _ = run_into_writer_failure(path, tiny_model(), monkeypatch)
    with contextlib.suppress(WriterError):
        run.finalize()
    assert logix.open(path).current.finalized is False


@pytest.mark.parametrize(
    "bound",
    [{"queue_size": 1}, {"queue_size": 16, "queue_bytes": 1}, {"queue_size": 16, "queue_bytes": 100}],
    ids=["one_batch", "bytes_below_one_batch", "bytes_below_two_batches"],
)
def test_backpressure_with_a_slow_writer_keeps_every_row_in_order(tmp_path, monkeypatch, bound):
    """Bounded by count (queue_size=1) or by bytes (queue_bytes below one batch, or below two: a
    batch here is 3 rows of 18 floats, 216 bytes): training waits for the writer, a batch larger
    than the byte bound still goes, and no row is lost."""
    done = slow_writer(monkeypatch, 0.05)
    model = tiny_model()
    x, y = batch(30, 28)
    run = logix.init(tmp_path / "log", rank="full", **bound)
    run.watch(model)
    for b in range(10):
        rows = slice(3 * b, 3 * b + 3)
        step(run, model, list(range(3 * b, 3 * b + 3)), x[rows], y[rows])
    # With one batch in the queue and one being written, training can be at most two batches ahead
    # (by bytes, 16 batches would fit by count: one waits while the writer takes the one before it).
    assert done[0] >= 8
    run.finalize()
    assert done[0] == 10

    log = logix.open(tmp_path / "log")
    if "queue_bytes" in bound:  # the premise: the byte bound, not the count, holds batches back
        queue_bytes = bound["queue_bytes"]
        assert log.width * 4 * 3 > queue_bytes / 2 and log.width * 4 * 3 * 2 > queue_bytes
    assert list(log.ids) == list(range(30))
    assert list(log.steps) == [b for b in range(10) for _ in range(3)]
    want = exact(model, x, y)
    for name in NAMES:
        assert_close(log.gradients(name), want[name])


# -- damaged logs --------------------------------------------------------------------------------


@pytest.fixture
def finished_log(tmp_path):
    path = tmp_path / "log"
    x, y = batch(2, 29)
    make_log(path, tiny_model(), [([0, 1], x, y)], rank=2)
    return path


def test_a_missing_segment_raises_log_format_error(finished_log):
    (finished_log / "segments" / "p000-r0-s000.h5").unlink()
    with pytest.raises(LogFormatError, match="missing"):
        logix.open(finished_log)


def test_a_newer_schema_version_raises_log_format_error(finished_log):
    manifest_path = finished_log / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = logix.disk.SCHEMA_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(LogFormatError, match="schema version"):
        logix.open(finished_log)


def test_a_manifest_that_is_not_json_raises_log_format_error(finished_log):
    (finished_log / "manifest.json").write_text('{"format": "logix-log", "passes": [')
    with pytest.raises(LogFormatError):
        logix.open(finished_log)


def test_an_idle_writer_commits_within_the_interval(tmp_path):
    """Rows are committed at most commit_interval after they are written, even if no batch follows."""
    model = tiny_model()
    run = logix.init(tmp_path / "log", rank="full", commit_interval=0.2)
    run.watch(model)
    x, y = batch(3, seed=0)
    step(run, model, [0, 1, 2], x, y)
    deadline = time.monotonic() + 10
    while len(logix.open(tmp_path / "log")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    log = logix.open(tmp_path / "log")  # no flush, no finalize: the writer committed on its own
    assert log.ids.tolist() == [0, 1, 2]
    assert_close(log.gradients("0"), exact(model, x, y)["0"])
    run.finalize()


def test_blocks_read_ahead_on_a_thread_that_stops_with_the_consumer(tmp_path):
    import threading

    model = tiny_model()
    batches = [(list(range(8 * seed, 8 * seed + 8)), *batch(8, seed)) for seed in range(6)]
    make_log(tmp_path / "log", model, batches, rank="full")
    log = logix.open(tmp_path / "log")
    whole = torch.cat([rows for _, rows in log.blocks(block_rows=1000)])
    for size in (1, 5, None):
        ids, rows = zip(*log.blocks(block_rows=size))
        assert np.concatenate(ids).tolist() == log.ids.tolist()
        torch.testing.assert_close(torch.cat(rows), whole, rtol=0, atol=0)
    readers = lambda: [t for t in threading.enumerate() if t.name == "logix-reader"]  # noqa: E731
    stream = log.blocks(block_rows=3)
    next(stream)
    assert readers()  # the next block is being read ahead
    stream.close()  # the consumer stops early
    assert not readers()


@pytest.mark.parametrize("block_rows", [1, 4, 7, 64])
def test_float16_log_streams_and_scores_like_its_rows(tmp_path, block_rows):
    """Streaming a float16 log, with fresh or recycled conversion buffers, gives back its rows;
    scores and self-influence computed block by block equal the dense products."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(23, 6), torch.randint(0, 3, (23,))
    run = logix.init(tmp_path / "log", rank=4, dtype="float16")
    run.watch(model)
    for start in range(0, 23, 5):
        with run.capture(range(start, min(start + 5, 23))):
            F.cross_entropy(model(x[start : start + 5]), y[start : start + 5]).backward()
    run.finalize()
    log = logix.open(tmp_path / "log")
    rows = log.rows()
    assert rows.dtype == torch.float32 and rows.abs().sum() > 0
    fresh = torch.cat([r.clone() for _, r in log.blocks(block_rows=block_rows)])
    recycled = [(r.clone(), r.data_ptr()) for _, r in log.blocks(block_rows=block_rows, recycle=True)]
    assert torch.equal(fresh, rows)
    assert torch.equal(torch.cat([r for r, _ in recycled]), rows)
    assert len({ptr for _, ptr in recycled}) <= 3  # the conversion buffers are reused
    query = log.query(model)
    with query.capture(["q0", "q1"]):
        F.cross_entropy(model(x[:2] + 0.5), y[:2]).backward()
    scores = log.influence(query, block_rows=block_rows).values
    torch.testing.assert_close(scores, query.rows @ rows.T, rtol=1e-5, atol=1e-6)
    top = log.influence(query, top_k=3, block_rows=block_rows)
    torch.testing.assert_close(top.values, torch.topk(query.rows @ rows.T, 3, dim=1).values, rtol=1e-5, atol=1e-6)
    values = log.self_influence("identity", block_rows=block_rows).values
    torch.testing.assert_close(values, (rows.double() ** 2).sum(dim=1), rtol=1e-6, atol=1e-9)


def test_a_damaged_sums_file_leaves_no_hdf5_lock_held(tmp_path):
    """Reading a damaged file raises while the caller may keep the error (and its traceback): the
    reader must not be suspended inside h5py's iteration then, which holds h5py's global lock, so
    that every other thread's HDF5 call (the writer's next flush) would wait forever (issue 15.4)."""
    import threading

    import numpy as np

    from logix.disk.statistics import load_sums, save_sums

    bad = {"a_sum": torch.eye(2), "s_sum": torch.full((2, 2), float("nan"))}
    bad.update(a_count=torch.tensor(1.0), s_count=torch.tensor(1.0), skipped=torch.tensor(0.0))
    good = {k: torch.zeros_like(v) for k, v in bad.items()}
    (tmp_path / "statistics").mkdir()
    path = tmp_path / "statistics" / "p000-r0-s000.h5"
    save_sums(path, {"a": good, "b": bad, "c": good})
    kept = None
    try:
        load_sums([path])
    except logix.LogFormatError as e:
        kept = e  # held, as a caller that reports it later would
    assert kept is not None and "non-finite" in str(kept)

    def other_thread():
        with h5py.File(tmp_path / "other.h5", "w") as f:
            f.create_dataset("x", data=np.zeros(3))

    worker = threading.Thread(target=other_thread, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "another thread's HDF5 call is blocked by the failed read"
