"""IF-COMP from a log: pNML predictions and the complexity of inputs and labelled pairs.

The predictive normalised maximum likelihood (pNML) asks, for an input x and each candidate label
c: if (x, c) were added to training, how likely would the refitted model find c? Labels the data
cannot rule out keep probability, and the normaliser is the point's complexity. IF-COMP (Ng,
Grosse, Ghassemi, ICML 2024) answers with an influence function instead of refitting. logix takes
the refit to be the proximal Bregman one (the training outputs held where they are, damping
lambda), adds the pair with weight w = 1 / (N T) (N the pass's training rows, each of weight 1/N in
the mean objective whose curvature F the log holds; T the temperature), and refits the model
linearised in its parameters, with the Bregman term at second order (F + lambda I), exactly. The
refit lives in the C logits, so it is a C-dimensional convex problem per input and label:

    K(x)             = w J (F + lambda I)^{-1} J^T           (C x C; J the projected rows of the C logits)
    z_c              = z - K r,  r = softmax(z_c) - e_c      (the logits refit toward c; Newton's method)
    gain_c(x)        = log softmax(z_c)_c - log p(c | x)     (first order: w g_c^T (F + lambda I)^{-1} g_c)
    p_pNML(c | x)    = p(c | x) exp(gain_c) / sum_c' p(c' | x) exp(gain_c')
    complexity(x)    = log sum_c p(c | x) exp(gain_c)          (nats, between 0 and log C)
    code length(x, y) = -log p_pNML(y | x)                     (labelled: high = the label is surprising)

since g_c = J^T (p - e_c). To first order in w this is the influence function's gain; unlike the
first order, which grows without bound far from the training data (tests/test_complexity.py: up
to 3.9 times a brute-force refit's gain at T = 1), the refit's gain stays between 0 and the first
order and keeps every probability below 1, and it follows a brute-force refit of the full
objective more closely at every temperature (within 0.7% at T = 100, against 2.1%).
A temperature below 1 weighs the added pair as more than one example. The paper's temperature
enters through a Boltzmann output distribution instead; either way it is chosen on held-out data:
`log.choose_temperature(model, labelled_batches)` returns the temperature (and, given several,
the damping factor) of least pNML negative log-likelihood. The logits' rows take one forward and
one backward pass per class and batch, captured like query rows (nothing is written).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .curvature import DEFAULT_DAMPING_FACTOR, Preconditioner
from .errors import ConfigError
from .frozen import Frozen
from .results import _Saved, _values, as_ids
from .scalars import real_number, shown

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 256.0  # see the README: chosen from benchmarks/ifcomp.py
TEMPERATURE_GRID = tuple(4.0**p for p in range(-1, 21))  # 0.25 ... 4^20 (about 1e12): choose_temperature's default


@dataclass(eq=False)
class Complexity(_Saved):
    """IF-COMP per input: `values` its complexity (nats), `probs` (n, C) the pNML distribution,
    `softmax` (n, C) the model's own, `gains` (n, C) each label's hindsight gain gain_c; with labels,
    `labels` and `code_length` = -log p_pNML(label | x). ids as given (numpy, as `Log.ids`)."""

    values: Tensor
    probs: Tensor
    softmax: Tensor
    gains: Tensor
    ids: np.ndarray
    labels: Tensor | None = None
    code_length: Tensor | None = None

    def __post_init__(self):
        for name in ("values", "probs", "softmax", "gains", "labels", "code_length"):
            if getattr(self, name) is not None:
                setattr(self, name, _values(getattr(self, name)))
        self.ids = as_ids(self.ids)

    def __repr__(self) -> str:
        labelled = ", labelled" if self.labels is not None else ""
        return f"Complexity(inputs={len(self.ids)}, classes={self.probs.shape[1]}{labelled})"


def pnml(log_softmax: Tensor, gains: Tensor) -> tuple[Tensor, Tensor]:
    """(pNML probabilities, complexity) from the model's log-probabilities and the gains (n, C)."""
    joint = log_softmax + gains
    complexity = torch.logsumexp(joint, dim=1)
    return (joint - complexity[:, None]).exp(), complexity


def complexity(
    log,
    model: nn.Module,
    batches: Iterable,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    preconditioner: str = "auto",
    damping=None,
    damping_factor: float | None = None,
    modules=None,
    curvature: str = "auto",
    logits: Callable | None = None,
) -> Complexity:
    """IF-COMP of the inputs in `batches` against the log's current pass (see the module docstring).

    batches: (ids, inputs) or (ids, inputs, labels) per batch; the labels give each pair's code
    length. logits(model, inputs) -> (B, C) class scores (default model(inputs)). temperature > 0:
    the added pair weighs 1/T training examples. preconditioner, damping, damping_factor, modules,
    curvature: as `log.influence`. The model runs in eval mode; its parameters and .grad are left
    as they were. A training example's labelled complexity needs its input again (the log holds
    only its observed label's row): pass the training inputs as a batch.
    """
    t = _positive(temperature, "temperature")
    pre = Preconditioner(log, preconditioner, damping, damping_factor, modules, curvature)
    ids, log_probs, gains, labels = [], [], [], []
    for batch_ids, out, (kernels,), batch_labels in _batch_kernels(log, model, batches, logits, [pre]):
        ids.extend(batch_ids)
        log_probs.append(out)
        gains.append(hindsight_gains(out, kernels, t))  # a batch's C x C kernels at a time: memory stays bounded
        if batch_labels is not None:
            labels.append(batch_labels)
    if labels and len(labels) != len(log_probs):
        raise ConfigError("give labels with every batch or with none")
    log_probs, gains = torch.cat(log_probs), torch.cat(gains)
    probs, values = pnml(log_probs, gains)
    result = Complexity(values, probs, log_probs.exp(), gains, np.asarray(ids))
    if labels:
        result.labels = labels = torch.cat(labels)
        joint = (log_probs + gains).gather(1, labels[:, None]).squeeze(1)
        result.code_length = values - joint  # -log p_pNML(label | x), finite where the probability underflows
    return result


NEWTON_STEPS = 50  # the refit in logit space converges in a handful; this only bounds a pathological case
SOLVE_ELEMENTS = 1 << 24  # numbers in one chunk's C x C Newton systems (inputs x candidates x C x C)


def hindsight_gains(log_probs: Tensor, kernels: Tensor, temperature: float) -> Tensor:
    """(n, C) gain_c = log q_c - log p(c | x): q the probabilities after the refit toward c of the
    model linearised in its parameters, with the quadratic proximal term, from the log-softmax
    (n, C) and the kernels K = w J (F + lambda I)^{-1} J^T at T = 1 (n, C, C).

    The refit's logits are z - (K / T) r with r = softmax(z - (K / T) r) - e_c, the minimum of the
    convex 1/2 r^T (K / T) r + CE_c(z - (K / T) r): Newton's method from r = 0, halving steps
    that do not lower it, so that the objective never rises above CE_c(z) and the gain is never
    negative; it stays below its first order, (e_c - p)^T (K / T) (e_c - p)."""
    per_input = log_probs.shape[1] ** 3
    chunk = max(1, SOLVE_ELEMENTS // per_input)
    return torch.cat([_refit_gains(log_probs[i : i + chunk], kernels[i : i + chunk] / temperature)
                      for i in range(0, len(log_probs), chunk)])  # fmt: skip


def _refit_gains(z: Tensor, kernels: Tensor) -> Tensor:
    n, classes = z.shape
    eye = torch.eye(classes, dtype=z.dtype, device=z.device)
    z, k = z[:, None, :], kernels[:, None]  # (n, 1, C) and (n, 1, C, C): one system per candidate c
    e = eye[None].expand(n, classes, classes)  # (n, c, C): e_c
    r = torch.zeros_like(e)  # the model as it is; the first Newton step is the influence step, damped by q's curvature
    objective = _refit_objective(z, k, e, r)
    for _ in range(NEWTON_STEPS):
        q = torch.softmax(z - (k @ r[..., None])[..., 0], dim=-1)
        residual = r - q + e
        kq = (k @ q[..., None])[..., 0]  # K q (K is symmetric: also q^T K)
        hess_k = q[..., :, None] * (k - kq[..., None, :])  # (diag q - q q^T) K without a C^3 product
        step = torch.linalg.solve(eye + hess_k, residual[..., None])[..., 0]
        size = torch.ones(n, classes, 1, dtype=z.dtype, device=z.device)
        for _ in range(30):  # halve where the objective did not go down (convex: a step always exists)
            trial = r - size * step
            value = _refit_objective(z, k, e, trial)
            worse = value > objective + 1e-12 * objective.abs()
            if not bool(worse.any()):
                break
            size = torch.where(worse[..., None], size / 2, size)
        previous = objective
        r, objective = torch.where(worse[..., None], r, trial), torch.where(worse, objective, value)
        if float((previous - objective).max()) < 1e-13:  # nats: the gains are settled to about this
            break
    moved = torch.log_softmax(z - (k @ r[..., None])[..., 0], dim=-1)
    return moved.diagonal(dim1=1, dim2=2) - z[:, 0]


def _refit_objective(z: Tensor, k: Tensor, e: Tensor, r: Tensor) -> Tensor:
    """1/2 r^T K r + CE_c(z - K r) per input and candidate (n, C)."""
    kr = (k @ r[..., None])[..., 0]
    logits = z - kr
    return 0.5 * (r * kr).sum(-1) + torch.logsumexp(logits, dim=-1) - (logits * e).sum(-1)


def choose_temperature(
    log,
    model: nn.Module,
    batches: Iterable,
    temperatures=TEMPERATURE_GRID,
    damping_factors=(DEFAULT_DAMPING_FACTOR,),
    *,
    preconditioner: str = "auto",
    modules=None,
    curvature: str = "auto",
    logits: Callable | None = None,
) -> tuple[float, float, dict[tuple[float, float], float]]:
    """(temperature, damping_factor, {(temperature, damping_factor): NLL}): the pair whose pNML
    gives the least negative log-likelihood on held-out labelled `batches` ((ids, inputs, labels)
    each), over the grids given. Each batch's logit rows are taken once for the whole grid (the
    kernels scale as 1/T; each damping factor preconditions the same rows): a few hundred examples
    are enough. Other options: as `complexity`."""
    grid = [_positive(t, "temperatures") for t in temperatures]
    factors = [_positive(f, "damping_factors") for f in damping_factors]
    if not grid or not factors:
        raise ConfigError("temperatures and damping_factors each need at least one value")
    pres = [Preconditioner(log, preconditioner, None, f, modules, curvature) for f in factors]
    totals = dict.fromkeys(((t, f) for f in factors for t in grid), 0.0)
    count = 0
    for _, out, kernels, labels in _batch_kernels(log, model, batches, logits, pres):
        if labels is None:
            raise ConfigError("choose_temperature needs labelled batches: (ids, inputs, labels)")
        count += len(labels)
        for factor, factor_kernels in zip(factors, kernels):
            for t in grid:
                joint = out + hindsight_gains(out, factor_kernels, t)
                totals[(t, factor)] += float(
                    (torch.logsumexp(joint, dim=1) - joint.gather(1, labels[:, None])[:, 0]).sum()
                )
    nll = {key: total / count for key, total in totals.items()}
    best_t, best_f = min(nll, key=nll.get)
    if len(grid) > 1 and best_t in (min(grid), max(grid)):
        logger.warning(
            "choose_temperature: the best temperature, %g, is at the edge of the grid; the curvature may be "
            "nearly singular (try larger damping_factors) or IF-COMP may add nothing here (a very high "
            "temperature is the softmax)",
            best_t,
        )
    return best_t, best_f, nll


def _positive(value, name: str) -> float:
    number = real_number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name} must be positive numbers, got {shown(value)}" if name.endswith("s") else
                          f"{name} must be a positive number, got {shown(value)}")  # fmt: skip
    return number


def _batch_kernels(
    log, model, batches, logits, pres: list
) -> Iterator[tuple[list, Tensor, list[Tensor], Tensor | None]]:
    """Per batch: (ids, log-softmax (B, C), per preconditioner the kernels w J (F + lambda I)^{-1} J^T
    at T = 1 (B, C, C), labels or None); logits(model, inputs), or model(inputs) when None."""
    forward = logits if logits is not None else (lambda m, x: m(x))
    if len(log) == 0:
        raise ConfigError("the log's pass has no rows: IF-COMP weighs the added pair against them")
    weight = 1.0 / len(log)
    seen = 0
    with Frozen(model):
        for batch in batches:
            batch_ids, inputs, batch_labels = _unpack(batch)
            out = _log_softmax(forward, model, inputs)
            ids = _batch_ids(batch_ids, len(out))
            labels = None if batch_labels is None else _labels(batch_labels, out.shape)
            rows = _logit_rows(log, model, forward, inputs, *out.shape)  # (C, B, D)
            flat = rows.reshape(-1, rows.shape[-1])
            kernels = []
            for pre in pres:
                solved = pre.apply(flat).view(*rows.shape[:2], -1)  # float64
                kernels.append(
                    weight * torch.einsum("kbd,lbd->bkl", pre.columns(flat).double().view_as(solved), solved)
                )
            seen += len(ids)
            yield ids, out, kernels, labels
    if not seen:
        raise ConfigError("batches held no inputs")


def _unpack(batch) -> tuple:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ConfigError(f"each batch must be (ids, inputs) or (ids, inputs, labels), got {shown(batch)}")
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


def _log_softmax(forward, model, inputs) -> Tensor:
    with torch.no_grad():
        out = forward(model, inputs)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] < 2:
        raise ConfigError(f"the model must give (batch, classes) logits with at least 2 classes, got {shown(out)}")
    return F.log_softmax(out.double(), dim=1)


def _logit_rows(log, model, forward, inputs, batch: int, classes: int) -> Tensor:
    """(C, B, D): each example's row for each logit, one forward and backward per class."""
    with log.query(model) as q:
        for c in range(classes):
            with q.capture(list(range(batch)), reduction="sum"):
                forward(model, inputs)[:, c].sum().backward()
            model.zero_grad(set_to_none=True)
        all_rows = q.rows
    return all_rows.view(classes, -1, all_rows.shape[1])


def _batch_ids(batch_ids, size: int) -> list:
    ids = batch_ids.tolist() if isinstance(batch_ids, (Tensor, np.ndarray)) else list(batch_ids)
    if len(ids) != size:
        raise ConfigError(f"a batch has {len(ids)} ids for {size} inputs")
    return ids


def _labels(labels, shape) -> Tensor:
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if labels.dtype.is_floating_point or len(labels) != shape[0]:
        raise ConfigError(f"labels must be {shape[0]} integer classes per batch, got {shown(labels)}")
    if bool((labels < 0).any()) or bool((labels >= shape[1]).any()):
        raise ConfigError(f"labels must lie in 0..{shape[1] - 1}, got {shown(labels)}")
    return labels.long()
