"""How far is Source from the exact unrolled influence, and where does the distance come from?

    python benchmarks/source_exactness.py           # a tiny MLP, every setting (about a minute)
    python benchmarks/source_exactness.py --smoke   # two settings: checks the script works

A tiny MLP (4 -> 3 -> tanh -> 2, 16 examples, 3 queries) trained for 2 epochs of minibatch SGD
(batch 2), logged by logix at rank full with one pass per segment of K steps. Against the exact
unrolled influence -dL_q(theta_T)/d eps_i (float64 autograd through the whole optimisation), as
the learning rate, the segment length K and the momentum grow:

  source H      Source's formula (with logix's momentum dynamics, each example at the step that
                used it) and the exact Hessian of the training loss averaged over the segment's
                steps, dense: Source with exact curvature
  source GGN    the same with the Gauss-Newton matrix
  logix raw     logix's Source with its raw statistics (the projected empirical Fisher per module)
  logix ekfac   logix's Source with its EK-FAC statistics
  tracin        logix's TracIn-CP (query gradients at each segment's starting checkpoint)

Each cell: relative error ||S - exact|| / ||exact||, and (in brackets) the mean over queries of the
correlation with the exact scores. Last, the error of the curvature logix stores against the dense
matrices (per module block, relative Frobenius error): EK-FAC against the empirical Fisher it
approximates, and that Fisher against the Hessian block.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import logix
from logix.across_training import segments
from logix.curvature import load_curvature

N, B, Q = 16, 2, 3
G = torch.Generator().manual_seed(7)
X = torch.randn(N, 4, generator=G, dtype=torch.float64)
Y = torch.randint(0, 2, (N,), generator=G)
XQ = torch.randn(Q, 4, generator=G, dtype=torch.float64)
YQ = torch.randint(0, 2, (Q,), generator=G)
ORDER = [torch.randperm(N, generator=torch.Generator().manual_seed(e)).tolist() for e in range(2)]
STEPS = [ORDER[e][s : s + B] for e in range(2) for s in range(0, N, B)]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def flat(params: dict) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vector: torch.Tensor, like: dict) -> dict:
    out, at = {}, 0
    for k, p in like.items():
        out[k] = vector[at : at + p.numel()].reshape(p.shape)
        at += p.numel()
    return out


def train(path, lr: float, segment: int, momentum: float):
    """Train and log; returns the final model, and each step's starting parameters (a dict)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    thetas, starts = [], {}
    with logix.init(path, rank="full", statistics=["ekfac", "raw"]) as run:
        run.watch(model, optimizer=opt)
        for step, ids in enumerate(STEPS):
            if step % segment == 0:
                name = f"s{step // segment}"
                run.start_pass(name)
                starts[name] = copy.deepcopy(model)
            thetas.append({k: v.detach().clone() for k, v in model.named_parameters()})
            with run.capture(ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return model, thetas, starts


def exact_unrolled(lr: float, momentum: float) -> torch.Tensor:
    model = make_model()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    eps = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    velocity = None
    for ids in STEPS:
        losses = F.cross_entropy(functional_call(model, params, (X[ids],)), Y[ids], reduction="none")
        grads = torch.autograd.grad(losses.mean() + (eps[ids] * losses).sum(), list(params.values()), create_graph=True)
        velocity = list(grads) if velocity is None else [momentum * v + g for v, g in zip(velocity, grads)]
        params = {k: p - lr * v for (k, p), v in zip(params.items(), velocity)}
    out = torch.zeros(Q, N, dtype=torch.float64)
    for q in range(Q):
        loss = F.cross_entropy(functional_call(model, params, (XQ[q : q + 1],)), YQ[q : q + 1])
        out[q] = -torch.autograd.grad(loss, eps, retain_graph=True)[0]
    return out


def curvature_at(model, theta: dict, kind: str) -> torch.Tensor:
    """The Hessian (or GGN) of the mean training loss at theta, dense over all parameters."""
    vector = flat(theta)

    def loss(v):
        return F.cross_entropy(functional_call(model, unflat(v, theta), (X,)), Y)

    if kind == "H":
        return hessian(loss)(vector)
    jac = jacrev(lambda v: functional_call(model, unflat(v, theta), (X,)))(vector)  # (N, C, P)
    probs = torch.softmax(functional_call(model, theta, (X,)), dim=1)
    h = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h, jac) / N


def dense_source(model, thetas, segment: int, lr: float, momentum: float, kind: str) -> torch.Tensor:
    """Source's formula with dense curvature averaged over each segment's steps: the linear dynamics
    of (d theta, d v) under SGD with momentum, [[I - eta H, -eta m I], [H, m I]] per step, each
    example entering at the step that used it."""
    final = {k: v.detach() for k, v in model.named_parameters()}
    u_theta = per_example(model, final, XQ, YQ)
    u_v = torch.zeros_like(u_theta)
    size = u_theta.shape[1]
    out = torch.zeros(Q, N, dtype=torch.float64)
    eye = torch.eye(size, dtype=torch.float64)
    for start in reversed(range(0, len(STEPS), segment)):
        steps = range(start, start + segment)
        h = sum(curvature_at(model, thetas[k], kind) for k in steps) / segment
        lam, vec = torch.linalg.eigh((h + h.T) / 2)
        h = vec @ torch.diag(lam.clamp(0, (1 + momentum) / lr)) @ vec.T  # logix's cap on eta lam
        step_t = torch.cat([torch.cat([eye - lr * h, h], 1), torch.cat([-lr * momentum * eye, momentum * eye], 1)])
        adjoint = torch.cat([u_theta, u_v], dim=1)
        for k in reversed(steps):  # each step's examples at their own place in the segment
            ids = STEPS[k]
            rows = per_example(model, thetas[k], X[ids], Y[ids])
            out[:, ids] += (lr * adjoint[:, :size] - adjoint[:, size:]) @ rows.T
            adjoint = adjoint @ step_t.T
        u_theta, u_v = adjoint[:, :size], adjoint[:, size:]
    return out


def per_example(model, theta: dict, x, y) -> torch.Tensor:
    def one(xi, yi):
        loss = F.cross_entropy(functional_call(model, theta, (xi[None],)), yi[None])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(theta.values()))])

    theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
    return torch.stack([one(xi, yi) for xi, yi in zip(x, y)]).detach()


def queries(q, model):
    with q.capture(list(range(100, 100 + Q))):
        F.cross_entropy(model(XQ), YQ).backward()


def in_order(scores) -> torch.Tensor:
    out = torch.zeros(Q, N, dtype=torch.float64)
    out[:, torch.from_numpy(np.asarray(scores.train_ids, dtype=np.int64))] = scores.values.double()
    return out


def compare(got: torch.Tensor, exact: torch.Tensor) -> str:
    error = float((got - exact).norm() / exact.norm())
    corr = float(np.mean([np.corrcoef(got[q], exact[q])[0, 1] for q in range(Q)]))
    return f"{error:5.2f} ({corr:+.2f})"


def block_errors(path, thetas, model, segment: int) -> tuple[float, float]:
    """Mean over passes and modules of ||EKFAC - EF|| / ||EF|| and ||EF - H|| / ||H|| (relative Frobenius)."""
    log = logix.open(path)
    ekfac_err, ef_err = [], []
    layout = [(0, 12, 3, 5), (15, 6, 2, 4)]  # (offset in the flat parameter vector, size, d_out, d_in + 1)
    for p, info in enumerate(log.passes):
        view = log.select(info.name)
        rows = view.rows().double()
        curv = load_curvature(view, "ekfac", 0.0)
        h = sum(curvature_at(model, thetas[k], "H") for k in range(p * segment, (p + 1) * segment)) / segment
        for (name, m), (offset, size, d_out, d_in) in zip(view.modules.items(), layout):
            g = rows[:, m.columns]
            ef = g.T @ g / len(g)
            c = curv[name]
            basis = torch.kron(c.vec_s, c.vec_a)
            approx = basis @ torch.diag(c.values.reshape(-1)) @ basis.T
            ekfac_err.append(float((approx - ef).norm() / ef.norm()))
            # the Hessian block in logix's (d_out, d_in + 1) layout: weight columns, then the bias
            w = torch.arange(offset, offset + size).reshape(d_out, d_in - 1)
            b = torch.arange(offset + size, offset + size + d_out)[:, None]
            order = torch.cat([w, b], dim=1).reshape(-1)
            block = h[order][:, order]
            ef_err.append(float((ef - block).norm() / block.norm()))
    return float(np.mean(ekfac_err)), float(np.mean(ef_err))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="two settings only: checks the script works")
    args = parser.parse_args(argv)
    print("command:", shlex.join(["python"] + sys.argv))
    settings = [(lr, k, m) for m in (0.0, 0.9) for lr in (0.05, 0.2, 0.5) for k in (2, 8)]
    if args.smoke:
        settings = settings[:2]
    print(
        f"{'lr':>5} {'K':>2} {'mom':>4}  {'source H':>13} {'source GGN':>13} {'logix raw':>13} "
        f"{'logix ekfac':>13} {'tracin':>13}   EK-FAC vs EF, EF vs H"
    )
    with tempfile.TemporaryDirectory(prefix="logix-source-") as tmp:
        for lr, k, momentum in settings:
            path = Path(tmp) / f"{lr}-{k}-{momentum}"
            model, thetas, starts = train(path, lr, k, momentum)
            log = logix.open(path)
            assert [s.steps for s in segments(log, [p.name for p in log.passes])] == [k] * (len(STEPS) // k)
            exact = exact_unrolled(lr, momentum)
            cells = [
                dense_source(model, thetas, k, lr, momentum, "H"),
                dense_source(model, thetas, k, lr, momentum, "GGN"),
                in_order(log.influence_across_training(model, queries, preconditioner="raw")),
                in_order(log.influence_across_training(model, queries, preconditioner="ekfac")),
                in_order(log.influence_across_training(model, queries, method="tracin", models=starts)),
            ]
            ekfac_err, ef_err = block_errors(path, thetas, model, k)
            print(
                f"{lr:5.2f} {k:2d} {momentum:4.1f}  "
                + " ".join(f"{compare(c, exact):>13}" for c in cells)
                + f"   {ekfac_err:.2f}, {ef_err:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
