"""logix against the other attribution tools on the digits task of attribution_quality.py.

    python benchmarks/compare_libraries.py            # 100 halves x 3 seeds, 3 runs per row (~2.5 min)
    python benchmarks/compare_libraries.py --quick    # 20 halves x 1 seed, 1 run per row (~1.5 min)
    python benchmarks/compare_libraries.py --smoke    # seconds: checks the benchmark works; its numbers mean nothing
    python benchmarks/compare_libraries.py --only logix trak     # some libraries only

One table: LDS, mislabel AUC (and the share of flipped labels in the top 10%), the wall time of
capture + statistics + scoring, and the peak memory, for every library that is installed; a
library that is not installed gets a row that says so, one that crashes a row that says why.

Same task for everyone (built by attribution_quality.py's own functions, nothing downloaded):
  data     scikit-learn digits, 1,000 train / 100 query examples (attribution_quality's split);
           the mislabel task flips 10% of the train labels (--flip-seed, as attribution_quality).
  models   the MLP 64 -> 32 -> ReLU -> 10 trained full batch from init seed 0 (attribution_quality's
           recipe), once on the clean labels (scored for LDS against the cached retraining on random
           halves) and once on the flipped labels (ranked by self-influence for the mislabel AUC).
           The trained weights go to every library through one .npz file; each library loads them
           into a fresh nn.Sequential of its own.
  queries  the 100 query examples' own cross-entropy (TRAK: its own margin output, see below).
  losses   per-example cross-entropy summed over the batch, batches of --batch (250) examples.
  damping  lambda = --damping-factor (0.1) x the mean eigenvalue of the curvature block that is
           inverted, wherever the library lets one say so (column "damping" says what each got);
           logix's default takes the block's trace over its unprojected dimension d_in d_out (the
           mean eigenvalue at rank full, smaller than the projected block's at lower rank).
  seeds    torch.manual_seed(0) in every worker; projections seeded with 0 where a library takes one.

Rows:
  logix       EK-FAC on LoGra-projected gradients at each --ranks (16 and full by default), through
              the public API: logix.init(statistics="ekfac") / watch / capture / finalize, then
              log.query + log.influence("ekfac") and log.self_influence("ekfac"); lambda per module.
              And the README's recipe for narrow rows at a rank-16 row's bytes: rank="auto" with PCA,
              statistics ekfac + row, a curvature pass of 16 labels drawn from the model per
              example, scored with nothing chosen (auto: row, its default damping).
  logix-ai    (LogIX 0.1.1, the earlier tool of the same name) from its own venv in a subprocess
              (its import name is also `logix`); EK-FAC in its two passes (covariances, then logged
              gradients + corrected eigenvalues), at rank 16 through its LoRA compression (add_lora,
              random init) and at rank full without it; its default damping, 0.1 x the mean
              eigenvalue -- of the first module, reused for every module (its code does that).
              Its per-example gradients leave out the biases (weights only).
  kronfluence EK-FAC on the exact (unprojected) gradients of all 2,410 parameters, empirical Fisher
              (use_empirical_fisher=True, as logix), damping_factor=None = 0.1 x the mean
              eigenvalue per module.
  TRAK        its CPU projector (BasicProjector, Gaussian "normal") on the full gradient, projected
              to the width of a logix rank-16 row (416), one checkpoint; its own model output (the
              correct-class margin) and out-to-loss weighting; float32 (use_half_precision=False);
              lambda_reg = 0.1 x the mean eigenvalue of Phi^T Phi (its default is 0). Self-influence
              is the diagonal of the train set scored against itself (TRAK has no self-score call).
  exact GGN   attribution_quality's dense reference (torch.func, all parameters, in this process;
              no time or memory shown): the LDS that dLDS is measured against.

Measurement: each library row runs in a fresh subprocess (one per row, so imports and caches of one
library never count against another). "time s" = wall time of capture + statistics + scoring of both
models (clean: capture, curvature, query scores; mislabeled: capture, curvature, self-influence),
from the first library call to the last score in memory; imports, data loading and model setup are
outside it; the fastest of --repeat runs (3; quick 1) is shown. "peak MiB" = the subprocess's peak
resident set during the measured section (VmHWM from /proc/self/status, reset through
/proc/self/clear_refs just before it; it counts torch's allocations, unlike tracemalloc; not
getrusage's ru_maxrss, which Linux carries over from the parent through fork + exec); "+MiB" = that
peak minus the resident set at the start of the section (what the library added on top of Python,
torch, its own import and the data).

--smoke runs every installed library on attribution_quality's smaller --smoke task (200 train / 20
query examples, hidden width 8, 50 training steps), 6 halves x 1 seed, 1 run per row, and neither
reads nor writes the retraining cache: a seconds-long run (plus each library's start-up) that checks
every row's path works and prints the table; its numbers mean nothing.

Installing the other libraries (none of this is in scripts/setup.sh; CI does not need it):
  kronfluence, TRAK:  .venv/bin/pip install -e ".[bench]" "torchvision==0.28.0"
      (kronfluence declares torchvision, which it does not import; without the pin pip takes the
      newest torchvision and with it a CUDA torch 2.14. Or: pip install --no-deps kronfluence traker
      einconv opt_einsum.)
  logix-ai:  python3 -m venv benchmarks/.venv-logixai
             benchmarks/.venv-logixai/bin/pip install torch==2.13.0 numpy einops pyyaml tqdm
             benchmarks/.venv-logixai/bin/pip install --no-deps --ignore-requires-python logix-ai
      (it declares Python < 3.11; --logixai-python points elsewhere.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_LOGIXAI_PYTHON = HERE / ".venv-logixai" / "bin" / "python"
RECIPE_DRAWS = 16  # labels drawn per example in the curvature pass of logix's narrow-row recipe
LOGIXAI_WORKER = HERE / "compare_logixai_worker.py"
sys.path.insert(0, str(HERE))
from worker_inputs import load_inputs, reset_peak, rss_mib  # noqa: E402

# -- worker side (a fresh process per row; only numpy, torch and the one library are imported) --------


def batches(x, y, size):
    return [(list(range(i, min(i + size, len(x)))), x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def work_logix(t, clean, noisy, args, tmp: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import torch
    import torch.nn.functional as F

    import logix

    recipe = args.rank == "recipe"  # the README's narrow-row recipe at a rank-16 row's bytes
    rank = args.rank if args.rank == "full" else None if recipe else int(args.rank)
    n = len(t["xtr"])

    def capture(run, model, y, generator=None):
        for ids, xb, yb in batches(t["xtr"], y, args.batch):
            with run.capture(ids, reduction="sum"):
                logits = model(xb)
                labels = yb if generator is None else logix.sampled_labels(logits, generator)
                F.cross_entropy(logits, labels, reduction="sum").backward()
            model.zero_grad()

    def log_pass(path, model, y):
        if not recipe:
            run = logix.init(path, rank=rank, seed=0, statistics="ekfac")
            run.watch(model)
            capture(run, model, y)
            run.finalize()
            return logix.open(path)
        row_bytes = 4 * sum(min(16, w.shape[1] + 1) * min(16, w.shape[0]) for w in linear_weights(model))
        run = logix.init(path, rank="auto", row_bytes=row_bytes, projection="pca", seed=0, statistics=["ekfac", "row"])
        run.watch(model)
        with run.fit_projections():
            capture(run, model, y)
        run.start_pass("train")
        capture(run, model, y)
        run.start_pass("train/curvature", curvature_for="train")
        generator = torch.Generator().manual_seed(1)
        for _ in range(RECIPE_DRAWS):
            capture(run, model, y, generator)
        run.finalize()
        return logix.open(path)

    start = time.perf_counter()
    log = log_pass(tmp / "clean", clean, t["ytr"])
    with log.query(clean) as q:
        with q.capture(list(range(len(t["xq"]))), reduction="sum"):
            F.cross_entropy(clean(t["xq"]), t["yq"], reduction="sum").backward()
        clean.zero_grad()
    pre, factor = ("auto", None) if recipe else ("ekfac", args.damping_factor)  # the recipe: its defaults
    s = log.influence(q, pre, damping_factor=factor, mode="dot", progress=False)
    scores = order(s.train_ids, s.values, n)
    log_n = log_pass(tmp / "noisy", noisy, t["noisy_y"])
    si = log_n.self_influence(pre, damping_factor=factor, progress=False)
    self_inf = order(si.ids, si.values, n)
    seconds = time.perf_counter() - start
    width = sum(m.k_in * m.k_out for m in log.modules.values())
    return scores, self_inf, {"seconds": seconds, "version": logix.__version__, "width": width}


def linear_weights(model) -> list:
    return [m.weight for m in model.modules() if m.__class__.__name__ == "Linear"]


def order(ids, values, n):
    values = values.double().numpy() if hasattr(values, "numpy") else np.asarray(values, dtype=np.float64)
    out = np.full(values.shape[:-1] + (n,), np.nan)
    out[..., np.asarray(ids, dtype=np.int64)] = values
    return out


def work_kronfluence(t, clean, noisy, args, tmp: Path):
    import kronfluence
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Digits(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # not used: use_empirical_fisher=True
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    import logging

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    task = Digits()
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    score_args = ScoreArguments(damping_factor=None)  # None: 0.1 x mean eigenvalue, per module
    train = torch.utils.data.TensorDataset(t["xtr"], t["ytr"])
    noisy_train = torch.utils.data.TensorDataset(t["xtr"], t["noisy_y"])
    query = torch.utils.data.TensorDataset(t["xq"], t["yq"])

    def analyzer(name, model):
        model = prepare_model(model.eval(), task)
        return Analyzer(name, model, task, cpu=True, disable_tqdm=True, disable_model_save=True, output_dir=str(tmp))

    width = sum(p.numel() for p in clean.parameters())
    start = time.perf_counter()
    a = analyzer("clean", clean)
    a.fit_all_factors("ekfac", dataset=train, per_device_batch_size=args.batch, factor_args=factor_args)
    a.compute_pairwise_scores(
        "scores",
        factors_name="ekfac",
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=len(query),
        per_device_train_batch_size=args.batch,
        score_args=score_args,
    )
    scores = a.load_pairwise_scores("scores")["all_modules"].double().numpy()
    b = analyzer("noisy", noisy)
    b.fit_all_factors("ekfac", dataset=noisy_train, per_device_batch_size=args.batch, factor_args=factor_args)
    b.compute_self_scores(
        "self",
        factors_name="ekfac",
        train_dataset=noisy_train,
        per_device_train_batch_size=args.batch,
        score_args=score_args,
    )
    self_inf = b.load_self_scores("self")["all_modules"].double().numpy()
    seconds = time.perf_counter() - start
    version = getattr(kronfluence, "__version__", None) or _dist_version("kronfluence")
    return scores, self_inf, {"seconds": seconds, "version": version, "width": width}


def work_trak(t, clean, noisy, args, tmp: Path):
    import logging

    import torch
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    n, nq = len(t["xtr"]), len(t["xq"])
    grad_dim = sum(p.numel() for p in clean.parameters())
    proj_dim = int(args.proj_dim)

    def featurized(name, model, y):
        projector = BasicProjector(
            grad_dim=grad_dim,
            proj_dim=proj_dim,
            seed=0,
            proj_type=ProjectionType.normal,
            device="cpu",
            dtype=torch.float32,
        )
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=n,
            save_dir=str(tmp / name),
            device="cpu",
            projector=projector,
            proj_dim=proj_dim,
            use_half_precision=False,
            logging_level=logging.ERROR,
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for _, xb, yb in batches(t["xtr"], y, args.batch):
            traker.featurize(batch=(xb, yb), num_samples=len(xb))
        # damping: 0.1 x the mean eigenvalue of Phi^T Phi (TRAK's own default is lambda_reg = 0)
        phi = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float64)
        lam = args.damping_factor * float((phi * phi).sum()) / phi.shape[1]
        traker.score_computer.lambda_reg = lam
        traker.finalize_features()
        return traker, lam

    start = time.perf_counter()
    traker, lam = featurized("clean", clean, t["ytr"])
    traker.start_scoring_checkpoint("queries", clean.state_dict(), model_id=0, num_targets=nq)
    traker.score(batch=(t["xq"], t["yq"]), num_samples=nq)
    scores = np.asarray(traker.finalize_scores("queries")).T.astype(np.float64)  # TRAK gives (train, targets)
    traker_n, lam_n = featurized("noisy", noisy, t["noisy_y"])
    traker_n.start_scoring_checkpoint("self", noisy.state_dict(), model_id=0, num_targets=n)
    for _, xb, yb in batches(t["xtr"], t["noisy_y"], args.batch):
        traker_n.score(batch=(xb, yb), num_samples=len(xb))
    self_inf = np.diag(np.asarray(traker_n.finalize_scores("self"))).astype(np.float64)
    seconds = time.perf_counter() - start
    return (
        scores,
        self_inf,
        {"seconds": seconds, "version": _dist_version("traker"), "width": proj_dim, "lambda": [lam, lam_n]},
    )


def _dist_version(name: str):
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return None


WORKERS = {"logix": work_logix, "kronfluence": work_kronfluence, "trak": work_trak}
WORKER_MODULES = {"logix": "logix", "kronfluence": "kronfluence.analyzer", "trak": "trak"}


def worker_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    t, clean, noisy = load_inputs(Path(args.inputs))
    importlib.import_module(WORKER_MODULES[args.worker])  # imports stay outside the measured section
    peak_reset = reset_peak()
    before = rss_mib()
    with tempfile.TemporaryDirectory(prefix=f"compare-{args.worker}-") as tmp:
        scores, self_inf, info = WORKERS[args.worker](t, clean, noisy, args, Path(tmp))
    info.update(
        {
            "rss_before_mib": before,
            "peak_rss_mib": rss_mib("VmHWM"),
            "peak_reset": peak_reset,
            "torch": torch.__version__,
        }
    )
    np.save(out / "scores.npy", np.asarray(scores, dtype=np.float64))
    np.save(out / "self_influence.npy", np.asarray(self_inf, dtype=np.float64))
    (out / "result.json").write_text(json.dumps(info))


# -- main side ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 halves x 1 seed (same rows)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run that checks the benchmark works; its numbers mean nothing: the same rows on "
        "attribution_quality's --smoke task (200 train / 20 query examples, hidden 8, 50 steps), 6 halves x "
        "1 seed, 1 run per row; the retraining cache is neither read nor written (--cache is ignored); options "
        "given explicitly still apply; wins over --quick",
    )
    p.add_argument("--halves", type=int, help="random halves for LDS (default 100, quick 20)")
    p.add_argument("--seeds", type=int, help="retraining seeds per half (default 3, quick 1)")
    p.add_argument("--ranks", nargs="+", default=["16", "full"], help="logix and logix-ai ranks (default 16 full)")
    p.add_argument("--proj-dim", type=int, help="TRAK projection dimension (default: the width of a logix rank-16 row)")
    p.add_argument(
        "--only", nargs="+", choices=("logix", "logix-ai", "kronfluence", "trak", "exact"), help="rows to run"
    )
    p.add_argument(
        "--damping-factor", type=float, default=0.1, help="lambda = f x mean eigenvalue where settable (0.1)"
    )
    p.add_argument("--batch", type=int, default=250, help="batch size for capture / featurize (250)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process (default 1)")
    p.add_argument("--repeat", type=int, help="subprocess runs per row; time = the fastest (default 3, quick 1)")
    p.add_argument("--timeout", type=int, default=600, help="seconds before a library's subprocess is stopped")
    p.add_argument(
        "--cache", default=str(HERE / ".cache"), help="retraining cache (attribution_quality's; not with --smoke)"
    )
    p.add_argument("--logixai-python", default=str(DEFAULT_LOGIXAI_PYTHON), help="python of the logix-ai venv")
    p.add_argument("--flip-seed", type=int, default=7)
    p.add_argument("--half-seed", type=int, default=12345)
    p.add_argument("--split-seed", type=int, default=0)
    # worker mode (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rank", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.quick = False  # --smoke wins over --quick
        args.cache = None  # a smoke run's outcomes are never cached
    args.halves = args.halves or (6 if args.smoke else 20 if args.quick else 100)
    args.seeds = args.seeds or (1 if args.quick or args.smoke else 3)
    args.repeat = args.repeat or (1 if args.quick or args.smoke else 3)
    return args


def logix_row_width(rank, dims) -> int:
    """Width of a logix row at `rank` for Linear layers with (d_in + 1 for the bias, d_out) in dims."""
    if rank == "full":
        return sum(a * b for a, b in dims)
    return sum(min(int(rank), a) * min(int(rank), b) for a, b in dims)


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_worker(cmd, out: Path, timeout: int, cwd=None):
    """(scores, self-influence, info) or (None, None, {"error": ...})."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        return None, None, {"error": f"failed: timed out after {timeout} s"}
    total = time.perf_counter() - start
    (out / "stderr.txt").write_text(proc.stderr)
    (out / "stdout.txt").write_text(proc.stdout)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        return None, None, {"error": f"failed: {why[:200]}", "log": str(out / "stderr.txt")}
    info = json.loads((out / "result.json").read_text())
    info["process_s"] = total
    return np.load(out / "scores.npy"), np.load(out / "self_influence.npy"), info


def check_logixai(python: str) -> str | None:
    """None when the logix-ai venv imports logix-ai, else why not."""
    if not Path(python).exists():
        return f"not installed (no {python}; see the docstring to make it)"
    probe = "import logix, torch; print(logix.__version__, torch.__version__, hasattr(logix, 'LogIX'))"
    try:
        r = subprocess.run(
            [python, "-I", "-c", probe], capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir()
        )
    except subprocess.TimeoutExpired:
        return "failed: importing logix-ai timed out"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"not installed ({last[:120]})" if "ModuleNotFoundError" in last else f"failed: import: {last[:150]}"
    if not r.stdout.split()[-1] == "True":
        return f"not installed (that venv's `logix` is not logix-ai: {r.stdout.strip()})"
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)

    sys.path.insert(0, str(HERE))
    import attribution_quality as aq
    import torch
    import torch.nn.functional as F

    wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    want = set(args.only or ("logix", "logix-ai", "kronfluence", "trak", "exact"))
    setup = aq.make_setup(args)  # attribution_quality's task (its smaller one with --smoke)
    factor = args.damping_factor
    print("command:", shlex.join(["python"] + sys.argv))
    if args.smoke:
        print("--smoke: a check that the benchmark runs end to end on a smaller task; its numbers mean nothing")
    print(f"torch {torch.__version__}, threads {args.threads} per process, load average {aq.load()}")
    print(f"logix from {provenance()}")
    print(f"LDS: {args.halves} halves x {args.seeds} seeds, outcome = minus query cross-entropy (attribution_quality)")

    data = aq.load_data(setup)
    xtr, ytr, xq, yq = data
    n = len(xtr)
    rng = np.random.default_rng(args.flip_seed)  # the same flips as attribution_quality
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, n // 10, replace=False)] = True
    noisy_y = ytr.clone()
    noisy_y[flipped] = (ytr[flipped] + torch.from_numpy(rng.integers(1, 10, flipped.sum()))) % 10
    every = torch.arange(n)[None]
    model = aq.to_module(aq.train_batched(xtr, ytr, every, [0], setup))
    noisy_model = aq.to_module(aq.train_batched(xtr, noisy_y, every, [0], setup))
    with torch.no_grad():
        noisy_losses = F.cross_entropy(noisy_model(xtr), noisy_y, reduction="none").numpy()

    masks = aq.make_halves(setup, args.halves)
    cache = None if args.cache is None else Path(args.cache)
    outcomes, retrain_s, trained = aq.retrain_outcomes(setup, data, masks, args.seeds, cache, 50)
    outcome = -outcomes["loss"].mean(axis=1)  # (H, Q), higher is better
    cached = f"{args.halves * args.seeds - trained} from cache" if cache else "not cached (--smoke)"
    print(f"retraining: {trained} models trained in {retrain_s:.1f} s, {cached}")

    dims = [(m.in_features + 1, m.out_features) for m in model if isinstance(m, torch.nn.Linear)]
    proj_dim = args.proj_dim or logix_row_width(16, dims)
    threads = ["--threads", str(args.threads), "--batch", str(args.batch), "--damping-factor", str(factor)]

    rows = []  # dicts: name, config, damping, lds, se, auc, top, seconds, peak, added, note

    def add(name, config, damping, scores=None, self_inf=None, info=None):
        row = {
            "name": name,
            "config": config,
            "damping": damping,
            "info": info or {},
            "scores": scores,
            "self": self_inf,
        }
        if scores is not None:
            row["lds"], row["se"] = aq.lds(scores, masks, outcome)
            row["auc"], row["top"] = aq.mislabel(self_inf, flipped)
        rows.append(row)
        return row

    add("train loss", "-", "-", None, None)
    rows[-1]["auc"], rows[-1]["top"] = aq.mislabel(noisy_losses, flipped)

    reference = None
    if "exact" in want:
        curv, grads, _ = aq.exact_rows(model, noisy_model, data, noisy_y)
        scores, self_inf = aq.exact_scores(curv["GGN"], grads, factor)
        row = add("exact GGN", "dense, all params", f"{factor} x mean eig (whole matrix)", scores, self_inf)
        row["info"]["width"] = int(grads[0].shape[1])
        reference = row["lds"]

    versions = {}
    with tempfile.TemporaryDirectory(prefix="compare-libraries-") as tmp:
        tmp = Path(tmp)
        inputs = tmp / "inputs.npz"
        arrays = {
            "xtr": xtr.numpy(),
            "ytr": ytr.numpy(),
            "noisy_y": noisy_y.numpy(),
            "xq": xq.numpy(),
            "yq": yq.numpy(),
        }
        for prefix, m in (("clean", model), ("noisy", noisy_model)):
            for i in (0, 2):
                arrays[f"{prefix}_{i}_weight"] = m[i].weight.detach().numpy()
                arrays[f"{prefix}_{i}_bias"] = m[i].bias.detach().numpy()
        np.savez(inputs, **arrays)
        me = [sys.executable, str(Path(__file__).resolve()), "--inputs", str(inputs)] + threads

        def job(name, config, damping, cmd, tag, cwd=None):
            runs = []
            for rep in range(args.repeat):
                print(f"  running {name} {config} ({rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                scores, self_inf, info = run_worker(cmd, tmp / tag, args.timeout, cwd=cwd)
                if scores is None:
                    return add(name, config, damping, info=info)
                runs.append((scores, self_inf, info))
            scores, self_inf, info = runs[0]  # every run gives the same scores; time and memory: best / worst
            info["seconds_all"] = [r[2]["seconds"] for r in runs]
            info["seconds"] = min(info["seconds_all"])
            info["peak_rss_mib"] = max(r[2]["peak_rss_mib"] for r in runs)
            info["rss_before_mib"] = min(r[2]["rss_before_mib"] for r in runs)
            if info.get("version"):
                versions[name] = info["version"]
            if not (np.isfinite(scores).all() and np.isfinite(self_inf).all()):
                info["note"] = "non-finite scores"
            return add(name, config, damping, scores, self_inf, info)

        if "logix" in want:
            for rank in args.ranks:
                job(
                    "logix",
                    f"ekfac rank {rank}",
                    f"{factor} x trace / (d_in d_out) / module",
                    me + ["--worker", "logix", "--rank", rank, "--out", str(tmp / f"logix-{rank}")],
                    f"logix-{rank}",
                )
            job(
                "logix",
                f"recipe: row K={RECIPE_DRAWS}",
                '0.3 x trace / D; rank="auto" at rank 16\'s bytes',
                me + ["--worker", "logix", "--rank", "recipe", "--out", str(tmp / "logix-recipe")],
                "logix-recipe",
            )
        if "logix-ai" in want:
            why = check_logixai(args.logixai_python)
            for rank in args.ranks:
                config = f"ekfac rank {rank}" + (" (LoRA)" if rank != "full" else "")
                damping = "default: 0.1 x mean eig of 1st module"
                if why:
                    add("logix-ai", config, damping, info={"error": why})
                    continue
                out = tmp / f"logixai-{rank}"
                cmd = [
                    args.logixai_python,
                    "-I",
                    str(LOGIXAI_WORKER),
                    "--inputs",
                    str(inputs),
                    "--out",
                    str(out),
                    "--rank",
                    rank,
                ] + threads
                job("logix-ai", config, damping, cmd, f"logixai-{rank}", cwd=out)
        if "kronfluence" in want:
            if not installed("kronfluence"):
                add(
                    "kronfluence",
                    "ekfac, no projection",
                    "-",
                    info={"error": "not installed (pip install -e '.[bench]')"},
                )
            else:
                job(
                    "kronfluence",
                    "ekfac, no projection",
                    f"{factor} x mean eig / module",
                    me + ["--worker", "kronfluence", "--out", str(tmp / "kronfluence")],
                    "kronfluence",
                )
        if "trak" in want:
            if not installed("trak"):
                add("TRAK", f"proj {proj_dim}, CPU", "-", info={"error": "not installed (pip install -e '.[bench]')"})
            else:
                job(
                    "TRAK",
                    f"proj {proj_dim}, CPU",
                    f"{factor} x mean eig of XtX",
                    me + ["--worker", "trak", "--proj-dim", str(proj_dim), "--out", str(tmp / "trak")],
                    "trak",
                )

    print()
    head = f"{'library':<12}{'config':<25}{'dim':>6}{'LDS':>7}{'se':>7}{'dLDS':>8}{'AUC':>7}{'top10%':>8}"
    head += f"{'time s':>8}{'peak MiB':>10}{'+MiB':>7}  damping / note"
    print(head)
    print("-" * len(head))
    for r in rows:
        info = r["info"]
        lds, auc = r.get("lds"), r.get("auc")
        delta = None if lds is None or reference is None else lds - reference
        line = f"{r['name']:<12}{r['config']:<25}{fmt(info.get('width'), 'd'):>6}"
        line += f"{fmt(lds):>7}{fmt(r.get('se')):>7}{fmt(delta, '+.3f'):>8}"
        line += f"{fmt(auc):>7}{fmt(r.get('top'), '.2f'):>8}{fmt(info.get('seconds'), '.2f'):>8}"
        peak, before = info.get("peak_rss_mib"), info.get("rss_before_mib")
        line += f"{fmt(peak, '.0f'):>10}{fmt(None if peak is None else peak - before, '.0f'):>7}  "
        line += info.get("error") or "; ".join(x for x in (r["damping"], info.get("note")) if x and x != "-")
        print(line)
    print()
    print(
        f"LDS: mean Spearman over the {len(xq)} queries (se across queries); dLDS = LDS - exact GGN; AUC / top10%: "
        "self-influence on the model trained with 10% flipped labels."
    )
    print(
        "time s: capture + statistics + scoring, both models, in that library's own subprocess, "
        f"fastest of {args.repeat}; peak MiB: that process's peak RSS during it (VmHWM); "
        "+MiB: peak minus RSS at its start."
    )
    by = {(r["name"], r["config"]): r for r in rows if r.get("scores") is not None}
    a, b = by.get(("logix", "ekfac rank full")), by.get(("kronfluence", "ekfac, no projection"))
    if a and b:  # the same EK-FAC of the same exact gradients (empirical Fisher, lambda per module): should agree
        err = np.abs(a["scores"] - b["scores"]).max() / np.abs(b["scores"]).max()
        err_self = np.abs(a["self"] - b["self"]).max() / np.abs(b["self"]).max()
        print(
            "check: logix ekfac rank full vs kronfluence ekfac (same EK-FAC of the same gradients): "
            f"max relative difference {err:.1e} (scores), {err_self:.1e} (self-influence)"
        )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"total {time.perf_counter() - wall:.1f} s; load average {aq.load()}")


def provenance() -> str:
    """The commit the measured logix comes from, and whether its sources differ from it."""
    root = HERE.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "logix", "integrations"], cwd=root, capture_output=True, text=True
        ).stdout.split("\n")
    except OSError:
        return "(no git)"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {sha.strip() or '?'}" + (f", with uncommitted changes to {', '.join(changed)}" if changed else "")


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    main()
