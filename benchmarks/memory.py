"""What logix keeps in memory, by formula, checked against a measured run.

    python benchmarks/memory.py            # formula for a 1B model at rank 64 + measured check
    python benchmarks/memory.py --quick    # smaller measured model
    python benchmarks/memory.py --smoke    # seconds: checks the benchmark works; its numbers mean nothing

For watched linear layers (d_in -> d_out, bias b = 0 or 1) at rank k, each side keeps
k_in = min(k, d_in + b) and k_out = min(k, d_out) numbers (a side at least as wide as its layer is
not projected); with batch B, T positions per example and rows stored as s-byte numbers:

  run-long     projections: 4 (k_in (d_in + b) + k_out d_out) bytes per layer, twice (the matrices
               kept for the log and their transposed copy on the training device); statistics:
               float64 K-FAC sums, 8 (k_in^2 + k_out^2) per layer, on the device
  per batch    at most: the projected activations kept from forward to backward, 4 B T k_in per
               layer (a layer whose input is at most 32k numbers keeps it unprojected instead,
               4 B T d_in, to be projected with its group: logix.call_groups); the projected output
               gradients held until their group is finished, at most 4M numbers (16 MB); per-example
               blocks, 4 B k_out k_in per layer; the (B, D) float32 row buffer they are gathered
               into, 4 B D with D = sum of k_out k_in; on a GPU also the pinned host copy, s B D.
               Up to queue_size batches of host rows (default 16) may wait for the writer, and at
               most queue_bytes of them (256 MiB; one larger batch goes alone): min(16 s B D,
               max(256 MiB, s B D)), and the writer stages up to 4 MB of them, plus their joined
               copy, per write.
  bf16 autocast on a GPU: the projections are also kept in bf16 on the device, 2 (k_in (d_in + b)
               + k_out d_out) bytes per layer more.

The 1B example is a Llama-3.2-1B-shaped stack (16 layers of q, k, v, o, gate, up, down; hidden
2048, MLP 8192, grouped k/v 512; no bias). The measured check builds stacks of Linear layers on
the CPU and counts the bytes of tensors alive with torch's profiler (profile_memory): the peak of
a captured step minus the peak of a plain one, and what a run holds once set up.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import logix
from logix.disk.writer import QUEUE_BYTES, STAGE_BYTES

MB = 1 << 20


def llama_1b_linears() -> list[tuple[int, int, int]]:
    """(d_in, d_out, bias) of every linear layer of a Llama-3.2-1B-shaped model (lm_head left out)."""
    h, mlp, kv = 2048, 8192, 512
    layer = [(h, h, 0), (h, kv, 0), (h, kv, 0), (h, h, 0), (h, mlp, 0), (h, mlp, 0), (mlp, h, 0)]
    return layer * 16


def formula(
    layers, k: int, batch: int, positions: int, row_bytes: int = 4, queue: int = 16, gpu: bool = True,
    queue_bytes: int = QUEUE_BYTES,
) -> dict[str, float]:
    sides = [(min(k, d_in + b), min(k, d_out), d_in + b, d_out) for d_in, d_out, b in layers]
    proj = sum(4 * (k_in * d_in + k_out * d_out) for k_in, k_out, d_in, d_out in sides)
    stats = sum(8 * (k_in**2 + k_out**2) for k_in, k_out, _, _ in sides)
    width = sum(k_in * k_out for k_in, k_out, _, _ in sides)
    acts = sum(4 * batch * positions * k_in for k_in, _, _, _ in sides)
    blocks = 4 * batch * width
    rows = 4 * batch * width + (row_bytes * batch * width if gpu else 0)
    return {
        "projections (x2: log copy + device copy)": 2 * proj,
        "statistics": stats,
        "row width D": width,
        "row bytes": row_bytes * width,
        "activations kept for backward": acts,
        "per-example blocks": blocks,
        "row buffer (+ pinned host copy on GPU)": rows,
        "per batch in all, at most": acts + blocks + rows,
        "writer queue at most": min(queue * row_bytes * batch * width, max(queue_bytes, row_bytes * batch * width)),
        "writer staging at most (staged + joined)": 2 * max(STAGE_BYTES, row_bytes * batch * width),
        "bf16 projections (GPU autocast only)": proj / 2,
    }


class Stack(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def tensor_bytes(fn) -> tuple[int, int]:
    """(peak, final) bytes of CPU tensors allocated minus freed while fn runs, from torch's profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak, current


def held_by(run) -> int:
    """Bytes of the tensors a run keeps between batches: projections (both copies) and statistics."""
    tensors = [t for w in run.watched for t in w.held_tensors()]
    sums = run._pass_sums.sums  # the open pass's covariance sums (logix.pass_sums)
    if sums is not None:
        tensors += sums.held_tensors()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure(width: int, depth: int, k: int, batch: int, positions: int) -> tuple[int, int]:
    """(bytes a run holds between batches, a captured step's peak minus a plain step's peak)."""
    torch.manual_seed(0)
    model = Stack(width, depth)
    x = torch.randn(batch, positions, width)
    done = [0]

    def plain():
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=False)

    def captured(run):
        with run.capture(range(done[0], done[0] + batch)):
            model(x).square().mean().backward()
        model.zero_grad(set_to_none=False)
        run.flush()  # the rows are written and released before the step ends
        done[0] += batch

    plain()
    plain_peak, _ = tensor_bytes(plain)
    with tempfile.TemporaryDirectory() as tmp:
        run = logix.init(Path(tmp) / "log", rank=k, statistics="kfac", queue_size=1)
        run.watch(model)
        captured(run)  # set up outside the profiler: projections moved into place, statistics allocated
        captured_peak, _ = tensor_bytes(lambda: captured(run))
        held = held_by(run)
        run.finalize()
    return held, captured_peak - plain_peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller measured model")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run that checks the benchmark works; its numbers mean nothing: the measured model "
        "is 2 Linear(128, 128) layers at batch 4 x 16 (the formula is printed as always; wins over --quick)",
    )
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args(argv)
    k = args.rank
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end; its numbers mean nothing")

    print(f"Llama-3.2-1B-shaped linear layers at rank {k} (112 layers), batch 8 x 2048 tokens, float32 rows:")
    for name, value in formula(llama_1b_linears(), k, batch=8, positions=2048).items():
        print(f"  {name:<42}{value:>14,.0f}" if name == "row width D" else f"  {name:<42}{value / MB:>11,.1f} MB")

    sizes = (128, 2, 4, 16) if args.smoke else (256, 4, 8, 64) if args.quick else (1024, 8, 16, 256)
    width, depth, batch, positions = sizes
    predicted = formula([(width, width, 1)] * depth, k, batch, positions, queue=1, gpu=False)
    held, per_batch = measure(width, depth, k, batch, positions)
    rows = [
        ("run-long (projections + statistics)", predicted["projections (x2: log copy + device copy)"]
         + predicted["statistics"], held),
        ("per batch (acts + blocks + rows), at most", predicted["per batch in all, at most"], per_batch),
        ("per batch, the kept activations alone", predicted["activations kept for backward"], per_batch),
    ]
    print(f"\nmeasured on the CPU: {depth} Linear({width}, {width}) layers, rank {k}, batch {batch} x {positions}")
    print(f"  {'':<44}{'formula':>11}{'measured':>11}{'ratio':>8}")
    for name, want, got in rows:
        print(f"  {name:<44}{want / MB:>9.2f}MB{got / MB:>9.2f}MB{got / want:>8.2f}")
    print("  measured: run-long, the bytes of the tensors the run holds between batches; per batch, the peak")
    print("  bytes of live tensors (torch profiler, profile_memory=True) of a captured step minus a plain one's.")
    print("  The per-batch figure is below the bound when the blocks and rows are built after the model's own")
    print("  activations are freed (end of backward): then only the kept activations add to the peak.")


if __name__ == "__main__":
    main()
