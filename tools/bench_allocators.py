"""Peak memory and step time of each method under each malloc, side by side in one run; and the allocator slack
of the planner's cost model measured for each.

Allocators: ``glibc`` (the system's, untouched), ``glibc-mallopt`` (glibc tuned at process start with
:func:`edge_alast.device.allocator.tune_glibc`: 2 arenas, 4 MiB mmap threshold, 8 MiB trim threshold), ``jemalloc`` and
``tcmalloc`` (``edge-alast train --allocator NAME``: the CLI re-executes itself with ``LD_PRELOAD``). Each run is
its own ``python -m edge_alast.cli train --json --no-export`` process; within each method the allocators run one
after another, in an order rotated from method to method, so drift (thermal, other load) hits all alike. The
allocator each process really ran on is read from its ``/proc/PID/maps`` while it trains.

After each run, a fresh process under the same allocator sets the run up as the trainer does and asks the cost
model for the live bytes of its steps (``plan_for(run, None)``; for ALaST, the steps the run took, from its
metrics.jsonl): slack = (measured training peak - predicted live bytes) / predicted saved activations, the figure
``costmodel.ALLOCATOR_SLACK`` holds per allocator.

    apt-get install -y libjemalloc2 libtcmalloc-minimal4
    python tools/make_fashion_mnist.py /work/bench/fm-alloc --train 320 --val 64
    python tools/bench_allocators.py --data /work/bench/fm-alloc/train --val-data /work/bench/fm-alloc/val \\
        --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors --workdir /work/bench/alloc
    python tools/bench_allocators.py --markdown /work/bench/alloc/results.json   # the table again, running nothing
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from edge_alast.device.allocator import REEXEC_ENV, find_library
from edge_alast.runfolder import METRICS_FILE, SUMMARY_FILE, WARMUP_STEPS, read_json, read_metrics, steady

REPO = Path(__file__).resolve().parent.parent
ALLOCATORS = ("glibc", "glibc-mallopt", "jemalloc", "tcmalloc")
ADAPTER_METHODS = ("lora", "alast-lora", "light-peft", "light-peft+alast")

# Runs the CLI in this interpreter after tuning glibc: mallopt must come before the large allocations.
MALLOPT_WRAPPER = ("import sys\n"
                   "from edge_alast.device.allocator import tune_glibc\n"
                   "assert tune_glibc(), 'mallopt failed'\n"
                   "from edge_alast.cli.main import main\n"
                   "sys.argv = ['edge-alast'] + sys.argv[1:]\n"
                   "main()\n")


def _command(allocator: str, args: list[str]) -> list[str]:
    if allocator == "glibc-mallopt":
        return [sys.executable, "-c", MALLOPT_WRAPPER, *args]
    return [sys.executable, "-m", "edge_alast.cli", *args]


def _env() -> dict:
    """The child's environment without an inherited allocator preload (the CLI adds its own)."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_ENV)}


def _observed(pid: int) -> str | None:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    for name in ("tcmalloc", "jemalloc"):
        if re.search(rf"lib{name}", maps):
            return name
    return "glibc"


def _busy_seconds() -> float:
    """CPU seconds every process on this machine has used (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
    return busy / os.sysconf("SC_CLK_TCK")


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_quiet(threshold: float, window: float = 5.0, pause: float = 30.0) -> None:
    """Wait until the rest of the machine uses less than ``threshold`` cores (other engineers' runs would slow
    ours and share the memory bandwidth)."""
    while True:
        b0 = _busy_seconds()
        time.sleep(window)
        load = (_busy_seconds() - b0) / window
        if load < threshold:
            return
        print(f"  waiting: the machine is busy ({load:.2f} cores)", file=sys.stderr, flush=True)
        time.sleep(pause)


def run_one(name: str, allocator: str, cfg: dict, workdir: Path) -> dict:
    run_dir = workdir / name
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump({**cfg, "out": str(run_dir), "resume": False,
                                        "allocator": "glibc" if allocator.startswith("glibc") else allocator}))
    cmd = _command(allocator, ["train", "--config", str(cfg_path), "--json", "--no-export"])
    t0, busy0, own0 = time.monotonic(), _busy_seconds(), _children_seconds()
    with open(workdir / f"{name}.out", "w") as out, open(workdir / f"{name}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_env(), cwd=REPO)
        observed = None
        while proc.poll() is None:
            observed = _observed(proc.pid) or observed
            time.sleep(1.0)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {(workdir / f'{name}.err').read_text()[-3000:]}")
    result = read_run(run_dir)
    wall = time.monotonic() - t0
    # What the rest of the machine used meanwhile, in cores: a disturbed run is measured again.
    other = ((_busy_seconds() - busy0) - (_children_seconds() - own0)) / wall
    result.update(allocator=allocator, observed_allocator=observed, wall_seconds=wall, other_load_cores=other)
    expected = "glibc" if allocator.startswith("glibc") else allocator
    if observed != expected:
        raise SystemExit(f"{name}: expected to run on {expected}, /proc/PID/maps showed {observed}")
    warnings = [e["message"] for e in map(json.loads, (workdir / f"{name}.out").read_text().splitlines())
                if e.get("event") == "warning"]
    result["warnings"] = warnings
    return result


def read_run(run_dir: Path) -> dict:
    summary = read_json(run_dir / SUMMARY_FILE)
    seconds = [r["time/step_seconds"] for r in read_metrics(run_dir / METRICS_FILE) if r.get("event") == "step"]
    return {"peak_rss_bytes": summary["peak_rss_bytes"], "train_peak_rss_bytes": summary.get("train_peak_rss_bytes"),
            "summary_allocator": summary.get("allocator"), "steps": len(seconds),
            "median_step_seconds": statistics.median(steady(seconds)),
            "val_accuracy": summary.get("val_accuracy")}


def predict_live(cfg_path: Path, allocator: str, workdir: Path) -> dict:
    """Run :func:`predict` in a fresh process on ``allocator`` (its baseline RSS is part of the prediction)."""
    env = _env()
    if allocator in ("jemalloc", "tcmalloc"):
        env["LD_PRELOAD"] = find_library(allocator)
    cmd = [sys.executable, __file__, "--predict", str(cfg_path)] + (["--mallopt"] if allocator == "glibc-mallopt"
                                                                      else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict(config_path: str) -> dict:
    """In this process: set the run up as the trainer does and cost its steps without ceilings. Returns the live
    bytes (peak less the allocator slack) and saved activations of the costliest step: for ALaST the costliest of
    the steps the run took (its metrics.jsonl), otherwise the plan's one step shape (every block, every token;
    Light-PEFT: its estimation stage)."""
    import dataclasses
    import tempfile

    import edge_alast.cli.main  # noqa: F401  (the same libraries a training process holds)
    from edge_alast.device.allocator import allocator_in_use
    from bench_planner import steps_taken
    from edge_alast.config import TrainConfig
    from edge_alast.training.run import plan_for, setup_run

    config = TrainConfig.from_dict(yaml.safe_load(Path(config_path).read_text()))
    with tempfile.TemporaryDirectory(prefix="bench_allocators_predict_") as scratch:
        run = setup_run(dataclasses.replace(config, out=scratch, profile=None, resume=False))
        plan = plan_for(run, None)
    worst = dict(plan.breakdown)
    best = {"live": worst["peak"] - worst["allocator_slack"], "activations": worst["activations"], "source": "plan"}
    if run.spec.alast and not run.spec.light_peft:
        for d in steps_taken(plan, run, Path(config.out) / METRICS_FILE):
            live = d["peak"] - d["allocator_slack"]
            if best["source"] == "plan" or live > best["live"]:
                best = {"live": live, "activations": d["activations"], "source": "steps taken"}
    return {"allocator": allocator_in_use(), "live_bytes": int(best["live"]),
            "activation_bytes": int(best["activations"]), "source": best["source"],
            "predicted_peak_bytes": int(plan.predicted_peak_bytes),
            "worst_live_bytes": int(worst["peak"] - worst["allocator_slack"]),
            "worst_activation_bytes": int(worst["activations"])}


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def table(results: dict, methods: list[str], allocators: list[str]) -> str:
    lines = ["| method | allocator | peak RSS MiB | × glibc | × full (same allocator) | training-loop peak MiB "
             "| × glibc | step s (median) | × glibc | × full (same allocator) | slack (× activations) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for a in allocators:
            r = results.get(f"{m}@{a}")
            if r is None:
                continue
            g, f = results.get(f"{m}@glibc", {}), results.get(f"full@{a}", {})

            def ratio(key, ref):
                return f"{r[key] / ref[key]:.2f}" if r.get(key) and ref.get(key) else "-"

            slack = r.get("slack")
            lines.append(f"| {m} | {a} | {mib(r['peak_rss_bytes'])} | {ratio('peak_rss_bytes', g)} "
                         f"| {ratio('peak_rss_bytes', f)} | {mib(r.get('train_peak_rss_bytes'))} "
                         f"| {ratio('train_peak_rss_bytes', g)} | {r['median_step_seconds']:.2f} "
                         f"| {ratio('median_step_seconds', g)} | {ratio('median_step_seconds', f)} "
                         f"| {'-' if slack is None else f'{slack:.2f}'} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The table of a ``results.json`` ("METHOD@ALLOCATOR" -> run), methods and allocators in the file's order."""
    keys = [key.split("@", 1) for key in results]
    return table(results, list(dict.fromkeys(m for m, _ in keys)), list(dict.fromkeys(a for _, a in keys)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predict", help=argparse.SUPPRESS)
    ap.add_argument("--mallopt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data")
    ap.add_argument("--val-data")
    ap.add_argument("--weights")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--adapter-lr", type=float, default=1e-3, help="lr of the adapter methods (LoRA, Light-PEFT)")
    ap.add_argument("--estimation-steps", type=int, default=8, help="Light-PEFT's estimation steps")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--methods", default="full,alast,lora,light-peft")
    ap.add_argument("--allocators", default=",".join(ALLOCATORS))
    ap.add_argument("--quiet-below", type=float, default=0.15,
                    help="cores the rest of the machine may use during a run; a busier run is measured again")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a disturbed run")
    ap.add_argument("--no-predict", action="store_true", help="skip the slack measurement")
    ap.add_argument("--workdir", type=Path, required=False)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--table-only", action="store_true", help="re-print the table from --workdir/results.json")
    ap.add_argument("--markdown", type=Path, metavar="FILE",
                    help="print the table of a results.json (--workdir's or --json-out's) and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.predict:
        if args.mallopt:
            from edge_alast.device.allocator import tune_glibc

            tune_glibc()
        print(json.dumps(predict(args.predict)))
        return 0
    methods, allocators = args.methods.split(","), args.allocators.split(",")
    if not args.workdir:
        ap.error("--workdir is required")
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.workdir / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if not args.table_only:
        if not (args.data and args.val_data):
            ap.error("--data and --val-data are required")
        for i, method in enumerate(methods):
            order = allocators[i % len(allocators):] + allocators[:i % len(allocators)]
            cfg = {"data": args.data, "val_data": args.val_data, "model": args.model, "img_size": args.img_size,
                   "steps": args.steps, "batch_size": args.batch_size, "precision": args.precision, "seed": 0,
                   "method": method, "lr": args.adapter_lr if method in ADAPTER_METHODS else args.lr,
                   "checkpoint_every_seconds": 3600.0}
            if args.weights:
                cfg["weights"] = args.weights
            if method.startswith("light-peft"):
                cfg["light_peft"] = {"estimation_steps": args.estimation_steps}
            for allocator in order:
                name = f"{method}@{allocator}"
                print(f"running {name} ...", file=sys.stderr, flush=True)
                for attempt in range(1 + args.retries):
                    wait_quiet(args.quiet_below)
                    r = run_one(name.replace("@", "_"), allocator, cfg, args.workdir)
                    if r["other_load_cores"] < args.quiet_below:
                        break
                    print(f"  {name}: disturbed (other processes used {r['other_load_cores']:.2f} cores)",
                          file=sys.stderr, flush=True)
                if not args.no_predict:
                    p = predict_live(args.workdir / f"{name.replace('@', '_')}.yaml", allocator, args.workdir)
                    r["prediction"] = p
                    measured = r.get("train_peak_rss_bytes") or r["peak_rss_bytes"]
                    if "live_bytes" in p:
                        r["slack"] = (measured - p["live_bytes"]) / p["activation_bytes"]
                results[name] = r
                store.write_text(json.dumps(results, indent=1))
                print(f"  {name}: peak {mib(r['peak_rss_bytes'])} MiB (training {mib(r['train_peak_rss_bytes'])}), "
                      f"{r['median_step_seconds']:.2f} s/step, on {r['observed_allocator']}, other load "
                      f"{r['other_load_cores']:.2f} cores, slack "
                      f"{r.get('slack', float('nan')):.2f} ({r.get('prediction', {}).get('source', '-')})",
                      file=sys.stderr, flush=True)
    print(f"\n{args.model} @ {args.img_size}px, batch {args.batch_size}, {args.precision}, {args.steps} steps, lr "
          f"{args.lr} ({args.adapter_lr} for adapter methods), Light-PEFT estimation {args.estimation_steps} steps; "
          f"step s: median of steps {min(WARMUP_STEPS, args.steps // 5) + 1}-{args.steps} (runfolder.steady)\n")
    print(table(results, methods, allocators))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
