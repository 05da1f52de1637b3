"""A whole fleet on this machine (``edge-alast fleet local``): a real Flower SuperLink and N SuperNodes as separate
processes on 127.0.0.1, the App submitted with ``flwr run``, every process stopped at the end; and the command
lines of a real deployment (:func:`superlink_argv`, :func:`register_argv`, :func:`supernode_argv`: the same lines
``fleet local --tls`` runs and docs/fleet.md shows).

With keys (``--tls``; :mod:`edge_alast.fleet.keys`) the SuperLink serves TLS with the fleet's server certificate
and accepts only SuperNodes whose public key was registered with ``flwr supernode register`` (Flower's node
authentication); each SuperNode verifies the server against the fleet's CA and signs in with its private key.
Without keys everything runs with ``--insecure``, which :func:`refuse_insecure` allows on loopback only.

:class:`LocalFleet` owns the processes. Each is started in a session of its own; every process group seen under
it is recorded (a SuperLink's SuperExec makes a session of its own; a SuperNode's SuperExec and ClientApps stay in
its group), and on exit -- also on error, Ctrl-C and SIGTERM (the CLI turns it into KeyboardInterrupt) -- those
groups get SIGTERM, then SIGKILL after 10 s. Flower's telemetry, update check and run-time dependency installation
are switched off, its home folder (``FLWR_HOME``) is inside the fleet folder, and nothing listens beyond 127.0.0.1.

Fleet folder (``--out``)::

    summary.json, config.json, model.safetensors, model.onnx, manifest.json, checkpoints/, rounds.jsonl   (server)
    nodes/partition.json, nodes/node<i>/{node.toml, data/, policy.pt, round-0001/, ...}                     (nodes)
    app/pyproject.toml, run-config.toml     the Flower App and its run config (``flwr run app local --run-config``)
    logs/{superlink,node<i>}.log, logs/run-<id>.log, flwr-home/, superlink.db
    keys/   with --tls: the fleet's CA, server certificate and node key pairs (unless --keys names a folder)
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from ..atomic import atomic_write_json
from ..errors import ConfigError, EdgeAlastError
from .keys import FleetKeys, is_loopback, load_keys
from .settings import Fault, FleetSettings, NodeSettings, write_app, write_toml

CONNECTION = "local"  # the SuperLink connection's name in FLWR_HOME/config.toml
# Every Flower process gets these: no telemetry, no update check, no `uv sync` of the App at run time.
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
STOP_GRACE_SECONDS = 10.0


class FleetError(EdgeAlastError):
    """The federation did not finish (exit code 1): a process died, the run failed, or it timed out."""


def flower_bin() -> Path:
    """The folder of the ``flower-superlink``/``flower-supernode``/``flwr`` scripts (beside this interpreter)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists():
        raise ConfigError(f"Flower is not installed beside {sys.executable}: pip install 'edge-alast[fleet]'")
    return bin_dir


# ---------------------------------------------------------------------------------------------- command lines
def refuse_insecure(address: str, allow_insecure: bool = False) -> None:
    """Plain-text Flower (``--insecure``) only on loopback, unless the operator says so (``--allow-insecure``):
    off this machine the model updates and every node's traffic would travel unencrypted and unauthenticated."""
    if not is_loopback(address) and not allow_insecure:
        raise ConfigError(f"--insecure: {address} is not a loopback address; a fleet beyond this machine runs with "
                          "TLS and node authentication (edge-alast fleet keys DIR, --keys DIR), or pass "
                          "--allow-insecure to send updates in plain text anyway")


def superlink_argv(bin_dir: Path, host: str, port: int, database: str | os.PathLike,
                   keys: FleetKeys | None = None, allow_insecure: bool = False) -> list[str]:
    """``flower-superlink``: TLS with the fleet's server certificate and node authentication with ``keys``,
    ``--insecure`` without (see :func:`refuse_insecure`)."""
    if keys is not None:
        security = ["--ssl-ca-certfile", str(keys.ca_cert), "--ssl-certfile", str(keys.server_cert),
                    "--ssl-keyfile", str(keys.server_key), "--enable-supernode-auth"]
    else:
        refuse_insecure(host, allow_insecure)
        security = ["--insecure"]
    return [str(Path(bin_dir) / "flower-superlink"), *security, "--host", host, "--port", str(port),
            "--database", str(database), "--disable-runtime-dependency-installation"]


def register_argv(bin_dir: Path, public_key: str | os.PathLike, connection: str = "local") -> list[str]:
    """``flwr supernode register``: the SuperLink accepts the node holding this public key's private key."""
    return [str(Path(bin_dir) / "flwr"), "supernode", "register", str(public_key), connection]


def supernode_argv(bin_dir: Path, superlink: str, node_config: str | os.PathLike, port: int | None = None,
                   keys: FleetKeys | None = None, private_key: str | os.PathLike | None = None,
                   allow_insecure: bool = False) -> list[str]:
    """``flower-supernode``: verifies the SuperLink against the fleet's CA and signs in with ``private_key``
    (with ``keys``); ``--insecure`` without. ``port``: its local ClientApp API (several nodes on one host)."""
    if keys is not None:
        security = ["--root-certificates", str(keys.ca_cert)]
        if private_key is not None:
            security += ["--auth-supernode-private-key", str(private_key)]
    else:
        refuse_insecure(superlink, allow_insecure)
        security = ["--insecure"]
    local = ["--host", "127.0.0.1", "--port", str(port)] if port else []
    return [str(Path(bin_dir) / "flower-supernode"), *security, "--superlink", superlink, *local,
            "--node-config", str(node_config)]


def connection_toml(name: str, address: str, keys: FleetKeys | None = None) -> str:
    """The ``flwr`` CLI's connection to a SuperLink (``$FLWR_HOME/config.toml``)."""
    security = f'root-certificates = "{keys.ca_cert}"' if keys is not None else "insecure = true"
    return f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'


def deployment_recipe(app_dir: str | os.PathLike, superlink: str, keys: FleetKeys | None, nodes: list[str],
                      allow_insecure: bool = False, connection: str = "fleet") -> str:
    """The commands of a real deployment, in order (markdown): the SuperLink, the ``flwr`` connection, node
    registration, one SuperNode per board, the run. The same command lines :class:`LocalFleet` runs."""
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--superlink: HOST:PORT, got {superlink!r}")
    listen = "127.0.0.1" if is_loopback(superlink) else "0.0.0.0"
    bin_dir = Path("")
    link = superlink_argv(bin_dir, listen, int(port), "fleet.db", keys, allow_insecure)
    lines = ["# edge-alast fleet: deployment", "",
             f"Written by `edge-alast fleet app`. SuperLink address: `{superlink}`; "
             + (f"TLS with the fleet's CA and node authentication (keys: `{keys.folder}`)." if keys else
                "**plain text (--insecure), no node authentication.**"), ""]
    if keys is not None:
        lines += ["1. Keys (once; keep `ca.key` off the server if you can):", "",
                  f"       edge-alast fleet keys {keys.folder} --host {host} "
                  + " ".join(f"--node {n}" for n in nodes), ""]
    lines += ["2. On the server:", "", "       " + shlex.join(link), "",
              f"3. The `flwr` CLI's connection (`$FLWR_HOME/config.toml`, default `~/.flwr/config.toml`):", ""]
    lines += ["       " + line for line in connection_toml(connection, superlink, keys).splitlines()] + [""]
    if keys is not None:
        lines += ["4. Register every node's public key (a node whose key is not registered is refused):", ""]
        lines += ["       " + shlex.join(register_argv(bin_dir, keys.nodes[n][1], connection)) for n in nodes] + [""]
    lines += ["5. On each board: copy `ca.pem` and its own private key `nodes/<name>` (mode 0600) there, write its "
              "node config `node.toml` (`data = \"/data/imgs\"`, `out = \"/var/lib/edge-alast/node\"`, "
              "`name = \"<name>\"`, optionally `profile`), then:", ""]
    for n in nodes:
        private = keys.nodes[n][0] if keys is not None else None
        lines += ["       " + shlex.join(supernode_argv(bin_dir, superlink, "node.toml", None, keys, private,
                                                        allow_insecure))]
    lines += ["", "6. Submit the run:", "", f"       flwr run {app_dir} {connection} --run-config run.toml", ""]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and alive():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FleetError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class LocalFleet:
    """One SuperLink and SuperNodes on 127.0.0.1, as processes this object owns (use as a context manager).

    Args:
        out: The fleet folder (logs/, flwr-home/, superlink.db go there).
        nodes: Each SuperNode's node config.
        threads: OMP threads per SuperNode (its ClientApps inherit them); None leaves torch's default.
        keys: The fleet's keys: TLS and node authentication (each node's key pair is ``keys.nodes[node.name]``);
            None: plain text on loopback.
    """

    def __init__(self, out: str | os.PathLike, nodes: list[NodeSettings], threads: int | None = None,
                 keys: FleetKeys | None = None):
        self.bin = flower_bin()
        self.keys = keys
        self.registered: dict[str, int] = {}  # node name -> the node id its registered key got
        self.out = Path(out).resolve()
        self.nodes = list(nodes)
        self.link_port = free_port()
        self.node_ports = [free_port() for _ in self.nodes]
        self.database = self.out / "superlink.db"
        self.procs: dict[str, subprocess.Popen] = {}
        self.pgids: dict[str, set[int]] = {}
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = self.out / "flwr-home"
        self.home.mkdir(exist_ok=True)
        (self.home / "config.toml").write_text(connection_toml(CONNECTION, f"127.0.0.1:{self.link_port}", keys))
        self.env = dict(os.environ, FLWR_HOME=str(self.home), PYTHONUNBUFFERED="1", **FLWR_ENV,
                        PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")  # SuperExec: PATH lookup
        self.node_env = dict(self.env, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        self.node_configs = []
        for i, node in enumerate(self.nodes):
            Path(node.out).mkdir(parents=True, exist_ok=True)
            self.node_configs.append(write_toml(Path(node.out) / "node.toml", node.to_node_config()))

    # ------------------------------------------------------------------------------------------ processes
    def _spawn(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs[name] = proc
        self.pgids[name] = {proc.pid}  # a session leader: its group id is its pid
        return proc

    def start_superlink(self) -> None:
        """Start the SuperLink (again, after a kill: same port, same database) and wait until it listens."""
        proc = self._spawn("superlink", superlink_argv(self.bin, "127.0.0.1", self.link_port, self.database,
                                                       self.keys), self.env)
        wait_port(self.link_port, alive=lambda: proc.poll() is None)
        if proc.poll() is not None:
            raise FleetError(f"flower-superlink exited with code {proc.returncode} (see {self.logs}/superlink.log)")
        end = time.monotonic() + 30  # its SuperExec runs in a session of its own: learn that group now
        while len(self.pgids["superlink"]) < 2 and time.monotonic() < end:
            self.tree("superlink")
            time.sleep(0.2)

    def register_nodes(self) -> None:
        """With keys: register every node's public key with the SuperLink (once; the database keeps them)."""
        if self.keys is None:
            return
        for node in self.nodes:
            if node.name in self.registered:
                continue
            _, public = self.keys.node_key(node.name)
            res = self.flwr(*register_argv(self.bin, public, CONNECTION)[1:])
            if not res.get("success"):
                raise FleetError(f"flwr supernode register {public} failed: {res}")
            self.registered[node.name] = int(res["node-id"])

    def start_node(self, i: int, authenticate: bool = True) -> subprocess.Popen:
        """Start SuperNode ``i`` (again: the same node config, as a board back from a power cut). With keys it
        signs in with its private key; ``authenticate=False`` starts it without one (the SuperLink refuses it)."""
        private = self.keys.node_key(self.nodes[i].name)[0] if self.keys is not None and authenticate else None
        return self._spawn(f"node{i}", supernode_argv(self.bin, f"127.0.0.1:{self.link_port}", self.node_configs[i],
                                                      self.node_ports[i], self.keys, private), self.node_env)

    def start(self, timeout: float = 180.0) -> None:
        self.start_superlink()
        self.register_nodes()
        for i in range(len(self.nodes)):
            self.start_node(i)
        self.wait_nodes_online(len(self.nodes), timeout=timeout)

    def tree(self, name: str) -> list[psutil.Process]:
        """The process and its live descendants; remembers their process groups (see :meth:`stop_all`)."""
        try:
            root = psutil.Process(self.procs[name].pid)
            procs = [root] + root.children(recursive=True)
        except (psutil.NoSuchProcess, KeyError):
            return []
        for p in procs:
            try:
                self.pgids.setdefault(name, set()).add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
        return procs

    def _signal(self, name: str, sig: int) -> None:
        self.tree(name)
        for pgid in self.pgids.get(name, ()):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _gone(self, names) -> bool:
        for proc in self.procs.values():
            proc.poll()  # reap our own children, or their zombies keep the group alive
        for name in names:
            for pgid in self.pgids.get(name, ()):
                try:
                    os.killpg(pgid, 0)
                    return False
                except (ProcessLookupError, PermissionError):
                    pass
        return True

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = STOP_GRACE_SECONDS) -> None:
        """Signal every process group of ``name`` (``superlink`` or ``node<i>``: its SuperExec, ServerApp or
        ClientApps included) and wait until they are gone; SIGKILL is a power cut."""
        self._signal(name, sig)
        end = time.monotonic() + timeout
        while not self._gone([name]) and time.monotonic() < end:
            time.sleep(0.1)
        if not self._gone([name]):
            self._signal(name, signal.SIGKILL)
        self.pgids.pop(name, None)

    def stop_all(self) -> None:
        """SIGTERM every group ever seen (nodes first), SIGKILL what is left after 10 s."""
        names = list(self.procs)
        for name in reversed(names):
            self._signal(name, signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE_SECONDS
        while not self._gone(names) and time.monotonic() < end:
            time.sleep(0.2)
        for name in names:
            self._signal(name, signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def alive_pids(self) -> list[int]:
        """Live processes in any group this fleet started (empty after :meth:`stop_all`)."""
        groups = {g for gs in self.pgids.values() for g in gs}
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return found

    def __enter__(self) -> "LocalFleet":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # ------------------------------------------------------------------------------------------ flwr CLI
    def flwr(self, *args: str, timeout: float = 120.0) -> dict:
        """Run the ``flwr`` CLI against this fleet's SuperLink; its JSON answer."""
        r = subprocess.run([str(self.bin / "flwr"), *args, "--format", "json"], env=self.env, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            raise FleetError(f"flwr {' '.join(args)} -> exit {r.returncode}: {r.stdout[-1500:]} "
                             f"{r.stderr[-1500:]}") from None

    def online_nodes(self) -> int:
        nodes = self.flwr("supernode", "list", CONNECTION).get("nodes", [])
        return sum(1 for n in nodes if n.get("status") == "online")

    def wait_nodes_online(self, n: int, timeout: float = 180.0, supervise: bool = False) -> float:
        """Wait for ``n`` online SuperNodes; with ``supervise``, restart node processes that exited (as systemd's
        Restart=always would on a board)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.procs["superlink"].poll() is not None:
                raise FleetError(f"flower-superlink exited (see {self.logs}/superlink.log)")
            for i in range(len(self.nodes)):
                if supervise and self.procs[f"node{i}"].poll() is not None:
                    self.kill(f"node{i}")
                    self.start_node(i)
            if self.online_nodes() >= n:
                return time.monotonic() - t0
            time.sleep(1.0)
        raise FleetError(f"{n} SuperNodes not online after {timeout:.0f} s (see {self.logs})")

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """``flwr run``: returns the run id."""
        res = self.flwr("run", str(app_dir), CONNECTION, "--run-config", str(run_config))
        if not res.get("success"):
            raise FleetError(f"flwr run failed: {res}")
        return int(res["run-id"])

    def status(self, run_id: int) -> dict:
        runs = self.flwr("list", CONNECTION, "--run-id", str(run_id)).get("runs") or [{}]
        return runs[0]

    def wait_run(self, run_id: int, timeout: float | None = None, poll: float = 3.0,
                 on_poll: Callable[[], None] | None = None) -> dict:
        """Poll until the run finishes; returns its status record (``status``: ``finished:completed`` ...)."""
        end = None if timeout is None else time.monotonic() + timeout
        while end is None or time.monotonic() < end:
            if on_poll is not None:
                on_poll()
            if self.procs["superlink"].poll() is not None:
                raise FleetError(f"flower-superlink exited during run {run_id} (see {self.logs}/superlink.log)")
            st = self.status(run_id)
            if str(st.get("status", "")).startswith("finished"):
                return st
            time.sleep(poll)
        raise FleetError(f"run {run_id} not finished after {timeout:.0f} s")

    def stop_run(self, run_id: int) -> None:
        self.flwr("stop", str(run_id), CONNECTION)

    def save_run_log(self, run_id: int) -> Path:
        r = subprocess.run([str(self.bin / "flwr"), "log", str(run_id), CONNECTION, "--show"], env=self.env,
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        path = self.logs / f"run-{run_id}.log"
        path.write_text(r.stdout + r.stderr)
        return path

    def clientapp_running(self, i: int) -> bool:
        """True while SuperNode ``i`` runs a ClientApp (a round is in progress on it)."""
        for p in self.tree(f"node{i}")[1:]:
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "flwr-clientapp" in " ".join(p.cmdline()):
                    return True
            except psutil.Error:
                pass
        return False


# ---------------------------------------------------------------------------------------------- edge-alast fleet local
@dataclass
class LocalPlan:
    """What ``fleet local`` will run: the files it wrote and the settings they hold."""

    out: Path
    app_dir: Path
    run_config: Path
    settings: FleetSettings
    nodes: list[NodeSettings]
    partition: dict
    threads: int | None
    notes: list[str] = field(default_factory=list)
    keys: Path | None = None  # TLS and node authentication with the keys in this folder; None: plain loopback


def prepare_local(*, out: str, data: str, val_data: str, nodes: int, rounds: int, train: dict[str, Any],
                  partition: str = "iid", node_profiles: list[str] | None = None, device: str | None = None,
                  fleet: dict[str, Any] | None = None, threads: int | None = None, tls: bool = False,
                  keys: str | os.PathLike | None = None, faults: dict[str, str] | None = None) -> LocalPlan:
    """Validate, split ``data`` among ``nodes`` and write the App, run config and node configs (nothing starts).

    Args:
        train: TrainConfig keys shared by every node (method, model, weights, steps per round, lr, ...).
        node_profiles: Device profile per node, cycled (None: ``train["profile"]`` on every node).
        device: Device of every node; default: the profile's, except that a CUDA profile runs on the CPU when this
            host has no CUDA device (its ceilings then apply to the CPU, as ``--device cpu`` does).
        fleet: Run-config keys (strategy, fraction-train, min-available-nodes, round-timeout, ...).
        threads: Torch threads per node; default: this host's CPUs shared among the nodes.
        tls: TLS and node authentication, with the keys in ``keys`` (default ``OUT/keys``; what is missing is
            written, :func:`edge_alast.fleet.keys.write_keys`).
        faults: Node name (``node1``) -> a :class:`~edge_alast.fleet.settings.Fault` spec that node applies to
            its replies (testing the server's checks).
    """
    from ..device.profiles import ProfileError, load_profile
    from .partition import write_partitions

    out_dir = Path(out).resolve()
    train = {k: v for k, v in train.items() if v is not None}
    profile = train.pop("profile", None)
    train.pop("device", None)
    profiles = list(node_profiles or []) or [profile]
    if not train.get("weights"):
        raise ConfigError("--weights: a fleet needs a base weights file (only what trains travels; every node and "
                          "the server build the frozen rest from it)")
    steps = train.pop("steps", None)
    run_config = {"num-rounds": rounds, "out": str(out_dir), "val-data": str(Path(val_data).resolve()),
                  "method": train.pop("method", None), "model": train.pop("model", None),
                  "weights": str(Path(train.pop("weights")).resolve()), "img-size": train.pop("img_size", None),
                  "batch-size": train.pop("batch_size", None), "lr": train.pop("lr", None),
                  "steps-per-round": steps, "seed": train.pop("seed", None),
                  "eval-images": train.pop("eval_images", None), **(fleet or {})}
    run_config = {k: v for k, v in run_config.items() if v is not None}
    if train.get("data") or train.get("out") or train.get("val_data"):
        train = {k: v for k, v in train.items() if k not in ("data", "out", "val_data")}
    seed = int(run_config.get("seed", 0))

    # ---- the classes of the whole folder, in label order: every node maps labels the same way
    from ..data.images import scan_image_folder

    classes = scan_image_folder(data, option="--data").classes
    run_config["classes"] = ",".join(classes)
    run_config["train-config"] = json.dumps(train)
    settings = FleetSettings.from_run_config(run_config)  # validates before anything is written or started

    faults = dict(faults or {})
    unknown = sorted(set(faults) - {f"node{i}" for i in range(nodes)})
    if unknown:
        raise ConfigError(f"--fault: no node {', '.join(unknown)} in a fleet of {nodes} (node0 ... node{nodes - 1})")
    for name, spec in faults.items():
        Fault.parse(spec, f"--fault {name}")
    notes = []
    cuda = None
    node_settings = []
    for i in range(nodes):
        name = profiles[i % len(profiles)]
        node_device = device
        if name and node_device is None:
            try:
                prof = load_profile(name)
            except ProfileError as e:
                raise ConfigError(f"--profile: {e}") from e
            if prof.device == "cuda":
                if cuda is None:
                    import torch
                    cuda = torch.cuda.is_available()
                if not cuda:
                    node_device = "cpu"
                    notes.append(f"node{i}: {prof.name} runs on CUDA and this host has none: its ceilings apply "
                                 "to the CPU (device cpu)")
        node_settings.append(NodeSettings(data=str(out_dir / "nodes" / f"node{i}" / "data"),
                                          out=str(out_dir / "nodes" / f"node{i}"), name=f"node{i}",
                                          profile=name or None, device=node_device,
                                          fault=faults.get(f"node{i}")))
    min_size = int(settings.train.get("batch_size") or 1)
    record = write_partitions(data, out_dir / "nodes", nodes, partition, seed=seed, min_size=min_size)
    app_dir = out_dir / "app"
    write_app(app_dir)
    run_config_path = write_toml(out_dir / "run-config.toml", run_config)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nodes)
    keys_dir = None
    if tls or keys:
        from .keys import write_keys

        keys_dir = Path(keys).resolve() if keys else out_dir / "keys"
        write_keys(keys_dir, [n.name for n in node_settings])
    return LocalPlan(out=out_dir, app_dir=app_dir, run_config=run_config_path, settings=settings,
                     nodes=node_settings, partition=record, threads=threads, notes=notes, keys=keys_dir)


def run_local(plan: LocalPlan, on_event: Callable[[dict], None] | None = None, timeout: float | None = None,
              poll: float = 3.0) -> dict:
    """Start the fleet of ``plan``, run the federation, stop every process; returns the summary (also written to
    ``OUT/summary.json``, with a ``local`` section: partition, ports, wall time)."""
    emit = on_event or (lambda event: None)
    from .server import ERROR_FILE, ROUNDS_FILE

    t0 = time.monotonic()
    summary_path = plan.out / "summary.json"
    summary_path.unlink(missing_ok=True)  # a summary from an earlier run must not pass for this one's
    seen_rounds = [0]

    def report_rounds() -> None:
        try:
            lines = (plan.out / ROUNDS_FILE).read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines[seen_rounds[0]:]:
            try:
                entry = json.loads(line)
            except ValueError:
                return
            seen_rounds[0] += 1
            emit({"event": "round", **{k: entry.get(k) for k in (
                "round", "val_accuracy", "val_loss", "ok", "sent", "bytes_up", "bytes_down", "round_seconds",
                "no_update")},
                "failed": [f["node_id"] for f in entry.get("failed", [])], "missing": entry.get("missing", []),
                "rejected": [{"node": f.get("name") or f["node_id"], "reason": f["reason"]}
                             for f in entry.get("failed", []) if f.get("rejected")]})

    keys = load_keys(plan.keys) if plan.keys else None
    with LocalFleet(plan.out, plan.nodes, threads=plan.threads, keys=keys) as fleet:
        emit({"event": "fleet", "superlink": f"127.0.0.1:{fleet.link_port}", "nodes": len(plan.nodes),
              "node_ports": fleet.node_ports, "out": str(plan.out), "notes": plan.notes,
              "tls": keys is not None, "node_auth": keys is not None,
              "faults": {n.name: n.fault for n in plan.nodes if n.fault}})
        fleet.start()
        t_run = time.monotonic()
        run_id = fleet.submit(plan.app_dir, plan.run_config)
        emit({"event": "run", "run_id": run_id})
        status = fleet.wait_run(run_id, timeout=timeout, poll=poll, on_poll=report_rounds)
        report_rounds()
        run_seconds = time.monotonic() - t_run
        fleet.save_run_log(run_id)
    error = plan.out / ERROR_FILE
    if status.get("status") != "finished:completed" or not summary_path.exists():
        if error.exists():
            info = json.loads(error.read_text())
            usage = info.get("exit_code") == ConfigError.exit_code
            raise ConfigError(info["message"]) if usage else FleetError(info["message"])
        raise FleetError(f"run {run_id} ended {status.get('status')!r} (see {plan.out}/logs/run-{run_id}.log)")
    summary = json.loads(summary_path.read_text())
    summary["local"] = {"nodes": len(plan.nodes), "partition": plan.partition, "run_id": run_id,
                        "tls": keys is not None, "node_auth": keys is not None,
                        "registered_nodes": fleet.registered,
                        "faults": {n.name: n.fault for n in plan.nodes if n.fault},
                        "threads_per_node": plan.threads, "notes": plan.notes,
                        "node_profiles": [n.profile for n in plan.nodes], "node_devices": [n.device for n in plan.nodes],
                        "run_seconds": run_seconds, "wall_seconds": time.monotonic() - t0,
                        "network_traffic": status.get("network-traffic")}
    atomic_write_json(summary_path, summary)
    emit({"event": "done", "val_accuracy": summary.get("val_accuracy"), "rounds": summary.get("rounds_completed"),
          "wall_seconds": summary["local"]["wall_seconds"], "out": str(plan.out)})
    return summary
