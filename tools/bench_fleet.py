"""Benchmark fleets: federated vs local-only vs centralised training at equal total steps, plus fault runs.

One training folder is split among --nodes nodes (--partition, seeded, as ``edge-alast fleet local`` splits it);
every run is evaluated on the same held-out folder:

- ``fed-METHOD``: a real federation (Flower SuperLink + SuperNodes on 127.0.0.1), --rounds rounds of --steps steps
  per node; global accuracy after each round, bytes per round, wall time, each node's peak RSS.
- ``central-METHOD``: ``edge-alast train`` on the union for rounds x steps x nodes steps (the fleet's total), with
  ``--eval-every steps x nodes`` on the whole held-out folder (the accuracy at each round's worth of steps).
- ``local-METHOD``: each node alone on its own share for rounds x steps steps (its share of the total), evaluated
  every --steps steps on the held-out folder.
- ``--faults node,server`` (federated, first method): node 1 SIGKILLed mid-round 2 and restarted at once (it
  rejoins); the SuperLink and ServerApp SIGKILLed mid-round 3, restarted, the run resubmitted (it resumes from the
  round-2 checkpoint).
- ``--attack`` (federated, first method, TLS + node authentication on 127.0.0.1): a clean fleet, then the same
  fleet with one node (--attacker) sending its update scaled by --attack-scale every round, aggregated by FedAvg,
  by FedAvg with each update clipped to --attack-clip, and by Flower's FedMedian. Final accuracy of each against the
  clean run, and what the server left out per node.

Each finished run is kept in --workdir (rerunning skips it). Prints markdown tables; --json-out writes the figures.

    python tools/make_fashion_mnist.py runs/fm-fleet --train 800 --val 500
    python tools/bench_fleet.py --data runs/fm-fleet/train --val-data runs/fm-fleet/val \\
        --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors --workdir runs/bench-fleet \\
        --json-out runs/bench-fleet/results.json
    python tools/bench_fleet.py --markdown runs/bench-fleet/results.json   # the tables again, running nothing
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from edge_alast.runfolder import METRICS_FILE, SUMMARY_FILE, read_json, read_metrics

ALAST_METHODS = ("alast", "alast-lora")


def train_keys(args, method: str) -> dict:
    keys = {"model": args.model, "weights": str(Path(args.weights).resolve()), "img_size": args.img_size,
            "batch_size": args.batch_size, "lr": args.lr, "method": method, "precision": "fp32", "seed": args.seed}
    if method in ALAST_METHODS and args.alpha is not None:
        keys["alast"] = {"alpha": args.alpha}
    return keys


# ---------------------------------------------------------------------------------------------- federated runs
def federated(args, method: str, name: str, fault: str | None = None) -> dict:
    """One federation (optionally with a fault injected); returns the server summary plus wall times."""
    from edge_alast.fleet.local import LocalFleet, prepare_local

    out = args.workdir / name
    result_file = args.workdir / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    plan = prepare_local(out=str(out), data=args.data, val_data=args.val_data, nodes=args.nodes, rounds=args.rounds,
                         train={**train_keys(args, method), "steps": args.steps}, partition=args.partition,
                         node_profiles=args.node_profiles.split(",") if args.node_profiles else None,
                         fleet={"export": False})
    events = {"fault": fault}
    t0 = time.monotonic()
    with LocalFleet(plan.out, plan.nodes, threads=plan.threads) as fleet:
        fleet.start()
        t_run = time.monotonic()
        run_id = fleet.submit(plan.app_dir, plan.run_config)
        rounds_file = plan.out / "rounds.jsonl"

        def rounds_done() -> int:
            try:
                return max(0, len(rounds_file.read_text().splitlines()) - 1)
            except FileNotFoundError:
                return 0

        def wait(cond, what, timeout=900):
            end = time.monotonic() + timeout
            while not cond():
                if time.monotonic() > end:
                    raise SystemExit(f"{name}: timed out waiting for {what}")
                time.sleep(0.1)

        if fault == "node":  # node 1 loses power in round 2, comes back at once
            wait(lambda: rounds_done() >= 1 and fleet.clientapp_running(1), "round 2 on node 1")
            time.sleep(2.0)
            fleet.kill("node1")
            events["killed_at_s"] = time.monotonic() - t_run
            fleet.start_node(1)
        elif fault == "server":  # the server loses power in round 3
            wait(lambda: rounds_done() >= 2 and fleet.clientapp_running(0), "round 3 on node 0")
            time.sleep(2.0)
            fleet.kill("superlink")
            events["killed_at_s"] = time.monotonic() - t_run
            events["checkpoint_rounds_at_kill"] = rounds_done()
            t_restart = time.monotonic()
            fleet.start_superlink()
            events["nodes_back_s"] = fleet.wait_nodes_online(args.nodes, supervise=True)
            fleet.stop_run(run_id)
            run_id = fleet.submit(plan.app_dir, plan.run_config)
            events["restart_to_resubmit_s"] = time.monotonic() - t_restart
        status = fleet.wait_run(run_id, timeout=7200)
        events["run_seconds"] = time.monotonic() - t_run
        events["status"] = status.get("status")
        fleet.save_run_log(run_id)
    events["wall_seconds"] = time.monotonic() - t0
    summary = read_json(plan.out / SUMMARY_FILE)
    summary["bench"] = events
    summary["partition"] = plan.partition
    result_file.write_text(json.dumps(summary, indent=1))
    return summary


ATTACK_RUNS = {  # name -> (run-config keys, poisoned)
    "clean": ({}, False),
    "fedavg": ({}, True),
    "clip": ({"clip-norm": None}, True),  # None: --attack-clip
    "fedmedian": ({"strategy": "fedmedian"}, True),
}


def attacked(args, method: str, kind: str) -> dict:
    """One federation over TLS + node authentication (``fleet local --tls``), poisoned or clean; its summary."""
    from edge_alast.fleet.local import prepare_local, run_local

    keys, poisoned = ATTACK_RUNS[kind]
    keys = {k: (args.attack_clip if v is None else v) for k, v in keys.items()}
    name = f"attack-{method}-{kind}"
    result_file = args.workdir / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out = args.workdir / name
    plan = prepare_local(out=str(out), data=args.data, val_data=args.val_data, nodes=args.nodes, rounds=args.rounds,
                         train={**train_keys(args, method), "steps": args.steps}, partition=args.partition,
                         fleet={"export": False, **keys}, tls=True, keys=str(args.workdir / "keys"),
                         faults={args.attacker: f"scale:{args.attack_scale}"} if poisoned else None)
    t0 = time.monotonic()
    run_local(plan, timeout=7200)
    summary = read_json(plan.out / SUMMARY_FILE)
    summary["bench"] = {"kind": kind, "run_keys": keys, "wall_seconds": time.monotonic() - t0,
                        "attacker": args.attacker if poisoned else None, "scale": args.attack_scale}
    result_file.write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------- single-process runs
def train_run(args, name: str, keys: dict, data: str, steps: int, eval_every: int) -> dict:
    """``edge-alast train`` in its own process; returns accuracy at each eval point, wall time, peak RSS."""
    result_file = args.workdir / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out = args.workdir / name
    val_images = sum(1 for p in Path(args.val_data).rglob("*") if p.is_file())
    config = {**keys, "data": data, "val_data": args.val_data, "out": str(out), "steps": steps,
              "eval_every": eval_every, "eval_images": val_images, "export": False, "resume": False}
    cfg_path = args.workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edge_alast.cli", "train", "--config", str(cfg_path), "--json"],
                          capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = read_json(out / SUMMARY_FILE)
    evals = [r for r in read_metrics(out / METRICS_FILE) if r.get("event") == "eval"]
    result = {"name": name, "curve": [e["val_accuracy"] for e in evals], "val_accuracy": summary["val_accuracy"],
              "steps": summary["steps"], "wall_seconds": wall, "train_seconds": sum(
                  r["time/step_seconds"] for r in read_metrics(out / METRICS_FILE) if r.get("event") == "step"),
              "peak_rss_bytes": summary["train_peak_rss_bytes"]}
    result_file.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------- tables
def mib(n) -> str:
    return f"{n / 2**20:.2f}"


def markdown(results: dict) -> str:
    """The tables of a ``--json-out`` file: accuracy per round, payload, nodes and faults."""
    if not results["federated"]:  # an --attack run only
        return attack_markdown(results)
    setup, lines = results["setup"], []
    out = lines.append
    methods = list(results["federated"])
    rounds, steps, nodes = setup["rounds"], setup["steps"], setup["nodes"]
    total = rounds * steps * nodes
    # ---- accuracy after each round (federated) / after each round's worth of steps (central, local-only)
    heads = " | ".join(f"r{r}" for r in range(rounds + 1))
    out(f"\n{nodes} nodes, {setup['partition']}, {rounds} rounds x {steps} steps per node "
        f"(total {total} steps), {setup['img_size']} px, batch {setup['batch_size']}, lr {setup['lr']}\n")
    out(f"| run | {heads} | total steps | wall s | MiB up+down per round | peak RSS MiB |")
    out("|---|" + "---|" * (rounds + 1) + "---|---|---|---|")
    for method in methods:
        fed = results["federated"][method]
        accs = " | ".join(f"{r['val_accuracy']:.3f}" for r in fed["val_accuracy_per_round"])
        per_round = fed["bytes_per_round"][0]["up"] + fed["bytes_per_round"][0]["down"]
        peak = max(fed["node_peak_rss_bytes"].values())
        out(f"| federated {method} | {accs} | {fed['steps']} | {fed['bench']['run_seconds']:.0f} | "
            f"{mib(per_round)} | {peak / 2**20:.0f} (max node) |")
        if method in results["central"]:
            c = results["central"][method]
            out(f"| centralised {method} | – | " + " | ".join(f"{a:.3f}" for a in c["curve"]) +
                f" | {c['steps']} | {c['wall_seconds']:.0f} | 0 | {c['peak_rss_bytes'] / 2**20:.0f} |")
        if method in results["local"]:
            runs = results["local"][method]
            cols = []
            for r in range(rounds):
                vals = [run["curve"][r] for run in runs]
                cols.append(f"{sum(vals) / len(vals):.3f} ({min(vals):.2f}–{max(vals):.2f})")
            out(f"| local-only {method}, mean (min–max) of {len(runs)} nodes | – | " + " | ".join(cols) +
                f" | {sum(r['steps'] for r in runs)} | {sum(r['wall_seconds'] for r in runs):.0f} (sum) | 0 | "
                f"{max(r['peak_rss_bytes'] for r in runs) / 2**20:.0f} |")

    # ---- payload
    out("\n| method | tensors that travel | params | tensor MiB | whole model MiB | share |")
    out("|---|---|---|---|---|---|")
    for method in methods:
        p = results["federated"][method]["payload"]
        out(f"| {method} | {p['tensors']} | {p['params']:,} | {mib(p['tensor_bytes'])} | {mib(p['model_bytes'])} | "
            f"{p['tensor_bytes'] / p['model_bytes']:.3f} |")

    # ---- nodes
    method = methods[0]
    fed = results["federated"][method]
    out(f"\n| node | images | classes with images | federated {method}: peak RSS MiB | local-only final acc |")
    out("|---|---|---|---|---|")
    for i, node in enumerate(fed["partition"]["nodes"]):
        local = results["local"].get(method)
        acc = f"{local[i]['val_accuracy']:.3f}" if local else "–"
        classes = sum(1 for v in node["per_class"].values() if v)
        out(f"| {node['node']} | {node['images']} | {classes} | "
            f"{fed['node_peak_rss_bytes'].get(node['node'], 0) / 2**20:.0f} | {acc} |")

    # ---- faults
    if results["faults"]:
        out(f"\n| fault ({method}) | outcome | nodes that replied per round | accuracy per round | wall s |")
        out("|---|---|---|---|---|")
        for fault, s in results["faults"].items():
            ok = ", ".join(f"r{h['round']}: {h['ok']}/{h['sent']}" for h in s["nodes_per_round"])
            accs = ", ".join(f"{r['val_accuracy']:.3f}" for r in s["val_accuracy_per_round"])
            outcome = f"{s['bench']['status']}, {s['rounds_completed']} rounds"
            if s.get("resumed_after_round"):
                outcome += f", resumed after round {s['resumed_after_round']}"
            out(f"| {fault} killed at {s['bench']['killed_at_s']:.0f} s | {outcome} | {ok} | {accs} | "
                f"{s['bench']['run_seconds']:.0f} |")
    if results.get("attack"):
        out(attack_markdown(results))
    return "\n".join(lines)


def attack_markdown(results: dict) -> str:
    """The poisoning table: final accuracy per aggregation against the clean fleet, and what was left out."""
    setup, attack = results["setup"], results["attack"]
    clean = attack["clean"]["val_accuracy_per_round"][-1]["val_accuracy"] if "clean" in attack else None
    lines = [f"\n{setup['nodes']} nodes over TLS + node authentication, {setup['partition']}, {setup['rounds']} rounds x "
             f"{setup['steps']} steps, {setup['img_size']} px; {setup['attacker']} sends its update x "
             f"{setup['attack_scale']} every round\n",
             "| aggregation | attacker | accuracy: before training, after each round | final | vs clean | replies left out |",
             "|---|---|---|---|---|---|"]
    labels = {"clean": "FedAvg (clean fleet)", "fedavg": "FedAvg",
              "clip": f"FedAvg, updates clipped to L2 {setup['attack_clip']}", "fedmedian": "FedMedian"}
    for kind, s in attack.items():
        accs = [r["val_accuracy"] for r in s["val_accuracy_per_round"]]
        left_out = ", ".join(f"{n}: {c}" for n, c in s.get("rejections_per_node", {}).items()) or "none"
        delta = f"{accs[-1] - clean:+.3f}" if clean is not None and kind != "clean" else "–"
        lines.append(f"| {labels[kind]} | {s['bench']['attacker'] or '–'} | "
                     + ", ".join(f"{a:.3f}" for a in accs) + f" | {accs[-1]:.3f} | {delta} | {left_out} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--val-data")
    ap.add_argument("--weights")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="steps per round and node")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=4.8e-4, help="ALaST alpha for alast methods (README's bench)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="alast-lora,lora")
    ap.add_argument("--faults", default="node,server", help="comma-separated: node, server ('' for none)")
    ap.add_argument("--node-profiles", default=None, help="profiles per node for the federated runs (cycled)")
    ap.add_argument("--skip", default="", help="comma-separated: central, local")
    ap.add_argument("--attack", action="store_true",
                    help="only the poisoning runs (TLS + node auth): clean, FedAvg, clipped FedAvg, FedMedian")
    ap.add_argument("--attacker", default="node3", help="the poisoning node (--attack)")
    ap.add_argument("--attack-scale", type=float, default=-10.0, help="the attacker's update factor (--attack)")
    ap.add_argument("--attack-clip", type=float, default=1.85, help="L2 clipping norm of the clipped run (--attack)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="print the tables of a --json-out file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not (args.data and args.val_data and args.weights and args.workdir):
        ap.error("--data, --val-data, --weights and --workdir are required")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    skip = set(filter(None, args.skip.split(",")))
    total = args.rounds * args.steps * args.nodes
    results: dict = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "federated": {}, "central": {}, "local": {}, "faults": {}, "attack": {}}

    if args.attack:
        results["attack"] = {kind: attacked(args, methods[0], kind) for kind in ATTACK_RUNS}
        print(attack_markdown(results))
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1, default=str))
        return 0
    for method in methods:
        fed = federated(args, method, f"fed-{method}")
        results["federated"][method] = fed
        if "central" not in skip:
            results["central"][method] = train_run(args, f"central-{method}", train_keys(args, method), args.data,
                                                   total, args.steps * args.nodes)
        if "local" not in skip:
            results["local"][method] = [
                train_run(args, f"local-{method}-{node['node']}", train_keys(args, method), node["data"],
                          args.rounds * args.steps, args.steps) for node in fed["partition"]["nodes"]]
    for fault in filter(None, args.faults.split(",")):
        results["faults"][fault] = federated(args, methods[0], f"fed-{methods[0]}-kill{fault}", fault=fault)

    print(markdown(results))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
