"""``edge-alast report``: figures and the HTML page from hand-written run folders (no training needed)."""
from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_alast.cli.report import report
from edge_alast.report import MATPLOTLIB_MISSING, NO_VALIDATION, load_run
from tests.helpers import REPO

DEPTH = 4
PER_RUN_FIGURES = ("budgets", "trainable", "tokens", "curves", "resources")


def write_run(root: Path, *, method: str = "alast", steps: int = 10, evals: bool = True, summary: bool = True,
              budget_key: str = "budget/raw", seconds: float = 0.5, flops: int = 2_000_000_000) -> Path:
    """A run folder as the trainer writes it: step lines, two eval lines, a prune and a memory_guard line."""
    root.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        budgets = [round(0.9 - 0.1 * b * s / steps, 4) for b in range(DEPTH)]
        tokens, n = [], 17
        for b in budgets:
            tokens.append(n)
            n = 1 + int(b * (n - 1))
        lines.append({"event": "step", "step": s, "steps": steps, "loss": 2.0 / s, "lr": 1e-3,
                      "time/step_seconds": seconds * (1 + 0.1 * (s % 3)), "flops/step": flops,
                      "tokens/per_block": tokens, "blocks/trainable": [b for b in range(DEPTH) if (b + s) % 4],
                      budget_key: budgets, "plan/keep_ratio": budgets,
                      "mem/rss_bytes": (300 + s) * 2**20, "mem/peak_rss_bytes": (320 + 2 * s) * 2**20})
        if s == 3:
            lines.append({"event": "memory_guard", "step": 3, "message": "caps tightened"})
        if s == 6:
            lines.append({"event": "prune", "step": 7, "heads_kept": 4})
        if evals and s in (5, steps):
            lines.append({"event": "eval", "step": s, "val_accuracy": 0.4 + 0.4 * s / steps, "val_loss": 1.0 / s,
                          "val_images": 32, "elapsed_seconds": s * seconds, "flops_total": s * flops})
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary:
        (root / "summary.json").write_text(json.dumps({
            "method": method, "model": "vit_tiny", "steps": steps, "val_accuracy": 0.8125,
            "mean_step_seconds": 0.5432, "peak_rss_bytes": 345 * 2**20, "train_flops_per_step": float(flops),
            "total_train_flops": flops * steps, "profile": "laptop_cpu", "budgets": [0.9] * DEPTH,
            "predicted_peak_bytes": 400 * 2**20, "memory_ceiling_bytes": 450 * 2**20,
            "train_flops_per_second": flops / seconds, "reference_flops_per_second": 3.1e11,
            "reference_flops_source": "profile laptop_cpu, fp32 flops_per_second",
            "flop_utilization": flops / seconds / 3.1e11}))
    return root


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_single_run_writes_every_figure_and_a_self_contained_page(tmp_path):
    run = write_run(tmp_path / "run-a")
    result = CliRunner().invoke(report, [str(run), "--out", str(tmp_path / "rep"), "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    page = (tmp_path / "rep" / "index.html").read_text()
    for kind in PER_RUN_FIGURES:
        png = tmp_path / "rep" / f"run-a_{kind}.png"
        assert str(png) in written["figures"]
        width, height = png_size(png)
        assert 600 <= width <= 2000 and 250 <= height <= 1500, (kind, width, height)
        assert f"href='{png.name}'" in page
        assert base64.b64encode(png.read_bytes()).decode() in page  # embedded: the page stands alone
    assert not (tmp_path / "rep" / "overlay.png").exists()
    assert page.count("<img src='data:image/png;base64,") == len(PER_RUN_FIGURES)
    row = re.search(r"<tr><td class='text'>.*?</tr>", page).group(0)
    for value in ("run-a", "alast", ">10<", "0.8125", "0.543", ">345<", "2.00", ">4.0 (1%)<"):
        assert value in row, value
    assert NO_VALIDATION not in page
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.endswith(".tmp")]


def test_several_runs_get_an_overlay_and_one_row_each(tmp_path):
    runs = [write_run(tmp_path / "a" / "run"), write_run(tmp_path / "b" / "run", method="full", seconds=1.0,
                                                         flops=4_000_000_000, evals=False)]
    result = CliRunner().invoke(report, [*map(str, runs), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "rep" / "index.html").read_text()
    width, height = png_size(tmp_path / "rep" / "overlay.png")
    assert width > 1000 and height > 300
    assert "href='overlay.png'" in page
    for name in ("a-run", "b-run"):  # same folder name: the parent tells them apart
        for kind in PER_RUN_FIGURES:
            assert (tmp_path / "rep" / f"{name}_{kind}.png").stat().st_size > 0
    assert page.count("<tr><td class='text'>") == 2
    assert "full" in page and "4.00" in page
    assert NO_VALIDATION in page  # run b has no eval lines


def test_interrupted_run_and_torn_lines_still_render(tmp_path):
    run = write_run(tmp_path / "cut", summary=False, budget_key="budget/keep_ratio")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "step", "step": 11, "loss": 0.1, "time/st')  # power loss mid-line
    record = load_run(run)
    assert len(record.steps) == 10 and record.skipped_lines == 1 and record.summary is None
    result = CliRunner().invoke(report, [str(run), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "no summary.json" in page and "skipped 1 unreadable line" in page
    assert (tmp_path / "rep" / "cut_budgets.png").stat().st_size > 0
    assert "0.8000" in page  # val acc from the last eval line


def test_budget_heatmap_prefers_the_policys_raw_budgets(tmp_path):
    import numpy as np

    record = load_run(write_run(tmp_path / "r"))
    raw = record.block_matrix("budget/raw")
    assert raw.shape == (DEPTH, 10) and raw[3, 9] == pytest.approx(0.6)
    trainable = record.trainable_matrix()
    assert trainable.shape == (DEPTH, 10) and np.isin(trainable, (0, 1)).all()
    assert [e["step"] for e in record.evals] == [5, 10]
    assert record.at_step(record.wall_clock, 5) == pytest.approx(sum(0.5 * (1 + 0.1 * (s % 3)) for s in range(1, 6)))


def test_missing_metrics_is_exit_2_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(report, [str(tmp_path / "empty"), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 2
    assert f"{tmp_path / 'empty'} has no metrics.jsonl" in result.output
    assert not (tmp_path / "rep").exists()


def _run_without(args: list[str], hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``edge-alast report`` in a fresh interpreter with ``hide`` made unimportable; it fails there if torch or
    timm got imported (adapted from helpers.run_cli_without_torch for a command that exits)."""
    code = ("import os, sys\n"
            f"for name in {hide!r}:\n"
            "    sys.modules[name] = None\n"
            "from edge_alast.cli.report import report\n"
            "try:\n"
            f"    report.main({args!r}, prog_name='edge-alast report')\n"
            "finally:\n"
            "    if 'torch' in sys.modules or 'timm' in sys.modules:\n"
            "        print('torch or timm was imported', file=sys.stderr)\n"
            "        os._exit(99)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_report_never_imports_torch(tmp_path):
    run = write_run(tmp_path / "r")
    proc = _run_without([str(run), "--out", str(tmp_path / "rep")])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rep" / "index.html").exists()


def test_missing_matplotlib_names_the_extra(tmp_path):
    run = write_run(tmp_path / "r")
    proc = _run_without([str(run), "--out", str(tmp_path / "rep")], hide=("matplotlib",))
    assert proc.returncode == 2, proc.stderr
    assert f"error: {MATPLOTLIB_MISSING}" in proc.stderr
    assert "pip install 'edge-alast[report]'" in MATPLOTLIB_MISSING
    assert not (tmp_path / "rep").exists()


def test_the_overlay_accuracy_axis_spans_what_the_runs_reached():
    from edge_alast.report import _accuracy_range
    assert _accuracy_range([0.78, 0.88, 0.83]) == pytest.approx((0.75, 0.91))
    assert _accuracy_range([0.01, 0.995]) == pytest.approx((-0.02, 1.02))  # clipped to the 0-1 frame
    assert _accuracy_range([]) == (-0.02, 1.02)
