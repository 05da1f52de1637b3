"""Stages: Light-PEFT's estimation stage pruned into the fine-tuning stage, and a stage's state restored exactly."""
import pytest
import torch

from edge_alast.training.run import setup_run
from edge_alast.training.stage import first_stage, next_stage
from tests.helpers import tiny_config


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
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(other.policy.state_dict(), stage.policy.state_dict(), **exact)
    torch.testing.assert_close(other.optimizer.state_dict(), stage.optimizer.state_dict(), **exact)
    assert other.scheduler.state_dict() == stage.scheduler.state_dict()
    # restored exactly: the next plans (budgets, and the sampler's draws for ALaST) are the same
    assert [other.policy.decide(run.caps) for _ in range(5)] == [stage.policy.decide(run.caps) for _ in range(5)]
