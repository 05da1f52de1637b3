"""What a fleet is configured with: the server's run config, each node's node config, and the training config of
one node's round built from both. Torch-free and flwr-free (the CLI validates with it before starting anything).

Flower hands the ServerApp a flat *run config* (``[tool.flwr.app.config]`` of the Flower App's pyproject.toml,
overridden by ``flwr run ... --run-config``) and each ClientApp its SuperNode's *node config*
(``flower-supernode --node-config``); both are flat mappings of TOML scalars. :data:`RUN_CONFIG` is the one list
of run-config keys and their defaults (the App's pyproject.toml is written from it, :func:`write_app`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import TrainConfig, parse_number
from ..errors import ConfigError
from ..methods import METHODS

# Flower's strategies (flwr.serverapp.strategy) by their lower-case names: weighted FedAvg and its server-side
# variants, then the robust aggregators (coordinate-wise median, trimmed mean, Krum/Multi-Krum, Bulyan).
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
DP_MODES = ("none", "server", "client")  # Flower's fixed-clipping DP wrappers: clipping on the server or the nodes
_TRAIN = {f.name: f for f in dataclasses.fields(TrainConfig)}

# key -> (default, help). Keys with a TrainConfig twin take its default; "" / 0 mean "not set" where noted.
RUN_CONFIG: dict[str, tuple[Any, str]] = {
    "num-rounds": (3, "rounds of the federation (a resumed server runs the rounds still missing)"),
    "out": ("", "server folder (absolute path): checkpoints/, summary.json, model.safetensors, model.onnx"),
    "val-data": ("", "held-out ImageFolder the server evaluates the global model on after every round"),
    "eval-images": (0, "most images of val-data each round's evaluation reads, spread over every class; 0: all"),
    "classes": ("", "class names in label order, comma-separated; default: the class folders of val-data"),
    "method": (_TRAIN["method"].default, "fine-tuning method (light-peft methods cannot be averaged: refused)"),
    "model": (_TRAIN["model"].default, "timm model name"),
    "weights": ("", "base weights file; every node needs the same file (node config `weights` for its path)"),
    "img-size": (_TRAIN["img_size"].default, "input side in pixels"),
    "batch-size": (0, "batch size on every node; 0: each node's profile default (16 without a profile)"),
    "lr": (0.0, "learning rate of each node's optimizer (a fresh optimizer every round); 0: the method's default "
                "(3e-5 for full and alast, 1e-3 for head and the LoRA methods)"),
    "steps-per-round": (10, "training steps each node runs per round (node config `steps` overrides)"),
    "seed": (_TRAIN["seed"].default, "seed; a node's round r trains with seed + r (a new data order each round)"),
    "train-config": ("{}", "JSON object of any other TrainConfig keys (lora, alast, precision, augment, ...)"),
    "strategy": ("fedavg", "fedavg (weighted by examples), fedprox or fedadam"),
    "proximal-mu": (0.01, "fedprox: weight mu of the proximal term mu/2 |w - w_global|^2 on the nodes"),
    "server-lr": (0.01, "fedadam: server learning rate (eta)"),
    "server-tau": (0.001, "fedadam: adaptivity tau"),
    "fraction-train": (1.0, "share of the connected nodes sampled each round"),
    "min-train-nodes": (1, "fewest nodes sampled each round"),
    "min-available-nodes": (1, "a round waits (without limit) until this many nodes are connected; keep it at or "
                               "below the nodes that may survive a fault"),
    "round-timeout": (3600.0, "seconds a round waits for replies; a node that has not replied by then is left out"),
    "export": (True, "write model.onnx + manifest.json after the last round"),
    # ---- what the server accepts from a node (edge_alast.fleet.validate)
    "max-update-norm": (1000.0, "a reply whose update (its tensors minus the global ones) has a larger L2 norm is "
                                "left out of the round; 0: no bound"),
    "clip-norm": (0.0, "clip every update to this L2 norm before aggregating (also the DP clipping norm); 0: off"),
    "max-examples": (0, "most training images one reply may weigh in FedAvg; 0: steps-per-round x batch-size (the "
                        "largest shipped profile's batch when batch-size is 0)"),
    "trim-beta": (0.2, "fedtrimmedavg: share of the highest and of the lowest values cut per coordinate"),
    "malicious-nodes": (1, "krum, multikrum, bulyan: nodes assumed malicious (bulyan needs 4f+3 replies)"),
    "krum-select": (0, "multikrum: replies averaged; 0: the replies minus malicious-nodes"),
    "dp": ("none", "differential privacy with fixed clipping (Flower's wrappers): none, server (the server clips) "
                   "or client (each node clips with Flower's fixedclipping_mod); needs clip-norm"),
    "dp-noise": (1.0, "dp: noise multiplier; Gaussian noise of std dp-noise x clip-norm / sampled nodes is added "
                      "to the aggregate"),
}

# Set by the fleet for every round, never by a run config: what a node's round is, not how the model trains.
_ROUND_OWNED = ("data", "out", "val_data", "val_fraction", "profile", "device", "resume", "export",
                "checkpoint_every_seconds", "checkpoint_every_steps", "eval_every")
# A node's round validates nothing (the server validates the global model): with --val-data unset, train() holds out
# round(n * val_fraction) images per class, which this makes 0 (below any class size), so every image trains.
NO_LOCAL_VALIDATION = 1e-9


def check_fleet_method(method: str, option: str = "method") -> None:
    """Refuse a method whose nodes' tensors cannot be averaged (Light-PEFT prunes each node differently)."""
    spec = METHODS.get(method)
    if spec is None:
        raise ConfigError(f"{option}: unknown method {method!r} (known: {', '.join(METHODS)})")
    if spec.light_peft:
        raise ConfigError(f"{option}: {method} cannot run in a fleet: Light-PEFT prunes heads, FFN units, adapters "
                          "and ranks by each node's own importance estimates, so the nodes' models end up with "
                          "different shapes and cannot be averaged; use lora or alast-lora")


def same_payload(a: str, b: str) -> bool:
    """Whether methods ``a`` and ``b`` train (and so send) the same tensors: they differ at most in ALaST."""
    def shape(name):
        return dataclasses.replace(METHODS[name], name="", alast=False, summary="")
    return shape(a) == shape(b)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def parse_bool(value: Any, name: str) -> bool:
    """A TOML/JSON boolean, or the strings true/false (Flower's ``--run-config 'export="false"'`` passes a
    string); anything else is a :class:`ConfigError` naming ``name``. ``bool("false")`` would be True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{name}: must be true or false, got {value!r}")


def parse_int(value: Any, name: str) -> int:
    """An integer (or an integral finite number or numeric string); ConfigError naming ``name`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = parse_number(value)
    if number is None or not number.is_integer():
        raise ConfigError(f"{name}: must be an integer, got {value!r}")
    return int(number)


def parse_float(value: Any, name: str) -> float:
    """A finite number (or numeric string); NaN and infinities are a ConfigError naming ``name``."""
    number = parse_number(value)
    if number is None:
        raise ConfigError(f"{name}: must be a finite number, got {value!r}")
    return number


def _parse_run_value(key: str, value: Any, default: Any) -> Any:
    """A run-config value parsed by its default's type (bool, int, float or text)."""
    name = f"run config {key}"
    if isinstance(default, bool):
        return parse_bool(value, name)
    if isinstance(default, int):
        return parse_int(value, name)
    if isinstance(default, float):
        return parse_float(value, name)
    return _text(value)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


@dataclass(frozen=True)
class FleetSettings:
    """The server's run config, validated (see :data:`RUN_CONFIG`)."""

    num_rounds: int
    out: str
    val_data: str
    classes: tuple[str, ...]
    strategy: str
    proximal_mu: float
    server_lr: float
    server_tau: float
    fraction_train: float
    min_train_nodes: int
    min_available_nodes: int
    round_timeout: float
    export: bool
    train: dict  # TrainConfig keys shared by the server and every node (data/out/... are set per use)
    max_update_norm: float = 1000.0
    clip_norm: float = 0.0
    max_examples: int = 0
    trim_beta: float = 0.2
    malicious_nodes: int = 1
    krum_select: int = 0
    dp: str = "none"
    dp_noise: float = 1.0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FleetSettings":
        unknown = sorted(set(run_config) - set(RUN_CONFIG))
        if unknown:
            raise ConfigError(f"run config: unknown keys {', '.join(unknown)} (known: {', '.join(RUN_CONFIG)})")
        get = {k: _parse_run_value(k, run_config.get(k, default), default) for k, (default, _) in RUN_CONFIG.items()}
        try:  # JSON's NaN/Infinity are refused like TOML's nan/inf
            extra = json.loads(get["train-config"] or "{}", parse_constant=_refuse_constant)
        except ValueError as e:
            raise ConfigError(f"run config train-config: not a JSON object: {e}") from e
        if not isinstance(extra, dict):
            raise ConfigError("run config train-config: must be a JSON object of TrainConfig keys")
        owned = sorted(k for k in extra if k in _ROUND_OWNED)
        if owned:
            raise ConfigError(f"run config train-config: {', '.join(owned)} are set by the fleet for each round "
                              "(node config: data, out, profile, device; run config: val-data, out, export)")
        train = dict(extra)
        for key, field in (("method", "method"), ("model", "model"), ("img-size", "img_size"),
                           ("steps-per-round", "steps"), ("seed", "seed")):
            train[field] = get[key]
        train["lr"] = float(get["lr"]) or extra.get("lr")  # None: TrainConfig takes the method's default
        if extra.get("epochs") is not None:  # epochs per round instead of steps
            train["steps"] = None
        train["weights"] = _text(get["weights"]) or extra.get("weights")
        train["batch_size"] = get["batch-size"] or extra.get("batch_size")
        train["eval_images"] = get["eval-images"] or extra.get("eval_images")
        classes = tuple(c.strip() for c in _text(get["classes"]).split(",") if c.strip())
        train["classes"] = list(classes) or extra.get("classes")
        settings = cls(num_rounds=get["num-rounds"], out=get["out"], val_data=get["val-data"],
                       classes=tuple(train["classes"] or ()), strategy=get["strategy"].lower(),
                       proximal_mu=get["proximal-mu"], server_lr=get["server-lr"], server_tau=get["server-tau"],
                       fraction_train=get["fraction-train"], min_train_nodes=get["min-train-nodes"],
                       min_available_nodes=get["min-available-nodes"], round_timeout=get["round-timeout"],
                       export=get["export"], train=train, max_update_norm=get["max-update-norm"],
                       clip_norm=get["clip-norm"], max_examples=get["max-examples"], trim_beta=get["trim-beta"],
                       malicious_nodes=get["malicious-nodes"], krum_select=get["krum-select"],
                       dp=get["dp"].lower(), dp_noise=get["dp-noise"])
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad run-config key."""
        if self.num_rounds < 1:
            raise ConfigError(f"run config num-rounds: must be >= 1, got {self.num_rounds}")
        if not self.out or not os.path.isabs(self.out):
            raise ConfigError(f"run config out: an absolute folder path is required, got {self.out!r}")
        if not self.val_data:
            raise ConfigError("run config val-data: the held-out ImageFolder the server evaluates on is required")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"run config strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"run config fraction-train: must be in (0, 1], got {self.fraction_train}")
        if self.min_train_nodes < 1 or self.min_available_nodes < 1:
            raise ConfigError("run config min-train-nodes / min-available-nodes: must be >= 1")
        if self.round_timeout <= 0:
            raise ConfigError(f"run config round-timeout: must be > 0, got {self.round_timeout}")
        if self.proximal_mu < 0 or self.server_lr <= 0 or self.server_tau <= 0:
            raise ConfigError("run config proximal-mu must be >= 0, server-lr and server-tau > 0")
        for key, value in (("max-update-norm", self.max_update_norm), ("clip-norm", self.clip_norm),
                           ("max-examples", self.max_examples), ("malicious-nodes", self.malicious_nodes),
                           ("krum-select", self.krum_select), ("dp-noise", self.dp_noise)):
            if value < 0:
                raise ConfigError(f"run config {key}: must be >= 0, got {value}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"run config trim-beta: must be in [0, 0.5), got {self.trim_beta}")
        if self.dp not in DP_MODES:
            raise ConfigError(f"run config dp: must be one of {', '.join(DP_MODES)}, got {self.dp!r}")
        if self.dp != "none" and not self.clip_norm:
            raise ConfigError("run config clip-norm: dp needs a clipping norm > 0 (the noise is calibrated to it)")
        if self.dp != "none" and self.strategy not in ("fedavg", "fedprox"):
            raise ConfigError(f"run config dp: Flower's DP wrappers calibrate the noise to an average of clipped "
                              f"updates; use strategy fedavg or fedprox, not {self.strategy}")
        if not self.train.get("weights"):
            raise ConfigError("run config weights: a fleet needs a base weights file: only what trains travels, "
                              "so every node and the server must build the frozen rest from the same file")
        check_fleet_method(self.train["method"], "run config method")
        try:  # the CLI's checks (finite numbers, ranges, every section), named as a run config's
            self.train_config(data=self.val_data, out=self.out).validate()
        except ConfigError as e:
            message = str(e)
            raise ConfigError(message if message.startswith("run config") else f"run config: {message}") from e

    def train_config(self, **fields) -> TrainConfig:
        """The shared TrainConfig with ``fields`` (data, out, ...) set."""
        return TrainConfig.from_dict({**self.train, **fields}, source="run config train-config")

    def example_cap(self) -> int | None:
        """Most training images one reply may weigh (run config ``max-examples``; by default what a node can see
        in a round: steps-per-round x batch size). None: no cap (epochs per round and no ``max-examples``)."""
        if self.max_examples:
            return self.max_examples
        steps = self.train.get("steps")
        if not steps:
            return None
        batch = self.train.get("batch_size") or largest_profile_batch()
        return int(steps) * int(batch)


def largest_profile_batch() -> int:
    """The largest ``default_batch_size`` of the shipped device profiles (a node with batch-size 0 runs its
    profile's; a node without one the host's automatic profile's, 16 or 32, below the shipped boards' largest)."""
    from ..device.profiles import list_profiles, load_profile

    return max(load_profile(name).default_batch_size for name in list_profiles())


@dataclass(frozen=True)
class Fault:
    """A corruption a node applies to its own replies (node config ``fault``; ``fleet local --fault``), to test the
    server's defences: ``nan`` / ``inf`` (one value of the update), ``scale:X`` (the update times X: a model-
    poisoning node), ``examples:N`` (claims N training images). ``@R,S`` limits it to rounds R and S.
    Never set it on a real node."""

    kind: str
    value: float = 0.0
    rounds: tuple[int, ...] = ()

    KINDS = ("nan", "inf", "scale", "examples")

    @classmethod
    def parse(cls, spec: str, name: str = "node config fault") -> "Fault":
        text, _, rounds_text = spec.strip().partition("@")
        kind, _, value_text = text.partition(":")
        kind = kind.strip().lower()
        if kind not in cls.KINDS:
            raise ConfigError(f"{name}: {spec!r}: kind must be one of {', '.join(cls.KINDS)} (e.g. nan@2, "
                              "scale:-10, examples:1e12@1)")
        value = 0.0
        if kind in ("scale", "examples"):
            value = parse_float(value_text, f"{name} {kind} value")
        elif value_text:
            raise ConfigError(f"{name}: {spec!r}: {kind} takes no value")
        rounds = tuple(parse_int(r, f"{name} round") for r in rounds_text.split(",") if r.strip())
        if any(r < 1 for r in rounds):
            raise ConfigError(f"{name}: {spec!r}: rounds count from 1")
        return cls(kind, value, rounds)

    def applies(self, server_round: int) -> bool:
        return not self.rounds or server_round in self.rounds

    def __str__(self) -> str:
        value = f":{self.value:g}" if self.kind in ("scale", "examples") else ""
        return f"{self.kind}{value}" + (f"@{','.join(map(str, self.rounds))}" if self.rounds else "")


@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's node config (``flower-supernode --node-config "data='...' out='...'"`` or a TOML file).

    Attributes:
        data: The node's own ImageFolder (may lack some classes).
        out: The node's folder: ``policy.pt`` (its ALaST budgets, carried from round to round) and one run folder
            per round (``round-0003/``: metrics.jsonl, summary.json, config.json).
        name: How the server's summary names the node (default: its Flower node id).
        profile, device: Its device profile and device (``device = "cpu"`` applies a Jetson profile's ceilings to
            a CPU).
        method: Its own method, training the same tensors as the fleet's (``alast-lora`` on a node of a ``lora``
            fleet: ALaST budgets only where compute is short).
        steps: Steps per round on this node (default: the run's ``steps-per-round``).
        weights: Its copy of the base weights (default: the run config's path).
        fault: Test only: a :class:`Fault` spec this node applies to its replies.
    """

    data: str
    out: str
    name: str = ""
    profile: str | None = None
    device: str | None = None
    method: str | None = None
    steps: int | None = None
    weights: str | None = None
    fault: str | None = None

    KEYS = ("data", "out", "name", "profile", "device", "method", "steps", "weights", "fault")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodeSettings":
        unknown = sorted(set(node_config) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"node config: unknown keys {', '.join(unknown)} (known: {', '.join(cls.KEYS)})")
        missing = [k for k in ("data", "out") if not _text(node_config.get(k))]
        if missing:
            raise ConfigError(f"node config: {' and '.join(missing)} required (flower-supernode --node-config "
                              "\"data='/path/images' out='/path/node'\")")
        steps = node_config.get("steps")
        settings = cls(data=_text(node_config["data"]), out=_text(node_config["out"]),
                       name=_text(node_config.get("name")), profile=_text(node_config.get("profile")) or None,
                       device=_text(node_config.get("device")) or None,
                       method=_text(node_config.get("method")) or None,
                       steps=parse_int(steps, "node config steps") if steps not in (None, "", 0) else None,
                       weights=_text(node_config.get("weights")) or None,
                       fault=_text(node_config.get("fault")) or None)
        if settings.method:
            check_fleet_method(settings.method, "node config method")
        if settings.steps is not None and settings.steps < 1:
            raise ConfigError(f"node config steps: must be >= 1, got {settings.steps}")
        if settings.fault:
            Fault.parse(settings.fault)
        return settings

    def to_node_config(self) -> dict[str, Any]:
        return {k: v for k in self.KEYS if (v := getattr(self, k)) not in (None, "")}

    def round_config(self, train: Mapping[str, Any], server_round: int) -> TrainConfig:
        """The TrainConfig of this node's round ``server_round`` of a fleet training ``train`` (the server's shared
        TrainConfig keys)."""
        train = dict(train)
        method = self.method or train["method"]
        if not same_payload(method, train["method"]):
            raise ConfigError(f"node config method: {method} trains other tensors than the fleet's "
                              f"{train['method']}; a node may only add or drop ALaST (lora <-> alast-lora)")
        if self.steps:
            train.update(steps=self.steps, epochs=None)
        train.update(data=self.data, out=str(Path(self.out) / f"round-{server_round:04d}"), val_data=None,
                     val_fraction=NO_LOCAL_VALIDATION, profile=self.profile, device=self.device, method=method,
                     weights=self.weights or train.get("weights"), seed=int(train.get("seed", 0)) + server_round,
                     resume=False, export=False, checkpoint_every_seconds=None, checkpoint_every_steps=None,
                     eval_every=None)
        return TrainConfig.from_dict(train, source="node round")


def write_app(folder: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write the Flower App (a pyproject.toml naming the installed ServerApp and ClientApp, with the run config's
    defaults) to ``folder``; ``flwr run FOLDER CONNECTION`` submits it. ``overrides`` replace defaults."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# edge-alast fleet: a Flower App whose ServerApp and ClientApp are the installed edge_alast.fleet modules",
        "# (pip install 'edge-alast[fleet]' on the server and on every node). Submit: flwr run . CONNECTION",
        "# --run-config 'num-rounds=5 out=\"/srv/fleet/run\"' (or --run-config run.toml). Written by edge-alast.",
        "[build-system]", 'requires = ["setuptools>=64"]', 'build-backend = "setuptools.build_meta"', "",
        "[project]", 'name = "edge-alast-fleet"', 'version = "0.1.0"',
        'description = "Federated fine-tuning of timm ViTs with edge-alast on Flower"', 'license = "Apache-2.0"',
        "dependencies = []  # edge-alast[fleet] is installed on every machine; nothing is installed at run time", "",
        "[tool.flwr.app]", 'publisher = "edge-alast"', "",
        "[tool.flwr.app.components]", 'serverapp = "edge_alast.fleet.server_app:app"',
        'clientapp = "edge_alast.fleet.client_app:app"', "",
        "[tool.flwr.app.config]",
    ]
    values = {k: default for k, (default, _) in RUN_CONFIG.items()}
    values.update(overrides or {})
    for key, (_, help_text) in RUN_CONFIG.items():
        lines.append(f"# {help_text}")
        lines.append(f"{key} = {toml_value(values[key])}")
    path = folder / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def toml_value(value: Any) -> str:
    """A TOML scalar (bool, int, float, or a basic string with escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """A flat TOML file of ``values`` (a run config or node config file)."""
    path = Path(path)
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path
