"""Damaged logs: truncated or corrupted files, tampered manifests, newer schemas, missing files.

Every case ends in a logix.LogFormatError naming the file and the problem, raised when the log is
opened or first read; never a crash deep in numpy/h5py, a hang, or a silently wrong answer. Where
HDF5 still opens a damaged file, what the reader returns must equal what was written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import logix
from logix import LogFormatError
from logix.disk import SCHEMA_VERSION, committed_ids
from logix.disk.statistics import load_sums

SEGMENT = "segments/p000-r0-s000.h5"
STATS = "statistics/p000.h5"
PART = "statistics/p000-r0-s000.h5"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def write_log(path: Path, ids_of_batch) -> nn.Module:
    model = make_model()
    run = logix.init(path, rank=2, statistics=["ekfac", "raw"])
    run.watch(model)
    g = torch.Generator().manual_seed(1)
    for b in range(3):
        x, y = torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)
        with run.capture(ids_of_batch(b)):
            ((model(x) - y) ** 2).sum(dim=1).mean().backward()
    run.finalize()
    return model


def query_of(log, model):
    q = log.query(model)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 4, generator=g), torch.randn(2, 2, generator=g)
    with q.capture(["q0", "q1"]):
        ((model(x) - y) ** 2).sum(dim=1).mean().backward()
    return q


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished log (int ids, EK-FAC and raw statistics) and what reading it must give."""
    path = tmp_path_factory.mktemp("faults") / "log"
    model = write_log(path, lambda b: list(range(4 * b, 4 * b + 4)))
    return path, model, read_everything(path, model)


@pytest.fixture(scope="module")
def str_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults-str") / "log"
    write_log(path, lambda b: [f"ex{4 * b + i}" for i in range(4)])
    return path


@pytest.fixture
def log_copy(source, tmp_path):
    path, model, expected = source
    copy = tmp_path / "log"
    shutil.copytree(path, copy)
    return copy, model, expected


def read_everything(path: Path, model) -> dict:
    log = logix.open(path)
    q = query_of(log, model)
    out = {
        "ids": log.ids.tolist(),
        "rows": log.rows(),
        "self": log.self_influence("ekfac").values,
        "scores": log.influence(q, "kfac").values,
    }
    for name in log.modules:
        log.gradients(name)
    list(log.blocks(block_rows=5))
    return out


def faithful_or_refused(path: Path, model, expected: dict, names: str) -> str:
    """'refused' (a LogFormatError naming `names`) or 'same' (exactly what was written)."""
    try:
        got = read_everything(path, model)
    except LogFormatError as e:
        assert names in str(e), f"the error does not name {names}: {e}"
        return "refused"
    assert got["ids"] == expected["ids"]
    torch.testing.assert_close(got["rows"], expected["rows"], rtol=0, atol=0)
    torch.testing.assert_close(got["self"], expected["self"])
    torch.testing.assert_close(got["scores"], expected["scores"])
    return "same"


NULL = object()  # a change that makes the whole manifest JSON null


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    result = change(manifest)
    result = manifest if result is None else None if result is NULL else result
    (path / "manifest.json").write_text(json.dumps(result))


# -- segments: truncated, flipped, swapped, missing ----------------------------------------------


@pytest.mark.parametrize("keep", [0, 1, 8, 100, 512, 2048, 6150, 8200, 8300, 0.5, 0.9, -100, -1])
def test_truncated_segment(log_copy, keep):
    path, model, expected = log_copy
    segment = path / SEGMENT
    data = segment.read_bytes()
    n = (
        keep
        if isinstance(keep, int) and keep >= 0
        else (len(data) + keep if isinstance(keep, int) else int(len(data) * keep))
    )
    segment.write_bytes(data[:n])
    assert faithful_or_refused(path, model, expected, "p000-r0-s000.h5") == "refused"
    with pytest.raises(LogFormatError, match="p000-r0-s000.h5"):
        committed_ids(segment)  # what resuming reads


def _chunk_ranges(segment: Path) -> dict[str, range]:
    with h5py.File(segment, "r") as f:
        out = {}
        for name in ("grads", "ids", "step"):
            info = f[name].id.get_chunk_info(0)
            out[name] = range(info.byte_offset, info.byte_offset + info.size)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.one_of(st.integers(0, 12_000), st.integers(0, 400_000)), bits=st.integers(1, 255))
def test_flipped_bytes_in_a_segment(log_copy, where, bits):
    """Anywhere in the file: refused, or read back exactly; inside the rows' own bytes (no checksum
    there yet, see test_flipped_byte_in_rows_is_detected) the ids, flags and shapes still hold."""
    path, model, expected = log_copy
    segment = path / SEGMENT
    original = segment.read_bytes()
    data = bytearray(original)
    where %= len(data)
    data[where] ^= bits
    in_data = any(where in r for r in _chunk_ranges(segment).values())
    segment.write_bytes(bytes(data))
    try:
        if not in_data:
            faithful_or_refused(path, model, expected, "p000-r0-s000.h5")
        else:
            try:
                log = logix.open(path)
                rows = log.rows()
            except LogFormatError as e:
                assert "p000-r0-s000.h5" in str(e)
            else:
                assert rows.shape == expected["rows"].shape and torch.isfinite(rows).all()
                assert len(set(log.ids.tolist())) == len(log.ids)
    finally:
        segment.write_bytes(original)


def test_flipped_byte_in_rows_is_detected(log_copy):
    path, model, expected = log_copy
    segment = path / SEGMENT
    where = _chunk_ranges(segment)["grads"].start + 5  # the second byte of row 0's second number
    data = bytearray(segment.read_bytes())
    data[where] ^= 0x10
    segment.write_bytes(bytes(data))
    with pytest.raises(LogFormatError, match="p000-r0-s000.h5"):
        read_everything(path, model)


def test_non_finite_numbers_in_a_row_that_is_not_flagged(log_copy):
    path, model, expected = log_copy
    segment = path / SEGMENT
    where = _chunk_ranges(segment)["grads"].start + 4 * 8 * 5  # row 5, first number
    data = bytearray(segment.read_bytes())
    data[where : where + 4] = struct.pack("<f", math.nan)
    segment.write_bytes(bytes(data))
    log = logix.open(path)  # the index is fine; the row is refused when read
    # the checksum catches the change first; without it, the finiteness check would
    refused = r"p000-r0-s000.h5.*(row 5 holds non-finite|rows 0\.\.\d+ cannot be read)"
    with pytest.raises(LogFormatError, match=refused):
        log.rows()
    with pytest.raises(LogFormatError, match=refused):
        list(log.blocks())
    with pytest.raises(LogFormatError, match=refused):
        log.self_influence("identity", damping=0.0)


@pytest.mark.parametrize("what", ["not_hdf5", "empty", "directory", "missing"])
def test_segment_replaced(log_copy, what):
    path, _, _ = log_copy
    segment = path / SEGMENT
    segment.unlink()
    if what == "not_hdf5":
        segment.write_text("this is not HDF5\n" * 100)
    elif what == "empty":
        segment.touch()
    elif what == "directory":
        segment.mkdir()
    with pytest.raises(LogFormatError, match="p000-r0-s000.h5"):
        logix.open(path)


def test_segment_linked_out_of_the_log(log_copy, tmp_path):
    path, _, _ = log_copy
    outside = tmp_path / "elsewhere.h5"
    shutil.move(path / SEGMENT, outside)
    os.symlink(outside, path / SEGMENT)
    with pytest.raises(LogFormatError, match="leads out of the log directory"):
        logix.open(path)


def plant_segment_of_another_log(path):
    """Replace the log's first segment by one of another log (another model: rows 9 wide, not 8)."""
    other = path.parent / "other"
    model = nn.Sequential(nn.Linear(5, 5))
    run = logix.init(other, rank=3)
    run.watch(model)
    with run.capture([0, 1]):
        model(torch.randn(2, 5)).sum().backward()
    run.finalize()
    shutil.copy(other / SEGMENT, path / SEGMENT)


def test_segment_of_another_log(log_copy):
    """A segment whose rows are another width (another model) than the manifest says."""
    path, _, _ = log_copy
    plant_segment_of_another_log(path)
    with pytest.raises(
        LogFormatError, match=r"p000-r0-s000.h5 is damaged: its rows have 9 numbers, the manifest says 8"
    ):
        logix.open(path)


def rewrite_segment(segment: Path, **changes) -> None:
    """Write the segment again with some datasets replaced (an array), removed (None), or
    changed by a function of the original array; `attrs` sets where the data lives."""
    with h5py.File(segment, "r") as f:
        data = {name: f[name][()] for name in f}
        string_ids = h5py.check_string_dtype(f["ids"].dtype) is not None
    segment.unlink()
    with h5py.File(segment, "w", libver="latest") as f:
        for name, value in data.items():
            change = changes.get(name, value)
            if change is None:
                continue
            if callable(change):
                change = change(value)
            if isinstance(change, tuple):  # (kind, payload) for special objects
                kind, payload = change
                if kind == "group":
                    f.create_group(name)
                elif kind == "external_link":
                    f[name] = h5py.ExternalLink(payload, "/grads")
                elif kind == "soft_link":
                    f[name] = h5py.SoftLink(payload)
                elif kind == "external_storage":
                    f.create_dataset(
                        name, shape=value.shape, dtype=value.dtype, external=[(payload, 0, h5py.h5f.UNLIMITED)]
                    )
                continue
            if name == "ids" and string_ids and change.dtype == object:
                f.create_dataset(name, data=change, dtype=h5py.string_dtype("utf-8"))
            else:
                f.create_dataset(name, data=change)


SEGMENT_TAMPERING = {
    "committed_beyond_rows": ({"committed": np.array([13])}, "13 rows are marked committed but it holds 12"),
    "committed_negative": ({"committed": np.array([-1])}, "-1 rows are marked committed"),
    "committed_float": ({"committed": np.array([12.0])}, "'committed' must be one integer"),
    "committed_two_values": ({"committed": np.array([12, 12])}, "'committed' must be one integer"),
    "committed_fewer_than_recorded": ({"committed": np.array([5])}, "5 committed rows, the manifest recorded 12"),
    "grads_wider": (
        {"grads": lambda g: np.concatenate([g, g], axis=1)},
        "its rows have 16 numbers, the manifest says 8",
    ),
    "grads_float64": ({"grads": lambda g: g.astype("f8")}, "'grads' must be"),
    "grads_int": ({"grads": lambda g: g.astype("i4")}, "'grads' must be"),
    "grads_float16": ({"grads": lambda g: g.astype("f2")}, "stored as float16, the manifest's config says float32"),
    "grads_1d": ({"grads": lambda g: g.ravel()}, "'grads' must be"),
    "grads_short": ({"grads": lambda g: g[:6]}, "12 rows are marked committed but it holds 6"),
    "ids_strings": (
        {"ids": lambda i: np.array([str(v) for v in i], dtype=object)},
        "its ids are strings, the manifest says int",
    ),
    "ids_int32": ({"ids": lambda i: i.astype("i4")}, "'ids' must be int64 or UTF-8 strings"),
    "ids_uint64": ({"ids": lambda i: i.astype("u8")}, "'ids' must be int64 or UTF-8 strings"),
    "ids_float": ({"ids": lambda i: i.astype("f8")}, "'ids' must be int64 or UTF-8 strings"),
    "ids_2d": ({"ids": lambda i: i[:, None]}, "'ids' has shape"),
    "ids_repeated": ({"ids": lambda i: np.where(i == 7, 3, i)}, r"ids \[3\] appear more than once"),
    "flags_int64": ({"flags": lambda f: f.astype("i8")}, "'flags' must be uint8"),
    "flags_unknown_bits": ({"flags": lambda f: f | 6}, "flags hold unknown values"),
    "step_float": ({"step": lambda s: s.astype("f4")}, "'step' integers"),
    "no_committed": ({"committed": None}, "no 'committed' dataset"),
    "no_ids": ({"ids": None}, "no 'ids' dataset"),
    "no_grads": ({"grads": None}, "no 'grads' dataset"),
    "no_flags": ({"flags": None}, "no 'flags' dataset"),
    "no_step": ({"step": None}, "no 'step' dataset"),
    "grads_a_group": ({"grads": ("group", None)}, "no 'grads' dataset"),
    "grads_soft_link": ({"grads": ("soft_link", "/step")}, "no 'grads' dataset"),
}


@pytest.mark.parametrize("case", list(SEGMENT_TAMPERING))
def test_tampered_segment(log_copy, case):
    path, _, _ = log_copy
    changes, message = SEGMENT_TAMPERING[case]
    rewrite_segment(path / SEGMENT, **changes)
    with pytest.raises(LogFormatError, match=rf"p000-r0-s000.h5.*{message}|{message}.*p000-r0-s000.h5|{message}"):
        logix.open(path)


def test_tampered_segment_messages_name_the_file(log_copy):
    path, _, _ = log_copy
    rewrite_segment(path / SEGMENT, committed=np.array([99]))
    with pytest.raises(LogFormatError) as info:
        logix.open(path)
    assert str(path / SEGMENT) in str(info.value)


def test_string_ids_that_are_not_utf8(str_source, tmp_path):
    path = tmp_path / "log"
    shutil.copytree(str_source, path)

    def broken(ids):
        ids = [bytes(v) for v in ids]
        ids[2] = b"\xff\xfe broken"
        return np.array(ids, dtype=object)

    rewrite_segment(path / SEGMENT, ids=broken)
    with pytest.raises(LogFormatError, match="p000-r0-s000.h5.*not UTF-8"):
        logix.open(path)


def test_int_ids_in_a_string_log(str_source, tmp_path):
    path = tmp_path / "log"
    shutil.copytree(str_source, path)
    rewrite_segment(path / SEGMENT, ids=lambda i: np.arange(len(i), dtype="i8"))
    with pytest.raises(LogFormatError, match="its ids are ints, the manifest says str"):
        logix.open(path)


# -- projections -----------------------------------------------------------------------------------


def rewrite_projections(path: Path, change) -> None:
    file = path / "projections.h5"
    with h5py.File(file, "r") as f:
        data = {f"{g}/{s}": f[g][s][()] for g in f for s in f[g]}
    change(data)
    file.unlink()
    with h5py.File(file, "w") as f:
        for key, value in data.items():
            if isinstance(value, tuple):
                f[key] = h5py.ExternalLink(*value)
            else:
                f.create_dataset(key, data=value)


PROJECTION_TAMPERING = {
    "missing_module": (lambda d: (d.pop("0/in"), d.pop("0/out")), "lack module '0'"),
    "missing_in": (lambda d: d.pop("0/in"), r"lack 0/in, a \(2, 5\) matrix"),
    "missing_side": (lambda d: d.pop("0/out"), "lack 0/out"),
    "wrong_shape": (
        lambda d: d.update({"0/in": np.zeros((3, 5), "f4")}),
        r"0/in has shape \(3, 5\), the manifest says \(2, 5\)",
    ),
    "transposed": (lambda d: d.update({"0/in": d["0/in"].T.copy()}), r"0/in has shape \(5, 2\)"),
    "vector": (lambda d: d.update({"0/in": np.zeros(10, "f4")}), "not a matrix of floats"),
    "ints": (lambda d: d.update({"0/in": np.zeros((2, 5), "i4")}), "not a matrix of floats"),
    "nan": (lambda d: d["0/in"].__setitem__((0, 0), np.nan), "non-finite"),
    "inf": (lambda d: d["2/in"].__setitem__((1, 1), np.inf), "non-finite"),
    # k_out == d_out for module 2: a matrix stored there would silently rotate the query's rows
    "extra_side_where_identity": (
        lambda d: d.update({"2/out": np.ones((2, 2), "f4")}),
        "2/out is stored but that side is not projected",
    ),
}


@pytest.mark.parametrize("case", list(PROJECTION_TAMPERING))
def test_tampered_projections(log_copy, case):
    path, model, _ = log_copy
    change, message = PROJECTION_TAMPERING[case]
    rewrite_projections(path, change)
    log = logix.open(path)  # rows need no projection; queries do
    with pytest.raises(LogFormatError, match=rf"projections.h5.*{message}|{message}"):
        log.query(model)


@pytest.mark.parametrize("what", ["missing", "truncated", "not_hdf5", "group_is_a_dataset"])
def test_projections_file_damaged(log_copy, what):
    path, model, _ = log_copy
    file = path / "projections.h5"
    if what == "missing":
        file.unlink()
    elif what == "truncated":
        file.write_bytes(file.read_bytes()[:1000])
    elif what == "not_hdf5":
        file.write_text("{}")
    else:
        file.unlink()
        with h5py.File(file, "w") as f:
            f.create_dataset("0", data=np.zeros(3))
            f.create_dataset("2", data=np.zeros(3))
    log = logix.open(path)
    with pytest.raises(LogFormatError, match="projections"):
        log.query(model)


# -- statistics ------------------------------------------------------------------------------------


def rewrite_h5(file: Path, change) -> None:
    with h5py.File(file, "r") as f:
        data = {}
        f.visititems(lambda name, obj: data.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    change(data)
    file.unlink()
    with h5py.File(file, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)


STATISTICS_TAMPERING = {
    "vec_a_shape": (
        lambda d: d.update({"0/vec_a": np.eye(3)}),
        r"0/vec_a is float64 of shape \(3, 3\), expected floats of shape \(2, 2\)",
    ),
    "vec_s_missing": (lambda d: d.pop("2/vec_s"), "2/vec_s is missing"),
    "eig_a_nan": (lambda d: d["0/eig_a"].__setitem__(0, np.nan), "0/eig_a holds non-finite"),
    "eig_s_negative": (lambda d: d["2/eig_s"].__setitem__(0, -1.0), "2/eig_s holds negative eigenvalues"),
    "eig_a_inf": (lambda d: d["0/eig_a"].__setitem__(1, np.inf), "non-finite"),
    "vec_s_strings": (lambda d: d.update({"0/vec_s": np.array([[b"a", b"b"], [b"c", b"d"]])}), "0/vec_s is"),
    "module_missing": (lambda d: [d.pop(k) for k in list(d) if k.startswith("2/")], "lack module '2'"),
}


@pytest.mark.parametrize("case", list(STATISTICS_TAMPERING))
def test_tampered_statistics(log_copy, case):
    path, model, _ = log_copy
    change, message = STATISTICS_TAMPERING[case]
    rewrite_h5(path / STATS, change)
    log = logix.open(path)
    q = query_of(log, model)
    with pytest.raises(LogFormatError, match=rf"statistics .*p000.h5.*{message}|{message}"):
        log.influence(q, "kfac")
    assert log.influence(q, "identity").values.isfinite().all()  # the rows are still fine


def test_ekfac_and_raw_statistics_checked(log_copy):
    path, model, _ = log_copy
    rewrite_h5(
        path / STATS, lambda d: (d["0/lambda_star"].__setitem__((0, 0), np.nan), d.update({"2/fisher_vec": np.eye(3)}))
    )
    log = logix.open(path)
    q = query_of(log, model)
    with pytest.raises(LogFormatError, match="0/lambda_star holds non-finite"):
        log.influence(q, "ekfac")
    with pytest.raises(LogFormatError, match=r"2/fisher_vec is float64 of shape \(3, 3\)"):
        log.influence(q, "raw")


@pytest.mark.parametrize("what", ["missing", "truncated", "not_hdf5"])
def test_statistics_file_damaged(log_copy, what):
    path, model, _ = log_copy
    file = path / STATS
    if what == "missing":
        file.unlink()
    elif what == "truncated":
        file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    else:
        file.write_text("not hdf5")
    log = logix.open(path)
    q = query_of(log, model)
    for call in (
        lambda: log.influence(q, "ekfac"),
        lambda: log.self_influence(),  # the values finalize stored
        lambda: log.influence(q, mode="cosine"),  # needs the stored self-influence
    ):
        with pytest.raises(LogFormatError, match="statistics.*p000.h5"):
            call()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["self_influence/identity"].__setitem__(3, np.nan), "non-finite"),
        (lambda d: d.update({"self_influence/identity": np.zeros((12, 2))}), "not a vector of floats"),
        (lambda d: d.update({"self_influence/identity": np.array([b"x"] * 12)}), "not a vector of floats"),
    ],
    ids=["nan", "matrix", "bytes"],
)
def test_stored_self_influence_damaged(log_copy, change, message):
    path, _, _ = log_copy
    rewrite_h5(path / STATS, change)
    with pytest.raises(LogFormatError, match=message):
        logix.open(path).self_influence("identity")


def test_stored_self_influence_of_another_length_is_recomputed(log_copy):
    path, _, expected = log_copy
    rewrite_h5(path / STATS, lambda d: d.update({"self_influence/identity": np.ones(5)}))
    log = logix.open(path)
    torch.testing.assert_close(log.self_influence("identity").values, (log.rows().double() ** 2).sum(dim=1))


@pytest.mark.parametrize(
    "case",
    ["truncated", "missing_key", "nan", "shape", "count_shape", "negative_count", "not_hdf5", "missing"],
)
def test_statistics_parts_damaged(log_copy, case):
    """The partial sums finalize adds up (a resumed or multi-rank pass)."""
    path, _, _ = log_copy
    file = path / PART
    changes = {
        "missing_key": lambda d: d.pop("0/s_sum"),
        "nan": lambda d: d["0/a_sum"].__setitem__((0, 0), np.nan),
        "shape": lambda d: d.update({"0/a_sum": np.zeros((2, 3))}),
        "count_shape": lambda d: d.update({"0/a_count": np.zeros(2)}),
        "negative_count": lambda d: d.update({"2/s_count": np.array(-3.0)}),
    }
    if case in changes:
        rewrite_h5(file, changes[case])
    elif case == "truncated":
        file.write_bytes(file.read_bytes()[:700])
    elif case == "not_hdf5":
        file.write_text("nope")
    else:
        file.unlink()
    with pytest.raises(LogFormatError, match="p000-r0-s000.h5"):
        load_sums([file])
    assert load_sums([]) == {}


def test_statistics_parts_of_different_shapes(log_copy, tmp_path):
    path, _, _ = log_copy
    other = tmp_path / "other.h5"
    shutil.copy(path / PART, other)
    rewrite_h5(other, lambda d: d.update({"0/a_sum": np.zeros((3, 3))}))
    with pytest.raises(LogFormatError, match="other shapes than in earlier parts"):
        load_sums([path / PART, other])


# -- the manifest ----------------------------------------------------------------------------------


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(m):
        target = m
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return change


def _del(*keys):
    def change(m):
        target = m
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return change


SEG = ("passes", 0, "segments", 0)
MOD = ("modules", 0)

MANIFEST_TAMPERING = {
    # the whole document
    "a_list": (lambda m: [m], "not a logix manifest"),
    "a_string": (lambda m: "logix-log", "not a logix manifest"),
    "a_number": (lambda m: 1, "not a logix manifest"),
    "null": (lambda m: NULL, "not a logix manifest"),
    "no_format": (_del("format"), "not a logix manifest"),
    "other_format": (_set("format", "logix-log-2"), "not a logix manifest"),
    # the schema version
    "newer_schema": (_set("schema_version", SCHEMA_VERSION + 1), "schema version 2; this logix reads up to 1: upgrade"),
    "much_newer_schema": (_set("schema_version", 10**30), "upgrade logix"),
    "schema_as_string": (_set("schema_version", "1"), "schema version '1'"),
    "schema_as_bool": (_set("schema_version", True), "schema version True"),
    "schema_as_float": (_set("schema_version", 1.5), "schema version 1.5"),
    "schema_missing": (_del("schema_version"), "schema version None"),
    "schema_zero": (_set("schema_version", 0), "schema version 0"),
    # required keys
    "no_config": (_del("config"), "lacks 'config'"),
    "no_modules": (_del("modules"), "lacks 'modules'"),
    "no_passes": (_del("passes"), "lacks 'passes'"),
    "no_width": (_del("width"), "lacks 'width'"),
    # config
    "config_a_list": (_set("config", [2]), "'config' must be an object"),
    "config_unknown_field": (_set("config", "evil", "__import__('os')"), "'config' is invalid: unknown config fields"),
    "config_bad_rank": (_set("config", "rank", -2), "'config' is invalid: rank"),
    "config_bad_dtype": (_set("config", "dtype", "float64"), "'config' is invalid: dtype"),
    # id_kind and width
    "unknown_id_kind": (_set("id_kind", "float"), "'id_kind' must be 'int' or 'str', got 'float'"),
    "id_kind_number": (_set("id_kind", 1), "'id_kind' must be"),
    "id_kind_unset_with_segments": (
        _set("id_kind", None),
        "holds 12 committed rows but the manifest's 'id_kind' is not set",
    ),
    "width_negative": (_set("width", -8), "'width' must be a non-negative int"),
    "width_string": (_set("width", "8"), "'width' must be a non-negative int"),
    "width_float": (_set("width", 8.0), "'width' must be a non-negative int"),
    "width_inconsistent": (_set("width", 7), "'width' is 7 but the modules' blocks add up to 8"),
    # modules
    "modules_an_object": (_set("modules", {}), "'modules' must be a list"),
    "module_a_string": (_set("modules", 0, "0"), "module #0 must have exactly the fields"),
    "module_missing_field": (_del(*MOD, "k_in"), "module #0 must have exactly the fields"),
    "module_extra_field": (_set(*MOD, "code", "rm -rf /"), "module #0 must have exactly the fields"),
    "module_name_int": (_set(*MOD, "name", 0), "name and kind must be strings"),
    "module_kind_empty": (_set(*MOD, "kind", ""), "name and kind must be strings"),
    "module_names_duplicated": (_set("modules", 1, "name", "0"), "module '0' is listed twice"),
    "d_in_zero": (_set(*MOD, "d_in", 0), "d_in must be a positive int, got 0"),
    "d_out_negative": (_set(*MOD, "d_out", -3), "d_out must be a positive int, got -3"),
    "k_in_string": (_set(*MOD, "k_in", "2"), "k_in must be a positive int, got '2'"),
    "k_out_bool": (_set(*MOD, "k_out", True), "k_out must be a positive int, got True"),
    "k_out_float": (_set(*MOD, "k_out", 2.0), "k_out must be a positive int"),
    "k_larger_than_d": (
        lambda m: m["modules"][1].update(k_out=3, offset=4) or m.update(width=10),
        "exceeds its dimensions",
    ),
    "offset_negative": (_set("modules", 1, "offset", -4), "offset -4, expected 4"),
    "offset_overlapping": (_set("modules", 1, "offset", 2), "offset 2, expected 4"),
    "offset_beyond_width": (_set("modules", 1, "offset", 6), "offset 6, expected 4"),
    "offset_string": (_set("modules", 1, "offset", "4"), "offset '4', expected 4"),
    "bias_string": (_set(*MOD, "bias", "yes"), "bias must be true or false"),
    # passes
    "passes_a_string": (_set("passes", "pass0"), "'passes' must be a list"),
    "passes_an_object": (_set("passes", {}), "'passes' must be a list"),
    "pass_a_list": (_set("passes", 0, []), "pass #0 must be an object"),
    "pass_without_name": (_del("passes", 0, "name"), "pass #0 lacks 'name'"),
    "pass_without_segments": (_del("passes", 0, "segments"), "pass #0 lacks 'segments'"),
    "pass_name_int": (_set("passes", 0, "name", 3), "name must be a unique non-empty string"),
    "pass_names_duplicated": (lambda m: m["passes"].append({**m["passes"][0], "index": 1}), "name must be a unique"),
    "pass_index_wrong": (_set("passes", 0, "index", 4), "index 4, expected 0"),
    "pass_meta_list": (_set("passes", 0, "meta", []), "meta must be an object"),
    "pass_finalized_string": (_set("passes", 0, "finalized", "yes"), "finalized must be true or false"),
    "segments_an_object": (_set("passes", 0, "segments", {}), "segments must be a list"),
    "segment_a_string": (_set("passes", 0, "segments", 0, "segments/p000-r0-s000.h5"), "a segment entry must be"),
    "segment_without_file": (_del(*SEG, "file"), "a segment entry must be"),
    "segment_extra_key": (_set(*SEG, "exec", "x"), "a segment entry must be"),
    "segment_listed_twice": (
        lambda m: m["passes"][0]["segments"].append(dict(m["passes"][0]["segments"][0])),
        "listed twice",
    ),
    "segment_rank_negative": (_set(*SEG, "rank", -1), "rank must be a non-negative int"),
    "segment_session_string": (_set(*SEG, "session", "0"), "session must be a non-negative int"),
    "segment_rows_negative": (_set(*SEG, "rows", -1), "rows must be a non-negative int"),
    "segment_rows_string": (_set(*SEG, "rows", "12"), "rows must be a non-negative int"),
    "segment_rows_fewer": (_set(*SEG, "rows", 5), "holds 12 committed rows, the manifest recorded 5"),
    "segment_rows_more": (_set(*SEG, "rows", 40), "holds 12 committed rows, the manifest recorded 40"),
    # paths out of the log directory
    "segment_parent_path": (_set(*SEG, "file", "../../etc/passwd"), "not a file under segments/ of the log: refused"),
    "segment_absolute_path": (_set(*SEG, "file", "/etc/passwd"), "not a file under segments/ of the log: refused"),
    "segment_dotdot_inside": (_set(*SEG, "file", "segments/../../../etc/passwd"), "refused"),
    "segment_dotdot_manifest": (_set(*SEG, "file", "segments/../manifest.json"), "refused"),
    "segment_other_folder": (_set(*SEG, "file", "statistics/p000.h5"), "refused"),
    "segment_empty": (_set(*SEG, "file", ""), "must be a file name"),
    "segment_nul": (_set(*SEG, "file", "segments/p000\x00.h5"), "must be a file name"),
    "segment_number": (_set(*SEG, "file", 7), "must be a file name"),
    "statistics_parent_path": (_set("passes", 0, "statistics", "../../etc/passwd"), "refused"),
    "statistics_absolute_path": (_set("passes", 0, "statistics", "/etc/passwd"), "refused"),
    "statistics_parts_a_string": (
        _set("passes", 0, "statistics_parts", "statistics/x.h5"),
        "statistics_parts must be a list",
    ),
    "statistics_part_outside": (_set("passes", 0, "statistics_parts", ["../x.h5"]), "refused"),
    "sessions_negative": (_set("sessions", -1), "'sessions' must be a non-negative int"),
}


@pytest.mark.parametrize("case", list(MANIFEST_TAMPERING))
def test_tampered_manifest(log_copy, case):
    path, _, _ = log_copy
    change, message = MANIFEST_TAMPERING[case]
    edit_manifest(path, change)
    with pytest.raises(LogFormatError) as info:
        logix.open(path)
    assert message in str(info.value), str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", ["segment_parent_path", "newer_schema", "width_inconsistent", "config_unknown_field"])
def test_tampered_manifest_refused_by_a_new_session_too(log_copy, case):
    """logix.init on such a log refuses it the same way, and leaves it alone."""
    path, model, _ = log_copy
    edit_manifest(path, MANIFEST_TAMPERING[case][0])
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(LogFormatError, match=MANIFEST_TAMPERING[case][1].split(":")[0]):
        logix.init(path, rank=2, statistics=["ekfac", "raw"])
    assert (path / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"{",
        b"\xff\xfe{}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"format": "logix-log", "schema_version": NaN}',
        b"\x00" * 64,
    ],
    ids=["empty", "cut", "not_utf8", "deeply_nested", "nan", "nul_bytes"],
)
def test_manifest_that_is_not_a_manifest(log_copy, text):
    path, _, _ = log_copy
    (path / "manifest.json").write_bytes(text)
    with pytest.raises(LogFormatError, match="manifest.json|schema version"):
        logix.open(path)


def test_manifest_a_directory(log_copy):
    path, _, _ = log_copy
    (path / "manifest.json").unlink()
    (path / "manifest.json").mkdir()
    with pytest.raises(LogFormatError, match="manifest.json"):
        logix.open(path)


def test_untouched_copy_reads_back_exactly(log_copy):
    """The baseline every fault above is compared with."""
    path, model, expected = log_copy
    assert faithful_or_refused(path, model, expected, "") == "same"


def test_stray_files_in_segments_are_not_adopted_on_resume(log_copy):
    from logix.disk import pass_segments

    path, _, _ = log_copy
    for name in ("p000-rX-s000.h5", "p000-r0-s0.h5", "p000-r01-s000.h5", "p000-r1-s000.h5.h5"):
        (path / "segments" / name).write_text("junk")
    assert pass_segments(path, 0) == [{"file": SEGMENT, "rank": 0, "session": 0}]


def test_stored_self_influence_is_read_only_under_todays_damping_rule(log_copy):
    """finalize records the damping rule with the self-influences it stores: they are read back when
    the record names today's default, and recomputed when it names another rule (an older logix) or
    none, never reused."""
    path, _, _ = log_copy
    fresh = logix.open(path).self_influence("ekfac").values
    with h5py.File(path / STATS, "a") as f:
        f["self_influence/ekfac"][...] = 7.0
    torch.testing.assert_close(logix.open(path).self_influence("ekfac").values, torch.full_like(fresh, 7.0))
    with h5py.File(path / STATS, "a") as f:
        f["self_influence/ekfac"].attrs["damping_rule"] = "damping_factor x mean eigenvalue of the block"
    torch.testing.assert_close(logix.open(path).self_influence("ekfac").values, fresh, rtol=1e-6, atol=0)
    with h5py.File(path / STATS, "a") as f:
        del f["self_influence/ekfac"].attrs["damping_rule"]
    torch.testing.assert_close(logix.open(path).self_influence("ekfac").values, fresh, rtol=1e-6, atol=0)
