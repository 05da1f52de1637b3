"""The method table, by what each method does: every method trains a step of a tiny model on exactly the parameters
its record names, drops tokens only where ALaST runs, and is planned as what its first stage does."""
import pytest
import torch
import torch.nn.functional as F

from edge_alast.alast.policy import AlastPolicy
from edge_alast.methods import BLOCKS_ADAPTERS, BLOCKS_ALL, BLOCKS_NONE, ESTIMATE, FINETUNE, METHODS, method_spec
from edge_alast.model.names import ADAPTER_PARAMS, block_index, is_head
from edge_alast.training.run import setup_run
from edge_alast.training.stage import first_stage
from tests.helpers import tiny_config

PATCH_TOKENS = 16  # 32 px images, 8 px patches


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_a_step_on_what_its_record_names(image_folder, tmp_path, name):
    spec = METHODS[name]
    extra = {"light_peft": {"estimation_steps": 2}} if spec.light_peft else {}
    run = setup_run(tiny_config(image_folder, tmp_path / "r", method=name, **extra))
    stage = first_stage(run)
    assert stage.name == spec.stages[0]

    # what can train in a block is the record's `blocks`: every parameter, the adapters and masks, or nothing
    in_blocks = {n for n in stage.trainable.names if block_index(n) is not None}
    leaves = {n.rsplit(".", 1)[-1] for n in in_blocks}
    if spec.blocks == BLOCKS_ALL:
        assert in_blocks == {n for n, _ in run.model.blocks.named_parameters(prefix="blocks")}
    elif spec.blocks == BLOCKS_ADAPTERS:
        assert leaves and leaves <= set(ADAPTER_PARAMS)
        assert {"lora_A", "lora_B"} <= leaves and ("mask" in leaves) == (stage.name == ESTIMATE)
    else:
        assert spec.blocks == BLOCKS_NONE and not in_blocks
    assert any(is_head(n) for n in stage.trainable.names)

    # one step: only what the record names (in the blocks the plan lets train) changes, and the head always does
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    plan = stage.policy.decide(run.caps)
    stage.handle.set_plan(plan)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    F.cross_entropy(run.model(x), y).backward()
    stage.optimizer.step()
    changed = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= stage.trainable.names and any(is_head(n) for n in changed)
    assert {block_index(n) for n in changed} - {None} <= {i for i, t in enumerate(plan.trainable) if t}

    # tokens are dropped only where ALaST decides the stage's steps, and the planner costs the method by that stage
    alast = spec.uses_alast(stage.name)
    assert isinstance(stage.policy, AlastPolicy) == alast
    kept = stage.handle.tokens_in[-1] - run.model.num_prefix_tokens
    assert (kept < PATCH_TOKENS) == alast
    assert spec.plan_kind == ("head" if spec.blocks == BLOCKS_NONE else "alast" if alast else "full")


def test_light_peft_stages_and_alast_only_when_fine_tuning():
    spec = METHODS["light-peft+alast"]
    assert spec.stages == (ESTIMATE, FINETUNE)
    assert not spec.uses_alast(ESTIMATE) and spec.uses_alast(FINETUNE)
    assert METHODS["alast"].stages == (FINETUNE,) and METHODS["alast"].uses_alast(FINETUNE)
    assert not METHODS["lora"].uses_alast(FINETUNE)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(KeyError, match="known: alast, full"):
        method_spec("qlora")


def test_every_method_has_a_summary_for_help():
    assert all(spec.summary for spec in METHODS.values())
