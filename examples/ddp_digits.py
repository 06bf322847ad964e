"""The digits example on several processes: data-parallel training with Accelerate, every rank
logging its own examples into one log, then attribution split across the ranks.

    accelerate launch --cpu --num_processes 2 examples/ddp_digits.py [--out runs/ddp_digits]
    torchrun --nproc_per_node 2 examples/ddp_digits.py        # the same, launched by torch

The loop is an ordinary Accelerate loop; the logix lines are marked. Each rank writes its own
segment files; finalize (on every rank) all-reduces the EK-FAC statistics and records every
rank's segments, so the log reads as if one process had written it. The distributed sampler
repeats a few examples to even out the last batch: logix logs each id once. Afterwards every
rank scores its share of the training rows for a few test digits, the top-k lists are merged,
and rank 0 prints them along with the mislabel recall of self-influence.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import logix
from logix.integrations.accelerate import attach

sys.path.insert(0, str(Path(__file__).parent))
from digits import digits_datasets, flip_labels, make_model  # noqa: E402  (same data and model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ddp_digits", help="log directory (replaced if it exists)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)  # sets up torch.distributed under `accelerate launch` / torchrun
    torch.manual_seed(0)
    train, test = digits_datasets()
    noisy_y, is_flipped = flip_labels(train.tensors[1], 0.1)
    train = TensorDataset(train.tensors[0], noisy_y)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(logix.WithIds(train), batch_size=32, shuffle=True)  # logix: items become (id, x, y)
    model, opt, loader = accelerator.prepare(model, opt, loader)

    if accelerator.is_main_process:
        shutil.rmtree(args.out, ignore_errors=True)
    accelerator.wait_for_everyone()
    run = logix.init(args.out, rank=args.rank, statistics="ekfac")  # logix: on every rank
    run.watch(model, optimizer=opt)  # logix: names as for the bare model (no "module." prefix)
    attach(run, accelerator)  # logix: accelerator.backward's scaling is measured and divided out
    for epoch in range(args.epochs):
        run.start_pass(f"epoch{epoch}", lr=0.1)  # logix: one pass per epoch, on every rank
        model.train()
        for ids, x, y in loader:
            with run.capture(ids):  # logix: around forward and backward
                accelerator.backward(F.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
        accelerator.print(f"epoch {epoch} done")
    run.finalize()  # logix: collective; rank 0 derives the statistics from every rank's rows

    log = logix.open(args.out)
    ranks = sorted({s.rank for s in log.current.segments})
    accelerator.print(f"\n{log}: {len(log)} rows in the last pass from ranks {ranks}")
    net = accelerator.unwrap_model(model).eval()
    x_test, y_test = test.tensors
    with log.query(net) as q:  # logix: every rank captures the same query
        with q.capture(list(range(3))):
            F.cross_entropy(net(x_test[:3]), y_test[:3]).backward()
    top = log.influence(q, "ekfac", top_k=5, across_ranks=True)  # logix: each rank scores a slice; merged
    for row in range(3):
        helpful = top.ids[row].tolist()
        accelerator.print(f"test digit {row} (label {int(y_test[row])}): most helpful training digits {helpful}")
    si = log.self_influence("ekfac")
    n_top = len(si.ids) // 10
    caught = int(is_flipped[si.top_k(n_top).ids].sum())
    accelerator.print(f"flipped labels among the top 10% by self-influence: {caught} of {n_top}")


if __name__ == "__main__":
    main()
