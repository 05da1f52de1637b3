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
