"""Benchmark field updates: sequences of ``edge-alast update`` on Fashion-MNIST, class- and domain-incremental.

Each scenario starts from one model store (``edge-alast train`` on the first classes or domain, then
``edge-alast store init --from RUN --holdout --replay``), copied once per sequence; a sequence runs ``edge-alast
update`` (the real CLI, one process per update) on each batch of new images in turn, with one method (``alast``,
``full``) and replay on (``--replay-max-images N``) or off (``0``):

- ``class``: the store knows classes 0-5; u1 adds classes 6-7, u2 classes 8-9, u3.. new images of all ten. Its
  gate runs with ``--max-old-drop 1`` by default (--class-max-old-drop): a new class takes predictions from the old
  ones, and the default 0.02 refuses that; the overall check still guards.
- ``domain``: the store knows all ten classes on clean images; u1.. bring new images of the same classes in shifted
  domains (inverted, rotated 90 degrees, dimmed), so there is something to adapt to.

After each update the store's ``current`` model (whatever the gate decided) is evaluated in onnxruntime on a fixed
test set drawn from Fashion-MNIST's official test split (never in the store's holdout, which comes from the train
split): accuracy on all classes (and domains) seen so far, and on the first classes (clean domain) alone, which
shows forgetting. Recorded per update: the gate's decision and figures (holdout accuracy of candidate and current,
on all and on the classes current knew, parity), the exit code, the update process's wall time and peak RSS
(``os.wait4``), the load average before and after (timings are only meaningful on an otherwise idle CPU).

Finished updates are cached in --workdir, keyed on the configuration and the git tree of ``edge_alast/`` (plus a
digest of its uncommitted changes); rerunning resumes where it stopped and reruns nothing that is still valid. An
update killed half-way is resumed by ``edge-alast update`` itself.

    OMP_NUM_THREADS=1 nice -n 10 python tools/bench_update.py \\
        --weights ../shared/assets/vit_small_patch14_dinov2.imgfocus.safetensors \\
        --workdir runs/bench-update --json-out docs/results/bench_update.json
    python tools/bench_update.py --markdown docs/results/bench_update.json   # the tables again, running nothing
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from make_fashion_mnist import CLASSES, SOURCE, load, write_split  # noqa: E402

SHIFTS = {  # 28x28 uint8 -> 28x28 uint8
    "clean": lambda x: x,
    "inverted": lambda x: 255 - x,
    "rot90": lambda x: np.rot90(x),
    "dim": lambda x: (x.astype(np.float32) * 0.35).astype(np.uint8),
}
FIRST = list(range(6))  # the class-incremental store's first classes
# (classes, images per class, domain) of each update; the store's first model saw FIRST / all classes, clean.
SCENARIOS = {
    "class": {"first_classes": FIRST, "first_domain": "clean",
              "updates": [([6, 7], 50, "clean"), ([8, 9], 50, "clean"), (list(range(10)), 10, "clean"),
                          (list(range(10)), 10, "clean"), (list(range(10)), 10, "clean")]},
    "domain": {"first_classes": list(range(10)), "first_domain": "clean",
               "updates": [(list(range(10)), 10, "inverted"), (list(range(10)), 10, "inverted"),
                           (list(range(10)), 10, "rot90"), (list(range(10)), 10, "rot90"),
                           (list(range(10)), 10, "dim")]},
}
SEQUENCES = [("alast", True), ("alast", False), ("full", True), ("full", False)]


def seq_name(method: str, replay: bool) -> str:
    return f"{method}+replay" if replay else f"{method}, no replay"


# ---------------------------------------------------------------------------------------------- cache key
def code_version() -> dict:
    """The git commit, the tree of edge_alast/ and a digest of its uncommitted changes (None when clean)."""
    def git(*a) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=True).stdout

    diff = git("diff", "HEAD", "--", "edge_alast") + git("ls-files", "--others", "--exclude-standard", "edge_alast")
    return {"commit": git("rev-parse", "HEAD").strip(), "edge_alast_tree": git("rev-parse", "HEAD:edge_alast").strip(),
            "dirty": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff.strip() else None}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- data
def build_data(root: Path, args) -> dict:
    """Write every ImageFolder the benchmark uses (once; the same arguments write the same images). Train-split
    images are taken in disjoint ranges per class, so no image is in two folders."""
    done = root / "done.json"
    spec = {"init": args.init_images, "holdout": args.holdout_images, "test": args.test_images,
            "scenarios": {k: v["updates"] for k, v in SCENARIOS.items()}}
    spec = json.loads(json.dumps(spec))  # tuples as lists, as read back
    if done.is_file() and json.loads(done.read_text()) == spec:
        return spec
    shutil.rmtree(root, ignore_errors=True)
    tr_x, tr_y, te_x, te_y = load(SOURCE)
    for name, sc in SCENARIOS.items():
        first, offset = sc["first_classes"], {c: 0 for c in range(10)}

        def take(out: Path, classes, per_class, domain):
            for c in classes:
                write_split(out, tr_x, tr_y, per_class, classes=[c], start=offset[c], transform=SHIFTS[domain])
                offset[c] += per_class

        take(root / name / "init_train", first, args.init_images, sc["first_domain"])
        take(root / name / "init_holdout", first, args.holdout_images, sc["first_domain"])
        for i, (classes, per_class, domain) in enumerate(sc["updates"], 1):
            take(root / name / f"u{i}", classes, per_class, domain)
    for domain, shift in SHIFTS.items():
        for c in range(10):
            write_split(root / "test" / domain, te_x, te_y, args.test_images, classes=[c], transform=shift)
    done.write_text(json.dumps(spec))
    return spec


# ---------------------------------------------------------------------------------------------- processes
def cli(args_list: list[str], log: Path, env: dict) -> dict:
    """Run ``edge-alast ARGS`` in its own process; exit code, wall seconds, peak RSS (os.wait4), load average
    before and after, and the JSON lines it printed."""
    load0 = os.getloadavg()
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge_alast.cli", *args_list], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    events = []
    for line in log.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return {"exit_code": os.waitstatus_to_exitcode(status), "wall_seconds": wall,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "loadavg_before": load0[0], "loadavg_after": os.getloadavg()[0], "events": events}


def evaluate(onnx: Path, test_root: Path, domains: list[str], cache: dict) -> dict:
    """Accuracy per (domain, class) of an exported model on the fixed test set, cached by the model's sha256."""
    from edge_alast.atomic import sha256_file
    from edge_alast.field.update import evaluate_onnx

    key = sha256_file(onnx)
    got = cache.setdefault(key, {})
    for domain in domains:
        if domain not in got:
            samples = [(str(p), p.parent.name) for p in sorted((test_root / domain).rglob("*.png"))]
            per_class = evaluate_onnx(onnx, samples)["per_class"]
            got[domain] = {n: v["correct"] / v["images"] for n, v in per_class.items()}
    return {"sha256": key, "per_domain_class": {d: got[d] for d in domains}}


def accuracy(per_domain_class: dict, domains, classes) -> float:
    """Mean accuracy over (domain, class) cells (every cell has the same number of images)."""
    names = [CLASSES[c] for c in classes]
    cells = [per_domain_class[d][n] for d in domains for n in names]
    return sum(cells) / len(cells)


# ---------------------------------------------------------------------------------------------- one scenario
def run_scenario(name: str, args, data: Path, env: dict, code: dict, cache: dict) -> dict:
    sc = SCENARIOS[name]
    base = args.workdir / name
    base.mkdir(parents=True, exist_ok=True)
    common = ["--img-size", str(args.img_size)]
    # -- the first model and its store, shared by the scenario's sequences
    init_key = digest({"code": [code["edge_alast_tree"], code["dirty"]], "img_size": args.img_size,
                       "weights": str(args.weights), "init_steps": args.init_steps, "init_method": args.init_method,
                       "data": [args.init_images, args.holdout_images]})
    init_file = base / "init.json"
    init = json.loads(init_file.read_text()) if init_file.is_file() else None
    if args.cached_only and (not init or init.get("key") != init_key):
        return None
    if not init or init.get("key") != init_key:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        print(f"[{name}] init run ({args.init_method}, {args.init_steps} steps)", flush=True)
        run = cli(["train", "--data", str(data / name / "init_train"), "--val-data", str(data / name / "init_holdout"),
                   "--weights", str(args.weights), "--method", args.init_method, "--steps", str(args.init_steps),
                   "--profile", args.profile, "--precision", "fp32", "--no-export", "--out", str(base / "run"),
                   "--json", *common], base / "train.log", env)
        if run["exit_code"] != 0:
            raise SystemExit(f"[{name}] train failed ({run['exit_code']}); see {base / 'train.log'}")
        store = cli(["store", "init", str(base / "store0"), "--from", str(base / "run"), "--holdout",
                     str(data / name / "init_holdout"), "--replay", str(data / name / "init_train"),
                     "--replay-max-images", str(args.replay_images), "--json"], base / "init.log", env)
        if store["exit_code"] != 0:
            raise SystemExit(f"[{name}] store init failed ({store['exit_code']}); see {base / 'init.log'}")
        test = evaluate(base / "store0" / "current" / "model.onnx", data / "test", [sc["first_domain"]], cache)
        init = {"key": init_key, "train": {k: v for k, v in run.items() if k != "events"},
                "store_init": {**{k: v for k, v in store.items() if k != "events"}, "record": store["events"][-1]},
                "test": test, "test_accuracy_first": accuracy(test["per_domain_class"], [sc["first_domain"]],
                                                              sc["first_classes"])}
        init_file.write_text(json.dumps(init, indent=1))
    result = {"init": init, "sequences": {}}
    # -- the sequences
    for method, replay in [(m, r) for m, r in SEQUENCES if m in args.methods.split(",")
                           and ("on" if r else "off") in args.replay.split(",")]:
        seq = seq_name(method, replay)
        folder = base / seq.replace(", ", "-").replace("+", "-").replace(" ", "-")
        options = ["--method", method, "--steps", str(args.steps), "--profile", args.profile, "--precision", "fp32",
                   "--seed", str(args.seed), "--replay-max-images", str(args.replay_images if replay else 0),
                   "--max-old-drop", str(args.class_max_old_drop if name == "class" else args.max_old_drop),
                   "--json"]
        seq_key = digest({"init": init_key, "options": options, "updates": sc["updates"],
                          "test": args.test_images})
        meta = folder / "sequence.json"
        if args.cached_only and not (meta.is_file() and json.loads(meta.read_text()).get("key") == seq_key):
            continue
        if not (meta.is_file() and json.loads(meta.read_text()).get("key") == seq_key):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            shutil.copytree(base / "store0", folder / "store", symlinks=True)
            meta.write_text(json.dumps({"key": seq_key, "options": options}))
        updates, seen_classes, seen_domains = [], list(sc["first_classes"]), [sc["first_domain"]]
        for i, (classes, per_class, domain) in enumerate(sc["updates"], 1):
            seen_classes = sorted(set(seen_classes) | set(classes))
            seen_domains = seen_domains + [domain] * (domain not in seen_domains)
            done = folder / f"u{i}.json"
            if done.is_file():
                updates.append(json.loads(done.read_text()))
                continue
            if args.cached_only:
                break
            print(f"[{name}] {seq} u{i}: {len(classes)} classes x {per_class} images, {domain}", flush=True)
            run = cli(["update", str(folder / "store"), "--data", str(data / name / f"u{i}"), *options],
                      folder / f"u{i}.log", env)
            attempts = 1  # wall time and RSS are the last attempt's: a resumed update's are of its rest only
            for _ in range(3):  # 75: interrupted (this benchmark was stopped) or busy; the same command resumes
                if run["exit_code"] != 75:
                    break
                attempts += 1
                time.sleep(5)
                run = cli(["update", str(folder / "store"), "--data", str(data / name / f"u{i}"), *options],
                          folder / f"u{i}.log", env)
            record = next((e for e in reversed(run["events"]) if e.get("event") == "update"), None)
            if run["exit_code"] not in (0, 4) or record is None:
                raise SystemExit(f"[{name}] {seq} u{i} failed ({run['exit_code']}); see {folder / f'u{i}.log'}")
            test = evaluate(folder / "store" / "current" / "model.onnx", data / "test", seen_domains, cache)
            pdc = test["per_domain_class"]
            entry = {"update": i, "data": {"classes": classes, "per_class": per_class, "domain": domain},
                     "exit_code": run["exit_code"], "decision": record["decision"], "current": record["current"],
                     "checks": record["checks"], "reasons": record["reasons"],
                     "holdout": {k: ({m: v.get(m) for m in ("accuracy", "old_accuracy", "new_accuracy", "images")}
                                     if v else None) for k, v in record["figures"].items()},
                     "counts": record["data"], "train": record["train"], "disk_bytes": record["disk_bytes"],
                     "process": {**{k: v for k, v in run.items() if k != "events"}, "attempts": attempts},
                     "test": {"seen_classes": seen_classes, "seen_domains": seen_domains,
                              "accuracy_seen": accuracy(pdc, seen_domains, seen_classes),
                              "accuracy_first": accuracy(pdc, [sc["first_domain"]], sc["first_classes"]),
                              "per_domain": {d: accuracy(pdc, [d], seen_classes) for d in seen_domains},
                              "sha256": test["sha256"]}}
            done.write_text(json.dumps(entry, indent=1))
            args.cache_file.write_text(json.dumps(cache))
            updates.append(entry)
            t = entry["test"]
            print(f"    {entry['decision']} (exit {entry['exit_code']}), test seen {t['accuracy_seen']:.3f} first "
                  f"{t['accuracy_first']:.3f}, {run['wall_seconds']:.0f} s, {run['peak_rss_bytes'] / 2**20:.0f} MiB",
                  flush=True)
        result["sequences"][seq] = {"options": options, "updates": updates}
    return result


# ---------------------------------------------------------------------------------------------- tables
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _data(d: dict) -> str:
    classes = d["classes"]
    names = "all 10" if len(classes) == 10 else "+" + ",".join(str(c) for c in classes)
    return f"{names} x {d['per_class']}, {d['domain']}"


def markdown(results: dict) -> str:
    """The tables of a --json-out file: accuracy after each update per sequence, then every update in detail."""
    setup, lines = results["setup"], []
    out = lines.append
    out(f"Measured with edge_alast/ as of commit `{results['code']['commit'][:10]}` (its tree "
        f"`{results['code']['edge_alast_tree'][:10]}`, the cache key"
        f"{'; with uncommitted changes' if results['code']['dirty'] else ''}), {setup['img_size']} px, "
        f"{setup['steps']} steps per update (batch: the profile's), "
        f"`--profile {setup['profile']} --precision fp32`, replay cap {setup['replay_images']} images "
        f"(\"no replay\": `--replay-max-images 0`), gate `--tolerance 0`, `--max-old-drop {setup['max_old_drop']}` "
        f"(class-incremental: `--max-old-drop {setup['class_max_old_drop']}`), seed "
        f"{setup['seed']}; test set: {setup['test_images']} images per class and domain from Fashion-MNIST's test "
        f"split. Host: {results['host']}.")
    for name, sc in results["scenarios"].items():
        init = sc["init"]
        first = "classes 0-5" if name == "class" else "the clean domain"
        out(f"\n**{name}-incremental.** The store's first model: `{setup['init_method']}` for {setup['init_steps']} "
            f"steps on {first} ({setup['init_images']} images per class); test accuracy "
            f"{_pct(init['test_accuracy_first'])} % on {first}. Each cell: test accuracy on everything seen so far / "
            f"on {first} (forgetting), % — then the gate's decision (P published, k kept).\n")
        seqs = list(sc["sequences"])
        out("| update | data | " + " | ".join(seqs) + " |")
        out("|---|---|" + "---|" * len(seqs))
        n = max(len(s["updates"]) for s in sc["sequences"].values())
        out("| init | " + f"{first} | " + " | ".join(
            f"{_pct(init['test_accuracy_first'])} / {_pct(init['test_accuracy_first'])}" for _ in seqs) + " |")
        for i in range(n):
            row, data = [], ""
            for seq in seqs:
                ups = sc["sequences"][seq]["updates"]
                if i >= len(ups):
                    row.append("–")
                    continue
                u = ups[i]
                data = _data(u["data"])
                row.append(f"{_pct(u['test']['accuracy_seen'])} / {_pct(u['test']['accuracy_first'])} "
                           f"{'P' if u['decision'] == 'published' else 'k'}")
            out(f"| u{i + 1} | {data} | " + " | ".join(row) + " |")
        out(f"\n| {name} | update | decision (exit) | holdout cand / cur | holdout old classes cand / cur | "
            f"holdout images | test seen | test first | wall s | CPU s | peak RSS MiB | load avg before–after |")
        out("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for seq in seqs:
            for u in sc["sequences"][seq]["updates"]:
                cand, cur = u["holdout"].get("candidate") or {}, u["holdout"].get("current") or {}
                p = u["process"]
                decision = f"{u['decision']} ({u['exit_code']})"
                if u["reasons"]:
                    decision += ": " + "; ".join(u["reasons"])
                out(f"| {seq} | u{u['update']} | {decision} | {_pct(cand.get('accuracy'))} / "
                    f"{_pct(cur.get('accuracy'))} | {_pct(cand.get('old_accuracy'))} / {_pct(cur.get('old_accuracy'))}"
                    f" | {cur.get('images', '–')} | {_pct(u['test']['accuracy_seen'])} | "
                    f"{_pct(u['test']['accuracy_first'])} | {p['wall_seconds']:.0f} | {p['cpu_seconds']:.0f} | "
                    f"{p['peak_rss_bytes'] / 2**20:.0f} | {p['loadavg_before']:.1f}–{p['loadavg_after']:.1f} |")
    procs = [u["process"] for sc in results["scenarios"].values() for s in sc["sequences"].values()
             for u in s["updates"]]
    procs += [p for sc in results["scenarios"].values() for p in (sc["init"].get("train"), sc["init"].get("store_init"))
              if p]
    if procs:
        wall = sum(p["wall_seconds"] for p in procs) / 60
        out(f"\n{len(procs)} processes (updates, first runs, store inits): {wall:.0f} min wall, "
            f"{sum(p['cpu_seconds'] for p in procs) / 60:.0f} min CPU (user + system).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--scenarios", default="class,domain")
    ap.add_argument("--methods", default="alast,full")
    ap.add_argument("--replay", default="on,off", help="sequences with replay (on), without (off), or both")
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--steps", type=int, default=30, help="training steps per update")
    ap.add_argument("--init-steps", type=int, default=60, help="steps of the run the store starts from")
    ap.add_argument("--init-method", default="head", help="method of the run the store starts from")
    ap.add_argument("--init-images", type=int, default=40, help="training images per class of the first model")
    ap.add_argument("--holdout-images", type=int, default=10, help="store init --holdout images per class")
    ap.add_argument("--test-images", type=int, default=20, help="test images per class and domain")
    ap.add_argument("--replay-images", type=int, default=200, help="replay cap of the sequences with replay")
    ap.add_argument("--max-old-drop", type=float, default=0.02, help="update --max-old-drop (domain scenario)")
    ap.add_argument("--class-max-old-drop", type=float, default=1.0,
                    help="update --max-old-drop in the class scenario: adding classes takes predictions from the "
                         "old ones, so the default 0.02 refuses it (1: only the overall check guards)")
    ap.add_argument("--profile", default="laptop_cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cached-only", action="store_true",
                    help="run nothing: collect the updates finished so far (a sequence stops at its first missing)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="print the tables of a --json-out file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not (args.weights and args.workdir):
        ap.error("--weights and --workdir are required")
    args.weights, args.workdir = args.weights.resolve(), args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    lock = open(args.workdir / ".lock", "a")  # two runs on one workdir would apply an update twice to a store
    try:
        if not args.cached_only:  # which only reads
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"--workdir: {args.workdir} is in use by another bench_update run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    code = code_version()
    data = args.workdir / "data"
    build_data(data, args)
    args.cache_file = args.workdir / "test_cache.json"  # test-set accuracy per model sha256
    cache = json.loads(args.cache_file.read_text()) if args.cache_file.is_file() else {}
    host = (f"{platform.machine()}, {os.cpu_count()} CPUs, this process on CPUs "
            f"{sorted(os.sched_getaffinity(0))}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    results = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("cache_file", "json_out", "markdown")},
               "code": code, "host": host, "scenarios": {}}
    for name in filter(None, args.scenarios.split(",")):
        scenario = run_scenario(name, args, data, env, code, cache)
        if scenario is not None:
            results["scenarios"][name] = scenario
    print(markdown(results))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
