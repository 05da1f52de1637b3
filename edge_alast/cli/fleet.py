"""``edge-alast fleet``: federated fine-tuning on Flower (needs ``pip install 'edge-alast[fleet]'``).

``fleet local`` runs a whole fleet on this machine (a SuperLink and N SuperNodes on 127.0.0.1); ``fleet app``
writes the Flower App and the deployment recipe for a real deployment (``flwr run``; TLS and node authentication
unless --insecure, which is refused off loopback without --allow-insecure); ``fleet keys`` writes a fleet's CA,
server certificate and node key pairs. flwr and torch are imported only when a command runs. The ``local`` command
takes every ``train`` option (:func:`.options.config_options`).
"""
from __future__ import annotations

import json
import sys
import time

import click

from ..errors import ConfigError, EdgeAlastError
from .common import EXIT_INTERRUPTED, EXIT_USAGE, InterruptOnSignal, fail
from ..fleet.settings import STRATEGIES
from .options import FiniteFloat, config_options, merge_options
# train options that are no fleet option: each round is a fresh run on the node (the server checkpoints rounds),
# validation is the server's (--val-data), and a static/random ALaST baseline needs one run folder.
# --eval-images is one: it caps the server's evaluation after every round (run config eval-images).
_NOT_FLEET_OPTIONS = ("resume", "checkpoint_every_seconds", "checkpoint_every_steps", "eval_every",
                      "val_fraction", "alast_from", "allocator", "device_key")


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
@click.option("--superlink", default="SERVER:9092", show_default=True,
              help="HOST:PORT the boards reach the SuperLink at (the recipe's commands use it).")
@click.option("--keys", "keys_dir", default="keys", show_default=True,
              help="The fleet's keys folder (edge-alast fleet keys DIR --host HOST): TLS and node authentication.")
@click.option("--node", "node_names", multiple=True,
              help="Node names for the recipe (default: those with a key pair in --keys, else node0).")
@click.option("--insecure", is_flag=True, help="Plain text without node authentication; only on a loopback "
                                               "--superlink unless --allow-insecure.")
@click.option("--allow-insecure", is_flag=True, help="Allow --insecure off loopback (updates travel in plain text).")
def app_command(folder, superlink, keys_dir, node_names, insecure, allow_insecure):
    """Write the Flower App (pyproject.toml: the installed ServerApp/ClientApp and the run config's keys with
    their defaults) and DEPLOY.md (the deployment's commands: SuperLink with TLS and node authentication, node
    registration, one SuperNode per board, flwr run) to FOLDER.

    \b
    Example:
      edge-alast fleet keys keys --host fleet.lan --nodes 4
      edge-alast fleet app fleet-app --superlink fleet.lan:9092 --keys keys
    """
    from pathlib import Path

    from ..fleet.keys import SERVER_CERT, certificate_hosts, keys_layout, load_keys
    from ..fleet.local import deployment_recipe, refuse_insecure
    from ..fleet.settings import write_app

    try:
        keys = None
        if insecure:
            refuse_insecure(superlink, allow_insecure)
            names = list(node_names) or ["node0"]
        else:
            folder_path = Path(keys_dir)
            if (folder_path / SERVER_CERT).exists():
                keys = load_keys(folder_path)
                host = superlink.rpartition(":")[0].strip("[]")
                if host != "SERVER" and host not in certificate_hosts(folder_path / SERVER_CERT):
                    raise ConfigError(f"--keys: {folder_path / SERVER_CERT} does not name {host}; rerun `edge-alast "
                                      f"fleet keys {keys_dir} --host {host}` (reissues it from the same CA)")
                names = list(node_names) or sorted(keys.nodes) or ["node0"]
                keys = keys_layout(keys.folder, names)
            else:
                names = list(node_names) or ["node0"]
                keys = keys_layout(folder_path, names)
        path = write_app(folder)
        recipe = Path(folder) / "DEPLOY.md"
        recipe.write_text(deployment_recipe(folder, superlink, keys, names, allow_insecure))
    except EdgeAlastError as e:
        fail(e, e.exit_code)
    click.echo(f"wrote {path} and {recipe}" + ("" if keys is None or keys.server_cert.exists() else
                                              f" (no keys in {keys_dir} yet: see step 1)"))


@fleet.command("keys")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--nodes", type=int, default=0, help="Node key pairs node0 ... node<N-1>.")
@click.option("--node", "node_names", multiple=True, help="A node key pair by name (repeatable).")
@click.option("--host", "hosts", multiple=True,
              help="A name or IP address the SuperLink is reached at, besides 127.0.0.1/::1/localhost (repeatable).")
def keys_command(folder, nodes, node_names, hosts):
    """Write a fleet's keys to FOLDER: a CA (ca.pem, ca.key), the SuperLink's TLS certificate signed by it
    (server.pem, server.key; SAN 127.0.0.1, ::1, localhost and every --host) and one EC P-384 key pair per node
    for Flower's node authentication (nodes/<name>, nodes/<name>.pub). Files that exist are kept; the server
    certificate is reissued from the same CA when it lacks a --host.

    \b
    Example:
      edge-alast fleet keys keys --host fleet.lan --nodes 4
    """
    from ..fleet.keys import write_keys

    try:
        keys = write_keys(folder, [f"node{i}" for i in range(nodes)] + list(node_names), hosts)
    except EdgeAlastError as e:
        fail(e, e.exit_code)
    for name in keys.written:
        click.echo(f"wrote {keys.folder / name}")
    click.echo(f"server certificate names: {', '.join(keys.hosts)}; node key pairs: {', '.join(keys.nodes) or '-'}")


@fleet.command("local")
@config_options
@click.option("--nodes", type=int, required=True, help="SuperNodes to start (each gets a share of --data).")
@click.option("--rounds", type=int, required=True, help="Federated rounds.")
@click.option("--partition", default="iid", show_default=True,
              help="How --data is split among the nodes: iid, or dirichlet:ALPHA (per-class shares drawn from "
                   "Dir(ALPHA); 0.5 is strongly non-IID). Seeded by --seed.")
@click.option("--node-profiles", type=str, help="Comma-separated device profile per node, cycled (e.g. "
                                                "jetson_orin_nano_4gb,raspberry_pi_4_4gb); default: --profile.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="fedavg", show_default=True,
              help="Flower's strategy: fedavg (weighted by each node's training images), fedprox, fedadam; robust "
                   "aggregators fedmedian, fedtrimmedavg, krum, multikrum, bulyan.")
@click.option("--proximal-mu", type=float, help="fedprox: weight of mu/2 |w - w_global|^2.  [default: 0.01]")
@click.option("--server-lr", type=float, help="fedadam: server learning rate.  [default: 0.01]")
@click.option("--fraction-train", type=float, help="Share of the nodes sampled each round.  [default: 1.0]")
@click.option("--min-available-nodes", type=int,
              help="A round waits until this many nodes are connected.  [default: 1]")
@click.option("--round-timeout", type=float,
              help="Seconds a round waits for replies; later replies are left out.  [default: 3600]")
@click.option("--max-update-norm", type=float,
              help="Leave out a reply whose update has a larger L2 norm (0: no bound).  [default: 1000]")
@click.option("--clip-norm", type=float, help="Clip every update to this L2 norm (0: off; the DP clipping norm).")
@click.option("--max-examples", type=int,
              help="Cap of one reply's FedAvg weight (0: steps x batch size).  [default: 0]")
@click.option("--trim-beta", type=float, help="fedtrimmedavg: share cut at each end.  [default: 0.2]")
@click.option("--malicious-nodes", type=int, help="krum, multikrum, bulyan: nodes assumed malicious.  [default: 1]")
@click.option("--dp", type=click.Choice(["none", "server", "client"]),
              help="Differential privacy with fixed clipping at --clip-norm (Flower's wrappers; client: each node "
                   "clips with fixedclipping_mod).  [default: none]")
@click.option("--dp-noise", type=float, help="dp: noise multiplier.  [default: 1.0]")
@click.option("--tls", is_flag=True, help="TLS and node authentication on loopback too (keys from --keys or "
                                          "OUT/keys, written when missing).")
@click.option("--keys", "keys_dir", type=str, help="The fleet's keys folder (implies --tls).")
@click.option("--fault", "faults", multiple=True, metavar="NODE=SPEC",
              help="Testing the server's checks: node NODE corrupts its replies (nan, inf, scale:X, examples:N; "
                   "@R,S for rounds R and S only), e.g. node1=nan@2 or node3=scale:-10. Repeatable.")
@click.option("--threads", type=int, help="Torch threads per node; default: this host's CPUs / --nodes.")
@click.option("--timeout", type=FiniteFloat(min=0, min_open=True),
              help="Give up (and stop everything) after this many seconds.")
@click.option("--config", "config_file", type=str,
              help="YAML run file whose keys mirror the train options (as for `train --config`).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout (default when not a terminal).")
def local(nodes, rounds, partition, node_profiles, strategy, proximal_mu, server_lr, fraction_train,
          min_available_nodes, round_timeout, max_update_norm, clip_norm, max_examples, trim_beta, malicious_nodes, dp,
          dp_noise, tls, keys_dir, faults, threads, timeout, config_file, as_json, **options):
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
                    "round-timeout": round_timeout, "export": export, "max-update-norm": max_update_norm,
                    "clip-norm": clip_norm, "max-examples": max_examples, "trim-beta": trim_beta,
                    "malicious-nodes": malicious_nodes, "dp": dp, "dp-noise": dp_noise}
        fault_map = {}
        for spec in faults:
            name, sep, value = spec.partition("=")
            if not sep or not name.strip() or not value.strip():
                raise click.UsageError(f"--fault: NODE=SPEC (e.g. node1=nan@2), got {spec!r}")
            fault_map[name.strip()] = value.strip()
        from ..fleet.local import prepare_local, run_local

        plan = prepare_local(out=out, data=data, val_data=val_data, nodes=nodes, rounds=rounds, train=train,
                             partition=partition, device=train.get("device"),
                             node_profiles=[p.strip() for p in node_profiles.split(",")] if node_profiles
                             else None, fleet={k: v for k, v in run_keys.items() if v is not None},
                             threads=threads, tls=tls, keys=keys_dir, faults=fault_map)
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
            security = "TLS + node authentication" if event.get("tls") else "plain text (loopback)"
            click.echo(f"{elapsed} SuperLink on {event['superlink']} ({security}), {event['nodes']} SuperNodes -> "
                       f"{event['out']}")
            for node, fault in (event.get("faults") or {}).items():
                click.echo(f"note: {node} injects fault {fault} (testing the server's checks)", err=True)
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
            for r in event.get("rejected") or []:
                click.echo(f"          rejected {r['node']}: {r['reason']}")
            if event.get("no_update"):
                click.echo(f"          global model not updated: {event['no_update']}")
        elif kind == "done":
            click.echo(f"{elapsed} done: {event['rounds']} rounds, val accuracy {event['val_accuracy']}, "
                       f"{event['wall_seconds']:.0f} s -> {event['out']}")
    return show
