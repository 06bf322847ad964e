"""A job killed while HDF5 rewrites a segment's last chunk leaves that chunk torn: new bytes up to
where the write stopped, the old ones after, the old checksum at the end. Its committed rows were
written correctly before, so they must still read back exactly, and real damage must still fail.

The tear is made by hand, byte for byte as the kill leaves it, from the raw chunks of a real log
before and after a second batch.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix import LogFormatError
from logix.cli import main as cli_main
from logix.disk import fletcher32_from_sums, open_segment

FIRST, SECOND = 24, 16  # rows committed before the kill; rows of the write the kill interrupted


def fletcher32(data: bytes) -> int:
    words = np.frombuffer(data + b"\0" * (len(data) % 2), dtype=">u2").astype(np.int64)
    n = len(words)
    return fletcher32_from_sums(int(words.sum()), int((np.arange(n, 0, -1) * words).sum()))


def test_the_checksum_is_hdf5s(tmp_path):
    """Our fletcher32 equals the one HDF5 stores, for every dtype a segment holds and odd lengths."""
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for i, (dtype, width) in enumerate([("f4", 7), ("f2", 5), ("i8", None), ("u1", None), ("u1", None)]):
            rows = 13 + i
            shape = (rows, width) if width else (rows,)
            ds = f.create_dataset(
                str(i), (0, *shape[1:]), maxshape=(None, *shape[1:]), chunks=(rows + 4, *shape[1:]), dtype=dtype,
                fletcher32=True,
            )  # a partly filled chunk, as a segment's last one
            ds.resize(rows, axis=0)
            ds[:] = (rng.standard_normal(shape) * 50).astype(dtype)
            f.flush()
            _, raw = ds.id.read_direct_chunk((0,) * len(shape))
            assert fletcher32(raw[:-4]) == int.from_bytes(raw[-4:], "little"), dtype


def write_log(path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    run = logix.init(path, rank="full")
    run.watch(model)
    return model, run


def capture(run, model, ids, x, y):
    with run.capture(ids):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad()


def raw_chunks(segment) -> dict:
    """{dataset: raw bytes of its first chunk} of every checksummed dataset of a segment."""
    with h5py.File(segment, "r", libver="latest", swmr=True) as f:
        return {name: f[name].id.read_direct_chunk((0,) * f[name].ndim)[1] for name in f if f[name].fletcher32}


@pytest.fixture
def torn_log(tmp_path):
    """A log whose only segment was 'killed' while its first chunk was rewritten with SECOND more rows."""
    path = tmp_path / "log"
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(FIRST + SECOND, 6, generator=g), torch.randint(0, 3, (FIRST + SECOND,), generator=g)
    model, run = write_log(path)
    capture(run, model, list(range(FIRST)), x[:FIRST], y[:FIRST])
    run.flush()  # committed: FIRST rows, their chunk written with zeros after them
    segment = path / "segments" / "p000-r0-s000.h5"
    before = raw_chunks(segment)
    capture(run, model, list(range(FIRST, FIRST + SECOND)), x[FIRST:], y[FIRST:])
    run.finalize()
    after = raw_chunks(segment)
    clean = logix.open(path)
    reference = {"rows": clean.rows().numpy(), "ids": clean.ids.copy(), "steps": clean.steps.copy()}
    assert len(clean) == FIRST + SECOND
    with h5py.File(segment, "r+") as f:  # the kill: the rewrite stopped partway, the counter never moved
        assert {name for name in after if after[name] != before[name]} >= {"grads", "ids", "step"}  # flags: all 0
        for name, new in after.items():
            old = before[name]
            cut = (len(new) - 4) * 2 // 3  # well inside the new rows: some written, some not
            f[name].id.write_direct_chunk((0,) * f[name].ndim, new[:cut] + old[cut:], filter_mask=0)
        f["committed"][0] = FIRST
    manifest = json.loads((path / "manifest.json").read_text())
    for p in manifest["passes"]:
        p["finalized"] = False
        for s in p["segments"]:
            s["rows"] = None
    (path / "manifest.json").write_text(json.dumps(manifest))
    with h5py.File(segment, "r") as f:  # the tear is real: HDF5 refuses the chunk
        with pytest.raises(OSError):
            f["grads"][:FIRST]
    return path, segment, reference, (model, x, y)


def test_committed_rows_of_a_torn_chunk_read_back_exactly(torn_log, caplog):
    path, segment, reference, _ = torn_log
    log = logix.open(path)
    assert len(log) == FIRST and not log.passes[0].finalized
    np.testing.assert_array_equal(log.ids, reference["ids"][:FIRST])
    np.testing.assert_array_equal(log.steps, reference["steps"][:FIRST])
    np.testing.assert_array_equal(log.rows().numpy(), reference["rows"][:FIRST])
    np.testing.assert_array_equal(log.gradients("2").reshape(FIRST, -1).numpy(), reference["rows"][:FIRST, 35:])
    blocks = np.concatenate([b.numpy() for _, b in log.blocks(block_rows=5)])
    np.testing.assert_array_equal(blocks, reference["rows"][:FIRST])
    assert "torn by an interrupted write" in caplog.text
    assert log.self_influence().values.isfinite().all()


def test_verify_calls_a_recovered_torn_chunk_sound_and_says_so(torn_log, capsys):
    path, *_ = torn_log
    assert cli_main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "torn" in out and f"{FIRST} committed rows" in out, out
    assert cli_main(["info", str(path)]) == 0


def test_resume_after_a_torn_chunk_completes_the_pass(torn_log):
    path, _, reference, (model, x, y) = torn_log
    run = logix.init(path, rank="full", resume=True)
    run.watch(model)
    capture(run, model, list(range(FIRST, FIRST + SECOND)), x[FIRST:], y[FIRST:])
    run.finalize()
    log = logix.open(path)
    assert log.passes[0].finalized and sorted(log.ids.tolist()) == list(range(FIRST + SECOND))
    order = np.argsort(log.ids)
    np.testing.assert_array_equal(log.rows().numpy()[order], reference["rows"])


def test_damage_inside_the_committed_rows_of_a_torn_chunk_is_still_damage(torn_log):
    path, segment, *_ = torn_log
    with h5py.File(segment, "r+") as f:
        ds = f["grads"]
        mask, raw = ds.id.read_direct_chunk((0, 0))
        flipped = bytearray(raw)
        flipped[100] ^= 0x10  # a committed row (row 0 of 41 numbers x 4 bytes)
        ds.id.write_direct_chunk((0, 0), bytes(flipped), filter_mask=mask)
    with pytest.raises(LogFormatError, match="cannot be read"):
        logix.open(path).rows()
    assert cli_main(["verify", "-q", str(path)]) == 1


def test_a_segment_that_looks_truncated_is_damage_unless_its_writer_lives(tmp_path):
    """A plain open that says 'truncated file' is read in SWMR mode only while the log is being written."""
    path = tmp_path / "log"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    with logix.init(path, rank="full") as run:
        run.watch(model)
        with run.capture([0, 1]):
            model(torch.randn(2, 6)).sum().backward()
    segment = path / "segments" / "p000-r0-s000.h5"
    with open(segment, "r+b") as f:
        f.truncate(segment.stat().st_size - 100)
    with pytest.raises(LogFormatError, match="cannot be opened"):
        open_segment(segment)
