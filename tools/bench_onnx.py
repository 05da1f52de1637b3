"""Benchmark a run's deployment paths: ONNX Runtime vs PyTorch inference latency (batch 1 and 16), and ONNX Runtime
training vs PyTorch training step time with the same trainable parameters (the ORT artifacts' ``requires_grad``).

Medians of ``--runs`` timed runs after ``--warmup`` untimed ones, on random inputs; prints a markdown table.
Exports ``model.onnx`` / ``ort_training/`` first when the run folder lacks them. Run on a quiet machine.

    python tools/bench_onnx.py runs/a --runs 20 --threads 4 --json-out runs/a-onnx.json
    python tools/bench_onnx.py --markdown runs/a-onnx.json   # the table again, running nothing
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edge_alast.deploy.export import ONNX_FILE, export_run  # noqa: E402
from edge_alast.deploy.ort_training import ARTIFACTS_DIR, META_FILE, generate_training_artifacts, training_api  # noqa: E402
from edge_alast.deploy.predict import session  # noqa: E402
from edge_alast.runfolder import load_run_model  # noqa: E402


def median_seconds(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inference_rows(run: Path, model, img_size: int, runs: int, warmup: int, threads: int | None) -> list[tuple]:
    sess = session(run / ONNX_FILE, threads)
    name = sess.get_inputs()[0].name
    rows = []
    for batch in (1, 16):
        x = torch.randn(batch, 3, img_size, img_size)
        xn = x.numpy()
        with torch.inference_mode():
            t_torch = median_seconds(lambda: model(x), runs, warmup)
        t_ort = median_seconds(lambda: sess.run(None, {name: xn}), runs, warmup)
        rows.append((f"inference, batch {batch}", t_torch, t_ort))
    return rows


def training_row(run: Path, model, img_size: int, classes: int, batch: int, runs: int, warmup: int,
                 lr: float) -> tuple:
    folder = run / ARTIFACTS_DIR
    info = json.loads((folder / META_FILE).read_text())
    trainable = set(info["requires_grad"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, img_size, img_size), dtype=np.float32)
    y = rng.integers(0, classes, size=batch).astype(np.int64)

    model.train()
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
        if n in trainable:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def torch_step():
        loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = api.Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"))
    optimizer = api.Optimizer(str(folder / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(lr)
    module.train()

    def ort_step():
        module(x, y)
        optimizer.step()
        module.lazy_reset_grad()

    label = f"train step, batch {batch} (blocks {info['trainable_blocks']} + head)"
    return label, median_seconds(torch_step, runs, warmup), median_seconds(ort_step, runs, warmup)


def markdown(results: dict) -> str:
    """The table of a ``--json-out`` file: median milliseconds in PyTorch and ONNX Runtime per row."""
    lines = [f"{results['model']} @ {results['img_size']}px, {results['classes']} classes; median of {results['runs']} "
             f"runs after {results['warmup']} warm-up, threads {results['threads'] or 'default'}\n",
             "| what | PyTorch ms | ONNX Runtime ms | PyTorch / ORT |", "|---|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['what']} | {r['torch_seconds'] * 1e3:.2f} | {r['ort_seconds'] * 1e3:.2f} | "
                     f"{r['torch_seconds'] / r['ort_seconds']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--json-out", type=Path, help="also write the figures here (for --markdown)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="print the table of a --json-out file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.run_dir is None:
        parser.error("RUN_DIR is required")

    run = args.run_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (run / ONNX_FILE).is_file():
        export_run(run)
    if not (run / ARTIFACTS_DIR / META_FILE).is_file():
        generate_training_artifacts(run)
    model, meta = load_run_model(run)
    rows = inference_rows(run, model, meta["img_size"], args.runs, args.warmup, args.threads)
    rows.append(training_row(run, model, meta["img_size"], len(meta["classes"]), args.train_batch_size,
                             args.runs, args.warmup, args.lr))

    results = {"model": meta["model_name"], "img_size": meta["img_size"], "classes": len(meta["classes"]),
               "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
               "rows": [{"what": label, "torch_seconds": t_torch, "ort_seconds": t_ort}
                        for label, t_torch, t_ort in rows]}
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
