"""Curvature passes: a pass's statistics from gradients at labels drawn from the model (the true
Fisher, the GGN for cross-entropy) instead of its own rows (the empirical Fisher).

References in float64 with torch.func: per-example gradients at the drawn labels, and the exact
GGN mean_i J_i^T (diag p_i - p_i p_i^T) J_i per module block.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import logix
from logix import ConfigError, LogFormatError
from logix.across_training import training_passes
from logix.curvature import load_curvature

N, D_IN, D_HID, CLASSES = 12, 4, 3, 3
G = torch.Generator().manual_seed(3)
X = torch.randn(N, D_IN, generator=G, dtype=torch.float64)
Y = torch.randint(0, CLASSES, (N,), generator=G)
XQ = torch.randn(2, D_IN, generator=G, dtype=torch.float64)
YQ = torch.tensor([0, 2])


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, CLASSES)).double()
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # confident predictions: the empirical and the true Fisher differ
    return model


def log_with_curvature_pass(path, draws: int = 1, statistics=("raw", "ekfac"), earlier: bool = False):
    """A pass "train" at the data's labels, then its curvature pass at `draws` labels per example
    drawn from the model; returns the model and the drawn labels (draws, N). With `earlier`, a pass
    "early" comes first (the same parameters: what matters is that "train" comes after it)."""
    model = make_model()
    generator = torch.Generator().manual_seed(11)
    drawn = []
    with logix.init(path, rank="full", statistics=statistics) as run:
        run.watch(model)
        for name in ("early", "train") if earlier else ("train",):
            run.start_pass(name, lr=0.5)
            with run.capture(list(range(N))):
                F.cross_entropy(model(X), Y).backward()
            model.zero_grad()
        run.start_pass("train/fisher", curvature_for="train")
        for d in range(draws):
            with run.capture([d * N + i for i in range(N)]):
                logits = model(X)
                labels = logix.sampled_labels(logits, generator)
                F.cross_entropy(logits, labels).backward()
            model.zero_grad()
            drawn.append(labels)
    return model, torch.stack(drawn)


def per_example_grads(model, x, y) -> dict[str, torch.Tensor]:
    """{module name: (n, d_out * (d_in + 1))} each example's gradient, weight then bias as logix lays it out."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {m: torch.cat([g[f"{m}.weight"], g[f"{m}.bias"][:, :, None]], dim=2).reshape(len(x), -1) for m in ("0", "2")}


def exact_ggn(model) -> dict[str, torch.Tensor]:
    """{module: mean_i J_i^T (diag p_i - p_i p_i^T) J_i} for that module's parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, X)
    probs = torch.softmax(model(X), dim=1).detach()
    hess = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    out = {}
    for m in ("0", "2"):
        j = torch.cat([jac[f"{m}.weight"], jac[f"{m}.bias"][..., None]], dim=3).reshape(N, CLASSES, -1)
        out[m] = torch.einsum("ncp,ncd,ndq->pq", j, hess, j) / N
    return out


def dense_raw(view, curvature: str) -> dict[str, torch.Tensor]:
    blocks = load_curvature(view, "raw", curvature=curvature)
    return {name: c.vec_f @ torch.diag(c.values) @ c.vec_f.T for name, c in blocks.items()}


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def query(log, model):
    with log.query(model) as q:
        with q.capture(["a", "b"]):
            F.cross_entropy(model(XQ), YQ).backward()
    model.zero_grad()
    return q


def test_sampled_labels_follow_the_softmax_and_leave_the_global_rng_alone():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]], dtype=torch.float64).repeat(20000, 1)
    state = torch.get_rng_state()
    labels = logix.sampled_labels(logits, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert labels.shape == (40000,) and labels.dtype == torch.int64
    for row in (0, 1):
        share = torch.bincount(labels[row::2], minlength=3).double() / 20000
        assert torch.allclose(share, torch.softmax(logits[row], 0), atol=0.012)
    sequence = logix.sampled_labels(torch.randn(2, 5, 7, requires_grad=True))
    assert sequence.shape == (2, 5) and not sequence.requires_grad
    with pytest.raises(ConfigError, match="float tensor"):
        logix.sampled_labels(torch.ones(3, dtype=torch.long))


def test_a_pass_takes_its_curvature_from_its_curvature_pass(tmp_path):
    """auto and sampled: the second moment of the curvature pass's rows (exactly, per module);
    own: the pass's own rows, the empirical Fisher."""
    model, drawn = log_with_curvature_pass(tmp_path / "log")
    log = logix.open(tmp_path / "log")
    assert log.current.name == "train"  # the curvature pass is never the default pass
    assert log.curvature_pass().name == "train/fisher"
    at_labels = per_example_grads(model, X, Y)
    at_drawn = per_example_grads(model, X, drawn[0])
    for curvature in ("auto", "sampled"):
        got = dense_raw(log, curvature)
        for name, g in at_drawn.items():
            assert relative(got[name], g.T @ g / N) < 1e-5
    got = dense_raw(log, "own")
    for name, g in at_labels.items():
        assert relative(got[name], g.T @ g / N) < 1e-5
        assert relative(got[name], at_drawn[name].T @ at_drawn[name] / N) > 0.1


def test_labels_drawn_from_the_model_estimate_the_ggn(tmp_path):
    """More draws per example converge on the exact GGN; the empirical Fisher stays away from it."""
    model, _ = log_with_curvature_pass(tmp_path / "log", draws=300, statistics="raw")
    log = logix.open(tmp_path / "log")
    ggn = exact_ggn(model)
    sampled, own = dense_raw(log, "sampled"), dense_raw(log, "own")
    for name in ggn:
        assert relative(sampled[name], ggn[name]) < 0.06
        assert relative(own[name], ggn[name]) > 3 * relative(sampled[name], ggn[name])


def test_scores_and_self_influence_use_the_curvature_pass_and_say_so(tmp_path):
    model, drawn = log_with_curvature_pass(tmp_path / "log")
    log = logix.open(tmp_path / "log")
    q = query(log, model)
    auto = log.influence(q, "ekfac")
    torch.testing.assert_close(auto.values, log.influence(q, "ekfac", curvature="sampled").values, rtol=0, atol=0)
    assert relative(auto.values, log.influence(q, "ekfac", curvature="own").values) > 1e-3
    # self-influence with raw, against the dense damped true-Fisher estimate per module
    at_labels, at_drawn = per_example_grads(model, X, Y), per_example_grads(model, X, drawn[0])
    want = torch.zeros(N, dtype=torch.float64)
    for name, g in at_labels.items():
        fisher = at_drawn[name].T @ at_drawn[name] / N
        damped = fisher + 0.1 * torch.diagonal(fisher).mean() * torch.eye(len(fisher), dtype=torch.float64)
        want += (g * torch.linalg.solve(damped, g.T).T).sum(dim=1)
    got = log.self_influence("raw")
    assert relative(got.values[np.argsort(got.ids)], want) < 1e-5
    # finalize stored the pass's own self-influence: read back only when own curvature is asked for
    own = log.self_influence("raw", curvature="own")
    assert relative(own.values, got.values) > 1e-3
    with pytest.raises(ConfigError, match="curvature must be one of"):
        log.self_influence("raw", curvature="true")


def test_attribution_across_training_skips_curvature_passes_and_uses_them(tmp_path):
    """Source carries the query side back through "train" with its curvature: the scores of the
    earlier pass depend on which curvature that is."""
    model, _ = log_with_curvature_pass(tmp_path / "log", statistics="ekfac", earlier=True)
    log = logix.open(tmp_path / "log")
    assert training_passes(log, None) == ["early", "train"]
    with pytest.raises(ConfigError, match="curvature passes"):
        training_passes(log, ["early", "train/fisher"])

    def queries(q, m):
        with q.capture(["a", "b"]):
            F.cross_entropy(m(XQ), YQ).backward()

    auto = log.influence_across_training(model, queries)
    own = log.influence_across_training(model, queries, curvature="own")
    assert sorted(auto.train_ids.tolist()) == list(range(N))
    assert relative(auto.values, own.values) > 1e-3
    with pytest.raises(LogFormatError, match="pass 'early' .* no sampled-label curvature"):
        log.influence_across_training(model, queries, curvature="sampled")  # every pass needs one then
    only_train = log.influence_across_training(model, queries, passes=["train"], curvature="sampled")
    torch.testing.assert_close(
        only_train.values, log.influence_across_training(model, queries, passes=["train"]).values, rtol=0, atol=0
    )


def test_curvature_pass_misuse_is_a_clear_error(tmp_path):
    model = make_model()
    with logix.init(tmp_path / "plain", rank="full") as run:
        run.watch(model)
        run.start_pass("train")
        with pytest.raises(ConfigError, match="needs statistics"):
            run.start_pass("c", curvature_for="train")
    with logix.init(tmp_path / "log", rank="full", statistics="ekfac") as run:
        run.watch(model)
        run.start_pass("train")
        with run.capture(list(range(N))):
            F.cross_entropy(model(X), Y).backward()
        with pytest.raises(ConfigError, match="names no pass"):
            run.start_pass("c", curvature_for="nope")
        run.start_pass("c", curvature_for="train")
        with pytest.raises(ConfigError, match="itself a curvature pass"):
            run.start_pass("c2", curvature_for="c")
        with pytest.raises(ConfigError, match="already has a curvature pass"):
            run.start_pass("c3", curvature_for="train")
    log = logix.open(tmp_path / "log")
    with pytest.raises(LogFormatError, match="not finalized|no sampled-label curvature"):
        log.select("c").influence(query(log, model), "ekfac", curvature="sampled")
    with pytest.raises(LogFormatError, match="no sampled-label curvature"):
        logix.open(tmp_path / "plain").influence(query(log, model), "ekfac", curvature="sampled")
    with pytest.raises(ConfigError, match="curvature must be one of"):
        log.influence(query(log, model), "ekfac", curvature="fisher")
