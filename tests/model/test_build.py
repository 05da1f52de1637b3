"""Loading local weights: formats, head replacement, position-embedding resampling, clear mismatch errors."""
import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

from edge_alast.errors import ConfigError
from edge_alast.model.build import create_model, load_weights, read_state_dict
from tests.helpers import TINY_ARGS, TINY_MODEL


def _tiny(num_classes=5, img_size=32, **extra):
    torch.manual_seed(0)
    return create_model(TINY_MODEL, num_classes=num_classes, img_size=img_size, **{**TINY_ARGS, **extra})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_roundtrip_and_wrapped_checkpoints(tmp_path, suffix):
    src = _tiny()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(src.state_dict(), str(path))
    else:
        torch.save({"model": src.state_dict()}, path)
    dst = _tiny()
    torch.nn.init.zeros_(dst.blocks[0].mlp.fc1.weight)
    assert load_weights(dst, path) == {"skipped_head": []}
    for k, v in src.state_dict().items():
        assert_close(dst.state_dict()[k], v, msg=k)


def test_head_replaced_when_classes_differ_and_pos_embed_resampled(tmp_path):
    src = _tiny(num_classes=0, img_size=32)  # a backbone without head, like the shared DINOv2 weights
    path = tmp_path / "backbone.safetensors"
    safetensors.torch.save_file(src.state_dict(), str(path))
    dst = _tiny(num_classes=7, img_size=48)  # 6x6 grid instead of 4x4
    load_weights(dst, path)
    assert dst.pos_embed.shape[1] == 1 + 36
    assert_close(dst.pos_embed[:, :1], src.pos_embed[:, :1])  # class-token position kept
    assert_close(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert dst(torch.randn(1, 3, 48, 48)).shape == (1, 7)

    other_head = _tiny(num_classes=3)
    safetensors.torch.save_file(other_head.state_dict(), str(tmp_path / "h3.safetensors"))
    assert set(load_weights(_tiny(num_classes=5), tmp_path / "h3.safetensors")["skipped_head"]) == {"head.weight", "head.bias"}


def test_other_model_is_a_clear_error(tmp_path):
    wider = _tiny(embed_dim=48, num_heads=2)
    safetensors.torch.save_file(wider.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError, match=r"(?s)--weights: .*wide.safetensors.*shape mismatches: .*blocks\.0"):
        load_weights(_tiny(), tmp_path / "wide.safetensors")
    deeper = _tiny(depth=4)
    safetensors.torch.save_file(deeper.state_dict(), str(tmp_path / "deep.safetensors"))
    with pytest.raises(ConfigError, match=r"unexpected keys: blocks\.3\."):
        load_weights(_tiny(), tmp_path / "deep.safetensors")
    shallower = _tiny(depth=2)
    safetensors.torch.save_file(shallower.state_dict(), str(tmp_path / "shallow.safetensors"))
    with pytest.raises(ConfigError, match=r"missing keys: blocks\.2\."):
        load_weights(_tiny(), tmp_path / "shallow.safetensors")


def test_unreadable_or_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_state_dict(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read .*bad.safetensors"):
        read_state_dict(bad)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="--model"):
        create_model("no_such_vit", num_classes=2, img_size=32)


@pytest.mark.assets
def test_shared_dinov2_weights_load_at_224(shared_weights):
    model = create_model("vit_small_patch14_dinov2", num_classes=10, img_size=224)
    info = load_weights(model, shared_weights)
    assert info["skipped_head"] == []
    assert model.pos_embed.shape == (1, 257, 384)
    assert model.blocks[0].ls1.gamma.abs().mean() > 0  # LayerScale weights came from the file
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()


def test_an_image_side_below_the_patch_size_is_a_named_error():
    # TINY_ARGS: patch size 8
    with pytest.raises(ConfigError, match=r"--img-size: 3 is smaller than the patch size \(8, 8\)"):
        create_model(TINY_MODEL, num_classes=2, img_size=3, **TINY_ARGS)
    assert create_model(TINY_MODEL, num_classes=2, img_size=8, **TINY_ARGS).patch_embed.grid_size == (1, 1)
