"""``--compile``: which mode applies where, compiled blocks under ALaST's changing plans, and a compiled run that
trains, resumes eagerly to the same losses, and exports timm's unchanged modules."""
import json

import pytest
import torch

from edge_alast.alast.patch import apply_patch
from edge_alast.alast.policy import StepPlan
from edge_alast.errors import ConfigError
from edge_alast.training import run as run_module
from edge_alast.training.compiled import CompiledBlocks, missing_toolchain, resolve_compile
from edge_alast.training.trainer import train
from tests.helpers import tiny_config, tiny_model

needs_toolchain = pytest.mark.skipif(missing_toolchain("cpu") is not None,
                                     reason=f"torch.compile cannot build CPU kernels: {missing_toolchain('cpu')}")


@pytest.mark.parametrize("mode, profile, on", [("off", True, False), ("on", None, True), ("on", False, True),
                                               ("auto", True, True), ("auto", False, False), ("auto", None, False)])
def test_auto_follows_the_profile_and_on_off_override_it(mode, profile, on):
    used, why = resolve_compile(mode, profile)
    assert used is on and why


@needs_toolchain
def test_compiled_blocks_follow_changing_plans_and_restore_the_eager_forwards():
    """Token counts that change, blocks frozen and recomputed: the compiled model computes what the eager one does,
    the keep ratios never recompile it (graphs stop growing), and removal leaves no forward of its own."""
    eager, model = tiny_model(), tiny_model()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 32, 32)
    handles = [apply_patch(m) for m in (eager, model)]
    compiled = CompiledBlocks(model, handles[1])
    plans = [StepPlan((1.0, 1.0, 1.0), (True, True, True)), StepPlan((1.0, 0.5, 0.5), (True, True, True)),
             StepPlan((0.75, 0.5, 0.25), (False, True, True), recompute=(False, True, False)),
             StepPlan((0.5, 0.5, 0.5), (False, True, True), recompute=(False, True, False)),
             StepPlan((0.8, 0.6, 0.3), (False, True, True)), StepPlan((0.9, 0.7, 0.5), (True, True, False))]
    graphs = []
    for plan in plans:
        outs = []
        for m, h in zip((eager, model), handles):
            m.train()
            h.set_plan(plan)
            out = m(x)
            out.sum().backward()
            outs.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
            m.zero_grad(set_to_none=True)
        assert handles[0].tokens_in == handles[1].tokens_in
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
        assert outs[0][1].keys() == outs[1][1].keys()
        assert all(torch.allclose(outs[0][1][n], outs[1][1][n], atol=1e-5) for n in outs[0][1])
        graphs.append(compiled.graphs)
    assert graphs[0] > 0
    assert graphs[-1] == graphs[-2] == graphs[3]  # new keep ratios, the same kinds of block: no new graph
    handles[1].remove()
    compiled.remove()
    assert all("forward" not in vars(blk) for blk in model.blocks)


@needs_toolchain
def test_a_compiled_run_matches_the_eager_one_resumes_and_exports(image_folder, tmp_path):
    def losses(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in lines if r["event"] == "step"]

    reference = train(tiny_config(image_folder, tmp_path / "ref", steps=5, compile="off")).summary
    calls = iter(range(100))
    train(tiny_config(image_folder, tmp_path / "r", steps=5, compile="on", export=True),
          should_stop=lambda: next(calls) == 2)
    compiled_steps = losses(tmp_path / "r")
    assert len(compiled_steps) == 3 and all(r["compile/graphs"] > 0 for r in compiled_steps)
    resumed = train(tiny_config(image_folder, tmp_path / "r", steps=5, compile="on", export=True)).summary
    assert [r["loss"] for r in losses(tmp_path / "r")] == pytest.approx(
        [r["loss"] for r in losses(tmp_path / "ref")], rel=1e-4)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4)
    assert resumed["compile"]["on"] is True and resumed["compile"]["graphs"] > 0
    assert reference["compile"] == {"on": False, "reason": "--compile off", "graphs": 0}
    assert (tmp_path / "r" / "model.onnx").is_file()  # exported from timm's modules, the compiled forwards removed


def test_without_a_compiler_on_is_a_named_error_and_auto_stays_eager(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in missing_toolchain("cpu")
    with pytest.raises(ConfigError, match="--compile on: torch.compile cannot build kernels here: no C.. compiler"):
        train(tiny_config(image_folder, tmp_path / "on", compile="on"))
    monkeypatch.setattr(run_module, "resolve_compile", lambda mode, profile: (True, "auto: a profile"))
    summary = train(tiny_config(image_folder, tmp_path / "auto")).summary
    assert summary["compile"]["on"] is False and "C++ compiler" in summary["compile"]["reason"]
    assert any("--compile auto stays eager" in w for w in summary["warnings"])
