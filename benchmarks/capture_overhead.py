"""How much does logging per-example gradients with logix slow down a training step?

    python benchmarks/capture_overhead.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/capture_overhead.py --quick    # about a minute
    python benchmarks/capture_overhead.py --smoke    # seconds: checks the benchmark works; its numbers mean nothing
    python benchmarks/capture_overhead.py --device cuda --ranks 16 64 --dtype float16

Two workloads, both built from code with random weights (nothing is downloaded):
  mlp   64 -> 256 -> 256 -> 10 on digits-shaped inputs (64 features in [0, 1], 10 classes),
        cross-entropy averaged over the batch (capture's default reduction="mean").
  gpt2  a transformers GPT2LMHeadModel from a GPT2Config (CPU: 4 layers, width 256, 8k vocab,
        seq 128; CUDA: GPT-2-small size, seq 512; --smoke: 2 layers, width 64, 1k vocab, seq 32),
        right-padded sequences of random length, every Linear/Conv1D/Embedding watched except
        lm_head; the HF loss is the mean over all label tokens, so capture gets reduction="sum",
        scale=1/num_label_tokens.

For each workload and rank, on one freshly built model and optimizer (AdamW), all in one process:
  1. block phase ("total ratio", "write floor", rows/s, memory): rounds of m plain steps back to
     back, m captured steps back to back and m plain steps beside a thread writing the same bytes
     raw (RawWriter, the write floor), the order rotating between rounds. A captured round is timed
     until its rows are written and committed (run.flush(); run.finalize() after the last
     round), so the background writer overlaps training as it would in a real run and the time
     to drain it is counted. A round lasts at least --round-seconds of plain training (default
     1 s, the writer's commit interval), so the commit that ends each round comes about as often
     as in a real run, which commits at most once a second (shorter rounds count a commit, about
     7 ms on a CPU, many times a second); rounds stop short of that once they would write
     ROUND_BYTES of rows (the large ranks are bound by the disk, and a second of them is GBs).
     "total ratio" = all captured time / all plain time. The log is then read back with
     logix.open to check that every row was committed and to get the row width D.
     Peak extra memory = median over captured rounds of the peak during the round minus the same
     over plain rounds (CPU: resident set size, VmHWM from /proc/self/status, reset through
     malloc_trim and /proc/self/clear_refs before each round, i.e. growth of the process's resident
     memory, not bytes allocated, so a few MB either way is allocator noise; CUDA:
     torch.cuda.max_memory_allocated, which leaves out pinned host buffers).
  2. interleaved phase (per-step medians): after warm-up, repetitions of three arms in a random
     order per repetition, all on the same batch: plain (forward + backward + optimizer step),
     hooks (the same inside logix's Collector: hooks, projections, per-example products, rows
     formed on the training thread, as a query forms them, not written; no --statistics) and
     captured (the same inside run.capture: hooks and projections, then the batch handed to the
     writer, whose thread forms the rows on a CPU). The captured arm's clock
     stops when the training thread is free again ("capt"); then run.flush() waits for the
     writer to form, write and commit that batch ("+drain" includes that wait), so no writer work
     spills into the next timed step. The ms columns are medians per arm; "ratio" is the median
     over repetitions of capt / plain within the same repetition (paired, so a burst of load from
     another process moves both sides of a pair), "ratio+drain" the same with the drain included.
     The details below the table also give the ratio of the medians.

The machine's load average is printed before and after: other processes competing for the cores
make every number noisier (the interleaving keeps the ratios fair, not the absolute times); on a
shared machine, running the benchmark under `nice -n -10` (as root) helps.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import logix

try:  # the hooks-only arm drives logix's own hook class directly; skipped if it moves
    from logix.hooks import Collector
except ImportError:  # pragma: no cover
    Collector = None


# -- devices, clocks, memory -------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


try:  # glibc: malloc_trim returns freed heap memory to the OS (CPU peak measurement only)
    import ctypes

    _libc = ctypes.CDLL("libc.so.6")
    _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _libc = None


class PeakMemory:
    """Peak memory since the last reset(): CUDA allocated bytes, or CPU resident set size."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = True
        if device.type == "cuda":
            self.what = "torch.cuda.max_memory_allocated delta (device tensors only)"
        else:
            self.resettable = self._clear_refs()
            self.what = (
                "peak RSS growth: median over rounds of VmHWM (reset via malloc_trim + /proc/self/clear_refs "
                "before each round), captured rounds minus plain rounds; a few MB either way is allocator noise"
                if self.resettable
                else "growth of lifetime peak RSS (getrusage ru_maxrss; cannot reset, may read 0)"
            )

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    def reset(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            if _libc is not None:
                _libc.malloc_trim(0)  # hand freed heap back first, so every round starts from a like baseline
            self._clear_refs()

    def peak(self) -> int:
        sync(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.resettable:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- workloads ----------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    model: nn.Module
    batches: list[dict]
    batch: int
    seq: int | None
    exclude: list[str] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    amp: torch.dtype | None = None  # forward under torch.autocast with this dtype (--amp)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def loss(self, b: dict) -> torch.Tensor:
        """The forward pass (under autocast with --amp; the backward runs outside it, as usual)."""
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=self.amp) if self.amp else contextlib.nullcontext():
            if self.name == "mlp":
                return F.cross_entropy(self.model(b["x"]), b["y"])
            return self.model(**b["inputs"]).loss

    def capture_kwargs(self, b: dict) -> dict:
        if self.name == "mlp":
            return {}  # cross-entropy averaged over the batch: reduction="mean"
        # HF causal-LM loss = mean over every label token of the batch; an example's own loss is
        # the sum over its label tokens, so the backpropagated loss is (1/num_tokens) * sum_i loss_i.
        return {"mask": b["inputs"]["attention_mask"], "reduction": "sum", "scale": 1.0 / b["num_tokens"]}


def make_mlp(batch: int, device: torch.device, pool: int = 8) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model.to(device).train()
    gen = torch.Generator().manual_seed(1)
    batches = [
        {
            "x": torch.rand(batch, 64, generator=gen).to(device),
            "y": torch.randint(0, 10, (batch,), generator=gen).to(device),
        }
        for _ in range(pool)
    ]
    return Workload("mlp", model, batches, batch, None)


def gpt2_config(device: torch.device, tiny: bool = False):
    from transformers import GPT2Config

    if tiny:  # --smoke: the same code path at a size that runs in milliseconds
        size = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1024, n_positions=32)
    elif device.type == "cuda":  # GPT-2 small
        size = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    else:
        size = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=128)
    eos = size["vocab_size"] - 1
    return GPT2Config(**size, bos_token_id=eos, eos_token_id=eos, pad_token_id=0)


def make_gpt2(batch: int, seq: int, device: torch.device, pool: int = 4, tiny: bool = False) -> Workload:
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = gpt2_config(device, tiny)
    model = GPT2LMHeadModel(config).to(device).train()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(pool):
        ids = torch.randint(1, config.vocab_size, (batch, seq), generator=gen)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask  # right padding with token 0
        labels = ids.masked_fill(mask == 0, -100)
        num_tokens = int((labels[:, 1:] != -100).sum())  # label tokens after the shift
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            # GPT-2 builds position ids of shape (1, T) when none are given, and logix refuses a
            # watched wpe that sees batch 1 while the rest see batch B; (B, T) ids avoid that.
            "position_ids": torch.arange(seq).expand(batch, seq),
        }
        batches.append({"inputs": {k: v.to(device) for k, v in inputs.items()}, "num_tokens": num_tokens})
    return Workload("gpt2", model, batches, batch, seq, exclude=["lm_head"])


def workloads(args) -> list[tuple[str, int, int | None]]:
    """(model, batch, seq) to run."""
    if args.smoke:  # one small configuration per model (the tiny GPT-2 on any device)
        sizes = {"mlp": [(64, None)], "gpt2": [(4, 32)]}
    elif args.device.type == "cuda":
        sizes = {"mlp": [(b, None) for b in (64, 256)], "gpt2": [(b, 512) for b in (8, 32)]}
    else:
        sizes = {"mlp": [(b, None) for b in (64, 256)], "gpt2": [(8, 128)]}
    if args.quick and not args.smoke:
        sizes = {name: configs[:1] for name, configs in sizes.items()}
    out = [(name, batch, seq) for name in ("mlp", "gpt2") if name in args.models for batch, seq in sizes[name]]
    if args.batches:
        out = [(name, b, seq) for name, _, seq in dict.fromkeys((n, None, s) for n, _, s in out) for b in args.batches]
    return out


def build(
    name: str,
    batch: int,
    seq: int | None,
    device: torch.device,
    amp: torch.dtype | None = None,
    tiny: bool = False,
    compiled: bool = False,
) -> Workload:
    """tiny: the --smoke GPT-2 (2 layers, width 64, seq <= 32) instead of the benchmark's.
    compiled: the model under torch.compile, with Dynamo guarding on module hooks so that the
    graphs compiled outside a capture are not reused inside one (logix's README)."""
    wl = make_mlp(batch, device) if name == "mlp" else make_gpt2(batch, seq, device, tiny=tiny)
    if compiled:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        wl.model = torch.compile(wl.model)
    wl.amp = amp
    lr = 1e-3 if name == "mlp" else 1e-4
    wl.optimizer = torch.optim.AdamW(wl.model.parameters(), lr=lr)
    return wl


# -- one configuration -------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    params: int
    batch: int
    seq: int | None
    rank: int
    width: int = 0
    bytes_per_row: int = 0
    plain: list[float] = field(default_factory=list)
    hooks: list[float] = field(default_factory=list)
    capt: list[float] = field(default_factory=list)
    drained: list[float] = field(default_factory=list)
    block_plain: float = 0.0
    block_capt: float = 0.0  # captured rounds, each until its rows are committed
    block_floor: float = 0.0  # plain rounds with a raw writer of the same bytes (RawWriter)
    block_rounds: int = 0
    block_steps: int = 0
    finalize: float = 0.0
    rows: int = 0
    peak_extra: int = 0
    write_rate: float = 0.0  # bytes/s logix's segment writer stores such rows at, alone


class Bench:
    def __init__(self, wl: Workload, device: torch.device, tmp: Path):
        self.wl, self.device, self.tmp = wl, device, tmp
        self.next_id = 0
        self.runs = 0

    def new_run(self, rank: int, dtype: str, statistics: list[str] | None = None):
        self.runs += 1
        path = self.tmp / f"{self.wl.name}-b{self.wl.batch}-r{rank}-{self.runs}"
        extra = {"statistics": statistics} if statistics else {}  # only passed when asked for
        run = logix.init(path, rank=rank, dtype=dtype, **extra)
        run.watch(self.wl.model, exclude=self.wl.exclude)
        return run

    def _opt_step(self) -> None:
        self.wl.optimizer.step()
        self.wl.optimizer.zero_grad(set_to_none=True)

    def plain(self, b: dict) -> None:
        self.wl.loss(b).backward()
        self._opt_step()

    def hooks(self, run, b: dict) -> None:
        collector = Collector(run.watched, mask=self.wl.capture_kwargs(b).get("mask"))
        with collector:
            self.wl.loss(b).backward()
        collector.rows()
        self._opt_step()

    def captured(self, run, b: dict) -> None:
        ids = torch.arange(self.next_id, self.next_id + self.wl.batch)  # as a DataLoader over logix.WithIds gives them
        self.next_id += self.wl.batch
        with run.capture(ids, **self.wl.capture_kwargs(b)):
            self.wl.loss(b).backward()
        self._opt_step()

    def timed(self, fn, *a) -> float:
        sync(self.device)
        t = time.perf_counter()
        fn(*a)
        sync(self.device)
        return time.perf_counter() - t


class RawWriter:
    """The least a logger that stores every row costs training here, measured: a thread that wakes
    every 20 ms (as logix's writer does) and appends the bytes of the steps queued since, raw, to
    one file: no HDF5, no checksums, ids or commits, no copy (one host buffer, as if the rows were
    already there). On 2 cores it takes CPU from training as any writer does (its write calls
    release the GIL; the kernel's page-cache work is charged to it). The rows' device-to-host copy
    is left out on a GPU."""

    def __init__(self, path: Path, step_bytes: int):
        self.path = path
        self.buffer = np.zeros(step_bytes, dtype=np.uint8)
        self.queue: queue.Queue = queue.Queue()
        self.wake = threading.Event()
        self.error: OSError | None = None
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def put(self) -> None:
        self.queue.put(self.buffer)

    def drain(self) -> None:
        self.wake.set()
        self.queue.join()
        if self.error is not None:
            raise SystemExit(f"the write-floor arm could not write {self.path}: {self.error}")

    def close(self) -> None:
        self.queue.put(None)
        self.wake.set()
        self.thread.join()
        os.close(self.fd)
        self.path.unlink()

    def _loop(self) -> None:
        while True:
            self.wake.wait(0.02)
            self.wake.clear()
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and self.error is None:  # after a failure: drained, not written
                    try:
                        os.write(self.fd, item)
                    except OSError as e:  # a full disk, say: reported at the next drain
                        self.error = e
                self.queue.task_done()
                if item is None:
                    return


ROUND_BYTES = 256 << 20  # rows one block-phase round may write, at most (unless --steps asks for more)


def write_rate(tmp: Path, width: int, dtype: str, batch: int, total: int = 128 << 20) -> float:
    """Bytes/s at which logix's segment writer stores batches of such rows here, with nothing else
    running (checksums included, one commit at the end): the disk side of the physical bound."""
    from logix.disk import SegmentWriter

    rows = np.random.default_rng(0).standard_normal((batch, width)).astype(dtype)
    count = max(4, total // rows.nbytes)
    path = tmp / f"write-rate-{width}-{batch}-{dtype}.h5"
    writer = SegmentWriter(path, width, dtype, "int", {})
    start = time.perf_counter()
    for i in range(count):
        writer.append(np.arange(i * batch, (i + 1) * batch), rows, 0, np.zeros(batch, "u1"))
    writer.commit()
    writer.close()
    rate = count * rows.nbytes / (time.perf_counter() - start)
    path.unlink()
    return rate


def disk_bound(r: Result) -> float:
    """The least total ratio any logger that stores every row could reach: the plain step, or the
    time to write one step's rows at the measured rate if that is longer (full overlap assumed)."""
    plain = statistics.median(r.plain)
    return max(1.0, r.batch * r.bytes_per_row / r.write_rate / plain) if r.write_rate else float("nan")


def bench_config(name, batch, seq, rank, args, tmp: Path) -> Result:
    device = args.device
    wl = build(name, batch, seq, device, args.amp, tiny=args.smoke, compiled=args.compile)
    bench = Bench(wl, device, tmp)
    res = Result(name, wl.params, batch, seq, rank)
    steps = args.steps or (args.mlp_steps if name == "mlp" else args.gpt2_steps)
    pool = wl.batches
    memory = PeakMemory(device)

    warm_times = [bench.timed(bench.plain, pool[i % len(pool)]) for i in range(args.warmup)]
    if args.compile:  # graphs are compiled for captured steps too (hooks break them): not timed
        warm = bench.new_run(rank, args.dtype, args.statistics)
        for i in range(args.warmup):
            bench.captured(warm, pool[i % len(pool)])
        warm.finalize()

    # 1. block phase: rounds of m plain, m captured and m floor steps, in an order that rotates;
    #    each captured round ends with the writer drained (flush; finalize after the last one).
    run = bench.new_run(rank, args.dtype, args.statistics)
    step_bytes = batch * sum(w.width for w in run.watched) * getattr(torch, args.dtype).itemsize
    rounds, m = args.rounds, max(1, steps // args.rounds)
    if warm_times:  # each round about as long as a commit interval of plain training, at least
        m = max(m, min(math.ceil(args.round_seconds / min(warm_times)), ROUND_BYTES // step_bytes))
    floor = RawWriter(tmp / f"floor-{name}-{batch}-{rank}.bin", step_bytes)
    peaks = {"plain": [], "capt": []}
    for k in range(rounds):
        arms = ("plain", "capt", "floor")
        for arm in arms[k % 3 :] + arms[: k % 3]:
            memory.reset()
            sync(device)
            t = time.perf_counter()
            for i in range(m):
                b = pool[(k * m + i) % len(pool)]
                if arm == "capt":
                    bench.captured(run, b)
                else:
                    bench.plain(b)
                    if arm == "floor":
                        floor.put()
            sync(device)
            if arm == "floor":
                floor.drain()
                res.block_floor += time.perf_counter() - t
            elif arm == "plain":
                res.block_plain += time.perf_counter() - t
                peaks["plain"].append(memory.peak())
            else:
                t_fin = time.perf_counter()
                if k == rounds - 1:
                    run.finalize()
                else:
                    run.flush()
                res.block_capt += time.perf_counter() - t
                res.finalize = time.perf_counter() - t_fin
                peaks["capt"].append(memory.peak())
    floor.close()
    res.peak_extra = statistics.median(peaks["capt"]) - statistics.median(peaks["plain"])
    res.block_steps, res.block_rounds = rounds * m, rounds
    log = logix.open(run.path)
    res.width = log.width
    res.bytes_per_row = log.width * getattr(torch, log.config.dtype).itemsize
    res.rows = len(log.ids)
    res.write_rate = write_rate(tmp, res.width, args.dtype, batch, total=(4 if args.smoke else 128) << 20)
    if res.rows != res.block_steps * batch:
        raise SystemExit(f"{name}: expected {res.block_steps * batch} committed rows after finalize, got {res.rows}")

    # 2. interleaved phase: plain / hooks / captured in a random order per repetition
    run = bench.new_run(rank, args.dtype, args.statistics)
    arms = ["plain", "capt"] + (["hooks"] if Collector is not None else [])
    order = random.Random(0)
    for rep in range(args.warmup + steps):
        b = pool[rep % len(pool)]
        order.shuffle(arms)
        for arm in arms:
            if arm == "plain":
                dt = bench.timed(bench.plain, b)
            elif arm == "hooks":
                dt = bench.timed(bench.hooks, run, b)
            else:
                sync(device)
                t = time.perf_counter()
                bench.captured(run, b)
                sync(device)
                dt = time.perf_counter() - t
                run.flush()
                if rep >= args.warmup:
                    res.drained.append(time.perf_counter() - t)
            if rep >= args.warmup:
                getattr(res, arm).append(dt)
    run.finalize()
    return res


# -- reporting ---------------------------------------------------------------------------------------


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3 if xs else float("nan")


def paired(xs: list[float], base: list[float]) -> float:
    """Median over repetitions of xs[i] / base[i] (the two arms of one repetition)."""
    return statistics.median(x / b for x, b in zip(xs, base)) if xs else float("nan")


def iqr_ms(xs: list[float]) -> str:
    if len(xs) < 4:
        return "n/a"
    q = statistics.quantiles(xs, n=4)
    return f"{q[0] * 1e3:.2f}-{q[2] * 1e3:.2f}"


def human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def table(results: list[Result]) -> str:
    head = [
        "model",
        "params",
        "batch",
        "seq",
        "rank",
        "D",
        "bytes/row",
        "plain ms",
        "hooks ms",
        "capt ms",
        "+drain ms",
        "ratio",
        "ratio+drain",
        "total ratio",
        "write floor",
        "disk bound",
        "rows/s",
        "peak extra MB",
    ]
    rows = []
    for r in results:
        plain = med_ms(r.plain)
        rows.append(
            [
                r.model,
                human(r.params),
                str(r.batch),
                str(r.seq) if r.seq else "-",
                str(r.rank),
                str(r.width),
                str(r.bytes_per_row),
                f"{plain:.2f}",
                f"{med_ms(r.hooks):.2f}" if r.hooks else "n/a",
                f"{med_ms(r.capt):.2f}",
                f"{med_ms(r.drained):.2f}",
                f"{paired(r.capt, r.plain):.3f}",
                f"{paired(r.drained, r.plain):.3f}",
                f"{r.block_capt / r.block_plain:.3f}",
                f"{r.block_floor / r.block_plain:.3f}",
                f"{disk_bound(r):.2f}",
                f"{r.rows / r.block_capt:.0f}",
                f"{r.peak_extra / 2**20:.1f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def fmt(cells: list[str]) -> str:  # the model name left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    return "\n".join(lines)


def details(results: list[Result]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"{r.model} b{r.batch} r{r.rank}: {len(r.plain)} interleaved reps, ratio of medians capt/plain "
            f"{med_ms(r.capt) / med_ms(r.plain):.3f} (+drain {med_ms(r.drained) / med_ms(r.plain):.3f}); "
            f"IQR ms plain {iqr_ms(r.plain)}, "
            f"capt {iqr_ms(r.capt)}, +drain {iqr_ms(r.drained)}; block phase {r.block_steps} steps per arm "
            f"in {r.block_rounds} rounds: "
            f"plain {r.block_plain:.2f} s, captured+drain {r.block_capt:.2f} s "
            f"(finalize {r.finalize * 1e3:.1f} ms), {r.rows} rows committed; "
            f"segment writer alone {r.write_rate / 1e6:.0f} MB/s"
        )
    return "\n".join(lines)


def git_commit() -> str:
    """The logix checkout's commit, when it is one, so that runs can be compared."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(logix.__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(Path(logix.__file__).resolve().parent), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            return f"commit {out.stdout.strip()}" + (", logix/ modified" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "commit unknown"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} cores)"
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and configurations (~1 min on CPU)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run that checks the benchmark works; its numbers mean nothing: rank 16, the MLP at "
        "batch 64 and a tiny GPT-2 (2 layers, width 64, seq 32, batch 4), 2 rounds of 2 steps, 4 interleaved "
        "repetitions after 1 warm-up, a 4 MB write-rate probe, 1 torch thread (options given explicitly "
        "still apply; wins over --quick)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="default 16 64 (--smoke: 16)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype of rows")
    parser.add_argument(
        "--statistics",
        nargs="+",
        choices=["kfac", "ekfac", "raw"],
        default=None,
        help="curvature statistics gathered while capturing (logix.init(statistics=...)); default none",
    )
    parser.add_argument(
        "--amp",
        choices=["none", "bf16"],
        default="none",
        help="run the forward under torch.autocast in this dtype (rows are still float32 projections)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default: per model)")
    parser.add_argument("--steps", type=int, default=None, help="interleaved repetitions per arm (all models)")
    parser.add_argument("--models", nargs="+", choices=["mlp", "gpt2"], default=["mlp", "gpt2"])
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed repetitions before measuring (default 3, quick 2, smoke 1)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds in the block phase")
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=None,
        help="least plain-training time per block-phase round, each ending with a commit (default 1, the writer's "
        "commit interval; --quick 0.5, --smoke 0)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; --smoke: 1)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the model under torch.compile (both arms: ratios are against the compiled plain step)",
    )
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.amp = {"none": None, "bf16": torch.bfloat16}[args.amp]
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if args.smoke:
        args.quick = False  # --smoke wins over --quick
        # one thread: tiny matrices gain nothing from more, and on a busy machine threads that wait
        # for one another can make a millisecond step take hundreds
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ranks = args.ranks or ([16] if args.smoke else [16, 64])
    args.mlp_steps, args.gpt2_steps = (4, 4) if args.smoke else (60, 6) if args.quick else (300, 20)
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 2 if args.quick else 3
    args.rounds = args.rounds or (2 if args.smoke else 3 if args.quick else 10)
    if args.round_seconds is None:
        args.round_seconds = 0.0 if args.smoke else 0.5 if args.quick else 1.0

    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"torch {torch.__version__}, logix {logix.__version__} ({git_commit()}), device {args.device} ({device_name}), "
        f"torch threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}, rows stored as {args.dtype}, "
        f"forward autocast {args.amp or 'off'}, statistics {args.statistics or 'none'}, "
        f"torch.compile {'on' if args.compile else 'off'}"
    )
    print(f"peak extra memory: {PeakMemory(args.device).what}")
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end; its numbers mean nothing")
    print(f"load average at start: {load()}\n")

    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="logix-bench-") as tmp:
        for name, batch, seq in workloads(args):
            for rank in args.ranks:
                r = bench_config(name, batch, seq, rank, args, Path(tmp))
                print(
                    f"  done {name} batch {batch} rank {rank}: plain {med_ms(r.plain):.2f} ms, "
                    f"ratio {paired(r.capt, r.plain):.3f}, +drain {paired(r.drained, r.plain):.3f}, "
                    f"total {r.block_capt / r.block_plain:.3f} "
                    f"({time.perf_counter() - start:.0f} s elapsed, load {load()})",
                    flush=True,
                )
                results.append(r)
    print()
    print(table(results))
    print()
    print(
        "plain: forward+backward+AdamW step; hooks: the same inside logix's Collector (rows formed, not written);\n"
        "capt: the same inside run.capture (training thread free again); +drain: capt plus run.flush() until the\n"
        "batch is written and committed; ms columns: medians per arm (interleaved phase); ratio(s): median over\n"
        "repetitions of capt / plain in the same repetition; total ratio: captured rounds (until committed, finalize\n"
        "included) / plain rounds (block phase); rows/s: rows committed per second of captured training in the block\n"
        "phase; write floor: plain rounds beside a thread appending the same bytes raw to a file (RawWriter) /\n"
        "plain rounds, the least a writer of these rows costs training on this machine; disk bound: the least total\n"
        "ratio a logger that stores every row could reach here if writing took no CPU from training, max(1, time to\n"
        "write one step's rows at the rate logix's segment writer alone reaches on this disk / plain step);\n"
        "peak extra MB: see the line at the top."
    )
    print()
    print(details(results))
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s; load average at end: {load()}")


if __name__ == "__main__":
    main()
