"""Compiled steps: ``edge-alast train --compile on`` against ``--compile off``, per method, on this machine.

Each run is a fresh process (``bench_overhead``'s child: the Python API, no export, no evaluation during
training) on the same model, weights, images, batch, threads and allocator; on and off alternate ``--pairs`` times.
Per run:

- step s: the median wall time between consecutive steps over the second half of the run (compiled graphs are
  all made by then: ALaST recompiles when its token counts first change and when a block first freezes);
- compile s: the run's training time above ``steps`` x that median (the first step's compile, and every
  recompilation after it), with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` a new folder per run), as on a
  device's first compiled run; ``--warm-cache`` shares one cache folder, as later runs on the same device would;
- graphs: graphs ``torch.compile`` made during training (``summary.json``'s ``compile.graphs``);
- peak RSS: the training loop's whole-process peak.

The ``auto`` column is the rule ``--compile auto`` applies to a profile: compiling pays off when the seconds it
saves over a ``--typical-steps`` run (200) exceed its compile seconds. Set the profile's ``compile`` field from it.

    python tools/make_fashion_mnist.py runs/fm-over --train 256 --val 16
    python tools/bench_compile.py --data runs/fm-over/train --val-data runs/fm-over/val \\
        --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors --json-out runs/compile.json
    python tools/bench_compile.py --markdown runs/compile.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_overhead import one_run  # noqa: E402
from bench_tta import code_version  # noqa: E402


def measure(run: dict) -> dict:
    """One run's steady step seconds, compile seconds, graphs and peak RSS (see module docstring)."""
    walls = [r["step"] for r in run["rows"]]  # time/step_seconds: the step itself, not logging between steps
    steady = statistics.median(walls[len(walls) // 2:])
    summary = run.get("summary", {})
    return {"step_seconds": steady, "compile_seconds": max(0.0, sum(walls) - len(walls) * steady),
            "graphs": (summary.get("compile") or {}).get("graphs", 0),
            "train_peak_rss_bytes": summary.get("train_peak_rss_bytes")}


def pays_off(off: dict, on: dict, typical_steps: int) -> bool:
    """``auto``'s rule: the seconds compiling saves over a typical run exceed what compiling costs."""
    return (off["step_seconds"] - on["step_seconds"]) * typical_steps > on["compile_seconds"]


def markdown(results: dict) -> str:
    setup, runs = results["setup"], results["runs"]
    code = setup["code"]
    cache = ("a shared inductor cache" if setup.get("warm_cache") else "an empty inductor cache per compiled run"
             if "warm_cache" in setup else "inductor's default on-disk cache (left warm by earlier runs)")
    lines = [f"{setup['model']} @ {setup['img_size']} px, batch {setup['batch_size']}, fp32, {setup['threads']} "
             f"thread(s), allocator {setup['allocator']}, {setup['steps']} steps per run, {setup['pairs']} "
             f"alternating pair(s), {cache}; medians over the pairs; code {(code['commit'] or '?')[:7]}"
             f"{' + uncommitted changes' if code['dirty'] else ''}\n",
             f"| method | step s, eager | step s, compiled | × eager | compile s | graphs | peak RSS MiB, eager | "
             f"peak RSS MiB, compiled | pays off in {setup['typical_steps']} steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in setup["methods"]:
        got = {mode: [measure(r) for r in runs if r["kind"] == f"{method}:compile={mode}"] for mode in ("off", "on")}
        if not got["off"] or not got["on"]:
            continue
        med = {mode: {k: statistics.median([m[k] for m in got[mode] if m[k] is not None] or [float("nan")])
                      for k in got[mode][0]} for mode in got}
        off, on = med["off"], med["on"]
        lines.append(f"| {method} | {off['step_seconds']:.3f} | {on['step_seconds']:.3f} | "
                     f"{on['step_seconds'] / off['step_seconds']:.3f} | {on['compile_seconds']:.0f} | "
                     f"{on['graphs']:.0f} | {off['train_peak_rss_bytes'] / 2**20:.0f} | "
                     f"{on['train_peak_rss_bytes'] / 2**20:.0f} | "
                     f"{'yes' if pays_off(off, on, setup['typical_steps']) else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--val-data")
    ap.add_argument("--weights")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allocator", default="tcmalloc", choices=("tcmalloc", "jemalloc", "system"))
    ap.add_argument("--methods", default="full,alast,lora")
    ap.add_argument("--typical-steps", type=int, default=200, help="the run length compile time is amortised over")
    ap.add_argument("--warm-cache", action="store_true",
                    help="let compiled runs share inductor's on-disk cache (default: an empty one per run)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="print the table of a --json-out file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not (args.data and args.val_data and args.weights):
        ap.error("--data, --val-data and --weights are required")
    classes = sum(1 for p in Path(args.data).iterdir() if p.is_dir())
    methods = [m for m in args.methods.split(",") if m]
    setup = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": methods,
             "code": code_version()}
    results = {"setup": setup, "runs": []}
    for pair in range(args.pairs):
        for method in methods:
            for mode in ("off", "on"):
                if not args.warm_cache:  # read by the child: it copies this environment
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
                run = one_run(args, f"{method}:compile={mode}", pair, classes)
                results["runs"].append(run)
                m = measure(run)
                print(f"pair {pair} {method} compile {mode}: step {m['step_seconds']:.3f} s, compile "
                      f"{m['compile_seconds']:.0f} s, {m['graphs']} graphs", flush=True)
                if args.json_out:
                    args.json_out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
