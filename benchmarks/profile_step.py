"""Where a captured step's time goes: the CPU issuing work against the device running it.

    python benchmarks/profile_step.py --device cuda --amp bf16 --batch 8 --rank 64
    python benchmarks/profile_step.py --steps 3             # CPU, the small GPT-2 of capture_overhead
    python benchmarks/profile_step.py --smoke               # seconds: checks it works; its numbers mean nothing

A step on a GPU is bound by the slower of two sides: the CPU issuing kernels (Python, dispatch,
launches) or the GPU running them. For the plain step and the hooks-only step (logix's Collector:
projections and per-example products, nothing written) this prints, per step: wall time
(synchronised), CPU issue time (until the Python returns, without waiting for the GPU), GPU busy
time (the sum of kernel times torch.profiler records) and the number of kernels; then the
operators with the most self CPU time in the hooked steps. Same workloads as capture_overhead.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from capture_overhead import Bench, build, sync
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def timed(bench: Bench, arm: str, run, batch: dict) -> tuple[float, float]:
    """(CPU issue seconds, wall seconds) of one step."""
    sync(bench.device)
    start = time.perf_counter()
    bench.plain(batch) if arm == "plain" else bench.hooks(run, batch)
    issued = time.perf_counter() - start
    sync(bench.device)
    return issued, time.perf_counter() - start


def kernels(prof) -> tuple[float, int]:
    """(busy seconds, count) of the device kernels a profile recorded."""
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in events) * 1e-6, len(events)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["gpt2", "mlp"], default="gpt2")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (--smoke: 4)")
    parser.add_argument("--rank", type=int, default=None, help="default 64 (--smoke: 16)")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per arm (profiled: a third of them; default 10)"
    )
    parser.add_argument("--quick", action="store_true", help="3 steps per arm")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run that checks the benchmark works; its numbers mean nothing: capture_overhead's "
        "tiny --smoke GPT-2 (2 layers, width 64, seq 32) at batch 4, rank 16, 1 warm-up and 2 timed steps per "
        "arm, 1 torch thread (options given explicitly still apply; wins over --quick)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.smoke:
        args.threads = args.threads or 1  # tiny steps; threads waiting on a busy machine would dominate
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (4 if args.smoke else 8)
    args.rank = args.rank or (16 if args.smoke else 64)
    steps = args.steps or (2 if args.smoke else 3 if args.quick else 10)
    warmup = 1 if args.smoke else 3
    seq = (32 if args.smoke else 512 if device.type == "cuda" else 128) if args.model == "gpt2" else None
    amp = torch.bfloat16 if args.amp == "bf16" else None
    wl = build(args.model, args.batch, seq, device, amp, tiny=args.smoke)
    cuda = device.type == "cuda"

    with tempfile.TemporaryDirectory(prefix="logix-profile-") as tmp:
        bench = Bench(wl, device, Path(tmp))
        run = bench.new_run(args.rank, "float32")
        pool = wl.batches
        for i in range(warmup):  # warm-up: kernels, allocator, projections on the device
            bench.plain(pool[i % len(pool)])
            bench.hooks(run, pool[i % len(pool)])
        rows = []
        top = None
        for arm in ("plain", "hooks"):
            issue, wall = zip(*(timed(bench, arm, run, pool[i % len(pool)]) for i in range(steps)))
            profiled = max(1, steps // 3)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                for i in range(profiled):
                    timed(bench, arm, run, pool[i % len(pool)])
            busy, count = kernels(prof) if cuda else (float("nan"), 0)
            rows.append((arm, statistics.median(wall), statistics.median(issue), busy / profiled, count // profiled))
            if arm == "hooks":
                top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40)
        run.finalize()

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end; its numbers mean nothing")
    print(
        f"{args.model} batch {args.batch} rank {args.rank} autocast {args.amp} on {device} ({name}), "
        f"torch {torch.__version__}, {steps} timed steps per arm\n"
    )
    print(f"{'arm':<6} {'wall ms':>9} {'CPU issue ms':>13} {'GPU busy ms':>12} {'kernels':>8}")
    for arm, wall, issue, busy, count in rows:
        print(f"{arm:<6} {wall * 1e3:>9.2f} {issue * 1e3:>13.2f} {busy * 1e3:>12.2f} {count:>8}")
    (_, wall0, issue0, busy0, count0), (_, wall1, issue1, busy1, count1) = rows
    print(
        f"\nhooks minus plain: wall {1e3 * (wall1 - wall0):+.2f} ms, CPU issue {1e3 * (issue1 - issue0):+.2f} ms, "
        f"GPU busy {1e3 * (busy1 - busy0):+.2f} ms, kernels {count1 - count0:+d} "
        f"({len(run.watched)} watched modules)"
    )
    print("\nself CPU time by operator, hooked steps:\n" + top)


if __name__ == "__main__":
    main()
