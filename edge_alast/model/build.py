"""Building the timm model and loading local weights into it (no hub access, ever)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .. import _compat  # noqa: F401  (timm import fix)
import timm

from ..errors import ConfigError
from ..data.images import CROP_MODES

from .names import HEAD_PREFIXES


def create_model(name: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    """A timm model with a fresh head for ``num_classes`` at ``img_size`` (random init; weights come separately)."""
    if not timm.is_model(name):
        raise ConfigError(f"--model: unknown timm model {name!r} (see `timm.list_models('vit_*')`)")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
    except TypeError as e:
        raise ConfigError(f"--model {name!r} cannot be built at --img-size {img_size}: {e}") from e
    # timm builds a ViT at a side below its patch size with a grid of no patches, which fails only at the first
    # forward (or trains on the class token alone): refuse it here, named.
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if grid is not None and min(grid) < 1:
        patch = getattr(patch_embed, "patch_size", "?")
        raise ConfigError(f"--img-size: {img_size} is smaller than the patch size {tuple(patch)} of {name!r}; "
                          "give at least one patch per side")
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state_dict (optionally wrapped in ``model``/``state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            sd = safetensors.torch.load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad weights file to the user
        raise ConfigError(f"--weights: cannot read {path}: {type(e).__name__}: {e}") from e
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--weights: {path} does not hold a state_dict of tensors")
    return sd


def load_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a local checkpoint into ``model``: position embeddings resampled to the model's grid, the classifier
    head left at its fresh init when the file's head is absent or has another number of classes.

    Returns:
        ``{"skipped_head": [...]}``: file keys of a head that did not fit and was left out.

    Raises:
        ConfigError: listing missing, unexpected and mis-shaped keys when the file is another model's.
    """
    sd = read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            # antialias=False: bicubic resampling as the DINOv2 family does it (see shared/assets/README.md)
            sd = filter_fn(sd, model, antialias=False)
        except TypeError:
            sd = filter_fn(sd, model)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--weights: {path} does not fit {type(model).__name__}: {type(e).__name__}: {e}") from e
    own = model.state_dict()
    skipped_head = [k for k in sd if k.startswith(HEAD_PREFIXES) and (k not in own or own[k].shape != sd[k].shape)]
    for k in skipped_head:
        del sd[k]
    missing = [k for k in own if k not in sd and not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        lines = [f"--weights: {path} does not match the model ({type(model).__name__})"]
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches: {show(mismatched)}")
        raise ConfigError("\n".join(lines))
    model.load_state_dict(sd, strict=False)
    return {"skipped_head": skipped_head}


def data_config(model: nn.Module) -> dict:
    """Preprocessing facts from the model's timm data config: mean, std, interpolation, and the eval transform's
    ``crop_pct`` and ``crop_mode`` (``center`` or ``squash``; timm's ``border``, letterboxing, is read as
    ``center``: see :mod:`edge_alast.data.images`)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    crop_mode = cfg.get("crop_mode") or "center"
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "interpolation": cfg.get("interpolation", "bicubic"),
            "crop_pct": float(cfg.get("crop_pct") or 0.875),  # timm's DEFAULT_CROP_PCT when a model names none
            "crop_mode": crop_mode if crop_mode in CROP_MODES else "center"}


def map_head(state: dict[str, torch.Tensor], old_classes: Sequence[str], new_classes: Sequence[str],
             new_rows: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with its classifier head re-indexed from ``old_classes`` to ``new_classes`` by class name.

    A class in both keeps its rows (moved to its new position, so the same classes in another order are the same
    classifier); a class only in ``new_classes`` gets ``new_rows[name][key]`` for each head key (e.g.
    ``head.weight``, ``head.bias``), or zeros; a class only in ``old_classes`` is dropped. Keys that are not head
    keys are returned as they are (the same tensors).

    Raises:
        ConfigError: a head tensor does not have one row per old class, or a class name is repeated.
    """
    for label, names in (("old", old_classes), ("new", new_classes)):
        if len(set(names)) != len(names):
            raise ConfigError(f"classes: the {label} class list repeats a name ({', '.join(names)})")
    new_rows = new_rows or {}
    index = {name: i for i, name in enumerate(old_classes)}
    out = dict(state)
    for key, tensor in state.items():
        if not key.startswith(HEAD_PREFIXES):
            continue
        if tensor.shape[0] != len(old_classes):
            raise ConfigError(f"classes: {key} has {tensor.shape[0]} rows, the model's class list has "
                              f"{len(old_classes)} ({', '.join(old_classes)})")
        mapped = tensor.new_zeros((len(new_classes), *tensor.shape[1:]))
        for i, name in enumerate(new_classes):
            if name in index:
                mapped[i] = tensor[index[name]]
            elif key in new_rows.get(name, {}):
                mapped[i] = new_rows[name][key].to(tensor.dtype)
        out[key] = mapped
    return out
