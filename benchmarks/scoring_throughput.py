"""How fast does logix score queries against a log on disk, against the machine's own bound?

    python benchmarks/scoring_throughput.py            # ~8 GB float32 + ~4 GB float16 logs
    python benchmarks/scoring_throughput.py --quick    # ~1 GB + 0.5 GB, about a minute
    python benchmarks/scoring_throughput.py --smoke    # seconds: checks the benchmark works; its numbers mean nothing
    python benchmarks/scoring_throughput.py --gb 16 --queries 16 256 --blocks 1024 8192 32768

block_rows defaults to logix's own choice (about 64 MB of float32 rows: 1,024 rows here), then
2,048, 8,192 and 32,768.

A synthetic log of fixed row width D (default 16,384: one bias-free 128 x 128 Linear at
rank="full") is written through the public API (logix.init / watch / capture) in float32 and in
float16, with random inputs, so every row is a real captured gradient. Then, in this process:

  bound    read: the file's bytes read sequentially with large unbuffered reads, after evicting
           the file from the page cache (posix_fadvise DONTNEED), i.e. the disk's streaming
           rate; gemm: a (Q, D) x (D, b) float32 product on rows already in memory.
           bound rows/s = min(read rows/s, gemm rows/s).
  logix    log.influence(query, "identity", top_k=10, block_rows=b) over every row, the file
           evicted from the page cache first (so it reads from disk as a fresh job would), and
           once more warm (file in the page cache) as a second figure.
  ratio    bound / logix (1.0 = at the bound; the target is within 2x).
  memory   peak growth of the resident set during scoring, sampled every 10 ms, beside one
           block's size (b x D x 4 bytes): scoring holds a few blocks, never the log.

Other processes competing for the disk or the cores move every number: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn

import logix
from logix.log import default_block_rows

WIDTH = 128  # d_in = d_out of the one Linear: D = WIDTH ** 2
TOP_K = 10


def evict(path: Path) -> None:
    """Drop a file (or every file under a directory) from the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_log(path: Path, rows: int, dtype: str, batch: int = 1024) -> float:
    """A log of `rows` captured rows of width WIDTH**2; returns seconds spent writing it."""
    torch.manual_seed(0)
    model = nn.Linear(WIDTH, WIDTH, bias=False)
    start = time.perf_counter()
    with logix.init(path, rank="full", dtype=dtype, queue_size=4) as run:
        run.watch(model)
        for first in range(0, rows, batch):
            n = min(batch, rows - first)
            x = torch.randn(n, WIDTH)
            with run.capture(torch.arange(first, first + n), reduction="sum"):
                model(x).square().sum().backward()
            model.zero_grad()
    return time.perf_counter() - start


def read_bandwidth(path: Path) -> float:
    """Bytes/s of a cold sequential read of every segment of the log."""
    evict(path)
    total, start = 0, time.perf_counter()
    for file in sorted((path / "segments").glob("*.h5")):
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start)


def gemm_rows_per_s(queries: int, block: int, repeats: int = 5) -> float:
    q = torch.randn(queries, WIDTH * WIDTH)
    rows = torch.randn(block, WIDTH * WIDTH)
    q @ rows.T
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        q @ rows.T
        times.append(time.perf_counter() - start)
    return block / min(times)


class PeakRSS:
    """Peak resident-set growth over a block of code, sampled on a thread."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = self.peak - self.base


def make_query(log: logix.Log, queries: int):
    torch.manual_seed(1)
    model = nn.Linear(WIDTH, WIDTH, bias=False)
    with log.query(model) as q:
        with q.capture([f"q{i}" for i in range(queries)], reduction="sum"):
            model(torch.randn(queries, WIDTH)).square().sum().backward()
    return q


def score_once(path: Path, q, block: int, cold: bool) -> tuple[float, int]:
    if cold:
        evict(path)
    log = logix.open(path)
    with PeakRSS() as mem:
        start = time.perf_counter()
        top = log.influence(q, "identity", top_k=TOP_K, block_rows=block, progress=False)
        seconds = time.perf_counter() - start
    assert top.values.shape == (len(q), TOP_K)
    return seconds, mem.growth


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~1 GB log, fewer configurations (about a minute)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run that checks the benchmark works; its numbers mean nothing: 512 rows (a 32 MB "
        "float32 log), Q = 4, block_rows 128 and logix's default, 1 torch thread (options given explicitly "
        "still apply; wins over --quick)",
    )
    parser.add_argument(
        "--gb", type=float, default=None, help="size of the float32 log in GB (default 8, quick 1, smoke 1/32)"
    )
    parser.add_argument("--queries", type=int, nargs="+", default=None, help="query counts Q (default 16 256)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="block_rows values")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dir", default=None, help="where to write the logs (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the logs afterwards")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick = False  # --smoke wins over --quick
        args.threads = args.threads or 1  # small products; threads waiting on a busy machine would dominate
    if args.threads:
        torch.set_num_threads(args.threads)
    gb = args.gb if args.gb is not None else (1 / 32 if args.smoke else 1.0 if args.quick else 8.0)
    queries = args.queries or ([4] if args.smoke else [16] if args.quick else [16, 256])
    default = default_block_rows(WIDTH * WIDTH)  # what log.influence uses when block_rows is not given
    # smoke: 128 rows per block scores the 512 rows in several blocks, the default in one
    sizes = [default, 128] if args.smoke else [default] if args.quick else [default, 2048, 8192, 32768]
    blocks = args.blocks or sizes
    row_bytes = WIDTH * WIDTH * 4
    rows = int(gb * (1 << 30) // row_bytes)
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end; its numbers mean nothing")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()}")
    print(f"rows: {rows:,} of D = {WIDTH * WIDTH:,} numbers; float32 log {human_bytes(rows * row_bytes)}")

    root = Path(args.dir or tempfile.mkdtemp(prefix="logix-scoring-"))
    results = []
    try:
        for dtype in ("float32", "float16"):
            path = root / f"log-{dtype}"
            shutil.rmtree(path, ignore_errors=True)
            seconds = write_log(path, rows, dtype)
            size = sum(p.stat().st_size for p in (path / "segments").glob("*.h5"))
            print(f"wrote {dtype} log: {human_bytes(size)} in {seconds:.1f} s ({human_bytes(size / seconds)}/s)")
            bandwidth = read_bandwidth(path)
            read_rows = bandwidth / (size / rows)
            for nq in queries:
                q = make_query(logix.open(path), nq)
                for block in blocks:
                    gemm = gemm_rows_per_s(nq, block)
                    cold, mem = score_once(path, q, block, cold=True)
                    warm, _ = score_once(path, q, block, cold=False)
                    bound = min(read_rows, gemm)
                    results.append((dtype, nq, block, read_rows, gemm, bound, rows / cold, rows / warm, mem, block))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    head = ["dtype", "Q", "block", "read rows/s", "gemm rows/s", "bound", "logix cold", "ratio", "logix warm",
            "peak RSS +", "one block"]
    lines = [head]
    for dtype, nq, block, read_rows, gemm, bound, cold, warm, mem, b in results:
        lines.append([dtype, str(nq), str(block), f"{read_rows:,.0f}", f"{gemm:,.0f}", f"{bound:,.0f}",
                      f"{cold:,.0f}", f"{bound / cold:.2f}", f"{warm:,.0f}", human_bytes(mem),
                      human_bytes(b * WIDTH * WIDTH * 4)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    print()
    for row in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print("\nratio = bound / logix cold (1.00 = at the bound; target <= 2). "
          f"Load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
