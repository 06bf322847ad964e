"""A training job that logs with logix, for tests/test_crash.py to kill with SIGKILL.

The row logged for id i depends only on i: the model's weights are fixed (seeded, no optimizer
step) and the example for id i is row i of a seeded table, so any committed row can be compared
with the row a clean run wrote for the same id. The job always opens its log with resume=True and
walks the same passes and batches; a restarted job therefore continues where the killed one left.

It reports its progress as lines on stdout (flushed at once), so that a test can kill it at a
chosen moment: `started`, `ready` (init done), `logging`, `pass <name>` (just before
start_pass), `first batch` (its first capture is over), `flushed <name>` (every row of the pass
committed), `paused`, `finalizing`, `done`. A test can also make it wait at a chosen point
(`hold_before`, `pause_at`), so that whether the job is still there to be killed, or has not yet
gone past a point, does not depend on how fast the machine is.

Two ways to run it:

    python tests/crash_worker.py PATH [--ids N --batch B --passes P --commit S --delay S ...]
    python tests/crash_worker.py --serve

`--serve` is a fork server for the tests: it imports torch and logix once, then for each JSON
line {"path": ..., "out": ..., options...} on stdin it forks a child that runs the job with its
stdout/stderr sent to the file `out`, and answers `pid N`. `wait N` answers `status S` once child
N has ended (S: its exit code, or minus the signal that killed it); `poll N` answers the same,
or `running` at once (each child is reaped once: ask no more about it after its `status`).
Forking from a process that has only imported torch (no thread pool started yet) saves the
seconds an import costs, so a test can kill many jobs within its time budget; the children are
real processes all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import logix

D_IN, D_HIDDEN, CLASSES = 6, 12, 3
DEFAULTS = {
    "ids": 256,
    "batch": 8,
    "passes": 3,
    "commit": 0.02,
    "delay": 0.0,
    "rank": 4,
    "statistics": None,
    "flush_each_pass": False,
    "hold": 0.0,
    "stop_after": None,
    "pause_at": None,
    "hold_before": None,
    "gate": None,
}


def build(n_ids: int = DEFAULTS["ids"]):
    """The fixed model and the examples (x_i, y_i) of ids 0..n_ids-1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, CLASSES))
    x = torch.randn(n_ids, D_IN, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, CLASSES, (n_ids,), generator=torch.Generator().manual_seed(2))
    return net, x, y


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def hold_on(seconds: float, gate: str | None) -> None:
    """Wait `seconds`, or until the file `gate` appears (it is removed, so that the next wait needs a
    new one). A job whose fork server is gone exits: no job outlives the test that started it."""
    parent, end = os.getppid(), time.monotonic() + seconds
    while time.monotonic() < end:
        if gate is not None and os.path.exists(gate):
            os.unlink(gate)
            return
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.002)


def finalized_passes(path) -> set:
    """Passes of the log already finalized (a crash during finalize can leave some so)."""
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        return set()
    return {p.name for p in logix.open(path).passes if p.finalized}


def work(
    path,
    ids=256,
    batch=8,
    passes=3,
    commit=0.02,
    delay=0.0,
    rank=4,
    statistics=None,
    flush_each_pass=False,
    hold=0.0,
    stop_after=None,
    pause_at=None,
    hold_before=None,
    gate=None,
) -> None:
    """Log `passes` passes over ids 0..ids-1 in batches of `batch`, then finalize.

    stop_after: end (without finalizing, the way a crash would) after that many passes.
    hold: seconds to wait after each `flushed` or `paused` line (a test kills the job then).
    pause_at: after that many batches (counted over all passes; an int or a list), flush, say
        `paused`, wait `hold`.
    hold_before: "logging" or "finalizing": wait `hold` before saying that line (and going on).
    gate: a file whose appearance ends a wait early (see hold_on).
    """
    if hold_before not in (None, "logging", "finalizing"):
        raise ValueError(f"hold_before must be 'logging' or 'finalizing', got {hold_before!r}")
    pauses = {pause_at} if isinstance(pause_at, int) else set(pause_at or ())
    torch.set_num_threads(1)
    say("started")
    net, x, y = build(ids)
    run = logix.init(path, rank=rank, statistics=statistics, resume=True, commit_interval=commit)
    say("ready")
    run.watch(net)
    done = finalized_passes(path)
    if hold_before == "logging":
        hold_on(hold, gate)
    say("logging")
    batches = 0
    for p in range(passes):
        if stop_after is not None and p >= stop_after:
            os._exit(0)  # as if killed: no finalize, no atexit
        name = f"p{p}"
        if name in done:
            continue
        say(f"pass {name}")
        run.start_pass(name)
        for start in range(0, ids, batch):
            chunk = list(range(start, min(ids, start + batch)))
            with run.capture(chunk):
                F.cross_entropy(net(x[chunk]), y[chunk]).backward()
            net.zero_grad()
            batches += 1
            if batches == 1:
                say("first batch")
            if batches in pauses:
                run.flush()
                say("paused")
                hold_on(hold, gate)
            if delay:
                time.sleep(delay)
        if flush_each_pass:
            run.flush()
            say(f"flushed {name}")
            if hold:
                hold_on(hold, gate)
    if hold_before == "finalizing":
        hold_on(hold, gate)
    say("finalizing")
    run.finalize()
    say("done")


def serve() -> None:
    """The fork server (see the module docstring)."""
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line.startswith(("wait ", "poll ")):  # a child is reaped once: the test keeps its status
            command, pid = line.split()
            done, status = os.waitpid(int(pid), os.WNOHANG if command == "poll" else 0)
            if done == 0:
                say("running")
            else:
                say(f"status {-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}")
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: run the job, never return into the server loop
            code = 1
            try:
                fd = os.open(job.pop("out"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                work(job.pop("path"), **job)
                code = 0
            except BaseException:  # noqa: BLE001 - reported in the output file
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        say(f"pid {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?")
    parser.add_argument("--serve", action="store_true")
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=float if isinstance(value, float) else (int if value is not None else None))
    args = vars(parser.parse_args())
    if args.pop("serve"):
        serve()
        return
    path = args.pop("path")
    if path is None:
        parser.error("PATH is needed (or --serve)")
    for key in ("stop_after", "pause_at"):
        if args[key] is not None:
            args[key] = int(args[key])
    work(path, **{k: v for k, v in args.items() if v is not None})


if __name__ == "__main__":
    main()
