"""setup_run: a config resolved into a run (profile, data, model, what trains, plan, the checkpoint to resume)."""
import pytest
import torch

from edge_alast.training.run import plan_for, setup_run
from edge_alast.training.stage import first_stage, next_stage

from test_trainer import _profile_file, tiny_config


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

    run = setup_run(tiny_config(image_folder, tmp_path / "r", profile=_profile_file(tmp_path, rss_bytes() + 2**31)))
    assert run.plan is not None and run.caps == run.plan.caps and run.guard is not None
    assert run.guard.ceiling_bytes == run.plan.memory_ceiling_bytes
    policy = first_stage(run).policy  # the guard has no policy of its own: it predicts with the one it is given
    assert run.guard.predict(run.caps, policy) == run.plan.cost.worst_peak(
        policy.worst_plans(run.caps), run.order.batch_size)["train_peak"]


def test_light_peft_stage_transition_prunes_and_rebuilds(image_folder, tmp_path):
    run = setup_run(tiny_config(image_folder, tmp_path / "r", method="light-peft+alast", steps=6,
                                light_peft={"estimation_steps": 4, "module_keep_ratio": 0.5}))
    stage = first_stage(run)
    assert stage.name == "estimate" and stage.end_step == 4 and stage.recorder is not None
    assert type(stage.policy).__name__ == "StaticPolicy"  # estimation: every block, every token
    x = torch.randn(2, 3, 32, 32)
    for step in range(4):
        stage.handle.set_plan(stage.policy.decide(run.caps))
        stage.recorder.before_forward(step)
        run.model(x).sum().backward()
        stage.recorder.after_backward(step)
        stage.optimizer.zero_grad(set_to_none=True)
    params_before = sum(p.numel() for p in run.model.parameters())
    nxt = next_stage(run, stage)
    assert nxt.name == "finetune" and nxt.pruning is not None and nxt.recorder is None
    assert type(nxt.policy).__name__ == "AlastPolicy"
    assert sum(p.numel() for p in run.model.parameters()) < params_before
    # the new record names the pruned model's parameters, and only they train
    assert nxt.trainable.names == {n for n, p in run.model.named_parameters() if p.requires_grad}
    state = nxt.state_dict()
    assert state["pruning"] is nxt.pruning and state["estimation"] is None


@pytest.mark.parametrize("method", ["alast", "lora"])
def test_stage_state_round_trips(image_folder, tmp_path, method):
    run = setup_run(tiny_config(image_folder, tmp_path / "r", method=method))
    stage = first_stage(run)
    stage.handle.set_plan(stage.policy.decide(run.caps))
    run.model(torch.randn(2, 3, 32, 32)).sum().backward()
    stage.optimizer.step()
    stage.policy.observe(stage.handle.step_deltas())
    state = stage.state_dict()
    other = first_stage(setup_run(tiny_config(image_folder, tmp_path / "r2", method=method)))
    other.load_state_dict(state)
    assert other.policy.state_dict().keys() == stage.policy.state_dict().keys()
    assert other.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()
