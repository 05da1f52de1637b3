"""Which timm models ALaST can train: ``check_model`` refuses the others at start, naming what they lack.

ALaST (:mod:`edge_alast.alast.patch`) needs, in every block, a timm ``Attention`` whose fused ``attn.qkv`` Linear is
called as a module (its forward hook reads q of the class token and K) and a block that works on any number of
tokens; and, in the model, a class token at index 0 followed by ``num_prefix_tokens - 1`` other prefix tokens.
Support is decided from the built model's structure, not from its name.

Trains (timm 1.0.31; tests/test_model_support.py builds one tiny model per distinct structure): ``vit_*`` with a
class token (``vit_tiny..gigantic_*``, ``*_clip_*``, ``*_dinov2``, ``*_reg4_dinov2``, ``*_reg1_tipsv2``,
``*_radio_v3/v4``, ``*_miil``, ``*_plus_*``, ``*_36x1``, ``vit_intern300m_*``), ``deit_*``, ``deit_*_distilled_*``
(class + distillation token), ``deit3_*`` (LayerScale), ``flexivit_*``, ``beit3_*`` and ``eva_large_patch14_*``
(timm ``VisionTransformer``s), the hybrids ``vit_*_r26/r50_*``, ``vit_*_resnet*``, ``vit_tiny_r_s16_p8_*`` and
``vit_base_mci_224``, ``naflexvit_*_radio_*`` (on plain image batches), and the qk-norm, register-token,
``ResPostBlock``, depth and width variants a run file's ``model_args`` can ask of them.

Refused, with the reason (a model may have several):

- no class token: ``vit_*_gap_*``, ``*_siglip_*``, ``vit_*_reg*_gap_*``, ``vit_so150m*``, ``*_rpn_*``,
  ``vitamin_*``, ``samvit_*``, ``vit_relpos_*`` without ``cls``, the other ``naflexvit_*``. ALaST measures each
  block's importance as the class token's change and ranks patch tokens by the class token's attention; without
  one both come from patch token 0 (or a register token), which is silent garbage.
- rotary position embeddings: ``eva02_*``, ``vit_*_rope_*``, ``*_dinov3*``, ``vit_pe_*``, ``*_lingbot``,
  ``*_sapiens2``: the rotation table is built for the full token grid and cannot follow the kept tokens.
- relative position bias over the patch grid: ``beit_*``, ``beitv2_*``, ``vit_relpos_*``, ``vit_srelpos_*``,
  ``samvit_*``: the bias table is indexed by the full grid.
- q/v biases added outside ``attn.qkv`` (``eva_giant_*``, ``eva02_enormous_*``, ``beit*`` and several rotary
  models): the block calls ``F.linear(x, qkv.weight, bias)``, so a hook on ``attn.qkv`` never runs.
- no single fused ``attn.qkv``: ``ParallelThingsBlock`` (``vit_*_18x2_224``), ``ParallelScalingBlock``
  (``vit_*_xp_224``, ``vit_pwee_*``, ``vit_dpwee_*``), separate q/k/v projections (``eva02_base/large_*``,
  ``*_sapiens2``).
- a block or attention class the hooks were not checked against, when nothing above applies (e.g. differential
  attention, ``vit_dwee_*``/``vit_dlittle_*``, given a class token through ``model_args``).
"""
from __future__ import annotations

from torch import nn

from .. import _compat  # noqa: F401  (timm import fix)
from ..errors import ConfigError
from ..adapters.lora import LoRALinear
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock

# Block and attention classes whose forward the hooks in patch.py were checked against (tests/test_patch.py,
# tests/test_model_support.py): a block forward(x, attn_mask=None, ...) that accepts any token count, an attention
# that calls `self.qkv(x)` and computes softmax(q_norm(q) k_norm(k)^T * scale) per head.
SUPPORTED_BLOCKS = (Block, ResPostBlock)
SUPPORTED_ATTENTION = (Attention,)

# Attributes that hold a relative-position bias over the patch grid (BEiT, vit_relpos, SAM).
_REL_POS_ATTRS = ("relative_position_bias_table", "rel_pos", "rel_pos_h", "rel_pos_bias", "shared_rel_pos")


def diagnose(model: nn.Module) -> list[str]:
    """What keeps ALaST from training ``model``: one line per missing feature, empty when it is supported.

    The features ALaST is known to need come first; a block or attention class the hooks were not checked against is
    named only when nothing more specific explains the refusal.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return [f"no `blocks` of transformer blocks ({type(model).__name__}): not a timm ViT"]
    problems, unknown = [], []
    if not has_class_token(model):
        pool = getattr(model, "global_pool", None)
        problems.append(f"has no class token (global_pool={pool!r} with class_token=False): ALaST measures block "
                        "importance on the class token and ranks patch tokens by its attention")
    elif not isinstance(getattr(model, "num_prefix_tokens", None), int):
        problems.append("no `num_prefix_tokens`: cannot tell the class/register tokens from the patch tokens")
    if getattr(model, "rope", None) is not None or any("Rotary" in type(m).__name__ for m in model.modules()):
        problems.append("rotary position embeddings (EVA-style blocks): the rotation table is built for the full "
                        "token grid and cannot follow the kept tokens")
    if any(getattr(m, a, None) is not None for m in model.modules() for a in _REL_POS_ATTRS):
        problems.append("relative position bias (BEiT/relpos/SAM-style attention): the bias table is indexed by the "
                        "full patch grid and cannot follow the kept tokens")
    for blk in blocks:
        known, other = _diagnose_block(blk)
        problems += [p for p in known if p not in problems]
        unknown += [p for p in other if p not in unknown]
    return problems or unknown


def has_class_token(model: nn.Module) -> bool:
    """Whether the model puts a class token first (timm's ``has_class_token``; NaFlexVit keeps its ``cls_token`` in
    ``model.embeds``, the others on the model)."""
    flag = getattr(model, "has_class_token", None)
    return bool(flag) if flag is not None else getattr(model, "cls_token", None) is not None


def _diagnose_block(blk: nn.Module) -> tuple[list[str], list[str]]:
    """(missing features, classes the hooks were not checked against) of one block."""
    attn = getattr(blk, "attn", None)
    known, unknown = [], []
    if not isinstance(blk, SUPPORTED_BLOCKS):
        unknown.append(f"blocks are {type(blk).__module__}.{type(blk).__qualname__}, not timm Block/ResPostBlock "
                       "with attn.qkv and num_heads")
    if attn is None:
        known.append(f"no fused attn.qkv Linear ({type(blk).__qualname__} has no single `attn` module)")
        return known, unknown
    if getattr(attn, "q_bias", None) is not None:
        known.append("q/v biases added outside attn.qkv (the block calls F.linear on qkv.weight, so a hook on "
                     "attn.qkv never runs)")
    elif not isinstance(getattr(attn, "qkv", None), (nn.Linear, LoRALinear)):
        known.append(f"no fused attn.qkv Linear ({type(attn).__qualname__} projects q, k, v separately)")
    if not isinstance(getattr(attn, "num_heads", None), int):
        known.append(f"attention without num_heads ({type(attn).__qualname__})")
    if not isinstance(attn, SUPPORTED_ATTENTION):
        unknown.append(f"attention is {type(attn).__module__}.{type(attn).__qualname__}, not timm's Attention "
                       "(ALaST computes the class-token attention row as timm's Attention computes attention)")
    return known, unknown


def check_model(model: nn.Module, name: str) -> None:
    """Refuse, before training starts, a model ALaST would train wrongly or crash on.

    Raises:
        ConfigError: naming ``--model NAME`` and every missing feature.
    """
    problems = diagnose(model)
    if problems:
        raise ConfigError(f"--model {name}: ALaST cannot train this model: " + "; ".join(problems)
                          + " (see docs/alast.md, 'Model coverage')")
