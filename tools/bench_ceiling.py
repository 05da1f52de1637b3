"""Ceilings that hold for the whole process, under a real memory limit.

Runs full fine-tuning unconstrained (with the ONNX export) to set the scale, then each method with a device
profile whose memory ceiling is a fraction of full's whole-process peak, inside a memory cgroup of exactly that
size (tools/memcgroup.py; needs root): the kernel, not a Python check, decides whether the run fits. Prints the
whole-process and training-loop peaks against the planner's predictions, and whether the run finished (exit 0, no
OOM kill, a complete run folder).

    python tools/bench_ceiling.py --data runs/fmnist/train --val-data runs/fmnist/val \\
        --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors --fractions 0.6,0.45 \\
        --json-out runs/ceiling.json
    python tools/bench_ceiling.py --markdown runs/ceiling.json   # the table again, running nothing
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memcgroup import MemoryCgroup  # noqa: E402

FILES = ("summary.json", "model.safetensors", "model.onnx", "manifest.json", "metrics.jsonl")


def run(cfg: dict, out: Path, cgroup: MemoryCgroup | None = None) -> tuple[int, dict | None, str]:
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({**cfg, "out": str(out)}))
    proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(path), "--json"],
                          capture_output=True, text=True, cwd=REPO, preexec_fn=cgroup.enter if cgroup else None,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return proc.returncode, summary, (proc.stderr or proc.stdout)[-400:]


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def err(pred, meas) -> str:
    return "-" if not pred or not meas else f"{100 * (pred - meas) / meas:+.1f}"


def markdown(results: dict) -> str:
    """The table of a ``--json-out`` file: each constrained run against its ceiling and the planner's predictions."""
    setup, full = results["setup"], results["full"]
    lines = [f"\nViT-S/14 {setup['img_size']} px, batch {setup['batch_size']}, {setup['steps']} steps, fp32, "
             f"{'with' if setup['export'] else 'without'} ONNX export; full's whole-process peak "
             f"{mib(full['peak_rss_bytes'])} MiB (allocator {full.get('allocator')})\n",
             "| method | ceiling (× full) MiB | exit | OOM kills | complete | process peak MiB | predicted | error % "
             "| training peak MiB | predicted | error % | planner | val acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        s, tail = r["summary"], r["tail"].strip()
        notes = "; ".join(s.get("planner_notes", [])) or (tail.splitlines()[-1] if tail else "-")
        lines.append(f"| {r['method']} | {mib(r['ceiling_bytes'])} ({r['fraction']:.2f}) | {r['exit']} | "
                     f"{r['oom_kills']} | {'yes' if r['complete'] else 'no'} | {mib(s.get('peak_rss_bytes'))} | "
                     f"{mib(s.get('predicted_peak_bytes'))} | "
                     f"{err(s.get('predicted_peak_bytes'), s.get('peak_rss_bytes'))} | "
                     f"{mib(s.get('train_peak_rss_bytes'))} | {mib(s.get('predicted_train_peak_bytes'))} | "
                     f"{err(s.get('predicted_train_peak_bytes'), s.get('train_peak_rss_bytes'))} | {notes} | "
                     f"{s.get('val_accuracy', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--val-data")
    ap.add_argument("--weights")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fractions", default="0.6,0.45")
    ap.add_argument("--methods", default="alast,lora")
    ap.add_argument("--no-export", action="store_true", help="the constrained runs skip the ONNX export")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json-out", type=Path, help="also write the figures here (for --markdown)")
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="print the table of a --json-out file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not (args.data and args.val_data and args.weights):
        ap.error("--data, --val-data and --weights are required")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ceiling_"))
    work.mkdir(parents=True, exist_ok=True)
    base = {"data": args.data, "val_data": args.val_data, "weights": args.weights, "img_size": args.img_size,
            "batch_size": args.batch_size, "steps": args.steps, "precision": "fp32", "resume": False}
    lrs = {"lora": 1e-3, "alast-lora": 1e-3}

    code, full, tail = run({**base, "method": "full", "lr": 3e-5}, work / "full")
    if code != 0:
        raise SystemExit(f"full failed ({code}): {tail}")
    print(f"full, unconstrained: whole-process peak {mib(full['peak_rss_bytes'])} MiB, training loop "
          f"{mib(full['train_peak_rss_bytes'])} MiB, allocator {full.get('allocator')}", file=sys.stderr)
    rows = []
    for fraction in map(float, args.fractions.split(",")):
        ceiling = int(fraction * full["peak_rss_bytes"])
        profile = yaml.safe_load((REPO / "device_profiles" / "laptop_cpu.yaml").read_text())
        profile.update(name=f"ceiling_{int(100 * fraction)}pct", memory_ceiling_bytes=ceiling)
        profile_path = work / f"ceiling_{int(100 * fraction)}.yaml"
        profile_path.write_text(yaml.safe_dump(profile))
        for method in args.methods.split(","):
            out = work / f"{method}-{int(100 * fraction)}"
            cgroup = MemoryCgroup(ceiling)
            try:
                code, s, tail = run({**base, "method": method, "lr": lrs.get(method, 3e-5),
                                     "profile": str(profile_path), "export": not args.no_export}, out, cgroup)
                kills = cgroup.oom_kills()
            finally:
                cgroup.remove()
            complete = all((out / f).exists() for f in FILES if not args.no_export or "onnx" not in f
                           and "manifest" not in f)
            rows.append({"fraction": fraction, "method": method, "ceiling_bytes": ceiling, "exit": code,
                         "oom_kills": kills, "complete": complete, "summary": s or {}, "tail": tail})
            print(f"{method} @ {fraction:.0%}: exit {code}, OOM kills {kills}", file=sys.stderr)

    results = {"setup": {"img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
                         "export": not args.no_export},
               "full": {k: full.get(k) for k in ("peak_rss_bytes", "train_peak_rss_bytes", "allocator")},
               "rows": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
