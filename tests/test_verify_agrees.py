"""`logix verify` and the library refuse the same logs (issue 14).

Over a corpus of damaged logs, built with the damage recipes of test_faults.py, test_hostile.py and
test_torn_chunks.py: whenever logix.open, reading every pass's rows, the projections, or scoring
with each preconditioner the pass has raises a logix error, `logix verify` exits 1 and names the
same file (or pass) among its problems; where both run the same check (the manifest, a segment's
structure, the projections, the statistics arrays) it names the very same problem. verify may look
deeper (every row's checksum and flag, the statistics parts finalize added up). An undamaged log
passes both.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_faults import (
    MANIFEST_TAMPERING,
    PART,
    PROJECTION_TAMPERING,
    SEGMENT,
    SEGMENT_TAMPERING,
    STATISTICS_TAMPERING,
    STATS,
    edit_manifest,
    plant_segment_of_another_log,
    rewrite_h5,
    rewrite_projections,
    rewrite_segment,
    write_log,
)
from test_hostile import _plant
from test_hostile_files import _move_out, _reference_ids, _replace_by, declare_huge_segment, plant_foreign
from test_torn_chunks import torn_log  # noqa: F401 - a fixture

import logix
from logix.cli import main
from logix.curvature import available_preconditioners
from logix.errors import LogixError

LOG_FILES = ("manifest.json", "projections.h5", SEGMENT, STATS, PART)
# Where the library and verify read differently, they name the same file but not in the same words:
# the library stops at the first unflagged non-finite row or the first block that fails its
# checksum, verify counts every such row or chunk; a statistics file that is missing fails the
# library's open, verify looks before opening.
READ_DIFFERENTLY = re.compile(
    r"row \d+ holds non-finite numbers but is not flagged|rows \d+\.\.\d+ cannot be read|cannot be read: \[Errno 2\]"
)


# -- the two sides ---------------------------------------------------------------------------------


def library_complaint(path: Path) -> str | None:
    """What the library says when it reads everything a user reads; None if it reads it all."""
    try:
        log = logix.open(path)
        log.projections()
        for p in log.passes:
            view = log.select(p.name)
            view.rows(include_flagged=True)
            for preconditioner in available_preconditioners(view):
                view.self_influence(preconditioner)  # the values finalize stored
                view.self_influence(preconditioner, damping_factor=0.05)  # computed: the curvature read
    except LogixError as e:
        return str(e)
    return None


def verify(path: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["verify", "-q", "--json", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, json.loads(out)["problems"] if out.strip() else [err]


def subject(complaint: str, root: Path) -> str:
    """What a complaint is about: the log's file it names, else the pass, else the log."""
    for file in LOG_FILES:
        if file in complaint:
            return file
    named = re.search(r"pass '[^']*'", complaint)
    return named[0] if named else str(root)


def assert_agree(path: Path, capsys) -> tuple[str | None, list[str]]:
    complaint = library_complaint(path)
    code, problems = verify(path, capsys)
    if complaint is not None:
        assert code == 1, f"the library refuses the log ({complaint}) but verify calls it sound"
        about = subject(complaint, path)
        naming = [p for p in problems if about in p]
        assert naming, f"verify names no problem with {about}: {complaint}; {problems}"
        if not READ_DIFFERENTLY.search(complaint):  # the same check on both sides: the same words
            same = complaint.split("is damaged: ", 1)[-1]  # verify prefixes the pass it was checking
            assert any(same in p for p in naming), f"verify does not name {complaint!r}: {problems}"
    return complaint, problems


# -- the corpus ------------------------------------------------------------------------------------


def _bytes_at(path: Path, where: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(data)


def _grads_chunk_start(segment: Path) -> int:
    with h5py.File(segment, "r") as f:
        return f["grads"].id.get_chunk_info(0).byte_offset


def _truncate(file: str, keep):
    def damage(path):
        data = (path / file).read_bytes()
        (path / file).write_bytes(data[: keep if keep >= 1 else int(len(data) * keep)])

    return damage


def _replace(file: str, what: str):
    def damage(path):
        target = path / file
        target.unlink()
        if what == "directory":
            target.mkdir()
        elif what == "not_hdf5":
            target.write_text("this is not HDF5\n" * 100)
        elif what == "empty":
            target.touch()

    return damage


def _linked_out(path):
    outside = path.parent / "elsewhere.h5"
    shutil.move(path / SEGMENT, outside)
    os.symlink(outside, path / SEGMENT)


def _grads_external(kind: str):
    def damage(path):
        secret = path.parent / "secret.bin"
        secret.write_bytes(os.urandom(4096))
        if kind == "external_storage":
            rewrite_segment(path / SEGMENT, grads=(kind, str(secret)))
        else:
            with h5py.File(secret.with_suffix(".h5"), "w") as f:
                f.create_dataset("grads", data=np.zeros((12, 8), "f4"))
            rewrite_segment(path / SEGMENT, grads=(kind, str(secret.with_suffix(".h5"))))

    return damage


def _unflagged_nan(rewrite: bool):
    """Row 5 made NaN: rewritten whole (its checksum fits) or in place (its checksum fails)."""

    def damage(path):
        if rewrite:
            rewrite_segment(path / SEGMENT, grads=lambda g: np.where(np.arange(len(g))[:, None] == 5, np.nan, g))
        else:
            _bytes_at(path / SEGMENT, _grads_chunk_start(path / SEGMENT) + 4 * 8 * 5, struct.pack("<f", math.nan))

    return damage


def _flipped_row_byte(path):
    where = _grads_chunk_start(path / SEGMENT) + 5
    data = bytearray((path / SEGMENT).read_bytes())
    data[where] ^= 0x10
    (path / SEGMENT).write_bytes(bytes(data))


def _flipped_byte(where: int):
    def damage(path):
        data = bytearray((path / SEGMENT).read_bytes())
        data[where] ^= 0xFF
        (path / SEGMENT).write_bytes(bytes(data))

    return damage


def _planted(file: str, key: str, how: str):
    def damage(path):
        _plant(path / file, key, path.parent / "executed", how)

    return damage


def _manifest_text(text: bytes):
    def damage(path):
        (path / "manifest.json").write_bytes(text)

    return damage


def _two_manifest_faults(path):
    def change(m):
        m["modules"][1]["offset"] = 7
        m["sessions"] = -2

    edit_manifest(path, change)


CORPUS = {
    **{f"manifest_{k}": lambda p, c=change: edit_manifest(p, c) for k, (change, _) in MANIFEST_TAMPERING.items()},
    "manifest_two_faults": _two_manifest_faults,
    "manifest_missing": lambda p: (p / "manifest.json").unlink(),
    "manifest_cut": _manifest_text(b'{"format": "logix-log", "passes": ['),
    "manifest_not_utf8": _manifest_text(b"\xff\xfe{}"),
    "manifest_deeply_nested": _manifest_text(b"[" * 100_000 + b"]" * 100_000),
    **{
        f"segment_{k}": lambda p, c=changes: rewrite_segment(p / SEGMENT, **c)
        for k, (changes, _) in SEGMENT_TAMPERING.items()
    },
    "segment_flags_on_a_finite_row": lambda p: rewrite_segment(
        p / SEGMENT, flags=lambda f: f | (np.arange(len(f)) == 2)
    ),
    "segment_unflagged_nan_rewritten": _unflagged_nan(rewrite=True),
    "segment_unflagged_nan_in_place": _unflagged_nan(rewrite=False),
    "segment_flipped_row_byte": _flipped_row_byte,
    "segment_truncated_to_0": _truncate(SEGMENT, 0),
    "segment_truncated_to_512": _truncate(SEGMENT, 512),
    "segment_truncated_to_half": _truncate(SEGMENT, 0.5),
    "segment_truncated_by_100": _truncate(SEGMENT, 0.99),
    "segment_missing": _replace(SEGMENT, "missing"),
    "segment_not_hdf5": _replace(SEGMENT, "not_hdf5"),
    "segment_empty": _replace(SEGMENT, "empty"),
    "segment_a_directory": _replace(SEGMENT, "directory"),
    "segment_linked_out_of_the_log": _linked_out,
    "segment_of_another_log": plant_segment_of_another_log,
    "segment_grads_external_storage": _grads_external("external_storage"),
    "segment_grads_external_link": _grads_external("external_link"),
    "segment_pickled_ids": _planted(SEGMENT, "ids", "opaque"),
    "segment_pickled_grads": _planted(SEGMENT, "grads", "vlen_bytes"),
    **{
        f"projections_{k}": lambda p, c=change: rewrite_projections(p, c)
        for k, (change, _) in PROJECTION_TAMPERING.items()
    },
    "projections_missing": _replace("projections.h5", "missing"),
    "projections_truncated": _truncate("projections.h5", 1000),
    "projections_not_hdf5": _replace("projections.h5", "not_hdf5"),
    "projections_pickled": _planted("projections.h5", "0/in", "npy"),
    **{
        f"statistics_{k}": lambda p, c=change: rewrite_h5(p / STATS, c)
        for k, (change, _) in STATISTICS_TAMPERING.items()
    },
    "statistics_lambda_star_nan": lambda p: rewrite_h5(
        p / STATS, lambda d: d["0/lambda_star"].__setitem__((0, 0), np.nan)
    ),
    "statistics_fisher_vec_shape": lambda p: rewrite_h5(p / STATS, lambda d: d.update({"2/fisher_vec": np.eye(3)})),
    "statistics_self_influence_nan": lambda p: rewrite_h5(
        p / STATS, lambda d: d["self_influence/identity"].__setitem__(3, np.nan)
    ),
    "statistics_self_influence_matrix": lambda p: rewrite_h5(
        p / STATS, lambda d: d.update({"self_influence/identity": np.zeros((12, 2))})
    ),
    "statistics_self_influence_of_another_length": lambda p: rewrite_h5(
        p / STATS, lambda d: d.update({"self_influence/ekfac": np.ones(5)})
    ),
    "statistics_self_influence_missing": lambda p: rewrite_h5(p / STATS, lambda d: d.pop("self_influence/kfac")),
    "statistics_pickled_vec_a": _planted(STATS, "0/vec_a", "opaque"),
    "statistics_missing": _replace(STATS, "missing"),
    "statistics_truncated": _truncate(STATS, 0.5),
    "statistics_not_hdf5": _replace(STATS, "not_hdf5"),
    "sums_nan": lambda p: rewrite_h5(p / PART, lambda d: d["0/a_sum"].__setitem__((0, 0), np.nan)),
    "sums_missing_key": lambda p: rewrite_h5(p / PART, lambda d: d.pop("0/s_sum")),
    "sums_shape": lambda p: rewrite_h5(p / PART, lambda d: d.update({"0/a_sum": np.zeros((2, 3))})),
    "sums_truncated": _truncate(PART, 700),
    "sums_missing": _replace(PART, "missing"),
    # a log is untrusted input (issue 15): files that read other files, links out of the log, FIFOs,
    # tiny files declaring huge contents, flipped metadata bytes, ids of other types
    **{
        f"{name}_{how}": plant_foreign(file, key, how)
        for name, file, key in (
            ("segment_ids", SEGMENT, "ids"),
            ("segment_extra", SEGMENT, "extra"),
            ("projections", "projections.h5", "0/in"),
            ("statistics_self_influence", STATS, "self_influence/identity"),
            ("statistics_vec_s", STATS, "2/vec_s"),
            ("sums", PART, "0/s_sum"),
        )
        for how in ("external_storage", "virtual", "external_link", "soft_link_through_an_external_link")
    },
    "statistics_self_influence_group_linked": plant_foreign(STATS, "self_influence", "external_link"),
    "statistics_module_group_linked": plant_foreign(STATS, "0", "external_link"),
    **{
        f"{what.replace('/', '_').replace('.', '_')}_linked_out": _move_out(what)
        for what in ("segments", "projections.h5", "statistics", STATS, PART, "manifest.json")
    },
    **{f"{what.replace('/', '_').replace('.', '_')}_a_fifo": _replace_by(what, "fifo") for what in LOG_FILES},
    "manifest_linked_to_dev_zero": _replace_by("manifest.json", "/dev/zero"),
    "manifest_over_its_size_cap": lambda p: os.truncate(p / "manifest.json", 400 << 20),
    "segment_declaring_300M_rows": declare_huge_segment,
    "segment_declaring_300M_rows_left_by_a_killed_writer": lambda p: declare_huge_segment(p, killed_writer=True),
    **{f"segment_flipped_metadata_byte_{where}": _flipped_byte(where) for where in (40, 200, 700, 1200)},
    "segment_ids_float64": lambda p: rewrite_segment(p / SEGMENT, ids=lambda i: i.astype("f8")),
    "segment_ids_object_references": _reference_ids,
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished log: one pass, int ids, EK-FAC and raw statistics, its statistics parts listed."""
    path = tmp_path_factory.mktemp("agree") / "log"
    write_log(path, lambda b: list(range(4 * b, 4 * b + 4)))
    return path


@pytest.fixture
def log_copy(source, tmp_path):
    copy = tmp_path / "log"
    shutil.copytree(source, copy)
    return copy


def test_an_undamaged_log_passes_both(log_copy, capsys):
    assert library_complaint(log_copy) is None
    assert verify(log_copy, capsys) == (0, [])


@pytest.mark.parametrize("case", list(CORPUS))
def test_verify_refuses_what_the_library_refuses(log_copy, capsys, case):
    CORPUS[case](log_copy)
    complaint, problems = assert_agree(log_copy, capsys)
    assert problems, f"verify finds nothing wrong (the library: {complaint})"


def test_verify_names_every_manifest_problem_where_open_names_the_first(log_copy, capsys):
    _two_manifest_faults(log_copy)
    complaint, problems = assert_agree(log_copy, capsys)
    assert "offset 7, expected 4" in complaint
    assert len(problems) == 2 and "'sessions' must be a non-negative int, got -2" in problems[1], problems


@pytest.mark.parametrize("damage", ["not_utf8", "int_ids"])
def test_string_ids(tmp_path, capsys, damage):
    path = tmp_path / "log"
    write_log(path, lambda b: [f"ex{4 * b + i}" for i in range(4)])
    assert library_complaint(path) is None and verify(path, capsys) == (0, [])

    def not_utf8(ids):
        ids = [bytes(v) for v in ids]
        ids[2] = b"\xff\xfe broken"
        return np.array(ids, dtype=object)

    rewrite_segment(path / SEGMENT, ids=not_utf8 if damage == "not_utf8" else lambda i: np.arange(len(i)))
    complaint, _ = assert_agree(path, capsys)
    assert complaint is not None


def test_a_torn_chunk(torn_log, capsys):  # noqa: F811 - the fixture imported above
    """Recovered committed rows of a torn chunk: both read them. Damage inside them: both refuse."""
    path, segment, *_ = torn_log
    assert library_complaint(path) is None
    assert verify(path, capsys) == (0, [])
    with h5py.File(segment, "r+") as f:
        ds = f["grads"]
        mask, raw = ds.id.read_direct_chunk((0, 0))
        flipped = bytearray(raw)
        flipped[100] ^= 0x10
        ds.id.write_direct_chunk((0, 0), bytes(flipped), filter_mask=mask)
    complaint, _ = assert_agree(path, capsys)
    assert complaint is not None
