"""The README's main example runs end to end, its log reads back as promised, and its attribution
finds the labels it flipped."""

import re
import subprocess
import sys
from pathlib import Path

import logix

ROOT = Path(__file__).resolve().parents[1]


def test_digits_example_runs_logs_and_attributes(tmp_path):
    out, png = tmp_path / "digits", tmp_path / "figure" / "attribution.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--out", str(out), "--epochs", "2", "--rank", "8"]
        + ["--png", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stdout = result.stdout
    assert "flipped 130 of 1297 training labels" in stdout
    assert "test accuracy" in stdout

    # (a) four test digits, each with five helpful and five harmful training digits
    assert stdout.count("most helpful:") == 4 and stdout.count("most harmful:") == 4
    assert len(re.findall(r"^    id +\d+  label \d.*score [+-]", stdout, re.M)) == 40
    # (b) twenty self-influence lines, then the share of flipped labels in the top 10%
    assert "highest self-influence in the last epoch" in stdout
    assert len(re.findall(r"^  id +\d+  label \d.*self-influence ", stdout, re.M)) == 20
    caught, top = map(int, re.search(r"top 10% by self-influence: (\d+) of (\d+)", stdout).groups())
    assert top == 129
    assert caught / top > 0.3, stdout  # flipped labels are 10% of all: self-influence must beat chance
    # (c) the figure, where --png asked for it
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    log = logix.open(out)  # the latest pass, epoch1
    assert [p.name for p in log.passes] == ["epoch0", "epoch0/curvature", "epoch1", "epoch1/curvature"]
    assert all(p.finalized and p.rows == 1297 for p in log.passes)
    assert log.current.name == "epoch1"  # the latest training pass, not its curvature pass
    assert log.curvature_pass().name == "epoch1/curvature"
    assert sorted(log.ids.tolist()) == list(range(1297))
    assert log.gradients("0").shape == (1297, 8, 8)
    assert len(log.self_influence("ekfac").values) == 1297  # EK-FAC statistics were gathered


def test_ddp_digits_example_on_two_processes(tmp_path):
    """examples/ddp_digits.py under torchrun: two ranks, one log that reads as if one process wrote it."""
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        + [str(ROOT / "examples" / "ddp_digits.py"), "--out", str(out), "--epochs", "2", "--rank", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1297 rows in the last pass from ranks [0, 1]" in result.stdout
    assert result.stdout.count("most helpful training digits [") == 3
    caught, top = map(int, re.search(r"top 10% by self-influence: (\d+) of (\d+)", result.stdout).groups())
    assert top == 129 and caught / top > 0.3
    log = logix.open(out)
    assert sorted(log.ids.tolist()) == list(range(1297)) and log.current.finalized


def test_backdoor_lm_influence_finds_the_poisoned_sequences(tmp_path):
    """examples/backdoor_lm.py, short: the aggregate influence of the triggered queries ranks the
    poisoned sequences first where chance finds almost none, in both variants; removing them and
    retraining gives a model (checked: a row per method, outcomes only where retrained)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import backdoor_lm
    finally:
        sys.path.remove(str(ROOT / "examples"))
    for variant in backdoor_lm.VARIANTS:
        facts, rows = backdoor_lm.experiment(
            str(tmp_path / variant), 0, variant, 0.01, 3, retrain=("influence (ekfac, cosine)",), workers=1
        )
        k, found = facts["poisoned"], {row[0]: row[1] for row in rows[1:]}
        assert k == 6 and facts["sequences"] == 555
        assert found["influence (ekfac, cosine)"] >= 5, rows  # chance: 6 x 6 / 555, well under 1
        assert found["random"] <= 2, rows
        assert [len(row) for row in rows] == [len(backdoor_lm.HEAD)] * len(rows)
        retrained = [row[0] for row in rows if isinstance(row[3], float)]
        assert retrained == ["nothing removed", "influence (ekfac, cosine)"]
