"""``edge-alast report``: figures and an HTML page from run folders.

Imports nothing heavy: torch is never imported (a report is drawn wherever the run folders were copied), and
matplotlib only when the report is drawn (:mod:`edge_alast.report`).
"""
from __future__ import annotations

import json

import click

from ..errors import EdgeAlastError
from .common import fail


@click.command(context_settings={"show_default": True})
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write index.html and the PNGs to (created if missing).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def report(run_dirs, out, as_json):
    """Draw what one or more training runs did: per-block budgets, trainable blocks and tokens per step, loss
    and validation accuracy over steps and wall-clock, step time and memory against the planner's prediction
    and ceiling; with several runs, accuracy against wall-clock and FLOPs side by side.

    \b
    Writes OUT/index.html (self-contained: the figures are embedded) and the same figures as PNGs beside it.
    Needs matplotlib: pip install 'edge-alast[report]'. Validation curves need `train --eval-every N`.

    \b
    Examples:
      edge-alast report runs/a --out runs/a/report
      edge-alast report runs/alast runs/full runs/head --out reports/compare
    """
    from ..report import render_report

    try:
        result = render_report(run_dirs, out)
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)
    notes = {run.name: run.notes for run in result.runs if run.notes}
    if as_json:
        click.echo(json.dumps({"index": str(result.index), "figures": [str(p) for p in result.figures],
                               "notes": notes}))
        return
    for name, run_notes in notes.items():
        for note in run_notes:
            click.echo(f"note: {name}: {note}", err=True)
    click.echo(f"wrote {result.index} ({len(result.figures)} figures)")
