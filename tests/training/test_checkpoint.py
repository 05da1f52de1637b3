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
