"""One rank of a multi-process test: `python distributed_worker.py SCENARIO OUTDIR` with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (tests/test_distributed.py starts two of them).

Every scenario writes `OUTDIR/rank{R}.json` with what the test checks, so that a failure in a
worker shows up as an assertion in the test rather than a hang.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import logix

N, D, CLASSES, BATCH = 45, 10, 3, 4  # 45 examples on 2 ranks: the sampler pads one repeat


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def log_pass(path: Path, net: nn.Module, loader, rank=4, statistics="ekfac", **init) -> None:
    """A logging pass at fixed parameters (no optimizer step), as at a checkpoint."""
    run = logix.init(path, rank=rank, statistics=statistics, **init)
    run.watch(net)
    run.start_pass("checkpoint")
    for ids, x, y in loader:
        with run.capture(ids):
            F.cross_entropy(net(x), y).backward()
        net.zero_grad()
    run.finalize()


def loader_for(world: int, rank: int):
    x, y = data()
    dataset = TensorDataset(torch.arange(N), x, y)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=1) if world > 1 else None
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler)


def scenario_log(out: Path, rank: int, world: int) -> dict:
    net = DistributedDataParallel(model())
    log_pass(out / "log", net, loader_for(world, rank))
    return {"ok": True}


def scenario_score(out: Path, rank: int, world: int) -> dict:
    """Every rank scores its slice of a finished log; every rank gets the merged answer."""
    log = logix.open(out / "log")
    net = model()
    x, y = data()
    with log.query(net) as q:
        with q.capture(["q0", "q1"]):
            F.cross_entropy(net(x[:2] * 0.5), y[:2]).backward()
    top = log.influence(q, "ekfac", top_k=5, across_ranks=True)
    scores = log.influence(q, "ekfac", across_ranks=True)
    return {"top_ids": top.ids.tolist(), "top_values": top.values.tolist(), "train_ids": scores.train_ids.tolist(),
            "values": scores.values.tolist()}


def scenario_across(out: Path, rank: int, world: int) -> dict:
    """Two passes at fixed parameters (learning rates 0.1 and 0.2), each rank its share of every batch."""
    net = model()
    with logix.init(out / "across", rank=4, statistics="ekfac") as run:
        run.watch(net)
        for p in range(2):
            run.start_pass(f"epoch{p}", lr=0.1 * (p + 1))
            for ids, x, y in loader_for(world, rank):
                with run.capture(ids):
                    F.cross_entropy(net(x), y).backward()
                net.zero_grad()
    return {"ok": True}


def scenario_config_mismatch(out: Path, rank: int, world: int) -> dict:
    try:
        logix.init(out / "log", rank=4 if rank == 0 else 8)
    except logix.ConfigError as e:
        return {"error": str(e)}
    return {"error": None}


def scenario_module_mismatch(out: Path, rank: int, world: int) -> dict:
    run = logix.init(out / "log", rank=4)
    try:
        run.watch(model(), exclude=["2"] if rank == 1 else ())
    except logix.ModelMismatchError as e:
        return {"error": str(e)}
    return {"error": None}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = globals()[f"scenario_{scenario}"](out, rank, world)
    except BaseException:
        result = {"exception": traceback.format_exc()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
