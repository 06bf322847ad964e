"""How often does a SIGKILL lose committed rows? Kill a logging job at random moments, many times.

    python benchmarks/kill_loop.py            # 40 kills, 3,000 ids in batches of 2 (a few minutes)
    python benchmarks/kill_loop.py --quick    # 10 kills
    python benchmarks/kill_loop.py --smoke    # seconds: checks the benchmark works (2 kills, 200 ids)
    python benchmarks/kill_loop.py --kills 100 --ids 3000 --batch 2 --seed 7

The job is tests/crash_worker.py (the row of id i depends only on i), writing one log with
resume=True: each run continues where the killed one stopped, in a new segment. After every kill
the log is opened and every committed row is compared with a clean run's row for the same id;
after the last kill a job runs to the end and the log must hold every id once. Small batches and a
short commit interval make the writer rewrite the last, partly filled chunk of a segment many times
per second: a kill in the middle of that rewrite is the case that used to make committed rows
unreadable (issue 15.1).

Prints one line per kill that found a problem, then a table of the counts.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import logix

WORKER = Path(__file__).resolve().parent.parent / "tests" / "crash_worker.py"


def job(path: Path, args) -> list[str]:
    return [
        sys.executable, str(WORKER), str(path), "--ids", str(args.ids), "--batch", str(args.batch), "--passes", "1",
        "--commit", str(args.commit), "--statistics", "kfac",
    ]  # fmt: skip


def committed_rows(path: Path) -> dict[int, torch.Tensor]:
    log = logix.open(path)
    return {int(i): row for i, row in zip(log.ids, log.rows())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 kills")
    parser.add_argument("--smoke", action="store_true", help="2 kills of a job logging 200 ids: checks it works")
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--ids", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--commit", type=float, default=0.01, help="seconds between the writer's commits")
    parser.add_argument("--max-delay", type=float, default=4.0, help="longest wait between a start and its kill")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the logs (their folder is printed) to inspect them")
    args = parser.parse_args(argv)
    kills_wanted = 2 if args.smoke else 10 if args.quick else args.kills
    if args.smoke:
        args.ids, args.max_delay = 200, 1.0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="logix-kill-loop-"))
    try:
        _loop(args, kills_wanted, seed, rng, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _loop(args, kills_wanted: int, seed: int, rng: random.Random, work: Path) -> None:
    """Kill the job again and again; check the committed rows after each kill; print the table."""
    print(f"seed {seed}; {kills_wanted} kills of a job logging {args.ids} ids in batches of {args.batch}; {work}")

    subprocess.run(job(work / "reference", args), check=True, capture_output=True)
    reference = committed_rows(work / "reference")
    path = work / "log"
    kills = unreadable = lost_rows = wrong_rows = finished_early = 0
    previous = 0
    started = time.monotonic()
    while kills < kills_wanted:
        proc = subprocess.Popen(job(path, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, args.max_delay))
        if proc.poll() is not None:  # the job finished: start a new log
            finished_early += 1
            path = work / f"log{finished_early}"
            previous = 0
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if not (path / "manifest.json").exists():
            continue
        try:
            rows = committed_rows(path)
        except logix.LogixError as e:
            unreadable += 1
            print(f"kill {kills}: the log cannot be read: {e}")
            continue
        wrong = [i for i, row in rows.items() if not torch.equal(row, reference[i])]
        wrong_rows += len(wrong)
        if wrong:
            print(f"kill {kills}: {len(wrong)} committed rows differ from the clean run's (ids {wrong[:5]})")
        if len(rows) < previous:
            lost_rows += previous - len(rows)
            print(f"kill {kills}: {previous - len(rows)} committed rows are gone")
        previous = len(rows)
    subprocess.run(job(path, args), check=True, capture_output=True)  # resume to the end
    final = committed_rows(path)
    complete = sorted(final) == sorted(reference) and all(torch.equal(final[i], reference[i]) for i in final)
    log = logix.open(path)
    table = [
        ("kills", kills),
        ("kills after which the log could not be read", unreadable),
        ("committed rows lost", lost_rows),
        ("committed rows that differ from a clean run", wrong_rows),
        ("jobs that finished before their kill", finished_early),
        ("segments in the last log", len(log.current.segments)),
        ("last log complete after a resumed run (every id once, bit-identical)", "yes" if complete else "NO"),
        ("seconds", f"{time.monotonic() - started:.0f}"),
    ]
    width = max(len(name) for name, _ in table)
    for name, value in table:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
