"""run.watch(engine) finds an engine's adapter through the registry; the core imports none."""

import subprocess
import sys

from torch import nn

import logix
from logix import engines


class FakeEngine(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def test_watch_calls_the_attach_registered_for_the_engine(tmp_path):
    seen = []
    engines.register("FakeEngine", lambda run, engine: seen.append((run, engine)))
    try:
        engine = FakeEngine()
        run = logix.init(tmp_path / "log", rank=2)
        run.watch(engine)
        assert seen == [(run, engine)]
        run.finalize()
        plain = logix.init(tmp_path / "plain", rank=2)
        plain.watch(nn.Sequential(nn.Linear(3, 2)))  # a plain model attaches nothing
        assert len(seen) == 1
        plain.finalize()
    finally:
        engines._attachers.pop("FakeEngine")


def test_deepspeed_is_found_through_its_entry_point_and_the_core_imports_no_adapter():
    code = (
        "import sys, logix, torch\n"
        "from logix import engines\n"
        "assert not [m for m in sys.modules if m.startswith('logix.integrations')], sys.modules.keys()\n"
        "attach = engines.attacher_for(type('DeepSpeedEngine', (), {})())\n"
        "assert attach.__module__ == 'logix.integrations.deepspeed', attach\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
