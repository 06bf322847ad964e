"""Two processes on gloo (CPU, loopback): a log written by two ranks reads, scores and fails like a
log written by one process. The ranks run tests/distributed_worker.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import logix
from logix.disk import SEGMENTS

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world: int = 2, timeout: float = 120) -> list[dict]:
    """Run `scenario` on `world` ranks; each rank's JSON result, in rank order.

    The port is free when chosen but another process may take it before rank 0 listens: then the
    scenario runs again on another port."""
    for attempt in range(3):
        try:
            return _launch(scenario, out, world, timeout)
        except PortTaken:
            for rank in range(world):
                (out / f"rank{rank}.json").unlink(missing_ok=True)
            if attempt == 2:
                raise


class PortTaken(Exception):
    pass


def _read(log) -> str:
    log.flush()
    return Path(log.name).read_text()


def _launch(scenario: str, out: Path, world: int, timeout: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, str(WORKER), scenario, str(out)]
        log = open(out / f"rank{rank}.out", "w+")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p, _ in procs):
            taken = any(p.poll() is not None and "EADDRINUSE" in _read(log) for p, log in procs)
            if taken or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        outputs = [_read(log) for _, log in procs]
        if any("EADDRINUSE" in output for output in outputs):
            raise PortTaken(outputs)
        if any(p.poll() is None for p, _ in procs):
            pytest.fail(f"scenario {scenario!r} hung; output so far: {outputs}")
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    procs = [p for p, _ in procs]
    results = []
    for rank, (p, output) in enumerate(zip(procs, outputs)):
        file = out / f"rank{rank}.json"
        assert file.exists(), f"rank {rank} wrote no result (exit {p.returncode}):\n{output}"
        result = json.loads(file.read_text())
        assert "exception" not in result, f"rank {rank} raised:\n{result['exception']}"
        results.append(result)
        file.unlink()
    return results


@pytest.fixture(scope="module")
def two_rank_log(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    launch("log", out)
    return out


@pytest.fixture(scope="module")
def one_process_log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "log"
    worker.log_pass(path, worker.model(), worker.loader_for(1, 0))
    return path


def by_id(log: logix.Log, module: str) -> dict:
    return {int(i): g for i, g in zip(log.ids, log.gradients(module))}


def test_every_rank_segment_is_in_the_manifest_and_ids_are_complete(two_rank_log):
    log = logix.open(two_rank_log / "log")
    segments = log.current.segments
    assert sorted(s.rank for s in segments) == [0, 1]
    assert log.current.finalized
    # 45 examples on 2 ranks: the sampler repeats one to make 46, and the repeat is not logged twice
    assert sorted(log.ids.tolist()) == list(range(worker.N))


def test_rows_and_statistics_equal_a_one_process_log(two_rank_log, one_process_log):
    two, one = logix.open(two_rank_log / "log"), logix.open(one_process_log)
    assert two.modules == one.modules
    for name in one.modules:
        a, b = by_id(two, name), by_id(one, name)
        for i in range(worker.N):
            torch.testing.assert_close(a[i], b[i], rtol=1e-5, atol=1e-6)
    net = worker.model()
    x, y = worker.data()
    queries = []
    for log in (two, one):
        with log.query(net) as q:
            with q.capture(["q0", "q1"]):
                torch.nn.functional.cross_entropy(net(x[:2] * 0.5), y[:2]).backward()
        queries.append(q)
    for pre in ("identity", "kfac", "ekfac"):
        s2, s1 = two.influence(queries[0], pre), one.influence(queries[1], pre)
        order2, order1 = np.argsort(s2.train_ids), np.argsort(s1.train_ids)
        torch.testing.assert_close(s2.values[:, order2], s1.values[:, order1], rtol=1e-4, atol=1e-6)
    si2, si1 = two.self_influence("ekfac"), one.self_influence("ekfac")
    torch.testing.assert_close(si2.values[np.argsort(si2.ids)], si1.values[np.argsort(si1.ids)], rtol=1e-4, atol=1e-8)


def test_scoring_split_across_ranks_equals_one_process(two_rank_log, one_process_log):
    results = launch("score", two_rank_log)
    assert results[0] == results[1]  # every rank holds the merged answer
    log = logix.open(one_process_log)
    net = worker.model()
    x, y = worker.data()
    with log.query(net) as q:
        with q.capture(["q0", "q1"]):
            torch.nn.functional.cross_entropy(net(x[:2] * 0.5), y[:2]).backward()
    top = log.influence(q, "ekfac", top_k=5)
    assert results[0]["top_ids"] == top.ids.tolist()
    torch.testing.assert_close(torch.tensor(results[0]["top_values"]), top.values, rtol=1e-4, atol=1e-6)
    full = log.influence(q, "ekfac")
    split_ids = np.array(results[0]["train_ids"])
    order = np.argsort(split_ids)
    torch.testing.assert_close(
        torch.tensor(results[0]["values"])[:, order], full.values[:, np.argsort(full.train_ids)], rtol=1e-4, atol=1e-6
    )


def test_a_missing_rank_segment_is_an_error_not_zeros(two_rank_log, tmp_path):
    import shutil

    copy = tmp_path / "log"
    shutil.copytree(two_rank_log / "log", copy)
    (victim,) = (copy / SEGMENTS).glob("*-r1-*.h5")
    victim.unlink()
    with pytest.raises(logix.LogFormatError, match="missing"):
        logix.open(copy).gradients("0")


def test_ranks_with_different_configs_are_refused(tmp_path):
    results = launch("config_mismatch", tmp_path)
    for result in results:
        assert result["error"] is not None and "different configs" in result["error"]
        assert "rank 1" in result["error"]


def test_ranks_watching_different_modules_are_refused(tmp_path):
    results = launch("module_mismatch", tmp_path)
    for result in results:
        assert result["error"] is not None and "ranks [1] watch different modules" in result["error"]


def test_attribution_across_training_from_two_ranks_equals_one_process(tmp_path):
    """The same rows, logged by two ranks or by one process whose batches join the ranks' batches:
    Source and TracIn across the two passes agree to 1e-5."""
    from torch.utils.data import DistributedSampler, TensorDataset

    launch("across", tmp_path)
    x, y = worker.data()
    dataset = TensorDataset(torch.arange(worker.N), x, y)
    per_rank = [list(DistributedSampler(dataset, 2, r, shuffle=True, seed=1)) for r in range(2)]
    batches, seen = [], set()  # the sampler pads with a repeat: the lower rank's step keeps it, as logix does
    for step in range(0, len(per_rank[0]), worker.BATCH):
        joined = []
        for r in range(2):
            joined += [i for i in per_rank[r][step : step + worker.BATCH] if i not in seen and i not in joined]
        seen.update(joined)
        batches.append(joined)
    net = worker.model()
    with logix.init(tmp_path / "one", rank=4, statistics="ekfac") as run:
        run.watch(net)
        for p in range(2):
            run.start_pass(f"epoch{p}", lr=0.1 * (p + 1))
            for ids in batches:
                with run.capture(ids):
                    torch.nn.functional.cross_entropy(net(x[ids]), y[ids]).backward()
                net.zero_grad()

    def queries(q, model):
        with q.capture(["q0", "q1"]):
            torch.nn.functional.cross_entropy(model(x[:2] * 0.5), y[:2]).backward()

    two, one = logix.open(tmp_path / "across"), logix.open(tmp_path / "one")
    assert sorted(two.ids.tolist()) == sorted(one.ids.tolist()) == list(range(worker.N))
    for method, kw in (("source", {}), ("tracin", {"models": {"epoch0": net, "epoch1": net}})):
        a = two.influence_across_training(net, queries, method=method, **kw)
        b = one.influence_across_training(net, queries, method=method, **kw)
        a_values = a.values[:, np.argsort(a.train_ids)]
        b_values = b.values[:, np.argsort(b.train_ids)]
        assert float((a_values - b_values).norm() / b_values.norm()) < 1e-5, method
