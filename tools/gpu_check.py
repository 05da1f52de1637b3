"""The CUDA path, measured on a real GPU: one script that fits a short loan of a GPU machine.

    python tools/gpu_check.py --data DIR/train --val-data DIR/val --weights vit_s.safetensors --out results/gpu

Each training run is its own process (``python -c`` calling :func:`edge_alast.train`), so each
``torch.cuda.max_memory_allocated`` and peak RSS is that run's alone. Sections, each timed and skipped with a note
once ``--budget-seconds`` is spent:

1. ``env``: torch/timm/onnxruntime builds, the GPU, onnxruntime's execution providers.
2. ``steps``: full vs alast at 224 px, fp32 and bf16: steady step time, ``torch.cuda.max_memory_allocated``.
3. ``jetson``: the planner's prediction against the measured figure under a Jetson profile, with the CUDA allocator
   capped (``torch.cuda.set_per_process_memory_fraction``) to the profile's ceiling minus the process RSS: on a
   Jetson CPU and GPU share one memory, so the process's RSS and the CUDA allocations share the ceiling.
4. ``compile``: a plain timm training step, eager vs ``torch.compile``, bf16: step time and compile time.
5. ``predict``: ``edge-alast predict --provider cuda`` on an exported run, where onnxruntime has a CUDA provider.

Writes ``OUT/gpu_check.json`` after every section and prints a markdown table at the end (``--markdown`` re-renders
it from the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUN = r"""
import json, sys, resource
import torch
from edge_alast import TrainConfig, train
from edge_alast.training import run as _run
if {unified}:  # a Jetson profile on a discrete GPU: the trainer caps the allocator as on unified memory
    from edge_alast.device.memory import cap_cuda_memory
    def _unified_cap(ceiling):
        cap = cap_cuda_memory(ceiling, unified=True)
        print("CAP " + str(cap), flush=True)
        return cap
    _run._cap_cuda_allocator = _unified_cap
config = TrainConfig.from_dict(json.loads(sys.argv[1]), source="gpu_check")
result = train(config)
s = result.summary
s["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("SUMMARY " + json.dumps(s, default=str))
"""


def run_train(config: dict, cap: int | None = None, timeout: float = 300) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RUN.format(unified=bool(cap)), json.dumps(config)], capture_output=True,
                          text=True, timeout=timeout)
    wall = time.monotonic() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-1500:], "wall_seconds": wall}
    summary = json.loads(line[len("SUMMARY "):])
    summary["wall_seconds"] = wall
    cap_line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CAP ")), None)
    summary["cuda_cap_bytes"] = int(cap_line.split()[1]) if cap_line else None
    return summary


def section_env() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    try:
        from edge_alast import _compat  # noqa: F401  (torchvision's CPU import fix, before timm)
        import timm

        info["timm"] = timm.__version__
    except ImportError as e:
        info["timm"] = f"missing: {e}"
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    except ImportError as e:
        info["onnxruntime"] = f"missing: {e}"
    doctor = subprocess.run([sys.executable, "-m", "edge_alast.cli", "doctor", "--json"], capture_output=True,
                            text=True, timeout=300)
    try:
        info["doctor"] = json.loads(doctor.stdout)
    except ValueError:
        info["doctor"] = {"exit": doctor.returncode, "stderr_tail": doctor.stderr[-800:]}
    return info


def base_config(args, out: Path, **overrides) -> dict:
    config = {"data": args.data, "val_data": args.val_data, "out": str(out), "weights": args.weights,
              "img_size": args.img_size, "batch_size": 16, "steps": args.steps, "lr": 3e-5, "device": args.device,
              "eval_images": 256, "export": False, "checkpoint_every_seconds": None, "resume": False, "seed": 0}
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--val-data")
    ap.add_argument("--weights")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the plumbing (no cap, no compile)")
    ap.add_argument("--budget-seconds", type=float, default=420)
    ap.add_argument("--sections", default="env,steps,jetson,compile,predict")
    ap.add_argument("--markdown", action="store_true", help="only render OUT/gpu_check.json as markdown")
    args = ap.parse_args(argv)
    path = args.out / "gpu_check.json"
    if args.markdown:
        print(render(json.loads(path.read_text())))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results: dict = {"notes": []}
    runs = args.out / "runs"

    def over_budget(name: str) -> bool:
        spent = time.monotonic() - t_start
        if spent > args.budget_seconds:
            results["notes"].append(f"{name}: skipped, {spent:.0f} s of the {args.budget_seconds:.0f} s budget spent")
            return True
        return False

    def save() -> None:
        path.write_text(json.dumps(results, indent=1, default=str))

    wanted = args.sections.split(",")
    if "env" in wanted:
        results["env"] = section_env()
        save()
        print(json.dumps(results["env"], default=str)[:2000], flush=True)
    if "steps" in wanted:
        results["steps"] = []
        for precision in ("bf16", "fp32"):
            for method in ("full", "alast"):
                if over_budget(f"steps {method} {precision}"):
                    continue
                s = run_train(base_config(args, runs / f"{method}-{precision}", method=method, precision=precision))
                row = {"method": method, "precision": precision, **_pick(s)}
                results["steps"].append(row)
                save()
                print(json.dumps(row), flush=True)
        for method in ("full", "alast"):  # batch 64: activations dominate
            if over_budget(f"steps {method} bf16 b64"):
                continue
            s = run_train(base_config(args, runs / f"{method}-bf16-b64", method=method, precision="bf16",
                                      batch_size=64))
            row = {"method": method, "precision": "bf16", **_pick(s)}
            results["steps"].append(row)
            save()
            print(json.dumps(row), flush=True)
    if "jetson" in wanted:
        results["jetson"] = []
        from edge_alast.device.profiles import load_profile

        for profile_name, method in (("jetson_orin_nano_8gb", "alast"), ("jetson_orin_nano_8gb", "full"),
                                     ("jetson_orin_nano_4gb", "alast")):
            profile = load_profile(profile_name)
            if True:
                if over_budget(f"jetson {profile_name} {method}"):
                    continue
                s = run_train(base_config(args, runs / f"{profile_name}-{method}", method=method,
                                          profile=profile_name, device=None if args.device == "cuda" else "cpu",
                                          precision=None, batch_size=None),
                              cap=profile.memory_ceiling_bytes if args.device == "cuda" else None)
                row = {"profile": profile_name, "method": method, "ceiling_bytes": profile.memory_ceiling_bytes,
                       **_pick(s)}
                results["jetson"].append(row)
                save()
                print(json.dumps(row), flush=True)
    if "compile" in wanted and not over_budget("compile"):
        results["compile"] = compile_probe()
        save()
        print(json.dumps(results["compile"]), flush=True)
    if "predict" in wanted and not over_budget("predict"):
        results["predict"] = predict_probe(args, runs)
        save()
        print(json.dumps(results["predict"])[:1500], flush=True)
    results["wall_seconds"] = time.monotonic() - t_start
    save()
    print(render(results))
    return 0


def _pick(s: dict) -> dict:
    if "error" in s:
        return {"error": s["error"], "stderr_tail": s.get("stderr_tail", "")[-600:]}
    keys = ("steps", "batch_size", "precision", "mean_step_seconds", "cuda_max_memory_allocated_bytes",
            "train_peak_rss_bytes", "peak_rss_bytes", "ru_maxrss_bytes", "predicted_peak_bytes",
            "predicted_train_peak_bytes", "memory_ceiling_bytes", "train_flops_per_step", "val_accuracy",
            "budgets", "planner_notes", "wall_seconds", "cuda_cap_bytes")
    return {k: s.get(k) for k in keys}


def compile_probe(steps: int = 20) -> dict:
    """A plain timm ViT-S/14 training step at 224 px, batch 16, bf16 autocast: eager against torch.compile."""
    from edge_alast import _compat  # noqa: F401
    import timm
    import torch

    out = {}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=10, img_size=224).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-5)
        fn = torch.compile(model) if mode == "compile" else model
        x = torch.randn(16, 3, 224, 224, device="cuda")
        y = torch.randint(0, 10, (16,), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        times = []
        t_first = None
        for i in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(fn(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if i == 0:
                t_first = dt
            else:
                times.append(dt)
        times.sort()
        out[mode] = {"first_step_seconds": t_first, "median_step_seconds": times[len(times) // 2],
                     "cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated()}
        del model, opt, fn
        torch.cuda.empty_cache()
    return out


def predict_probe(args, runs: Path) -> dict:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    result = {"providers": providers}
    run_dir = runs / "alast-bf16"
    if not (run_dir / "model.safetensors").exists():
        result["note"] = "no finished run to export"
        return result
    exp = subprocess.run([sys.executable, "-m", "edge_alast.cli", "export", str(run_dir), "--val-data", args.val_data,
                          "--json"], capture_output=True, text=True, timeout=300)
    result["export_exit"] = exp.returncode
    result["export_tail"] = (exp.stdout + exp.stderr)[-800:]
    images = sorted(Path(args.val_data).rglob("*.png"))[:8]
    for provider in ("cuda", "cpu"):
        proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "predict", str(run_dir / "model.onnx"),
                               *map(str, images), "--json", "--provider", provider], capture_output=True, text=True,
                              timeout=300)
        result[provider] = {"exit": proc.returncode, "tail": (proc.stdout + proc.stderr)[-600:]}
    return result


def render(results: dict) -> str:
    lines = []
    env = results.get("env", {})
    if env:
        lines.append(f"GPU: {env.get('gpu')} ({env.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB), torch "
                     f"{env.get('torch')} (CUDA {env.get('cuda')}), timm {env.get('timm')}, onnxruntime "
                     f"{env.get('onnxruntime')} {env.get('ort_providers')}")
        lines.append("")
    if results.get("steps"):
        lines += ["| method | precision | batch | s/step | cuda max allocated MiB | peak RSS MiB | GFLOPs/step |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in results["steps"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['precision']} | | error: {r['error']} | | | |")
                continue
            lines.append(f"| {r['method']} | {r['precision']} | {r['batch_size']} | {r['mean_step_seconds']:.4f} | "
                         f"{r['cuda_max_memory_allocated_bytes'] / 2**20:.0f} | {r['train_peak_rss_bytes'] / 2**20:.0f} "
                         f"| {r['train_flops_per_step'] / 1e9:.1f} |")
        lines.append("")
    if results.get("jetson"):
        lines += ["| profile | method | ceiling MiB | predicted MiB | measured RSS + CUDA MiB | error | precision "
                  "| batch | s/step |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in results["jetson"]:
            if "error" in r:
                lines.append(f"| {r['profile']} | {r['method']} | | | error: {r['error']} | | | | |")
                continue
            measured = r["train_peak_rss_bytes"] + r["cuda_max_memory_allocated_bytes"]
            predicted = r.get("predicted_train_peak_bytes") or r.get("predicted_peak_bytes")
            err = f"{(predicted - measured) / measured:+.1%}" if predicted else "-"
            lines.append(f"| {r['profile']} | {r['method']} | {r['ceiling_bytes'] / 2**20:.0f} | "
                         f"{(predicted or 0) / 2**20:.0f} | {measured / 2**20:.0f} | {err} | {r['precision']} | "
                         f"{r['batch_size']} | {r['mean_step_seconds']:.4f} |")
        lines.append("")
    if results.get("compile"):
        c = results["compile"]
        lines += ["| plain timm step, bf16, b16 | first step s | median step s | cuda max MiB |", "|---|---:|---:|---:|"]
        for mode, r in c.items():
            lines.append(f"| {mode} | {r['first_step_seconds']:.2f} | {r['median_step_seconds']:.4f} | "
                         f"{r['cuda_max_memory_allocated_bytes'] / 2**20:.0f} |")
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
