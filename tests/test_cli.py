"""The `logix` command line: info, verify, self-influence, top and export on small real logs, in
process through `logix.cli.main` and once through the installed console script; damaged logs give
exit status 1 naming the problem, never a traceback."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.cli import main

X = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))
TRAIN_IDS = list(range(24))
QUERY_IDS = [30, 31, 32, 33]
NAN_ID = 23  # its input is NaN in the last pass: a flagged row


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def write_log(
    path,
    model,
    ids,
    *,
    passes=("epoch0", "epoch1"),
    statistics=("ekfac", "raw"),
    finalize=True,
    step=True,
    nan_id=None,
    **config,
):
    config = {"rank": 4, **config}
    run = logix.init(path, statistics=statistics, **config)
    run.watch(model)
    for name in passes:
        run.start_pass(name, lr=0.1)
        for start in range(0, len(ids), 6):
            batch = ids[start : start + 6]
            x = X[batch].clone()
            poisoned = nan_id in batch and name == passes[-1]
            if poisoned:
                x[batch.index(nan_id)] = float("nan")
            with run.capture(batch):
                F.cross_entropy(model(x), Y[batch]).backward()
            with torch.no_grad():  # plain SGD (torch.optim would import torch._dynamo: seconds)
                for p in model.parameters():
                    if step and not poisoned:
                        p -= 0.1 * p.grad
                    p.grad = None
    if finalize:
        run.finalize()
    else:
        run.close()


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A finalized train log (two passes, one flagged row), a query log of other examples written
    with the trained model, and the model itself."""
    root = tmp_path_factory.mktemp("cli")
    model = make_model()
    write_log(root / "train", model, TRAIN_IDS, nan_id=NAN_ID)
    write_log(root / "query", model, QUERY_IDS, passes=("test",), statistics=(), step=False)
    return root / "train", root / "query", model


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def damaged_copy(tmp_path, logs) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(logs[0], path)
    return path


# -- help and usage -----------------------------------------------------------------------------


def test_help_explains_the_log_and_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for word in ("info", "verify", "self-influence", "top", "export", "manifest.json", "segments/", "examples:"):
        assert word in out
    assert "POSITIVE" in out  # the sign convention
    for command in ("info", "verify", "self-influence", "top", "export"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and f"logix {command}" in out and "examples:" in out


def test_usage_errors_exit_2_with_one_line(capsys, logs, tmp_path):
    train, _, _ = logs
    assert (
        run_cli(
            capsys,
        )[0]
        == 2
    )  # no command
    code, _, err = run_cli(capsys, "self-influence", train, "--preconditioner", "nope")
    assert code == 2 and "invalid choice" in err
    code, _, err = run_cli(capsys, "info", tmp_path / "absent")
    assert code == 2 and err.strip() == f"logix: error: {tmp_path / 'absent'}: no such directory"
    code, _, err = run_cli(capsys, "self-influence", train, "--pass", "epoch9")
    assert code == 2 and "epoch9" in err and "epoch0" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "export", train, "--ids", "1", "--out", tmp_path / "x.txt")
    assert code == 2 and ".npy or .csv" in err
    code, _, err = run_cli(capsys, "self-influence", train, "--modules", "9")
    assert code == 2 and "'9'" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "info", tmp_path / "empty")
    assert code == 1 and err.startswith("logix: error:") and "manifest.json" in err


# -- info -----------------------------------------------------------------------------------------


def test_info_reports_passes_modules_and_config(capsys, logs):
    train, _, _ = logs
    log = logix.open(train)
    code, out, _ = run_cli(capsys, "info", train, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["schema_version"] == 1 and info["id_kind"] == "int"
    assert info["config"] == {
        "rank": 4,
        "dtype": "float32",
        "projection": "gaussian",
        "seed": 0,
        "statistics": ["ekfac", "raw"],
    }
    assert [(m["name"], m["kind"], m["d_in"], m["d_out"], m["k_in"], m["k_out"]) for m in info["modules"]] == [
        (m.name, m.kind, m.d_in, m.d_out, m.k_in, m.k_out) for m in log.modules.values()
    ]
    assert [m["projected"] for m in info["modules"]] == [["in", "out"], ["in"]]  # d_out = 3 < rank 4
    assert [(p["name"], p["rows"], p["nonfinite"], p["finalized"]) for p in info["passes"]] == [
        ("epoch0", 24, 0, True),
        ("epoch1", 24, 1, True),
    ]
    assert info["passes"][1]["meta"]["lr"] == 0.1
    assert info["passes"][0]["statistics"]["preconditioners"] == ["raw", "kfac", "ekfac"]
    assert [(s["rank"], s["session"], s["committed"]) for s in info["passes"][0]["segments"]] == [(0, 0, 24)]
    assert info["size_bytes"] > 0 and info["ranks"] == [0] and not info["problems"]

    code, out, _ = run_cli(capsys, "info", train)
    assert code == 0
    lines = out.splitlines()
    assert any(line.split()[:5] == ["epoch1", "24", "1", "yes", "1"] for line in lines)
    assert any(line.split()[:7] == ["0", "linear", "7", "5", "4", "4", "0"] for line in lines)
    assert "NOT finalized" not in out and "statistics=ekfac, raw" in out

    code, out, _ = run_cli(capsys, "info", train, "--csv", "--table", "modules")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["module"], r["k_out"]) for r in rows] == [("0", "4"), ("2", "3")]


def test_info_on_a_log_closed_without_finalize_and_on_a_crashed_one(capsys, tmp_path):
    path = tmp_path / "closed"
    write_log(path, make_model(), list(range(15)), passes=("epoch0",))
    # a second session that is closed, not finalized: its pass keeps its rows, has no statistics
    write_log(path, make_model(), list(range(9)), passes=("epoch1",), finalize=False)
    code, out, _ = run_cli(capsys, "info", path)
    assert code == 0
    assert "pass 'epoch1' is NOT finalized: 9 rows committed" in " ".join(out.split())
    assert "closed without run.finalize()" in out and "pass 'epoch0' is NOT" not in out
    info = json.loads(run_cli(capsys, "info", path, "--json")[1])
    assert [(p["name"], p["rows"], p["finalized"]) for p in info["passes"]] == [
        ("epoch0", 15, True),
        ("epoch1", 9, False),
    ]

    # a crash leaves the segment listed without the row count its writer records at close
    manifest = json.loads((path / "manifest.json").read_text())
    for s in manifest["passes"][1]["segments"]:
        s.pop("rows", None)
    (path / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli(capsys, "info", path)
    flat = " ".join(out.split())
    assert code == 0 and "pass 'epoch1' is NOT finalized: 9 rows committed" in flat and "crashed" in flat
    assert run_cli(capsys, "verify", "-q", path)[0] == 0  # unfinalized is not damage
    code, _, err = run_cli(capsys, "self-influence", path, "-p", "ekfac")
    assert code == 2 and "not finalized" in err and "available: identity" in err


# -- verify ---------------------------------------------------------------------------------------


def test_verify_a_sound_log(capsys, logs):
    train, query, _ = logs
    code, out, err = run_cli(capsys, "verify", "-q", train)
    assert code == 0 and err == ""
    assert "2 pass(es), 2 segment(s), 48 committed rows (1 flagged non-finite)" in out
    assert out.strip().endswith(f"OK: {train} is sound")
    code, out, _ = run_cli(capsys, "verify", "-q", query, "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["problems"] == [] and result["checked"]["rows"] == 4


def _truncate_segment(path):
    seg = path / "segments" / "p001-r0-s000.h5"
    with open(seg, "r+b") as f:
        f.truncate(os.path.getsize(seg) // 2)
    return "segments/p001-r0-s000.h5 is truncated"


def _nan_bytes_in_grads(path):
    """Overwrite row 3 of the first pass with 0xFF bytes (a NaN) behind the writer's back."""
    seg = path / "segments" / "p000-r0-s000.h5"
    with h5py.File(seg, "r", swmr=True) as f:
        grads = f["grads"]
        start = grads.id.get_chunk_info(0).byte_offset + 3 * grads.shape[1] * 4
    with open(seg, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * 8)
    return "fail their checksum"


def _delete_statistics(path):
    (path / "statistics" / "p001.h5").unlink()
    return "statistics/p001.h5 is missing"


def _wrong_width(path):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["width"] += 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    return "width"


def _delete_projections(path):
    (path / "projections.h5").unlink()
    return "projections.h5"


def _nan_in_statistics(path):
    with h5py.File(path / "statistics" / "p000.h5", "r+") as f:
        f["2/lambda_star"][0, 0] = np.nan
    return "2/lambda_star holds non-finite numbers"


def _segment_outside_the_log(path):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["passes"][0]["segments"][0]["file"] = "../outside.h5"
    (path / "manifest.json").write_text(json.dumps(manifest))
    return "is not a file under segments/"


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_segment,
        _nan_bytes_in_grads,
        _delete_statistics,
        _wrong_width,
        _delete_projections,
        _nan_in_statistics,
        _segment_outside_the_log,
    ],
)
def test_verify_names_the_damage_and_exits_1(capsys, tmp_path, logs, damage):
    path = damaged_copy(tmp_path, logs)
    expected = damage(path)
    code, out, err = run_cli(capsys, "verify", "-q", path)
    assert code == 1, out
    assert "DAMAGED" in out and expected in out
    assert err.startswith("logix: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    result = json.loads(run_cli(capsys, "verify", "-q", path, "--json")[1])
    assert not result["ok"] and any(expected in p for p in result["problems"])


def test_verify_lists_every_problem_the_library_check_finds(capsys, tmp_path, logs):
    """logix.open stops at the first damaged projection; verify names each (the same check)."""
    path = damaged_copy(tmp_path, logs)
    with h5py.File(path / "projections.h5", "r+") as f:
        del f["0/in"], f["2/in"]
    with pytest.raises(logix.LogFormatError, match="lack 0/in"):
        logix.open(path).projections()
    code, out, _ = run_cli(capsys, "verify", "-q", path)
    assert code == 1
    assert "lack 0/in, a (4, 7) matrix" in out and "lack 2/in, a (4, 6) matrix" in out, out


def test_verify_names_the_row_and_id_of_damaged_data(capsys, tmp_path, logs):
    path = damaged_copy(tmp_path, logs)
    _nan_bytes_in_grads(path)
    code, out, _ = run_cli(capsys, "verify", "-q", path)
    assert code == 1
    # the segment's checksums catch it: the chunk holding row 3 is named, with its ids
    pattern = r"segments/p000-r0-s000.h5: \d+ row\(s\) fail their checksum \(damaged data\): rows (\d+)\.\.(\d+)"
    found = re.search(pattern, out)
    assert found and int(found[1]) <= 3 <= int(found[2]), out


def test_other_commands_on_a_damaged_log_fail_with_one_line(capsys, tmp_path, logs):
    path = damaged_copy(tmp_path, logs)
    _truncate_segment(path)
    for argv in (["self-influence", path], ["export", path, "--all", "--out", tmp_path / "a.npy"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 1 and err.startswith("logix: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
        # HDF5 reads bytes past the end as zeros: the CLI checks each segment's extent, never scoring zeros
    (path / "segments" / "p000-r0-s000.h5").unlink()  # info reads counters only: a missing segment
    code, out, err = run_cli(capsys, "info", path)
    assert code == 1 and "segments/p000-r0-s000.h5 missing" in err and "epoch1" in out


# -- self-influence -------------------------------------------------------------------------------


@pytest.mark.parametrize("preconditioner", ["identity", "raw", "kfac", "ekfac"])
def test_self_influence_equals_the_python_api(capsys, logs, preconditioner):
    train, _, _ = logs
    log = logix.open(train)
    ids, values = log.self_influence(preconditioner).top_k(7)
    code, out, _ = run_cli(capsys, "self-influence", train, "--top", 7, "-p", preconditioner, "--json")
    result = json.loads(out)
    assert code == 0 and result["pass"] == "epoch1" and result["rows"] == 23
    assert [r["id"] for r in result["results"]] == ids.tolist()
    assert [r["value"] for r in result["results"]] == values.tolist()
    assert NAN_ID not in [r["id"] for r in result["results"]]


def test_self_influence_lowest_pass_table_and_csv(capsys, logs):
    train, _, _ = logs
    log = logix.open(train, pass_name="epoch0")
    ids, values = log.self_influence("ekfac").top_k(5, largest=False)
    code, out, _ = run_cli(
        capsys, "self-influence", train, "--pass", "epoch0", "--top", 5, "--lowest", "-p", "ekfac", "--csv"
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [int(r["id"]) for r in rows] == ids.tolist()
    assert [float(r["self_influence"]) for r in rows] == values.tolist()
    code, out, _ = run_cli(capsys, "self-influence", train, "--pass", "epoch0", "--top", 5, "--lowest", "-p", "ekfac")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "id", "self_influence"]
    assert [int(line.split()[1]) for line in lines[1:]] == ids.tolist()
    all_rows = json.loads(run_cli(capsys, "self-influence", train, "--all", "--json")[1])["results"]
    assert len(all_rows) == 23


# -- top ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preconditioner", "mode"), [("identity", "dot"), ("ekfac", "dot"), ("kfac", "relative"), ("raw", "cosine")]
)
def test_top_equals_log_influence_with_a_query_of_the_same_examples(capsys, logs, preconditioner, mode):
    train, query, model = logs
    log = logix.open(train)
    with log.query(model) as q:
        with q.capture(QUERY_IDS):
            F.cross_entropy(model(X[QUERY_IDS]), Y[QUERY_IDS]).backward()
    model.zero_grad()
    expected = log.influence(q, preconditioner, mode=mode, top_k=3, progress=False)
    code, out, _ = run_cli(
        capsys, "top", train, "--query", query, "--top", 3, "-p", preconditioner, "--mode", mode, "--json"
    )
    result = json.loads(out)
    assert code == 0 and result["query_pass"] == "test"
    assert [r["query_id"] for r in result["queries"]] == QUERY_IDS
    for r, row in enumerate(result["queries"]):
        assert [x["id"] for x in row["results"]] == expected.ids[r].tolist()
        np.testing.assert_allclose([x["score"] for x in row["results"]], expected.values[r].numpy(), rtol=1e-5)


def test_top_lowest_table_and_csv(capsys, logs):
    train, query, _ = logs
    log = logix.open(train)
    qlog = logix.open(query)
    q = type("Q", (), {"rows": qlog.rows(), "ids": qlog.ids.tolist()})()
    expected = log.influence(q, "ekfac", top_k=2, largest=False, progress=False)
    code, out, _ = run_cli(capsys, "top", train, "--query", query, "--top", 2, "-p", "ekfac", "--lowest", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 8
    assert [int(r["train_id"]) for r in rows] == expected.ids.reshape(-1).tolist()
    assert [float(r["score"]) for r in rows] == pytest.approx(expected.values.reshape(-1).tolist(), rel=1e-6)
    code, out, _ = run_cli(capsys, "top", train, "--query", query, "--top", 2)
    assert code == 0 and out.splitlines()[0].split() == ["query_id", "rank", "train_id", "score"]
    assert len(out.splitlines()) == 9


@pytest.mark.parametrize(("kwargs", "word"), [({"seed": 1}, "seed"), ({"rank": 3}, "rank")])
def test_top_refuses_a_query_log_written_otherwise(capsys, tmp_path, logs, kwargs, word):
    train, _, model = logs
    other = tmp_path / "other"
    write_log(other, model, QUERY_IDS, passes=("test",), statistics=(), step=False, **kwargs)
    code, _, err = run_cli(capsys, "top", train, "--query", other)
    assert code == 2 and "not a query log" in err and word in err


def test_top_refuses_different_projection_matrices(capsys, tmp_path, logs):
    train, query, _ = logs
    other = tmp_path / "other"
    shutil.copytree(query, other)
    with h5py.File(other / "projections.h5", "r+") as f:
        f["0/in"][0, 0] += 1.0
    code, _, err = run_cli(capsys, "top", train, "--query", other)
    assert code == 2 and "projection 0/in differs" in err


# -- export ---------------------------------------------------------------------------------------


def test_export_npy_rows_and_module_blocks(capsys, tmp_path, logs):
    train, _, _ = logs
    log = logix.open(train, pass_name="epoch0")
    position = {int(i): n for n, i in enumerate(log.ids)}
    wanted = [5, 1, 17]
    code, _, _ = run_cli(capsys, "export", train, "--pass", "epoch0", "--ids", "5,1,17", "--out", tmp_path / "r.npy")
    assert code == 0
    rows = np.load(tmp_path / "r.npy")
    assert rows.dtype == np.float32 and rows.shape == (3, log.width)
    np.testing.assert_array_equal(rows, log.rows().numpy()[[position[i] for i in wanted]])
    assert np.load(tmp_path / "r.ids.npy").tolist() == wanted

    (tmp_path / "ids.txt").write_text("# some ids\n2\n9\n\n4\n")
    code, _, _ = run_cli(
        capsys, "export", "-q", train, "--ids-file", tmp_path / "ids.txt", "--module", "2", "--out", tmp_path / "m.npy"
    )
    assert code == 0
    log = logix.open(train)
    position = {int(i): n for n, i in enumerate(log.ids)}
    blocks = np.load(tmp_path / "m.npy")
    assert blocks.shape == (3, 3, 4)
    np.testing.assert_array_equal(blocks, log.gradients("2").numpy()[[position[i] for i in (2, 9, 4)]])

    code, _, _ = run_cli(capsys, "export", "-q", train, "--all", "--out", tmp_path / "all.npy")
    assert code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), log.rows().numpy())
    assert np.load(tmp_path / "all.ids.npy").tolist() == log.ids.tolist()


def test_export_csv(capsys, tmp_path, logs):
    train, _, _ = logs
    log = logix.open(train)
    position = {int(i): n for n, i in enumerate(log.ids)}
    code, _, _ = run_cli(capsys, "export", "-q", train, "--ids", "3,0", "--out", tmp_path / "r.csv")
    assert code == 0
    with open(tmp_path / "r.csv") as f:
        header, *lines = list(csv.reader(f))
    assert header[0] == "id" and header[1] == "0:0:0" and header[-1] == "2:2:3" and len(header) == 1 + log.width
    assert [int(line[0]) for line in lines] == [3, 0]
    values = np.array([[float(v) for v in line[1:]] for line in lines], dtype=np.float32)
    np.testing.assert_array_equal(values, log.rows().numpy()[[position[3], position[0]]])
    code, out, _ = run_cli(capsys, "export", train, "--ids", "3", "--module", "0", "--out", "-")
    header, line = list(csv.reader(io.StringIO(out)))
    assert code == 0 and len(header) == 17
    np.testing.assert_array_equal(np.array(line[1:], dtype=np.float32), log.gradients("0")[position[3]].reshape(-1))


def test_export_unknown_and_flagged_ids_are_named(capsys, tmp_path, logs):
    train, _, _ = logs
    code, _, err = run_cli(capsys, "export", train, "--ids", "1,99,100", "--out", tmp_path / "x.npy")
    assert code == 2 and "2 id(s) are not in pass 'epoch1'" in err and "99, 100" in err
    assert not (tmp_path / "x.npy").exists()
    code, _, err = run_cli(capsys, "export", train, "--ids", f"1,{NAN_ID}", "--out", tmp_path / "x.npy")
    assert code == 2 and "flagged non-finite" in err and str(NAN_ID) in err
    code, _, err = run_cli(capsys, "export", train, "--ids", "a,b", "--out", tmp_path / "x.npy")
    assert code == 2 and "not an integer" in err


def test_string_ids_and_float16_rows(capsys, tmp_path):
    path = tmp_path / "str"
    model = make_model()
    names = [f"ex{i}" for i in range(8)]
    with logix.init(path, rank=4, dtype="float16") as run:
        run.watch(model)
        for start in (0, 4):
            with run.capture(names[start : start + 4]):
                F.cross_entropy(model(X[start : start + 4]), Y[start : start + 4]).backward()
            model.zero_grad()
    info = json.loads(run_cli(capsys, "info", path, "--json")[1])
    assert info["id_kind"] == "str" and info["bytes_per_row"] == 2 * info["width"]
    assert run_cli(capsys, "verify", "-q", path)[0] == 0
    log = logix.open(path)
    code, _, _ = run_cli(capsys, "export", "-q", path, "--ids", "ex6,ex1", "--out", tmp_path / "s.npy")
    assert code == 0 and np.load(tmp_path / "s.ids.npy").tolist() == ["ex6", "ex1"]
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), log.rows().numpy()[[6, 1]])
    result = json.loads(run_cli(capsys, "self-influence", path, "--top", 3, "--json")[1])
    ids, values = log.self_influence().top_k(3)
    assert [r["id"] for r in result["results"]] == ids.tolist() and all(isinstance(i, str) for i in ids.tolist())
    code, _, err = run_cli(capsys, "export", path, "--ids", "ex1,nope", "--out", tmp_path / "s.npy")
    assert code == 2 and "nope" in err


# -- entry points ---------------------------------------------------------------------------------


def test_python_dash_m_runs_main(capsys, monkeypatch, logs):
    monkeypatch.setattr(sys, "argv", ["logix", "verify", "-q", str(logs[0])])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("logix", run_name="__main__")
    assert exit_.value.code == 0 and "is sound" in capsys.readouterr().out


def test_console_script_in_a_subprocess(tmp_path, logs):
    """The installed entry point (or python -m logix without it): JSON on stdout, exit status 1 and one
    line on stderr for a damaged log."""
    path = damaged_copy(tmp_path, logs)
    _delete_statistics(path)
    script = Path(sys.executable).with_name("logix")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "logix"]
    done = subprocess.run(command + ["verify", str(path), "--json"], capture_output=True, text=True, timeout=300)
    result = json.loads(done.stdout)
    assert done.returncode == 1 and not result["ok"] and result["checked"]["rows"] == 48
    assert done.stderr.startswith("logix: error:") and "Traceback" not in done.stderr


def test_info_and_verify_take_pass(capsys, logs):
    train, _, _ = logs
    code, out, _ = run_cli(capsys, "info", train, "--pass", "epoch1", "--json")
    info = json.loads(out)
    assert code == 0 and [p["name"] for p in info["passes"]] == ["epoch1"] and info["passes"][0]["nonfinite"] == 1
    code, out, _ = run_cli(capsys, "info", train, "--pass", "epoch0")
    assert code == 0 and "epoch0" in out and "epoch1" not in out
    code, out, _ = run_cli(capsys, "verify", train, "--pass", "epoch0")
    assert code == 0 and "checked 1 pass(es), 1 segment(s), 24 committed rows" in out
    for command in ("info", "verify"):
        code, _, err = run_cli(capsys, command, train, "--pass", "epoch7")
        assert code == 2 and err.count("\n") == 1
        assert "no pass named 'epoch7'" in err and "['epoch0', 'epoch1']" in err, err


def test_a_reader_that_closes_the_pipe_early_is_not_an_error(tmp_path):
    """`logix export ... --out - | head` stops quietly with status 0: a closed pipe is not a damaged log."""
    path = tmp_path / "big"  # megabytes of CSV: far more than a pipe buffers
    model = nn.Sequential(nn.Linear(6, 200))
    with logix.init(path, rank="full") as run:
        run.watch(model)
        for start in range(0, 600, 100):
            with run.capture(list(range(start, start + 100))):
                model(torch.randn(100, 6)).pow(2).sum().backward()
    script = Path(sys.executable).with_name("logix")
    logix_cmd = str(script) if script.exists() else f"{sys.executable} -m logix"
    for command in (f"export {path} --all --out -", f"export {path} --all --module 0 --out -"):
        pipeline = f"{logix_cmd} {command} 2>{tmp_path}/err | head -c 10; exit ${{PIPESTATUS[0]}}"
        done = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=300)
        err = (tmp_path / "err").read_text()
        assert done.returncode == 0 and len(done.stdout) == 10 and err == "", (command, done.returncode, err)


def test_scoring_commands_choose_the_curvature(tmp_path, capsys):
    """--curvature own / sampled / auto reach the scores; sampled without a curvature pass is a clear error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with logix.init(tmp_path / "log", rank="full", statistics="ekfac") as run:
        run.watch(model)
        run.start_pass("train")
        with run.capture(list(range(10))):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad()
        run.start_pass("train/curvature", curvature_for="train")
        with run.capture(list(range(10))):
            logits = model(x)
            torch.nn.functional.cross_entropy(logits, logix.sampled_labels(logits, torch.Generator())).backward()
        model.zero_grad()
    path = tmp_path / "log"
    log = logix.open(path)
    for curvature in ("auto", "own", "sampled"):
        out = json.loads(run_cli(capsys, "self-influence", path, "--all", "--json", "--curvature", curvature)[1])
        assert out["preconditioner"] == "ekfac" and out["curvature"] == curvature
        want = log.self_influence("ekfac", curvature=curvature)
        got = {r["id"]: r["value"] for r in out["results"]}
        np.testing.assert_allclose([got[i] for i in want.ids.tolist()], want.values.numpy(), rtol=1e-6)
    own = json.loads(run_cli(capsys, "self-influence", path, "--all", "--json", "--curvature", "own")[1])
    assert own["results"] != out["results"]  # the two curvatures give other values
    code, _, err = run_cli(capsys, "self-influence", path, "--pass", "train/curvature", "--curvature", "sampled")
    assert code != 0 and "no sampled-label curvature" in err


def test_top_aggregate_ranks_train_examples_for_the_whole_query_set(capsys, tmp_path, logs):
    """--aggregate gives the library's aggregate influence; --ids-out writes the chosen ids, which
    `logix export --ids-file` reads back."""
    train, query, _ = logs
    log, qlog = logix.open(train), logix.open(query)
    q = type("Q", (), {"rows": qlog.rows(), "ids": qlog.ids.tolist()})()
    for reduce in ("sum", "mean"):
        expected = log.influence(q, "ekfac", aggregate=reduce, top_k=5, progress=False)
        ids_file = tmp_path / f"{reduce}.txt"
        code, out, _ = run_cli(
            capsys, "top", train, "--query", query, "--top", 5, "-p", "ekfac", "--aggregate", reduce,
            "--ids-out", ids_file, "--json",
        )  # fmt: skip
        result = json.loads(out)
        assert code == 0 and result["aggregate"] == reduce
        [row] = result["queries"]
        assert row["query_id"] == reduce
        assert [x["id"] for x in row["results"]] == expected.ids[0].tolist()
        np.testing.assert_allclose([x["score"] for x in row["results"]], expected.values[0].numpy(), rtol=1e-5)
        assert [int(line) for line in ids_file.read_text().split()] == expected.ids[0].tolist()
    code, _, _ = run_cli(capsys, "export", train, "--ids-file", tmp_path / "sum.txt", "--out", tmp_path / "rows.npy")
    exported = np.load(tmp_path / "rows.npy")
    assert code == 0 and exported.shape == (5, log.width)


def test_self_influence_ids_out(capsys, tmp_path, logs):
    train, _, _ = logs
    ids, _ = logix.open(train).self_influence("kfac").top_k(4)
    code, _, _ = run_cli(capsys, "self-influence", train, "--top", 4, "-p", "kfac", "--ids-out", tmp_path / "ids")
    assert code == 0 and [int(line) for line in (tmp_path / "ids").read_text().split()] == ids.tolist()
    code, _, err = run_cli(capsys, "self-influence", train, "--top", 4, "--ids-out", tmp_path / "no" / "such" / "f")
    assert code != 0 and "cannot write --ids-out" in err
