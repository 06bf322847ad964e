"""Influence scores against dense references computed here in float64.

Every preconditioner is checked against the formula it claims, built densely from exact
per-example gradients (torch.func, conftest.exact_gradients) and from activations / output
gradients computed in this file, never from logix's own statistics:

    score(q, i) = sum over modules m of g_q,m^T (F_m + lambda_m I)^{-1} g_i,m

    identity  F = 0, lambda = 0
    raw       F = mean_i g_i g_i^T                          trace(F)
    kfac      F = kron(S, A)                                trace(S) trace(A)
    ekfac     F = Q diag(L*) Q^T, Q = kron(Q_S, Q_A),
              L* = mean_i (Q^T g_i)^2                       sum(L*)

with the default lambda = 0.1 x that trace / (d_in d_out), the block's unprojected dimension (its
mean eigenvalue at rank full),

with g = vec of the (k_out, k_in) block, row-major, A = mean over positions of [a; 1][a; 1]^T and
S = mean over examples of sum_t delta_t delta_t^T (delta = d own loss / d layer output; for an MLP
with one position, delta_i is the bias column of the exact gradient). Positive = helps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exact_gradients
from torch import nn

import logix
from logix.curvature import statistics_file
from logix.results import TopK

KINDS = ("identity", "raw", "kfac", "ekfac")
CURVED = ("raw", "kfac", "ekfac")
N_TRAIN, BATCH, N_QUERY = 40, 10, 6
TRAIN_IDS = [1000 + 7 * i for i in reversed(range(N_TRAIN))]  # neither 0..N-1 nor sorted
QUERY_IDS = [f"q{i}" for i in range(N_QUERY)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every matrix here is tiny: on a busy 2-core machine intra-op threads only add hand-off waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ce(out, y):
    return F.cross_entropy(out, y)


def assert_scores(actual, expected, rtol=1e-5):
    """Close elementwise, with an absolute slack relative to the largest reference entry."""
    expected = torch.as_tensor(expected).double()
    actual = torch.as_tensor(actual).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    peak = expected.abs().max().item()
    assert peak > 0, "the reference is all zeros: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * peak)


def columns_in(scores, ids) -> torch.Tensor:
    """scores.values with its columns reordered to `ids`."""
    where = {int(i): n for n, i in enumerate(scores.train_ids)}
    return scores.values[:, [where[int(i)] for i in ids]]


# -- the dense reference ---------------------------------------------------------------------------


@dataclass
class Reference:
    """float64 rows, factors and queries of a Linear-Tanh-Linear model, in TRAIN_IDS order."""

    g_train: dict  # {module: (N, k_out * k_in)}
    g_query: dict  # {module: (Q, k_out * k_in)}
    A: dict
    S: dict
    unprojected: dict  # {module: d_out * (d_in + 1)}, the dimension of its unprojected gradient
    _fisher: dict = field(default_factory=dict)

    @property
    def modules(self):
        return list(self.g_train)

    def fisher(self, kind: str, m: str) -> torch.Tensor:
        if (kind, m) not in self._fisher:
            g = self.g_train[m]
            if kind == "raw":
                f = g.T @ g / g.shape[0]
            elif kind == "kfac":
                f = torch.kron(self.S[m], self.A[m])  # row-major (k_out, k_in): S first
            elif kind == "ekfac":
                q = torch.kron(torch.linalg.eigh(self.S[m])[1], torch.linalg.eigh(self.A[m])[1])
                lam = ((g @ q) ** 2).mean(dim=0)
                f = q @ torch.diag(lam) @ q.T
            else:
                raise ValueError(kind)
            self._fisher[kind, m] = f
        return self._fisher[kind, m]

    def trace(self, kind: str, m: str) -> float:
        """The block's trace, computed as each preconditioner defines its curvature."""
        if kind == "raw":
            return float(torch.trace(self.fisher("raw", m)))
        if kind == "kfac":
            return float(torch.trace(self.S[m]) * torch.trace(self.A[m]))
        q = torch.kron(torch.linalg.eigh(self.S[m])[1], torch.linalg.eigh(self.A[m])[1])
        return float(((self.g_train[m] @ q) ** 2).mean(dim=0).sum())

    def damping(self, kind, damping=None, factor=0.1) -> dict:
        if kind == "identity":
            return {m: 0.0 for m in self.modules}
        if damping is None:
            return {m: factor * self.trace(kind, m) / self.unprojected[m] for m in self.modules}
        if isinstance(damping, dict):
            return {m: float(damping[m]) for m in self.modules}
        return {m: float(damping) for m in self.modules}

    def inverse(self, kind, m, lam) -> torch.Tensor:
        dim = self.g_train[m].shape[1]
        if kind == "identity":
            return torch.eye(dim, dtype=torch.float64)
        return torch.linalg.inv(self.fisher(kind, m) + lam * torch.eye(dim, dtype=torch.float64))

    def scores(self, kind, damping=None, factor=0.1, modules=None, mode="dot", query=None) -> torch.Tensor:
        """(Q, N) reference scores; query: {module: (Q, width)} (default: the query rows)."""
        query = self.g_query if query is None else query
        lam = self.damping(kind, damping, factor)
        dot = norm_q = norm_t = 0
        for m in modules or self.modules:
            inv = self.inverse(kind, m, lam[m])
            gq, gt = query[m], self.g_train[m]
            dot = dot + gq @ inv @ gt.T
            norm_q = norm_q + ((gq @ inv) * gq).sum(dim=1)
            norm_t = norm_t + ((gt @ inv) * gt).sum(dim=1)
        if mode == "cosine":
            return dot / (norm_q.sqrt()[:, None] * norm_t.sqrt()[None, :])
        if mode == "relative":
            return dot / norm_t.sqrt()[None, :]
        return dot

    def self_influence(self, kind, damping=None, factor=0.1, modules=None) -> torch.Tensor:
        return torch.diagonal(self.scores(kind, damping, factor, modules, query=self.g_train))


def mlp(d_in, hidden, d_out) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def mlp_reference(model, x, y, xq, yq, projections=None) -> Reference:
    """Rows from exact per-example gradients; A from [input; 1], S from the bias columns (T = 1)."""
    exact, exact_q = exact_gradients(model, ce, x, y), exact_gradients(model, ce, xq, yq)
    with torch.no_grad():
        x64 = x.double()
        hidden = torch.tanh(x64 @ model[0].weight.double().T + model[0].bias.double())
    inputs = {"0": x64, "2": hidden}
    g_train, g_query, A, S = {}, {}, {}, {}
    for m in ("0", "2"):
        p_in, p_out = (None, None) if projections is None else projections[m]
        p_in = None if p_in is None else p_in.double()
        p_out = None if p_out is None else p_out.double()
        a = torch.cat([inputs[m], torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        delta = exact[m].double()[:, :, -1]  # the bias column: d loss_i / d output
        if p_in is not None:
            a = a @ p_in.T
        if p_out is not None:
            delta = delta @ p_out.T
        A[m] = a.T @ a / len(x)
        S[m] = delta.T @ delta / len(x)
        for source, target in ((exact, g_train), (exact_q, g_query)):
            g = source[m].double()
            if p_out is not None:
                g = p_out @ g
            if p_in is not None:
                g = g @ p_in.T
            target[m] = g.reshape(g.shape[0], -1)
    return Reference(g_train, g_query, A, S, {m: exact[m][0].numel() for m in ("0", "2")})


# -- logs ------------------------------------------------------------------------------------------


@dataclass
class Setup:
    model: nn.Module
    log: logix.Log
    query: object  # logix Query over the QUERY_IDS examples
    train_query: object  # the train batches captured again as queries
    ref: Reference
    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor


def batches(x, y, ids):
    for start in range(0, len(ids), BATCH):
        yield ids[start : start + BATCH], x[start : start + BATCH], y[start : start + BATCH]


def train_log(path, model, x, y, ids=TRAIN_IDS, **init) -> logix.Log:
    run = logix.init(path, **init)
    run.watch(model)
    for batch_ids, xb, yb in batches(x, y, ids):
        with run.capture(batch_ids):
            ce(model(xb), yb).backward()
        model.zero_grad()
    run.finalize()
    return logix.open(path)


def capture_query(log, model, pieces, **capture):
    """A Query holding rows of (ids, x, y) pieces, each captured as one batch-mean batch."""
    with log.query(model) as q:
        for ids, xb, yb in pieces:
            with q.capture(ids, **capture):
                ce(model(xb), yb).backward()
            model.zero_grad()
    return q


def make_setup(path, dims, rank, seed) -> Setup:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(*dims)
    x = torch.randn(N_TRAIN, dims[0], generator=gen)
    y = torch.randint(0, dims[2], (N_TRAIN,), generator=gen)
    xq = torch.randn(N_QUERY, dims[0], generator=gen)
    yq = torch.randint(0, dims[2], (N_QUERY,), generator=gen)
    log = train_log(path, model, x, y, rank=rank, statistics=["kfac", "ekfac", "raw"])
    query = capture_query(log, model, [(QUERY_IDS, xq, yq)])
    train_query = capture_query(log, model, batches(x, y, TRAIN_IDS))
    projections = None if rank == "full" else log.projections()
    ref = mlp_reference(model, x, y, xq, yq, projections)
    return Setup(model, log, query, train_query, ref, x, y, xq, yq)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """rank="full", float32 rows, Linear(4, 5)-Tanh-Linear(5, 3), 40 train examples in 4 batches."""
    return make_setup(tmp_path_factory.mktemp("full") / "log", (4, 5, 3), "full", seed=1)


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory):
    """rank=3 with every side of both modules projected."""
    return make_setup(tmp_path_factory.mktemp("gaussian") / "log", (6, 8, 4), 3, seed=2)


# -- the log and the reference agree on what was logged --------------------------------------------


def test_the_full_rank_log_is_the_reference(full):
    log, ref = full.log, full.ref
    assert list(log.ids) == TRAIN_IDS
    assert full.query.ids.tolist() == QUERY_IDS
    for m in ref.modules:
        assert_scores(log.gradients(m).reshape(N_TRAIN, -1), ref.g_train[m])
    with h5py.File(log.path / statistics_file(log), "r") as f:
        for m in ref.modules:
            assert_scores(f[m]["a"][()], ref.A[m])
            assert_scores(f[m]["s"][()], ref.S[m])
            assert float(f[m]["a_count"][()]) == N_TRAIN
            assert float(f[m]["s_count"][()]) == N_TRAIN


def test_gaussian_log_is_projected_on_every_side(gaussian):
    for m, (p_in, p_out) in gaussian.log.projections().items():
        assert p_in is not None and p_out is not None, m
        assert gaussian.log.modules[m].k_in == gaussian.log.modules[m].k_out == 3
    for m in gaussian.ref.modules:
        assert_scores(gaussian.log.gradients(m).reshape(N_TRAIN, -1), gaussian.ref.g_train[m])


# -- preconditioners against their dense definitions -----------------------------------------------


def test_identity_is_the_gradient_dot_product(full):
    s = full.log.influence(full.query, "identity")
    assert s.query_ids.tolist() == QUERY_IDS and s.train_ids.tolist() == TRAIN_IDS
    assert s.values.shape == (N_QUERY, N_TRAIN)
    dots = sum(full.ref.g_query[m] @ full.ref.g_train[m].T for m in full.ref.modules)
    assert_scores(s.values, dots)
    # identity takes no damping, whatever is asked
    assert_scores(full.log.influence(full.query, "identity", damping=5.0).values, dots)


@pytest.mark.parametrize("setup_name", ["full", "gaussian"])
@pytest.mark.parametrize("kind", CURVED)
@pytest.mark.parametrize("damping", [None, 0.02, "dict"], ids=["default", "float", "dict"])
def test_preconditioned_scores_equal_the_dense_reference(request, setup_name, kind, damping):
    setup = request.getfixturevalue(setup_name)
    ref = setup.ref
    if damping == "dict":
        damping = {"0": 0.3 * ref.trace(kind, "0") / 10, "2": 0.01 * ref.trace(kind, "2") / 10}
    s = setup.log.influence(setup.query, kind, damping=damping)
    expected = ref.scores(kind, damping)
    assert_scores(columns_in(s, TRAIN_IDS), expected)
    # the preconditioner matters: the reference differs from plain dot products and other kinds
    assert not torch.allclose(expected, ref.scores("identity"), rtol=1e-2)


@pytest.mark.parametrize("setup_name", ["full", "gaussian"])
@pytest.mark.parametrize("kind", CURVED)
def test_default_damping_is_a_tenth_of_each_blocks_trace_over_its_unprojected_dimension(request, setup_name, kind):
    setup = request.getfixturevalue(setup_name)
    ref = setup.ref
    lam = ref.damping(kind)
    assert abs(lam["0"] - lam["2"]) > 0.1 * max(lam.values()), "modules' defaults must differ to test per-module"
    default = setup.log.influence(setup.query, kind)
    explicit = setup.log.influence(setup.query, kind, damping=lam)
    assert_scores(default.values, explicit.values, rtol=1e-6)
    # a damping that is off by 20% for one module only is detected
    off = dict(lam, **{"2": lam["2"] * 1.2})
    assert not torch.allclose(default.values, setup.log.influence(setup.query, kind, damping=off).values, rtol=1e-4)
    # damping_factor scales the default
    doubled = setup.log.influence(setup.query, kind, damping_factor=0.2)
    assert_scores(columns_in(doubled, TRAIN_IDS), ref.scores(kind, factor=0.2))


def test_kfac_order_is_s_kron_a(full):
    """A (x) S in place of S (x) A gives other scores: the reference would catch the swap."""
    ref = full.ref
    s = full.log.influence(full.query, "kfac", damping=0.02)
    swapped = 0
    for m in ref.modules:
        f = torch.kron(ref.A[m], ref.S[m])
        inv = torch.linalg.inv(f + 0.02 * torch.eye(f.shape[0], dtype=torch.float64))
        swapped = swapped + ref.g_query[m] @ inv @ ref.g_train[m].T
    assert not torch.allclose(s.values.double(), swapped, rtol=1e-2)


def test_damping_dict_missing_a_module_is_a_config_error(full):
    for kind in CURVED:
        with pytest.raises(logix.ConfigError):
            full.log.influence(full.query, kind, damping={"0": 0.1})
        with pytest.raises(logix.ConfigError):
            full.log.self_influence(kind, damping={"2": 0.1})


@pytest.mark.parametrize("kind", CURVED)
def test_damping_dict_needs_only_the_scored_modules(full, kind):
    s = full.log.influence(full.query, kind, damping={"0": 0.05}, modules=["0"])
    assert_scores(columns_in(s, TRAIN_IDS), full.ref.scores(kind, {"0": 0.05, "2": 1.0}, modules=["0"]))


# -- self-influence --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_self_influence_is_the_diagonal_of_pairwise_scores(full, kind):
    si = full.log.self_influence(kind)
    assert list(si.ids) == TRAIN_IDS
    pairwise = full.log.influence(full.train_query, kind)
    assert full.train_query.ids.tolist() == TRAIN_IDS
    assert_scores(si.values, torch.diagonal(columns_in(pairwise, TRAIN_IDS)))
    assert_scores(si.values, full.ref.self_influence(kind))
    assert (si.values > 0).all()


@pytest.mark.parametrize("kind", CURVED)
def test_self_influence_with_explicit_damping_and_modules(full, kind):
    si = full.log.self_influence(kind, damping=0.05)
    assert_scores(si.values, full.ref.self_influence(kind, 0.05))
    si = full.log.self_influence(kind, damping_factor=0.3, modules=["2"])
    assert_scores(si.values, full.ref.self_influence(kind, factor=0.3, modules=["2"]))


@pytest.mark.parametrize("kind", KINDS)
def test_stored_self_influence_equals_a_recomputed_one(full, kind):
    with h5py.File(full.log.path / statistics_file(full.log), "r") as f:
        stored = torch.from_numpy(f[f"self_influence/{kind}"][()])
    fresh = logix.open(full.log.path)  # no cache
    read_back = fresh.self_influence(kind)
    assert_scores(read_back.values, stored, rtol=0)
    recomputed = fresh.self_influence(kind, damping=full.ref.damping(kind))
    assert_scores(recomputed.values, stored, rtol=1e-6)
    assert_scores(stored, full.ref.self_influence(kind))


def test_self_influence_top_k(full):
    si = full.log.self_influence("ekfac")
    order = np.argsort(-si.values.numpy())
    ids, values = si.top_k(5)
    assert list(ids) == list(si.ids[order[:5]])
    assert_scores(values, si.values[order[:5]], rtol=0)
    ids, values = si.top_k(3, largest=False)
    assert list(ids) == list(si.ids[order[::-1][:3]])


# -- normalised modes ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["cosine", "relative"])
def test_normalised_modes_equal_their_definitions(full, kind, mode):
    s = full.log.influence(full.query, kind, mode=mode)
    assert_scores(columns_in(s, TRAIN_IDS), full.ref.scores(kind, mode=mode))
    if mode == "cosine":
        assert (s.values.abs() <= 1 + 1e-5).all()


@pytest.mark.parametrize("mode", ["cosine", "relative"])
def test_normalised_modes_with_damping_modules_and_train_ids(full, mode):
    ref = full.ref
    s = full.log.influence(full.query, "kfac", mode=mode, damping=0.07)
    assert_scores(columns_in(s, TRAIN_IDS), ref.scores("kfac", 0.07, mode=mode))
    s = full.log.influence(full.query, "ekfac", mode=mode, damping_factor=0.25, modules=["0"])
    assert_scores(columns_in(s, TRAIN_IDS), ref.scores("ekfac", factor=0.25, modules=["0"], mode=mode))
    wanted = TRAIN_IDS[3::4]
    s = full.log.influence(full.query, "raw", mode=mode, train_ids=wanted, block_rows=7)
    assert sorted(s.train_ids.tolist()) == sorted(wanted)
    columns = [TRAIN_IDS.index(i) for i in s.train_ids]
    assert_scores(s.values, ref.scores("raw", mode=mode)[:, columns])


@pytest.mark.parametrize("kind", KINDS)
def test_cosine_of_a_train_example_with_itself_is_one(full, kind):
    s = full.log.influence(full.train_query, kind, mode="cosine")
    diagonal = torch.diagonal(columns_in(s, TRAIN_IDS))
    torch.testing.assert_close(diagonal, torch.ones(N_TRAIN), rtol=0, atol=1e-5)
    assert (s.values <= 1 + 1e-5).all()


# -- streaming, top-k and selections ---------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
@pytest.mark.parametrize("kind,mode", [("identity", "dot"), ("ekfac", "dot"), ("kfac", "cosine")])
def test_scores_do_not_depend_on_block_rows(full, block_rows, kind, mode):
    whole = full.log.influence(full.query, kind, mode=mode)
    blocked = full.log.influence(full.query, kind, mode=mode, block_rows=block_rows)
    assert list(blocked.train_ids) == list(whole.train_ids)
    assert_scores(blocked.values, whole.values, rtol=1e-6)


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind,mode", [("identity", "dot"), ("ekfac", "dot"), ("kfac", "relative")])
def test_streamed_top_k_equals_sorting_the_full_matrix(full, block_rows, largest, kind, mode):
    k = 5
    whole = full.log.influence(full.query, kind, mode=mode, block_rows=block_rows)
    top = full.log.influence(full.query, kind, mode=mode, top_k=k, largest=largest, block_rows=block_rows)
    assert isinstance(top, TopK)
    assert top.query_ids.tolist() == QUERY_IDS
    assert top.values.shape == (N_QUERY, k) and top.ids.shape == (N_QUERY, k)
    values = whole.values.numpy()
    order = np.argsort(-values if largest else values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top.ids, whole.train_ids[order])
    assert_scores(top.values, np.take_along_axis(values, order, axis=1), rtol=0)
    # Scores.top_k agrees with the streamed one
    again = whole.top_k(k, largest=largest)
    np.testing.assert_array_equal(again.ids, top.ids)
    assert_scores(again.values, top.values, rtol=0)


def test_top_k_larger_than_the_log_returns_everything_sorted(full):
    top = full.log.influence(full.query, "kfac", top_k=N_TRAIN + 5, block_rows=7)
    whole = full.log.influence(full.query, "kfac", block_rows=7)
    assert top.values.shape == (N_QUERY, N_TRAIN)
    expected, _ = torch.sort(whole.values, dim=1, descending=True)
    assert_scores(top.values, expected, rtol=0)
    for q in range(N_QUERY):
        assert sorted(top.ids[q].tolist()) == sorted(TRAIN_IDS)


@pytest.mark.parametrize("kind", KINDS)
def test_modules_restrict_to_one_modules_contribution(full, kind):
    ref = full.ref
    parts = {}
    for m in ref.modules:
        parts[m] = full.log.influence(full.query, kind, modules=[m])
        assert_scores(columns_in(parts[m], TRAIN_IDS), ref.scores(kind, modules=[m]))
        assert not torch.allclose(parts[m].values.double(), ref.scores(kind).double(), rtol=1e-2)
    both = full.log.influence(full.query, kind, modules=["2", "0"])
    assert_scores(both.values, parts["0"].values + parts["2"].values, rtol=1e-5)
    assert_scores(both.values, full.log.influence(full.query, kind).values, rtol=1e-5)


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_train_ids_restrict_the_columns(full, block_rows):
    wanted = [TRAIN_IDS[i] for i in (0, 5, 6, 17, 39)]
    whole = full.log.influence(full.query, "ekfac")
    some = full.log.influence(full.query, "ekfac", train_ids=wanted, block_rows=block_rows)
    assert sorted(some.train_ids.tolist()) == sorted(wanted)
    assert_scores(some.values, columns_in(whole, some.train_ids), rtol=1e-6)
    top = full.log.influence(full.query, "ekfac", train_ids=wanted, top_k=2, block_rows=block_rows)
    assert set(top.ids.ravel().tolist()) <= set(wanted)
    np.testing.assert_array_equal(top.ids, some.top_k(2).ids)
    # ids as a numpy array work the same
    other = full.log.influence(full.query, "ekfac", train_ids=np.array(wanted), block_rows=block_rows)
    assert_scores(other.values, some.values, rtol=0)


# -- the sign ---------------------------------------------------------------------------------------


def test_positive_score_means_a_step_on_the_train_example_lowers_the_query_loss(full):
    """One SGD step on train example i (lr small) changes query q's loss by ~ -lr * score(q, i)."""
    s = columns_in(full.log.influence(full.query, "identity"), TRAIN_IDS).double()
    lr = 1e-4
    model64 = copy.deepcopy(full.model).double()
    checked = 0
    for q in range(N_QUERY):
        xq, yq = full.xq[q : q + 1].double(), full.yq[q : q + 1]
        for i in (int(s[q].argmax()), int(s[q].argmin())):
            model = copy.deepcopy(model64)
            before = ce(model(xq), yq).item()
            ce(model(full.x[i : i + 1].double()), full.y[i : i + 1]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
            change = ce(model(xq), yq).item() - before
            predicted = -lr * s[q, i].item()
            assert np.sign(change) == np.sign(predicted) != 0
            assert change == pytest.approx(predicted, rel=1e-2)
            checked += predicted < 0
    assert checked > 0, "no helpful example was checked"


# -- sequences: padding and masks --------------------------------------------------------------------

VOCAB, PAD = 11, 10


class SeqModel(nn.Module):
    """Embedding -> Linear -> tanh -> vocabulary head; position-wise, so padding cannot leak."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, 6)
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, tokens):
        return self.head(torch.tanh(self.fc(self.wte(tokens))))


def token_loss_sum(logits, labels):
    """Summed over the label tokens of the batch (after the shift): a sum of own losses."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def padded(lengths, gen):
    tokens = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(0, PAD, (n,), generator=gen)
        mask[i, :n] = 1
    return tokens, mask, tokens.masked_fill(mask == 0, -100)


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    """The same examples logged as one right-padded masked batch and one at a time, unpadded."""
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    model = SeqModel()
    lengths = [7, 4, 5, 2, 6, 3]
    ids = [f"s{i}" for i in range(len(lengths))]
    tokens, mask, labels = padded(lengths, gen)
    q_tokens, q_mask, q_labels = padded([5, 3, 6], gen)
    q_ids = ["qa", "qb", "qc"]
    init = dict(rank="full", statistics=["kfac", "ekfac", "raw"])
    logs = {}

    run = logix.init(tmp_path_factory.mktemp("padded") / "log", **init)
    run.watch(model)
    with run.capture(ids, mask=mask, reduction="sum"):
        token_loss_sum(model(tokens), labels).backward()
    model.zero_grad()
    run.finalize()
    logs["padded"] = logix.open(run.path)

    run = logix.init(tmp_path_factory.mktemp("alone") / "log", **init)
    run.watch(model)
    for i, n in enumerate(lengths):
        with run.capture([ids[i]], reduction="sum"):
            token_loss_sum(model(tokens[i : i + 1, :n]), labels[i : i + 1, :n]).backward()
        model.zero_grad()
    run.finalize()
    logs["alone"] = logix.open(run.path)

    queries = {}
    for name, log in logs.items():
        with log.query(model) as q:
            with q.capture(q_ids, mask=q_mask, reduction="sum"):
                token_loss_sum(model(q_tokens), q_labels).backward()
            model.zero_grad()
        queries[name] = q
    exact = [
        exact_gradients(model, token_loss_sum, tokens[i : i + 1, :n], labels[i : i + 1, :n])
        for i, n in enumerate(lengths)
    ]
    exact_q = [
        exact_gradients(model, token_loss_sum, q_tokens[i : i + 1, :n], q_labels[i : i + 1, :n])
        for i, n in enumerate([5, 3, 6])
    ]
    return dict(logs=logs, queries=queries, ids=ids, q_ids=q_ids, lengths=lengths, exact=exact, exact_q=exact_q)


def test_padded_batch_statistics_count_only_unmasked_positions(sequences):
    logs = sequences["logs"]
    positions = sum(sequences["lengths"])
    files = {name: h5py.File(log.path / statistics_file(log), "r") for name, log in logs.items()}
    try:
        for m in logs["padded"].modules:
            for name in files:
                assert float(files[name][m]["a_count"][()]) == positions, (name, m)
                assert float(files[name][m]["s_count"][()]) == len(sequences["ids"]), (name, m)
            assert_scores(files["padded"][m]["a"][()], files["alone"][m]["a"][()])
            assert_scores(files["padded"][m]["s"][()], files["alone"][m]["s"][()])
    finally:
        for f in files.values():
            f.close()


def test_sequence_identity_scores_are_exact_gradient_dot_products(sequences):
    s = sequences["logs"]["padded"].influence(sequences["queries"]["padded"], "identity")
    assert list(s.train_ids) == sequences["ids"] and s.query_ids.tolist() == sequences["q_ids"]
    flat = [{m: g[m].double().flatten() for m in g} for g in sequences["exact"]]
    flat_q = [{m: g[m].double().flatten() for m in g} for g in sequences["exact_q"]]
    expected = torch.tensor([[sum(float(gq[m] @ gt[m]) for m in gq) for gt in flat] for gq in flat_q])
    assert_scores(s.values, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["dot", "relative"])
def test_padded_and_unpadded_logs_give_the_same_scores(sequences, kind, mode):
    logs, queries = sequences["logs"], sequences["queries"]
    a = logs["padded"].influence(queries["padded"], kind, mode=mode)
    b = logs["alone"].influence(queries["alone"], kind, mode=mode)
    assert list(a.train_ids) == list(b.train_ids) == sequences["ids"]
    assert_scores(a.values, b.values)
    assert_scores(logs["padded"].self_influence(kind).values, logs["alone"].self_influence(kind).values)


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        lambda: mlp(4, 6, 3),  # another hidden size: both modules differ
        lambda: mlp(4, 5, 2),  # another head
        lambda: nn.Sequential(nn.Linear(4, 5)),  # module "2" missing
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)),  # no bias
    ],
    ids=["hidden-size", "head", "missing-module", "no-bias"],
)
def test_a_model_that_does_not_match_the_log(full, other):
    with pytest.raises(logix.ModelMismatchError):
        full.log.query(other())


def test_query_capture_without_backward(full):
    with full.log.query(full.model) as q:
        with pytest.raises(logix.CaptureError):
            with q.capture(["a", "b"]):
                full.model(full.xq[:2])
    assert len(q) == 0
    with pytest.raises(logix.ConfigError):
        full.log.influence(q, "identity")


def test_an_empty_query_is_a_config_error(full):
    with full.log.query(full.model) as q:
        pass
    for kind in KINDS:
        with pytest.raises(logix.ConfigError):
            full.log.influence(q, kind)
        with pytest.raises(logix.ConfigError):
            full.log.influence(q, kind, top_k=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(preconditioner="kfca"),
        dict(preconditioner=None),
        dict(mode="dots"),
        dict(mode="COSINE"),
        dict(top_k=0),
        dict(top_k=-2),
        dict(top_k=2.5),
        dict(top_k=True),
        dict(top_k="3"),
        dict(preconditioner="kfac", damping=-1.0),
        dict(preconditioner="kfac", damping=float("nan")),
        dict(preconditioner="ekfac", damping={"0": 0.1, "2": -0.1}),
        dict(preconditioner="raw", damping_factor=0.0),
        dict(preconditioner="kfac", damping_factor=float("inf")),
    ],
    ids=repr,
)
def test_bad_arguments_are_config_errors(full, kwargs):
    with pytest.raises(logix.ConfigError):
        full.log.influence(full.query, **kwargs)


def _small_train(path, **init):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = mlp(4, 5, 3)
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    run = logix.init(path, **init)
    run.watch(model)
    for start in (0, 10):
        with run.capture(list(range(start, start + 10))):
            ce(model(x[start : start + 10]), y[start : start + 10]).backward()
        model.zero_grad()
    return run, model, x, y


def _assert_needs_statistics(log, model, x, y, kinds=("raw", "kfac", "ekfac")):
    q = capture_query(log, model, [(["q"], x[:1], y[:1])])
    identity = log.influence(q, "identity")
    assert identity.values.shape == (1, len(log)) and torch.isfinite(identity.values).all()
    for kind in kinds:
        with pytest.raises(logix.LogFormatError):
            log.influence(q, kind)
        with pytest.raises(logix.LogFormatError):
            log.influence(q, kind, mode="cosine")
        with pytest.raises(logix.LogFormatError):
            log.self_influence(kind)


def test_curvature_of_a_log_without_statistics(tmp_path):
    run, model, x, y = _small_train(tmp_path / "log", rank="full")
    run.finalize()
    _assert_needs_statistics(logix.open(tmp_path / "log"), model, x, y)


def test_curvature_of_a_closed_unfinalized_log(tmp_path):
    run, model, x, y = _small_train(tmp_path / "log", rank="full", statistics="ekfac")
    run.close()
    _assert_needs_statistics(logix.open(tmp_path / "log"), model, x, y)


def test_curvature_of_a_flushed_open_pass(tmp_path):
    run, model, x, y = _small_train(tmp_path / "log", rank="full", statistics=["kfac", "ekfac", "raw"])
    try:
        run.flush()
        log = logix.open(tmp_path / "log")
        assert len(log) == 20
        _assert_needs_statistics(log, model, x, y)
    finally:
        run.close()


def test_statistics_not_gathered_are_format_errors(tmp_path):
    run, model, x, y = _small_train(tmp_path / "log", rank="full", statistics="kfac")
    run.finalize()
    log = logix.open(tmp_path / "log")
    _assert_needs_statistics(log, model, x, y, kinds=("raw", "ekfac"))
    q = capture_query(log, model, [(["q"], x[:1], y[:1])])
    assert torch.isfinite(log.influence(q, "kfac").values).all()


def test_a_non_finite_batch_is_left_out_of_the_statistics(tmp_path):
    """A NaN input in one batch: its rows are flagged, its covariances skipped, the rest is exact."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = mlp(4, 5, 3)
    x, y = torch.randn(N_TRAIN, 4, generator=gen), torch.randint(0, 3, (N_TRAIN,), generator=gen)
    xq, yq = torch.randn(N_QUERY, 4, generator=gen), torch.randint(0, 3, (N_QUERY,), generator=gen)
    bad = 2 * BATCH + 3  # one example of the third batch
    x_bad = x.clone()
    x_bad[bad, 1] = float("nan")
    log = train_log(tmp_path / "log", model, x_bad, y, rank="full", statistics=["kfac", "ekfac", "raw"])
    assert log.flagged_ids.tolist() == [TRAIN_IDS[bad]]
    assert len(log) == N_TRAIN - 1
    skipped = list(range(2 * BATCH, 3 * BATCH))
    clean = [i for i in range(N_TRAIN) if i not in skipped]
    ref = mlp_reference(model, x[clean], y[clean], xq, yq)
    with h5py.File(log.path / statistics_file(log), "r") as f:
        for m in log.modules:
            assert float(f[m]["a_count"][()]) == N_TRAIN - BATCH
            assert float(f[m]["s_count"][()]) == N_TRAIN - BATCH
            assert float(f[m]["skipped"][()]) == 1
            for key in ("a", "s", "eig_a", "eig_s", "lambda_star", "fisher"):
                assert np.isfinite(f[m][key][()]).all(), (m, key)
            assert_scores(f[m]["a"][()], ref.A[m])
            assert_scores(f[m]["s"][()], ref.S[m])
    q = capture_query(log, model, [(QUERY_IDS, xq, yq)])
    for kind in KINDS:
        s = log.influence(q, kind)
        assert torch.isfinite(s.values).all(), kind
        assert TRAIN_IDS[bad] not in s.train_ids.tolist()
        assert torch.isfinite(log.self_influence(kind).values).all(), kind
    # kfac comes from the clean batches only: equal to the reference built from them
    s = log.influence(q, "kfac", damping=0.02)
    clean_ids = [TRAIN_IDS[i] for i in clean]
    assert_scores(columns_in(s, clean_ids), ref.scores("kfac", 0.02))


# -- results on disk -------------------------------------------------------------------------------


def test_results_round_trip_through_hdf5(full, tmp_path):
    scores = full.log.influence(full.query, "ekfac")
    scores.save(tmp_path / "scores.h5")
    back = logix.Scores.load(tmp_path / "scores.h5")
    assert torch.equal(back.values, scores.values)
    np.testing.assert_array_equal(back.query_ids, scores.query_ids)
    np.testing.assert_array_equal(back.train_ids, scores.train_ids)
    top = full.log.influence(full.query, "kfac", top_k=3)
    top.save(tmp_path / "top.h5")
    back = logix.TopK.load(tmp_path / "top.h5")
    assert torch.equal(back.values, top.values) and (back.ids == top.ids).all()
    si = full.log.self_influence("raw")
    si.save(tmp_path / "si.h5")
    assert torch.equal(logix.SelfInfluence.load(tmp_path / "si.h5").values, si.values)
    with pytest.raises(logix.LogFormatError):
        logix.Scores.load(tmp_path / "si.h5")


@pytest.mark.parametrize(
    "statistics, chosen",
    [
        (("kfac", "ekfac", "raw"), "ekfac"),
        ("kfac", "kfac"),
        ("raw", "raw"),
        (("ekfac", "row"), "ekfac"),  # row from the pass's own rows comes after the per-module blocks
        ("row", "row"),
        ((), "identity"),
    ],
)
def test_auto_preconditioner_takes_the_best_statistics_the_pass_has(tmp_path, statistics, chosen):
    """preconditioner="auto" (the default), without a curvature pass: ekfac, else kfac, else raw, else row,
    else identity, as the README says (with one, row first: tests/test_row_preconditioner.py)."""
    torch.manual_seed(0)
    model = mlp(4, 3, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with logix.init(tmp_path / "log", rank="full", statistics=statistics) as run:
        run.watch(model)
        with run.capture(list(range(8))):
            ce(model(x), y).mean().backward()
    log = logix.open(tmp_path / "log")
    with log.query(model) as q:
        with q.capture(["a", "b"]):
            ce(model(x[:2] * 0.5), y[:2]).mean().backward()
    assert logix.curvature.resolve_preconditioner(log, "auto") == chosen
    torch.testing.assert_close(log.influence(q).values, log.influence(q, chosen).values, rtol=0, atol=0)
    torch.testing.assert_close(log.self_influence().values, log.self_influence(chosen).values, rtol=0, atol=0)


def test_auto_preconditioner_is_identity_until_the_pass_is_finalized(tmp_path):
    torch.manual_seed(0)
    model = mlp(4, 3, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    run = logix.init(tmp_path / "log", rank="full", statistics="ekfac")
    run.watch(model)
    with run.capture(list(range(8))):
        ce(model(x), y).mean().backward()
    run.flush()
    try:
        assert logix.curvature.resolve_preconditioner(logix.open(tmp_path / "log"), "auto") == "identity"
    finally:
        run.finalize()
    assert logix.curvature.resolve_preconditioner(logix.open(tmp_path / "log"), "auto") == "ekfac"


# -- aggregate influence over a query set ----------------------------------------------------------


GROUPS = ["b", "a", "b", "c", "a", "b"]  # one label per query row; first appearances: b, a, c


def grouped(values: torch.Tensor, labels, reduce: str) -> torch.Tensor:
    """Rows of `values` summed (or averaged) per label, in order of first appearance."""
    order = list(dict.fromkeys(labels))
    out = torch.stack([values[[i for i, g in enumerate(labels) if g == label]].sum(dim=0) for label in order])
    if reduce == "mean":
        out = out / torch.tensor([labels.count(label) for label in order], dtype=out.dtype)[:, None]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["dot", "cosine", "relative"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_aggregate_influence_is_the_reference_summed_over_queries(gaussian, kind, mode, reduce):
    """One score per train example for the whole query set, exact in every mode, streamed in
    blocks (7 rows: does not divide the 40 train rows)."""
    s = gaussian.log.influence(gaussian.query, kind, mode=mode, aggregate=reduce, block_rows=7)
    assert s.values.shape == (1, N_TRAIN) and s.query_ids.tolist() == [reduce]
    expected = gaussian.ref.scores(kind, mode=mode)
    expected = expected.sum(dim=0, keepdim=True) / (N_QUERY if reduce == "mean" else 1)
    assert_scores(columns_in(s, TRAIN_IDS), expected)


@pytest.mark.parametrize("mode", ["dot", "cosine", "relative"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_aggregate_influence_per_query_group(gaussian, mode, reduce):
    s = gaussian.log.influence(gaussian.query, "ekfac", mode=mode, aggregate=reduce, query_groups=GROUPS, block_rows=9)
    assert s.query_ids.tolist() == ["b", "a", "c"]
    expected = grouped(gaussian.ref.scores("ekfac", mode=mode), GROUPS, reduce)
    assert_scores(columns_in(s, TRAIN_IDS), expected)


def test_aggregate_top_k_train_ids_and_shards_agree_with_the_whole(gaussian):
    log, query = gaussian.log, gaussian.query
    whole = log.influence(query, "kfac", aggregate="sum", query_groups=GROUPS)
    top = log.influence(query, "kfac", aggregate="sum", query_groups=GROUPS, top_k=5, block_rows=6)
    want_v, want_i = torch.topk(whole.values, 5, dim=1)
    assert_scores(top.values, want_v)
    assert top.ids.tolist() == [[int(whole.train_ids[j]) for j in row] for row in want_i.tolist()]
    subset = TRAIN_IDS[::3]
    part = log.influence(query, "kfac", aggregate="mean", train_ids=subset)
    assert_scores(columns_in(part, subset), columns_in(log.influence(query, "kfac", aggregate="mean"), subset))
    shards = [log.influence(query, "kfac", aggregate="sum", shard=(i, 3)) for i in range(3)]
    merged = logix.Scores.merge(shards)
    assert_scores(columns_in(merged, TRAIN_IDS), columns_in(log.influence(query, "kfac", aggregate="sum"), TRAIN_IDS))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aggregate": "max"}, "aggregate must be one of"),
        ({"aggregate": True}, "aggregate must be one of"),
        ({"aggregate": "sum", "query_groups": ["a", "b"]}, r"one int or str label per query row \(6\)"),
        ({"aggregate": "sum", "query_groups": [1.5] * N_QUERY}, "one int or str label per query row"),
        ({"query_groups": GROUPS}, "query_groups needs aggregate"),
    ],
)
def test_aggregate_refuses_what_it_cannot_mean(gaussian, kwargs, message):
    with pytest.raises(logix.ConfigError, match=message):
        gaussian.log.influence(gaussian.query, "identity", **kwargs)
