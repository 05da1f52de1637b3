"""Runtime overhead: ``edge-alast train`` against the loop a user would write (timm model, AdamW, backward, step).

Both sides train the same timm model from the same weights on the same images, batch and threads, under the same
allocator (``LD_PRELOAD``, as ``train --allocator auto`` runs), each in a fresh process. Runs alternate
(plain, full, alast, plain, full, ...) ``--pairs`` times, so that a ratio holds on a noisy machine.

- ``plain``: the batch is decoded once and held in memory; each step times forward (+ loss), backward and the
  optimizer (``step`` + ``zero_grad``); the rest of the loop is nothing.
- ``full`` / ``alast``: ``edge_alast.train`` through the Python API (no export, no evaluation during training).
  Each step's wall time is the interval between consecutive ``step`` events, so it counts everything the loop does
  (logging, FLOP counting, memory readings); ``metrics.jsonl`` splits the step into data (plan + loader),
  compute (forward + backward + optimizer) and the rest inside the step.

Steps after --warmup are kept; the table gives medians per phase and the median of the per-pair ratios.

    python tools/make_fashion_mnist.py runs/fm-over --train 256 --val 16
    python tools/bench_overhead.py --data runs/fm-over/train --val-data runs/fm-over/val \\
        --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors --json-out runs/overhead.json
    python tools/bench_overhead.py --markdown runs/overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PLAIN = r"""
import json, sys, time
import edge_alast._compat  # only its torchvision import fix: a CUDA torchvision beside the CPU torch
import timm, torch, torch.nn.functional as F
a = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(a["threads"])
# timm's own loading from a local file (position embeddings resampled to img_size, a new head)
model = timm.create_model(a["model"], pretrained=True, pretrained_cfg_overlay={"file": a["weights"]},
                          num_classes=a["classes"], img_size=a["img_size"])
model.train()
params = [p for n, p in model.named_parameters() if not n.startswith(("patch_embed", "cls_token", "pos_embed",
                                                                       "reg_token"))]
for n, p in model.named_parameters():
    p.requires_grad_(any(p is q for q in params))
opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.05)
x = torch.randn(a["batch_size"], 3, a["img_size"], a["img_size"])  # held in memory: no decoding in the loop
y = torch.randint(0, a["classes"], (a["batch_size"],))
rows = []
for step in range(a["steps"]):
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    rows.append({"wall": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2})
print("ROWS " + json.dumps(rows))
"""

EDGE = r"""
import json, sys, time
from edge_alast import TrainConfig, train
a = json.loads(sys.argv[1])
stamps = []
def on_event(e):
    if e.get("event") == "step":
        stamps.append(time.perf_counter())
config = TrainConfig.from_dict(a["config"], source="bench_overhead")
t_start = time.perf_counter()
result = train(config, on_event=on_event)
steps = [json.loads(l) for l in open(a["config"]["out"] + "/metrics.jsonl") if '"event": "step"' in l]
rows = []
for i, r in enumerate(steps):
    wall = stamps[i] - stamps[i - 1] if i else None
    step = r["time/step_seconds"]
    rows.append({"wall": wall, "step": step, "data": r["time/data_seconds"], "compute": r["time/compute_seconds"],
                 "in_step_rest": step - r["time/data_seconds"] - r["time/compute_seconds"],
                 "outside_step": (wall - step) if wall is not None else None, "flops": r["flops/step"],
                 "graphs": r.get("compile/graphs")})
print("ROWS " + json.dumps(rows))
print("SUMMARY " + json.dumps({k: result.summary.get(k) for k in ("allocator", "train_flops_per_step",
                                                                   "train_flops_per_second", "flop_utilization",
                                                                   "compile", "peak_rss_bytes",
                                                                   "train_peak_rss_bytes")}))
"""


def child_env(args) -> dict:
    from edge_alast.device.allocator import find_library

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    library = find_library(args.allocator) if args.allocator != "system" else None
    if args.allocator != "system" and library is None:
        raise SystemExit(f"--allocator {args.allocator}: library not found")
    if library:
        env["LD_PRELOAD"] = library
    return env


def run_child(script: str, payload: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(payload)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = {}
    for line in proc.stdout.splitlines():
        for tag in ("ROWS", "SUMMARY"):
            if line.startswith(tag + " "):
                out[tag.lower()] = json.loads(line[len(tag) + 1:])
    return out


def one_run(args, kind: str, index: int, classes: int) -> dict:
    env = child_env(args)
    if kind == "plain":
        payload = {"model": args.model, "weights": args.weights, "img_size": args.img_size,
                   "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads, "classes": classes}
        return {"kind": kind, "pair": index, **run_child(PLAIN, payload, env)}
    method, _, overrides = kind.partition(":")  # e.g. full:trim_memory=false
    out = Path(tempfile.mkdtemp(prefix=f"overhead-{method}-"))
    config = {"data": args.data, "val_data": args.val_data, "out": str(out), "method": method, "model": args.model,
              "weights": args.weights, "img_size": args.img_size, "batch_size": args.batch_size,
              "steps": args.steps, "lr": 3e-5, "precision": "fp32", "export": False,
              "augment": "none", "resume": False, "train_embeddings": False}
    for item in filter(None, overrides.split(",")):
        name, _, value = item.partition("=")
        config[name] = yaml.safe_load(value)
    return {"kind": kind, "pair": index, **run_child(EDGE, {"config": config}, env)}


def median_of(rows: list[dict], key: str, warmup: int) -> float | None:
    values = [r[key] for r in rows[warmup:] if r.get(key) is not None]
    return statistics.median(values) if values else None


def markdown(results: dict) -> str:
    setup, runs = results["setup"], results["runs"]
    warmup = setup["warmup"]
    kinds = [k for k in ("plain", *setup["methods"]) if any(r["kind"] == k for r in runs)]
    lines = [f"{setup['model']} @ {setup['img_size']} px, batch {setup['batch_size']}, fp32, {setup['threads']} "
             f"threads, allocator {setup['allocator']}; {setup['steps']} steps per run ({warmup} warm-up left out), "
             f"{setup['pairs']} alternating runs of each; medians over the runs' per-step medians; at "
             f"`{setup.get('commit', '?')}`\n",
             "| loop | step wall s | data s | forward+backward+optimizer s | rest in the step s | outside the step s |"
             " × plain (median of pairs) |", "|---|---|---|---|---|---|---|"]
    per_kind = {}
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        med = lambda key: statistics.median([m for m in (median_of(r["rows"], key, warmup) for r in mine)
                                             if m is not None] or [float("nan")])
        compute = med("compute") if kind != "plain" else med("forward") + med("backward") + med("optimizer")
        per_kind[kind] = {"wall": med("wall"), "data": med("data") if kind != "plain" else 0.0, "compute": compute,
                          "rest": med("in_step_rest") if kind != "plain" else 0.0,
                          "outside": med("outside_step") if kind != "plain" else 0.0}
    plain_by_pair = {r["pair"]: median_of(r["rows"], "wall", warmup) for r in runs if r["kind"] == "plain"}
    for kind in kinds:
        ratios = [median_of(r["rows"], "wall", warmup) / plain_by_pair[r["pair"]] for r in runs
                  if r["kind"] == kind and plain_by_pair.get(r["pair"])]
        k = per_kind[kind]
        ratio = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})" if ratios else "–"
        lines.append(f"| {kind} | {k['wall']:.3f} | {k['data']:.3f} | {k['compute']:.3f} | {k['rest']:.3f} | "
                     f"{k['outside']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--val-data")
    ap.add_argument("--weights")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--allocator", default="tcmalloc", choices=("tcmalloc", "jemalloc", "system"))
    ap.add_argument("--methods", default="full,alast",
                    help="edge-alast runs: a method, or METHOD:KEY=VALUE,... with run-file overrides "
                         "(e.g. full:trim_memory=false)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="print the table of a --json-out file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not (args.data and args.val_data and args.weights):
        ap.error("--data, --val-data and --weights are required")
    classes = sum(1 for p in Path(args.data).iterdir() if p.is_dir())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "edge_alast"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    methods = [m for m in args.methods.split(",") if m]
    setup = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": methods,
             "commit": commit + ("-dirty" if dirty else "")}
    results = {"setup": setup, "runs": []}
    for pair in range(args.pairs):
        for kind in ("plain", *methods):
            results["runs"].append(one_run(args, kind, pair, classes))
            print(f"pair {pair} {kind}: median step wall "
                  f"{median_of(results['runs'][-1]['rows'], 'wall', args.warmup):.3f} s", flush=True)
            if args.json_out:
                args.json_out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
