"""Check the planner's memory model against measured runs: predicted peak vs each run's measured peak RSS.

Each configuration trains in its own ``edge-alast train`` process (so each peak RSS is its own); the prediction
for it is made in another fresh process that builds the model the way the trainer does and calls
:func:`edge_alast.device.planner.plan_run` -- or is read from the run's ``summary.json`` ("predicted_peak_bytes") once the
trainer plans runs itself. Prints a markdown table with the error of each prediction.

The last case is a profile whose memory ceiling is 60 % of the measured full fine-tuning peak, used with ALaST: the
planner must cap the run so its measured peak stays under the ceiling. That check needs the trainer to plan with the
profile (``summary.json`` keys "predicted_peak_bytes" and "memory_ceiling_bytes"); before that it is reported as
not wired.

    python tools/make_fashion_mnist.py /tmp/fm_plan --train 200 --val 50
    python tools/bench_planner.py --data /tmp/fm_plan/train --val-data /tmp/fm_plan/val \\
        --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors --steps 12 --json-out /tmp/plan.json
    python tools/bench_planner.py --markdown /tmp/plan.json   # the table again, running nothing
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
S14 = "vit_small_patch14_dinov2"
TINY_ARGS = {"embed_dim": 192, "num_heads": 3}  # ViT-Ti width on the S/14 layout (random init: no weights fit)

# name, model_args, uses the shared weights, img size, batch, method
CONFIGS = [
    ("S/14 112 b16 full", {}, True, 112, 16, "full"),
    ("S/14 112 b16 alast", {}, True, 112, 16, "alast"),
    ("S/14 112 b16 head", {}, True, 112, 16, "head"),
    ("S/14 112 b8 full", {}, True, 112, 8, "full"),
    ("S/14 224 b8 alast", {}, True, 224, 8, "alast"),
    ("Ti/14 224 b16 alast", TINY_ARGS, False, 224, 16, "alast"),
    ("S/14 224 b8 head", {}, True, 224, 8, "head"),
]


def run_config(args, name: str, model_args: dict, weights: bool, img: int, batch: int, method: str, work: Path,
               profile: str | None = None) -> dict:
    slug = name.replace("/", "").replace(" ", "_")
    cfg = {"data": args.data, "val_data": args.val_data, "model": args.model, "model_args": model_args,
           "img_size": img, "batch_size": batch, "method": method, "steps": args.steps, "precision": args.precision,
           "out": str(work / slug), "resume": False}
    if weights and args.weights:
        cfg["weights"] = args.weights
    if profile:
        cfg["profile"] = profile
    path = work / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(path), "--json"],
                          capture_output=True, text=True, cwd=REPO)
    # After the run, so the prediction can also cost the steps the run actually took (its metrics.jsonl).
    predicted = subprocess.run([sys.executable, __file__, "--predict", str(path)], capture_output=True, text=True,
                               cwd=REPO)
    if predicted.returncode != 0:
        prediction = {"error": predicted.stderr.strip().splitlines()[-1] if predicted.stderr.strip() else "failed"}
    else:
        prediction = json.loads(predicted.stdout.strip().splitlines()[-1])
    if proc.returncode != 0:
        return {"name": name, "prediction": prediction, "error": (proc.stderr or proc.stdout).strip()[-600:]}
    summary = json.loads((work / slug / "summary.json").read_text())
    return {"name": name, "prediction": prediction, "summary": summary}


def predict(config_path: str) -> dict:
    """In a fresh process: set the run up as the trainer does (``setup_run``), then plan it without ceilings."""
    import dataclasses

    import edge_alast.cli.main  # noqa: F401  (the same libraries a training process holds)
    from edge_alast.config import TrainConfig
    from edge_alast.training.run import plan_for, setup_run

    config = TrainConfig.from_dict(yaml.safe_load(Path(config_path).read_text()))
    with tempfile.TemporaryDirectory(prefix="bench_planner_predict_") as scratch:
        run = setup_run(dataclasses.replace(config, out=scratch, profile=None, resume=False))
        plan = plan_for(run, None)
    # The same cost model on the steps the run took (tokens and trainable blocks from metrics.jsonl): the
    # model's accuracy, where predicted_peak_bytes is the bound over every step the policy could take.
    actual = max((d["peak"] for d in steps_taken(plan, run, Path(config.out) / "metrics.jsonl")), default=None)
    from edge_alast.device.allocator import allocator_in_use

    return {"predicted_peak_bytes": plan.predicted_peak_bytes, "predicted_steps_taken_bytes": actual,
            "allocator": allocator_in_use(),
            "batch_size": plan.batch_size,
            "predicted_flops_per_step": plan.predicted_flops_per_step, "notes": plan.notes,
            "breakdown": {k: int(v) for k, v in plan.breakdown.items()}}


def steps_taken(plan, run, metrics_path: Path):
    """The cost model's breakdown (:meth:`CostModel.peak`) of each training step a run logged in metrics.jsonl."""
    import dataclasses

    from edge_alast.runfolder import metric, read_metrics

    for rec in read_metrics(metrics_path):
        if rec.get("event") != "step":
            continue
        trainable = [i in rec["blocks/trainable"] for i in range(run.depth)]
        keep = metric(rec, "plan/keep_ratio")
        shape = plan.cost.shape(run.order.batch_size, keep, trainable)
        if list(shape.tokens) != rec["tokens/per_block"]:
            shape = dataclasses.replace(shape, tokens=tuple(rec["tokens/per_block"]))
        yield plan.cost.peak(shape)


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def markdown(results: list[dict]) -> str:
    """The table of a ``--json-out`` file (one entry per configuration), and the 60 % ceiling case's verdict."""
    lines = ["| config | steps | worst-case predicted MiB | measured peak RSS MiB | error % | source "
             "| predicted for the steps taken MiB | error % |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "ceiling_bytes" in r:
            continue
        s = r.get("summary", {})
        pred = s.get("predicted_peak_bytes") or r["prediction"].get("predicted_peak_bytes")
        source = "summary" if s.get("predicted_peak_bytes") else "bench"
        meas = s.get("peak_rss_bytes")
        failed = r.get("error", r["prediction"].get("error", "-"))
        err = f"{100 * (pred - meas) / meas:+.1f}" if pred and meas else failed
        taken = r["prediction"].get("predicted_steps_taken_bytes")
        err2 = f"{100 * (taken - meas) / meas:+.1f}" if taken and meas else "-"
        lines.append(f"| {r['name']} | {s.get('steps', '-')} | {mib(pred)} | {mib(meas)} | {err} | {source} "
                     f"| {mib(taken)} | {err2} |")
    for r in (r for r in results if "ceiling_bytes" in r):
        s, ceiling = r.get("summary", {}), r["ceiling_bytes"]
        lines.append("")
        if "summary" not in r:
            lines.append(f"60 % ceiling case: run failed: {r.get('error')}")
        elif "memory_ceiling_bytes" not in s or "predicted_peak_bytes" not in s:
            lines.append(f"60 % ceiling case: NOT WIRED (summary.json has no predicted_peak_bytes/memory_ceiling_bytes"
                         f"); measured peak {mib(s['peak_rss_bytes'])} MiB vs ceiling {mib(ceiling)} MiB "
                         f"({'under' if s['peak_rss_bytes'] < ceiling else 'OVER'}) without planner caps")
        else:
            ok = s["peak_rss_bytes"] < s["memory_ceiling_bytes"]
            lines.append(f"60 % ceiling case: ceiling {mib(s['memory_ceiling_bytes'])} MiB, predicted "
                         f"{mib(s['predicted_peak_bytes'])} MiB, measured {mib(s['peak_rss_bytes'])} MiB: "
                         f"{'PASS (under the ceiling)' if ok else 'FAIL (over the ceiling)'}; "
                         f"batch {s.get('batch_size')}, notes {s.get('planner_notes', s.get('plan_notes', '-'))}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predict", help=argparse.SUPPRESS)
    ap.add_argument("--data")
    ap.add_argument("--val-data")
    ap.add_argument("--weights")
    ap.add_argument("--model", default=S14)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--only", help="comma-separated indices of CONFIGS to run (default: all)")
    ap.add_argument("--no-profile-case", action="store_true", help="skip the 60 %% ceiling ALaST case")
    ap.add_argument("--json-out", help="also write every result here")
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="print the table of a --json-out file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.predict:
        # Plan under the allocator the run trained on (the CLI's re-execution; it sets the baseline and the slack).
        from edge_alast.device.allocator import reexec_with_allocator

        warning = reexec_with_allocator(yaml.safe_load(Path(args.predict).read_text()).get("allocator", "auto"))
        if warning:
            print(warning, file=sys.stderr)
        print(json.dumps(predict(args.predict)))
        return 0
    if not (args.data and args.val_data):
        ap.error("--data and --val-data are required")

    configs = CONFIGS if not args.only else [CONFIGS[int(i)] for i in args.only.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_planner_") as tmp:
        work = Path(tmp)
        for c in configs:
            results.append(run_config(args, *c, work))
            r = results[-1]
            print(f"# {r['name']}: measured {mib(r.get('summary', {}).get('peak_rss_bytes'))} MiB, "
                  f"predicted {mib(r['prediction'].get('predicted_peak_bytes'))} MiB", file=sys.stderr, flush=True)

        full = next((r for r in results if r["name"].endswith("full") and "summary" in r), None)
        if not args.no_profile_case and full is not None:
            ceiling = int(0.6 * full["summary"]["peak_rss_bytes"])
            profile = yaml.safe_load((REPO / "device_profiles" / "laptop_cpu.yaml").read_text())
            profile.update(name="bench_60pct", memory_ceiling_bytes=ceiling,
                           description=f"laptop_cpu with a ceiling of 60 % of the measured {full['name']} peak")
            path = work / "bench_60pct.yaml"
            path.write_text(yaml.safe_dump(profile))
            _, margs, weights, img, batch, _ = next(c for c in CONFIGS if c[0] == full["name"])
            r = run_config(args, full["name"].replace("full", "alast") + " @60% ceiling", margs, weights, img, batch,
                           "alast", work, profile=str(path))
            r["ceiling_bytes"] = ceiling
            results.append(r)
    print(markdown(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
