"""One convention for every result type: ids are numpy arrays, values torch tensors.

ids are int64 arrays for int ids and object arrays of str for string ids, as `Log.ids` gives them;
every top-k is a TopK named tuple (ids, values) that unpacks like a 2-tuple, and a per-query one
carries query_ids as an attribute. Checked on real tiny logs, through save/load, merge and pickle.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix import ConfigError, Scores, SelfInfluence, TopK

N_TRAIN, K = 8, 3
IDS = {
    "int": ([10 + 3 * i for i in range(N_TRAIN)], [100, 7]),
    "str": ([f"train{i}" for i in range(N_TRAIN)], ["qa", "qb"]),
}


@pytest.fixture(scope="module", params=list(IDS))
def logged(request, tmp_path_factory):
    """(log, query, train ids, query ids) for a Linear(3, 2) trained on 8 examples in two batches."""
    train_ids, query_ids = IDS[request.param]
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(N_TRAIN, 3), torch.randint(0, 2, (N_TRAIN,))
    path = tmp_path_factory.mktemp(request.param) / "log"
    run = logix.init(path, rank="full")
    run.watch(model)
    for start in (0, 4):
        with run.capture(train_ids[start : start + 4]):
            F.cross_entropy(model(x[start : start + 4]), y[start : start + 4]).backward()
        model.zero_grad()
    run.finalize()
    log = logix.open(path)
    query = log.query(model)
    with query.capture(query_ids):
        F.cross_entropy(model(x[:2] + 1.0), y[:2]).backward()
    model.zero_grad()
    return log, query, train_ids, query_ids


def assert_ids(array, expected: list, shape=None) -> None:
    """A numpy id array of the convention's dtype holding exactly `expected` (flattened)."""
    assert isinstance(array, np.ndarray), type(array)
    if isinstance(expected[0], str):
        assert array.dtype == object and all(type(i) is str for i in array.flat)
    else:
        assert array.dtype == np.int64
    assert array.reshape(-1).tolist() == expected
    if shape is not None:
        assert array.shape == shape


def assert_same_result(a, b) -> None:
    """Same type, and every field of the same type, dtype and value."""
    assert type(a) is type(b)
    fields = {"ids", "values", "query_ids", "train_ids"}
    for name in sorted(f for f in fields if hasattr(a, f)):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
        elif isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), name
        else:
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.tolist() == y.tolist(), name


# -- the types of every field ----------------------------------------------------------------------


def test_query_ids_are_numpy(logged):
    _, query, _, query_ids = logged
    assert_ids(query.ids, query_ids, shape=(2,))


def test_scores_fields(logged):
    log, query, train_ids, query_ids = logged
    s = log.influence(query)
    assert isinstance(s, Scores)
    assert isinstance(s.values, torch.Tensor) and s.values.dtype == torch.float32
    assert s.values.shape == (2, N_TRAIN)
    assert_ids(s.query_ids, query_ids)
    assert_ids(s.train_ids, train_ids)
    torch.testing.assert_close(s.values, query.rows @ log.rows().T)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "from_scores"])
def test_per_query_top_k_is_a_named_tuple_with_query_ids(logged, streamed):
    log, query, train_ids, query_ids = logged
    s = log.influence(query)
    top = log.influence(query, top_k=K, block_rows=3) if streamed else s.top_k(K)
    assert isinstance(top, TopK) and isinstance(top, tuple) and len(top) == 2
    ids, values = top  # unpacks like the old 2-tuple, query_ids is not a field
    assert ids is top.ids and values is top.values and top[0] is ids and top[1] is values
    assert top._fields == ("ids", "values")
    assert isinstance(values, torch.Tensor) and values.shape == (2, K)
    order = torch.argsort(s.values, dim=1, descending=True)[:, :K]
    expected = np.asarray(train_ids, dtype=object)[order.numpy()].reshape(-1).tolist()
    assert_ids(ids, expected, shape=(2, K))
    torch.testing.assert_close(values, torch.gather(s.values, 1, order))
    assert_ids(top.query_ids, query_ids)
    assert repr(top) == f"TopK(queries=2, k={K})"


def test_self_influence_fields_and_top_k(logged):
    log, _, train_ids, _ = logged
    si = log.self_influence()
    assert isinstance(si, SelfInfluence)
    assert isinstance(si.values, torch.Tensor) and si.values.dtype == torch.float64 and si.values.shape == (N_TRAIN,)
    assert_ids(si.ids, train_ids)
    torch.testing.assert_close(si.values, (log.rows().double() ** 2).sum(dim=1))
    top = si.top_k(K, largest=False)
    assert isinstance(top, TopK) and len(top) == 2 and top.query_ids is None
    ids, values = top
    order = torch.argsort(si.values)[:K].numpy()
    assert_ids(ids, np.asarray(train_ids, dtype=object)[order].tolist(), shape=(K,))
    assert torch.equal(values, si.values[order])
    assert repr(top) == f"TopK(k={K})"


def test_empty_results_keep_the_log_id_dtype(logged):
    """No train row selected: the ids still follow the convention (not a float array of nothing)."""
    log, query, _, query_ids = logged
    kind = log.ids.dtype
    s = log.influence(query, train_ids=[])
    assert s.train_ids.dtype == kind and s.train_ids.shape == (0,) and s.values.shape == (2, 0)
    top = log.influence(query, train_ids=[], top_k=K)
    assert top.ids.dtype == kind and top.ids.shape == (2, 0) and isinstance(top.values, torch.Tensor)
    assert_ids(top.query_ids, query_ids)


# -- save / load, merge, pickle --------------------------------------------------------------------


def test_save_load_round_trip_preserves_types_and_values(logged, tmp_path):
    log, query, _, _ = logged
    results = {
        "scores": log.influence(query),
        "top": log.influence(query, top_k=K),
        "self": log.self_influence(),
        "self_top": log.self_influence().top_k(K),
    }
    for name, result in results.items():
        result.save(tmp_path / f"{name}.h5")
        back = type(result).load(tmp_path / f"{name}.h5")
        assert_same_result(back, result)
    ids, values = TopK.load(tmp_path / "top.h5")  # a loaded top-k still unpacks
    assert torch.equal(values, results["top"].values) and ids.tolist() == results["top"].ids.tolist()
    with pytest.raises(logix.LogFormatError):
        TopK.load(tmp_path / "scores.h5")


def test_merge_of_shards_equals_the_whole(logged):
    log, query, _, _ = logged
    whole = log.influence(query)
    scores = Scores.merge([log.influence(query, shard=(i, 3)) for i in range(3)])
    assert_same_result(scores, whole)
    parts = [log.influence(query, top_k=K, shard=(i, 3)) for i in range(3)]
    assert_same_result(TopK.merge(parts), whole.top_k(K))
    lowest = [log.influence(query, top_k=K, largest=False, shard=(i, 3)) for i in range(3)]
    assert_same_result(TopK.merge(lowest, largest=False), whole.top_k(K, largest=False))
    si = log.self_influence()
    halves = [SelfInfluence(si.values[:5], si.ids[:5]).top_k(K), SelfInfluence(si.values[5:], si.ids[5:]).top_k(K)]
    assert_same_result(TopK.merge(halves), si.top_k(K))


def test_merge_refuses_parts_of_different_queries(logged):
    log, query, _, _ = logged
    a, b = log.influence(query, top_k=K), log.influence(query, top_k=K)
    other = TopK(b.ids, b.values, b.query_ids[::-1])
    with pytest.raises(ConfigError, match="different queries"):
        TopK.merge([a, other])
    s = log.influence(query)
    with pytest.raises(ConfigError, match="different queries"):
        Scores.merge([s, Scores(s.values, s.query_ids[::-1], s.train_ids)])


def test_pickle_keeps_query_ids(logged):
    """across_ranks gathers results by pickling them: the attribute must survive."""
    log, query, _, _ = logged
    top = log.influence(query, top_k=K)
    assert_same_result(pickle.loads(pickle.dumps(top)), top)
    assert_same_result(top._replace(values=top.values * 2)._replace(values=top.values), top)


def test_constructors_normalise_lists_to_the_convention():
    s = Scores(torch.zeros(2, 3), ["a", "b"], [5, 6, 7])
    assert s.query_ids.dtype == object and s.train_ids.dtype == np.int64
    top = TopK([[1, 2]], np.array([[0.5, 0.25]]), [9])
    assert isinstance(top.values, torch.Tensor) and top.ids.dtype == np.int64 and top.query_ids.dtype == np.int64
    with pytest.raises(TypeError):
        SelfInfluence(torch.zeros(2), [0.5, 1.5])  # float ids are not ids
