"""Time-to-accuracy: does ALaST reach full fine-tuning's accuracy, and what does it cost in training seconds and FLOPs?

The protocol (issue 21), in order:

1. ``full`` runs first, every seed, until its validation curve plateaus (or ``--max-steps``).
2. Every other method runs until it plateaus or has spent a budget of training FLOPs, ``--budget-factor`` (1.5) x
   the FLOPs full needed to plateau on the same data set and seed, or ``--max-steps``: a method with cheaper steps
   gets more of them. The budget is per seed, so a seed's runs keep their cache key whichever other seeds an
   invocation names. Each run ends as ``plateau``, ``budget`` or ``max`` (the ``ended`` column); a run of a
   given length (the remedy) that took all its steps shows ``fixed``.
3. Plateau (train applies it: ``--stop-at-plateau``, ``edge_alast.training.stopping``): the moving average of the
   last ``--window`` evaluations has not gained ``--min-gain`` over ``--patience`` evaluations. Evaluations use
   ``--eval-images`` (1000) validation images, or the whole validation set when it is smaller (digits: 400).
4. Final accuracy: the run's plateau value, the mean of its last ``--window`` evaluations (not the best single
   evaluation).
5. Accuracy at equal training time and at equal FLOPs, at 25/50/100 % of full's mean time (and FLOPs) to plateau:
   the smoothed curve (centred moving average over ``--window`` evaluations), interpolated linearly; a run that
   stopped at its plateau (or a ``fixed`` run that finished) before that point counts with its plateau value, one
   that ended otherwise shows ``-``.

Each run is its own ``edge-alast train`` process with ``--eval-every``, ``--stop-at-plateau`` (the rule above) and
``--max-tflops`` (the budget): train applies both at the step they refer to (the plateau at an evaluation, the
budget after the step that spends it, evaluated there) and ends there as a finished run (evaluated on the whole
validation set, model saved), so a rerun ends at the same step (the figures up to code 57932ad were stopped from
outside with SIGUSR1, which ended a run one step late when the signal arrived during the next step). Every ALaST
run's final model is then evaluated again with its training-time token view (``edge-alast eval --train-view``): the
third table sets it against the all-token accuracy. A run is cached in ``OUT/DATASET/NAME-sSEED.json`` under a key
of its config (paths under OUT relative to it, the weights by their sha256), the protocol settings that stop it
(budget included) and the code version (the last git commit
touching ``edge_alast/``, whether that folder differs from it, and a hash of the difference): a rerun skips only
runs of the same settings on the same code, and a run it started and lost (the benchmark stopped, the machine went
down) continues from its last checkpoint, which ends it where it would have ended (resume is exact).
Each run also records how many of its training seconds its threads waited for a CPU that another process held
(train's per-step ``time/wait_seconds``); a run that waited more than 5 % is named as contended under the tables.
``results.json`` holds every run; ``--markdown FILE`` prints the tables from it, running nothing; ``--collect``
writes it from the runs finished so far (a benchmark that spans days), a method on fewer seeds than full named with
its seeds; ``--restore FILE`` writes a committed results file's runs back into OUT's cache, so a benchmark that
spans machines goes on from them (an ALaST record keeps its run's schedule, which ``--restore`` writes back as the
run folder's ``summary.json``, so ``static``/``random`` can be built from a restored ``relative`` record; the older
records, such as those of the 224 px table at code 7e2d446, have none, and such a ``relative`` run must run again).
``--jobs N`` runs N seeds at once, each seed's chain of runs pinned to its share of the CPU cores (the
figures in docs/benchmarks.md: ``--jobs 2`` with ``OMP_NUM_THREADS=1`` on 2 cores).
SIGTERM, SIGHUP or Ctrl-C to the tool stops the runs under way after their current step with a checkpoint (the
tool waits for them, caches nothing unfinished and starts no further run); running it again resumes them.

Methods: ``full``, ``head``, ALaST with each update (``alast-reference``, the paper's, not annealed;
``alast-coauthors``, the co-authors' code; ``alast-relative``), the ``static`` and ``random`` baselines built from
each seed's relative run at its FLOPs per step, the ablations ``alast-freeze-only`` (every token, K blocks:
b_init = b_min = 1) and ``alast-tokens-only`` (every block trains, tokens dropped), the remedy ``alast-anneal``
(reference with keep ratios annealed to 1 over the last 20 % of the steps its seed's reference run took; it runs
exactly that many steps; the stated rule chose it, so annealing is ``--method alast``'s default since), and the
adapter methods; ``NAME@lrVALUE`` is NAME at another learning rate, for the sweep (e.g.
``full@lr1e-4,alast-reference@lr1e-4``: same budget, from full at its own rate). Learning rates: each method's
default (``--lr`` sets one for all).
Embeddings are frozen for every method (``full`` included) except ``alast-coauthors``, which reproduces the
co-authors' set-up (embeddings trained, Adam without weight decay). Data sets: Fashion-MNIST
(``apt-get install dataset-fashion-mnist``) and scikit-learn's ``load_digits``, written as ImageFolders.

    OMP_NUM_THREADS=1 python tools/bench_tta.py --weights \\
        ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors --img-size 112 --seeds 0,1,2 \\
        --datasets fmnist,digits --jobs 2 --out runs/tta
    python tools/bench_tta.py --markdown runs/tta/results.json   # the tables again, from the results file
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from edge_alast.alast.baselines import SCHEDULE  # noqa: E402
from edge_alast.atomic import atomic_write_json, sha256_file  # noqa: E402
from edge_alast.config import LightPeftConfig  # noqa: E402
from edge_alast.device import host  # noqa: E402
from edge_alast.errors import EXIT_INTERRUPTED  # noqa: E402
from edge_alast.methods import METHODS as METHOD_SPECS  # noqa: E402
from edge_alast.runfolder import METRICS_FILE, SUMMARY_FILE, read_metrics  # noqa: E402
from edge_alast.training.stopping import curve_start  # noqa: E402

# name -> run-file settings on top of the common ones. "{run:NAME}" is the same seed's run folder of method NAME,
# "{steps:NAME}" the steps that run took to its last evaluation; such a method runs after NAME.
METHODS = {
    "full": {"method": "full", "train_embeddings": False},
    "head": {"method": "head"},
    # anneal_last 0: the paper's update as it was before the rule made annealing alast's default
    "alast-reference": {"method": "alast", "alast": {"update": "reference", "anneal_last": 0.0}},
    "alast-coauthors": {"method": "alast", "alast": {"update": "coauthors"}},
    "alast-relative": {"method": "alast", "alast": {"update": "relative"}},
    "static": {"method": "alast", "alast": {"update": "static", "from_run": "{run:alast-relative}"}},
    "random": {"method": "alast", "alast": {"update": "random", "from_run": "{run:alast-relative}"}},
    "alast-freeze-only": {"method": "alast", "alast": {"b_init": 1.0, "b_min": 1.0, "anneal_last": 0.0}},
    "alast-tokens-only": {"method": "alast", "alast": {"freeze": False, "anneal_last": 0.0}},
    "alast-anneal": {"method": "alast", "alast": {"update": "reference", "anneal_last": 0.2},
                     "steps": "{steps:alast-reference}"},
    "lora": {"method": "lora"},
    "alast-lora": {"method": "alast-lora", "alast": {"update": "relative"}},
    "light-peft": {"method": "light-peft", "light_peft": {"estimation_steps": 40}},
    "light-peft+alast": {"method": "light-peft+alast", "light_peft": {"estimation_steps": 40},
                         "alast": {"update": "relative"}},
}
DEFAULT_METHODS = ("full", "head", "alast-reference", "alast-coauthors", "alast-relative", "static", "random",
                   "alast-freeze-only", "alast-tokens-only", "alast-anneal")
# The methods the stated rule chooses the default from (issue 21, set before the runs): ALaST's updates and the remedy.
# Not the ablations (they locate a gap), nor random (a control), nor the learning-rate variants (they set the rate).
DEFAULT_CANDIDATES = ("alast-reference", "alast-coauthors", "alast-relative", "static", "alast-anneal")
DEFAULT_AT = 0.5  # the rule's budget: a share of full's time to plateau
LR_SUFFIX = "@lr"  # "NAME@lrVALUE": method NAME at learning rate VALUE (the learning-rate sweep), e.g. full@lr1e-4
FRACTIONS = (0.25, 0.5, 1.0)  # of full's time / FLOPs to plateau
ENDINGS = ("plateau", "budget", "fixed", "max")
# A run whose threads waited for a CPU held by another process for more than this share of its training seconds is
# named as contended under its data set's first table (uncontended runs on this 2-core machine wait 1-2 %).
CONTENDED = 0.05


# -------------------------------------------------------------------------------------------- the protocol (pure)
def smooth_centred(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (truncated at both ends): no lag on a rising curve, for
    reading the curve at a given time or FLOP count."""
    half = window // 2
    return [float(np.mean(values[max(0, i - half):i + window - half])) for i in range(len(values))]


def plateau_value(accuracies: Sequence[float], window: int) -> float | None:
    """The run's final accuracy: the mean of its last ``window`` evaluations."""
    return float(np.mean(accuracies[-window:])) if accuracies else None


def budget_flops(full_runs: Sequence[dict], factor: float) -> float | None:
    """The FLOP budget: ``factor`` x the mean over ``full_runs`` (main passes one seed's run) of the training FLOPs
    full had spent at the evaluation where it plateaued (its last evaluation where it never did)."""
    spent = [point_of_plateau(r)["flops_total"] for r in full_runs if r["evals"]]
    return factor * statistics.mean(spent) if spent else None


def point_of_plateau(result: dict) -> dict:
    """The evaluation at which a run stopped (its plateau, budget or last evaluation)."""
    return result["evals"][result.get("stop_index", len(result["evals"]) - 1)]


def value_at(evals: Sequence[dict], x: float, key: str, window: int, ended: str) -> float | None:
    """The smoothed accuracy at ``x`` (``key``: ``elapsed_seconds`` or ``flops_total``), interpolated linearly
    between evaluations. Before the first evaluation: None. After the last: the plateau value if the run stopped at
    its plateau (it would stay there) or was a run of a given length that finished (``fixed``: its model is done),
    else None (it was cut off, it may have gone on rising)."""
    if not evals:
        return None
    xs = [float(e[key]) for e in evals]
    ys = smooth_centred([e["val_accuracy"] for e in evals], window)
    if x < xs[0]:
        return None
    if x > xs[-1]:
        return plateau_value([e["val_accuracy"] for e in evals], window) if ended in ("plateau", "fixed") else None
    return float(np.interp(x, xs, ys))


def ended_as(stopped_by: str | None) -> str:
    """How a run ended: ``plateau`` or ``budget`` (stopped by this tool), else ``max`` (it ran all its steps)."""
    return stopped_by if stopped_by in ("plateau", "budget") else "max"


def ending(result: dict) -> str:
    """How a stored run ended, for the tables: ``fixed`` where a run of a given length (the remedy: no plateau or
    budget stop) took all its steps, as it was meant to; else its ``ended``."""
    if result["ended"] == "max" and not result.get("key", {}).get("protocol", {}).get("stop_at_plateau", True):
        return "fixed"
    return result["ended"]


def code_version(root: Path = REPO) -> dict:
    """The version of ``edge_alast/`` the runs use: the last commit touching it, whether the folder differs from
    that commit, and a hash of the difference (so two different uncommitted states never share cached runs).
    Without git: a hash of every file in the folder."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("log", "-1", "--format=%H", "--", "edge_alast").strip()
        status = git("status", "--porcelain", "--untracked-files=all", "--", "edge_alast")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": True, "tree_sha256": _tree_hash(root / "edge_alast")}
    version = {"commit": commit or None, "dirty": bool(status.strip())}
    if version["dirty"]:
        digest = hashlib.sha256(git("diff", "HEAD", "--", "edge_alast").encode())
        for line in sorted(status.splitlines()):
            if line.startswith("??"):
                path = root / line[3:].strip()
                digest.update(line.encode() + (path.read_bytes() if path.is_file() else b""))
        version["diff_sha256"] = digest.hexdigest()
    return version


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def run_dir(out: Path, dataset: str, name: str, seed: int) -> Path:
    """A run's folder: ``OUT/DATASET/NAME-sSEED``; its record and run file lie beside it (:func:`beside`)."""
    return out / dataset / f"{name}-s{seed}"


def beside(folder: Path, suffix: str) -> Path:
    """``folder``'s record (``.json``) or run file (``.yaml``): the suffix appended, since ``with_suffix`` would cut a
    learning rate's decimals (``full@lr0.001-s0`` -> ``full@lr0.json``, one file for every seed)."""
    return folder.parent / (folder.name + suffix)


def cache_key(config: dict, protocol: dict, code: dict, out_root: Path | None = None) -> dict:
    """What a cached run must match to be reused: its run config, the protocol settings that stop it, the code. The
    config as :func:`portable` writes it, so that a key holds no path of the machine that made it."""
    return {"config": portable(config, out_root), "protocol": protocol, "code": code}


def portable(config: dict, out_root: Path | None) -> dict:
    """A run config as its cache key holds it: a path under the benchmark's OUT (``out_root``: data, a run another
    reads) written as ``OUT/...``, and the weights file as its name and sha256. So a results file restored under
    another ``--out``, on another machine, or with the weights moved, matches its runs again, while other weights
    at the same path do not (a key once held both paths as given)."""
    root = str(Path(out_root).resolve()) + os.sep if out_root is not None else None

    def under_out(value):
        if isinstance(value, dict):
            return {k: under_out(v) for k, v in value.items()}
        if root and isinstance(value, str) and value.startswith(root):
            return "OUT/" + value[len(root):]
        return value

    key = under_out(config)
    weights = config.get("weights")
    if weights and Path(weights).is_file():
        stat = Path(weights).stat()
        key["weights"] = {"name": Path(weights).name, "sha256": _sha256(str(Path(weights).resolve()), stat.st_size,
                                                                         stat.st_mtime_ns)}
    return key


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, read once per (path, size, modification time) in this process."""
    return sha256_file(path)


def cached(path: Path, key: dict) -> dict | None:
    """The run stored at ``path`` if it was made under ``key``, else None."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("key") == key else None


# -------------------------------------------------------------------------------------------- data
def write_digits(root: Path, val: int = 400, seed: int = 0) -> Path:
    """scikit-learn's 8x8 digits (1797 real scans) as PNG ImageFolders (train / val); scikit-learn is needed only
    to write them."""
    if (root / "val").exists():
        return root
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    for rank, i in enumerate(order):
        split = "val" if rank < val else "train"
        folder = root / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        img = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img, mode="L").save(folder / f"{i}.png")
    return root


def write_fmnist(root: Path, train: int, val: int) -> Path:
    if not (root / "val").exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_fashion_mnist.py"), str(root), "--train",
                        str(train), "--val", str(val)], check=True)
    return root


# -------------------------------------------------------------------------------------------- running
def counted(evals: list[dict], config: dict) -> list[dict]:
    """The evaluations of the model the run delivers: those train's plateau rule reads (for Light-PEFT, only those
    after its pruning: :func:`edge_alast.training.stopping.curve_start`)."""
    estimation = (config.get("light_peft") or {}).get("estimation_steps", LightPeftConfig().estimation_steps)
    start = curve_start(config["method"], int(estimation))
    return [e for e in evals if e["step"] > start]


def core_shares(jobs: int) -> list[set[int] | None]:
    """The CPU cores each of ``jobs`` concurrent chains is pinned to (the usable cores dealt out in turn), or one
    ``None`` (not pinned) for a single job or where the platform cannot pin."""
    if jobs == 1 or not hasattr(os, "sched_getaffinity"):
        return [None] * jobs
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < jobs:
        raise SystemExit(f"--jobs {jobs}: only {len(usable)} usable CPU cores")
    return [set(usable[k::jobs]) for k in range(jobs)]


def _pinned(cores: set[int] | None):
    """A ``preexec_fn`` that pins the child to ``cores`` (None: no pinning)."""
    return None if cores is None else (lambda: os.sched_setaffinity(0, cores))


class Children:
    """The train processes running now. SIGTERM, SIGHUP or SIGINT to this tool (:meth:`forward_signals`) is passed
    on to them as SIGTERM: each stops after its current step with a checkpoint and exits 75, while the tool keeps
    reading their output, then stops with nothing cached and starts no further run. Were the tool to exit at once,
    a child writing to its pipe would lose its reader (train then stops at a checkpoint too, but a run killed with
    the tool would not)."""

    def __init__(self):
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, args: list[str], **popen) -> subprocess.Popen:
        if self.stopping:
            raise SystemExit("stopped by a signal before every run had started (running again goes on from here)")
        proc = subprocess.Popen(args, **popen)
        self.running.add(proc)
        if self.stopping:  # the signal came while it started
            proc.send_signal(signal.SIGTERM)
        return proc

    def done(self, proc: subprocess.Popen) -> None:
        self.running.discard(proc)

    def stop(self, signum, frame) -> None:
        if not self.stopping:
            print(f"bench_tta: signal {signum}: the runs under way stop after their current step with a checkpoint; "
                  "running the benchmark again resumes them", file=sys.stderr)
        self.stopping = True
        for proc in list(self.running):
            proc.send_signal(signal.SIGTERM)

    def forward_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self.stop)


CHILDREN = Children()


def run(config: dict, out: Path, protocol: dict, code: dict, cores: set[int] | None = None) -> dict:
    """Train until plateau, budget or ``config["steps"]``; the run's eval curve, how it ended and its peak (cached
    in ``OUT.json`` under :func:`cache_key`)."""
    done = beside(out, ".json")
    key = cache_key(config, protocol, code, out.parent.parent)  # out: OUT/DATASET/NAME-sSEED
    hit = cached(done, key)
    if hit is not None:
        return hit
    out.parent.mkdir(parents=True, exist_ok=True)
    path = beside(out, ".yaml")
    # A run this tool started and lost (the benchmark stopped, the machine went down) continues from its last
    # checkpoint when that was written under the same key: resume is exact, so it stops where it would have.
    started = out / "bench_key.json"
    resume = None if started.is_file() and json.loads(started.read_text()) == key else False  # None: train resumes
    if resume is False:                                                # a checkpoint of its settings if there is one
        out.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps(key))
    path.write_text(yaml.safe_dump({**config, "out": str(out), "resume": resume}))
    proc = CHILDREN.start([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(path), "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          preexec_fn=_pinned(cores))
    evals, stopped_by = [], None
    try:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "start" and event.get("resumed_from_step"):  # the curve up to the checkpoint
                evals = [e for e in read_metrics(out / METRICS_FILE)
                         if e.get("event") == "eval" and "step" in e and e["step"] <= event["resumed_from_step"]]
            elif event.get("event") == "eval" and "step" in event:  # (the final evaluation has no step)
                evals.append(event)
            elif event.get("event") == "finish":  # train's stop rules ended it at the evaluation they read
                stopped_by = event.get("reason")
        exit_code = proc.wait()
    finally:
        CHILDREN.done(proc)
    if exit_code == EXIT_INTERRUPTED:  # stopped from outside (SIGTERM, SIGHUP): unfinished, so nothing is cached
        raise SystemExit(f"{out.name} was interrupted (exit {exit_code}) before it finished: nothing cached; its "
                         "checkpoint is kept, and running the benchmark again resumes it")
    if exit_code != 0:
        raise SystemExit(f"{out.name} failed ({exit_code}):\n{proc.stderr.read()[-3000:]}")
    steps = [r for r in read_metrics(out / METRICS_FILE) if r.get("event") == "step"]
    curve = counted(evals, config)
    summary = json.loads((out / SUMMARY_FILE).read_text()) if (out / SUMMARY_FILE).exists() else {}
    result = {"key": key, "config": config, "evals": curve, "all_evals": len(evals), "ended": ended_as(stopped_by),
              "stop_index": len(curve) - 1, "steps": len(steps),
              "peak_rss_bytes": max((r["mem/peak_rss_bytes"] for r in steps), default=None),
              "flops_per_step": sum(r["flops/step"] for r in steps) / max(1, len(steps)),
              **cpu_wait(steps),
              "final_val_accuracy": summary.get("val_accuracy"),  # the final model, every token, whole val set
              # what static/random read from an ALaST run's folder, kept so that --restore can write it back
              SCHEDULE: summary.get(SCHEDULE), "train_flops_per_step": summary.get("train_flops_per_step"),
              "train_view": train_view(out, config, cores) if summary and METHOD_SPECS[config["method"]].alast
              else None,
              "torch_threads": os.environ.get("OMP_NUM_THREADS"), "machine": machine(cores)}
    done.write_text(json.dumps(result, indent=1))
    return result


def cpu_wait(steps: list[dict]) -> dict:
    """A run's training seconds and how many of them its threads waited for a CPU another process held (each step's
    ``time/wait_seconds``); ``wait_seconds`` None when a step has no reading (code before it, or no schedstat)."""
    waits = [r.get("time/wait_seconds") for r in steps]
    return {"step_seconds": sum(r["time/step_seconds"] for r in steps),
            "wait_seconds": None if not waits or None in waits else sum(waits)}


def contention(results: dict[str, list[dict]]) -> str | None:
    """The line under a data set's first table on CPU contention, from the runs that have a wait reading: those
    that waited more than :data:`CONTENDED` of their training seconds by name, else the largest share; None when no
    run has a reading (results from code before it)."""
    shares = [(f"{name} s{r['config']['seed']}", r["wait_seconds"] / r["step_seconds"])
              for name, runs in results.items() for r in runs
              if r.get("wait_seconds") is not None and r.get("step_seconds")]
    if not shares:
        return None
    total = sum(len(runs) for runs in results.values())
    counted = f"{len(shares)} of {total} runs" if len(shares) < total else f"all {total} runs"
    contended = [f"{run} ({share:.0%})" for run, share in shares if share > CONTENDED]
    if contended:
        return (f"\n**Contended:** {', '.join(contended)} waited for a CPU held by another process for more than "
                f"{CONTENDED:.0%} of their training seconds, which their time figures include (CPU wait read for "
                f"{counted}).")
    return (f"\nCPU wait (read for {counted}): at most {max(s for _, s in shares):.1%} of a run's training seconds "
            f"went to waiting for a CPU held by another process (a run above {CONTENDED:.0%} would be named here).")


def machine(cores: set[int] | None = None) -> dict:
    """Where a run ran (not part of its cache key): the same seed is not the same run on every machine (a machine
    of the same kind parted from another at step 50, in the sixth decimal of the loss), so merged results must say
    which machine gave each run. ``cores``: those the run was pinned to; else those this process may use (its
    runs inherit them: ``taskset -c 1 bench_tta.py ...`` records [1])."""
    if not cores and hasattr(os, "sched_getaffinity"):
        cores = os.sched_getaffinity(0)
    return {"cpu": host.cpu_model(), "board": host.board_model()["model"], "cpu_threads": host.cpu_threads(),
            "cores": sorted(cores) if cores else None,
            "torch": host.distribution_version("torch"), "platform": host.platform_summary()}


def train_view(run_dir: Path, config: dict, cores: set[int] | None = None) -> dict:
    """The run's final model evaluated on the whole validation set with its training-time token view (each block
    at its mean keep ratio: ``edge-alast eval --train-view``), to set against its all-token accuracy."""
    proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "eval", str(run_dir), "--data", config["val_data"],
                           "--json", "--train-view", "--batch-size", str(config["batch_size"])],
                          capture_output=True, text=True, cwd=REPO, preexec_fn=_pinned(cores))
    if proc.returncode != 0:
        raise SystemExit(f"eval --train-view {run_dir} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    return {"accuracy": result["accuracy"], "keep_ratios": result["keep_ratios"], "images": result["images"]}


def resolve(settings: dict, dataset_dir: Path, seed: int, done: dict[str, dict]) -> dict:
    """A method's settings with ``{run:NAME}`` and ``{steps:NAME}`` filled in from the same seed's runs."""
    def fill(value):
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, str) and value.startswith("{run:"):
            return str(run_dir(dataset_dir.parent, dataset_dir.name, value[5:-1], seed))
        if isinstance(value, str) and value.startswith("{steps:"):  # to its last evaluation (where it stopped),
            source = done[value[7:-1]]                               # so the run's last step is evaluated too
            return int(source["evals"][-1]["step"] if source["evals"] else source["steps"])
        return value
    return fill(settings)


def settings_of(name: str) -> dict:
    """A method's run-file settings: ``METHODS[name]``, or for ``NAME@lrVALUE`` those of NAME at that learning
    rate (its runs then refer to NAME's runs of the same seed, at the method's own learning rate)."""
    base, _, lr = name.partition(LR_SUFFIX)
    if base not in METHODS:
        raise KeyError(name)
    return {**METHODS[base], "lr": float(lr)} if lr else METHODS[base]


def needs(name: str) -> set[str]:
    """The methods whose runs ``name``'s settings refer to."""
    text = json.dumps(settings_of(name))
    return {m for m in METHODS if f"{{run:{m}}}" in text or f"{{steps:{m}}}" in text}


def _lr_ok(name: str) -> bool:
    lr = name.partition(LR_SUFFIX)[2]
    try:
        return not lr or 0 < float(lr) <= 1
    except ValueError:
        return False


def run_order(methods: Sequence[str]) -> list[str]:
    """``full`` first (it sets the budget), then each method after those it needs (added when missing)."""
    order: list[str] = []

    def visit(name: str) -> None:
        for dep in sorted(needs(name)):
            visit(dep)
        if name not in order:
            order.append(name)
    for name in ("full", *methods):
        visit(name)
    return order


# -------------------------------------------------------------------------------------------- tables
def mean_std(values: list[float | None], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    got = [v / scale for v in values if v is not None]
    if not got:
        return "-"
    missing = f" ({len(values) - len(got)} -)" if len(got) < len(values) else ""
    if len(got) == 1:
        return fmt.format(got[0]) + missing
    return f"{fmt.format(statistics.mean(got))} ± {fmt.replace('+', '').format(statistics.stdev(got))}{missing}"


def endings(runs: list[dict]) -> str:
    counts = {e: sum(ending(r) == e for r in runs) for e in ENDINGS}
    return ", ".join(f"{e} {n}" for e, n in counts.items() if n)


def labels(results: dict[str, list[dict]]) -> dict[str, str]:
    """Each method's row name, with its seeds where they are not the first method's (full's): a table of a
    benchmark still under way (``--collect``) has methods on fewer seeds."""
    seeds = {name: [r["config"]["seed"] for r in runs] for name, runs in results.items()}
    common = seeds.get("full", next(iter(seeds.values()), []))
    return {name: name if mine == common else f"{name} (seed{'s' if len(mine) > 1 else ''} "
                                                f"{','.join(map(str, mine))})"
            for name, mine in seeds.items()}


def markdown(stored: dict) -> str:
    """The tables of a ``results.json`` ("DATASET/METHOD" -> that method's runs, one per seed), two per data set:
    how each method ended, and its accuracy at equal training time and FLOPs."""
    out = []
    for dataset in dict.fromkeys(key.split("/", 1)[0] for key in stored):
        methods = [key.split("/", 1)[1] for key in stored if key.split("/", 1)[0] == dataset]
        results = {name: stored[f"{dataset}/{name}"] for name in methods}
        full = results.get("full", [])
        first = (full or next(iter(results.values())))[0]
        cfg, protocol = first["config"], first["key"]["protocol"]
        window = protocol["window"]
        seeds = ",".join(str(r["config"]["seed"]) for r in (full or next(iter(results.values()))))
        codes = {json.dumps(r["key"]["code"], sort_keys=True) for runs in results.values() for r in runs}
        code = json.loads(next(iter(codes))) if len(codes) == 1 else None
        version = ("code " + (code["commit"] or "unknown")[:7] + (" + uncommitted changes" if code["dirty"] else "")
                   if code else f"{len(codes)} code versions (rerun for one)")
        t_full = [point_of_plateau(r)["elapsed_seconds"] for r in full]
        f_full = [point_of_plateau(r)["flops_total"] for r in full]
        budgets = {r["config"]["seed"]: r["key"]["protocol"]["budget_flops"] for runs in results.values()
                   for r in runs if r["key"]["protocol"].get("budget_flops")}  # one per seed
        out.append(f"\n{dataset}: {cfg['model']} @ {cfg['img_size']}px, batch {cfg['batch_size']}, eval every "
                   f"{cfg['eval_every']} steps on {first['evals'][0]['val_images'] if first['evals'] else '?'} "
                   f"images, plateau = the mean of {window} evaluations gains < {protocol['min_gain']} over "
                   f"{protocol['patience']} evaluations, seeds {seeds}, {version}.")
        if full:
            out.append(f"full plateaus at {mean_std(t_full, fmt='{:.0f}')} training s, "
                       f"{mean_std(f_full, 1e12, '{:.1f}')} TFLOPs; budget for the others "
                       f"{mean_std(list(budgets.values()), 1e12, '{:.1f}')} TFLOPs (each seed's from its own "
                       f"full run).\n")
        label = labels(results)
        out.append("| method | final acc (mean of last evals) | ended | steps | training s | TFLOPs | "
                   "GFLOPs/step | peak RSS MiB |")
        out.append("|---|---|---|---|---|---|---|---|")
        for name, runs in results.items():
            finals = [plateau_value([e["val_accuracy"] for e in r["evals"]], window) for r in runs]
            last = [r["evals"][-1] if r["evals"] else {} for r in runs]
            out.append(f"| {label[name]} | {mean_std(finals)} | {endings(runs)} | "
                       f"{mean_std([r['steps'] for r in runs], fmt='{:.0f}')} | "
                       f"{mean_std([e.get('elapsed_seconds') for e in last], fmt='{:.0f}')} | "
                       f"{mean_std([e.get('flops_total') for e in last], 1e12, '{:.1f}')} | "
                       f"{mean_std([r['flops_per_step'] for r in runs], 1e9, '{:.1f}')} | "
                       f"{mean_std([r['peak_rss_bytes'] for r in runs], 2**20, '{:.0f}')} |")
        waited = contention(results)
        if waited:
            out.append(waited)
        viewed = {name: runs for name, runs in results.items() if any(r.get("train_view") for r in runs)}
        if viewed:
            out.append("\nThe final model on the whole validation set, with every token (as evaluated) and with the "
                       "training-time token view (each block at its mean keep ratio, `eval --train-view`): the gap "
                       "is the train/eval token mismatch.\n")
            out.append("| method | all tokens | training-time view | gap (pts) |")
            out.append("|---|---|---|---|")
            for name, runs in viewed.items():
                pairs = [(r.get("final_val_accuracy"), (r.get("train_view") or {}).get("accuracy")) for r in runs]
                gaps = [100 * (a - v) if a is not None and v is not None else None for a, v in pairs]
                out.append(f"| {label[name]} | {mean_std([a for a, _ in pairs])} | {mean_std([v for _, v in pairs])} | "
                           f"{mean_std(gaps, fmt='{:+.1f}')} |")
        if not full:
            continue
        t_ref, f_ref = statistics.mean(t_full), statistics.mean(f_full)
        pct = [f"{f:.0%}" for f in FRACTIONS]
        out.append(f"\nAccuracy (smoothed curve) at equal training time and at equal FLOPs, as shares of full's "
                   f"time to plateau ({t_ref:.0f} s) and FLOPs to plateau ({f_ref / 1e12:.1f} TFLOPs); '-': the "
                   "run ended before that point without a plateau (a `fixed` run, one of a given length, keeps its "
                   "final value).\n")
        out.append("| method | " + " | ".join(f"acc @ {p} s" for p in pct) + " | "
                   + " | ".join(f"acc @ {p} FLOPs" for p in pct) + " |")
        out.append("|---|" + "---|" * (2 * len(FRACTIONS)))
        for name, runs in results.items():
            cells = [mean_std([value_at(r["evals"], f * t_ref, "elapsed_seconds", window, ending(r)) for r in runs])
                     for f in FRACTIONS]
            cells += [mean_std([value_at(r["evals"], f * f_ref, "flops_total", window, ending(r)) for r in runs])
                      for f in FRACTIONS]
            out.append(f"| {label[name]} | " + " | ".join(cells) + " |")
        rows, winner, why = choose_default(results, t_ref, window)
        absent = [name for name in DEFAULT_CANDIDATES if name not in results]  # the rule chose among the others
        if rows:
            out.append(f"\nThe default by the stated rule: best accuracy at equal training time at "
                       f"{DEFAULT_AT:.0%} of full's time to plateau, unless its plateau is below the best candidate "
                       f"plateau by more than its seed spread (candidates: {', '.join(DEFAULT_CANDIDATES)}"
                       + (f"; not run here: {', '.join(absent)}" if absent else "") + ").\n")
            out.append(f"| candidate | seeds | acc @ {DEFAULT_AT:.0%} s | plateau acc | seed spread (sd) |")
            out.append("|---|---|---|---|---|")
            for row in rows:
                spread = "-" if row["spread"] is None else f"{row['spread']:.3f}"
                out.append(f"| {row['name']} | {row['seeds']} | {row['at']:.3f} | {row['plateau']:.3f} | {spread} |")
            out.append(f"\n**Default: {winner}** ({why}).\n" if winner else f"\n**No default chosen:** {why}.\n")
    return "\n".join(out)


def choose_default(results: dict[str, list[dict]], t_ref: float, window: int) -> tuple[list[dict], str | None, str]:
    """The stated rule: of :data:`DEFAULT_CANDIDATES`, the one with the best mean accuracy at equal training time at
    ``DEFAULT_AT`` of full's time to plateau, unless its plateau accuracy is below the best candidate plateau by
    more than its own seed spread (standard deviation over seeds); then the next by that accuracy. Only candidates
    run on every seed full ran count, and the rule needs two seeds or more (one seed has no spread).

    Returns one row per candidate (name, seeds, mean accuracy at the budget, plateau mean and spread), the winner
    (None when the rule cannot decide) and the reason in words."""
    seeds = len(results.get("full", []))
    rows = []
    for name in DEFAULT_CANDIDATES:
        runs = results.get(name, [])
        at = [value_at(r["evals"], DEFAULT_AT * t_ref, "elapsed_seconds", window, ending(r)) for r in runs]
        plateaus = [plateau_value([e["val_accuracy"] for e in r["evals"]], window) for r in runs]
        if not runs or len(runs) < seeds or None in at or None in plateaus:
            continue
        rows.append({"name": name, "seeds": len(runs), "at": statistics.mean(at), "plateau": statistics.mean(plateaus),
                     "spread": statistics.stdev(plateaus) if len(plateaus) > 1 else None})
    rows.sort(key=lambda row: -row["at"])
    if not rows:
        return rows, None, "no candidate was run on every seed"
    if seeds < 2:
        return rows, None, f"{seeds} seed: no seed spread, so the rule cannot decide yet"
    best_plateau = max(row["plateau"] for row in rows)
    # the first within its spread of the best plateau; there is one: the best plateau's own candidate
    rank, winner = next((i, row) for i, row in enumerate(rows) if best_plateau - row["plateau"] <= row["spread"])
    passed = [row["name"] for row in rows[:rank]]
    why = (f"best accuracy at {DEFAULT_AT:.0%} of full's time" if not passed else
           f"{', '.join(passed)} ranked higher at {DEFAULT_AT:.0%} of full's time but plateau(s) lower than the best "
           f"candidate's by more than their seed spread")
    return rows, winner["name"], why


# -------------------------------------------------------------------------------------------- main
def seed_runs(args: argparse.Namespace, order: Sequence[str], base_protocol: dict, dataset: str, root: Path,
              seed: int, cores: set[int] | None) -> dict[str, dict]:
    """One seed's runs of one data set, in ``order`` (full first: its plateau sets the seed's budget)."""
    dataset_dir, mine = args.out / dataset, {}
    for name in order:
        budget = None if name == "full" else budget_flops([mine["full"]], args.budget_factor)
        settings = resolve(settings_of(name), dataset_dir, seed, {m: mine[m] for m in needs(name)})
        fixed = "steps" in settings  # a run of a given length (the remedy): no plateau or budget stop
        config = {"data": str(root / "train"), "val_data": str(root / "val"), "model": args.model,
                  "weights": args.weights, "img_size": args.img_size, "batch_size": args.batch_size,
                  "steps": args.max_steps, "seed": seed, "precision": "fp32", "eval_every": args.eval_every,
                  "eval_images": args.eval_images, "export": False, "augment": "none", **settings}
        if args.lr is not None:
            config["lr"] = args.lr
        for item in args.set:
            key, _, value = item.partition("=")
            config[key] = yaml.safe_load(value)
        protocol = {**base_protocol, "stop_at_plateau": not fixed, "budget_flops": None if fixed else budget}
        # train applies the stop rules itself, at the evaluation they read, so a rerun ends at the same step
        config.update({"stop_at_plateau": not fixed, "plateau_window": args.window,
                       "plateau_patience": args.patience, "plateau_min_gain": args.min_gain,
                       "max_tflops": None if fixed or budget is None else budget / 1e12})
        print(f"{dataset} seed {seed}: {name} ...", file=sys.stderr, flush=True)
        mine[name] = run(config, run_dir(args.out, dataset, name, seed), protocol, code_version(), cores)  # the code as
        # it is when this run starts (an edit made while the benchmark runs reaches the runs after it)
    return mine


def collect(out: Path, datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int]) -> dict:
    """A ``results.json`` of the finished runs cached in ``out`` (``OUT/DATASET/NAME-sSEED.json``), in the order
    given; a run not (yet) finished is left out, and a method or data set without any."""
    stored = {}
    for dataset in datasets:
        for name in methods:
            runs = []
            for seed in seeds:
                path = beside(run_dir(out, dataset, name, seed), ".json")
                try:
                    runs.append(json.loads(path.read_text()))
                except FileNotFoundError:
                    continue
                except ValueError as e:
                    raise SystemExit(f"--collect: {path} is not a run record ({e})") from None
            if runs:
                stored[f"{dataset}/{name}"] = runs
    return stored


def restore(results: dict, out: Path, datasets: Sequence[str], methods: Sequence[str],
            seeds: Sequence[int]) -> dict[Path, dict]:
    """Write the runs of a results file (``results.json``, or a committed copy) back into ``out``'s cache as
    ``OUT/DATASET/NAME-sSEED.json``, those of ``datasets``/``methods``/``seeds`` only, so that a benchmark that
    spans machines goes on from the runs it finished elsewhere. A record already in ``out`` is left as it is; a
    restored record is reused only under its own key (same config, protocol and code), as any cached run. The run's
    folder does not come back, but what another run reads from it does: ``static``/``random`` read their seed's
    ``alast-relative`` run's schedule, which its record keeps and which is written as that folder's ``summary.json``
    (where the folder has none). A record without a schedule (older code) leaves that run to run again. Returns the
    records written, by file."""
    written = {}
    for label, runs in results.items():
        dataset, _, name = label.partition("/")
        if dataset not in datasets or name not in methods:
            continue
        for record in runs:
            seed = record.get("config", {}).get("seed")
            if seed not in seeds:
                continue
            folder = run_dir(out, dataset, name, seed)
            path = beside(folder, ".json")
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
            written[path] = record
            if record.get(SCHEDULE) and not (folder / SUMMARY_FILE).exists():
                folder.mkdir(exist_ok=True)
                atomic_write_json(folder / SUMMARY_FILE, {
                    SCHEDULE: record[SCHEDULE], "train_flops_per_step": record.get("train_flops_per_step"),
                    "restored": "the schedule of this run's benchmark record (bench_tta --restore); no model"})
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, help="one learning rate for every method (default: each method's own)")
    ap.add_argument("--max-steps", type=int, default=3000, help="the most steps any run takes")
    ap.add_argument("--budget-factor", type=float, default=1.5,
                    help="the others' FLOP budget, as a multiple of what full needed to plateau")
    ap.add_argument("--eval-every", type=int, default=50,
                    help="steps between evaluations (at 112 px one evaluation of 1000 images costs about as much "
                         "as 20 full steps, so 25 would nearly double full's run time)")
    ap.add_argument("--eval-images", type=int, default=1000,
                    help="validation images per evaluation (all of them when the set is smaller)")
    ap.add_argument("--window", type=int, default=3, help="evaluations in the moving average")
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--min-gain", type=float, default=0.005)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--datasets", default="fmnist,digits")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--train-images", type=int, default=2000, help="Fashion-MNIST training images")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run at once, each its own chain of runs (a seed's budget comes from its own full "
                         "run, so seeds are independent); each chain is pinned to its share of the CPU cores. 2 "
                         "with OMP_NUM_THREADS=1 on a 2-core host; on a GPU host, as many as its memory holds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-file key for every run")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "tta")
    ap.add_argument("--markdown", type=Path, metavar="FILE",
                    help="print the tables of a results.json (OUT/results.json) and exit, running nothing")
    ap.add_argument("--collect", action="store_true",
                    help="write OUT/results.json from the runs of --datasets/--methods/--seeds already finished "
                         "in OUT (as cached, whatever their code version; missing ones are left out) and print "
                         "its tables, running nothing: the tables so far of a benchmark still under way")
    ap.add_argument("--restore", type=Path, metavar="RESULTS",
                    help="write the runs of --datasets/--methods/--seeds in a results file (a committed "
                         "docs/results/tta_*.json) back into OUT's cache, running nothing: the benchmark then goes "
                         "on from them on another machine (records only: a relative run that static or random "
                         "read from must run again)")
    args = ap.parse_args(argv)
    if args.restore:
        try:
            results = json.loads(args.restore.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--restore: cannot read {args.restore} as a results file ({e})") from None
        if not isinstance(results, dict) or not all(isinstance(v, list) for v in results.values()):
            raise SystemExit(f"--restore: {args.restore} is not a results file (a mapping of DATASET/METHOD to runs)")
        written = restore(results, args.out, args.datasets.split(","), args.methods.split(","),
                          list(map(int, args.seeds.split(","))))
        for path in written:
            print(f"restored {path}")
        made_in = sorted({str(Path(data).parent.parent) for r in written.values()  # keys of older code held paths
                          if str(data := r.get("key", {}).get("config", {}).get("data", "")).startswith("/")})
        elsewhere = [root for root in made_in if Path(root) != args.out.resolve()]
        if elsewhere:  # such a key is reused only with that --out (and --weights)
            print(f"note: the restored runs were made with --out {', '.join(elsewhere)}; their keys hold that path, "
                  f"so run the benchmark with that --out (and the same --weights) to reuse them", file=sys.stderr)
        if not written:
            print(f"--restore: nothing to restore from {args.restore} for those data sets, methods and seeds "
                  f"(or OUT has them already)", file=sys.stderr)
        return 0
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.collect:
        stored = collect(args.out, args.datasets.split(","), run_order(args.methods.split(",")),
                         list(map(int, args.seeds.split(","))))
        if not stored:
            raise SystemExit(f"--collect: no finished run of those data sets, methods and seeds in {args.out}")
        (args.out / "results.json").write_text(json.dumps(stored, indent=1))
        print(markdown(stored))
        return 0
    if not args.weights:
        ap.error("--weights is required")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m.partition(LR_SUFFIX)[0] not in METHODS or not _lr_ok(m)]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)}, each also as "
                 f"NAME{LR_SUFFIX}VALUE with VALUE in (0, 1])")
    if args.jobs < 1:
        ap.error(f"--jobs must be 1 or more, got {args.jobs}")
    if args.eval_images < 1000:
        print(f"warning: --eval-images {args.eval_images} < 1000: the protocol evaluates on at least 1000 images or "
              "the whole validation set", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    CHILDREN.forward_signals()
    data = {"fmnist": lambda: write_fmnist(args.out / "data-fmnist", args.train_images, 1000),
            "digits": lambda: write_digits(args.out / "data-digits")}
    base_protocol = {"window": args.window, "patience": args.patience, "min_gain": args.min_gain}
    order = run_order(methods)
    slots: queue.Queue = queue.Queue()  # the core shares no chain is using
    for share in core_shares(args.jobs):
        slots.put(share)

    def chain(dataset: str, root: Path, seed: int) -> dict[str, dict]:
        cores = slots.get()
        try:
            return seed_runs(args, order, base_protocol, dataset, root, seed, cores)
        finally:
            slots.put(cores)

    results: dict[tuple[str, str], list[dict]] = {}
    seeds = list(map(int, args.seeds.split(",")))
    for dataset in args.datasets.split(","):
        root = data[dataset]()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            per_seed = list(pool.map(chain, repeat(dataset), repeat(root), seeds))
        for name in order:
            results[(dataset, name)] = [runs[name] for runs in per_seed]
    stored = {f"{d}/{m}": results[(d, m)] for d in args.datasets.split(",") for m in order if (d, m) in results}
    (args.out / "results.json").write_text(json.dumps(stored, indent=1))
    print(markdown(stored))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
