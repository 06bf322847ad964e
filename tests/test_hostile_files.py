"""A log is untrusted input (issue 15): whatever its files hold, reading it opens nothing outside
the log directory, reads nothing from other files, allocates no more than its files hold, and ends
in bounded time. Each hostile log is refused three ways, each within BOUND seconds: the reading
call raises LogFormatError (logix.open, or the call that reads the file), `logix verify` exits 1
naming the problem, and `logix info` exits 1 (where it reads the file).

- Files that read other files (issue 15.6): an HDF5 file of the log (segment, projections,
  statistics, sums, a saved result) with external raw storage, a virtual dataset, an external link
  to a dataset or a group, or a soft link through an external link, where the reader reads or
  anywhere else in the file.
- Links out of the log directory (15.7): a symlinked segments/ or statistics/ folder, a symlinked
  projections.h5, statistics, sums or manifest file; FIFOs and devices in a file's place.
- Tiny files declaring huge contents (15.8): a few-KB segment declaring 300M rows, a manifest
  over its size cap, 300k segment entries.
- One flipped metadata byte of a segment, closed or left by a killed writer (15.9): refused at
  once by the library and the CLI alike, and the CLI refuses what the library refuses (a segment
  cut by a file-size limit, float64 or object-reference ids, projections in external storage).
- A string-id read that fails while a writer appends (15.5) is retried, then reopened, and never
  escapes as anything but a LogFormatError.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_faults import PART, SEGMENT, STATS, rewrite_segment, write_log

import logix
from logix import LogFormatError
from logix.cli import main
from logix.disk import segments as disk_segments
from logix.disk.manifest import MANIFEST_MAX_BYTES
from logix.disk.segments import open_segment, read_ids, read_index
from logix.disk.statistics import load_sums
from logix.disk.untrusted import open_swmr

BOUND = 30.0  # seconds any one refusal may take (they take well under one; a hang took hours)
SECRET = 31337.0  # the numbers a file outside the log holds: never read back


# -- running a reader, bounded ---------------------------------------------------------------------


def bounded(call, *args):
    """call(*args) on a thread that must finish within BOUND seconds: its result, or its error."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), f"{getattr(call, '__name__', call)} still runs after {BOUND} s"
    outcome["seconds"] = time.monotonic() - started
    return outcome


def refused_by_library(read, path: Path) -> str:
    outcome = bounded(read, path)
    error = outcome.get("error")
    assert isinstance(error, LogFormatError), f"the library reads the log: {outcome}"
    return str(error)


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    outcome = bounded(main, [str(a) for a in argv])
    assert "error" not in outcome, outcome["error"]
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return outcome["value"], out, err


def refused_by_verify(capsys, path: Path, names: str) -> list[str]:
    code, out, _ = cli(capsys, "verify", "-q", "--json", path)
    problems = json.loads(out)["problems"]
    assert code == 1 and any(names in p for p in problems), f"verify does not name {names!r}: {problems}"
    return problems


def refused_by_info(capsys, path: Path, names: str) -> None:
    code, out, err = cli(capsys, "info", "-q", path)
    assert code == 1 and names in err, f"info does not refuse ({code}): {err}"


# -- logs to damage --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished log: one pass of 12 rows, int ids, EK-FAC and raw statistics, a statistics part."""
    path = tmp_path_factory.mktemp("hostile") / "log"
    write_log(path, lambda b: list(range(4 * b, 4 * b + 4)))
    return path


@pytest.fixture
def log_copy(source, tmp_path):
    copy = tmp_path / "log"
    shutil.copytree(source, copy)
    return copy


def open_log(path):
    return logix.open(path)


def read_projections(path):
    return logix.open(path).projections()


def read_stored_self_influence(path):
    return logix.open(path).self_influence("identity")


def read_curvature(path):
    return logix.open(path).self_influence("kfac", damping_factor=0.05)  # computed: reads the factors


def read_sums(path):
    return load_sums([path / PART])


# -- 15.6: nothing in a log reads another file -----------------------------------------------------


def _outside(path: Path) -> tuple[Path, Path]:
    """A raw file and an HDF5 file beside the log (outside it), both full of SECRET."""
    secret = path.parent / "secret.bin"
    secret.write_bytes(np.full(1 << 16, SECRET).tobytes())
    return secret, path.parent / "other.h5"


def plant_foreign(file: str, key: str, how: str):
    """Damage: the object `key` of a log's file replaced by one whose data live elsewhere, shaped
    like the original so that following it would read SECRET without complaint (or, with key
    "extra", such an object added beside what the readers read)."""

    def damage(path: Path) -> None:
        secret, other = _outside(path)
        with h5py.File(path / file, "a") as f:
            original = f[key] if key in f else f.create_dataset(key, data=np.zeros(4))
            with h5py.File(other, "w") as g:
                if isinstance(original, h5py.Group):
                    f.copy(original, g, "object")
                else:
                    g.create_dataset("object", data=np.full(original.shape, SECRET, dtype=original.dtype))
            layout = None if isinstance(original, h5py.Group) else (original.shape, original.dtype)
            attrs = dict(original.attrs)
            del f[key]
            if how == "external_link":
                f[key] = h5py.ExternalLink(str(other), "/object")
            elif how == "soft_link_through_an_external_link":
                f["elsewhere"] = h5py.ExternalLink(str(other), "/")
                f[key] = h5py.SoftLink("/elsewhere/object")
            else:
                shape, dtype = layout
                if how == "external_storage":
                    outside = [(str(secret), 0, h5py.h5f.UNLIMITED)]
                    created = f.create_dataset(key, shape=shape, dtype=dtype, external=outside)
                else:
                    virtual = h5py.VirtualLayout(shape=shape, dtype=dtype)
                    virtual[...] = h5py.VirtualSource(str(other), "object", shape=shape)
                    created = f.create_virtual_dataset(key, virtual)
                created.attrs.update(attrs)

    return damage


DATASET_WAYS = ("external_storage", "virtual", "external_link", "soft_link_through_an_external_link")
FOREIGN = {
    **{f"segment_grads_{how}": (SEGMENT, "grads", how, open_log) for how in DATASET_WAYS},
    **{f"segment_ids_{how}": (SEGMENT, "ids", how, open_log) for how in DATASET_WAYS},
    **{f"projections_{how}": ("projections.h5", "0/in", how, read_projections) for how in DATASET_WAYS},
    **{
        f"statistics_self_influence_{how}": (STATS, "self_influence/identity", how, read_stored_self_influence)
        for how in DATASET_WAYS
    },
    **{f"statistics_vec_a_{how}": (STATS, "0/vec_a", how, read_curvature) for how in DATASET_WAYS},
    **{f"sums_{how}": (PART, "0/a_sum", how, read_sums) for how in DATASET_WAYS},
    "statistics_self_influence_group_linked": (STATS, "self_influence", "external_link", read_stored_self_influence),
    "statistics_module_group_linked": (STATS, "0", "external_link", read_curvature),
    "projections_module_group_linked": ("projections.h5", "0", "external_link", read_projections),
    **{f"segment_extra_{how}": (SEGMENT, "extra", how, open_log) for how in ("external_storage", "external_link")},
    **{
        f"projections_extra_{how}": ("projections.h5", "extra", how, read_projections)
        for how in ("external_storage", "external_link")
    },
    **{
        f"statistics_extra_{how}": (STATS, "extra", how, read_stored_self_influence)
        for how in ("external_storage", "virtual")
    },
    **{f"sums_extra_{how}": (PART, "extra", how, read_sums) for how in ("external_storage", "external_link")},
}
FOREIGN_WORDS = ("keeps its data in other files", "is a link to another file")


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_file_that_reads_another_file_is_refused(log_copy, capsys, case):
    file, key, how, read = FOREIGN[case]
    plant_foreign(file, key, how)(log_copy)
    complaint = refused_by_library(read, log_copy)
    assert file in complaint and any(words in complaint for words in FOREIGN_WORDS), complaint
    problems = refused_by_verify(capsys, log_copy, file)
    assert complaint.split("is damaged: ")[-1] in " ".join(problems)


def test_stored_self_influences_linked_elsewhere_never_reach_the_output(log_copy, capsys):
    """What `logix self-influence --json` printed: a file's bytes as float64."""
    plant_foreign(STATS, "self_influence/identity", "external_storage")(log_copy)
    code, out, err = cli(capsys, "self-influence", "-q", "--json", "-p", "identity", log_copy)
    assert code == 1 and "keeps its data in other files" in err and str(int(SECRET)) not in out


@pytest.mark.parametrize("how", DATASET_WAYS)
def test_a_saved_result_that_reads_another_file_is_refused(log_copy, tmp_path, how):
    scores = logix.open(log_copy).self_influence("identity")
    scores.save(tmp_path / "saved.h5")
    plant_foreign("saved.h5", "values", how)(tmp_path)
    outcome = bounded(type(scores).load, tmp_path / "saved.h5")
    assert isinstance(outcome.get("error"), LogFormatError), outcome
    assert any(words in str(outcome["error"]) for words in FOREIGN_WORDS)


def test_info_refuses_projections_in_external_storage(log_copy, capsys):
    plant_foreign("projections.h5", "0/in", "external_storage")(log_copy)
    refused_by_info(capsys, log_copy, "keeps its data in other files")


# -- 15.7: nothing outside the log directory is opened ---------------------------------------------


def _move_out(relative: str):
    """Damage: a file or folder of the log moved beside the log, a symlink left in its place."""

    def damage(path: Path) -> None:
        outside = path.parent / ("elsewhere-" + relative.replace("/", "-"))
        shutil.move(path / relative, outside)
        os.symlink(outside, path / relative)

    return damage


def _replace_by(relative: str, what: str):
    def damage(path: Path) -> None:
        (path / relative).unlink()
        if what == "fifo":
            os.mkfifo(path / relative)
        else:
            os.symlink(what, path / relative)

    return damage


OUTSIDE = {
    "segments_folder_linked_out": (_move_out("segments"), open_log, SEGMENT, "leads out of the log directory"),
    "segment_linked_out": (_move_out(SEGMENT), open_log, SEGMENT, "leads out of the log directory"),
    "segment_a_fifo": (_replace_by(SEGMENT, "fifo"), open_log, SEGMENT, "is not a regular file"),
    "segment_linked_to_a_device": (_replace_by(SEGMENT, "/dev/zero"), open_log, SEGMENT, "leads out"),
    "projections_linked_out": (_move_out("projections.h5"), read_projections, "projections.h5", "leads out"),
    "projections_a_fifo": (_replace_by("projections.h5", "fifo"), read_projections, "projections.h5", "not a regular"),
    "statistics_folder_linked_out": (_move_out("statistics"), read_stored_self_influence, STATS, "leads out"),
    "statistics_linked_out": (_move_out(STATS), read_stored_self_influence, STATS, "leads out"),
    "statistics_a_fifo": (_replace_by(STATS, "fifo"), read_stored_self_influence, STATS, "is not a regular file"),
    "sums_linked_out": (_move_out(PART), read_sums, PART, "leads out of the log directory"),
    "manifest_linked_out": (_move_out("manifest.json"), open_log, "manifest.json", "leads out"),
    "manifest_a_fifo": (_replace_by("manifest.json", "fifo"), open_log, "manifest.json", "is not a regular file"),
    "manifest_linked_to_dev_zero": (_replace_by("manifest.json", "/dev/zero"), open_log, "manifest.json", "leads out"),
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_nothing_outside_the_log_is_opened(log_copy, capsys, case):
    damage, read, names, words = OUTSIDE[case]
    damage(log_copy)
    complaint = refused_by_library(read, log_copy)
    assert names in complaint and words in complaint, complaint
    refused_by_verify(capsys, log_copy, words)
    if read in (open_log, read_projections):  # what info reads
        refused_by_info(capsys, log_copy, words)


def test_links_that_stay_inside_the_log_are_followed(log_copy, tmp_path):
    """A log reached through a symlink, and a file linked to another place inside the log, read as before."""
    shutil.move(log_copy / "projections.h5", log_copy / "projections-stored.h5")
    os.symlink("projections-stored.h5", log_copy / "projections.h5")
    os.symlink(log_copy, tmp_path / "alias")
    log = logix.open(tmp_path / "alias")
    assert len(log) == 12 and set(log.projections()) == {"0", "2"}
    assert main(["verify", "-q", str(tmp_path / "alias")]) == 0


@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "outside"])
def test_an_odd_writer_lock_never_blocks_a_reader(log_copy, capsys, what):
    """writer.lock tells readers whether a job writes the log: a FIFO in its place blocked them."""
    lock = log_copy / "writer.lock"
    lock.unlink()
    if what == "fifo":
        os.mkfifo(lock)
    elif what == "outside":
        (log_copy.parent / "some-other-file").touch()
        os.symlink(log_copy.parent / "some-other-file", lock)
    else:
        os.symlink(what, lock)
    outcome = bounded(open_log, log_copy)
    assert "error" not in outcome and outcome["value"].writer is None
    code, out, _ = cli(capsys, "verify", "-q", log_copy)
    assert code == 0, out


# -- 15.8: tiny files, huge declarations -----------------------------------------------------------

HUGE = 300_000_000


def declare_huge_segment(path: Path, killed_writer: bool = False) -> None:
    """The segment rewritten as a few KB that declare HUGE committed rows (chunks never written
    read as zeros: reading them would allocate gigabytes). killed_writer: its file is left as a
    writer killed in SWMR mode leaves it, so readers open it in SWMR mode."""
    segment = path / SEGMENT
    segment.unlink()
    script = (
        "import sys, os, h5py, numpy as np\n"
        "f = h5py.File(sys.argv[1], 'w', libver='latest')\n"
        "for name, dt, shape in (('grads', 'f4', (8,)), ('ids', 'i8', ()), ('flags', 'u1', ()), ('step', 'i8', ())):\n"
        f"    f.create_dataset(name, ({HUGE}, *shape), maxshape=(None, *shape), dtype=dt, chunks=(4096, *shape))\n"
        f"f.create_dataset('committed', data=np.array([{HUGE}]))\n"
        "if sys.argv[2] == 'killed':\n"
        "    f.swmr_mode = True\n"
        "    f.flush()\n"
        "    os._exit(0)\n"
        "f.close()\n"
    )
    subprocess.run([sys.executable, "-c", script, segment, "killed" if killed_writer else "closed"], check=True)
    assert segment.stat().st_size < 64 << 10
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["passes"][0]["segments"][0].pop("rows", None)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("killed_writer", [False, True], ids=["closed", "left_by_a_killed_writer"])
def test_a_tiny_segment_declaring_300M_rows_allocates_nothing(log_copy, capsys, killed_writer):
    declare_huge_segment(log_copy, killed_writer)
    tracemalloc.start()
    try:
        complaint = refused_by_library(open_log, log_copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"opening allocated {peak >> 20} MB"
    assert SEGMENT in complaint and ("declares" in complaint or "alone needs" in complaint), complaint
    refused_by_verify(capsys, log_copy, SEGMENT)
    refused_by_info(capsys, log_copy, SEGMENT)


def test_a_manifest_over_its_size_cap_is_not_read(log_copy, capsys):
    with open(log_copy / "manifest.json", "r+b") as f:
        f.truncate(400 << 20)  # sparse: 400 MB that take no disk
    complaint = refused_by_library(open_log, log_copy)
    assert f"more than the {MANIFEST_MAX_BYTES} it may have" in complaint, complaint
    refused_by_verify(capsys, log_copy, "manifest.json")
    refused_by_info(capsys, log_copy, "manifest.json")


@pytest.mark.parametrize("entries", ["listed_again", "missing_files"])
def test_300k_segment_entries_are_refused_in_linear_time(log_copy, capsys, entries):
    manifest = json.loads((log_copy / "manifest.json").read_text())
    first = manifest["passes"][0]["segments"][0]
    if entries == "listed_again":
        more = [dict(first)] * 300_000
    else:
        more = [{"file": f"segments/p000-r1-s{i:06d}.h5", "rank": 1, "session": i} for i in range(300_000)]
    manifest["passes"][0]["segments"] += more
    (log_copy / "manifest.json").write_text(json.dumps(manifest))
    started = time.monotonic()
    complaint = refused_by_library(open_log, log_copy)
    assert time.monotonic() - started < 10, "open is not linear in the manifest's entries"
    assert ("listed twice" if entries == "listed_again" else "is missing") in complaint
    problems = refused_by_verify(capsys, log_copy, "p000-r")
    assert len(problems) == 300_000


# -- 15.9: the CLI opens and checks segments as the library does -----------------------------------


def killed_writer_log(path: Path, string_ids: bool = False) -> None:
    """A log whose writer was killed after committing 12 rows: its segment is left as SWMR left it
    (a plain open refuses it; readers open it in SWMR mode)."""
    ids = "[f'ex{4 * b + i}' for i in range(4)]" if string_ids else "list(range(4 * b, 4 * b + 4))"
    script = (
        "import os, sys, torch, logix\n"
        "from torch import nn\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))\n"
        "run = logix.init(sys.argv[1], rank=2)\n"
        "run.watch(model)\n"
        "for b in range(3):\n"
        f"    with run.capture({ids}):\n"
        "        model(torch.randn(4, 4)).sum().backward()\n"
        "run.flush()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, path], check=True)


@pytest.fixture(scope="module")
def killed_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("killed") / "log"
    killed_writer_log(path)
    return path


@pytest.mark.parametrize("where", [40, 200, 700, 1200])
@pytest.mark.parametrize("left_by", ["a_closed_writer", "a_killed_writer"])
def test_one_flipped_metadata_byte_is_refused_at_once_everywhere(
    source, killed_source, tmp_path, capsys, where, left_by
):
    """info and verify hung for 20+ minutes (HDF5's SWMR retries) where logix.open refused at once."""
    path = tmp_path / "log"
    shutil.copytree(source if left_by == "a_closed_writer" else killed_source, path)
    assert len(logix.open(path)) == 12
    data = bytearray((path / SEGMENT).read_bytes())
    data[where] ^= 0xFF
    (path / SEGMENT).write_bytes(bytes(data))
    outcome = bounded(open_log, path)
    if "error" not in outcome:  # a byte HDF5 does not use: read back exactly, by the CLI too
        assert len(outcome["value"]) == 12
        assert cli(capsys, "verify", "-q", path)[0] == 0
        return
    assert isinstance(outcome["error"], LogFormatError) and SEGMENT in str(outcome["error"])
    problems = refused_by_verify(capsys, path, SEGMENT)
    assert str(outcome["error"]).split("is damaged: ")[-1] in " ".join(problems)
    refused_by_info(capsys, path, SEGMENT)


def _ids(make):
    def change(ids):
        return make(len(ids))

    return change


def _reference_ids(path: Path) -> None:
    segment = path / SEGMENT
    with h5py.File(segment, "a") as f:
        refs = np.array([f["step"].ref] * len(f["ids"]), dtype=h5py.ref_dtype)
        del f["ids"]
        f.create_dataset("ids", data=refs, dtype=h5py.ref_dtype)


CLI_AGREES = {
    "ids_float64": (lambda p: rewrite_segment(p / SEGMENT, ids=_ids(lambda n: np.arange(n, dtype="f8"))), "'ids'"),
    "ids_object_references": (_reference_ids, "'ids'"),
    "segment_truncated_to_half": (
        lambda p: (p / SEGMENT).write_bytes((p / SEGMENT).read_bytes()[: (p / SEGMENT).stat().st_size // 2]),
        "truncated",
    ),
}


@pytest.mark.parametrize("case", list(CLI_AGREES))
def test_info_refuses_what_the_library_refuses(log_copy, capsys, case):
    damage, words = CLI_AGREES[case]
    damage(log_copy)
    complaint = refused_by_library(open_log, log_copy)
    assert words in complaint, complaint
    refused_by_verify(capsys, log_copy, words)
    refused_by_info(capsys, log_copy, words)


def test_a_segment_cut_short_is_refused_everywhere(tmp_path, capsys):
    """A segment that ends before the end HDF5 recorded (a copy that stopped, or a file-size limit
    hit inside HDF5's own growth, which the writer now prevents by reserving its chunks first:
    tests/test_disk_faults.py): logix.open refused it; info reported its committed rows."""
    path = tmp_path / "log"
    script = (
        "import sys, torch, logix\n"
        "from torch import nn\n"
        "model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))\n"
        "try:\n"
        "    run = logix.init(sys.argv[1], rank='full', commit_interval=60.0)\n"
        "    run.watch(model)\n"
        "    for step in range(200):\n"
        "        with run.capture(list(range(8 * step, 8 * step + 8))):\n"
        "            model(torch.randn(8, 32)).sum().backward()\n"
        "        if step % 3 == 2:\n"
        "            run.flush()\n"
        "except logix.LogixError:\n"
        "    pass\n"
    )
    subprocess.run([sys.executable, "-c", script, path], check=True, capture_output=True)
    os.truncate(path / SEGMENT, (path / SEGMENT).stat().st_size * 6 // 10)
    complaint = refused_by_library(open_log, path)
    assert "truncated" in complaint, complaint
    refused_by_verify(capsys, path, "truncated")
    refused_by_info(capsys, path, "truncated")


# -- 15.5: a failed string read while a writer appends ---------------------------------------------


@pytest.fixture
def string_segment(tmp_path):
    path = tmp_path / "log"
    killed_writer_log(path, string_ids=True)
    return path, path / SEGMENT


def _failing_first(monkeypatch, owner, name: str, times: int = 1) -> list:
    """owner.name raises OSError (as a read caught mid-write does) its first `times` calls."""
    original, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise OSError("Can't synchronously read data (actual len exceeds EOA)")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def test_a_failed_string_id_read_is_retried_in_swmr_mode(string_segment, monkeypatch):
    """The retry path of read_rows on an .asstr() view (it raised AttributeError: 'AsStrView'
    object has no attribute 'file')."""
    _, segment = string_segment
    with open_swmr(segment) as f:
        assert f.swmr_mode
        calls = _failing_first(monkeypatch, h5py._hl.dataset.AsStrView, "__getitem__")
        ids = read_ids(f["ids"], 12, segment)
    assert ids.tolist() == [f"ex{i}" for i in range(12)] and len(calls) == 2


def test_a_failed_string_id_read_of_a_closed_file_is_a_log_format_error(string_segment, monkeypatch):
    """No writer: no retry, no torn-chunk recovery for strings (they carry no checksum)."""
    _, segment = string_segment
    with open_swmr(segment) as f:
        data = {name: f[name][()] for name in f}
    segment.unlink()
    with h5py.File(segment, "w") as f:  # the same segment, closed
        for name, value in data.items():
            f.create_dataset(name, data=value, dtype=h5py.string_dtype() if name == "ids" else None)
    _failing_first(monkeypatch, h5py._hl.dataset.AsStrView, "__getitem__", times=100)
    with pytest.raises(LogFormatError, match="cannot be read: Can't synchronously read data"):
        read_index(segment)


def test_a_segment_being_written_is_reopened_when_its_index_fails(string_segment, monkeypatch):
    """A string id in a heap past the end of the file as a reader opened it: only a new open sees it."""
    path, segment = string_segment
    calls = _failing_first(monkeypatch, disk_segments, "read_ids", times=disk_segments.REOPENS - 1)
    ids, flags, steps = read_index(segment)
    assert ids.tolist() == [f"ex{i}" for i in range(12)] and len(calls) == disk_segments.REOPENS
    monkeypatch.undo()
    calls = _failing_first(monkeypatch, disk_segments, "read_ids", times=100)
    with pytest.raises(LogFormatError, match="cannot be read: Can't synchronously read data"):
        logix.open(path)
    assert len(calls) == disk_segments.REOPENS


def test_a_closed_segment_is_not_reopened(log_copy, monkeypatch):
    calls = _failing_first(monkeypatch, disk_segments, "read_ids", times=100)
    with pytest.raises(LogFormatError, match="cannot be read"):
        read_index(log_copy / SEGMENT)
    assert len(calls) == 1
    with open_segment(log_copy / SEGMENT) as f:
        assert not f.swmr_mode
