"""tools/bench_tta.py's protocol on synthetic curves: smoothing, the FLOP budget, accuracy at equal time
and FLOPs, how a run ended, the cache key and the run order. No training here."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_tta as bt  # noqa: E402


def evals(accs, seconds=10.0, flops=1e12):
    """Evaluation lines every ``seconds`` training seconds and ``flops`` FLOPs."""
    return [{"step": 25 * (i + 1), "val_accuracy": a, "elapsed_seconds": seconds * (i + 1),
             "flops_total": flops * (i + 1)} for i, a in enumerate(accs)]


def test_curves_are_read_on_a_centred_mean():
    """Accuracy at a given time or FLOP count is read on a centred moving average (no lag on a rising curve); the
    plateau rule's trailing mean lives with train's stop rules (tests/training/test_stopping.py)."""
    # centred: (0+3)/2, (0+3+6)/3, (3+6+3)/3, (6+3)/2
    assert bt.smooth_centred([0.0, 3.0, 6.0, 3.0], 3) == pytest.approx([1.5, 3.0, 4.0, 4.5])
    assert bt.plateau_value([0.5, 0.7, 0.9, 0.8, 0.82, 0.78, 0.82, 0.78], 3) == pytest.approx((0.78 + 0.82 + 0.78) / 3)
    assert bt.plateau_value([], 3) is None


def test_budget_is_a_multiple_of_fulls_flops_at_its_plateau():
    runs = [{"evals": evals([0.5, 0.8, 0.8]), "stop_index": 1},  # plateaued at 2e12
            {"evals": evals([0.5, 0.7, 0.8, 0.8]), "stop_index": 3}]  # at 4e12
    assert bt.budget_flops(runs, 1.5) == pytest.approx(1.5 * 3e12)
    assert bt.point_of_plateau({"evals": evals([0.5, 0.6])}) == evals([0.5, 0.6])[-1]  # no stop index: the last
    assert bt.budget_flops([], 1.5) is None


def test_value_at_equal_time_and_flops():
    curve = evals([0.5, 0.7, 0.7, 0.9], seconds=10.0, flops=2e12)
    # centred means (window 3): 0.6, 0.6333, 0.7667, 0.8
    assert bt.value_at(curve, 10.0, "elapsed_seconds", 3, "max") == pytest.approx(0.6)
    assert bt.value_at(curve, 15.0, "elapsed_seconds", 3, "max") == pytest.approx((0.6 + 0.63333) / 2, abs=1e-4)
    assert bt.value_at(curve, 5e12, "flops_total", 3, "max") == pytest.approx((0.63333 + 0.76667) / 2, abs=1e-4)
    assert bt.value_at(curve, 5.0, "elapsed_seconds", 3, "max") is None  # before the first evaluation
    # past the end: a run that plateaued stays at its plateau value, one cut off by budget/max is unknown
    assert bt.value_at(curve, 99.0, "elapsed_seconds", 3, "plateau") == pytest.approx((0.7 + 0.7 + 0.9) / 3)
    assert bt.value_at(curve, 99.0, "elapsed_seconds", 3, "budget") is None
    assert bt.value_at([], 1.0, "elapsed_seconds", 3, "plateau") is None


def test_how_a_run_ended():
    assert [bt.ended_as(s) for s in ("plateau", "budget", None)] == ["plateau", "budget", "max"]


def test_cache_key_covers_config_protocol_and_code(tmp_path):
    config, protocol = {"method": "alast", "seed": 0}, {"window": 3, "budget_flops": 1e12}
    code = {"commit": "a" * 40, "dirty": False}
    path = tmp_path / "run.json"
    import json
    path.write_text(json.dumps({"key": bt.cache_key(config, protocol, code), "evals": []}))
    assert bt.cached(path, bt.cache_key(config, protocol, code)) is not None
    assert bt.cached(path, bt.cache_key({**config, "seed": 1}, protocol, code)) is None
    assert bt.cached(path, bt.cache_key(config, {**protocol, "budget_flops": 2e12}, code)) is None
    assert bt.cached(path, bt.cache_key(config, protocol, {"commit": "b" * 40, "dirty": False})) is None
    assert bt.cached(path, bt.cache_key(config, protocol, {**code, "dirty": True, "diff_sha256": "x"})) is None
    assert bt.cached(tmp_path / "missing.json", bt.cache_key(config, protocol, code)) is None


def test_a_key_holds_no_path_of_the_machine_that_made_it(tmp_path):
    """Paths under OUT are written relative to it and the weights as their sha256: a run made under one --out (or
    machine, or weights folder) matches the same run under another, and other weights at the same path do not."""
    weights = tmp_path / "w" / "vit.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    protocol, code = {"window": 3}, {"commit": "a" * 40, "dirty": False}

    def config(out, weights):
        return {"data": str(out / "data-fmnist" / "train"), "weights": str(weights), "seed": 0, "model": "vit",
                "alast": {"update": "random", "from_run": str(out / "fmnist" / "alast-relative-s0")}}

    key = bt.cache_key(config(tmp_path / "a", weights), protocol, code, tmp_path / "a")
    assert key["config"]["data"] == "OUT/data-fmnist/train"
    assert key["config"]["alast"]["from_run"] == "OUT/fmnist/alast-relative-s0"
    assert key["config"]["weights"] == {"name": "vit.safetensors", "sha256": hashlib.sha256(b"weights").hexdigest()}
    moved = tmp_path / "elsewhere" / "vit.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(b"weights")
    assert bt.cache_key(config(tmp_path / "b", moved), protocol, code, tmp_path / "b") == key
    moved.write_bytes(b"other weights")
    assert bt.cache_key(config(tmp_path / "b", moved), protocol, code, tmp_path / "b") != key
    assert bt.cache_key(config(tmp_path / "a", weights), protocol, code, tmp_path / "c") != key  # a path outside OUT


def test_code_version_names_the_commit_and_an_uncommitted_change(tmp_path):
    plain = tmp_path / "plain"
    (plain / "edge_alast").mkdir(parents=True)
    (plain / "edge_alast" / "a.py").write_text("x = 1\n")
    no_git = bt.code_version(plain)  # not a repository: a hash of the files
    assert no_git["commit"] is None and no_git["dirty"] and len(no_git["tree_sha256"]) == 64
    tmp_path = tmp_path / "repo"
    tmp_path.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "edge_alast").mkdir()
    (tmp_path / "edge_alast" / "a.py").write_text("x = 1\n")
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c", "--allow-empty")
    git("add", "edge_alast")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "code")
    clean = bt.code_version(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and "diff_sha256" not in clean
    (tmp_path / "edge_alast" / "a.py").write_text("x = 2\n")
    one = bt.code_version(tmp_path)
    (tmp_path / "edge_alast" / "a.py").write_text("x = 3\n")
    other = bt.code_version(tmp_path)
    assert one["dirty"] and other["dirty"] and one["commit"] == clean["commit"]
    assert one["diff_sha256"] != other["diff_sha256"]  # two uncommitted states never share a cache entry
    (tmp_path / "elsewhere.txt").write_text("not code")  # changes outside edge_alast/ do not count
    (tmp_path / "edge_alast" / "a.py").write_text("x = 1\n")
    assert bt.code_version(tmp_path) == clean


def test_run_order_puts_full_first_and_dependencies_before_their_users():
    order = bt.run_order(["random", "alast-anneal", "head"])
    assert order[0] == "full"
    assert order.index("alast-relative") < order.index("random")
    assert order.index("alast-reference") < order.index("alast-anneal")
    # the remedy runs as many steps as its source run had at its last evaluation (stopped there, it ran a step on)
    source = {"steps": 412, "evals": evals([0.5, 0.6])[:1] + [{"step": 400}]}
    settings = bt.resolve(bt.METHODS["alast-anneal"], REPO / "runs", 2, {"alast-reference": source})
    assert settings["steps"] == 400 and settings["alast"]["anneal_last"] == 0.2
    static = bt.resolve(bt.METHODS["static"], REPO / "runs", 1, {})
    assert static["alast"]["from_run"] == str(REPO / "runs" / "alast-relative-s1")


def test_a_method_at_another_learning_rate_keeps_its_settings_and_dependencies():
    assert bt.settings_of("alast-reference@lr1e-4") == {**bt.METHODS["alast-reference"], "lr": 1e-4}
    assert bt.settings_of("full") is bt.METHODS["full"]
    assert bt.needs("alast-anneal@lr1e-4") == {"alast-reference"}
    assert bt.run_order(["alast-reference@lr1e-4"]) == ["full", "alast-reference@lr1e-4"]
    with pytest.raises(SystemExit):
        bt.main(["--weights", "w", "--methods", "full@lrfast"])
    with pytest.raises(KeyError):
        bt.settings_of("fulll@lr1e-4")


def test_each_seeds_budget_comes_from_its_own_full_run(tmp_path, monkeypatch):
    """A seed's runs get 1.5x what that seed's full needed, so running seeds one at a time (two lanes) or together
    gives them the same cache key."""
    monkeypatch.setattr(bt, "write_fmnist", lambda root, train, val: tmp_path / "data")
    monkeypatch.setattr(bt, "code_version", lambda: {"commit": "0" * 40, "dirty": False})
    full_flops = {0: 2e12, 1: 4e12}
    budgets = {}

    def fake_run(config, out, protocol, code, cores=None):
        budgets[(config["method"], config["seed"])] = protocol["budget_flops"]
        # train applies the rules itself: the budget in TFLOPs, the plateau with the protocol's settings
        assert config["stop_at_plateau"] and (config["plateau_window"], config["plateau_patience"],
                                               config["plateau_min_gain"]) == (3, 4, 0.005)
        assert config["max_tflops"] == (None if protocol["budget_flops"] is None
                                        else pytest.approx(protocol["budget_flops"] / 1e12))
        flops = full_flops[config["seed"]] if config["method"] == "full" else 1e12
        return {"key": {"config": config, "protocol": protocol, "code": code}, "config": config, "ended": "plateau",
                "evals": [{**e, "val_images": 1000} for e in evals([0.5, 0.8], flops=flops / 2)],
                "stop_index": 1, "steps": 50, "all_evals": 2,
                "peak_rss_bytes": 1, "flops_per_step": 1.0}
    monkeypatch.setattr(bt, "run", fake_run)
    assert bt.main(["--weights", "w", "--seeds", "0,1", "--datasets", "fmnist", "--methods", "head",
                    "--out", str(tmp_path / "tta")]) == 0
    assert budgets == {("full", 0): None, ("full", 1): None, ("head", 0): pytest.approx(3e12),
                       ("head", 1): pytest.approx(6e12)}
    budgets.clear()
    assert bt.main(["--weights", "w", "--seeds", "1", "--datasets", "fmnist", "--methods", "head",
                    "--out", str(tmp_path / "tta")]) == 0
    assert budgets[("head", 1)] == pytest.approx(6e12)


def run_of(accs, ended="plateau", seconds=10.0):
    return {"evals": evals(accs, seconds=seconds), "ended": ended}


def test_the_stated_rule_takes_the_fastest_candidate_unless_its_plateau_is_lower_than_its_spread():
    # full plateaus at 40 s on both seeds, so the rule's budget is 20 s (the second evaluation, smoothed over 2).
    full = [run_of([0.5, 0.7, 0.8, 0.8]), run_of([0.5, 0.7, 0.8, 0.8])]
    fast_low = [run_of([0.70, 0.74, 0.74]), run_of([0.70, 0.74, 0.75])]           # 0.72 at 20 s, plateau ~0.74
    slow_high = [run_of([0.5, 0.6, 0.8, 0.82, 0.83]), run_of([0.5, 0.6, 0.8, 0.80, 0.85])]  # 0.55 at 20 s, ~0.82
    results = {"full": full, "alast-relative": fast_low, "alast-anneal": slow_high}
    rows, winner, why = bt.choose_default(results, t_ref=40.0, window=2)
    assert [r["name"] for r in rows] == ["alast-relative", "alast-anneal"]  # ordered by accuracy at 20 s
    assert rows[0]["at"] == pytest.approx(0.72) and rows[1]["at"] == pytest.approx(0.55)
    assert winner == "alast-anneal" and "alast-relative ranked higher" in why  # 0.74 is 0.08 below, spread 0.004
    # the same plateaus within the fast one's spread: the fast one is the default
    wide = [run_of([0.70, 0.74, 0.60]), run_of([0.70, 0.74, 0.88])]  # plateau 0.67 and 0.81: sd 0.099
    _, winner, _ = bt.choose_default({"full": full, "alast-relative": wide, "alast-anneal": slow_high}, 40.0, 2)
    assert winner == "alast-relative"
    # one seed: no spread, no decision; an ablation or a control is never a candidate
    rows, winner, why = bt.choose_default({"full": full[:1], "alast-freeze-only": fast_low[:1],
                                           "random": fast_low[:1], "alast-reference": slow_high[:1]}, 40.0, 2)
    assert [r["name"] for r in rows] == ["alast-reference"] and winner is None and "1 seed" in why
    # a candidate missing a seed full ran does not count
    rows, _, _ = bt.choose_default({"full": full, "alast-relative": fast_low[:1], "alast-anneal": slow_high}, 40.0, 2)
    assert [r["name"] for r in rows] == ["alast-anneal"]


def test_a_run_that_waited_for_its_cpu_is_named_under_the_table():
    """Another process on a run's cores makes its steps slower without a trace in the step times; the runs' CPU
    wait (train's time/wait_seconds, summed) names those over 5 % of their training seconds."""
    steps = [{"time/step_seconds": 2.0, "time/wait_seconds": 0.5},
             {"time/step_seconds": 3.0, "time/wait_seconds": 0.25}]
    assert bt.cpu_wait(steps) == {"step_seconds": 5.0, "wait_seconds": 0.75}
    assert bt.cpu_wait(steps + [{"time/step_seconds": 1.0}])["wait_seconds"] is None  # a step without a reading

    def rec(seed, wait):
        return {"config": {"seed": seed}, "step_seconds": 100.0, "wait_seconds": wait}
    assert bt.contention({"full": [rec(0, None), rec(1, None)]}) is None  # results from before the reading
    line = bt.contention({"full": [rec(0, 1.0), rec(1, 2.0)], "random": [rec(0, None)]})
    assert "read for 2 of 3 runs" in line and "at most 2.0%" in line and "Contended" not in line
    line = bt.contention({"full": [rec(0, 1.0)], "alast-anneal": [rec(0, 4.0), rec(1, 30.0)]})
    assert line.startswith("\n**Contended:** alast-anneal s1 (30%) waited") and "full s0" not in line


def test_a_fixed_length_run_that_finished_keeps_its_final_value_after_its_end():
    """The remedy runs a given number of steps (no plateau stop): once done, its model is what it has."""
    curve = evals([0.6, 0.8, 0.9])
    fixed = {"ended": "max", "evals": curve, "key": {"protocol": {"stop_at_plateau": False}}}
    capped = {"ended": "max", "evals": curve, "key": {"protocol": {"stop_at_plateau": True}}}
    assert bt.ending(fixed) == "fixed" and bt.ending(capped) == "max"
    assert bt.value_at(curve, 99.0, "elapsed_seconds", 3, bt.ending(fixed)) == pytest.approx((0.6 + 0.8 + 0.9) / 3)
    assert bt.value_at(curve, 99.0, "elapsed_seconds", 3, bt.ending(capped)) is None  # cut off: may have risen
    assert bt.endings([fixed, capped]) == "fixed 1, max 1"


def test_jobs_run_seeds_at_once_each_chain_on_its_own_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(bt.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert bt.core_shares(2) == [{0, 2}, {1, 3}] and bt.core_shares(1) == [None]
    with pytest.raises(SystemExit, match="only 4 usable"):
        bt.core_shares(5)
    monkeypatch.setattr(bt, "write_fmnist", lambda root, train, val: tmp_path / "data")
    monkeypatch.setattr(bt, "code_version", lambda: {"commit": "0" * 40, "dirty": False})
    used = {}

    def fake_run(config, out, protocol, code, cores=None):
        used.setdefault(config["seed"], set()).add(frozenset(cores))
        return {"key": {"config": config, "protocol": protocol, "code": code}, "config": config, "ended": "plateau",
                "evals": [{**e, "val_images": 1000} for e in evals([0.5, 0.8])], "stop_index": 1, "steps": 50,
                "all_evals": 2, "peak_rss_bytes": 1, "flops_per_step": 1.0}
    monkeypatch.setattr(bt, "run", fake_run)
    assert bt.main(["--weights", "w", "--seeds", "3,4", "--datasets", "fmnist", "--methods", "head", "--jobs", "2",
                    "--out", str(tmp_path / "tta")]) == 0
    assert used == {3: {frozenset({0, 2})}, 4: {frozenset({1, 3})}}  # every run of a seed on its chain's cores
    stored = json.loads((tmp_path / "tta" / "results.json").read_text())
    assert [r["config"]["seed"] for r in stored["fmnist/head"]] == [3, 4]  # in the order the seeds were named


def test_a_pinned_child_runs_on_its_cores_only():
    core = min(bt.os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                         capture_output=True, text=True, check=True, preexec_fn=bt._pinned({core}))
    assert out.stdout.strip() == f"[{core}]"


def test_only_the_remedy_anneals_whatever_the_product_default():
    """alast anneals by default since the rule chose the remedy: every other ALaST row pins annealing off, so it
    still measures what its name says (the paper's update, an ablation, a baseline)."""
    from edge_alast.config import TrainConfig

    annealing = {name: TrainConfig(data="d", out="o", method=s["method"], alast=dict(s.get("alast", {}))
                                   ).alast.anneal_last for name, s in bt.METHODS.items()}
    assert {name for name, share in annealing.items() if share > 0} == {"alast-anneal"}
    assert annealing["alast-anneal"] == 0.2


def test_a_run_interrupted_from_outside_is_not_cached_and_resumes(tmp_path, monkeypatch):
    """train exits 75 when SIGTERM stops it (checkpoint written): that run is unfinished, so the tool must stop
    without caching it; it once accepted 75 as a finished run (from when it stopped runs with SIGTERM itself)."""
    class Interrupted:
        def __init__(self, *args, **kwargs):
            self.stdout = iter([json.dumps({"event": "eval", "step": 50, "val_accuracy": 0.5, "val_loss": 1.0,
                                            "elapsed_seconds": 5.0, "flops_total": 1e12}) + "\n"])
            self.stderr = iter(())

        def wait(self):
            return bt.EXIT_INTERRUPTED
    monkeypatch.setattr(bt.subprocess, "Popen", Interrupted)
    config, out = {"method": "full", "steps": 100, "eval_images": 1000}, tmp_path / "full-s0"
    protocol = {"window": 3, "patience": 4, "min_gain": 0.005, "stop_at_plateau": True, "budget_flops": None}
    code = {"commit": "0" * 40, "dirty": False}
    with pytest.raises(SystemExit, match="interrupted.*resumes"):
        bt.run(config, out, protocol, code)
    assert not out.with_suffix(".json").exists()
    assert json.loads((out / "bench_key.json").read_text()) == bt.cache_key(config, protocol, code)  # it resumes


def test_a_run_ends_where_train_says_and_records_its_machine(tmp_path, monkeypatch):
    """train ends a run at the evaluation its stop rule read and says why in its finish event; the tool takes the
    ending from there (it once signalled the process, which could end it a step later) and records the machine."""
    out = tmp_path / "full-s0"
    point = lambda step, acc: {"event": "eval", "step": step, "val_accuracy": acc, "val_loss": 1.0,  # noqa: E731
                               "elapsed_seconds": step / 10, "flops_total": step * 1e11}
    events = [point(50, 0.5), point(100, 0.8), {"event": "finish", "step": 100, "steps": 3000, "reason": "budget"},
              {"event": "eval", "val_accuracy": 0.81, "val_loss": 0.9, "val_images": 1000}]  # the final one: no step

    class Finished:
        def __init__(self, args, **kwargs):
            out.mkdir(exist_ok=True)
            steps = [{"event": "step", "step": i, "flops/step": 1e11, "mem/peak_rss_bytes": 7,
                      "time/step_seconds": 2.0, "time/wait_seconds": 0.25 * i} for i in (1, 2)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
            (out / "summary.json").write_text(json.dumps({"val_accuracy": 0.81, "train_flops_per_step": 1e11,
                                                          "alast_schedule": None}))
            self.stdout = iter([json.dumps(e) + "\n" for e in events])
            self.stderr = iter(())

        def wait(self):
            return 0
    monkeypatch.setattr(bt.subprocess, "Popen", Finished)
    protocol = {"window": 3, "patience": 4, "min_gain": 0.005, "stop_at_plateau": True, "budget_flops": 1e13}
    result = bt.run({"method": "full", "batch_size": 16}, out, protocol, {"commit": "0" * 40, "dirty": False},
                    cores={0})
    assert (result["ended"], result["stop_index"], result["final_val_accuracy"]) == ("budget", 1, 0.81)
    assert [e["step"] for e in result["evals"]] == [50, 100]
    assert (result["step_seconds"], result["wait_seconds"]) == (4.0, 0.75)  # summed over the steps
    assert result["machine"]["cores"] == [0] and result["machine"]["cpu_threads"] >= 1
    assert result["machine"]["torch"] and result["machine"]["platform"]["machine"]
    assert bt.machine()["cores"] == sorted(os.sched_getaffinity(0))  # unpinned by the tool: the process's own
    assert json.loads(out.with_suffix(".json").read_text())["ended"] == "budget"  # cached as it ended
    assert (result["train_flops_per_step"], result["alast_schedule"]) == (1e11, None)  # full: no ALaST schedule


def test_the_stored_curve_is_the_one_trains_plateau_rule_reads():
    """Light-PEFT's evaluations before its pruning (of the unpruned model) are not its curve; every method else keeps
    them all. The rule is train's own (curve_start), so the tool and train cannot disagree on where a run ended."""
    curve = evals([0.9, 0.5, 0.6, 0.7])  # steps 25, 50, 75, 100
    pruned = {"method": "light-peft+alast", "light_peft": {"estimation_steps": 50}}
    assert [e["step"] for e in bt.counted(curve, pruned)] == [75, 100]
    default = bt.LightPeftConfig().estimation_steps  # 200 steps: every point of this curve is before its pruning
    assert bt.counted(curve, {"method": "light-peft"}) == [e for e in curve if e["step"] > default] == []
    assert bt.counted(curve, {"method": "full"}) == curve


def test_collect_tables_the_runs_finished_so_far_naming_a_methods_seeds(tmp_path, capsys):
    """A benchmark that spans sessions: --collect writes results.json from the cached runs that exist, runs nothing,
    and a method on fewer seeds than full says which."""
    def record(name, seed, accs):
        config = {"model": "vit_small_patch14_dinov2", "img_size": 224, "batch_size": 16, "eval_every": 25,
                  "seed": seed, "method": "full" if name == "full" else "alast"}
        protocol = {"window": 2, "patience": 1, "min_gain": 0.005, "stop_at_plateau": True, "budget_flops": None}
        return {"key": {"config": config, "protocol": protocol, "code": {"commit": "7e2d446" + "0" * 33,
                                                                         "dirty": False}},
                "config": config, "evals": [{**e, "val_images": 1000} for e in evals(accs)], "ended": "plateau",
                "stop_index": len(accs) - 1,
                "steps": 25 * len(accs), "peak_rss_bytes": 2**31, "flops_per_step": 594e9,
                "step_seconds": 100.0, "wait_seconds": 1.0 + seed}

    runs = tmp_path / "fmnist"
    runs.mkdir()
    for name, seed in (("full", 0), ("full", 1), ("alast-reference", 1)):
        (runs / f"{name}-s{seed}.json").write_text(json.dumps(record(name, seed, [0.7, 0.8, 0.8])))
    assert bt.main(["--collect", "--out", str(tmp_path), "--datasets", "fmnist", "--seeds", "0,1,2",
                    "--methods", "full,alast-reference,alast-anneal"]) == 0
    stored = json.loads((tmp_path / "results.json").read_text())
    assert list(stored) == ["fmnist/full", "fmnist/alast-reference"]  # anneal: nothing finished, left out
    assert [r["config"]["seed"] for r in stored["fmnist/full"]] == [0, 1]
    printed = capsys.readouterr().out
    assert "seeds 0,1, code 7e2d446." in printed and "| full | 0.800" in printed
    assert "| alast-reference (seed 1) | 0.800 |" in printed
    assert "CPU wait (read for all 3 runs): at most 2.0% of a run's training seconds" in printed
    assert not any((tmp_path / "fmnist").glob("*anneal*"))  # nothing was started
    (runs / "full-s2.json").write_text("{not json")
    with pytest.raises(SystemExit, match="full-s2.json is not a run record"):
        bt.main(["--collect", "--out", str(tmp_path), "--datasets", "fmnist", "--methods", "full"])
    with pytest.raises(SystemExit, match="no finished run"):
        bt.main(["--collect", "--out", str(tmp_path), "--datasets", "digits"])


def test_restore_puts_a_results_files_runs_back_in_the_cache_where_the_benchmark_reuses_them(tmp_path, capsys):
    """A benchmark that spans machines: --restore writes the chosen runs of a committed results file back as
    OUT/DATASET/NAME-sSEED.json; run() then reuses one under its own key, not under another code version, and a
    record already in OUT is kept."""
    def record(name, seed, acc):
        config = {"img_size": 224, "seed": seed, "method": "full" if name == "full" else "alast",
                  "data": "/elsewhere/tta224/data-fmnist/train"}
        key = {"config": config, "protocol": {"budget_flops": None}, "code": {"commit": "7e2d446" + "0" * 33,
                                                                            "dirty": False}}
        return {"key": key, "config": config, "evals": evals([acc]), "ended": "plateau", "steps": 50}

    results = {"fmnist/full": [record("full", 0, 0.8), record("full", 1, 0.7)],
               "fmnist/alast-relative": [record("alast-relative", 0, 0.6)], "digits/full": [record("full", 0, 0.9)]}
    committed = tmp_path / "tta_224_fmnist.json"
    committed.write_text(json.dumps(results))
    out = tmp_path / "out"
    (out / "fmnist").mkdir(parents=True)
    (out / "fmnist" / "full-s1.json").write_text(json.dumps(record("full", 1, 0.75)))  # a run this machine made
    assert bt.main(["--restore", str(committed), "--out", str(out), "--datasets", "fmnist", "--methods", "full",
                    "--seeds", "0,1"]) == 0
    printed = capsys.readouterr()
    assert printed.out.split() == ["restored", str(out / "fmnist" / "full-s0.json")]
    assert "made with --out /elsewhere/tta224; their keys hold that path" in printed.err
    # relative and digits were not chosen
    assert sorted(p.name for p in (out / "fmnist").iterdir()) == ["full-s0.json", "full-s1.json"]
    assert json.loads((out / "fmnist" / "full-s1.json").read_text())["evals"][0]["val_accuracy"] == 0.75  # kept
    assert not (out / "digits").exists()
    full0 = results["fmnist/full"][0]
    key = full0["key"]
    assert bt.run(key["config"], out / "fmnist" / "full-s0", key["protocol"], key["code"]) == full0  # no process
    assert bt.cached(out / "fmnist" / "full-s0.json", {**key, "code": {"commit": "03cfa4f", "dirty": False}}) is None
    assert bt.main(["--restore", str(committed), "--out", str(out), "--datasets", "fmnist", "--methods", "full"]) == 0
    assert "nothing to restore" in capsys.readouterr().err
    committed.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="is not a results file"):
        bt.main(["--restore", str(committed), "--out", str(out)])


def test_a_restored_relative_record_gives_static_and_random_their_schedule(tmp_path, capsys):
    """A record keeps its ALaST run's schedule (summary.json's alast_schedule); --restore writes it back as the run
    folder's summary.json, which static/random read (baselines.read_alast_run), so the relative run need not run
    again on a new machine. A record without one (older code) gets no folder; a folder's own summary is kept."""
    from edge_alast.alast.baselines import read_alast_run

    schedule = {"steps": 4, "mean_keep_ratios": [1.0, 0.8, 0.6], "trainable_counts": [4, 1, 3], "flops_per_step": 2e9}

    def record(seed, **extra):
        config = {"seed": seed, "method": "alast"}
        key = {"config": config, "protocol": {}, "code": {"commit": "c", "dirty": False}}
        return {"key": key, "config": config, "evals": evals([0.6]), "ended": "plateau", "steps": 4, **extra}

    committed = tmp_path / "tta.json"
    committed.write_text(json.dumps({"fmnist/alast-relative": [
        record(0, alast_schedule=schedule, train_flops_per_step=2.1e9), record(1), record(2, alast_schedule=schedule)]}))
    out = tmp_path / "out"
    own = out / "fmnist" / "alast-relative-s2"
    own.mkdir(parents=True)
    (own / "summary.json").write_text(json.dumps({"val_accuracy": 0.6}))
    assert bt.main(["--restore", str(committed), "--out", str(out), "--datasets", "fmnist", "--methods",
                    "alast-relative", "--seeds", "0,1,2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3  # three records restored
    folder = out / "fmnist" / "alast-relative-s0"
    assert read_alast_run(folder, 3, 2) == ([1.0, 0.8, 0.6], [0, 2], 2.1e9)  # the 2 most-trained blocks
    assert json.loads((folder / "summary.json").read_text())["restored"].startswith("the schedule of this run's")
    assert not (out / "fmnist" / "alast-relative-s1").exists()  # no schedule: that run must run again
    assert json.loads((own / "summary.json").read_text()) == {"val_accuracy": 0.6}  # kept


def test_a_learning_rates_decimals_stay_in_its_record_name_so_seeds_do_not_share_one(tmp_path):
    """run() caches a sweep run under the name --collect and --restore read (``full@lr0.001-s0.json``); it once cut
    the name at the learning rate's dot (``full@lr0.json``, one file for every seed)."""
    key = {"config": {"seed": 0, "lr": 0.001}, "protocol": {}, "code": {"commit": "c", "dirty": False}}
    record = {"key": key, "config": key["config"], "evals": evals([0.8]), "ended": "plateau", "steps": 50}
    folders = [bt.run_dir(tmp_path, "fmnist", "full@lr0.001", seed) for seed in (0, 1)]
    assert [bt.beside(f, ".json").name for f in folders] == ["full@lr0.001-s0.json", "full@lr0.001-s1.json"]
    (tmp_path / "fmnist").mkdir()
    bt.beside(folders[0], ".json").write_text(json.dumps(record))
    assert bt.run(key["config"], folders[0], key["protocol"], key["code"]) == record  # found: no process started
    assert bt.collect(tmp_path, ["fmnist"], ["full@lr0.001"], [0, 1]) == {"fmnist/full@lr0.001": [record]}


def test_a_signal_to_the_tool_stops_its_runs_at_a_checkpoint_and_starts_no_more():
    """SIGTERM/SIGHUP/SIGINT to the tool go on to its train processes as SIGTERM (train: checkpoint, exit 75) while
    the tool keeps reading them; no run starts after it. The tool once exited at once, and its children lost the
    reader of their output in mid-run."""
    import signal

    children = bt.Children()
    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
             "print('ready', flush=True); time.sleep(60)")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        children.forward_signals()
        proc = children.start([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        os.kill(os.getpid(), signal.SIGHUP)
        assert proc.wait(timeout=20) == 75 and children.stopping
        children.done(proc)
        assert not children.running
        with pytest.raises(SystemExit, match="stopped by a signal"):
            children.start([sys.executable, "-c", "pass"])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
