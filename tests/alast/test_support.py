"""Model coverage: every timm ViT-family model either trains one ALaST step correctly or is refused at start.

Registry-driven: the names come from ``timm.list_models`` for the families in ``FAMILIES``. Names that build the same
structure (model, block and attention classes; class token, prefix tokens, pooling, rotary embeddings, qk-norm,
split q/v biases, LayerScale, patch embedding, pre-norm) are one case; each name is built once on the meta device
to find its structure (no memory, no real init), and one name per structure is built tiny on the CPU and tested.
``EXTRA_CASES`` add variants no registry name has (qk-norm, ResPostBlock with a class token, other depths/widths),
built the way ``model_args`` in a run file builds them.

A supported model: the patched model with nothing dropped or frozen equals the unpatched one (outputs and grads);
before block 0 the prefix tokens are image-independent and the first patch token is not (so token 0 is a class
token and ``num_prefix_tokens`` is right); with keep ratio 0.5 after every block the token counts follow
floor(0.5 N), the prefix tokens are kept in place, every kept token is one of the block's outputs, the loss and the
importances are finite, and only trainable blocks get grads. A refused model: ``check_model`` raises a
``ConfigError`` naming the model and each missing feature, each feature is shown missing by a probe written here
(not the one in ``support.py``), and the unguarded ALaST step indeed dies or runs without a class token.

Builds are tiny (embed_dim 32, depth 2, 32x48 images) where the builder allows; see ``FALLBACKS``.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from edge_alast import _compat  # noqa: F401  (before timm)
import timm
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock

from edge_alast.errors import ConfigError
from edge_alast.adapters.lora import LoRALinear
from edge_alast.alast.patch import apply_patch
from edge_alast.alast.policy import StepPlan, count_kept
from edge_alast.alast.support import check_model, diagnose

FAMILIES = ("vit_*", "deit*", "eva*", "flexivit*", "beit*", "samvit*", "vitamin*", "naflexvit*")
# Tiny overrides. Some builders refuse some of them (hybrid stems fix their patch size, the MobileCLIP and ViTamin
# stems their width, sapiens2 its heads per block, some stems square images): the changes in FALLBACKS (None: leave
# the override out) are tried in turn, at each image size in SIZES, until the model builds and runs.
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
FALLBACKS = ({}, {"patch_size": None}, {"patch_size": None, "embed_dim": None}, {"depth": None, "num_heads": None},
             {"depth": None, "num_heads": None, "embed_dim": 192}, {"depth": None, "num_heads": None, "embed_dim": None})
SIZES = ((32, 48), 32)
MIN_PATCHES = 8  # enough patch tokens that keep 0.5 visibly drops some in each of two blocks
# Which name of a structure is tested, when it has one of these.
PREFERRED = ("vit_base_patch16_224", "deit_base_distilled_patch16_224", "vit_small_patch14_reg4_dinov2",
             "deit3_small_patch16_224", "vit_base_patch16_clip_224", "vit_small_patch14_dinov2")
# Cheap families issue 12 asks to support: each must pass check_model.
MUST_TRAIN = ("vit_base_patch16_224", "vit_base_patch32_clip_224", "deit_tiny_distilled_patch16_224",
              "deit_base_distilled_patch16_384", "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2",
              "vit_base_patch14_reg1_tipsv2", "deit3_small_patch16_224", "vit_small_patch14_dinov2",
              "flexivit_small", "vit_base_patch16_radio_v3", "vit_base_patch16_plus_240")
EXTRA_CASES = (
    ("vit_base_patch16_224", dict(qk_norm=True)),
    ("vit_small_patch14_reg4_dinov2", dict(qk_norm=True, reg_tokens=2)),
    ("vit_base_patch16_rpn_224", dict(class_token=True, global_pool="token")),  # ResPostBlock, class token
    ("deit3_small_patch16_224", dict(depth=3, embed_dim=48, num_heads=3, img_size=(48, 32))),
    ("deit_base_distilled_patch16_224", dict(depth=4, embed_dim=24, num_heads=3, mlp_ratio=2.0)),
)


@dataclass(frozen=True)
class Case:
    name: str
    extra: dict = field(default_factory=dict)
    same_structure: tuple[str, ...] = ()  # the other registry names this case stands for

    @property
    def id(self) -> str:
        if self.extra:
            return self.name + "+" + ",".join(f"{k}={v}" for k, v in self.extra.items()).replace(" ", "")
        return self.name + (f"(+{len(self.same_structure)})" if self.same_structure else "")


def _tname(obj) -> str | None:
    return None if obj is None else type(obj).__qualname__


def _structure(model: nn.Module) -> tuple:
    """What makes two models the same case for ALaST (read off the built model, independently of support.py)."""
    blocks = getattr(model, "blocks", None)
    blk = blocks[0] if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) else None
    attn = getattr(blk, "attn", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    return (
        _tname(model), _tname(blk), _tname(attn),
        bool(getattr(model, "has_class_token", False)) or getattr(model, "cls_token", None) is not None,
        min(prefix, 3) if isinstance(prefix, int) else None,  # none, class, class + one more, more
        getattr(model, "global_pool", None),
        getattr(model, "rope", None) is not None,
        _tname(getattr(attn, "q_norm", None)) not in (None, "Identity"),  # qk-norm
        getattr(attn, "q_bias", None) is not None,  # q/v biases outside qkv
        _tname(getattr(blk, "ls1", None)),  # LayerScale
        _tname(getattr(model, "patch_embed", None)),  # hybrid stems
        bool(getattr(model, "no_embed_class", False)),
        _tname(getattr(model, "norm_pre", None)),  # CLIP's pre-norm
    )


def _meta_build(name: str) -> tuple[tuple, int]:
    """The structure of ``name`` and its size (parameters at depth 1), built on the meta device."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            model = timm.create_model(name, pretrained=False, num_classes=3, depth=1)
        except Exception:  # noqa: BLE001 - builders that fix their depth
            model = timm.create_model(name, pretrained=False, num_classes=3)
    return _structure(model), sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=None)
def registry_cases() -> tuple[Case, ...]:
    names = sorted({n for pattern in FAMILIES for n in timm.list_models(pattern)})
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for name in names:
        structure, width = _meta_build(name)
        groups.setdefault(structure, []).append((width, name))
    cases = []
    for members in groups.values():
        names_in = [n for _, n in members]
        # the preferred name, else the narrowest (its builder may refuse the tiny overrides and be built as it is)
        rep = next((n for n in PREFERRED if n in names_in), min(members)[1])
        cases.append(Case(rep, same_structure=tuple(n for n in names_in if n != rep)))
    return tuple(sorted(cases, key=lambda c: c.name))


ALL_CASES = registry_cases() + tuple(Case(name, dict(extra)) for name, extra in EXTRA_CASES)


def build_tiny(name: str, extra: dict | None = None, seed: int = 0) -> tuple[nn.Module, dict]:
    """The model at the smallest overrides its builder accepts and runs; returns it and the overrides used."""
    error = None
    for size in SIZES:
        for change in FALLBACKS:
            kwargs = {k: v for k, v in {**TINY, **change, "img_size": size, **(extra or {})}.items() if v is not None}
            try:
                model = _build_and_run(name, kwargs, seed)
            except Exception as e:  # noqa: BLE001 - a builder refusing an override: try the next, smaller set
                error = e
                continue
            while _num_patches(model) < MIN_PATCHES:
                # a conv stem of stride 16/32 (hybrid ViTs): a larger image for enough patch tokens
                h, w = _hw(kwargs["img_size"])
                kwargs["img_size"] = (2 * h, 2 * w) if isinstance(kwargs["img_size"], tuple) else 2 * h
                model = _build_and_run(name, kwargs, seed)
            return model, kwargs
    raise AssertionError(f"{name}: no tiny override set builds and runs it: {error!r}")


def _build_and_run(name: str, kwargs: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    with torch.no_grad():
        model.eval()(_images(kwargs, batch=1))  # some builders accept widths their rotary tables cannot use
    return model


def _num_patches(model: nn.Module) -> int:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return math.prod(grid) if grid is not None else MIN_PATCHES  # NaFlexVit: patches of the image given


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _images(kwargs: dict, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *_hw(kwargs["img_size"]))


def _plan(depth: int, keep: float, trainable) -> StepPlan:
    return StepPlan((keep,) * depth, tuple(trainable))


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------- probes of features
def lacks_class_token(model: nn.Module, x: torch.Tensor) -> bool:
    return not any(n.rsplit(".", 1)[-1] == "cls_token" for n, _ in model.named_parameters())


def blocks_get_rotary_embeddings(model: nn.Module, x: torch.Tensor) -> bool:
    """The model hands its blocks a ``rope`` tensor built for the full patch grid."""
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("rope")), with_kwargs=True)
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        hook.remove()
    return seen[0] is not None


def has_relative_position_table(model: nn.Module, x: torch.Tensor) -> bool:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules()]
    return any("relative_position" in n or "rel_pos" in n for n in names)


def qkv_module_is_bypassed(model: nn.Module, x: torch.Tensor) -> bool:
    """A hook on ``attn.qkv`` never runs in a forward pass (the block calls F.linear on its weight)."""
    calls = []
    hook = model.blocks[0].attn.qkv.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        hook.remove()
    return not calls


def has_no_fused_qkv(model: nn.Module, x: torch.Tensor) -> bool:
    return not isinstance(dict(model.named_modules()).get("blocks.0.attn.qkv"), (nn.Linear, LoRALinear))


def attention_lacks_num_heads(model: nn.Module, x: torch.Tensor) -> bool:
    return not hasattr(getattr(model.blocks[0], "attn", None), "num_heads")


def attention_is_not_timms(model: nn.Module, x: torch.Tensor) -> bool:
    return type(getattr(model.blocks[0], "attn", None)) is not Attention


def blocks_are_not_timms(model: nn.Module, x: torch.Tensor) -> bool:
    return type(model.blocks[0]) not in (Block, ResPostBlock)


# Each line check_model can give, by its opening words, and the probe that shows the feature is really missing.
EVIDENCE = {
    "has no class token": lacks_class_token,
    "rotary position embeddings": blocks_get_rotary_embeddings,
    "relative position bias": has_relative_position_table,
    "q/v biases added outside attn.qkv": qkv_module_is_bypassed,
    "no fused attn.qkv Linear": has_no_fused_qkv,
    "attention without num_heads": attention_lacks_num_heads,
    "attention is ": attention_is_not_timms,
    "blocks are ": blocks_are_not_timms,
    "no `num_prefix_tokens`": lambda model, x: not isinstance(getattr(model, "num_prefix_tokens", None), int),
}


def _unguarded_step(model: nn.Module, x: torch.Tensor) -> Exception | None:
    """One ALaST step without check_model: the exception it dies of, or None when it ran."""
    try:
        handle = apply_patch(model)
        depth = len(model.blocks)
        handle.set_plan(_plan(depth, 0.5, [True] * depth))
        _logits(model.train()(x)).float().sum().backward()
    except Exception as e:  # noqa: BLE001 - whatever it dies of is the point
        return e
    return None


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_model_trains_one_alast_step_or_is_refused(case, record_property):
    model, kwargs = build_tiny(case.name, case.extra)
    record_property("tiny_kwargs", repr(kwargs))
    x = _images(kwargs)
    problems = diagnose(model)
    if problems:
        _assert_refused_for_a_reason(model, case.name, problems, x)
    else:
        check_model(model, case.name)  # returns quietly
        _assert_trains_one_step(model, x)


def _assert_refused_for_a_reason(model, name, problems, x):
    with pytest.raises(ConfigError) as err:
        check_model(model, name)
    message = str(err.value)
    assert message.startswith(f"--model {name}: ")
    for problem in problems:
        assert problem in message
        probe = next((f for words, f in EVIDENCE.items() if problem.startswith(words)), None)
        assert probe is not None, f"no probe for {problem!r}"
        assert probe(model, x), f"{name}: refused for {problem!r}, but {probe.__name__} does not find it"
    failure = _unguarded_step(model, x)
    assert failure is not None or lacks_class_token(model, x), (
        f"{name}: refused, yet the unguarded step ran with a class token")


def _assert_trains_one_step(model, x):
    model.train()
    reference = copy.deepcopy(model)
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    block_in, block_out = [], []
    for blk in model.blocks:  # registered before the patch's hooks: they see each block's own output
        blk.register_forward_pre_hook(lambda m, a: block_in.append(a[0].detach()))
        blk.register_forward_hook(lambda m, a, o: block_out.append(o.detach()))
    handle = apply_patch(model)

    # nothing dropped, nothing frozen: the unpatched computation, outputs and grads
    handle.set_plan(_plan(depth, 1.0, [True] * depth))
    out, ref = _logits(model(x)), _logits(reference(x))
    assert_close(out, ref)
    out.square().sum().backward(), ref.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, msg=n)
    # the model's own layout: before block 0 the prefix tokens (class first) are the same for every image, the
    # first patch token is not; so token 0 is a class token and num_prefix_tokens counts the prefix right
    first = block_in[0]
    assert_close(first[0, :prefix], first[1, :prefix])
    assert not torch.allclose(first[0, prefix], first[1, prefix])
    assert not lacks_class_token(model, x)
    model.zero_grad(set_to_none=True)
    block_in.clear(), block_out.clear()

    # keep half the patch tokens after every block; the lower half of the blocks frozen
    trainable = [i >= depth // 2 for i in range(depth)]
    handle.set_plan(_plan(depth, 0.5, trainable))
    logits = _logits(model(x))
    loss = F.cross_entropy(logits, torch.arange(x.shape[0]) % logits.shape[-1])
    assert torch.isfinite(loss)
    loss.backward()

    n_patch = handle.tokens_in[0] - prefix
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None:
        assert n_patch == math.prod(grid)
    expected = []
    for _ in range(depth):
        expected.append(prefix + n_patch)
        n_patch = count_kept(n_patch, 0.5)
    assert handle.tokens_in == expected
    assert expected[1] < expected[0], "block 0 must drop tokens"
    for i in range(depth - 1):
        nxt, prev = block_in[i + 1], block_out[i]
        assert_close(nxt[:, :prefix], prev[:, :prefix])  # class, distillation, register tokens kept, in place
        # every kept patch token is one of the block's output patch tokens
        dist = torch.cdist(nxt[:, prefix:].float(), prev[:, prefix:].float())
        assert dist.min(dim=-1).values.max() < 1e-5
    for i, blk in enumerate(model.blocks):
        for n, p in blk.named_parameters():
            assert (p.grad is not None) == trainable[i], f"block {i} {n}"
    assert all(math.isfinite(d) for d in handle.step_deltas())
    handle.remove()


def test_cases_cover_the_registry_within_budget():
    cases = registry_cases()
    names = {n for c in cases for n in (c.name,) + c.same_structure}
    assert names == {n for pattern in FAMILIES for n in timm.list_models(pattern)}
    assert len(cases) <= 60


@pytest.mark.parametrize("name", MUST_TRAIN)
def test_cheap_families_are_supported(name):
    model, _ = build_tiny(name)
    assert diagnose(model) == []
    check_model(model, name)


def test_plain_vit_trains_on_non_square_images():
    model, kwargs = build_tiny("vit_base_patch16_224")
    assert kwargs["img_size"] == (32, 48)
    assert model.patch_embed.grid_size == (4, 6)
    _assert_trains_one_step(model, _images(kwargs))


@pytest.mark.parametrize("name, words", [
    ("vit_base_patch16_siglip_224", "has no class token (global_pool='map' with class_token=False)"),
    ("vit_base_patch16_gap_224", "has no class token (global_pool='avg' with class_token=False)"),
    ("eva02_tiny_patch14_224", "rotary position embeddings (EVA-style blocks)"),
    ("vit_base_patch16_rope_224", "rotary position embeddings (EVA-style blocks)"),
    ("vit_relpos_base_patch16_cls_224", "relative position bias"),
    ("beit_base_patch16_224", "q/v biases added outside attn.qkv"),
    ("vit_base_patch16_18x2_224", "no fused attn.qkv Linear"),
    ("vit_base_patch16_xp_224", "no fused attn.qkv Linear (ParallelScalingBlock has no single `attn` module)"),
    ("eva_giant_patch14_224", "q/v biases added outside attn.qkv"),
])
def test_refusal_names_the_model_and_the_feature(name, words):
    model, _ = build_tiny(name)
    with pytest.raises(ConfigError, match=f"^--model {name}: ALaST cannot train this model: ") as err:
        check_model(model, name)
    assert words in str(err.value)


def test_lora_adapters_on_qkv_stay_supported():
    from edge_alast.adapters.lora import LoraConfig, apply_lora

    model, _ = build_tiny("vit_base_patch16_224")
    apply_lora(model, LoraConfig())
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert diagnose(model) == []


def test_unchecked_attention_is_refused_by_name_when_nothing_else_is_missing():
    # differential attention with a class token (as model_args could ask): qkv, num_heads and the class token are
    # there, but its attention is not softmax(q k^T) per head, so the class-token row ALaST computes would be wrong
    model, _ = build_tiny("vit_dwee_patch16_reg1_gap_256", dict(class_token=True, global_pool="token"))
    assert diagnose(model) == [
        "attention is timm.layers.diff_attention.DiffAttention, not timm's Attention (ALaST computes the class-token "
        "attention row as timm's Attention computes attention)"]


def test_models_without_blocks_are_refused():
    with pytest.raises(ConfigError, match="--model mlp: .*no `blocks`"):
        check_model(nn.Sequential(nn.Linear(2, 2)), "mlp")
