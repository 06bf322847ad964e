"""What does logix cost per watched module? The fixed cost that dominates small models and short steps.

    python benchmarks/module_overhead.py            # 50 tiny Linear layers, 1 thread (about a minute)
    python benchmarks/module_overhead.py --quick    # fewer repetitions
    python benchmarks/module_overhead.py --smoke    # seconds: checks the benchmark works; its numbers mean nothing

A model of `--modules` Linear layers (width 16, so each layer's own work is tiny) in sequence, one
torch thread, batch 8, rank 4 per side. For each arm, the median over repetitions of one step
(forward, backward; no optimizer) plain and inside `run.capture` (rows built and queued; the writer
commits in the background), and the captured step minus the plain step per watched module, without
statistics and with K-FAC statistics. Then the torch operations dispatched per step (torch profiler,
CPU ops of one step), plain and captured, for a model whose layers all share one shape and for one
with as many distinct shapes as layers: issue 16 asks for an operation count that grows with the
number of distinct shapes rather than of modules.

Targets (issue 16): at most 0.03 ms per module without statistics, 0.05 ms with.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import logix
from logix.hooks import Collector

WIDTH, BATCH, RANK = 16, 8, 4


def model_of(modules: int, distinct_shapes: bool) -> nn.Sequential:
    torch.manual_seed(0)
    widths = [WIDTH + (i if distinct_shapes else 0) for i in range(modules + 1)]
    return nn.Sequential(*[nn.Linear(widths[i], widths[i + 1]) for i in range(modules)])


def step(model: nn.Sequential, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    for p in model.parameters():
        p.grad = None


def timed(fn, repetitions: int) -> float:
    """Median seconds of fn() over repetitions (after a warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ops_per_step(fn) -> tuple[int, int]:
    """How many torch operations one call of fn dispatches: every profiler CPU event named aten::*,
    and those not inside another (torch.stack copies each input with its own narrow, inside one
    stack: the second count has the stack once)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    return len(ops), sum(1 for e in ops if not _inside_an_op(e))


def _inside_an_op(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def measure(modules: int, statistic: str | None, distinct: bool, repetitions: int, root: Path) -> dict:
    model = model_of(modules, distinct)
    x = torch.randn(BATCH, model[0].in_features)
    run = logix.init(root / f"log-{statistic}-{distinct}", rank=RANK, statistics=statistic)
    run.watch(model)
    counter = iter(range(10**9))

    def captured() -> None:
        start = next(counter) * BATCH
        with run.capture(list(range(start, start + BATCH))):
            step(model, x)

    def floor() -> None:  # PyTorch's own cost of what the hooks must do: install, call, remove, empty
        def forward_hook(module, args, kwargs, output):
            output.grad_fn.register_prehook(lambda grads: None)

        handles = [w.module.register_forward_hook(forward_hook, with_kwargs=True) for w in run.watched]
        step(model, x)
        for handle in handles:
            handle.remove()

    def hooks_only() -> None:  # the hooks and rows of run.capture, without ids, statistics or the writer
        with Collector(run.watched) as collector:
            step(model, x)
        collector.rows()

    plain_s = timed(lambda: step(model, x), repetitions)
    captured_s = timed(captured, repetitions)
    hooks_s = timed(hooks_only, repetitions)
    floor_s = timed(floor, repetitions)
    plain_ops, captured_ops = ops_per_step(lambda: step(model, x)), ops_per_step(captured)
    run.finalize()
    return {
        "plain_ms": plain_s * 1e3,
        "captured_ms": captured_s * 1e3,
        "per_module_ms": (captured_s - plain_s) * 1e3 / modules,
        "hooks_per_module_ms": (hooks_s - plain_s) * 1e3 / modules,
        "floor_per_module_ms": (floor_s - plain_s) * 1e3 / modules,
        "plain_ops": plain_ops[0],
        "extra_ops": captured_ops[0] - plain_ops[0],
        "extra_top_ops": captured_ops[1] - plain_ops[1],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=50)
    parser.add_argument("--repetitions", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="100 repetitions")
    parser.add_argument("--smoke", action="store_true", help="5 modules, 10 repetitions: checks it works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.modules, args.repetitions = 5, 10
    elif args.quick:
        args.repetitions = 100
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread; {args.modules} Linear layers of width ~{WIDTH}, batch {BATCH}, "
        f"rank {RANK}; medians of {args.repetitions} steps (forward + backward, no optimizer)"
    )
    head = ("shapes", "statistics", "plain ms", "captured ms", "per module ms", "target ms", "hooks only", "floor",
            "plain ops", "extra ops", "per module", "extra top-level", "per module")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for distinct in (False, True):
            for statistic, target in ((None, 0.03), ("kfac", 0.05)):
                m = measure(args.modules, statistic, distinct, args.repetitions, Path(tmp))
                rows.append((
                    f"{args.modules if distinct else 1} distinct", statistic or "none", f"{m['plain_ms']:.3f}",
                    f"{m['captured_ms']:.3f}", f"{m['per_module_ms']:.4f}", f"{target:.2f}",
                    f"{m['hooks_per_module_ms']:.4f}", f"{m['floor_per_module_ms']:.4f}", str(m["plain_ops"]),
                    str(m["extra_ops"]),
                    f"{m['extra_ops'] / args.modules:.1f}", str(m["extra_top_ops"]),
                    f"{m['extra_top_ops'] / args.modules:.1f}",
                ))  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    print(
        "per module = (captured - plain) / modules; hooks only: the same for the hooks and rows alone (a Collector: "
        "no ids, statistics or writer); floor: the same for empty hooks doing what logix's must (a forward hook "
        "installed and removed per step, registering a pre-hook on each output's autograd node); extra ops: torch "
        "operations a captured step dispatches beyond a plain one (profiler CPU events named aten::*; top-level: "
        "those not inside another operation)"
    )


if __name__ == "__main__":
    main()
