"""Crash safety and concurrent reading, for real: jobs that log are killed with SIGKILL at random
moments (during startup, logging, pass switches and finalize), and a second process reads and
scores the log while a job is still writing it.

The jobs are tests/crash_worker.py, forked from a server that has imported torch once (an import
costs seconds on a loaded CI machine; a fork costs milliseconds), so each test kills many real
processes well within its time budget. The row of id i depends only on i, so every committed row
is compared with the row a clean run wrote for that id. Set LOGIX_CRASH_SEED to replay a run.

Only the delay between a job reaching a point and its kill is random. Whether the point is reached
does not depend on the machine's speed: a test waits for the job's own report of it, and where a
job could otherwise run past a point before the kill, the job is told to wait there. The only time
limit (HANG) catches a hung job, not a slow one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logix
from logix.disk.statistics import load_sums

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import crash_worker  # noqa: E402

N_IDS, PASSES = crash_worker.DEFAULTS["ids"], crash_worker.DEFAULTS["passes"]
ALL_PASSES = [f"p{p}" for p in range(PASSES)]
SEED = int(os.environ.get("LOGIX_CRASH_SEED", random.SystemRandom().randrange(2**31)))
HANG = 300.0  # seconds without the awaited report: the job is hung, however loaded the machine


class ForkServer:
    """Drives `crash_worker.py --serve`: start jobs, watch their progress lines, kill, reap."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_worker.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.jobs = 0
        self.running: list[Job] = []

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        return answer.strip()

    def start(self, path: Path, **options) -> Job:
        self.jobs += 1
        out = self.workdir / f"job{self.jobs}.out"
        answer = self._ask(json.dumps({"path": str(path), "out": str(out), **options}))
        assert answer.startswith("pid "), answer
        job = Job(self, int(answer.split()[1]), out)
        self.running.append(job)
        return job

    def close(self) -> None:
        for job in self.running:  # a job a failed test left behind
            if job.status is None:
                job.kill()
                job.wait()
        self.proc.stdin.close()
        self.proc.wait(timeout=HANG)


class Job:
    def __init__(self, server: ForkServer, pid: int, out: Path):
        self.server, self.pid, self.out = server, pid, out
        self.started = time.monotonic()
        self.status: int | None = None

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []

    def text(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def wait_for(self, prefix: str, timeout: float = HANG) -> None:
        """Poll until the job printed a line starting with `prefix`. A job that ends without it was
        asked for a point it never passes (a bug of the test or of logix): that fails at once."""
        deadline, next_poll = time.monotonic() + timeout, 0.0
        while True:
            ended = False
            if time.monotonic() >= next_poll:  # asking the server costs more than reading the file
                ended, next_poll = self.poll() is not None, time.monotonic() + 0.02
            if any(line.startswith(prefix) for line in self.lines()):
                return
            if ended:
                raise AssertionError(f"job {self.pid} ended (status {self.status}) before {prefix!r}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {self.pid} hung: no {prefix!r} within {timeout} s:\n{self.text()}")
            time.sleep(0.0005)

    def poll(self) -> int | None:
        """The job's status once it has ended (the server reaps it then), else None."""
        if self.status is None:
            answer = self.server._ask(f"poll {self.pid}")
            if answer != "running":
                self.status = int(answer.split()[1])
        return self.status

    def kill(self) -> None:
        if self.status is None:  # not reaped yet: alive or a zombie (which takes it silently)
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.status is None:
            self.status = int(self.server._ask(f"wait {self.pid}").split()[1])
        return self.status

    def finish(self, timeout: float = HANG) -> None:
        """Let the job run to its end; it must succeed."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"job {self.pid} hung: not over within {timeout} s:\n{self.text()}")
            time.sleep(0.01)
        assert self.status == 0, f"job {self.pid} failed (status {self.status}):\n{self.text()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ForkServer(tmp_path_factory.mktemp("jobs"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> dict:
    """{id: row} from a clean run of the same job (every pass writes the same rows)."""
    path = tmp_path_factory.mktemp("reference") / "log"
    server.start(path).finish()
    log = logix.open(path)
    assert [p.name for p in log.passes] == ALL_PASSES and all(p.finalized for p in log.passes)
    rows = {}
    for name in ALL_PASSES:
        part = log.select(name)
        assert sorted(part.ids.tolist()) == list(range(N_IDS))
        got = dict(zip(part.ids.tolist(), part.rows().numpy()))
        for i, row in got.items():
            assert np.any(row != 0), f"reference row {i} is zero"
            if i in rows:
                np.testing.assert_array_equal(row, rows[i])  # the job is deterministic
        rows.update(got)
    return rows


def check_committed(path: Path, reference: dict, context: str) -> dict[str, int]:
    """Every committed row of every pass equals its reference row, no id twice in a pass;
    returns the committed rows per pass."""
    log = logix.open(path)
    counts = {}
    for info in log.passes:
        part = log.select(info.name)
        ids = part.committed_ids.tolist()
        assert len(ids) == len(set(ids)), f"{context}: pass {info.name} holds an id twice"
        assert info.rows == part.current.rows == len(ids) == len(part), f"{context}: pass {info.name} counts"
        assert f"rows={len(ids)}" in repr(part), f"{context}: {part!r}"
        assert set(ids) <= set(reference), f"{context}: unknown ids in pass {info.name}"
        try:
            rows = part.rows(include_flagged=True).numpy()
        except logix.LogixError as e:  # a committed row that cannot be read is a lost row
            raise AssertionError(f"{context}: pass {info.name}: committed rows cannot be read: {e}") from e
        assert rows.shape == (len(ids), log.width)
        for i, row in zip(ids, rows):
            if not np.array_equal(row, reference[i]):
                raise AssertionError(f"{context}: pass {info.name}, id {i}: row {row} != reference {reference[i]}")
        if info.finalized:
            assert sorted(ids) == list(range(N_IDS)), f"{context}: pass {info.name} is finalized but incomplete"
        counts[info.name] = len(ids)
    return counts


def check_complete(path: Path, reference: dict, context: str) -> None:
    counts = check_committed(path, reference, context)
    log = logix.open(path)
    assert [p.name for p in log.passes] == ALL_PASSES, context
    assert all(p.finalized for p in log.passes), f"{context}: {log.passes}"
    assert counts == {name: N_IDS for name in ALL_PASSES}, f"{context}: {counts}"


PHASES = ("startup", "logging", "pass", "finalize")
MAX_CYCLES = 100  # the hang guard of the loop below: it counts cycles, not seconds


def test_sigkill_at_random_moments_leaves_committed_rows_intact_and_resume_completes(server, reference, tmp_path):
    rng = random.Random(SEED)
    started = time.monotonic()
    logs, kills, cycles, log_index = [], 0, 0, 0
    kills_in = dict.fromkeys(PHASES, 0)
    path = tmp_path / "log0"
    previous: dict[str, int] = {}
    finalized: set = set()  # passes finalized by earlier cycles on this log
    history = []  # what happened in each cycle, for the failure messages
    while cycles < 12 or kills < 10 or not all(kills_in.values()):
        assert cycles < MAX_CYCLES, f"seed {SEED}: {cycles} cycles, {kills} kills, by phase {kills_in}: {history}"
        cycles += 1
        # a job skips the passes finalized before it: only a pass it will start can be waited for
        ahead = [f"p{p}" for p in range(1, PASSES) if f"p{p}" not in finalized]
        possible = [phase for phase in PHASES if phase != "pass" or ahead]
        unkilled = [phase for phase in possible if not kills_in[phase]]
        if cycles <= len(PHASES) and PHASES[cycles % len(PHASES)] in possible:
            phase = PHASES[cycles % len(PHASES)]
        else:  # past the first 12 cycles, a phase without a kill yet goes first
            phase = rng.choice(unkilled if cycles > 12 and unkilled else possible)
        if phase == "startup":  # the job waits before logging: the kill lands in startup on any machine
            job = server.start(path, delay=0.003, hold_before="logging", hold=HANG)
            time.sleep(rng.uniform(0, 0.03))
        else:
            job = server.start(path, delay=0.003)
        if phase == "logging":
            job.wait_for("logging")
            time.sleep(rng.uniform(0, 0.5))
        elif phase == "pass":
            job.wait_for(f"pass {rng.choice(ahead)}")
            time.sleep(rng.uniform(0, 0.004))
        elif phase == "finalize":
            job.wait_for("finalizing")
            time.sleep(rng.uniform(0, 0.01))
        job.kill()
        status = job.wait()
        lines = job.lines()
        context = f"seed {SEED}, cycle {cycles} ({phase}), {path.name}, job said {lines}, history {history}"
        assert status in (0, -signal.SIGKILL), f"{context}: status {status}\n{job.text()}"
        history.append((phase, status, lines[-1] if lines else None))
        if status == 0:  # the job ended before the kill: the log is complete
            assert phase != "startup", context
            check_complete(path, reference, context)
            logs.append(path)
            log_index += 1
            path, previous, finalized = tmp_path / f"log{log_index}", {}, set()
            continue
        kills += 1
        kills_in[phase] += 1
        if phase == "startup":
            assert "logging" not in lines, context
        if not (path / "manifest.json").exists():
            # killed before the log existed: nothing was committed, so nothing may be there but the
            # directory, the writer's lock file and (see test_a_kill_during_the_first_manifest_write...)
            # temp files
            assert "logging" not in lines, context
            leftovers = [p.name for p in path.iterdir()] if path.exists() else []
            assert all(name.startswith(".") or name == "writer.lock" for name in leftovers), f"{context}: {leftovers}"
            continue
        counts = check_committed(path, reference, context)
        for name, n in previous.items():  # committed rows are never lost
            assert counts.get(name, 0) >= n, f"{context}: pass {name} had {n} rows, now {counts.get(name, 0)}"
        previous = counts
        log = logix.open(path)
        done = {p.name for p in log.passes if p.finalized}
        if "finalizing" not in lines:  # only a kill during finalize may have finalized more passes
            assert done == finalized, f"{context}: {log.passes}"
        finalized = done
    # the last log: a resumed job completes it
    job = server.start(path)
    job.finish()
    check_complete(path, reference, f"seed {SEED}, the resumed run after {history}")
    logs.append(path)
    segments = sum(len(p.segments) for p in logix.open(path).passes)
    print(
        f"seed {SEED}: {cycles} cycles, {kills} kills (by phase {kills_in}), {len(logs)} logs completed, "
        f"{time.monotonic() - started:.1f} s; last log: {segments} segments, history {history}"
    )
    assert kills >= 10 and all(kills_in.values()), kills_in


def test_consecutive_kills_in_every_pass_then_resume(server, reference, tmp_path):
    """Kill, resume, kill, ...: each job is killed in the middle of a pass; the segments add up.

    The jobs wait before finalizing, so that none can finalize before its kill on any machine."""
    rng = random.Random(SEED + 1)
    path = tmp_path / "log"
    previous = {}
    killed_segments: set[str] = set()  # segment files the killed sessions left listed
    for k in range(6):
        job = server.start(path, delay=0.004, hold_before="finalizing", hold=HANG)
        job.wait_for("first batch")  # the first job has a segment listed by then
        time.sleep(rng.uniform(0.05, 0.25))
        job.kill()
        assert job.wait() == -signal.SIGKILL, job.text()
        counts = check_committed(path, reference, f"seed {SEED}, kill {k}")
        assert all(counts.get(name, 0) >= n for name, n in previous.items()), (previous, counts)
        log = logix.open(path)
        assert not any(p.finalized for p in log.passes)
        killed_segments |= {s.file for p in log.passes for s in p.segments}
        previous = counts
    server.start(path).finish()
    check_complete(path, reference, f"seed {SEED}, after 6 kills")
    log = logix.open(path)
    kept = {s.file for p in log.passes for s in p.segments}
    assert killed_segments and killed_segments <= kept, (killed_segments, kept)  # the killed sessions' segments stay


def test_a_second_process_reads_and_scores_committed_rows_while_training_writes(server, reference, tmp_path):
    """The job also waits at three points in the middle of a pass, once each pass's rows so far are
    committed, until the reader has read and scored them: at least three reads of a pass being
    written, however slow the reader is next to the writer."""
    path = tmp_path / "log"
    gate = tmp_path / "go"
    pauses = [16, 16 + N_IDS // 8, 16 + 2 * N_IDS // 8]  # 16 batches into each pass
    # about 3 s of logging, committed every 0.02 s
    job = server.start(path, delay=0.03, pause_at=pauses, hold=HANG, gate=str(gate))
    net, x, y = crash_worker.build(N_IDS)
    query_ids = [3, 100, 200]
    ref_rows = torch.from_numpy(np.stack([reference[i] for i in range(N_IDS)]))
    seen: dict[str, int] = {}
    held = None  # one Log kept open and refreshed, beside fresh opens
    reads = partial_reads = scored = released = 0
    complete: set[str] = set()
    deadline = time.monotonic() + HANG
    while "done" not in job.lines():
        assert time.monotonic() < deadline, f"the job hung:\n{job.text()}"
        assert job.poll() is None or "done" in job.lines(), f"the job failed:\n{job.text()}"
        paused = job.lines().count("paused")  # the job waits for the gate: what follows reads a still log
        if not (path / "manifest.json").exists():
            time.sleep(0.005)
            continue
        log = logix.open(path)
        if held is None:
            held = log
        else:
            held.refresh()
            for info in held.passes:
                assert info.rows >= seen.get(info.name, 0)
        for info in log.passes:
            if info.name in complete:
                continue  # read in full once; check_complete reads it again at the end
            part = log.select(info.name)
            ids = part.ids.tolist()  # select() opens a newer snapshot than `log`: use its own PassInfo
            assert len(ids) == len(set(ids)) and part.current.rows == len(ids)
            assert len(ids) >= seen.get(info.name, 0), f"pass {info.name}: {seen} then {len(ids)} rows"
            seen[info.name] = len(ids)
            rows = part.rows()
            assert torch.equal(rows, ref_rows[ids]), f"pass {info.name}: a row read differs from its reference"
            assert bool((rows != 0).any(dim=1).all()), "a zero row was read"
            for module in part.modules.values():  # the per-module view agrees
                blocks = part.gradients(module.name)
                assert torch.equal(blocks.reshape(len(ids), module.width), rows[:, module.columns])
            reads += 1
            partial_reads += 0 < len(ids) < N_IDS
            if len(ids) == N_IDS:
                complete.add(info.name)
        if log.current is not None and len(log) > 0:
            q = log.query(net)
            with q.capture(query_ids):
                F.cross_entropy(net(x[query_ids]), y[query_ids]).backward()
            net.zero_grad()
            scores = log.influence(q, "identity")
            train = scores.train_ids.tolist()
            assert train == log.ids.tolist()
            want = q.rows.double() @ ref_rows[train].double().T
            # (not torch.testing.assert_close: its first call imports sympy, seconds the writer won't wait)
            assert torch.allclose(scores.values.double(), want, rtol=1e-4, atol=1e-5), (scores.values, want)
            scored += 1
        if paused > released:
            gate.touch()  # the job removes it and goes on
            released += 1
    assert released == len(pauses), (released, job.text())
    job.finish()
    check_complete(path, reference, "the concurrently read log")
    print(f"{reads} pass reads ({partial_reads} of a pass being written), {scored} scorings")
    assert partial_reads >= 3 and scored >= 3, (reads, partial_reads, scored)


def test_a_kill_during_the_first_manifest_write_does_not_block_resume(tmp_path):
    path = tmp_path / "log"
    path.mkdir()
    # exactly what write_json_atomic leaves when killed between mkstemp and os.replace
    (path / ".manifest.json.k2x8q1.tmp").write_text('{"format": "logix-log", "sche')
    net, x, y = crash_worker.build(16)
    run = logix.init(path, rank=4, resume=True)
    run.watch(net)
    with run.capture(list(range(16))):
        F.cross_entropy(net(x), y).backward()
    run.finalize()
    assert len(logix.open(path)) == 16


@pytest.mark.parametrize("pause_at", [N_IDS // 16, N_IDS // 8], ids=["half-committed", "all-committed"])
def test_statistics_of_a_resumed_pass_cover_the_rows_committed_before_the_kill(server, tmp_path, pause_at):
    path = tmp_path / "log"
    job = server.start(path, passes=1, statistics="kfac", pause_at=pause_at, hold=HANG)
    job.wait_for("paused")  # pause_at batches of 8 are committed; the job waits
    job.kill()
    assert job.wait() == -signal.SIGKILL
    assert len(logix.open(path)) == pause_at * 8
    job = server.start(path, passes=1, statistics="kfac")
    job.finish()  # the resumed job logs the rest and finalizes
    assert logix.open(path).current.finalized
    manifest = json.loads((path / "manifest.json").read_text())
    sums = load_sums([path / f for f in manifest["passes"][0].get("statistics_parts", [])])
    assert sums, "no statistics"
    for name, values in sums.items():
        assert float(values["s_count"]) == N_IDS, (name, float(values["s_count"]))
