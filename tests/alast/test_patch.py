"""The ALaST mechanism on tiny timm ViTs: equivalence when nothing is dropped, exact token selection, freezing."""
import copy

import pytest
import torch
from torch.testing import assert_close

from edge_alast.alast.patch import apply_patch
from edge_alast.alast.policy import StepPlan, count_kept
from edge_alast.alast.tokens import cls_attention
from tests.helpers import TINY_MODELS, tiny_model


def _plan(depth, keep=1.0, trainable=True, recompute=False):
    as_tuple = lambda v, cast: tuple(v) if isinstance(v, (list, tuple)) else (cast(v),) * depth  # noqa: E731
    return StepPlan(as_tuple(keep, float), as_tuple(trainable, bool), as_tuple(recompute, bool))


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_budgets_one_nothing_frozen_equals_unpatched(kind):
    model = tiny_model(kind)
    reference = copy.deepcopy(model)
    model.train(), reference.train()
    x = torch.randn(4, 3, 32, 32)
    handle = apply_patch(model)
    handle.set_plan(_plan(len(model.blocks)))
    out, ref = model(x), reference(x)
    assert_close(out, ref)
    out.sum().backward(), ref.sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, msg=n)
    assert all(d is not None for d in handle.deltas)


@pytest.mark.parametrize("kind", ["vit", "deit_distilled", "vit_qknorm_reg"])
def test_training_keeps_exactly_prefix_plus_topk_cumulatively(kind):
    model = tiny_model(kind).train()
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    handle = apply_patch(model)
    handle.set_plan(_plan(depth, keep=0.5))
    seen_inputs, seen_outputs = [], []
    for blk in model.blocks:  # registered after the patch's hooks: sees the block output before selection
        blk.register_forward_pre_hook(lambda m, a: seen_inputs.append(a[0].detach()))
        blk.attn.qkv.register_forward_hook(lambda m, a, o: seen_outputs.append(o.detach()))
    model(torch.randn(2, 3, 32, 32))
    n_patch = 16
    expected_tokens = []
    for _ in range(depth):
        expected_tokens.append(prefix + n_patch)
        n_patch = count_kept(n_patch, 0.5)
    assert handle.tokens_in == expected_tokens
    for i in range(depth - 1):  # block i+1's input == select(block i's output, block i's CLS attention)
        blk = model.blocks[i]
        with torch.no_grad():
            out_i = blk.__class__.forward(blk, seen_inputs[i])  # the block's own forward, no hooks
            scores = cls_attention(seen_outputs[i], blk.attn.num_heads, blk.attn.scale, blk.attn.q_norm, blk.attn.k_norm)
        keep = count_kept(seen_inputs[i].shape[1] - prefix, 0.5)
        idx = scores[:, prefix:].topk(keep, dim=1).indices
        expected = torch.cat([out_i[:, :prefix], torch.stack([out_i[b, prefix:][idx[b].sort().values]
                                                             for b in range(2)])], dim=1)
        assert_close(seen_inputs[i + 1], expected)


@pytest.mark.parametrize("kind", ["vit", "vit_qknorm_reg"])
def test_eval_keeps_all_tokens(kind):
    model = tiny_model(kind)
    reference = copy.deepcopy(model).eval()
    handle = apply_patch(model)
    handle.set_plan(_plan(len(model.blocks), keep=0.5, trainable=False))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), reference(x))
    assert handle.tokens_in == [0] * len(model.blocks)  # no hook acted


def test_frozen_blocks_get_no_grads_and_keep_weights():
    model = tiny_model().train()
    handle = apply_patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = copy.deepcopy(model.state_dict())
    handle.set_plan(_plan(3, keep=0.75, trainable=(False, True, False)))
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for i, blk in enumerate(model.blocks):
        for p in blk.parameters():
            assert (p.grad is not None) == (i == 1)
    opt.step()
    for name, value in model.state_dict().items():
        if name.startswith(("blocks.0.", "blocks.2.")):
            assert torch.equal(value, before[name]), name
        if name == "blocks.1.mlp.fc1.weight":
            assert not torch.equal(value, before[name])


def test_nothing_below_lowest_trainable_block_stores_activations():
    model = tiny_model().train()
    for p in list(model.patch_embed.parameters()) + [model.cls_token, model.pos_embed]:
        p.requires_grad_(False)
    handle = apply_patch(model)
    handle.set_plan(_plan(3, keep=0.75, trainable=(False, False, True)))
    outputs = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, a, o: outputs.append(o))
    model(torch.randn(2, 3, 32, 32))
    assert [o.grad_fn is None for o in outputs] == [True, True, False]


def test_optimizer_state_survives_refreezing():
    model = tiny_model().train()
    handle = apply_patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w = model.blocks[0].mlp.fc1.weight
    x = torch.randn(2, 3, 32, 32)

    def step(trainable):
        handle.set_plan(_plan(3, trainable=trainable))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step((True, True, True))
    state = {k: v.clone() for k, v in opt.state[w].items()}
    step((False, True, True))
    assert torch.equal(opt.state[w]["exp_avg"], state["exp_avg"]) and opt.state[w]["step"] == state["step"]
    step((True, True, True))
    assert opt.state[w]["step"] == state["step"] + 1


def test_recompute_gives_same_loss_and_grads():
    model = tiny_model("vit_layerscale").train()
    twin = copy.deepcopy(model)
    h1, h2 = apply_patch(model), apply_patch(twin)
    h1.set_plan(_plan(3, keep=0.75, trainable=(True, False, True), recompute=False))
    h2.set_plan(_plan(3, keep=0.75, trainable=(True, False, True), recompute=True))
    x = torch.randn(2, 3, 32, 32)
    a, b = model(x), twin(x)
    assert_close(a, b)
    a.square().sum().backward(), b.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.grad is not None:
            assert_close(p.grad, q.grad, msg=n)
    assert h2.blocks[0].forward.func.__name__ == "_checkpointed"


def test_deltas_are_batch_means_independent_of_batch_size():
    model = tiny_model().train()
    handle = apply_patch(model)
    handle.set_plan(_plan(3, keep=0.75))
    x = torch.randn(3, 3, 32, 32)
    model(x)
    small = handle.step_deltas()
    model(torch.cat([x, x, x]))
    assert handle.step_deltas() == pytest.approx(small, rel=1e-5)


def test_remove_restores_model():
    model = tiny_model()
    reference = copy.deepcopy(model)
    handle = apply_patch(model)
    handle.set_plan(_plan(3, keep=0.5, trainable=False, recompute=True))
    handle.remove()
    model.train(), reference.train()
    x = torch.randn(2, 3, 32, 32)
    assert_close(model(x), reference(x))
    assert all(p.requires_grad for p in model.parameters())
    assert "forward" not in vars(model.blocks[0])


def test_rejects_models_without_vit_blocks():
    with pytest.raises(TypeError, match="blocks"):
        apply_patch(torch.nn.Linear(2, 2))


def test_coauthors_budgets_move_within_the_forward_that_measures_them():
    """Each block's keep ratio is Eq. 6 applied to the batch-summed delta that this very forward measured (their
    torch.norm(cls_out - cls_in) ** 2), and the kept count is int(b * N), N counting the class token; the policy's
    budgets after observing the step are the ratios the forward used."""
    from edge_alast.alast.policy import AlastConfig, AlastPolicy

    model = tiny_model("vit").train()
    depth = len(model.blocks)
    policy = AlastPolicy(depth, AlastConfig(update="coauthors", alpha=2e-3, seed=0))
    handle = apply_patch(model)
    inputs = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    for _ in range(2):  # the second step starts from the first step's deltas
        inputs.clear()
        plan = policy.decide()
        handle.set_plan(plan)
        model(torch.randn(3, 3, 32, 32))
        expected = []
        for i, blk in enumerate(model.blocks):
            with torch.no_grad():
                out = blk.__class__.forward(blk, inputs[i])
            delta = torch.norm(out[:, 0] - inputs[i][:, 0], p=2).item() ** 2  # their measure, batch sum
            budget = max(0.5, min(plan.live.budgets[i] + (delta - plan.live.prev_deltas[i]) * 2e-3, 1.0))
            expected.append(budget)
            if i + 1 < depth:
                n = inputs[i].shape[1]  # every token entering block i, the class token included
                assert inputs[i + 1].shape[1] == 1 + min(n - 1, int(budget * n)), i
        assert handle.applied_plan().keep_ratios == pytest.approx(tuple(expected), rel=1e-5)
        assert handle.step_deltas("sum") == pytest.approx(
            [d * 3 for d in handle.step_deltas()], rel=1e-5)  # batch sum = 3 x batch mean
        policy.observe(handle.step_deltas("sum"))
        assert policy.budgets == pytest.approx(expected, rel=1e-5)
    assert any(b < 1.0 for b in expected)  # tokens were really dropped in the last step


def test_eval_view_drops_tokens_in_eval_mode():
    from edge_alast.training.evaluate import train_view

    model = tiny_model("vit").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with train_view(model, [1.0] * 3):
            assert_close(model(x), reference)  # every token: the same model
        with train_view(model, [0.5] * 3) as handle:
            dropped = model(x)
            assert handle.tokens_in == [17, 9, 5]  # 16 patches -> 8 -> 4, plus the class token
    assert not torch.allclose(dropped, reference)
    assert_close(model(x), reference)  # the view is removed on leaving
    assert all(p.requires_grad for p in model.parameters())
