"""Attribution across training, against exact references computed in float64 with torch.func.

A tiny MLP is trained with minibatch SGD while logix logs it (the training is what it would be
without logix). The references use the parameters each step started from, saved on the way:

* TracIn-ideal: sum over the steps k that used example i of eta_k g_q(theta_k) . g_i(theta_k);
* the exact unrolled influence: -d L_q(theta_T) / d eps_i, with eps_i * loss_i added to every
  batch loss that holds i, differentiated through the whole optimisation;
* Source's formula, evaluated densely from the same curvature logix stored.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import logix
from logix import ConfigError, LogFormatError, across_training
from logix.across_training import Segment, segments, step_runs
from logix.training_record import LR_ENTRIES, add_step_lr

N, B, D_IN, D_HID, CLASSES, Q = 16, 2, 4, 3, 2, 3
STEPS_PER_EPOCH = N // B
G = torch.Generator().manual_seed(7)
X = torch.randn(N, D_IN, generator=G, dtype=torch.float64)
Y = torch.randint(0, CLASSES, (N,), generator=G)
XQ = torch.randn(Q, D_IN, generator=G, dtype=torch.float64)
YQ = torch.randint(0, CLASSES, (Q,), generator=G)
ORDER = [torch.randperm(N, generator=torch.Generator().manual_seed(e)).tolist() for e in range(2)]


def make_model(single_layer: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if single_layer:
        return nn.Sequential(nn.Linear(D_IN, CLASSES)).double()
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, CLASSES)).double()


def batches(epochs: int = 2):
    """(step, ids) of every step: minibatches of B, a fixed shuffle per epoch."""
    step = 0
    for e in range(epochs):
        for start in range(0, N, B):
            yield step, ORDER[e][start : start + B]
            step += 1


def lr_at(step: int) -> float:
    return 0.5 * (1 - step / 40)  # a decaying schedule: passes differ in their learning rate


def train_and_log(
    path, steps_per_pass: int, epochs: int = 2, single_layer=False, statistics=None, momentum=0.0, tensor_lr=False
):
    """Train with SGD, one pass every `steps_per_pass` steps; returns the model, the parameters each
    step started from, and {pass name: the model at the start of that pass}. tensor_lr: the
    optimizer holds its learning rate as a tensor (the log then has no per-step rates)."""
    model = make_model(single_layer)
    lr = torch.tensor(lr_at(0), dtype=torch.float64) if tensor_lr else lr_at(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    thetas, starts = [], {}
    run = logix.init(path, rank="full", statistics=statistics)
    run.watch(model, optimizer=opt)
    for step, ids in batches(epochs):
        if step % steps_per_pass == 0:
            name = f"p{step // steps_per_pass}"
            run.start_pass(name)
            starts[name] = copy.deepcopy(model)
        for group in opt.param_groups:
            if tensor_lr:
                group["lr"].fill_(lr_at(step))
            else:
                group["lr"] = lr_at(step)
        thetas.append({k: v.detach().clone() for k, v in model.named_parameters()})
        with run.capture(ids):
            F.cross_entropy(model(X[ids]), Y[ids]).backward()
        opt.step()
        opt.zero_grad()
    run.finalize()
    return model, thetas, starts


def queries(q, model):
    with q.capture(list(range(100, 100 + Q))):
        F.cross_entropy(model(XQ), YQ).backward()


def per_example_grads(model, params, x, y) -> torch.Tensor:
    """(n, P) float64 gradients of each example's own loss at `params`."""

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1)


def tracin_ideal(model, thetas) -> torch.Tensor:
    out = torch.zeros(Q, N, dtype=torch.float64)
    for step, ids in batches(len(thetas) // STEPS_PER_EPOCH):
        gq = per_example_grads(model, thetas[step], XQ, YQ)
        gi = per_example_grads(model, thetas[step], X[ids], Y[ids])
        out[:, ids] += lr_at(step) * gq @ gi.T
    return out


def exact_unrolled(model, epochs: int = 2, momentum: float = 0.0) -> torch.Tensor:
    """-dL_q(theta_T)/d eps_i through the whole of training (eps_i * loss_i added where i is used)."""
    initial = make_model(len(list(model.parameters())) == 2)
    start = {k: v.detach().clone().requires_grad_() for k, v in initial.named_parameters()}
    eps = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    params = dict(start)
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    for step, ids in batches(epochs):
        losses = F.cross_entropy(functional_call(model, params, (X[ids],)), Y[ids], reduction="none")
        total = losses.mean() + (eps[ids] * losses).sum()
        grads = torch.autograd.grad(total, list(params.values()), create_graph=True)
        new = {}
        for (k, p), g in zip(params.items(), grads):
            velocity[k] = momentum * velocity[k] + g if step else g  # torch.optim.SGD's first step
            new[k] = p - lr_at(step) * velocity[k]
        params = new
    out = torch.zeros(Q, N, dtype=torch.float64)
    for q in range(Q):
        lq = F.cross_entropy(functional_call(model, params, (XQ[q : q + 1],)), YQ[q : q + 1])
        out[q] = -torch.autograd.grad(lq, eps, retain_graph=True)[0]
    return out


def dense(scores) -> torch.Tensor:
    """Scores in (Q, N) float64, train ids 0..N-1 in order."""
    out = torch.full((Q, N), float("nan"), dtype=torch.float64)
    out[:, torch.from_numpy(np.asarray(scores.train_ids, dtype=np.int64))] = scores.values.double()
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def test_tracin_with_a_pass_per_step_is_tracin_ideal(tmp_path):
    model, thetas, starts = train_and_log(tmp_path / "log", steps_per_pass=1)
    log = logix.open(tmp_path / "log")
    assert [p.meta["training"]["steps"] for p in log.passes] == [1] * len(thetas)
    assert [p.meta["training"]["lr_sum"] for p in log.passes] == pytest.approx([lr_at(k) for k in range(len(thetas))])
    got = log.influence_across_training(model, queries, method="tracin", models=starts)
    assert got.values.shape == (Q, N) and np.array_equal(got.query_ids, np.arange(100, 100 + Q))
    assert relative(dense(got), tracin_ideal(model, thetas)) < 1e-6


def test_tracin_cp_converges_to_tracin_ideal_as_checkpoints_get_denser(tmp_path):
    errors = []
    for every in (8, 4, 2, 1):
        model, thetas, starts = train_and_log(tmp_path / f"every{every}", steps_per_pass=every)
        log = logix.open(tmp_path / f"every{every}")
        assert len(log.passes) == 16 // every
        got = log.influence_across_training(model, queries, method="tracin", models=starts)
        errors.append(relative(dense(got), tracin_ideal(model, thetas)))
    print("TracIn-CP against TracIn-ideal, passes of 8, 4, 2, 1 steps:", [f"{e:.3g}" for e in errors])
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-3 and errors[-1] < 1e-6, errors


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_tracin_weighs_each_row_by_the_learning_rate_of_its_step(tmp_path, momentum):
    """TracIn-CP from the log's rows, densely: sum over passes of g_q(theta_p) . g_i^p x
    eta_k / (1 - m), eta_k the learning rate of the step k that used the row."""
    model, _, starts = train_and_log(tmp_path / "log", steps_per_pass=4, momentum=momentum)
    log = logix.open(tmp_path / "log")
    got = dense(log.influence_across_training(model, queries, method="tracin", models=starts))
    want = torch.zeros(Q, N, dtype=torch.float64)
    for name, at in starts.items():
        view = log.select(name)
        rates = torch.tensor([lr_at(k) / (1 - momentum) for k in view.steps.tolist()], dtype=torch.float64)
        ids = torch.from_numpy(view.ids.astype(np.int64))
        want[:, ids] += query_rows(log, at) @ (view.rows().double() * rates[:, None]).T
    assert relative(got, want) < 1e-6


def test_tracin_loads_each_pass_checkpoint_and_leaves_the_model_as_given(tmp_path):
    model, thetas, starts = train_and_log(tmp_path / "log", steps_per_pass=4)
    log = logix.open(tmp_path / "log")
    final = copy.deepcopy(model.state_dict())
    loaded = []

    def load(info, into):
        loaded.append(info.name)
        into.load_state_dict(starts[info.name].state_dict())

    by_load = log.influence_across_training(model, queries, method="tracin", load=load)
    assert loaded == [p.name for p in log.passes]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    by_models = log.influence_across_training(model, queries, method="tracin", models=starts)
    torch.testing.assert_close(by_load.values, by_models.values, rtol=0, atol=0)


@pytest.mark.parametrize("placed", [True, False], ids=["each-row-at-its-step", "averaged-over-the-segment"])
@pytest.mark.parametrize("preconditioner", ["raw", "row"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_source_equals_its_formula_evaluated_densely(tmp_path, momentum, preconditioner, placed):
    """Minibatch epochs (each row one use) and the raw projected Fisher F: logix's Source against
    the unrolled linear dynamics written out densely, per module (raw) or over the whole row (row),
    from the rows in the log (float64).

    One SGD step k with momentum m moves a perturbation (d theta, d v) by the 2w x 2w matrix
    M_k = [[I - eta_k F, -eta_k m I], [F, m I]]; the query side moves by its transpose. A row used
    at step k counts (eta_k, -1) . (the query side carried back to just after step k). Where the
    log has no per-step learning rates (a tensor learning rate: `placed` False), each row is
    averaged over the K places of its segment at the mean rate eta: (eta, -1) . (1/K) sum_{j<K}
    (M^T)^j (u_theta, u_v). Eigenvalues past eta lam = 1 + m are capped there (this run has some:
    learning rate 0.5)."""
    model, thetas, _ = train_and_log(
        tmp_path / "log", steps_per_pass=4, statistics=preconditioner, momentum=momentum, tensor_lr=not placed
    )
    log = logix.open(tmp_path / "log")
    assert all((s.lrs is not None) == placed for s in segments(log, [p.name for p in log.passes]))
    got = dense(log.influence_across_training(model, queries, method="source", preconditioner=preconditioner))
    u = query_rows(log, model)
    adjoint = {"theta": u, "v": torch.zeros_like(u)}
    want = torch.zeros(Q, N, dtype=torch.float64)
    for segment in reversed(segments(log, [p.name for p in log.passes])):
        view = log.select(segment.name)
        rows = view.rows().double()
        ids = torch.from_numpy(view.ids.astype(np.int64))
        steps = view.steps
        blocks = [m.columns for m in view.modules.values()] if preconditioner == "raw" else [slice(None)]
        scored = torch.zeros(Q, len(rows), dtype=torch.float64)
        moved = {"theta": [], "v": []}
        for columns in blocks:
            g = rows[:, columns]
            w = g.shape[1]
            lam, vec = torch.linalg.eigh(g.T @ g / len(g))
            a = torch.cat([adjoint["theta"][:, columns], adjoint["v"][:, columns]], dim=1)
            if placed:  # step by step from the segment's end, each row at its own step's learning rate
                for k in reversed(range(segment.start, segment.start + segment.steps)):
                    eta = lr_at(k)
                    here = torch.from_numpy(steps == k)
                    scored[:, here] += (eta * a[:, :w] - a[:, w:]) @ g[here].T
                    a = a @ sgd_step(lam, vec, eta, momentum).T
            else:
                step_t = sgd_step(lam, vec, segment.lr, momentum)
                total = sum(torch.linalg.matrix_power(step_t, j) for j in range(segment.steps))
                mean = a @ total.T / segment.steps
                scored += (segment.lr * mean[:, :w] - mean[:, w:]) @ g.T
                a = a @ torch.linalg.matrix_power(step_t, segment.steps).T
            moved["theta"].append(a[:, :w])
            moved["v"].append(a[:, w:])
        want[:, ids] += scored
        adjoint = {key: torch.cat(parts, dim=1) for key, parts in moved.items()}
    assert relative(got, want) < 1e-6


def sgd_step(lam: torch.Tensor, vec: torch.Tensor, eta: float, momentum: float) -> torch.Tensor:
    """M^T = [[I - eta F, F], [-eta m I, m I]] for F = vec diag(lam) vec^T, eta lam capped at 1 + m."""
    fisher = vec @ torch.diag(lam.clamp(0, (1 + momentum) / eta)) @ vec.T
    eye = torch.eye(len(lam), dtype=torch.float64)
    top = torch.cat([eye - eta * fisher, fisher], 1)
    return torch.cat([top, torch.cat([-eta * momentum * eye, momentum * eye], 1)])


def query_rows(log, model) -> torch.Tensor:
    return query_at(log, model).rows.double()


def test_source_with_full_batch_gradient_descent_and_uses_all(tmp_path):
    """Full-batch GD, one row per example per segment (its gradient at the segment's first step),
    uses='all': with a tiny learning rate Source is the learning-rate-weighted gradient product."""
    model = make_model(single_layer=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    run = logix.init(tmp_path / "log", rank="full", statistics="raw")
    run.watch(model, optimizer=opt)
    theta0 = copy.deepcopy(model)
    for segment in range(2):
        run.start_pass(f"seg{segment}", uses="all")
        for step in range(5):
            if step == 0:
                with run.capture(list(range(N))):
                    F.cross_entropy(model(X), Y).backward()
            else:
                F.cross_entropy(model(X), Y).backward()
            opt.step()
            opt.zero_grad()
    run.finalize()
    log = logix.open(tmp_path / "log")
    assert [s.uses for s in segments(log, ["seg0", "seg1"])] == [5, 5]
    got = dense(log.influence_across_training(model, queries, method="source", preconditioner="raw"))
    gq = per_example_grads(theta0, dict(theta0.named_parameters()), XQ, YQ)
    gi = per_example_grads(theta0, dict(theta0.named_parameters()), X, Y)
    want = 10 * 1e-6 * gq @ gi.T  # 10 steps, each using every example, H negligible at this rate
    assert relative(got, want) < 1e-4


def test_source_and_tracin_against_the_exact_unrolled_influence(tmp_path):
    """Not equal (they approximate it): Source, which models the later training's curvature, is
    closer to the exact unrolled influence than TracIn, which ignores it; the figures are printed."""
    model, thetas, starts = train_and_log(tmp_path / "log", steps_per_pass=8, statistics=["ekfac", "raw"])
    log = logix.open(tmp_path / "log")
    exact = exact_unrolled(model)
    results = {}
    for method, pre, kw in (("source", "raw", {}), ("source", "ekfac", {}), ("tracin", "identity", {"models": starts})):
        got = dense(log.influence_across_training(model, queries, method=method, preconditioner=pre, **kw))
        corr = float(np.mean([np.corrcoef(got[q], exact[q])[0, 1] for q in range(Q)]))
        results[f"{method} {pre}"] = (relative(got, exact), corr)
    print("against the exact unrolled influence (relative error, correlation):", results)
    tracin = results["tracin identity"]
    for name in ("source raw", "source ekfac"):
        assert results[name][1] > tracin[1] + 0.05 and results[name][0] < tracin[0], results


def test_sgd_momentum_counts_as_a_larger_learning_rate(tmp_path):
    model, thetas, starts = train_and_log(tmp_path / "log", steps_per_pass=8, momentum=0.9)
    log = logix.open(tmp_path / "log")
    segs = segments(log, [p.name for p in log.passes])
    assert [s.momentum for s in segs] == [0.9, 0.9]
    assert segs[0].rate == pytest.approx(sum(lr_at(k) for k in range(8)) / 8 / 0.1)


def test_self_influence_across_training_weighs_each_row_by_its_steps_learning_rate(tmp_path):
    model, thetas, _ = train_and_log(tmp_path / "log", steps_per_pass=8, statistics="ekfac")
    log = logix.open(tmp_path / "log")
    for pre in ("identity", "ekfac"):
        got = log.self_influence_across_training(pre)
        want = {}
        for segment in segments(log, [p.name for p in log.passes]):
            view = log.select(segment.name)
            step_of = dict(zip(view.ids.tolist(), view.steps.tolist()))
            si = view.self_influence(pre)
            for i, v in zip(si.ids.tolist(), si.values.tolist()):  # each row at its own step's rate
                want[i] = want.get(i, 0.0) + lr_at(step_of[i]) * v
        assert sorted(got.ids.tolist()) == list(range(N))
        np.testing.assert_allclose([want[i] for i in got.ids.tolist()], got.values.numpy(), rtol=1e-12)


def test_a_resumed_log_gives_the_same_answers(tmp_path):
    """The same training logged in one process, or in a job killed after the first epoch and resumed."""
    model, thetas, starts = train_and_log(tmp_path / "whole", steps_per_pass=8, statistics="ekfac")
    model2 = make_model()
    opt = torch.optim.SGD(model2.parameters(), lr=lr_at(0))
    for part in range(2):
        run = logix.init(tmp_path / "resumed", rank="full", statistics="ekfac", resume=part == 1)
        run.watch(model2, optimizer=opt)
        for step, ids in list(batches())[8 * part : 8 * (part + 1)]:
            if step % 8 == 0:
                run.start_pass(f"p{step // 8}")
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with run.capture(ids):
                F.cross_entropy(model2(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
        run.finalize() if part else run.close()
    whole, resumed = logix.open(tmp_path / "whole"), logix.open(tmp_path / "resumed")
    # the resumed job started at p1; p0, which the killed job had ended, is finalized with it
    assert [(p.name, p.finalized, p.rows) for p in resumed.passes] == [("p0", True, N), ("p1", True, N)]
    for method, kw in (("source", {}), ("tracin", {"models": starts})):
        a = dense(whole.influence_across_training(model, queries, method=method, **kw))
        b = dense(resumed.influence_across_training(model, queries, method=method, **kw))
        assert relative(b, a) < 1e-5, method


def test_misuse_is_a_clear_error(tmp_path):
    model, thetas, starts = train_and_log(tmp_path / "log", steps_per_pass=8)
    log = logix.open(tmp_path / "log")
    with pytest.raises(ConfigError, match="method must be one of"):
        log.influence_across_training(model, queries, method="unrolled")
    with pytest.raises(ConfigError, match="needs curvature"):
        log.influence_across_training(model, queries, method="source", preconditioner="identity")
    with pytest.raises(logix.LogFormatError, match="no curvature statistics"):
        log.influence_across_training(model, queries, method="source")
    with pytest.raises(ConfigError, match=r"needs each pass's checkpoint: load=fn\(pass_info, model\)"):
        log.influence_across_training(model, queries, method="tracin")
    with pytest.raises(logix.NotInLogError, match="not in"):
        log.influence_across_training(model, queries, method="tracin", models=starts, passes=["p9"])
    with pytest.raises(ConfigError, match="captured nothing"):
        log.influence_across_training(model, lambda q, m: None, method="tracin", models=starts)
    assert isinstance(Segment("x", 4, 1.0, 0.5).rate, float)


def test_two_stages_with_an_id_namespace_per_dataset(tmp_path):
    """Pre-training on one dataset, fine-tuning on another, one log: ids 'pre/i' and 'ft/i' are kept
    apart, and each id's score is the sum over the passes that hold it."""
    from torch.utils.data import DataLoader, TensorDataset

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    stages = {"pre/": TensorDataset(X[:8], Y[:8]), "ft/": TensorDataset(X[8:], Y[8:])}
    starts = {}
    with logix.init(tmp_path / "log", rank="full", statistics="ekfac") as run:
        run.watch(model, optimizer=opt)
        for prefix, dataset in stages.items():
            for epoch in range(2):
                name = f"{prefix[:-1]}{epoch}"
                run.start_pass(name)
                starts[name] = copy.deepcopy(model)
                for ids, x, y in DataLoader(logix.WithIds(dataset, prefix=prefix), batch_size=4):
                    with run.capture(ids):
                        F.cross_entropy(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
    log = logix.open(tmp_path / "log")
    want_ids = {f"pre/{i}" for i in range(8)} | {f"ft/{i}" for i in range(8)}
    source = log.influence_across_training(model, queries)
    assert set(source.train_ids.tolist()) == want_ids and source.values.shape == (Q, 16)
    tracin = log.influence_across_training(model, queries, method="tracin", models=starts)
    expected = {}
    for segment in segments(log, [p.name for p in log.passes]):
        view = log.select(segment.name)
        per_pass = view.influence(query_at(log, starts[segment.name]), "identity")
        for j, i in enumerate(per_pass.train_ids.tolist()):
            expected[i] = expected.get(i, 0) + segment.rate * per_pass.values[:, j].double()
    for j, i in enumerate(tracin.train_ids.tolist()):
        torch.testing.assert_close(tracin.values[:, j], expected[i], rtol=1e-5, atol=1e-8)
    with pytest.raises(ConfigError, match="prefix must be a string"):
        logix.WithIds(stages["ft/"], prefix=3)


def query_at(log, model):
    q = log.query(model)
    queries(q, model)
    model.zero_grad()
    return q


def test_a_tensor_learning_rate_is_summed_where_it_lives(tmp_path):
    """Optimizers may hold lr as a tensor (capturable ones keep it on the device): the pass records
    the same sum as for a float, read once when the pass ends."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1, dtype=torch.float64))
    with logix.init(tmp_path / "log", rank="full") as run:
        run.watch(model, optimizer=opt)
        for p in range(2):
            run.start_pass(f"p{p}")
            for step in range(3):
                opt.param_groups[0]["lr"].fill_(0.1 * (step + 1) * (p + 1))  # changed in place, as schedulers do
                with run.capture([step]):
                    F.cross_entropy(model(X[[step]]), Y[[step]]).backward()
                opt.step()
                opt.zero_grad()
    records = [p.meta["training"] for p in logix.open(tmp_path / "log").passes]
    assert [r["steps"] for r in records] == [3, 3]
    assert [r["lr_sum"] for r in records] == pytest.approx([0.6, 1.2])


def test_per_step_learning_rates_are_kept_in_bounded_runs():
    """A long pass keeps the mean learning rate of runs of consecutive steps, at most LR_ENTRIES
    of them: runs double in length as the pass outgrows them, each the mean of its own steps."""
    lrs = np.random.default_rng(0).uniform(0.0, 1.0, 4 * LR_ENTRIES + 3)
    record = {"steps": 0, "lrs": [], "lr_bin": 1}
    for k, lr in enumerate(lrs):
        record["steps"] += 1
        add_step_lr(record, float(lr))
        if k == LR_ENTRIES - 1:
            assert record["lr_bin"] == 1 and record["lrs"] == pytest.approx(lrs[:LR_ENTRIES].tolist())
    assert record["lr_bin"] == 8  # 1,027 steps in at most 256 runs
    full = len(lrs) // 8 * 8
    want = lrs[:full].reshape(-1, 8).mean(axis=1).tolist() + [lrs[full:].mean()]
    assert record["lrs"] == pytest.approx(want, rel=1e-12)


def test_source_with_runs_longer_than_a_step_averages_within_each_run(tmp_path, monkeypatch):
    """Where one query side per step would not fit (SIDE_BYTES), steps share a run at their mean
    learning rate, and a run of a whole segment is Source's average over the segment."""
    model, _, _ = train_and_log(tmp_path / "log", steps_per_pass=4, statistics="raw", momentum=0.9)
    log = logix.open(tmp_path / "log")
    segment = segments(log, ["p0"])[0]
    runs, run_of_row = step_runs(segment, log.select("p0").steps, max_runs=2)
    assert [r.steps for r in runs] == [2, 2] and run_of_row.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r.lr_sum for r in runs] == pytest.approx([lr_at(0) + lr_at(1), lr_at(2) + lr_at(3)])

    def source():
        return log.influence_across_training(model, queries, method="source", preconditioner="raw").values

    placed = source()
    monkeypatch.setattr(across_training, "SIDE_BYTES", 1)  # one run per segment
    one_run = source()
    monkeypatch.setattr(across_training, "step_runs", lambda segment, steps, max_runs: ([segment], None))
    torch.testing.assert_close(one_run, source(), rtol=1e-6, atol=0)
    assert relative(placed.double(), one_run.double()) > 1e-3  # placing rows changes the answer here


def test_damaged_per_step_learning_rates_are_a_clear_error(tmp_path):
    model, _, _ = train_and_log(tmp_path / "log", steps_per_pass=8, statistics="raw")
    manifest = json.loads((tmp_path / "log" / "manifest.json").read_text())
    manifest["passes"][1]["meta"]["training"]["lrs"].append(0.1)
    (tmp_path / "log" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LogFormatError, match="pass 'p1'.*per-step learning rates"):
        logix.open(tmp_path / "log").influence_across_training(model, queries, method="source", preconditioner="raw")
