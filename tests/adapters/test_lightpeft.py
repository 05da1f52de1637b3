"""Light-PEFT: masks, the pruning plan, physical pruning (equal to masking), adapter/rank pruning, the trainer."""
import json

import pytest
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from edge_alast.errors import ConfigError
from edge_alast.adapters.lightpeft import (ImportanceRecorder, InputMask, LightPeftConfig, adapters, add_masks, apply_pruning,
                                  mask_penalty, plan_pruning, structure_from_state_dict)
from edge_alast.adapters.lora import LoRALinear, LoraConfig, apply_lora, merge_lora
from edge_alast.training.trainer import train
from tests.helpers import tiny_config

SIX_HEADS = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=6, mlp_ratio=2.0, num_classes=5)


def six_heads(seed=0, lora=True, init_values=None):
    torch.manual_seed(seed)
    model = VisionTransformer(**SIX_HEADS, init_values=init_values).eval()
    if lora:
        apply_lora(model, LoraConfig(r=4))
        g = torch.Generator().manual_seed(seed + 1)
        for m in adapters(model).values():
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    return model


def keep_all(model):
    return {"heads": [list(range(b.attn.num_heads)) for b in model.blocks],
            "units": [list(range(b.mlp.fc1.out_features)) for b in model.blocks],
            "adapters": {n: list(range(m.r)) for n, m in adapters(model).items()}}


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("lora", [False, True])
def test_masks_at_one_and_nothing_pruned_equal_the_original(lora):
    model = six_heads(lora=lora, init_values=0.1)
    ref = model(X)
    add_masks(model)
    assert len([m for m in model.modules() if isinstance(m, InputMask)]) == 2 * 3
    torch.testing.assert_close(model(X), ref)
    apply_pruning(model, keep_all(model))
    assert not [m for m in model.modules() if isinstance(m, InputMask)]
    torch.testing.assert_close(model(X), ref)


@pytest.mark.parametrize("lora", [False, True])
def test_pruning_removes_exactly_the_chosen_heads_and_units_and_equals_zeroed_masks(lora):
    model = six_heads(lora=lora)
    add_masks(model)
    g = torch.Generator().manual_seed(3)
    for block in model.blocks:  # trained-looking masks: the kept ones' values get folded into the weights
        block.attn.proj.mask.data = torch.rand(6, generator=g) + 0.5
        block.mlp.fc2.mask.data = torch.rand(96, generator=g) + 0.5
    spec = keep_all(model)
    spec["heads"] = [[0, 2, 3, 5], [1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    spec["units"] = [list(range(0, 96, 2)), list(range(60)), list(range(90))]
    originals = [(b.attn.qkv.weight.detach().clone() if not lora else b.attn.qkv.base.weight.detach().clone(),
                  (b.mlp.fc1.weight if not lora else b.mlp.fc1.base.weight).detach().clone()) for b in model.blocks]
    for i, block in enumerate(model.blocks):
        for h in set(range(6)) - set(spec["heads"][i]):
            block.attn.proj.mask.data[h] = 0
        for u in set(range(96)) - set(spec["units"][i]):
            block.mlp.fc2.mask.data[u] = 0
    masked = model(X)
    apply_pruning(model, spec)
    torch.testing.assert_close(model(X), masked, atol=1e-5, rtol=1e-5)
    for i, block in enumerate(model.blocks):
        heads = spec["heads"][i]
        assert block.attn.num_heads == len(heads) and block.attn.attn_dim == 8 * len(heads)
        qkv = block.attn.qkv.base.weight if lora else block.attn.qkv.weight
        assert qkv.shape == (3 * 8 * len(heads), 48)
        rows = [s * 48 + h * 8 + d for s in range(3) for h in heads for d in range(8)]
        torch.testing.assert_close(qkv, originals[i][0][rows])  # exactly the kept heads' q, k and v rows
        fc1 = block.mlp.fc1.base.weight if lora else block.mlp.fc1.weight
        torch.testing.assert_close(fc1, originals[i][1][spec["units"][i]])
        assert block.mlp.fc2.in_features == len(spec["units"][i])


def test_plan_pruning_ratios_per_layer_heads_and_global_units():
    model = six_heads(lora=False)
    add_masks(model)
    for i, block in enumerate(model.blocks):
        block.attn.proj.mask.data = torch.tensor([0.9, 0.1, 0.8, -0.05, 0.7, 0.6])  # |m|: heads 1 and 3 lowest
        block.mlp.fc2.mask.data = torch.full((96,), 1.0)
    model.blocks[2].mlp.fc2.mask.data[:] = 0.01  # block 2's units are the globally least important: all but one go
    spec = plan_pruning(model, LightPeftConfig(), recorder=None)
    assert spec["heads"] == [[0, 2, 4, 5]] * 3  # floor(6/3) = 2 per layer
    # floor(288/3) = 96 units go: 95 of block 2 (it keeps one), then the lowest remaining one (a tie at 1.0
    # broken by block index, then unit index: block 0's unit 0).
    assert [len(u) for u in spec["units"]] == [95, 96, 1]
    assert spec["units"][0] == list(range(1, 96))


def _recorder_with(model, module_scores, rank_scores):
    rec = ImportanceRecorder(model, estimation_steps=4)
    rec.module_sum = dict(module_scores)
    rec.rank_sum = {n: torch.tensor(v, dtype=torch.float32) for n, v in rank_scores.items()}
    rec.count = 1
    return rec


def test_module_removal_and_global_rank_pruning():
    model = six_heads()
    add_masks(model)
    names = sorted(adapters(model))
    assert len(names) == 12
    scores = {n: float(i) for i, n in enumerate(names)}  # the last 3 names are the most important
    ranks = {n: [0.0, 0.0, 0.0, 0.0] for n in names}
    top = names[-3:]
    ranks[top[0]] = [5.0, 1.0, 4.0, 0.5]
    ranks[top[1]] = [3.0, 0.1, 0.2, 0.3]
    ranks[top[2]] = [0.01, 0.02, 0.03, 0.04]  # kept as a module, but all its ranks lose: removed
    cfg = LightPeftConfig(module_keep_ratio=0.25, rank_keep_ratio=0.5, head_prune_ratio=0.0, ffn_prune_ratio=0.0)
    spec = plan_pruning(model, cfg, _recorder_with(model, scores, ranks))
    assert spec["adapters"] == {top[0]: [0, 1, 2, 3], top[1]: [0, 3]}  # 6 of 12 ranks, by importance
    # Pruning ranks equals zeroing the pruned ranks' B columns; removed modules equal zeroing their B.
    reference = six_heads()
    add_masks(reference)
    for n, m in adapters(reference).items():
        keep = spec["adapters"].get(n, [])
        with torch.no_grad():
            for r in range(4):
                if r not in keep:
                    m.lora_B[:, r] = 0
    expected = reference(X)
    apply_pruning(model, spec)
    left = adapters(model)
    assert sorted(left) == sorted(spec["adapters"]) and left[top[1]].r == 2
    assert isinstance(model.get_submodule(top[2]), nn.Linear)  # the base Linear is back in its place
    torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=1e-5)


def test_recorder_averages_the_second_half_and_round_trips():
    model = six_heads().train()
    add_masks(model)
    rec = ImportanceRecorder(model, estimation_steps=4)
    for step in range(4):
        rec.before_forward(step)
        model(X).sum().backward()
        rec.after_backward(step)
        model.zero_grad(set_to_none=True)
    assert rec.count == 2  # steps 2 and 3
    imp = rec.module_importance()
    assert len(imp) == 12 and all(v > 0 for v in imp.values())
    assert all(t.shape == (4,) for t in rec.rank_importance().values())
    other = ImportanceRecorder(model, estimation_steps=4)
    other.load_state_dict(rec.state_dict())
    assert other.module_importance() == imp
    rec.stop()
    other.stop()
    assert not any(m._forward_hooks or m.dropout._forward_hooks for m in adapters(model).values())


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_recorder_measures_each_adapters_importance_from_its_own_forward(dropout):
    """||dW x|| / ||W x|| with W x the base product without bias, x scaled by the mask, dW x as the forward computed it
    (the same dropout mask): the hooks see the adapter's input, LoRALinear knows nothing of them."""
    torch.manual_seed(0)
    inner = LoRALinear(nn.Linear(8, 4), r=2, alpha=2.0, dropout=dropout)
    with torch.no_grad():
        inner.lora_B.fill_(0.1)
    masked = InputMask(inner, groups=4, group_size=2)
    with torch.no_grad():
        masked.mask.copy_(torch.tensor([1.0, 0.5, 2.0, 0.0]))
    model = nn.Module()
    model.adapter = masked
    rec = ImportanceRecorder(model, estimation_steps=2)
    x = torch.randn(5, 8)
    rec.before_forward(1)
    out = masked(x)
    xs = x * masked.expanded()
    delta = out - inner.base(xs)  # the forward's own adapter contribution, its dropout mask included
    expected = delta.norm() / nn.functional.linear(xs, inner.base.weight).norm()
    torch.testing.assert_close(rec._importance["adapter"], expected.detach(), rtol=1e-5, atol=0)
    rec.before_forward(0)  # the first half: nothing measured
    masked(x)
    assert rec._importance == {}


def _estimate(dropout):
    """A short Light-PEFT estimation of a fixed model (masks under L1, adapters trained), then the pruning plan."""
    torch.manual_seed(0)
    model = VisionTransformer(**SIX_HEADS)
    apply_lora(model, LoraConfig(r=4, dropout=dropout))
    add_masks(model)
    model.train()
    rec = ImportanceRecorder(model, estimation_steps=6)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.005)
    y = torch.tensor([0, 3])
    for step in range(6):
        rec.before_forward(step)
        (nn.functional.cross_entropy(model(X), y) + 1e-2 * mask_penalty(model)).backward()
        rec.after_backward(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rec.stop()
    cfg = LightPeftConfig(head_prune_ratio=0.34, ffn_prune_ratio=0.1, module_keep_ratio=0.5, rank_keep_ratio=0.5)
    return plan_pruning(model, cfg, rec), rec.module_importance()


# Recorded with the importance measured inside LoRALinear.forward (before Light-PEFT's hooks): the same heads, units,
# adapters and ranks must be chosen, from the same importances.
ESTIMATED = {
    0.0: {"heads": [[1, 2, 3, 5], [1, 2, 3, 5], [0, 2, 3, 4]],
          "dropped_units": [[17, 18, 33, 35, 52, 59, 63, 66, 68, 73, 78, 83, 89], [2, 31, 46, 77, 88, 91],
                            [10, 13, 30, 33, 35, 53, 59, 74, 79]],
          "adapters": {"blocks.1.attn.proj": [1, 2], "blocks.1.attn.qkv": [1, 2, 3], "blocks.1.mlp.fc1": [0, 1, 2],
                       "blocks.2.attn.proj": [0, 1, 2], "blocks.2.attn.qkv": [3]},
          "importance": {"blocks.0.attn.proj": 0.339101, "blocks.0.attn.qkv": 0.41082, "blocks.0.mlp.fc1": 0.300735,
                         "blocks.0.mlp.fc2": 0.258601, "blocks.1.attn.proj": 0.878188, "blocks.1.attn.qkv": 0.688604,
                         "blocks.1.mlp.fc1": 0.501558, "blocks.1.mlp.fc2": 0.300435, "blocks.2.attn.proj": 0.735169,
                         "blocks.2.attn.qkv": 0.439528, "blocks.2.mlp.fc1": 0.389085, "blocks.2.mlp.fc2": 0.277556}},
    0.3: {"heads": [[0, 1, 3, 5], [0, 1, 2, 3], [0, 2, 3, 4]],
          "dropped_units": [[17, 18, 22, 31, 40, 59, 63, 68, 73, 83, 89, 95], [1, 18, 21, 51, 60, 77, 80, 87],
                            [6, 7, 33, 35, 59, 60, 74, 79]],
          "adapters": {"blocks.0.attn.qkv": [1, 3], "blocks.1.attn.proj": [2, 3], "blocks.1.attn.qkv": [2, 3],
                       "blocks.2.attn.proj": [0], "blocks.2.attn.qkv": [0, 3], "blocks.2.mlp.fc1": [0, 2, 3]},
          "importance": {"blocks.0.attn.proj": 0.358325, "blocks.0.attn.qkv": 0.521005, "blocks.0.mlp.fc1": 0.485254,
                         "blocks.0.mlp.fc2": 0.3092, "blocks.1.attn.proj": 0.546868, "blocks.1.attn.qkv": 0.615693,
                         "blocks.1.mlp.fc1": 0.513488, "blocks.1.mlp.fc2": 0.429976, "blocks.2.attn.proj": 0.682503,
                         "blocks.2.attn.qkv": 0.543861, "blocks.2.mlp.fc1": 0.547855, "blocks.2.mlp.fc2": 0.273857}},
}


@pytest.mark.parametrize("dropout", sorted(ESTIMATED))
def test_estimation_prunes_the_same_heads_units_and_ranks_as_before_the_hooks(dropout):
    spec, importance = _estimate(dropout)
    expected = ESTIMATED[dropout]
    assert spec["heads"] == expected["heads"]
    assert [sorted(set(range(96)) - set(u)) for u in spec["units"]] == expected["dropped_units"]
    assert spec["adapters"] == expected["adapters"]
    # Recorded (rounded to 6 places) with 2 threads; one thread sums in another order and moves them by up to 1e-5
    # relative, far below what would change a pruning decision or reveal a different metric.
    assert importance == pytest.approx(expected["importance"], rel=1e-4)


def test_mask_penalty_is_l1_of_masks():
    model = six_heads(lora=False)
    add_masks(model)
    assert float(mask_penalty(model).detach()) == pytest.approx(3 * (6 + 96))


def test_structure_read_back_from_pruned_weights():
    model = six_heads(lora=False)
    add_masks(model)
    spec = keep_all(model)
    spec["heads"][1] = [1, 4]
    spec["units"][2] = list(range(10))
    apply_pruning(model, spec)
    state = model.state_dict()
    fresh = six_heads(lora=False, seed=5)
    structure = structure_from_state_dict(fresh, state)
    assert [len(h) for h in structure["heads"]] == [6, 2, 6] and [len(u) for u in structure["units"]] == [96, 96, 10]
    apply_pruning(fresh, structure)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(X), model(X))
    assert structure_from_state_dict(six_heads(lora=False), six_heads(lora=False).state_dict()) is None


# ------------------------------------------------------------------------------------------------ in the trainer
def lp_config(data, out, method="light-peft", **kw):
    base = dict(method=method, steps=6, light_peft={"estimation_steps": 4, "module_keep_ratio": 0.5},
                lora={"r": 4}, model_args={k: v for k, v in SIX_HEADS.items() if k not in ("img_size", "num_classes")})
    base.update(kw)
    return tiny_config(data, out, **base)


def _steps(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["light-peft", "light-peft+alast"])
def test_light_peft_run_prunes_then_fine_tunes_and_exports_smaller(image_folder, tmp_path, method):
    events = []
    summary = train(lp_config(image_folder, tmp_path / "run", method=method, export=True),
                    on_event=events.append).summary
    prune = [e for e in events if e["event"] == "prune"]
    assert len(prune) == 1 and prune[0]["step"] == 5  # the first step on the pruned model
    assert prune[0]["heads_per_block"] == [4, 4, 4]
    assert sum(prune[0]["ffn_units_per_block"]) == 3 * 96 - 96
    assert summary["pruning"]["adapters_kept"] == len(summary["pruning"]["adapter_ranks"]) <= 6
    assert summary["base_params"] < summary["base_params_original"]
    lines = _steps(tmp_path / "run")
    assert [r["step"] for r in lines if r["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    if method == "light-peft+alast":
        assert len(lines[-1]["blocks/trainable"]) == 3 and lines[-1]["tokens/per_block"][-1] < 17
    full = train(lp_config(image_folder, tmp_path / "lora", method="lora", export=True)).summary
    assert summary["trainable_params"] < full["trainable_params"]
    assert (tmp_path / "run" / "model.onnx").stat().st_size < (tmp_path / "lora" / "model.onnx").stat().st_size


@pytest.mark.parametrize("stop_after", [3, 5])  # mid-estimation (1 of 2 steps recorded); after pruning
def test_resume_light_peft_equals_uninterrupted(image_folder, tmp_path, stop_after):
    reference = train(lp_config(image_folder, tmp_path / "ref")).summary
    calls = iter(range(100))
    stopped = train(lp_config(image_folder, tmp_path / "r"), should_stop=lambda: next(calls) == stop_after - 1).summary
    assert stopped["interrupted"] and stopped["steps"] == stop_after
    resumed = train(lp_config(image_folder, tmp_path / "r")).summary
    losses = lambda d: [r["loss"] for r in _steps(d) if r["event"] == "step"]  # noqa: E731
    assert losses(tmp_path / "r") == pytest.approx(losses(tmp_path / "ref"), rel=1e-6)
    assert resumed["pruning"] == reference["pruning"]
    prunes = [r for r in _steps(tmp_path / "r") if r["event"] == "prune"]
    assert len(prunes) == 1 and prunes[0]["step"] == 5
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)


def test_light_peft_needs_steps_after_estimation(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--steps"):
        train(lp_config(image_folder, tmp_path / "r", steps=4))
    with pytest.raises(ConfigError, match="--estimation-steps"):
        train(lp_config(image_folder, tmp_path / "r", steps=None, epochs=0.1))
    with pytest.raises(ConfigError, match="unknown light_peft keys"):
        lp_config(image_folder, tmp_path / "r", light_peft={"estimation_step": 3})


@pytest.mark.parametrize("method", ["lora", "alast-lora", "light-peft+alast"])
def test_adapter_methods_run_under_a_device_profile(image_folder, tmp_path, method):
    summary = train(lp_config(image_folder, tmp_path / "run", method=method, profile="raspberry_pi_4_4gb",
                              device="cpu")).summary
    assert summary["profile"] == "raspberry_pi_4_4gb"
    assert 0 < summary["predicted_peak_bytes"] <= summary["memory_ceiling_bytes"]
