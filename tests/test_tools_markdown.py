"""Every benchmark tool prints its table again from its results file (``--markdown FILE``), running nothing: the
tables in docs/ are regenerated this way. Each case is a tiny fake results file in the tool's own format."""
from __future__ import annotations

import importlib
import json
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "tools"))

MiB = 2**20


def summary(acc, step_s, peak_mib, gflops, **extra):
    return {"val_accuracy": acc, "median_step_seconds": step_s, "mean_step_seconds": step_s,
            "peak_rss_bytes": peak_mib * MiB, "train_flops_per_step": gflops * 1e9, **extra}


def tta_run(seed, accs, ended="plateau", budget=None):
    evals = [{"step": 25 * (i + 1), "val_accuracy": a, "elapsed_seconds": 10.0 * (i + 1), "flops_total": 1e12 * (i + 1),
              "val_images": 1000} for i, a in enumerate(accs)]
    config = {"model": "vit_small_patch14_dinov2", "img_size": 112, "batch_size": 16, "eval_every": 25,
              "eval_images": 1000, "seed": seed}
    protocol = {"window": 2, "patience": 1, "min_gain": 0.005, "stop_at_plateau": True, "budget_flops": budget}
    return {"key": {"config": config, "protocol": protocol, "code": {"commit": "9061aa5" + "0" * 33, "dirty": False}},
            "config": config, "evals": evals, "ended": ended, "stop_index": len(accs) - 1, "steps": 25 * len(accs),
            "peak_rss_bytes": 800 * MiB, "flops_per_step": 70e9}


def fleet_results():
    node = {"node": "node0", "images": 200, "per_class": {"a": 150, "b": 50}}
    fed = {"val_accuracy_per_round": [{"val_accuracy": 0.1}, {"val_accuracy": 0.466}, {"val_accuracy": 0.546}],
           "bytes_per_round": [{"up": 4 * MiB, "down": 4 * MiB}], "node_peak_rss_bytes": {"node0": 840 * MiB},
           "steps": 40, "bench": {"run_seconds": 710.0, "status": "finished", "killed_at_s": 12.0},
           "payload": {"tensors": 100, "params": 594442, "tensor_bytes": 2.27 * MiB, "model_bytes": 84.5 * MiB},
           "partition": {"nodes": [node]}, "nodes_per_round": [{"round": 1, "ok": 1, "sent": 1}],
           "rounds_completed": 2}
    return {"setup": {"nodes": 1, "rounds": 2, "steps": 10, "partition": "iid", "img_size": 112, "batch_size": 16,
                      "lr": 1e-3},
            "federated": {"alast-lora": fed},
            "central": {"alast-lora": {"curve": [0.706, 0.688], "steps": 20, "wall_seconds": 458.0,
                                       "peak_rss_bytes": 697 * MiB}},
            "local": {"alast-lora": [{"curve": [0.337, 0.46], "steps": 20, "wall_seconds": 523.0,
                                      "peak_rss_bytes": 701 * MiB, "val_accuracy": 0.46}]},
            "faults": {"node": fed}}


def attack_results():
    def run(accs, attacker, left_out=None):
        return {"val_accuracy_per_round": [{"val_accuracy": a} for a in accs], "rejections_per_node": left_out or {},
                "bench": {"attacker": attacker}}

    return {"setup": {"nodes": 4, "rounds": 2, "steps": 10, "partition": "dirichlet:0.5", "img_size": 56,
                      "attacker": "node3", "attack_scale": -10.0, "attack_clip": 1.85},
            "federated": {}, "central": {}, "local": {}, "faults": {},
            "attack": {"clean": run([0.5, 0.64], None), "fedavg": run([0.1, 0.1], "node3"),
                       "fedmedian": run([0.3, 0.45], "node3", {"node3": 1})}}


def update_results():
    def step(i, decision, seen, first, cand, cur):
        return {"update": i, "data": {"classes": [6, 7], "per_class": 50, "domain": "clean"},
                "exit_code": 0 if decision == "published" else 4, "decision": decision,
                "reasons": [] if decision == "published" else ["holdout accuracy 0.2500 is below current's 0.5125"],
                "holdout": {"candidate": {"accuracy": cand, "old_accuracy": 0.0}, "current": {
                    "accuracy": cur, "old_accuracy": 0.68, "images": 80}},
                "process": {"wall_seconds": 70.4, "cpu_seconds": 23.8, "peak_rss_bytes": 853 * MiB,
                            "loadavg_before": 7.3, "loadavg_after": 7.6},
                "test": {"accuracy_seen": seen, "accuracy_first": first}}

    setup = {"img_size": 56, "steps": 30, "profile": "laptop_cpu", "replay_images": 200, "max_old_drop": 0.02,
             "class_max_old_drop": 1.0, "seed": 0, "test_images": 20, "init_method": "head", "init_steps": 60,
             "init_images": 40}
    return {"setup": setup, "code": {"commit": "0123456789abcdef", "edge_alast_tree": "fedcba9876543210",
                                     "dirty": None}, "host": "x86_64, 2 CPUs",
            "scenarios": {"class": {"init": {"test_accuracy_first": 0.725}, "sequences": {
                "alast+replay": {"updates": [step(1, "published", 0.556, 0.458, 0.5125, 0.5125)]},
                "alast, no replay": {"updates": [step(1, "kept", 0.544, 0.725, 0.25, 0.5125)]}}}}}


CASES = {
    "benchmark": ({"full": summary(0.658, 3.27, 2530, 596), "alast": summary(0.764, 1.79, 1541, 309)},
                  ["| method | val acc | Δ full (pts)", "| alast | 0.764 | +10.6 | 1.79 | 0.55 |"]),
    # full plateaus at 40 s / 4 TFLOPs (4 evaluations); final = mean of the last 2 evaluations (window 2). The
    # curve's moving average over 2 evaluations: at 50 % of full's time (20 s) alast has (0.70+0.80)/2 = 0.75; at
    # 100 % (40 s) (0.80+0.81)/2 = 0.805, and full (0.86+0.87)/2 = 0.865.
    "benchmark--setup": ({"_setup": {"model": "vit_small_patch14_dinov2", "img_size": 224, "batch_size": 16,
                                     "steps": 80, "lr": 3e-5, "precision": "fp32", "seed": 0, "set": [],
                                     "method_set": ["alast-lora:lr=0.001"], "allocator": "tcmalloc",
                                     "code": {"commit": "e2e46e8" + "0" * 33, "dirty": False}},
                          "full": summary(0.658, 3.27, 2530, 596), "alast": summary(0.764, 1.79, 1541, 309)},
                         ["allocator tcmalloc", "measured at `e2e46e8`", "| alast | 0.764 | +10.6 | 1.79 | 0.55 |"]),
    "bench_tta": ({"fmnist/full": [tta_run(0, [0.80, 0.85, 0.86, 0.87]), tta_run(1, [0.80, 0.85, 0.86, 0.87])],
                   "fmnist/alast-reference": [
                       {**tta_run(0, [0.70, 0.80, 0.80, 0.81, 0.83, 0.84], "budget", 6e12),
                        "final_val_accuracy": 0.85, "train_view": {"accuracy": 0.80}},
                       {**tta_run(1, [0.70, 0.80, 0.80, 0.81, 0.83, 0.84], "budget", 8e12),  # budget per seed
                        "final_val_accuracy": 0.85, "train_view": {"accuracy": 0.81}}]},
                  ["fmnist: vit_small_patch14_dinov2 @ 112px", "code 9061aa5.",
                   "full plateaus at 40 ± 0 training s, 4.0 ± 0.0 TFLOPs; budget for the others 7.0 ± 1.4 TFLOPs "
                   "(each seed's from its own full run)",
                   "| full | 0.865 ± 0.000 | plateau 2 | 100 ± 0 | 40 ± 0 | 4.0 ± 0.0 |",
                   "| alast-reference | 0.835 ± 0.000 | budget 2 | 150 ± 0 | 60 ± 0 | 6.0 ± 0.0 |",
                   "| alast-reference | 0.700 ± 0.000 | 0.750 ± 0.000 | 0.805 ± 0.000 |",
                   "| full | 0.800 ± 0.000 | 0.825 ± 0.000 | 0.865 ± 0.000 | 0.800",
                   # the train-view table: all tokens 0.85, training-time view 0.80 and 0.81 -> gaps +5.0, +4.0
                   "| alast-reference | 0.850 ± 0.000 | 0.805 ± 0.007 | +4.5 ± 0.7 |",
                   "| alast-reference | 2 | 0.750 | 0.835 | 0.000 |", "**Default: alast-reference** (best accuracy",
                   # the rule chose among the candidates that ran: the others are named
                   "not run here: alast-coauthors, alast-relative, static, alast-anneal)."]),
    "bench_allocators": ({"full@glibc": {"peak_rss_bytes": 2560 * MiB, "median_step_seconds": 2.38},
                          "full@tcmalloc": {"peak_rss_bytes": 2065 * MiB, "median_step_seconds": 2.47, "slack": 0.07}},
                         ["| full | glibc | 2560 | 1.00 |", "| full | tcmalloc | 2065 | 0.81 |"]),
    "bench_ceiling": ({"setup": {"img_size": 224, "batch_size": 16, "steps": 20, "export": True},
                       "full": {"peak_rss_bytes": 2040 * MiB, "allocator": "tcmalloc"},
                       "rows": [{"fraction": 0.6, "method": "alast", "ceiling_bytes": 1224 * MiB, "exit": 0,
                                 "oom_kills": 0, "complete": True, "tail": "",
                                 "summary": {"peak_rss_bytes": 978 * MiB, "predicted_peak_bytes": 1117 * MiB,
                                             "planner_notes": ["recompute blocks 0-8"]}}]},
                      ["full's whole-process peak 2040 MiB",
                       "| alast | 1224 (0.60) | 0 | 0 | yes | 978 | 1117 | +14.2"]),
    "bench_fleet": (fleet_results(), ["| federated alast-lora | 0.100 | 0.466 | 0.546 |",
                                      "| centralised alast-lora | – | 0.706 | 0.688 |", "594,442",
                                      "| node killed at 12 s | finished, 2 rounds |"]),
    "bench_fleet--attack": (attack_results(), ["node3 sends its update x -10.0 every round",
                                                "| FedAvg (clean fleet) | – | 0.500, 0.640 | 0.640 | – | none |",
                                                "| FedAvg | node3 | 0.100, 0.100 | 0.100 | -0.540 | none |",
                                                "| FedMedian | node3 | 0.300, 0.450 | 0.450 | -0.190 | node3: 1 |"]),
    "bench_overhead": ({"setup": {"model": "vit_small_patch14_dinov2", "img_size": 224, "batch_size": 16, "threads": 2,
                                  "allocator": "tcmalloc", "steps": 4, "warmup": 1, "pairs": 1, "methods": ["full"],
                                  "commit": "abc1234"},
                        "runs": [{"kind": "plain", "pair": 0, "rows": [
                                     {"wall": w, "forward": 1.0, "backward": 2.0, "optimizer": 0.5} for w in
                                     (9.0, 3.5, 3.6, 3.7)]},
                                 {"kind": "full", "pair": 0, "rows": [
                                     {"wall": w, "data": 0.01, "compute": 3.6, "in_step_rest": 0.05,
                                      "outside_step": 0.04} for w in (None, 3.8, 3.7, 3.9)]}]},
                       ["at `abc1234`", "| plain | 3.600 | 0.000 | 3.500 | 0.000 | 0.000 | 1.000 (1.000–1.000) |",
                        "| full | 3.800 | 0.010 | 3.600 | 0.050 | 0.040 | 1.056 (1.056–1.056) |"]),
    # eager 1.6 s; compiled: a 10.5 s first step, then 1.5 s -> compile 15 - 4 x 1.5 = 9 s; saves 0.1 x 200 = 20 s
    "bench_compile": ({"setup": {"model": "vit_small_patch14_dinov2", "img_size": 112, "batch_size": 16, "threads": 1,
                                 "allocator": "tcmalloc", "steps": 4, "pairs": 1, "methods": ["full"],
                                 "typical_steps": 200, "warm_cache": False,
                                 "code": {"commit": "4ffda93" + "0" * 33, "dirty": False}},
                       "runs": [{"kind": "full:compile=off", "pair": 0, "rows": [{"step": 1.6}] * 4,
                                 "summary": {"compile": {"graphs": 0}, "train_peak_rss_bytes": 1000 * MiB}},
                                {"kind": "full:compile=on", "pair": 0,
                                 "rows": [{"step": 10.5}] + [{"step": 1.5}] * 3,
                                 "summary": {"compile": {"graphs": 11}, "train_peak_rss_bytes": 1070 * MiB}}]},
                      ["an empty inductor cache per compiled run", "code 4ffda93",
                       "| full | 1.600 | 1.500 | 0.938 | 9 | 11 | 1000 | 1070 | yes |"]),
    "bench_onnx": ({"model": "vit_small_patch14_dinov2", "img_size": 224, "classes": 10, "runs": 10, "warmup": 3,
                    "threads": 2, "rows": [{"what": "inference, batch 16", "torch_seconds": 0.8791,
                                            "ort_seconds": 1.1436}]},
                   ["| inference, batch 16 | 879.10 | 1143.60 | 0.77x |"]),
    "bench_images": ({"count": 120, "img_size": 224, "png_short_side": 256, "parity": 0.01,
                      "jpeg": {"files": 120, "mb": 59, "mp": 3.0, "old": 1.70, "new": 0.015, "full": 22.1,
                               "draft": 81.3, "diff": 0.0052},
                      "png": {"files": 120, "mb": 15, "mp": 0.1, "old": 0.35, "new": 0.005, "full": 156.3,
                              "draft": 177.5, "diff": 0.0}},
                     ["| scan, full decode of every file (before) | 1.70 s (14.2 ms/file)",
                      "| load_image, JPEG draft (now) | 81.3 img/s |"]),
    "bench_loader": ({"setup": {"model": "vit_small_patch14_dinov2", "steps": 15, "warmup": 3, "repeat": 2, "cpus": 2,
                                "per_class": 20, "aug_steps": 60},
                      "steps": [{"kind": "jpeg", "augment": "none", "prefetch": False, "median": 1.423, "mean": 1.45,
                                 "medians": [1.423, 1.508]},
                                {"kind": "png", "augment": "none", "prefetch": False, "median": 1.421, "mean": 1.43,
                                 "medians": [1.426, 1.421]}],
                      "augment": [{"augment": "flip", "seed": s, "val_accuracy": a, "summary": {"val_loss": 1.2}}
                                  for s, a in ((0, 0.606), (1, 0.538))]},
                     ["| JPEG 2–4 MP | none | in the step (`--loader-threads 0`) | 1.423 |", "| flip | 0.572 ±"]),
    "bench_planner": ([{"name": "S/14 112 b16 full", "prediction": {"predicted_peak_bytes": 1100 * MiB},
                        "summary": {"steps": 12, "peak_rss_bytes": 1000 * MiB}},
                       {"name": "S/14 112 b16 alast @60% ceiling", "prediction": {}, "ceiling_bytes": 600 * MiB,
                        "summary": {"peak_rss_bytes": 550 * MiB, "memory_ceiling_bytes": 600 * MiB,
                                    "predicted_peak_bytes": 580 * MiB}}],
                      ["| S/14 112 b16 full | 12 | 1100 | 1000 | +10.0 | bench |",
                       "60 % ceiling case: ceiling 600 MiB, predicted 580 MiB, measured 550 MiB: PASS"]),
    "bench_update": (update_results(), ["Measured with edge_alast/ as of commit `0123456789`",
                                        "| init | classes 0-5 | 72.5 / 72.5 |",
                                        "| u1 | +6,7 x 50, clean | 55.6 / 45.8 P | 54.4 / 72.5 k |",
                                        "| alast, no replay | u1 | kept (4): holdout accuracy 0.2500 is below",
                                        "| 25.0 / 51.2 | 0.0 / 68.0 | 80 | 54.4 | 72.5 | 70 | 24 | 853 | 7.3–7.6 |",
                                        "2 processes (updates, first runs, store inits): 2 min wall, 1 min CPU"]),
}


@pytest.mark.parametrize("tool", sorted(CASES))
def test_markdown_renders_results_file(tool, tmp_path, capsys):
    results, expected = CASES[tool]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    importlib.import_module(tool.split("--")[0]).main(["--markdown", str(path)])
    printed = capsys.readouterr().out
    for cell in expected:
        assert cell in printed, f"{tool}: {cell!r} not in\n{printed}"


def test_bench_images_hostile_markdown_renders_every_run_as_a_column(tmp_path, capsys):
    def row(image, size, mib, outcome):
        return {"image": image, "img_size": size, "file_bytes": 512, "above_baseline_bytes": mib * MiB,
                "outcome": outcome}

    before = {"label": "before (main)", "commit": "abc1234", "rows": [
        row("tall-thin 1x100000", 32, 577, "decoded to (3, 32, 32)"),
        row("tall-thin 1x100000", 224, 2839, "MemoryError (address space capped at 3072 MiB above the baseline)")]}
    after = {"label": "this branch", "commit": "def5678", "rows": [
        row("tall-thin 1x100000", 32, 0, "refused by the scan: image of 1 x 100000 pixels has aspect ratio 1e+05, "
                                         "over the limit of 20 (--max-aspect-ratio)")]}
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps({"runs": [before, after]}))
    importlib.import_module("bench_images").main(["--markdown", str(path)])
    printed = capsys.readouterr().out
    for cell in ("| image | file | px | before (main) (`abc1234`) | this branch (`def5678`) |",
                 "| tall-thin 1x100000 | 0.5 KiB | 32 | 577: decoded | 0: refused (aspect ratio) |",
                 "| tall-thin 1x100000 | 0.5 KiB | 224 | 2839: MemoryError at the cap | – |"):
        assert cell in printed, f"{cell!r} not in\n{printed}"


@pytest.mark.parametrize("results", sorted(p.name for p in (REPO / "docs" / "results").glob("tta_*.json")))
def test_every_time_to_accuracy_table_in_the_docs_is_the_tools_rendering_of_its_results_file(results):
    """docs/benchmarks.md shows each committed time-to-accuracy results file as bench_tta prints it: every table
    row and the default's line, verbatim. A figure typed or edited by hand, or a table left behind when the tool
    changed how it renders (the seed-0 section kept 'max' for a fixed-length run), fails here."""
    import bench_tta

    docs = (REPO / "docs" / "benchmarks.md").read_text()
    printed = bench_tta.markdown(json.loads((REPO / "docs" / "results" / results).read_text()))
    lines = [line for line in printed.splitlines() if line.startswith(("|", "**Default", "**No default"))]
    assert lines and not [line for line in lines if line not in docs], results
