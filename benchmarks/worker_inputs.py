"""What every worker process of compare_libraries.py needs: its own memory use, and the data and
trained models the main process handed over. Imports only numpy and torch, so logix-ai's worker
(whose import name is also `logix`) can use it too."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set now (VmRSS) or at its peak (VmHWM), MiB, from /proc/self/status.

    Not getrusage's ru_maxrss: Linux carries it across exec, so a worker forked from a big parent would
    report the parent's resident set at fork time. VmHWM belongs to the process image and starts at exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Restart VmHWM from the current resident set (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_inputs(path: Path):
    """(tensors dict, clean model, mislabeled model) from the .npz the main process wrote."""
    import torch
    from torch import nn

    d = np.load(path)
    t = {k: torch.from_numpy(d[k]) for k in ("xtr", "ytr", "noisy_y", "xq", "yq")}

    def model(prefix):
        hidden = d[f"{prefix}_0_weight"].shape[0]
        m = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        with torch.no_grad():
            for i in (0, 2):
                m[i].weight.copy_(torch.from_numpy(d[f"{prefix}_{i}_weight"]))
                m[i].bias.copy_(torch.from_numpy(d[f"{prefix}_{i}_bias"]))
        return m

    return t, model("clean"), model("noisy")
