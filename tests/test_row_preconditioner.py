"""preconditioner="row": one damped Fisher over the whole row (all modules together), estimated
from a curvature pass that draws several labels per example from the model.

References in float64 with torch.func: per-example gradients at the data's labels and at each
drawn label (rank "full", so a row is the gradient itself), the dense Fisher over all parameters
F = mean over (draw, example) of g g^T, and q^T (F + lambda I)^-1 g with lambda = f trace(F) / D.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import logix
from logix import ConfigError, LogFormatError
from logix.cli.main import main
from logix.config import ROW_MAX_WIDTH
from logix.pass_ids import PassIds

N, D_IN, D_HID, CLASSES, DRAWS = 12, 4, 3, 3, 5
G = torch.Generator().manual_seed(5)
X = torch.randn(N, D_IN, generator=G, dtype=torch.float64)
Y = torch.randint(0, CLASSES, (N,), generator=G)
XQ = torch.randn(3, D_IN, generator=G, dtype=torch.float64)
YQ = torch.tensor([0, 2, 1])
COLUMNS = {
    "0": slice(0, D_HID * (D_IN + 1)),
    "2": slice(D_HID * (D_IN + 1), D_HID * (D_IN + 1) + CLASSES * (D_HID + 1)),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, CLASSES)).double()
    with torch.no_grad():
        model[2].weight.mul_(3.0)
    return model


def write_log(path, statistics=("ekfac", "row"), draws: int = DRAWS, curvature_pass: bool = True):
    """Pass "train" at the data's labels, then its curvature pass: the same ids once per draw.
    Returns the model and the drawn labels (draws, N)."""
    model = make_model()
    generator = torch.Generator().manual_seed(11)
    drawn = []
    with logix.init(path, rank="full", statistics=statistics) as run:
        run.watch(model)
        run.start_pass("train")
        for start in (0, 7):  # two batches
            ids = list(range(start, min(start + 7, N)))
            with run.capture(ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
            model.zero_grad()
        if curvature_pass:
            run.start_pass("train/fisher", curvature_for="train")
            for _ in range(draws):
                with run.capture(list(range(N))):
                    logits = model(X)
                    labels = logix.sampled_labels(logits, generator)
                    F.cross_entropy(logits, labels).backward()
                model.zero_grad()
                drawn.append(labels)
    return model, torch.stack(drawn) if drawn else None


def grads(model, x, y) -> torch.Tensor:
    """(n, D) each example's gradient, laid out as logix's row: per module, weight then bias column."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    blocks = [torch.cat([g[f"{m}.weight"], g[f"{m}.bias"][:, :, None]], dim=2).reshape(len(x), -1) for m in ("0", "2")]
    return torch.cat(blocks, dim=1)


def sampled_fisher(model, drawn) -> torch.Tensor:
    rows = torch.cat([grads(model, X, labels) for labels in drawn])
    return rows.T @ rows / len(rows)


def scores(fisher, queries, train, factor=0.3, damping=None) -> torch.Tensor:
    lam = factor * torch.trace(fisher) / len(fisher) if damping is None else damping
    damped = fisher + lam * torch.eye(len(fisher), dtype=torch.float64)
    return torch.linalg.solve(damped, queries.T).T @ train.T


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def query(log, model):
    with log.query(model) as q:
        with q.capture(["a", "b", "c"]):
            F.cross_entropy(model(XQ), YQ).backward()
    model.zero_grad()
    return q


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    path = tmp_path_factory.mktemp("row") / "log"
    model, drawn = write_log(path)
    return path, model, drawn


def test_a_curvature_pass_keeps_every_draw_of_an_id(logged):
    path, _, _ = logged
    fisher_pass = logix.open(path, pass_name="train/fisher")
    assert len(fisher_pass) == DRAWS * N
    assert Counter(fisher_pass.ids.tolist()) == {i: DRAWS for i in range(N)}
    assert main(["verify", "-q", str(path)]) == 0  # repeated ids are draws there, not damage


def test_row_scores_equal_the_dense_damped_fisher_over_all_parameters(logged):
    path, model, drawn = logged
    log = logix.open(path)
    q = query(log, model)
    fisher = sampled_fisher(model, drawn)
    train, queries = grads(model, X, Y), grads(model, XQ, YQ)
    got = log.influence(q, "row")
    order = np.argsort(got.train_ids)
    assert relative(got.values[:, order], scores(fisher, queries, train)) < 1e-5
    # auto takes row where a curvature pass has it; the pass's own rows (empirical Fisher) otherwise
    torch.testing.assert_close(log.influence(q).values, got.values, rtol=0, atol=0)
    own = log.influence(q, "row", curvature="own")
    assert relative(own.values[:, order], scores(train.T @ train / N, queries, train)) < 1e-5
    assert relative(own.values, got.values) > 1e-2
    assert relative(log.influence(q, curvature="own").values, log.influence(q, "ekfac", curvature="own").values) == 0
    # damping: another factor, an absolute value; one number for the whole row only
    factor = log.influence(q, "row", damping_factor=1.0)
    assert relative(factor.values[:, order], scores(fisher, queries, train, factor=1.0)) < 1e-5
    absolute = log.influence(q, "row", damping=1e-3)
    assert relative(absolute.values[:, order], scores(fisher, queries, train, damping=1e-3)) < 1e-5
    with pytest.raises(ConfigError, match="one number"):
        log.influence(q, "row", damping={"0": 1e-3, "2": 1e-3})


def test_row_over_some_modules_uses_their_block_of_the_fisher(logged):
    path, model, drawn = logged
    log = logix.open(path)
    cols = COLUMNS["2"]
    fisher = sampled_fisher(model, drawn)[cols, cols]
    got = log.influence(query(log, model), "row", modules=["2"])
    want = scores(fisher, grads(model, XQ, YQ)[:, cols], grads(model, X, Y)[:, cols])
    assert relative(got.values[:, np.argsort(got.train_ids)], want) < 1e-5


def test_row_self_influence_and_what_finalize_stored(logged):
    path, model, drawn = logged
    log = logix.open(path)
    train = grads(model, X, Y)
    got = log.self_influence("row")
    order = np.argsort(got.ids)
    assert relative(got.values[order], torch.diagonal(scores(sampled_fisher(model, drawn), train, train))) < 1e-5
    # finalize stored the own-curvature values under row's default damping; read back as computed
    stored = log.self_influence("row", curvature="own")
    recomputed = log.self_influence("row", damping_factor=0.30000001, curvature="own")
    own = torch.diagonal(scores(train.T @ train / N, train, train))
    assert relative(stored.values[order], own) < 1e-5 and relative(recomputed.values, stored.values) < 1e-6
    assert relative(log.self_influence("row", damping_factor=0.1, curvature="own").values, stored.values) > 1e-3


def test_the_cli_scores_with_row(logged, capsys):
    path, _, _ = logged
    ids, values = logix.open(path).self_influence("row").top_k(5)
    assert main(["self-influence", str(path), "--top", "5", "-p", "row", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preconditioner"] == "row"
    assert [r["id"] for r in result["results"]] == ids.tolist()
    assert np.allclose([r["value"] for r in result["results"]], values.numpy(), rtol=1e-12)


def test_without_row_statistics_row_is_refused_and_auto_keeps_ekfac(tmp_path):
    model, _ = write_log(tmp_path / "log", statistics="ekfac")
    log = logix.open(tmp_path / "log")
    q = query(log, model)
    with pytest.raises(LogFormatError, match="statistics=.*'row'"):
        log.influence(q, "row")
    torch.testing.assert_close(log.influence(q).values, log.influence(q, "ekfac").values, rtol=0, atol=0)


def test_rows_too_wide_for_a_dense_fisher_are_refused_before_anything_is_logged(tmp_path):
    wide = nn.Linear(100, 100)  # 100 x 101 numbers per row at rank full
    run = logix.init(tmp_path / "wide", rank="full", statistics=["ekfac", "row"])
    with pytest.raises(ConfigError, match=f"at most {ROW_MAX_WIDTH} numbers.*10100"):
        run.watch(wide)
    run.close()
    # nothing was logged under the refused config: the same path takes a new one
    with logix.init(tmp_path / "wide", rank=16, statistics=["ekfac", "row"]) as again:
        again.watch(wide)
        with again.capture([0, 1]):
            wide(torch.randn(2, 100)).sum().backward()
    assert logix.open(tmp_path / "wide").config.rank == 16 and len(logix.open(tmp_path / "wide")) == 2
    with pytest.raises(ConfigError, match="row_bytes=40000 allows 10000"):
        logix.init(tmp_path / "auto", rank="auto", row_bytes=40000, projection="pca", statistics="row")


def test_a_resumed_curvature_pass_skips_each_id_as_often_as_it_had_rows():
    ids = PassIds("error", distributed=False, process_index=0)
    ids.begin(Counter({1: 2, 2: 1}), rows_only=Counter({3: 1}), draws=True)
    assert ids.check([1, 2, 3], [[1, 2, 3]]) == [False, False, True]
    assert ids.rows_to_write([1, 2, 3], [False, False, True]) == ([False, False, False], [3])
    assert ids.check([1, 2, 3], [[1, 2, 3]]) == [False, True, True]
    assert ids.rows_to_write([1, 2, 3], [False, True, True]) == ([False, True, True], [])
    for _ in range(3):  # used up: every capture is one more draw, repeats within a batch too
        assert ids.check([1, 1, 2, 3], [[1, 1, 2, 3]]) is None
        ids.wrote([1, 1, 2, 3])
    assert ids.skipped == 4


@pytest.mark.parametrize("damage", ["missing", "non-finite"])
def test_verify_names_a_damaged_whole_row_fisher(tmp_path, capsys, damage):
    """logix verify reads the whole row's Fisher as scoring would, and names what is wrong with it."""
    import h5py

    write_log(tmp_path / "log", statistics="row", curvature_pass=False)
    log = logix.open(tmp_path / "log")
    with h5py.File(tmp_path / "log" / log.statistics_files["train"], "r+") as f:
        if damage == "missing":
            del f["whole row/fisher_vec"]
        else:
            f["whole row/fisher_eig"][0] = np.nan
    assert main(["verify", "-q", str(tmp_path / "log")]) == 1
    out = capsys.readouterr().out
    assert "whole row/fisher_" in out and ("missing" in out if damage == "missing" else "non-finite" in out)
    with pytest.raises(LogFormatError, match="whole row/fisher_"):
        logix.open(tmp_path / "log").influence(query(logix.open(tmp_path / "log"), make_model()), "row")
