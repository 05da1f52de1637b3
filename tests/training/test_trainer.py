"""The training loop end to end: every method runs, files and summary fields, real images lower the loss."""
import json

import pytest
import torch

from edge_alast.config import TrainConfig
from edge_alast.device.host import cpu_wait_seconds
from edge_alast.methods import METHODS
from edge_alast.errors import ConfigError, DataError
from edge_alast.training.trainer import train
from tests.helpers import TINY_ARGS, damaged_inside, jpeg_bytes, make_image_folder, profile_file, tiny_config

SUMMARY_KEYS = {"method", "model", "steps", "val_accuracy", "mean_step_seconds", "peak_rss_bytes",
                "train_flops_per_step", "total_train_flops", "profile"}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_and_writes_run_folder(image_folder, tmp_path, method):
    events = []
    extra = {"light_peft": {"estimation_steps": 2}} if method.startswith("light-peft") else {}
    result = train(tiny_config(image_folder, tmp_path / "run", method=method, **extra), on_event=events.append)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary == result.summary
    assert summary["method"] == method and summary["steps"] == 3
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert summary["total_train_flops"] == pytest.approx(3 * summary["train_flops_per_step"], rel=1e-9)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["event"] == "step"] == [1, 2, 3]
    assert [r["step"] for r in lines if r["event"] == "prune"] == ([3] if method.startswith("light-peft") else [])
    assert {"loss", "tokens/per_block", "blocks/trainable", "time/step_seconds", "flops/step",
            "mem/peak_rss_bytes"} <= set(lines[0])
    for r in (x for x in lines if x["event"] == "step"):  # the step's phases lie within its time
        assert 0 < r["time/data_seconds"] + r["time/compute_seconds"] <= r["time/step_seconds"]
        # the CPU wait: where the kernel keeps schedstat (Linux), a reading per step, never negative
        assert ("time/wait_seconds" in r) == (cpu_wait_seconds() is not None)
        assert r.get("time/wait_seconds", 0.0) >= 0.0
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 3
    tokens = lines[0]["tokens/per_block"]
    spec = METHODS[method]
    if spec.alast and not spec.light_peft:
        assert tokens[0] == 17 and tokens[-1] < 17 and len(lines[0]["blocks/trainable"]) == 3  # ceil(3/4*3)
    else:
        assert tokens == [17, 17, 17]
        assert len(lines[0]["blocks/trainable"]) == (0 if method == "head" else 3)
    params = summary["trainable_params"]
    assert 0 < params <= summary["base_params_original"]
    if spec.lora:
        assert params < summary["base_params_original"] / 2


def test_flop_ratios_between_methods(image_folder, tmp_path):
    flops = {m: train(tiny_config(image_folder, tmp_path / m, method=m)).summary["train_flops_per_step"]
             for m in ("full", "alast", "head")}
    assert flops["head"] < flops["alast"] < flops["full"]


def test_same_seed_same_run(image_folder, tmp_path):
    a = train(tiny_config(image_folder, tmp_path / "a")).summary
    b = train(tiny_config(image_folder, tmp_path / "b")).summary
    assert a["final_loss"] == b["final_loss"] and a["budgets"] == b["budgets"]


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["event"] == "step"]


@pytest.mark.parametrize("method", ["alast", "full", "alast-lora"])
def test_interrupt_then_resume_equals_uninterrupted_run(image_folder, tmp_path, method):
    reference = train(tiny_config(image_folder, tmp_path / "ref", steps=6, method=method)).summary
    calls = iter(range(100))
    stopped = train(tiny_config(image_folder, tmp_path / "r", steps=6, method=method),
                    should_stop=lambda: next(calls) == 2).summary  # stop after the third step
    assert stopped == {"interrupted": True, "resumable": True, "steps": 3, "total_steps": 6}
    assert not (tmp_path / "r" / "summary.json").exists()
    assert len(_losses(tmp_path / "r")) == 3
    resumed = train(tiny_config(image_folder, tmp_path / "r", steps=6, method=method)).summary  # automatic resume
    assert _losses(tmp_path / "r") == pytest.approx(_losses(tmp_path / "ref"), rel=1e-6)
    assert resumed["budgets"] == pytest.approx(reference["budgets"], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)  # same final weights
    assert resumed["steps"] == 6


def test_resume_falls_back_when_newest_checkpoint_is_damaged(image_folder, tmp_path):
    reference = train(tiny_config(image_folder, tmp_path / "ref", steps=5)).summary
    calls = iter(range(100))
    train(tiny_config(image_folder, tmp_path / "r", steps=5, checkpoint_every_steps=1),
          should_stop=lambda: next(calls) == 2)
    from edge_alast.training.checkpoint import checkpoints
    (newest_step, newest), (older_step, _) = checkpoints(tmp_path / "r")
    assert (newest_step, older_step) == (3, 2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    events = []
    resumed = train(tiny_config(image_folder, tmp_path / "r", steps=5), on_event=events.append).summary
    assert any("checksum mismatch" in e.get("message", "") for e in events)
    assert [e for e in events if e["event"] == "start"][0]["resumed_from_step"] == 2
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)


def test_checkpoint_of_other_settings_is_not_clobbered(image_folder, tmp_path):
    calls = iter(range(100))
    train(tiny_config(image_folder, tmp_path / "r", steps=4), should_stop=lambda: next(calls) == 0)
    with pytest.raises(ConfigError, match=r"other settings \(lr\)"):
        train(tiny_config(image_folder, tmp_path / "r", steps=4, lr=5e-4))
    with pytest.raises(ConfigError, match="--resume: no valid checkpoint"):
        train(tiny_config(image_folder, tmp_path / "fresh", resume=True))


def test_disk_full_while_checkpointing_stops_keeps_the_previous_checkpoint_and_the_next_start_says_so(
        image_folder, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError (its OSError in the context): DiskFullError (exit 6), the
    step-1 checkpoint kept whole; the next start refuses at once while its successor cannot fit, naming it, and
    resumes from it once space is free."""
    import errno

    import edge_alast.atomic as atomic
    import edge_alast.training.checkpoint as ckpt
    import edge_alast.training.run as run_module
    from edge_alast.errors import DiskFullError

    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", save_until_the_disk_fills)
    out = tmp_path / "r"
    with pytest.raises(DiskFullError, match="checkpoint at step 2: disk full writing .*checkpoint-00000002.pt"):
        train(tiny_config(image_folder, out, steps=4, checkpoint_every_steps=1))
    assert [s for s, _ in ckpt.checkpoints(out)] == [1]  # step 2 failed; the one before it stayed valid
    assert all(ckpt.verify(p) is None for _, p in ckpt.checkpoints(out))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not {"model.safetensors", "summary.json"} & {p.name for p in out.iterdir()}
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    # the disk is still full: the next start says which checkpoint it keeps and what it needs, before training
    monkeypatch.setattr(run_module, "free_bytes", lambda folder: 1000)
    with pytest.raises(DiskFullError, match=r"resumes from checkpoint-00000001.pt \(step 1, kept\).* 1000 are free"):
        train(tiny_config(image_folder, out, steps=4, checkpoint_every_steps=1))
    monkeypatch.setattr(run_module, "free_bytes", atomic.free_bytes)
    events = []
    train(tiny_config(image_folder, out, steps=4, checkpoint_every_steps=1), on_event=events.append)
    assert events[[e["event"] for e in events].index("start")]["resumed_from_step"] == 1
    assert (out / "summary.json").exists()


def _nan_loss_at(step_index: int, monkeypatch):
    """The cross-entropy of the ``step_index``-th training step (0-based) is NaN."""
    import edge_alast.training.trainer as trainer

    real, calls = trainer.F.cross_entropy, []

    def cross_entropy(logits, y):
        calls.append(1)
        loss = real(logits, y)
        return loss * float("nan") if len(calls) == step_index + 1 else loss

    monkeypatch.setattr(trainer.F, "cross_entropy", cross_entropy)


def test_a_nan_loss_stops_the_run_with_exit_5_and_publishes_nothing(image_folder, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edge_alast.cli.main import main
    from edge_alast.training.checkpoint import checkpoints, load_latest

    _nan_loss_at(2, monkeypatch)
    out = tmp_path / "r"
    run_file = tmp_path / "run.yaml"
    run_file.write_text(json.dumps({**tiny_config(image_folder, out).to_dict(), "alast": {}, "lora": {},
                                    "light_peft": {}, "steps": 4, "checkpoint_every_steps": 1, "export": True}))
    result = CliRunner().invoke(main, ["train", "--config", str(run_file), "--json"])
    assert result.exit_code == 5, result.output
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["event"] == "error" and error["exit_code"] == 5
    assert "training diverged at step 3: the loss is nan" in error["message"]
    assert "checkpoint-00000002.pt (step 2)" in error["message"] and "nothing was published" in error["message"]
    names = {p.name for p in out.iterdir()}
    assert not names & {"model.safetensors", "model.onnx", "manifest.json", "summary.json"}
    assert [s for s, _ in checkpoints(out)] == [2, 1]
    kept, _ = load_latest(out)
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_non_finite_weights_are_never_checkpointed(image_folder, tmp_path, monkeypatch):
    """A weight that became infinite during step 2 (its loss was still finite): the checkpoint after step 2 is not
    written, the run stops (NonFiniteError naming the tensor), and step 1's checkpoint is kept."""
    import edge_alast.training.trainer as trainer
    from edge_alast.errors import NonFiniteError
    from edge_alast.training.checkpoint import checkpoints

    real_step, calls = trainer._forward_backward_step, []

    def step_then_corrupt(run, *args, **kwargs):
        result = real_step(run, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                run.model.head.weight[0, 0] = float("inf")
        return result

    monkeypatch.setattr(trainer, "_forward_backward_step", step_then_corrupt)
    out = tmp_path / "r"
    with pytest.raises(NonFiniteError, match=r"head.weight holds NaN or infinite values at the checkpoint after "
                                             r"step 2.*checkpoint-00000001.pt \(step 1\)"):
        train(tiny_config(image_folder, out, steps=4, checkpoint_every_steps=1))
    assert [s for s, _ in checkpoints(out)] == [1] and not (out / "model.safetensors").exists()


def test_planted_links_in_the_run_folder_are_refused_and_their_targets_untouched(image_folder, tmp_path):
    from edge_alast.errors import UnsafePathError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (".write-test", "metrics.jsonl"):
        out = tmp_path / name.strip(".")
        out.mkdir()
        (out / name).symlink_to(victim)
        with pytest.raises(UnsafePathError, match=f"{name}: is a symbolic link .*refusing to follow it"):
            train(tiny_config(image_folder, out))
        assert victim.read_text() == "precious"
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "metrics.jsonl").symlink_to(tmp_path / "would-be-created")
    with pytest.raises(UnsafePathError):
        train(tiny_config(image_folder, dangling))
    assert not (tmp_path / "would-be-created").exists()


def test_eval_images_caps_the_final_evaluation(image_folder, tmp_path):
    """The final evaluation reads --eval-images of the validation images (default: all of them)."""
    def final_eval(**kw):
        events = []
        train(tiny_config(image_folder, tmp_path / f"r{len(kw)}", **kw), on_event=events.append)
        return next(e for e in events if e["event"] == "eval" and "step" not in e)

    everything = final_eval()
    assert everything["val_images"] == 4  # val_fraction 0.25 of 2 classes x 6 images: 2 per class
    capped = final_eval(eval_images=2)
    assert capped["val_images"] == 2


def test_checkpoints_are_signed_with_a_device_key_and_a_planted_one_is_refused(image_folder, tmp_path):
    import hashlib

    from edge_alast.errors import IntegrityError
    from edge_alast.training.checkpoint import checkpoints

    key = tmp_path / "device.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    out = tmp_path / "r"
    calls = iter(range(100))
    train(tiny_config(image_folder, out, steps=4, device_key=str(key)), should_stop=lambda: next(calls) == 1)
    (step, path), = checkpoints(out)
    assert step == 2 and path.with_suffix(".sha256").read_text().startswith("hmac-sha256:")
    planted = torch.load(path, weights_only=True)  # e.g. an attacker's weights, with a matching plain sha256
    torch.save(planted, path)
    path.with_suffix(".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    with pytest.raises(IntegrityError, match="checkpoint-00000002.pt: not signed with the device key"):
        train(tiny_config(image_folder, out, steps=4, device_key=str(key)))
    (tmp_path / "short.key").write_bytes(b"short")
    with pytest.raises(ConfigError, match="--device-key: .*short.key is not a device key"):
        train(tiny_config(image_folder, tmp_path / "s", device_key=str(tmp_path / "short.key")))


def test_bad_config_and_data_errors(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--method"):
        train(tiny_config(image_folder, tmp_path / "r", method="qlora"))
    with pytest.raises(ConfigError, match="--steps"):
        train(tiny_config(image_folder, tmp_path / "r", steps=0))
    with pytest.raises(DataError, match="--data"):
        train(tiny_config(tmp_path / "missing", tmp_path / "r"))
    with pytest.raises(ConfigError, match="--profile"):
        train(tiny_config(image_folder, tmp_path / "r", profile="no_such_board"))


def test_profile_supplies_defaults(image_folder, tmp_path):
    from edge_alast.device.profiles import load_profile

    pi = load_profile("raspberry_pi_4_4gb")
    summary = train(tiny_config(image_folder, tmp_path / "r", profile=pi.name, batch_size=None)).summary
    bare = train(tiny_config(image_folder, tmp_path / "bare", batch_size=None)).summary
    assert summary["profile"] == pi.name and bare["profile"] is None
    assert summary["batch_size"] == pi.default_batch_size != bare["batch_size"]  # 4; else 16, capped at 9
    assert (summary["precision"], summary["device"]) == (pi.default_precision, pi.device)
    # its ceilings are planned against: memory as written, FLOPs per step = target seconds x fp32 FLOP/s
    assert summary["memory_ceiling_bytes"] == pi.memory_ceiling_bytes and bare["memory_ceiling_bytes"] is None
    assert summary["flop_ceiling_per_step"] == pytest.approx(pi.target_step_seconds * pi.flops_per_second["fp32"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_profile_without_cuda_needs_device_cpu(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--device cpu"):
        train(tiny_config(image_folder, tmp_path / "r", profile="jetson_orin_nano_8gb"))
    summary = train(tiny_config(image_folder, tmp_path / "r", profile="jetson_orin_nano_8gb", device="cpu")).summary
    assert summary["device"] == "cpu" and summary["profile"] == "jetson_orin_nano_8gb"


@pytest.mark.assets
def test_short_alast_run_on_real_images_lowers_the_loss(fashion_mnist, shared_weights, tmp_path):
    """Shared ViT-S/14 at 56 px (16 patches) on 4 Fashion-MNIST classes: validation loss falls with training."""
    def run(steps, name):
        cfg = TrainConfig(data=str(fashion_mnist / "train"), val_data=str(fashion_mnist / "val"), out=str(tmp_path / name),
                          weights=str(shared_weights), img_size=56, steps=steps, batch_size=16, lr=1e-4,
                          precision="bf16", method="alast", seed=0)
        return train(cfg).summary

    before, after = run(1, "one_step"), run(25, "trained")
    assert after["val_loss"] < 0.8 * before["val_loss"]
    assert after["val_accuracy"] > before["val_accuracy"]
    assert after["val_accuracy"] > 0.6  # 4 classes: chance is 0.25


def test_freeze_below_and_recompute_blocks_reach_the_plan(image_folder, tmp_path):
    train(tiny_config(image_folder, tmp_path / "r", steps=4, freeze_below=1, recompute_blocks=[1]))
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(min(r["blocks/trainable"]) >= 1 for r in lines)
    with pytest.raises(ConfigError, match="--freeze-below/--recompute-blocks"):
        train(tiny_config(image_folder, tmp_path / "r2", recompute_blocks=[7]))


def test_profile_ceiling_is_planned_and_reported(image_folder, tmp_path):
    from edge_alast.device.memory import rss_bytes

    ceiling = rss_bytes() + 2 * 2**30
    summary = train(tiny_config(image_folder, tmp_path / "r", profile=profile_file(tmp_path, ceiling))).summary
    assert summary["memory_ceiling_bytes"] == ceiling
    assert 0 < summary["predicted_peak_bytes"] <= ceiling
    assert summary["flop_ceiling_per_step"] == pytest.approx(20 * 3.1e11)  # target_step_seconds x fp32 FLOP/s
    assert summary["train_flops_per_step"] <= summary["flop_ceiling_per_step"]
    # The FLOP rate: steady steps' FLOPs over their seconds, against the profile's fp32 rate
    steps = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert summary["train_flops_per_second"] == pytest.approx(
        sum(r["flops/step"] for r in steps) / sum(r["time/step_seconds"] for r in steps))  # 3 steps: no warm-up cut
    assert steps[-1]["flops/per_second"] == pytest.approx(steps[-1]["flops/step"] / steps[-1]["time/step_seconds"])
    assert summary["reference_flops_per_second"] == 3.1e11
    assert summary["reference_flops_source"] == "profile tiny_board, " + (
        "fp32 flops_per_second" if summary["precision"] == "fp32" else
        f"fp32 (it lists no {summary['precision']}) flops_per_second")  # tiny_board lists fp32 only
    assert summary["flop_utilization"] == pytest.approx(summary["train_flops_per_second"] / 3.1e11)


def test_flop_rate_reference_without_a_profile_is_the_profile_matching_this_host(monkeypatch):
    from edge_alast.device import profiles

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    rate, source = profiles.reference_flops(None, "bf16")
    laptop = profiles.load_profile("laptop_cpu")
    assert rate == laptop.flops_per_second["fp32"]  # laptop_cpu lists no bf16 rate
    assert source == "shipped profile laptop_cpu (matches this host), fp32 (it lists no bf16) flops_per_second"
    monkeypatch.setattr("platform.machine", lambda: "riscv64")
    assert profiles.reference_flops(None, "fp32") == (None, "no profile: none for this device")
    assert profiles.reference_flops(None, "fp32", device="cuda")[0] is None


def test_profile_that_cannot_fit_fails_before_training_with_numbers(image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"--profile tiny_board: no plan fits.* needs \d+ bytes .*ceiling is 52428800"):
        train(tiny_config(image_folder, tmp_path / "r", profile=profile_file(tmp_path, 50 * 2**20)))
    assert not (tmp_path / "r" / "metrics.jsonl").exists() or not (tmp_path / "r" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_and_resumes(image_folder, tmp_path, precision):
    reference = train(tiny_config(image_folder, tmp_path / "ref", steps=4, precision=precision)).summary
    assert reference["precision"] == precision and reference["final_loss"] == reference["final_loss"]  # not NaN
    calls = iter(range(100))
    train(tiny_config(image_folder, tmp_path / "r", steps=4, precision=precision), should_stop=lambda: next(calls) == 1)
    resumed = train(tiny_config(image_folder, tmp_path / "r", steps=4, precision=precision)).summary
    assert _losses(tmp_path / "r") == pytest.approx(_losses(tmp_path / "ref"), rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)


def test_eval_every_records_a_validation_curve_on_a_fixed_subset(image_folder, tmp_path):
    summary = train(tiny_config(image_folder, tmp_path / "r", steps=4, eval_every=2, eval_images=2)).summary
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all(e["val_images"] == 2 for e in evals)
    steps = [r for r in lines if r["event"] == "step"]
    assert evals[0]["elapsed_seconds"] == pytest.approx(sum(r["time/step_seconds"] for r in steps[:2]))
    assert evals[1]["flops_total"] == summary["total_train_flops"]
    assert all(0.0 <= e["val_accuracy"] <= 1.0 for e in evals)
    # evaluating in between changes nothing about training
    plain = train(tiny_config(image_folder, tmp_path / "p", steps=4, eval_images=2)).summary  # same final images
    assert plain["final_loss"] == summary["final_loss"] and plain["val_loss"] == summary["val_loss"]


def test_baselines_run_at_the_flops_of_the_alast_run_they_come_from(image_folder, tmp_path):
    alast = {"update": "relative", "k_trainable": 2}
    source = train(tiny_config(image_folder, tmp_path / "a", steps=6, alast=alast)).summary
    assert source["alast_update"] == "relative" and source["baseline"] is None
    for update in ("static", "random"):
        summary = train(tiny_config(image_folder, tmp_path / update, steps=6,
                                    alast={**alast, "update": update, "from_run": str(tmp_path / "a")})).summary
        matched = summary["baseline"]
        assert matched["target_flops_per_step"] == source["train_flops_per_step"]
        assert matched["expected_flops_per_step"] == pytest.approx(source["train_flops_per_step"], rel=0.05)
        lines = [json.loads(x) for x in (tmp_path / update / "metrics.jsonl").read_text().splitlines()]
        keep = {tuple(r["plan/keep_ratio"]) for r in lines if r["event"] == "step"}
        assert len(keep) == 1  # constant per-block keep ratios
        if update == "static":
            assert {tuple(r["blocks/trainable"]) for r in lines if r["event"] == "step"} == {
                tuple(matched["trainable_blocks"])}
            assert summary["train_flops_per_step"] == pytest.approx(matched["expected_flops_per_step"])
    with pytest.raises(ConfigError, match="alast.update static: needs alast.keep_ratios"):
        train(tiny_config(image_folder, tmp_path / "bad", alast={"update": "static"}))


def test_baselines_read_the_schedule_from_the_summary_when_the_step_lines_are_gone(image_folder, tmp_path):
    """summary.json keeps what static/random read from their ALaST run, so a folder holding only the summary (the
    benchmark's --restore of a committed record) still builds them, at the same plan as from metrics.jsonl."""
    alast = {"update": "relative", "k_trainable": 2}
    source = train(tiny_config(image_folder, tmp_path / "a", steps=5, alast=alast)).summary
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "step"]
    schedule = source["alast_schedule"]
    assert schedule["steps"] == 5 and len(schedule["mean_keep_ratios"]) == 3  # the tiny ViT's depth
    assert schedule["mean_keep_ratios"][1] == pytest.approx(sum(r["plan/keep_ratio"][1] for r in steps) / 5)
    assert schedule["trainable_counts"] == [sum(i in r["blocks/trainable"] for r in steps) for i in range(3)]
    only = tmp_path / "restored"
    only.mkdir()
    (only / "summary.json").write_text(json.dumps({k: source[k] for k in ("alast_schedule", "train_flops_per_step")}))
    for update in ("static", "random"):
        plans = [train(tiny_config(image_folder, tmp_path / f"{update}-{i}", steps=2,
                                   alast={**alast, "update": update, "from_run": str(folder)})).summary["baseline"]
                 for i, folder in enumerate((tmp_path / "a", only))]
        assert {k: v for k, v in plans[0].items() if k != "from_run"} == {
            k: v for k, v in plans[1].items() if k != "from_run"}
    assert train(tiny_config(image_folder, tmp_path / "f", method="full", steps=1)).summary["alast_schedule"] is None
    (only / "summary.json").write_text(json.dumps({"alast_schedule": {**schedule, "trainable_counts": [1]}}))
    with pytest.raises(ConfigError, match=r"--alast-from: .*restored/summary.json: alast_schedule is not that of a "
                                          r"3-block model"):
        train(tiny_config(image_folder, tmp_path / "bad", alast={**alast, "update": "static", "from_run": str(only)}))
    (only / "summary.json").unlink()
    with pytest.raises(ConfigError, match="has no training steps in metrics.jsonl and no alast_schedule"):
        train(tiny_config(image_folder, tmp_path / "bad2", alast={**alast, "update": "static", "from_run": str(only)}))


def test_a_model_alast_cannot_train_is_refused_at_start_and_others_still_train_it(image_folder, tmp_path):
    no_cls = {**TINY_ARGS, "class_token": False, "global_pool": "avg"}
    with pytest.raises(ConfigError, match="--model vit_tiny_patch16_224: .*has no class token"):
        train(tiny_config(image_folder, tmp_path / "a", model_args=no_cls))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    summary = train(tiny_config(image_folder, tmp_path / "f", method="full", model_args=no_cls)).summary
    assert summary["steps"] == 3  # full drops no tokens: no class token needed


def test_start_from_given_trainable_tensors_and_return_them(image_folder, tmp_path):
    """What a fleet round does: start from the global model's trainable tensors and this node's policy state."""
    first = train(tiny_config(image_folder, tmp_path / "a", method="lora", steps=2), return_state=True)
    assert first.trainable and all("lora_" in n or not n.startswith("blocks.") for n in first.trainable)
    assert first.policy_state == {}  # lora: a static policy has no state
    changed = {n: t + 1.0 for n, t in first.trainable.items()}
    second = train(tiny_config(image_folder, tmp_path / "b", method="lora", steps=1), start={"trainable": changed},
                   return_state=True)
    name = next(n for n in changed if "lora_B" in n)
    assert (second.trainable[name] - changed[name]).abs().max() < 0.1  # one step from the given start
    with pytest.raises(ConfigError, match="start: 1 tensors are not trainable"):
        train(tiny_config(image_folder, tmp_path / "c", method="lora", steps=1),
              start={"trainable": {"blocks.0.attn.qkv.base.weight": torch.zeros(96, 32)}})
    with pytest.raises(ConfigError, match=r"start: head.weight has shape \(1,\), the model's is \(2, 32\)"):
        train(tiny_config(image_folder, tmp_path / "c", method="lora", steps=1),
              start={"trainable": {"head.weight": torch.zeros(1)}})
    with pytest.raises(ConfigError, match="start: unknown keys proximal "):
        train(tiny_config(image_folder, tmp_path / "c", method="lora", steps=1), start={"proximal": 0.1})
    with pytest.raises(ConfigError, match="proximal_mu needs a one-stage method"):
        train(tiny_config(image_folder, tmp_path / "c", method="light-peft", steps=3,
                          light_peft={"estimation_steps": 2}), start={"proximal_mu": 0.1})


# ---------------------------------------------------------------- FedProx's term in the objective
def _steps_of(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == "step"]


def test_proximal_term_is_half_mu_squared_distance_and_pulls_toward_the_start():
    from edge_alast.training.objective import ProximalTerm

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    term = ProximalTerm.at(2.0, [("w", w)])
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 2.0]))
    value = term([("w", w)])
    assert value.item() == pytest.approx(2.0 / 2 * 4.0)
    value.backward()
    assert w.grad.tolist() == [4.0, 0.0]  # mu * (w - w_start), the gradient FedProx adds


def test_fedprox_term_appears_in_the_objective_and_its_metric(image_folder, tmp_path):
    """start={"proximal_mu": mu}: step 1 starts at the global tensors (term 0); step 2's loss/proximal is
    mu/2 |w1 - w_global|^2 with w1 the tensors after step 1, and the term changes step 2's update, not its
    cross-entropy ("loss")."""
    mu = 0.5
    origin = train(tiny_config(image_folder, tmp_path / "o", method="lora", steps=1), return_state=True).trainable
    global_tensors = {n: t + 0.05 for n, t in origin.items()}
    one = train(tiny_config(image_folder, tmp_path / "one", method="lora", steps=1),
                start={"trainable": global_tensors}, return_state=True).trainable
    prox = train(tiny_config(image_folder, tmp_path / "prox", method="lora", steps=2),
                 start={"trainable": global_tensors, "proximal_mu": mu}, return_state=True)
    plain = train(tiny_config(image_folder, tmp_path / "plain", method="lora", steps=2),
                  start={"trainable": global_tensors}, return_state=True)
    steps = _steps_of(tmp_path / "prox")
    expected = mu / 2 * sum(float((one[n].double() - g.double()).pow(2).sum()) for n, g in global_tensors.items())
    assert steps[0]["loss/proximal"] == 0.0
    assert steps[1]["loss/proximal"] > 0 and steps[1]["loss/proximal"] == pytest.approx(expected, rel=1e-4)
    assert prox.history["losses"] == plain.history["losses"]  # "loss" stays the cross-entropy
    assert any(not torch.equal(prox.trainable[n], plain.trainable[n]) for n in global_tensors)
    assert "loss/proximal" not in _steps_of(tmp_path / "plain")[0]



# ---------------------------------------------------------------- the loop's state and the checkpoint's parts
def test_loop_state_round_trips():
    from edge_alast.alast.policy import PolicyCaps
    from edge_alast.training.trainer import LoopState

    loop = LoopState(caps=PolicyCaps(lowest_trainable=1, recompute=(True, False, False)),
                     scaler=torch.amp.GradScaler("cpu", init_scale=512.0))
    loop.record(0, 0.5, 1e6, 2.5, 1000)
    loop.record(1, 0.25, 2e6, 2.0, 1200)
    other = LoopState(caps=PolicyCaps(), scaler=torch.amp.GradScaler("cpu"))
    other.load_state_dict(loop.state_dict())
    assert other.step == 2 and other.caps == loop.caps and other.history == loop.history
    assert other.history == {"step_seconds": [0.5, 0.25], "step_flops": [1e6, 2e6], "losses": [2.5, 2.0],
                             "step_peak_bytes": [1000, 1200]}
    assert other.scaler.state_dict() == loop.scaler.state_dict()
    older = loop.state_dict()  # written before the step peaks were kept: they are not known
    del older["history"]["step_peak_bytes"]
    other.load_state_dict(older)
    assert other.history["step_peak_bytes"] == [] and other.history["losses"] == [2.5, 2.0]


FORMAT_1_KEYS = {"format", "step", "config", "model", "optimizer", "scheduler", "policy", "pruning", "estimation",
                 "rng", "history", "caps", "batch_size", "scaler", "guard", "bad_images"}
# Added to format 1 since, each optional (a checkpoint without it resumes): the stop rules' curve and end step.
FORMAT_1_ADDED = {"curve", "end_step"}


def test_checkpoint_keeps_format_1_and_a_format_1_checkpoint_resumes(image_folder, tmp_path):
    """The checkpoint is built from named state with the keys format 1 always had, plus optional ones; one written
    before the loop kept step peaks (no history/step_peak_bytes) or the stop rules' state resumes to the same
    losses."""
    from edge_alast.training.checkpoint import checkpoints, load_latest, save_checkpoint

    train(tiny_config(image_folder, tmp_path / "ref", steps=5))
    calls = iter(range(100))
    train(tiny_config(image_folder, tmp_path / "r", steps=5), should_stop=lambda: next(calls) == 1)
    checkpoint, _ = load_latest(tmp_path / "r")
    assert set(checkpoint) == FORMAT_1_KEYS | FORMAT_1_ADDED and checkpoint["format"] == 1 and checkpoint["step"] == 2
    del checkpoint["history"]["step_peak_bytes"]
    for key in FORMAT_1_ADDED:
        del checkpoint[key]
    [(step, path)] = checkpoints(tmp_path / "r")
    path.unlink()
    save_checkpoint(tmp_path / "r", step, checkpoint)
    train(tiny_config(image_folder, tmp_path / "r", steps=5))
    assert _losses(tmp_path / "r") == _losses(tmp_path / "ref")


def test_memory_guard_predicts_with_the_stage_policy(image_folder, tmp_path, monkeypatch):
    """Light-PEFT+ALaST under a memory ceiling: the guard checks the estimation steps with the estimation stage's
    policy (every block, every token) and the fine-tuning steps with ALaST's, the very objects the stages decide
    with."""
    from edge_alast.device.guard import MemoryGuard
    from edge_alast.device.memory import rss_bytes
    from edge_alast.training import stage as stage_module

    decided, checked = [], []
    real_first, real_next, real_check = stage_module.first_stage, stage_module.next_stage, MemoryGuard.check

    def check(self, step_peak, caps, policy=None):
        checked.append(policy)
        return real_check(self, step_peak, caps, policy)

    def remember(build):
        def wrapper(*args, **kwargs):
            stage = build(*args, **kwargs)
            decided.append(stage.policy)
            return stage
        return wrapper

    import edge_alast.training.trainer as trainer
    monkeypatch.setattr(MemoryGuard, "check", check)
    monkeypatch.setattr(trainer, "first_stage", remember(real_first))
    monkeypatch.setattr(trainer, "next_stage", remember(real_next))
    six = dict(patch_size=8, embed_dim=48, depth=3, num_heads=6, mlp_ratio=2.0)
    train(tiny_config(image_folder, tmp_path / "r", method="light-peft+alast", steps=6, model_args=six,
                      light_peft={"estimation_steps": 4}, lora={"r": 4},
                      profile=profile_file(tmp_path, rss_bytes() + 2**31)))
    estimate, finetune = decided
    assert [type(p).__name__ for p in (estimate, finetune)] == ["StaticPolicy", "AlastPolicy"]
    assert [id(p) for p in checked] == [id(estimate)] * 4 + [id(finetune)] * 2


@pytest.mark.parametrize("method", ["full", "lora", "alast-lora"])
def test_freeze_below_holds_for_every_method(image_folder, tmp_path, method):
    from edge_alast.training.run import setup_run

    run = setup_run(tiny_config(image_folder, tmp_path / "setup", method=method, freeze_below=2))
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed.", "pos_embed", "cls_token"))
                   for n in run.trainable.names)
    summary = train(tiny_config(image_folder, tmp_path / "r", method=method, freeze_below=2, steps=2)).summary
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(min(r["blocks/trainable"]) >= 2 for r in lines if r["event"] == "step")
    unfrozen = train(tiny_config(image_folder, tmp_path / "u", method=method, steps=2)).summary
    assert summary["train_flops_per_step"] < unfrozen["train_flops_per_step"]  # no backward below block 2


def test_freeze_below_is_refused_where_it_cannot_apply(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--freeze-below: cannot apply to light-peft"):
        train(tiny_config(image_folder, tmp_path / "r", method="light-peft", freeze_below=1, steps=6,
                          light_peft={"estimation_steps": 3}))


def test_seed_seeds_layer_sampling(image_folder, tmp_path):
    def drawn(run_seed, out, **alast):  # budgets pinned at 1: the draws depend on the sampler's seed alone
        train(tiny_config(image_folder, tmp_path / out, seed=run_seed, steps=6,
                          alast={"k_trainable": 1, "b_init": 1.0, "b_min": 1.0, **alast}))
        lines = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["blocks/trainable"] for r in lines if r["event"] == "step"]

    assert drawn(0, "a") == drawn(0, "b")
    assert drawn(0, "c") != drawn(1, "d")
    assert drawn(1, "e", seed=0) == drawn(0, "f")  # alast.seed, when given, wins


# ---------------------------------------------------------------- files that fail to decode when used

@pytest.fixture
def data_with_hidden_damage(tmp_path):
    """13 training files, one of which passes the scan and fails to decode; a validation folder with one too."""
    data = make_image_folder(tmp_path / "data")
    (data / "a" / "damaged.jpg").write_bytes(damaged_inside(jpeg_bytes()))
    val = make_image_folder(tmp_path / "val", per_class=3, seed=1)
    (val / "b" / "val-damaged.jpg").write_bytes(damaged_inside(jpeg_bytes()))
    return data, val


def test_a_file_that_fails_at_use_is_left_out_named_once_and_checkpointed(data_with_hidden_damage, tmp_path):
    from edge_alast.training.checkpoint import checkpoints, load_latest

    data, val = data_with_hidden_damage
    events = []
    # Batch 13: one batch an epoch, so every step reads the damaged file; it is named once all the same.
    config = tiny_config(data, tmp_path / "r", val_data=str(val), batch_size=13, steps=3, checkpoint_every_steps=1)
    summary = train(config, on_event=events.append).summary
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    named = [w for w in warnings if f"{data / 'a' / 'damaged.jpg'}," in w]
    assert len(named) == 1 and named[0].startswith("--data: skipped") and "unreadable when loaded" in named[0]
    assert "1 of 13 image files" in named[0]
    named = [w for w in warnings if "val-damaged.jpg" in w]  # evaluation leaves it out and says so
    assert len(named) == 1 and named[0].startswith("--val-data: skipped") and "1 of 7 image files" in named[0]
    assert summary["steps"] == 3 and summary["val_accuracy"] is not None
    assert next(e for e in events if e["event"] == "eval")["val_images"] == 7
    checkpoint, _ = load_latest(tmp_path / "r")
    assert checkpoint["bad_images"]["paths"] == [str(data / "a" / "damaged.jpg")]
    assert [s for s, _ in checkpoints(tmp_path / "r")] == [2, 1]


def test_resume_after_a_use_time_failure_replays_exactly(data_with_hidden_damage, tmp_path):
    from edge_alast.data.loader import BatchOrder

    data, val = data_with_hidden_damage
    config = dict(val_data=str(val), batch_size=4, steps=9, augment="rrc-flip")  # 13 files: 3 batches an epoch
    reference = train(tiny_config(data, tmp_path / "ref", **config)).summary
    damaged = 6  # sorted class a: 0.png .. 5.png, damaged.jpg
    met = [s for s in range(9) if damaged in BatchOrder(13, 4, seed=0).indices(s)]
    assert met[0] + 1 < 5 <= met[-1]  # met before the interruption and again after it (steps 2, 3 and 8)
    met = met[0]
    calls, first, events = iter(range(100)), [], []
    train(tiny_config(data, tmp_path / "r", **config), on_event=first.append,
          should_stop=lambda: next(calls) == met + 1)  # stop one step after the damaged file was met
    resumed = train(tiny_config(data, tmp_path / "r", **config), on_event=events.append).summary
    assert _losses(tmp_path / "r") == pytest.approx(_losses(tmp_path / "ref"), rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)
    assert len(_losses(tmp_path / "ref")) == 9  # the damaged file's batch trained on its three other images
    named = [[e for e in run if e["event"] == "warning" and "a/damaged.jpg" in e["message"]] for run in (first, events)]
    assert (len(named[0]), len(named[1])) == (1, 0)  # restored from the checkpoint: known, not met anew


def test_a_batch_of_only_unreadable_files_makes_no_update(data_with_hidden_damage, tmp_path):
    data, val = data_with_hidden_damage
    events = []
    summary = train(tiny_config(data, tmp_path / "r", val_data=str(val), batch_size=1, steps=13),
                    on_event=events.append).summary  # one epoch of single-image batches: one of them is empty
    empty = [e["message"] for e in events if e["event"] == "warning" and "every image of its batch" in e["message"]]
    assert len(empty) == 1 and summary["steps"] == 12
    steps = [r["step"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "step"]
    skipped = int(empty[0].split(":")[0].removeprefix("step "))
    assert steps == [s for s in range(1, 14) if s != skipped]


def test_too_many_files_failing_at_use_is_a_data_error(data_with_hidden_damage, tmp_path):
    data, val = data_with_hidden_damage
    with pytest.raises(DataError, match=r"--data: 1 of 13 image files .* unreadable \(more than 5%\); "
                                        r"first: .*damaged\.jpg"):
        train(tiny_config(data, tmp_path / "r", val_data=str(val), batch_size=13, max_bad_fraction=0.05))


def _steps(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == "step"]


def test_anneal_last_ends_on_every_token_and_resumes_exactly(image_folder, tmp_path):
    """alast.anneal_last 0.5 of 6 steps: steps 4-6 raise the keep ratios linearly (1/3, 2/3, 1 of the way to 1), so
    the last step keeps every token; interrupting in the window and resuming gives the same plans and losses."""
    anneal = {"anneal_last": 0.5, "seed": 3}
    reference = train(tiny_config(image_folder, tmp_path / "ref", steps=6, alast=anneal)).summary
    steps = _steps(tmp_path / "ref")
    for r in steps[:3]:
        assert all(k == b for k, b in zip(r["plan/keep_ratio"], r["budget/raw"]))  # before the window: the budgets
    for r, t in zip(steps[3:], (1 / 3, 2 / 3, 1.0)):
        assert r["plan/keep_ratio"] == pytest.approx([b + (1 - b) * t for b in r["budget/raw"]], abs=1e-6)
    assert steps[-1]["plan/keep_ratio"] == [1.0, 1.0, 1.0] and steps[-1]["tokens/per_block"] == [17, 17, 17]
    assert steps[0]["tokens/per_block"][-1] < 17
    calls = iter(range(100))
    train(tiny_config(image_folder, tmp_path / "r", steps=6, alast=anneal), should_stop=lambda: next(calls) == 3)
    resumed = train(tiny_config(image_folder, tmp_path / "r", steps=6, alast=anneal)).summary
    assert [r["plan/keep_ratio"] for r in _steps(tmp_path / "r")] == [r["plan/keep_ratio"] for r in steps]
    assert _losses(tmp_path / "r") == pytest.approx(_losses(tmp_path / "ref"), rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)


def test_coauthors_run_uses_their_setup_and_logs_the_ratios_it_applied(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path / "c", steps=4, alast={"update": "coauthors", "alpha": 1e-3})
    assert (config.optimizer, config.weight_decay, config.train_embeddings) == ("adam", 0.0, True)
    explicit = tiny_config(image_folder, tmp_path / "x", alast={"update": "coauthors"}, optimizer="adamw",
                           weight_decay=0.05, train_embeddings=False)
    assert (explicit.optimizer, explicit.weight_decay, explicit.train_embeddings) == ("adamw", 0.05, False)
    assert (tiny_config(image_folder, tmp_path / "d").optimizer, tiny_config(image_folder, tmp_path / "d").weight_decay
            ) == ("adamw", 0.05)  # every other update keeps the project's defaults
    summary = train(config).summary
    assert summary["alast_update"] == "coauthors"
    steps = _steps(tmp_path / "c")
    # the budgets a step used are the ones the next step starts from (updated in the same forward, no lag)
    for now, after in zip(steps, steps[1:]):
        assert now["plan/keep_ratio"] == pytest.approx(after["budget/raw"], abs=1e-6)
    assert steps[-1]["plan/keep_ratio"] == pytest.approx(summary["budgets"], abs=1e-6)
    for r in steps:  # int(b * N), N counting the class token
        tokens, keep = r["tokens/per_block"], r["plan/keep_ratio"]
        for i in range(2):
            assert tokens[i + 1] == 1 + min(tokens[i] - 1, int(keep[i] * tokens[i]))


def test_coauthors_run_resumes_exactly(image_folder, tmp_path):
    alast = {"update": "coauthors", "alpha": 1e-3}
    train(tiny_config(image_folder, tmp_path / "ref", steps=5, alast=alast))
    calls = iter(range(100))
    train(tiny_config(image_folder, tmp_path / "r", steps=5, alast=alast), should_stop=lambda: next(calls) == 1)
    train(tiny_config(image_folder, tmp_path / "r", steps=5, alast=alast))
    assert _losses(tmp_path / "r") == pytest.approx(_losses(tmp_path / "ref"), rel=1e-6)
    flat = lambda run: [k for r in _steps(run) for k in r["plan/keep_ratio"]]  # noqa: E731
    assert flat(tmp_path / "r") == pytest.approx(flat(tmp_path / "ref"))


def test_should_finish_ends_the_run_as_a_finished_one(image_folder, tmp_path):
    """A benchmark stopping a run at its plateau keeps the model: evaluated, saved, summary, no checkpoint needed."""
    calls = iter(range(100))
    result = train(tiny_config(image_folder, tmp_path / "r", steps=6), should_finish=lambda: next(calls) == 1)
    summary = result.summary
    assert summary["steps"] == 2 and summary["finished_early_at"] == 2 and summary["val_accuracy"] is not None
    assert (tmp_path / "r" / "model.safetensors").exists() and "interrupted" not in summary
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["event"] == "step"] == [1, 2]
    assert [(r["step"], r["steps"]) for r in lines if r["event"] == "finish"] == [(2, 6)]
    assert train(tiny_config(image_folder, tmp_path / "p", steps=2)).summary["finished_early_at"] is None


def _events(run_dir, kind):
    return [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["event"] == kind]


def test_stop_at_plateau_ends_the_run_at_the_evaluation_it_read(image_folder, tmp_path):
    """The rule is read in the loop, so the run ends at the evaluated step itself (not a step later, as a signal
    sent after reading the evaluation could), on every rerun."""
    # window 1, patience 1, a gain no curve makes: the plateau is the second evaluation (step 4); no annealing
    rule = dict(eval_every=2, stop_at_plateau=True, plateau_window=1, plateau_patience=1, plateau_min_gain=1.0,
                alast={"anneal_last": 0.0})
    for name in ("a", "b"):
        summary = train(tiny_config(image_folder, tmp_path / name, steps=10, **rule)).summary
        assert (summary["steps"], summary["finished_early_at"], summary["finished_by"]) == (4, 4, "plateau")
        assert [r["step"] for r in _events(tmp_path / name, "eval") if "step" in r] == [2, 4]
        assert [(r["step"], r["reason"]) for r in _events(tmp_path / name, "finish")] == [(4, "plateau")]
        assert (tmp_path / name / "model.safetensors").exists() and summary["val_accuracy"] is not None
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    # a plateau at the last step is no early finish: the run took all its steps
    summary = train(tiny_config(image_folder, tmp_path / "c", steps=4, **rule)).summary
    assert (summary["finished_early_at"], summary["finished_by"]) == (None, None)


def test_an_annealing_run_anneals_from_its_plateau_then_finishes(image_folder, tmp_path):
    """Stopping at the plateau would end alast's default run on the token-dropped view annealing exists to leave:
    the plateau brings the end forward instead, and the run anneals up to it (here: plateau after step 4, anneal
    half the run, so it ends after step 8, its last step on every token)."""
    rule = dict(eval_every=2, stop_at_plateau=True, plateau_window=1, plateau_patience=1, plateau_min_gain=1.0)
    summary = train(tiny_config(image_folder, tmp_path / "r", steps=20, alast={"anneal_last": 0.5}, **rule)).summary
    assert (summary["steps"], summary["finished_early_at"], summary["finished_by"]) == (8, 8, "plateau")
    assert [(r["step"], r["until"]) for r in _events(tmp_path / "r", "anneal")] == [(4, 8)]
    keep = {r["step"]: r["plan/keep_ratio"] for r in _events(tmp_path / "r", "step")}
    assert min(keep[4]) < 1.0 and keep[8] == [1.0] * len(keep[8])
    # from the plateau on, a share t = 1/4, 2/4, 3/4 of the way from the policy's ratio (>= b_min 0.5) to 1
    assert [min(keep[s]) >= 0.5 + 0.5 * t - 1e-9 for s, t in ((5, 0.25), (6, 0.5), (7, 0.75))] == [True] * 3
    # the same run stopped between its plateau and its end resumes to the same end
    calls = iter(range(100))
    train(tiny_config(image_folder, tmp_path / "i", steps=20, alast={"anneal_last": 0.5}, **rule),
          should_stop=lambda: next(calls) == 5)
    again = train(tiny_config(image_folder, tmp_path / "i", steps=20, alast={"anneal_last": 0.5}, **rule)).summary
    assert (again["steps"], again["finished_by"]) == (8, "plateau")
    assert _losses(tmp_path / "i") == pytest.approx(_losses(tmp_path / "r"), rel=1e-6)


def test_max_tflops_ends_the_run_once_its_steps_have_spent_it(image_folder, tmp_path):
    flops = train(tiny_config(image_folder, tmp_path / "probe", steps=1, method="full")).history["step_flops"][0]
    budget = 2.5 * flops / 1e12  # spent during step 3
    summary = train(tiny_config(image_folder, tmp_path / "r", steps=10, method="full", max_tflops=budget)).summary
    assert (summary["steps"], summary["finished_by"]) == (3, "budget")  # checked after each step
    run = train(tiny_config(image_folder, tmp_path / "e", steps=10, method="full", max_tflops=budget, eval_every=2))
    assert (run.summary["steps"], run.summary["finished_by"]) == (3, "budget")  # not at the next point, step 4
    lines = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    points = [r for r in lines if r["event"] == "eval"]
    assert [p["step"] for p in points] == [2, 3]  # the step it ran out on is a validation point: the curve ends there
    assert points[-1]["flops_total"] == pytest.approx(3 * flops, rel=1e-6)


def test_a_resumed_run_keeps_its_validation_curve_for_the_plateau(image_folder, tmp_path):
    """The curve is in the checkpoint: stopped after the first evaluation and resumed, the run still ends at the
    second, as the uninterrupted run does (from an empty curve it would end at the third)."""
    rule = dict(eval_every=2, stop_at_plateau=True, plateau_window=1, plateau_patience=1, plateau_min_gain=1.0,
                alast={"anneal_last": 0.0})
    calls = iter(range(100))
    first = train(tiny_config(image_folder, tmp_path / "r", steps=10, **rule), should_stop=lambda: next(calls) == 1)
    assert first.summary["interrupted"] and first.summary["steps"] == 2
    summary = train(tiny_config(image_folder, tmp_path / "r", steps=10, **rule)).summary
    assert (summary["steps"], summary["finished_by"]) == (4, "plateau")


def test_the_heap_is_trimmed_each_step_only_under_a_memory_ceiling_unless_asked(image_folder, tmp_path, monkeypatch):
    """Trimming costs time without a ceiling (tools/bench_overhead.py); the guard needs it under one."""
    from edge_alast.device.memory import rss_bytes
    from edge_alast.training import trainer

    calls = []
    monkeypatch.setattr(trainer, "trim_heap", lambda: calls.append(1) or True)
    train(tiny_config(image_folder, tmp_path / "free", export=False))
    assert calls == []
    train(tiny_config(image_folder, tmp_path / "asked", export=False, trim_memory=True))
    assert len(calls) == 3  # tiny_config: 3 steps
    calls.clear()
    train(tiny_config(image_folder, tmp_path / "ceiling", export=False,
                      profile=profile_file(tmp_path, rss_bytes() + 2 * 2**30)))
    assert len(calls) == 3
