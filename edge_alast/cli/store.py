"""``edge-alast update`` and ``edge-alast store init|list|show|rollback``: field updates of a model store.

torch is imported only inside ``update`` and ``store init``; ``store list/show/rollback`` run where torch is not
installed. See docs/field-updates.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from ..field.update import UpdateConfig
from ..errors import ConfigError, DiskFullError, EdgeAlastError
from .common import EXIT_FAILURE, EXIT_USAGE, EventPrinter, StopOnSignal, device_key_option, fail, sd_notify

_CLICK_TYPES = {"int": int, "float": float, "str": str}


def _parse_size(ctx, param, value):
    """A byte count from ``256MiB``, ``1.5GB`` or ``4096`` (the profiles' size syntax)."""
    if value is None:
        return None
    from ..device.profiles import _parse_size as parse

    size = parse(value)
    if size is None:
        raise click.BadParameter(f"expected a size like 256MiB or a number of bytes, got {value!r}")
    return size


def update_options(command):
    """An option for every :class:`UpdateConfig` field with a ``flag``, with its default, choices and help."""
    for f in reversed(dataclasses.fields(UpdateConfig)):
        meta = f.metadata
        if not meta.get("flag"):
            continue
        kind = str(f.type).replace(" ", "").removesuffix("|None")
        kwargs = {"help": meta["help"] + (f"  [default: {f.default}]" if f.default is not None else "")}
        if meta.get("choices"):
            kwargs["type"] = click.Choice(list(meta["choices"]))
        elif f.name == "replay_max_bytes":
            kwargs.update(type=str, callback=_parse_size)
        else:
            kwargs["type"] = _CLICK_TYPES[kind]
        if meta.get("envvar"):
            kwargs.update(envvar=meta["envvar"], show_envvar=True)
        command = click.option(meta["flag"], f.name, **kwargs)(command)
    return command


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


class _Printer(EventPrinter):
    """JSON lines on stdout, or short lines on a terminal; systemd status and watchdog pings."""

    def notify(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "stage":
            sd_notify(f"STATUS={event['stage']}: {event['message']}")
        elif kind == "step" and (event["step"] % 10 == 0 or event["step"] == event["steps"]):
            sd_notify(f"STATUS=train: step {event['step']}/{event['steps']} loss {event['loss']:.4f}")

    def show(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "stage":
            click.echo(f"{event['stage']}: {event['message']}")
        elif kind == "step" and (event["step"] % 10 == 0 or event["step"] == event["steps"]):
            click.echo(f"  step {event['step']}/{event['steps']}  loss {event['loss']:.4f}")
        elif kind == "warning":
            click.echo(f"warning: {event['message']}", err=True)
        elif kind in ("resume", "interrupted"):
            click.echo(f"{kind} at stage {event['stage']}")
        elif kind == "update":
            figures, checks = event["figures"], event["checks"]
            cand = figures.get("candidate") or {}
            cur = figures.get("current") or {}
            click.echo(f"{event['decision']}: current is {event['current']} "
                       f"(holdout accuracy: candidate {_pct(cand.get('accuracy'))}, current {_pct(cur.get('accuracy'))};"
                       f" on the classes current knew: {_pct(cand.get('old_accuracy'))} vs "
                       f"{_pct(cur.get('old_accuracy'))}; parity {'passed' if checks['parity']['passed'] else 'FAILED'})")
            for reason in event["reasons"]:
                click.echo(f"  refused: {reason}")


def _current_or_none(store_dir: str) -> str | None:
    try:
        from ..field.store import Store

        return Store(store_dir).current_name()
    except Exception:  # noqa: BLE001 - only for the error message
        return None


@click.command("update")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--data", required=True, type=click.Path(), help="ImageFolder of new images (one sub-folder per class).")
@update_options
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout (default when stdout is not a terminal).")
def update(store_dir, data, as_json, **options):
    """Fine-tune the store's current model on new images; publish the candidate only if its gate passes.

    \b
    Exit codes: 0 published, 4 current kept (gate refused the candidate), 2 bad option, not a store or a
    version not signed with --device-key, 3 bad data, 5 training diverged, 6 disk full, 75 interrupted or store
    busy (run again: it resumes), 1 unexpected (the store's current version is unchanged; run again once fixed:
    it resumes).

    \b
    Example:
      edge-alast update /var/lib/edge-alast/store --data /var/lib/edge-alast/batch --profile raspberry_pi_5_8gb
    """
    from ..field.update import update as run_update

    as_json = as_json or not sys.stdout.isatty()
    printer = _Printer(as_json)
    sd_notify("READY=1\nSTATUS=update: starting")
    try:
        config = UpdateConfig(**{k: v for k, v in options.items() if v is not None})
        with StopOnSignal() as stop:
            result = run_update(store_dir, data, config, on_event=printer,
                                should_stop=lambda: stop() or printer.stdout_lost,
                                tick=printer.watchdog.ping)
    except DiskFullError as e:
        sd_notify(f"STOPPING=1\nSTATUS=error: {e}")
        fail(DiskFullError(f"{e}; the store's current version is {_current_or_none(store_dir) or 'unchanged'}, "
                           "whole; run the same command again once space is freed: the update resumes"),
             DiskFullError.exit_code, as_json)
    except EdgeAlastError as e:
        sd_notify(f"STOPPING=1\nSTATUS=error: {e}")
        fail(e, e.exit_code, as_json)
    except ValueError as e:  # a bad value found by a validator below the CLI
        fail(e, EXIT_USAGE, as_json)
    except Exception as e:  # noqa: BLE001 - a failing card, a bug: say what is safe
        if os.environ.get("EDGE_ALAST_DEBUG"):
            raise
        current = _current_or_none(store_dir)
        sd_notify(f"STOPPING=1\nSTATUS=error: {e}")
        fail(RuntimeError(f"{type(e).__name__}: {e}; the store's current version is {current or 'unchanged'}, "
                          "whole; run the same command again once fixed: the update resumes "
                          "(EDGE_ALAST_DEBUG=1 for a traceback)"), EXIT_FAILURE, as_json)
    sd_notify(f"STOPPING=1\nSTATUS={result.decision}")
    sys.exit(result.exit_code)


@click.group("store")
def store():
    """Model stores for field updates: init, list, show, rollback (see `edge-alast update`)."""


@store.command("init")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--from", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="A finished run folder (its model, classes, model name and img size).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="A weights file instead (with --classes, --model, --img-size).")
@click.option("--classes", help="With --weights: comma-separated class names in the head's row order.")
@click.option("--model", "model_name", help="With --weights: timm model name.  [default: vit_small_patch14_dinov2]")
@click.option("--model-args", help="With --weights: JSON object of extra timm model arguments.")
@click.option("--img-size", type=int, help="With --weights: input side in pixels.  [default: 224]")
@click.option("--holdout", type=click.Path(exists=True, file_okay=False),
              help="ImageFolder of held-out images of these classes: the gate's reference for them.")
@click.option("--replay", "replay_data", type=click.Path(exists=True, file_okay=False),
              help="ImageFolder of training images to seed the replay sample with (e.g. the run's --data).")
@click.option("--replay-max-images", type=int, default=1000, show_default=True)
@click.option("--replay-max-bytes", type=str, default="256MiB", show_default=True, callback=_parse_size)
@click.option("--seed", type=int, default=0, show_default=True)
@device_key_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def init(store_dir, run_dir, weights, classes, model_name, model_args, img_size, holdout, replay_data,
         replay_max_images, replay_max_bytes, seed, device_key, as_json):
    """Create a model store whose first version (v0001) is a run's model or a weights file.

    \b
    Examples:
      edge-alast store init /var/lib/edge-alast/store --from runs/a --holdout imgs/val --replay imgs/train
      edge-alast store init STORE --weights vit_s.safetensors --classes cat,dog --img-size 112
    """
    from ..field.update import init_store

    try:
        args = json.loads(model_args) if model_args else None
        if args is not None and not isinstance(args, dict):
            raise ConfigError("--model-args: must be a JSON object")
        record = init_store(store_dir, run_dir=run_dir, weights=weights,
                            classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                            model=model_name, model_args=args, img_size=img_size, holdout=holdout,
                            replay_data=replay_data, replay_max_images=replay_max_images,
                            replay_max_bytes=replay_max_bytes, seed=seed, device_key=device_key,
                            on_event=lambda e: click.echo(f"warning: {e['message']}", err=True))
    except json.JSONDecodeError as e:
        fail(ConfigError(f"--model-args: not JSON: {e}"), EXIT_USAGE, as_json)
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)
    except OSError as e:
        fail(RuntimeError(f"{e}; nothing was created at {store_dir}"), EXIT_FAILURE, as_json)
    if as_json:
        click.echo(json.dumps(record, default=str))
    else:
        click.echo(f"created {store_dir}: v0001 ({len(record['classes'])} classes, {record['holdout_images']} holdout "
                   f"images, {record['replay']['images']} replay images)")


def _open(store_dir: str, as_json: bool, device_key: str | None = None):
    from ..field.store import Store
    from ..integrity import read_device_key

    try:
        return Store(store_dir, key=read_device_key(device_key))
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)


@store.command("list")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@device_key_option
def list_versions(store_dir, as_json, device_key):
    """The versions of a store, current marked, and the disk it uses."""
    s = _open(store_dir, as_json, device_key)
    current, usage = s.current_name(), s.disk_usage()
    rows = []
    for name in s.version_names():
        try:
            info = s.version(name).info
        except EdgeAlastError as e:  # e.g. a version not signed with --device-key
            fail(e, e.exit_code, as_json)
        figures = (info.get("metrics") or {}).get("holdout") or {}
        rows.append({"version": name, "current": name == current, "parent": info.get("parent"),
                     "classes": len(info.get("classes", [])), "holdout_accuracy": figures.get("accuracy"),
                     "holdout_images": figures.get("images"), "created": info.get("created"),
                     "bytes": usage["versions"][name]})
    if as_json:
        click.echo(json.dumps({"current": current, "versions": rows, "disk": usage}, default=str))
        return
    click.echo(f"{'':2}{'version':8} {'parent':8} {'classes':>7} {'holdout acc':>11} {'size':>11}  created")
    for r in rows:
        click.echo(f"{'*' if r['current'] else ' ':2}{r['version']:8} {r['parent'] or '-':8} {r['classes']:>7} "
                   f"{_pct(r['holdout_accuracy']):>11} {_mib(r['bytes']):>11}  {r['created']}")
    click.echo(f"disk: {_mib(usage['total'])} in all (holdout {_mib(usage['holdout'])}, replay "
               f"{_mib(usage['replay'])}, work {_mib(usage['work'])})")


@store.command("show")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False))
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@device_key_option
def show(store_dir, version, as_json, device_key):
    """A version's record (default: current): classes, parent, data, holdout figures, decision, and whether its
    files match their sha256."""
    s = _open(store_dir, as_json, device_key)
    try:
        v = s.version(version)
        problems = s.verify(v.name)
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)
    usage = s.disk_usage()
    out = {"version": v.name, "current": v.name == s.current_name(), "verified": not problems,
           "problems": problems, "bytes": usage["versions"][v.name], "store_bytes": usage["total"], **v.info}
    if as_json:
        click.echo(json.dumps(out, default=str))
        return
    figures = (v.info.get("metrics") or {}).get("holdout") or {}
    click.echo(f"{v.name}{' (current)' if out['current'] else ''}: parent {v.parent or '-'}, created "
               f"{v.info.get('created')}, {_mib(out['bytes'])}; files "
               f"{'verified (sha256)' if not problems else 'DAMAGED: ' + '; '.join(problems)}")
    click.echo(f"  classes ({len(v.classes)}): {', '.join(v.classes)}")
    if figures:
        click.echo(f"  holdout accuracy {_pct(figures.get('accuracy'))} on {figures.get('images')} images "
                   f"(classes the parent knew {_pct(figures.get('old_accuracy'))}, new "
                   f"{_pct(figures.get('new_accuracy'))})")
    click.echo(f"  store: {_mib(usage['total'])} on disk")


@store.command("rollback")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False))
@click.argument("version", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@device_key_option
def rollback(store_dir, version, as_json, device_key):
    """Point current at VERSION (default: current's parent), atomically, once its files verify."""
    from ..field.store import rollback as do_rollback

    s = _open(store_dir, as_json, device_key)
    try:
        with s.locked():
            record = do_rollback(s, version)
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)
    click.echo(json.dumps(record) if as_json else f"current is {record['version']} (was {record['from']})")
