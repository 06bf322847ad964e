"""The README's main example runs end to end and its log reads back as promised."""

import subprocess
import sys
from pathlib import Path

import logix

ROOT = Path(__file__).resolve().parents[1]


def test_digits_example_runs_and_logs_every_example(tmp_path):
    out = tmp_path / "digits"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "--out", str(out), "--epochs", "2", "--rank", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    log = logix.open(out)
    assert [p.name for p in log.passes] == ["epoch0", "epoch1"]
    assert all(p.finalized and p.rows == 1297 for p in log.passes)
    assert sorted(log.ids.tolist()) == list(range(1297))
    assert log.gradients("0").shape == (1297, 8, 8)
