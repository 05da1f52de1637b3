"""setup_run: a config resolved into a run (profile, data, model, what trains, plan, the checkpoint to resume)."""
from edge_alast.training.stage import first_stage
from edge_alast.training.run import plan_for, setup_run
from tests.helpers import profile_file, tiny_config


def test_setup_without_profile_builds_everything_and_plans_nothing(image_folder, tmp_path):
    run = setup_run(tiny_config(image_folder, tmp_path / "r", method="alast"))
    assert run.plan is None and run.guard is None and run.checkpoint is None
    assert run.classes == ["a", "b"] and len(run.train_samples) + len(run.val_samples) == 12
    assert run.order.batch_size == 4 and run.total_steps == 3 and run.depth == 3
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == run.trainable.names
    assert not any(n.startswith("patch_embed.") for n in run.trainable.names)  # alast freezes the embeddings
    free = plan_for(run, None)  # tools plan without ceilings for the cost model's predictions
    assert free.memory_ceiling_bytes is None and free.predicted_peak_bytes > 0 and free.cost is not None


def test_setup_with_profile_plans_caps_and_guards(image_folder, tmp_path):
    from edge_alast.device.memory import rss_bytes

    run = setup_run(tiny_config(image_folder, tmp_path / "r", profile=profile_file(tmp_path, rss_bytes() + 2**31)))
    assert run.plan is not None and run.caps == run.plan.caps and run.guard is not None
    assert run.guard.ceiling_bytes == run.plan.memory_ceiling_bytes
    policy = first_stage(run).policy  # the guard has no policy of its own: it predicts with the one it is given
    assert run.guard.predict(run.caps, policy) == run.plan.cost.worst_peak(
        policy.worst_plans(run.caps), run.order.batch_size)["train_peak"]
    # a resume that restores another batch size replaces run.order after the guard exists: the guard follows it
    from edge_alast.data.loader import BatchOrder

    run.order = BatchOrder(len(run.train_samples), run.order.batch_size * 2, 0)
    assert run.guard.predict(run.caps, policy) == run.plan.cost.worst_peak(
        policy.worst_plans(run.caps), run.order.batch_size)["train_peak"]
