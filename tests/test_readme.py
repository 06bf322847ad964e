"""Every command and snippet in the README runs as written, so the README cannot drift from the code.

The README is cut into its fenced ```bash and ```python blocks, by section (## heading):

* The opening block is what CI does: `.ci/run` runs `bash scripts/setup.sh` and the test command;
  the example command runs here, in a scratch directory, and its output (runs/digits, ...) is what
  the later sections read.
* bash blocks run with bash in a copy of that directory, `.venv/bin` first on PATH (as after
  `source .venv/bin/activate`). A benchmark named in one runs with `--smoke` (seconds).
* python blocks of one section run in order in one fresh interpreter, after the section's CONTEXT
  below: the names a training script already has (a model, an optimizer, a loader), which the
  README says are the user's own. A section without a context gets only the scratch directory.
* inline commands in the prose that start with `.venv/bin/` run too.
* a block whose first line is `# excerpt of FILE` must be lines of FILE, in order (FILE runs
  through an inline command); one whose first line is `# not run by the tests: WHY` is skipped
  with that reason, visibly in the README.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"#\s*not run by the tests:\s*(.+)")
EXCERPT = re.compile(r"#\s*excerpt of (\S+)")
BENCHMARK = re.compile(r"(benchmarks/\w+\.py)")
TIMEOUT = 600


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    line: int  # of the first code line in README.md
    code: str

    @property
    def first(self) -> str:
        return self.code.lstrip().splitlines()[0] if self.code.strip() else ""


def readme_blocks() -> list[Block]:
    blocks, section, fence, body, start = [], "(top)", None, [], 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                fence, body, start = line[3:].strip(), [], number + 1
        elif line.startswith("```"):
            if fence in ("bash", "python"):
                blocks.append(Block(section, fence, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    return blocks


def inline_commands() -> list[tuple[int, str]]:
    text = README.read_text()
    found = []
    for match in re.finditer(r"`(\.venv/bin/[^`\s]+ [^`]+)`", text):  # a program with arguments
        found.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return found


# -- what a training script already has, per section ---------------------------------------------

DIGITS = """
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import logix

torch.manual_seed(0)
_x, _y = load_digits(return_X_y=True)
_x = torch.tensor(_x / 16.0, dtype=torch.float32)
_y = torch.tensor(_y)
dataset = TensorDataset(_x[:1297], _y[:1297])
test_dataset = TensorDataset(_x[1297:1307], _y[1297:1307])
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loader = DataLoader(logix.WithIds(dataset), batch_size=64, shuffle=True)
test_loader = DataLoader(logix.WithIds(test_dataset), batch_size=5)
epochs = 2
"""

HF = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
train_ds = [{"input_ids": row, "labels": row} for row in torch.randint(0, 32, (12, 8)).tolist()]
args = TrainingArguments(
    "runs/trainer", per_device_train_batch_size=4, num_train_epochs=2, report_to=[], use_cpu=True,
    save_strategy="no", logging_strategy="no", disable_tqdm=True,
)
"""

DEEPSPEED = """
import os
import socket
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    _port = _s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed

_comm = sys.modules["deepspeed.comm.torch"]
_comm.build_shm_op = lambda: None  # one process: no shared-memory all-reduce to compile
deepspeed.init_distributed(dist_backend="gloo")
""" + DIGITS + """
path = "runs/deepspeed"
ds_config = {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}}
"""

LIGHTNING = """
import torch
import torch.nn.functional as F
import lightning as L
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
dataset = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


model = Classifier()
"""

# section -> (context, whether it reads the example's output)
CONTEXT = {
    "In your loop": (DIGITS, False),
    "HuggingFace Trainer": (HF, False),
    "DeepSpeed": (DEEPSPEED, False),
    "PyTorch Lightning": (LIGHTNING, False),
    "Reading a log": ("", True),
    "Attribution: which training examples mattered": (DIGITS, True),
    "Attribution across training": (DIGITS, True),
    "Uncertainty and complexity": (DIGITS, True),
    "Command line": (DIGITS, True),
}


# -- running -------------------------------------------------------------------------------------


def environment() -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}


def scratch(tmp: Path) -> Path:
    """A directory laid out like the checkout (.venv, examples, benchmarks), to run commands from."""
    tmp.mkdir(parents=True, exist_ok=True)
    venv = ROOT / ".venv"
    if not venv.is_dir():  # tests run by another interpreter: stand its bin folder in for .venv/bin
        (tmp / ".venv").mkdir(exist_ok=True)
        (tmp / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    else:
        (tmp / ".venv").symlink_to(venv)
    for folder in ("examples", "benchmarks", "scripts"):
        (tmp / folder).symlink_to(ROOT / folder)
    return tmp


def run_shell(command: str, cwd: Path, what: str) -> str:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    output = f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{command}\n{output}"
    return done.stdout


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory) -> Path:
    """The opening example command, run as written: what the later sections read."""
    opening = next(b for b in readme_blocks() if b.lang == "bash")
    first = opening.code.splitlines()[0].split("#")[0]
    setup, example = (part.strip() for part in first.split("&&"))
    assert setup == "bash scripts/setup.sh", first
    where = scratch(tmp_path_factory.mktemp("readme") / "checkout")
    output = run_shell(example, where, f"README.md:{opening.line}: {example}")
    assert "flipped among the top 10% by self-influence" in output
    return where


def copy_of(example_dir: Path, tmp_path: Path) -> Path:
    where = scratch(tmp_path / "checkout")
    shutil.copytree(example_dir / "runs", where / "runs")
    return where


def test_the_opening_commands_are_what_ci_runs():
    opening = next(b for b in readme_blocks() if b.lang == "bash")
    lines = [line.split("#")[0].strip() for line in opening.code.splitlines() if line.strip()]
    assert len(lines) == 2, opening.code
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "bash scripts/setup.sh" in ci, "the README's setup command is not what CI runs"
    assert lines[1] in ci, f"the README's test command {lines[1]!r} is not what CI runs"


def runnable(block: Block) -> bool:
    return not (SKIP.fullmatch(block.first.strip()) or EXCERPT.fullmatch(block.first.strip()))


def sections() -> list[str]:
    """Sections with a python block to run (excerpts are checked by test_excerpts_are_lines_of_their_source)."""
    names = []
    for block in readme_blocks():
        if block.lang == "python" and runnable(block) and block.section not in names:
            names.append(block.section)
    return names


@pytest.mark.parametrize("section", sections())
def test_python_blocks_run(section, example_dir, tmp_path):
    blocks = [b for b in readme_blocks() if b.lang == "python" and b.section == section]
    context, reads_example = CONTEXT.get(section, ("", False))
    where = copy_of(example_dir, tmp_path) if reads_example else scratch(tmp_path / "checkout")
    script = [textwrap.dedent(context), "_README = {}"]
    ran = [block for block in blocks if runnable(block)]
    for block in ran:
        script.append(f"_README[{block.line}] = {block.code!r}")
        script.append(f"exec(compile(_README[{block.line}], 'README.md:{block.line}', 'exec'))")
    done = f"README blocks done: {[b.line for b in ran]}"
    script.append(f"print({done!r})")  # reached only if every block ran through
    (where / "readme_section.py").write_text("\n".join(script) + "\n")
    output = run_shell(f"{sys.executable} readme_section.py", where, f"README section {section!r}")
    assert ran and done in output, f"README section {section!r} stopped early:\n{output[-2000:]}"


def check_excerpt(block: Block, source: Path) -> None:
    """Every line of the block is a line of `source`, in the same order."""
    lines = [line.strip() for line in source.read_text().splitlines()]
    at = 0
    for line in block.code.splitlines()[1:]:
        if not line.strip():
            continue
        try:
            at = lines.index(line.strip(), at) + 1
        except ValueError:
            raise AssertionError(f"README.md:{block.line}: {line.strip()!r} is not (in order) in {source}") from None


def test_excerpts_are_lines_of_their_source():
    excerpts = [b for b in readme_blocks() if EXCERPT.fullmatch(b.first.strip())]
    assert excerpts, "the README quotes no example file"
    for block in excerpts:
        check_excerpt(block, ROOT / EXCERPT.fullmatch(block.first.strip()).group(1))


def bash_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang == "bash"][1:]  # the opening block: see above


@pytest.mark.parametrize("block", bash_blocks(), ids=lambda b: f"README.md:{b.line}")
def test_bash_blocks_run(block, example_dir, tmp_path):
    skip = SKIP.fullmatch(block.first.strip())
    if skip:
        pytest.skip(f"README.md:{block.line}: {skip.group(1)}")
    where = copy_of(example_dir, tmp_path)
    commands = []
    for line in block.code.splitlines():
        command = line.split("  #")[0].strip()
        if not command or command.startswith("#"):
            continue
        if SKIP.search(line):
            continue
        if BENCHMARK.search(command):  # the smoke size: even --quick takes minutes
            command = command.replace(" --quick", "") + " --smoke"
        commands.append(command)
    assert commands, f"README.md:{block.line}: no command"
    for command in commands:
        run_shell(command, where, f"README.md:{block.line}: {command}")


@pytest.mark.parametrize("line,command", inline_commands(), ids=[c for _, c in inline_commands()])
def test_inline_commands_run(line, command, tmp_path):
    output = run_shell(command, scratch(tmp_path / "checkout"), f"README.md:{line}: {command}")
    assert output.strip(), f"README.md:{line}: {command} printed nothing"
