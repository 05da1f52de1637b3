"""Training reports: read run folders (``metrics.jsonl``, ``summary.json``) and draw what a run did.

``render_report(run_dirs, out)`` writes one PNG per figure and a self-contained ``index.html`` (the same PNGs
embedded as base64 data URIs, so the page can be mailed or archived alone). Reading is separate from drawing:
:func:`load_run` returns a :class:`RunRecord` of plain lists and dicts, testable without matplotlib.

No torch here: a report is drawn wherever the run folder was copied to. matplotlib (the ``report`` extra) is
imported inside :func:`render_report`, through its object API (``Figure`` + the Agg canvas): no pyplot, no GUI
backend, no global state in the caller's process.

Conventions: "wall-clock" is training time, the cumulative sum of ``time/step_seconds`` (evaluation and
checkpoints excluded), the same axis for the loss and the validation curve; cumulative FLOPs are the sum of
``flops/step`` (forward + backward, as counted by the trainer). A validation point is placed at the step of its
``eval`` line.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_write_bytes
from .errors import ConfigError
from .runfolder import (BUDGET_METRICS, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, budget_metric, metric,
                        read_json_if_any, scan_metrics, steady)

MATPLOTLIB_MISSING = "edge-alast report needs matplotlib: pip install 'edge-alast[report]'"
NO_VALIDATION = "no validation curve (train with --eval-every N)"
MIB = 2 ** 20


@dataclass
class RunRecord:
    """One run folder as read from disk.

    Attributes:
        path: The run folder.
        name: Its label in the report (the folder name, made unique among the runs of one report).
        steps: ``step`` lines of ``metrics.jsonl``, one per step number (a later line for the same step wins,
            as after a resume), sorted by step.
        evals: ``eval`` lines with a validation accuracy, each with a ``step`` (the last step before it when the
            line has none), sorted by step.
        events: Other lines with a step (``prune``, ``memory_guard``, ...), in file order.
        summary: ``summary.json``, or None when the run has none (interrupted, or still running).
        config: The ``config`` section of ``config.json``, or {}.
        skipped_lines: Lines of ``metrics.jsonl`` that were not JSON objects (a line cut by a power loss).
    """

    path: Path
    name: str
    steps: list[dict]
    evals: list[dict]
    events: list[dict]
    summary: dict | None
    config: dict
    skipped_lines: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str((self.summary or {}).get("method") or self.config.get("method") or "?")

    @property
    def label(self) -> str:
        return self.name if self.method == "?" else f"{self.name} ({self.method})"

    def series(self, key: str) -> np.ndarray:
        """Per-step scalar ``key`` as floats (NaN where a step line lacks it)."""
        return np.array([_float(metric(s, key)) for s in self.steps], dtype=float)

    @property
    def step_numbers(self) -> np.ndarray:
        return np.array([s["step"] for s in self.steps], dtype=int)

    @property
    def wall_clock(self) -> np.ndarray:
        """Cumulative training seconds at the end of each step."""
        return np.nancumsum(self.series("time/step_seconds"))

    @property
    def cumulative_flops(self) -> np.ndarray | None:
        flops = self.series("flops/step")
        return None if np.isnan(flops).all() else np.nancumsum(flops)

    def at_step(self, values: np.ndarray | None, step: int) -> float:
        """The value of a cumulative per-step series at the end of ``step`` (0 before the first step)."""
        if values is None:
            return math.nan
        numbers = self.step_numbers
        i = int(np.searchsorted(numbers, step, side="right")) - 1
        return 0.0 if i < 0 else float(values[i])

    def depth(self) -> int:
        lengths = [len(metric(s, k)) for s in self.steps for k in (*BUDGET_METRICS, "tokens/per_block")
                   if isinstance(metric(s, k), list)]
        indices = [i + 1 for s in self.steps for i in _ints(s.get("blocks/trainable"))]
        budgets = (self.summary or {}).get("budgets")
        lengths.append(len(budgets) if isinstance(budgets, list) else 0)
        return max(lengths + indices + [0])

    def block_matrix(self, key: str) -> np.ndarray | None:
        """Per-block list ``key`` as a (depth, steps) array over the contiguous step range; NaN where missing."""
        if not any(isinstance(metric(s, key), list) for s in self.steps):
            return None
        first, depth = self.steps[0]["step"], self.depth()
        matrix = np.full((depth, self.steps[-1]["step"] - first + 1), np.nan)
        for s in self.steps:
            values = metric(s, key)
            if isinstance(values, list):
                matrix[:len(values), s["step"] - first] = [_float(v) for v in values]
        return matrix

    def trainable_matrix(self) -> np.ndarray | None:
        """1 where a block trained in a step, 0 where it was frozen, NaN for steps without a line."""
        if not any(isinstance(s.get("blocks/trainable"), list) for s in self.steps):
            return None
        first = self.steps[0]["step"]
        matrix = np.full((self.depth(), self.steps[-1]["step"] - first + 1), np.nan)
        for s in self.steps:
            if isinstance(s.get("blocks/trainable"), list):
                matrix[:, s["step"] - first] = 0.0
                matrix[_ints(s["blocks/trainable"]), s["step"] - first] = 1.0
        return matrix

    def table_row(self) -> dict:
        """The summary table's figures: from ``summary.json``, else computed from ``metrics.jsonl``."""
        summary = self.summary or {}
        seconds = self.series("time/step_seconds")
        seconds = steady(seconds[~np.isnan(seconds)].tolist())  # the trainer's rule: warm-up steps left out
        flops = self.series("flops/step")
        peak = self.series("mem/peak_rss_bytes")
        val = summary.get("val_accuracy")
        if val is None and self.evals:
            val = self.evals[-1]["val_accuracy"]
        return {
            "run": self.name,
            "method": self.method,
            "steps": summary.get("steps", len(self.steps)),
            "val_accuracy": val,
            "mean_step_seconds": summary.get("mean_step_seconds",
                                             float(np.mean(seconds)) if seconds else None),
            "peak_rss_mib": _div(summary.get("peak_rss_bytes", _nanmax(peak)), MIB),
            "gflops_per_step": _div(summary.get("train_flops_per_step", _nanmean(flops)), 1e9),
            "gflops_per_second": _div(summary.get("train_flops_per_second"), 1e9),
            "flop_utilization": summary.get("flop_utilization"),
            "from_summary": self.summary is not None,
        }


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ints(values) -> list[int]:
    return [int(v) for v in values if isinstance(v, (int, float))] if isinstance(values, list) else []


def _nanmax(a: np.ndarray):
    return None if a.size == 0 or np.isnan(a).all() else float(np.nanmax(a))


def _nanmean(a: np.ndarray):
    return None if a.size == 0 or np.isnan(a).all() else float(np.nanmean(a))


def _div(value, by: float):
    return None if value is None else float(value) / by


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder. Lines of ``metrics.jsonl`` that are not JSON objects are skipped and counted.

    Raises:
        ConfigError: ``path`` is not a folder or holds no ``metrics.jsonl``.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"RUN_DIR: {path} is not a folder")
    metrics = path / METRICS_FILE
    try:
        records, skipped = scan_metrics(metrics)
    except FileNotFoundError:
        raise ConfigError(f"RUN_DIR: {path} has no {METRICS_FILE} (not an edge-alast run folder?)") from None
    except OSError as e:
        raise ConfigError(f"RUN_DIR: cannot read {metrics}: {e}") from e
    steps: dict[int, dict] = {}
    evals, events, last_step = [], [], 0
    for record in records:
        kind = record.get("event", "step" if "loss" in record else None)
        step = record.get("step")
        if kind == "step":
            if not isinstance(step, int) or isinstance(step, bool):
                skipped += 1
                continue
            steps[step] = record
            last_step = step
        elif kind == "eval":
            if isinstance(record.get("val_accuracy"), (int, float)):
                evals.append({**record, "step": step if isinstance(step, int) else last_step})
        elif isinstance(step, int):
            events.append(record)
    summary = read_json_if_any(path / SUMMARY_FILE)  # absent or unreadable: the report says what it could not use
    config = (read_json_if_any(path / CONFIG_FILE) or {}).get("config") or {}
    run = RunRecord(path=path, name=path.resolve().name or str(path), steps=[steps[k] for k in sorted(steps)],
                    evals=sorted(evals, key=lambda e: e["step"]), events=events, summary=summary,
                    config=config if isinstance(config, dict) else {}, skipped_lines=skipped)
    if summary is None:
        run.notes.append("no summary.json (the run was interrupted or is still running): everything below is "
                         "read from metrics.jsonl")
    if skipped:
        run.notes.append(f"skipped {skipped} unreadable line{'s' * (skipped != 1)} of metrics.jsonl "
                         "(cut by a power loss?)")
    if not run.steps:
        run.notes.append("metrics.jsonl holds no training steps: nothing to draw")
    elif not run.evals:
        run.notes.append(NO_VALIDATION)
    return run


# ==================================================================================================== drawing

@dataclass(frozen=True)
class Figure:
    """One written figure: its file name in the output folder, title, caption and PNG bytes."""

    file: str
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class ReportResult:
    index: Path
    figures: tuple[Path, ...]
    runs: tuple[RunRecord, ...]


def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        raise ConfigError(MATPLOTLIB_MISSING) from None
    return matplotlib, MplFigure, FigureCanvasAgg


class _Drawer:
    """Builds figures with matplotlib's object API; ``png(fig)`` renders one with Agg."""

    DPI = 110

    def __init__(self):
        self.mpl, self._figure, self._canvas = _import_matplotlib()

    def figure(self, width: float, height: float):
        fig = self._figure(figsize=(width, height), layout="constrained")
        self._canvas(fig)
        return fig

    def png(self, fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.DPI, metadata={"Software": f"edge-alast {__version__}"})
        return buf.getvalue()

    def colormap(self, name: str, bad: str = "#eeeeee"):
        return self.mpl.colormaps[name].with_extremes(bad=bad)


def _step_extent(run: RunRecord, depth: int) -> tuple[float, float, float, float]:
    first, last = run.steps[0]["step"], run.steps[-1]["step"]
    return first - 0.5, last + 0.5, -0.5, depth - 0.5


def _block_axis(ax, depth: int) -> None:
    ax.set_ylabel("block (0 = input side)")
    stride = max(1, math.ceil(depth / 16))
    ax.set_yticks(range(0, depth, stride))


def _mark_events(run: RunRecord, axes, with_label: bool = True) -> None:
    """Vertical lines where the run pruned (Light-PEFT) or the memory guard tightened the caps."""
    styles = {"prune": ("tab:red", "--", "pruned (Light-PEFT)"),
              "memory_guard": ("tab:orange", ":", "memory guard tightened caps")}
    for ax in axes:
        seen = set()
        for e in run.events:
            if e.get("event") in styles:
                colour, style, label = styles[e["event"]]
                x = e["step"] - 0.5 if e["event"] == "prune" else e["step"]  # prune: before that step trains
                ax.axvline(x, color=colour, linestyle=style, linewidth=1.2,
                           label=label if with_label and e["event"] not in seen else None)
                seen.add(e["event"])


def _heatmap_with_profile(d: _Drawer, run: RunRecord, matrix: np.ndarray, *, title: str, colour_label: str,
                          profile_label: str, cmap: str, vmin: float, vmax: float, fmt: str,
                          integer: bool = False) -> bytes:
    """Heatmap block × step with a side panel: each block's mean over the steps, and its min–max range."""
    depth = matrix.shape[0]
    fig = d.figure(12, 2.4 + 0.28 * depth)
    grid = fig.add_gridspec(1, 2, width_ratios=(4, 1.25))
    ax = fig.add_subplot(grid[0, 0])
    image = ax.imshow(matrix, aspect="auto", origin="lower", interpolation="nearest", extent=_step_extent(run, depth),
                      cmap=d.colormap(cmap), vmin=vmin, vmax=vmax)
    ax.set_xlabel("training step")
    _block_axis(ax, depth)
    ax.set_title(title)
    _mark_events(run, [ax])
    if any(e.get("event") in ("prune", "memory_guard") for e in run.events):
        ax.legend(loc="upper right", fontsize="small", framealpha=0.9)
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
    bar.set_label(colour_label)
    if integer:
        from matplotlib.ticker import MaxNLocator

        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    side = fig.add_subplot(grid[0, 1], sharey=ax)
    with np.errstate(all="ignore"):
        mean, lo, hi = np.nanmean(matrix, axis=1), np.nanmin(matrix, axis=1), np.nanmax(matrix, axis=1)
    blocks = np.arange(depth)
    side.barh(blocks, hi - lo, left=lo, height=0.6, color="#bbbbbb")
    side.plot(mean, blocks, "o-", color="black", markersize=3.5, linewidth=1)
    for b in blocks:
        if not np.isnan(mean[b]):
            side.annotate(format(mean[b], fmt), (mean[b], b), xytext=(4, 0), textcoords="offset points",
                          va="center", fontsize=7)
    side.set_xlim(vmin, vmax + 0.25 * (vmax - vmin))
    side.set_title(profile_label, fontsize="medium")
    side.set_xlabel("dot: mean, bar: min–max")
    side.tick_params(labelleft=False)
    side.grid(axis="x", alpha=0.3)
    return d.png(fig)


def _budget_figure(d: _Drawer, run: RunRecord) -> Figure | None:
    key = budget_metric(run.steps)
    if key is None:
        return None
    matrix = run.block_matrix(key)
    lo = float(np.nanmin(matrix)) if not np.isnan(matrix).all() else 0.0
    vmin = min(0.5, math.floor(lo * 10) / 10)  # a fixed scale from b_min's default: noise stays pale
    what = "ALaST budget per block (policy)" if key == "budget/raw" else "keep ratio per block (step's plan)"
    png = _heatmap_with_profile(d, run, matrix, title=f"{run.label}: {what} — {key}", colour_label=key,
                                profile_label="per block over the run", cmap="viridis", vmin=vmin, vmax=1.0, fmt=".3f")
    caption = (f"Each cell is block b's {'budget' if key == 'budget/raw' else 'keep ratio'} at step s "
               f"(<code>{key}</code>: the share of patch tokens the block keeps, 1 = all). Right: each block's "
               "mean over the run (dot, value printed) and its min–max range (grey bar). Budgets that adapt "
               "differ across rows and change along them; a uniform colour means they did not move.")
    return Figure(f"{_slug(run.name)}_budgets.png", "Budgets per block", caption, png)


def _trainable_figure(d: _Drawer, run: RunRecord) -> Figure | None:
    matrix = run.trainable_matrix()
    if matrix is None:
        return None
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    depth = matrix.shape[0]
    fig = d.figure(12, 2.4 + 0.28 * depth)
    grid = fig.add_gridspec(1, 2, width_ratios=(4, 1.25))
    ax = fig.add_subplot(grid[0, 0])
    cmap = ListedColormap(["#e8e8e8", "#1f4e99"]).with_extremes(bad="white")
    ax.imshow(matrix, aspect="auto", origin="lower", interpolation="nearest", extent=_step_extent(run, depth),
              cmap=cmap, vmin=0, vmax=1)
    ax.set_xlabel("training step")
    _block_axis(ax, depth)
    ax.set_title(f"{run.label}: which blocks trained at each step")
    _mark_events(run, [ax])
    handles = [Patch(color="#1f4e99", label="trainable"), Patch(color="#e8e8e8", label="frozen")]
    handles += [h for h in ax.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    side = fig.add_subplot(grid[0, 1], sharey=ax)
    with np.errstate(all="ignore"):
        share = 100 * np.nanmean(matrix, axis=1)
    side.barh(np.arange(depth), share, height=0.6, color="#1f4e99")
    for b, v in enumerate(share):
        if not np.isnan(v):
            side.annotate(f"{v:.0f}%", (v, b), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    side.set_xlim(0, 125)
    side.set_title("per block over the run", fontsize="medium")
    side.set_xlabel("steps trained (%)")
    side.tick_params(labelleft=False)
    side.grid(axis="x", alpha=0.3)
    caption = ("Dark cells: the block's parameters got gradients in that step; light: frozen (no stored "
               "activations, no weight gradients). Right: the share of steps each block trained.")
    return Figure(f"{_slug(run.name)}_trainable.png", "Trainable blocks", caption, d.png(fig))


def _tokens_figure(d: _Drawer, run: RunRecord) -> Figure | None:
    matrix = run.block_matrix("tokens/per_block")
    if matrix is None or np.isnan(matrix).all():
        return None
    vmax = float(np.nanmax(matrix))
    png = _heatmap_with_profile(d, run, matrix, title=f"{run.label}: tokens entering each block",
                                colour_label="tokens (prefix + patch)", profile_label="per block over the run",
                                cmap="magma", vmin=0.0, vmax=vmax, fmt=".0f", integer=True)
    caption = ("Tokens each block processed at each step (<code>tokens/per_block</code>: class/prefix tokens plus "
               "the patch tokens that survived the blocks below; dropping is cumulative). Right: mean and "
               "min–max per block.")
    return Figure(f"{_slug(run.name)}_tokens.png", "Tokens per block", caption, png)


def _smooth(values: np.ndarray) -> np.ndarray | None:
    """Trailing moving average over ~5 % of the run (None for short runs, where the raw curve is readable)."""
    window = len(values) // 20
    if window < 3:
        return None
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _curves_figure(d: _Drawer, run: RunRecord) -> Figure:
    steps, loss, wall = run.step_numbers, run.series("loss"), run.wall_clock
    fig = d.figure(11, 6.5)
    axes = fig.subplots(2, 2, sharey="row", sharex="col")
    final = (run.summary or {}).get("val_accuracy")
    for col, (x, xlabel, eval_x, final_x) in enumerate((
            (steps, "training step", [e["step"] for e in run.evals], steps[-1]),
            (wall, "training wall-clock (s, sum of step times)", [run.at_step(wall, e["step"]) for e in run.evals],
             wall[-1]))):
        ax = axes[0, col]
        smooth = _smooth(loss)
        ax.plot(x, loss, color="tab:blue", linewidth=0.8 if smooth is not None else 1.4,
                alpha=0.45 if smooth is not None else 1.0, marker="." if len(x) <= 60 else None, label="loss")
        if smooth is not None:
            ax.plot(x, smooth, color="tab:blue", linewidth=1.8, label=f"moving mean ({len(loss) // 20} steps)")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.grid(alpha=0.3)
        if col == 0:
            _mark_events(run, [ax])
        ax.legend(fontsize="small")
        ax = axes[1, col]
        if run.evals:
            ax.plot(eval_x, [e["val_accuracy"] for e in run.evals], "o-", color="tab:green",
                    label=f"validation ({run.evals[-1].get('val_images', '?')} images)")
        if final is not None:
            ax.plot([final_x], [final], marker="*", markersize=13, color="tab:purple", linestyle="none",
                    label="final (summary.json, all validation images)")
        if not run.evals:
            ax.text(0.5, 0.5, NO_VALIDATION, transform=ax.transAxes, ha="center", va="center", color="0.35")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("validation accuracy")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if run.evals or final is not None:
            ax.legend(fontsize="small", loc="lower right")
        if col == 0:
            _mark_events(run, [ax], with_label=False)
    axes[0, 0].set_title("over steps")
    axes[0, 1].set_title("over training wall-clock")
    fig.suptitle(f"{run.label}: training loss and validation accuracy")
    caption = ("Top: training loss per step (cross-entropy of the step's batch); bottom: validation accuracy from "
               "the run's <code>eval</code> lines" + (f" — {NO_VALIDATION}" if not run.evals else "") +
               ". Left against the step, right against training wall-clock (the cumulative sum of step times; "
               "evaluation and checkpoints excluded)." +
               (" The star is the final all-token evaluation of summary.json." if final is not None else ""))
    return Figure(f"{_slug(run.name)}_curves.png", "Loss and validation accuracy", caption, d.png(fig))


def _from_zero(ax, values) -> None:
    """y from 0 to a little above the largest value (a curve at the top edge would hide in the frame)."""
    values = np.asarray(values, dtype=float)
    top = np.nanmax(values) if values.size and not np.isnan(values).all() else math.nan
    ax.set_ylim(0, 1.12 * top if np.isfinite(top) and top > 0 else None)


def _resources_figure(d: _Drawer, run: RunRecord) -> Figure:
    steps = run.step_numbers
    seconds, flops = run.series("time/step_seconds"), run.series("flops/step")
    rss, peak = run.series("mem/rss_bytes") / MIB, run.series("mem/peak_rss_bytes") / MIB
    has_flops = not np.isnan(flops).all()
    fig = d.figure(11, 8.5 if has_flops else 6)
    axes = fig.subplots(3 if has_flops else 2, 1, sharex=True)
    ax = axes[0]
    ax.plot(steps, seconds, color="tab:blue", linewidth=1, marker="." if len(steps) <= 60 else None)
    mean = (run.summary or {}).get("mean_step_seconds")
    if mean is not None:
        ax.axhline(mean, color="tab:blue", linestyle="--", linewidth=1,
                   label=f"steady-state mean {mean:.3g} s (summary.json)")
        ax.legend(fontsize="small")
    ax.set_ylabel("step time (s)")
    _from_zero(ax, seconds)
    ax.set_title(f"{run.label}: step time, memory" + (" and FLOPs" if has_flops else ""))
    ax = axes[1]
    ax.plot(steps, rss, color="tab:green", linewidth=1, label="RSS after the step")
    ax.plot(steps, peak, color="tab:red", linewidth=1.4, label="peak RSS so far (high-water mark)")
    summary = run.summary or {}
    predicted, ceiling = (summary.get(k) for k in ("predicted_peak_bytes", "memory_ceiling_bytes"))
    predicted = predicted / MIB if isinstance(predicted, (int, float)) else None
    ceiling = ceiling / MIB if isinstance(ceiling, (int, float)) else None
    shown = [*rss, *peak, *([predicted] if predicted is not None else [])]
    if predicted is not None:
        ax.axhline(predicted, color="tab:purple", linestyle="--", linewidth=1.3,
                   label=f"planner's predicted peak: {predicted:.0f} MiB")
    if ceiling is not None:
        # A ceiling far above the run (a big host) would flatten the curves that matter: it is named, not drawn.
        far = np.nanmax(shown) > 0 and ceiling > 1.6 * np.nanmax(shown)
        ax.axhline(ceiling if not far else np.nan, color="black", linestyle="-.", linewidth=1.3,
                   label=f"memory ceiling (profile): {ceiling:.0f} MiB" + (" — above this scale" if far else ""))
        if not far:
            shown.append(ceiling)
    missing = [name for name, v in (("planner's predicted peak", predicted), ("memory ceiling", ceiling))
               if v is None]
    if missing:
        why = "no summary.json" if run.summary is None else "no device profile, no plan"
        ax.text(0.01, 0.04, f"{' and '.join(missing)}: none ({why})", transform=ax.transAxes, fontsize="small",
                color="0.35")
    ax.set_ylabel("memory (MiB)")
    _from_zero(ax, shown)
    _mark_events(run, [ax])
    ax.legend(fontsize="small", loc="best")
    if has_flops:
        axes[2].plot(steps, flops / 1e9, color="tab:brown", linewidth=1, marker="." if len(steps) <= 60 else None)
        axes[2].set_ylabel("GFLOPs per step\n(forward + backward)")
        _from_zero(axes[2], flops / 1e9)
        rate = flops / seconds / 1e9
        twin = axes[2].twinx()
        twin.plot(steps, rate, color="tab:gray", linewidth=1, label="achieved GFLOP/s")
        reference = summary.get("reference_flops_per_second")
        if isinstance(reference, (int, float)):
            twin.axhline(reference / 1e9, color="tab:gray", linestyle="--", linewidth=1,
                         label=f"reference {reference / 1e9:.0f} GFLOP/s ({summary.get('reference_flops_source')})")
        twin.set_ylabel("GFLOP/s")
        _from_zero(twin, [*rate, *([reference / 1e9] if isinstance(reference, (int, float)) else [])])
        twin.legend(fontsize="small", loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training step")
    _mark_events(run, [a for a in axes if a is not axes[1]], with_label=False)
    caption = ("Top: seconds per training step (load, forward, backward, optimizer). Middle: the process's resident "
               "memory after each step and its high-water mark, with the planner's predicted peak and the device "
               "profile's memory ceiling where the run had a profile" +
               (". Bottom: training FLOPs of each step and the FLOP/s it achieved (grey), against the profile's sustained "
                "rate where there is one." if has_flops else "."))
    return Figure(f"{_slug(run.name)}_resources.png", "Step time and memory", caption, d.png(fig))


def _accuracy_range(accuracies: list[float], margin: float = 0.03) -> tuple[float, float]:
    """The overlay's accuracy axis: the range the runs reached, with a margin, within [0, 1]: runs compared are
    often a few points apart, which a fixed 0-1 axis flattens."""
    if not accuracies:
        return -0.02, 1.02
    return max(-0.02, min(accuracies) - margin), min(1.02, max(accuracies) + margin)


def _overlay_figure(d: _Drawer, runs: list[RunRecord]) -> Figure:
    fig = d.figure(13, 4.6)
    axes = fig.subplots(1, 3)
    colours = d.mpl.colormaps["tab10"]
    for i, run in enumerate(r for r in runs if r.steps):
        colour = colours(i % 10)
        wall, flops = run.wall_clock, run.cumulative_flops
        final = (run.summary or {}).get("val_accuracy")
        for ax, cumulative in ((axes[0], wall), (axes[1], None if flops is None else flops / 1e12)):
            if cumulative is None:
                continue
            if run.evals:
                ax.plot([run.at_step(cumulative, e["step"]) for e in run.evals],
                        [e["val_accuracy"] for e in run.evals], "o-", color=colour, markersize=3.5, label=run.label)
            if final is not None:
                ax.plot([cumulative[-1]], [final], marker="*", markersize=12, color=colour, linestyle="none",
                        label=None if run.evals else f"{run.label} (final only)")
        smooth = _smooth(run.series("loss"))
        if smooth is not None:
            axes[2].plot(wall, run.series("loss"), color=colour, linewidth=0.6, alpha=0.4)
        axes[2].plot(wall, smooth if smooth is not None else run.series("loss"), color=colour, linewidth=1.6,
                     label=run.label)
    axes[0].set_xlabel("training wall-clock (s, sum of step times)")
    axes[1].set_xlabel("cumulative training TFLOPs (forward + backward)")
    axes[2].set_xlabel("training wall-clock (s, sum of step times)")
    accuracies = [e["val_accuracy"] for r in runs for e in r.evals]
    accuracies += [r.summary["val_accuracy"] for r in runs if (r.summary or {}).get("val_accuracy") is not None]
    for ax in axes[:2]:
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(*_accuracy_range(accuracies))
    axes[2].set_ylabel("training loss")
    axes[0].set_title("accuracy vs time")
    axes[1].set_title("accuracy vs compute")
    axes[2].set_title("loss vs time")
    for ax in axes:
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if not any(r.evals for r in runs):
        for ax in axes[:2]:
            ax.text(0.5, 0.55, NO_VALIDATION, transform=ax.transAxes, ha="center", fontsize="small", color="0.35")
    fig.suptitle("runs compared (★ = final all-token evaluation from summary.json)")
    caption = ("Validation accuracy of each run against its training wall-clock (left) and its cumulative training "
               "FLOPs (middle), one line per run; right: the training loss against wall-clock (runs of 60 steps or "
               "more: thin per step, thick a moving mean over 5 % of the run). Wall-clock is the sum of step times, "
               "so runs measured on different machines or under different load are not comparable on the left. The "
               "accuracy axes span the range the runs reached.")
    return Figure("overlay.png", "Runs compared", caption, d.png(fig))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-.") or "run"


def _unique_names(runs: list[RunRecord]) -> None:
    """Runs named alike (``a/run``, ``b/run``) get their parent folder in front, then a counter."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    seen: set[str] = set()
    for run in runs:
        name = run.name
        if counts[name] > 1:
            name = f"{run.path.resolve().parent.name}-{name}"
        base, k = name, 2
        while _slug(name) in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(_slug(name))
        run.name = name


# ==================================================================================================== the page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.92em; max-width: 1100px; }
.note { background: #fff6dd; border-left: 4px solid #e0b000; padding: 0.3em 0.8em; margin: 0.4em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _cell(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _share(fraction) -> str:
    return f" ({fraction:.0%})" if isinstance(fraction, (int, float)) and math.isfinite(fraction) else ""


def _table(runs: list[RunRecord]) -> str:
    head = ("<tr><th>run</th><th>method</th><th>steps</th><th>val acc</th><th>mean step s</th>"
            "<th>peak RSS MiB</th><th>GFLOPs/step</th><th>GFLOP/s (share of reference)</th></tr>")
    rows = []
    for run in runs:
        r = run.table_row()
        mark = "" if r["from_summary"] else " *"
        method = html.escape(r["method"].replace("?", "–"))
        rows.append(f"<tr><td class='text'><a href='#{html.escape(_slug(run.name))}'>{html.escape(r['run'])}</a>"
                    f"{mark}</td><td class='text'>{method}</td><td>{_cell(r['steps'], 'd')}</td>"
                    f"<td>{_cell(r['val_accuracy'], '.4f')}</td><td>{_cell(r['mean_step_seconds'], '.3f')}</td>"
                    f"<td>{_cell(r['peak_rss_mib'], '.0f')}</td><td>{_cell(r['gflops_per_step'], '.2f')}</td>"
                    f"<td>{_cell(r['gflops_per_second'], '.1f')}{_share(r['flop_utilization'])}</td></tr>")
    foot = ""
    if any(run.summary is None for run in runs):
        foot = ("<p>* no summary.json: figures computed from metrics.jsonl (val acc: the last eval line; mean step "
                "s: steady state, the first steps excluded as the trainer does).</p>")
    return f"<table>{head}{''.join(rows)}</table>{foot}"


def _figure_html(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f"<figure id='{html.escape(fig.file)}'><h3>{html.escape(fig.title)} "
            f"<small>(<a href='{html.escape(fig.file)}'>{html.escape(fig.file)}</a>)</small></h3>"
            f"<img src='data:image/png;base64,{data}' alt='{html.escape(fig.title)}'>"
            f"<figcaption>{fig.caption}</figcaption></figure>")


def _page(runs: list[RunRecord], overlay: Figure | None, per_run: dict[str, list[Figure]]) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>edge-alast report: {html.escape(', '.join(r.name for r in runs))}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>edge-alast training report</h1><p>{len(runs)} run{'s' * (len(runs) != 1)}, edge-alast "
             f"{__version__}. Every figure is embedded in this page and written beside it as a PNG.</p>",
             "<h2>Summary</h2>", _table(runs)]
    if overlay is not None:
        parts += ["<h2>Runs compared</h2>", _figure_html(overlay)]
    for run in runs:
        summary = run.summary or {}
        facts = []
        for key, label in (("model", "model"), ("profile", "profile"), ("device", "device"), ("precision", "precision"),
                           ("batch_size", "batch"), ("img_size", "image size")):
            value = summary.get(key, run.config.get(key))
            if value is not None:
                facts.append(f"{label} {value}")
        parts.append(f"<h2 id='{html.escape(_slug(run.name))}'>{html.escape(run.label)}</h2>"
                     f"<p><code>{html.escape(str(run.path))}</code>{' · ' if facts else ''}"
                     f"{html.escape(', '.join(facts))}</p>")
        parts += [f"<p class='note'>{html.escape(note)}</p>" for note in run.notes]
        parts += [_figure_html(fig) for fig in per_run[run.name]]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_report(run_dirs, out: str | Path) -> ReportResult:
    """Draw the figures of one or more run folders into ``out`` (PNGs) and write ``out/index.html``.

    Raises:
        ConfigError: a run folder without ``metrics.jsonl``, an output folder that cannot be written, or
            matplotlib not installed (the message names the extra to install).
    """
    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise ConfigError("RUN_DIR: give at least one run folder")
    drawer = _Drawer()
    _unique_names(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out: cannot write {out}: {e}") from e
    per_run: dict[str, list[Figure]] = {}
    for run in runs:
        figures = []
        if run.steps:
            for draw, what in ((_budget_figure, "per-block budgets"), (_trainable_figure, "trainable blocks"),
                               (_tokens_figure, "tokens per block"), (_curves_figure, ""),
                               (_resources_figure, "")):
                fig = draw(drawer, run)
                if fig is not None:
                    figures.append(fig)
                else:
                    run.notes.append(f"metrics.jsonl records no {what}: that figure is left out")
        per_run[run.name] = figures
    overlay = _overlay_figure(drawer, runs) if sum(bool(r.steps) for r in runs) > 1 else None
    written = []
    try:
        for fig in [*([overlay] if overlay else []), *(f for figs in per_run.values() for f in figs)]:
            written.append(atomic_write_bytes(out / fig.file, fig.png))
        index = atomic_write_bytes(out / "index.html", _page(runs, overlay, per_run).encode("utf-8"))
    except OSError as e:
        raise ConfigError(f"--out: cannot write {out}: {e}") from e
    return ReportResult(index=index, figures=tuple(written), runs=tuple(runs))
