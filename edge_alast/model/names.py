"""Which part of a timm ViT a parameter belongs to, by its name. Torch-free: the ONNX Runtime trainer (``train-ort``,
no torch on the device) chooses what trains by these names too.
"""
from __future__ import annotations

# Parameter name prefixes of the parts outside the blocks (timm ViT naming).
EMBEDDING_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "reg_token", "dist_token")
# The norm between the last block and the head (``fc_norm`` with average pooling).
FINAL_NORM_PREFIXES = ("norm.", "fc_norm.")
HEAD_PREFIXES = ("head.", "head_dist.")
# Parameters that edge-alast adds inside the blocks: LoRA's pair and Light-PEFT's masks (lora.py, lightpeft.py).
ADAPTER_PARAMS = ("lora_A", "lora_B", "mask")


def is_embedding(name: str) -> bool:
    return name.startswith(EMBEDDING_PREFIXES)


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


def is_final_norm(name: str) -> bool:
    return name.startswith(FINAL_NORM_PREFIXES)


def block_index(name: str) -> int | None:
    """The block a parameter belongs to (``blocks.3.mlp.fc1.weight`` -> 3), or None outside the blocks."""
    parts = name.split(".", 2)
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None
