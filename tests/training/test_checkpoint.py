"""Power-loss-safe checkpoints: checksum sidecars, keeping the newest two, falling back past a damaged one."""
import torch

from edge_alast.training.checkpoint import KEEP, checkpoints, load_latest, save_checkpoint, verify


def state(step):
    return {"step": step, "weights": torch.full((4,), float(step)), "history": {"losses": [0.5] * step}}


def test_save_writes_checkpoint_and_checksum_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        path = save_checkpoint(tmp_path, step, state(step))
        assert path.name == f"checkpoint-{step:08d}.pt" and verify(path) is None
    assert [s for s, _ in checkpoints(tmp_path)] == [3, 2][:KEEP]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000002.pt", "checkpoint-00000002.sha256", "checkpoint-00000003.pt", "checkpoint-00000003.sha256"]
    loaded, notes = load_latest(tmp_path)
    assert notes == [] and loaded["step"] == 3 and torch.equal(loaded["weights"], torch.full((4,), 3.0))


def test_damaged_or_unfinished_newest_falls_back_with_a_note(tmp_path):
    save_checkpoint(tmp_path, 1, state(1))
    newest = save_checkpoint(tmp_path, 2, state(2))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert verify(newest) == "checksum mismatch (damaged file)"
    loaded, notes = load_latest(tmp_path)
    assert loaded["step"] == 1 and "checkpoint-00000002.pt: checksum mismatch" in notes[0]
    newest.with_suffix(".sha256").unlink()  # as if the power went before the checksum was written
    assert verify(newest) == "no checksum file (the write did not finish)"
    assert load_latest(tmp_path)[0]["step"] == 1


def test_no_checkpoint_and_no_folder(tmp_path):
    assert load_latest(tmp_path) == (None, [])
    assert checkpoints(tmp_path / "missing") == []


# ---------------------------------------------------------------- device key (issue 22)
KEY = b"k" * 32


def test_with_a_device_key_the_sidecar_is_a_signature_and_loads(tmp_path):
    path = save_checkpoint(tmp_path, 1, state(1), key=KEY)
    assert path.with_suffix(".sha256").read_text().startswith("hmac-sha256:")
    assert verify(path, KEY) is None
    assert load_latest(tmp_path, KEY)[0]["step"] == 1


def test_a_planted_checkpoint_with_a_matching_plain_sha256_is_refused_with_a_key(tmp_path):
    import hashlib

    import pytest

    from edge_alast.errors import IntegrityError

    save_checkpoint(tmp_path, 1, state(1), key=KEY)
    planted = tmp_path / "checkpoint-00000009.pt"
    torch.save(state(9), planted)
    planted.with_suffix(".sha256").write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
    assert load_latest(tmp_path)[0]["step"] == 9  # without a key it is resumed: the sidecar detects damage only
    with pytest.raises(IntegrityError, match="checkpoint-00000009.pt: not signed with the device key"):
        load_latest(tmp_path, KEY)
    save_checkpoint(tmp_path, 9, state(9), key=b"another key, 32 bytes long......")
    with pytest.raises(IntegrityError, match="signature does not match"):
        load_latest(tmp_path, KEY)
    with pytest.raises(IntegrityError, match="signed with a device key; pass --device-key"):
        load_latest(tmp_path)  # a signed checkpoint cannot be checked without the key
