"""The logix-ai (LogIX 0.1.1) side of compare_libraries.py, run by that script in logix-ai's own venv.

    benchmarks/.venv-logixai/bin/python -I benchmarks/compare_logixai_worker.py \
        --inputs inputs.npz --out DIR --rank 16|full [--batch 250 --threads 1]

logix-ai's import name is also `logix`, so this runs in a separate interpreter (-I: nothing of this
repository on sys.path) with the working directory set to DIR, where logix-ai writes its logs
(./logix/<project>). It imports only numpy, torch and logix-ai; the data and the trained weights
come from the .npz that compare_libraries.py wrote. It writes DIR/scores.npy (queries x train),
DIR/self_influence.npy (train) and DIR/result.json (seconds, peak RSS), as the other workers do.

EK-FAC the way logix-ai's examples do it: pass 1 gathers the forward and backward covariances
(setup forward/backward: covariance), finalize; pass 2 logs per-example gradients and the corrected
eigenvalues (grad: log, corrected_eigval) with saving on, finalize; then the query gradients
(eval, grad: log) and compute_influence_all over its log dataloader, and compute_self_influence of
the mislabeled model's logged rows. At a numeric rank, add_lora (random init, its default) inserts
its compression modules before pass 1 (add_lora clears the statistics, so it must come first).
Damping: its default (damping=None), which its precondition_kfac sets to 0.1 x the mean eigenvalue
of the first module and then reuses for every module. That function also adds the damping to the
stored eigenvalues in place, so every further call on the same run is damped once more (the same
query scored twice differed by 20% here); this worker therefore preconditions each run exactly once:
one compute_influence_all for the 100 queries, one compute_self_influence over all train rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder only: no project logix on the path
from worker_inputs import load_inputs, reset_peak, rss_mib  # noqa: E402


def logged_run(project: str, model, x, y, rank, batch: int):
    """A LogIX instance after its two EK-FAC passes over (x, y)."""
    from logix import LogIX
    from logix.config import LoRAConfig

    run = LogIX(project=project)
    run.watch(model)
    if rank != "full":
        run.add_lora(lora_config=LoRAConfig(init="random", rank=int(rank)))
    starts = range(0, len(x), batch)
    run.setup({"forward": ["covariance"], "backward": ["covariance"]})
    for i in starts:
        with run(data_id=[str(j) for j in range(i, min(i + batch, len(x)))]):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + batch]), y[i : i + batch], reduction="sum").backward()
    run.finalize()
    run.setup({"grad": ["log", "corrected_eigval"]})
    run.save(True)
    for i in starts:
        with run(data_id=[str(j) for j in range(i, min(i + batch, len(x)))]):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + batch]), y[i : i + batch], reduction="sum").backward()
    run.finalize()
    return run


def in_order(ids, values: torch.Tensor, n: int) -> np.ndarray:
    values = values.double().numpy()
    out = np.full(values.shape[:-1] + (n,), np.nan)
    out[..., np.asarray([int(i) for i in ids], dtype=np.int64)] = values
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rank", default="16")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--damping-factor", type=float, default=0.1, help="ignored: logix-ai's default damping is used")
    args = p.parse_args()

    import logix

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t, clean, noisy = load_inputs(Path(args.inputs))
    n, nq = len(t["xtr"]), len(t["xq"])
    peak_reset = reset_peak()
    before = rss_mib()

    start = time.perf_counter()
    run = logged_run("clean", clean, t["xtr"], t["ytr"], args.rank, args.batch)
    run.eval()
    run.setup({"grad": ["log"]})
    with run(data_id=[f"q{j}" for j in range(nq)]):
        clean.zero_grad()
        F.cross_entropy(clean(t["xq"]), t["yq"], reduction="sum").backward()
    query_log = run.get_log()
    width = sum(v["grad"][0].numel() for v in query_log[1].values())  # numbers per example in its log
    result = run.compute_influence_all(query_log, run.build_log_dataloader())
    scores = in_order(result["tgt_ids"], result["influence"], n)  # (queries, train)

    run_n = logged_run("noisy", noisy, t["xtr"], t["noisy_y"], args.rank, args.batch)
    loader = run_n.build_log_dataloader(batch_size=n)  # one batch: preconditioned once (see the docstring)
    ids, values = [], []
    for train_log in loader:
        r = run_n.compute_self_influence(train_log)
        ids += list(r["src_ids"])
        values.append(r["influence"])
    self_inf = in_order(ids, torch.cat(values), n)
    seconds = time.perf_counter() - start

    np.save(out / "scores.npy", scores)
    np.save(out / "self_influence.npy", self_inf)
    info = {
        "seconds": seconds,
        "version": logix.__version__,
        "width": width,
        "rss_before_mib": before,
        "peak_rss_mib": rss_mib("VmHWM"),
        "peak_reset": peak_reset,
        "torch": torch.__version__,
    }
    (out / "result.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
