"""``edge-alast fleet``: federated fine-tuning on Flower (needs ``pip install 'edge-alast[fleet]'``).

``fleet local`` runs a whole fleet on this machine (a SuperLink and N SuperNodes on 127.0.0.1); ``fleet app``
writes the Flower App for a real deployment (``flwr run``). flwr and torch are imported only when a command runs.
The ``local`` command takes every ``train`` option (:func:`.options.config_options`).
"""
from __future__ import annotations

import json
import sys
import time

import click

from ..errors import EdgeAlastError
from .common import EXIT_INTERRUPTED, EXIT_USAGE, InterruptOnSignal, fail
from .options import config_options, merge_options
# train options that are no fleet option: each round is a fresh run on the node (the server checkpoints rounds),
# validation is the server's (--val-data), and a static/random ALaST baseline needs one run folder.
_NOT_FLEET_OPTIONS = ("resume", "checkpoint_every_seconds", "checkpoint_every_steps", "eval_every", "eval_images",
                      "val_fraction", "alast_from", "allocator")


@click.group()
def fleet() -> None:
    """Federated fine-tuning across devices on Flower (pip install 'edge-alast[fleet]').

    \b
    Each round every node runs edge-alast's trainer on its own images for --steps steps under its own device
    profile, from the global model's trainable tensors (for LoRA methods: the adapters, head and final norm) and
    its own ALaST budgets; the server averages the tensors (FedAvg weighted by images; fedprox, fedadam),
    evaluates on --val-data, checkpoints, and after the last round writes what `train` writes.
    """


@fleet.command("app")
@click.argument("folder", type=click.Path(file_okay=False))
def app_command(folder):
    """Write the Flower App (pyproject.toml: the installed ServerApp/ClientApp and the run config's keys with
    their defaults) to FOLDER, for `flwr run FOLDER CONNECTION --run-config ...` on a real SuperLink.

    \b
    Example:
      edge-alast fleet app fleet-app && flwr run fleet-app lab --run-config run.toml
    """
    from ..fleet.settings import write_app

    path = write_app(folder)
    click.echo(f"wrote {path}")


@fleet.command("local")
@config_options
@click.option("--nodes", type=int, required=True, help="SuperNodes to start (each gets a share of --data).")
@click.option("--rounds", type=int, required=True, help="Federated rounds.")
@click.option("--partition", default="iid", show_default=True,
              help="How --data is split among the nodes: iid, or dirichlet:ALPHA (per-class shares drawn from "
                   "Dir(ALPHA); 0.5 is strongly non-IID). Seeded by --seed.")
@click.option("--node-profiles", type=str, help="Comma-separated device profile per node, cycled (e.g. "
                                                "jetson_orin_nano_4gb,raspberry_pi_4_4gb); default: --profile.")
@click.option("--strategy", type=click.Choice(["fedavg", "fedprox", "fedadam"]), default="fedavg",
              show_default=True, help="fedavg: weighted by each node's training images.")
@click.option("--proximal-mu", type=float, help="fedprox: weight of mu/2 |w - w_global|^2.  [default: 0.01]")
@click.option("--server-lr", type=float, help="fedadam: server learning rate.  [default: 0.01]")
@click.option("--fraction-train", type=float, help="Share of the nodes sampled each round.  [default: 1.0]")
@click.option("--min-available-nodes", type=int,
              help="A round waits until this many nodes are connected.  [default: 1]")
@click.option("--round-timeout", type=float,
              help="Seconds a round waits for replies; later replies are left out.  [default: 3600]")
@click.option("--threads", type=int, help="Torch threads per node; default: this host's CPUs / --nodes.")
@click.option("--timeout", type=float, help="Give up (and stop everything) after this many seconds.")
@click.option("--config", "config_file", type=str,
              help="YAML run file whose keys mirror the train options (as for `train --config`).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout (default when not a terminal).")
def local(nodes, rounds, partition, node_profiles, strategy, proximal_mu, server_lr, fraction_train,
          min_available_nodes, round_timeout, threads, timeout, config_file, as_json, **options):
    """Run a whole fleet on this machine: split --data among N nodes, start a Flower SuperLink and N
    SuperNodes as processes on 127.0.0.1, run the federation, stop every process. --steps is per round and
    node. Writes what `train` writes to --out (summary.json: accuracy after each round, bytes per round,
    each node's peak RSS; model.safetensors, model.onnx), plus nodes/, logs/ and the server's checkpoints:
    the same command resumes after the last finished round.

    \b
    Example:
      edge-alast fleet local --nodes 4 --rounds 5 --partition dirichlet:0.5 \\
        --data imgs/train --val-data imgs/val --weights vit_s.safetensors --method alast-lora \\
        --lr 1e-3 --steps 10 --img-size 112 --out runs/fleet
    """
    as_json = as_json or not sys.stdout.isatty()
    try:
        for name in _NOT_FLEET_OPTIONS:  # taken off this command; nested_options expects every section flag
            options.setdefault(name, None)
        train = merge_options(config_file, options)
        unusable = sorted(k for k in train if k in _NOT_FLEET_OPTIONS)
        if unusable:
            raise click.UsageError(f"{config_file}: {', '.join(unusable)} are not fleet options")
        for key in ("data", "val_data", "out"):
            if not train.get(key):
                raise click.UsageError(f"--{key.replace('_', '-')} is required (on the command line or in "
                                       "--config)")
        data, val_data, out = train.pop("data"), train.pop("val_data"), train.pop("out")
        export = train.pop("export", None)
        run_keys = {"strategy": strategy, "proximal-mu": proximal_mu, "server-lr": server_lr,
                    "fraction-train": fraction_train, "min-available-nodes": min_available_nodes,
                    "round-timeout": round_timeout, "export": export}
        from ..fleet.local import prepare_local, run_local

        plan = prepare_local(out=out, data=data, val_data=val_data, nodes=nodes, rounds=rounds, train=train,
                             partition=partition, device=train.get("device"),
                             node_profiles=[p.strip() for p in node_profiles.split(",")] if node_profiles
                             else None, fleet={k: v for k, v in run_keys.items() if v is not None},
                             threads=threads)
        with InterruptOnSignal():
            run_local(plan, on_event=_printer(as_json), timeout=timeout)
    except KeyboardInterrupt:
        message = ("interrupted: every process was stopped; the server's checkpoint after the last finished "
                   "round is kept, and the same command resumes from it")
        click.echo(json.dumps({"event": "interrupted", "message": message}) if as_json else message, err=not as_json)
        sys.exit(EXIT_INTERRUPTED)
    except EdgeAlastError as e:
        fail(e, e.exit_code, as_json)
    except click.UsageError:
        raise
    except ValueError as e:
        fail(e, EXIT_USAGE, as_json)


local.params = [p for p in local.params if p.name not in _NOT_FLEET_OPTIONS]


def _printer(as_json: bool):
    t0 = time.monotonic()

    def show(event: dict) -> None:
        if as_json:
            click.echo(json.dumps(event, default=str))
            return
        kind, elapsed = event.get("event"), f"[{time.monotonic() - t0:6.0f} s]"
        if kind == "fleet":
            click.echo(f"{elapsed} SuperLink on {event['superlink']}, {event['nodes']} SuperNodes -> {event['out']}")
            for note in event.get("notes", []):
                click.echo(f"note: {note}", err=True)
        elif kind == "run":
            click.echo(f"{elapsed} run {event['run_id']} submitted")
        elif kind == "round" and event["round"] == 0:
            acc = event.get("val_accuracy")
            click.echo(f"{elapsed} round 0 (the starting model): val accuracy {'-' if acc is None else f'{acc:.4f}'}")
        elif kind == "round":
            acc = event.get("val_accuracy")
            lost = event["failed"] + event["missing"]
            click.echo(f"{elapsed} round {event['round']}: val accuracy "
                       f"{'-' if acc is None else f'{acc:.4f}'}, {event.get('ok')}/{event.get('sent')} nodes, "
                       f"{(event.get('bytes_up') or 0) / 2**20:.2f} MiB up, "
                       f"{(event.get('bytes_down') or 0) / 2**20:.2f} MiB down"
                       + (f", left out: {lost}" if lost else ""))
        elif kind == "done":
            click.echo(f"{elapsed} done: {event['rounds']} rounds, val accuracy {event['val_accuracy']}, "
                       f"{event['wall_seconds']:.0f} s -> {event['out']}")
    return show
