"""Field updates: fine-tune the deployed model on new images and publish the result only if it is better.

:func:`update` runs one update of a model store (:mod:`.store`) in stages; each stage's result is recorded in
``STORE/work/update.json``, so an update killed at any instant resumes where it was when run again with the same
store, data and options (anything else starts over):

1. **prepare** -- scan NEW_DIR; hold out a seeded share of each class's images (never trained on); map the head by
   class name (:func:`edge_alast.model.build.map_head`: rows of known classes kept whatever the order, new classes
   appended and initialised from the mean normalised features of their training images, or zeros; a class the
   model knows and NEW_DIR lacks is kept); assemble the training ImageFolder in ``work/train`` as symlinks: the new
   images plus the current version's replay sample (:mod:`.replay`).
2. **train** -- :func:`edge_alast.train` from the mapped weights (its checkpoints resume it); it exports the
   candidate to ONNX and checks parity against PyTorch in onnxruntime.
3. **evaluate, decide** -- current and candidate are evaluated in onnxruntime (the files that are, or would be,
   deployed) on the same holdout: the current version's plus the images held out now; overall, per class, on the
   classes current knew and on the new ones. :func:`gate` decides.
4. **publish or keep** -- published: the new holdout and replay images are copied in, the version is written,
   ``current`` switched, the history appended, old versions pruned. Kept: the refusal and its figures go to the
   history; the store is unchanged.

:func:`init_store` creates a store from a run folder or a weights file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_json, sha256_file
from ..config import DEVICES, PRECISIONS, option
from ..errors import EXIT_INTERRUPTED, EXIT_KEPT, EXIT_OK, ConfigError, DataError, NonFiniteError
from ..integrity import read_device_key
from ..methods import METHODS
from . import replay
from .store import (HOLDOUT, MANIFEST_FILE, MODEL_FILE, ONNX_FILE, REPLAY, STATE_FILE, WORK, Store, Version,
                    copy_file, create_store)

MARKER = "update.json"
NEW_CLASS_INITS = ("mean", "zeros")
# Light-PEFT prunes heads and FFN units: its model no longer loads into the store's architecture.
UPDATE_METHODS = tuple(name for name, spec in METHODS.items() if not spec.light_peft)
IMPRINT_IMAGES = 64  # training images per new class whose features initialise its head row
VAL_IMAGES = 32  # holdout images train() evaluates on and the export checks parity with


@dataclass
class UpdateConfig:
    """Options of ``edge-alast update`` (each field with a ``flag`` is one; the CLI is built from them)."""

    method: str = option("alast", flag="--method", choices=UPDATE_METHODS,
                         help="Fine-tuning method of the candidate (Light-PEFT is not offered: its pruned model does "
                              "not load into the store's architecture).")
    steps: int = option(100, flag="--steps", help="Training steps of the candidate (the most it takes).")
    max_tflops: float | None = option(None, flag="--max-tflops",
                                      help="A compute budget for the candidate: its training ends as a finished run "
                                           "after the step that spends this many TFLOPs, as train's --max-tflops "
                                           "(default: none, --steps only). No plateau rule: update's only "
                                           "validation images are the gate's holdout, and stopping on them would "
                                           "pick the candidate on the images that judge it.")
    lr: float | None = option(None, flag="--lr", help="Learning rate in (0, 1]; default: the method's, as for train "
                                                      "(3e-5 for full/alast, 1e-3 for head and the adapter methods).")
    batch_size: int | None = option(None, flag="--batch-size", help="Batch size; default: the profile's (16 "
                                                                    "without one).")
    profile: str | None = option(None, flag="--profile", help="Device profile: shipped name, 'auto', or a YAML path.")
    device: str | None = option(None, flag="--device", choices=DEVICES, help="Override the profile's device.")
    precision: str | None = option(None, flag="--precision", choices=PRECISIONS,
                                   help="Autocast precision; default: the profile's (fp32 without one).")
    seed: int = option(0, flag="--seed", help="Seeds the holdout split, the replay draws and training.")
    holdout_fraction: float = option(0.2, flag="--holdout-fraction",
                                     help="Share of each class's new images held out for the gate (never trained "
                                          "on); a class with one image has none held out.")
    new_class_init: str = option("mean", flag="--new-class-init", choices=NEW_CLASS_INITS,
                                 help="Head rows of new classes: mean (the mean normalised feature of their training "
                                      "images, scaled to the known rows' mean norm; bias the known biases' mean) or "
                                      "zeros.")
    replay_max_images: int = option(1000, flag="--replay-max-images",
                                    help="Replay sample cap in images, shared evenly by the classes (0: no replay).")
    replay_max_bytes: int = option(256 * 2**20, flag="--replay-max-bytes",
                                   help="Replay sample cap in bytes (e.g. 256MiB), shared evenly by the classes.")
    tolerance: float = option(0.0, flag="--tolerance",
                              help="Gate: the candidate's holdout accuracy may be at most this much below current's.")
    max_old_drop: float = option(0.02, flag="--max-old-drop",
                                 help="Gate: the most the accuracy on the classes current knew may drop.")
    keep: int = option(5, flag="--keep", help="Versions to keep (never deleting current or its parent).")
    max_bad_fraction: float = option(0.5, flag="--max-bad-fraction",
                                     help="Fail (exit 3) when more than this share of NEW_DIR's files is unreadable.")
    eval_batch_size: int = option(32, flag="--eval-batch-size", help="Images per onnxruntime batch in the gate's "
                                                                      "evaluation.")
    checkpoint_every_seconds: float | None = option(300.0, flag="--checkpoint-every-seconds",
                                                    help="Training checkpoint interval in seconds.")
    checkpoint_every_steps: int | None = option(None, flag="--checkpoint-every-steps",
                                                help="Also checkpoint training every N steps.")
    device_key: str | None = option(None, flag="--device-key", envvar="EDGE_ALAST_DEVICE_KEY_FILE",
                                    help="Device key file: the store's manifests and the training checkpoints are "
                                         "signed with it (HMAC-SHA256); unsigned ones are refused (exit 2).")

    # Options that may change between an interrupted update and its resumption (the gate applies its thresholds
    # when it decides; none of these changes what is trained).
    RESUME_FREE = ("keep", "eval_batch_size", "checkpoint_every_seconds", "checkpoint_every_steps", "tolerance",
                   "max_old_drop", "device_key")

    def name(self, key: str) -> str:
        return {f.name: f.metadata for f in dataclasses.fields(self)}[key]["flag"]

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{self.name(key)}: {why}, got {getattr(self, key)!r}")

        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise bad(f.name, f"must be one of {', '.join(choices)}")
        for key in ("steps", "keep", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise bad("batch_size", "must be >= 1")
        if self.lr is not None and not 0 < self.lr <= 1:
            raise bad("lr", "must be in (0, 1]")
        if self.max_tflops is not None and not 0 < self.max_tflops < math.inf:
            raise bad("max_tflops", "must be a finite number > 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise bad("holdout_fraction", "must be in (0, 1)")
        for key in ("replay_max_images", "replay_max_bytes"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("tolerance", "max_old_drop", "max_bad_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must be in [0, 1]")

    def resume_key(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUME_FREE}


@dataclass
class UpdateResult:
    """What an update did: ``decision`` is ``published``, ``kept`` or ``interrupted``; ``record`` the history line
    (for published and kept); ``exit_code`` what the CLI exits with."""

    decision: str
    record: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return {"published": EXIT_OK, "kept": EXIT_KEPT}.get(self.decision, EXIT_INTERRUPTED)


# ---------------------------------------------------------------------------------------------- the gate (policy)
def gate(current: dict[str, Any] | None, candidate: dict[str, Any] | None, parity: dict[str, Any], *,
         tolerance: float, max_old_drop: float) -> dict[str, Any]:
    """Whether the candidate may replace current. Pure.

    Args:
        current, candidate: Holdout figures (:func:`holdout_figures`): ``accuracy`` over every holdout image,
            ``old_accuracy`` over the images of the classes current knew (None when there are none).
        parity: ``{"passed": bool, ...}`` from the candidate's ONNX export.
        tolerance: The candidate's overall accuracy may be this much below current's.
        max_old_drop: Its accuracy on current's classes may be this much below current's.

    Returns:
        ``{"publish": bool, "checks": {name: {..., "passed": bool}}, "reasons": [why not, in words]}``; a check
        that cannot be measured (no holdout images of current's classes) passes and says so.
    """
    eps = 1e-12  # accuracies are ratios of counts: equal ones compare equal, this only absorbs float noise
    checks, reasons = {"parity": dict(parity)}, []
    if parity.get("diverged"):
        reasons.append(f"no candidate: {parity.get('message')}")
    elif not parity.get("passed"):
        reasons.append(f"ONNX parity failed: {parity.get('message', 'see parity')}")
    cand = candidate or {}
    cur = current or {}
    c, k = cand.get("accuracy"), cur.get("accuracy")
    passed = c is not None and k is not None and c >= k - tolerance - eps
    checks["overall"] = {"candidate": c, "current": k, "tolerance": tolerance, "passed": passed}
    if not passed:
        reasons.append("no holdout accuracy for the candidate" if c is None else
                       f"holdout accuracy {c:.4f} is below current's {k:.4f} - tolerance {tolerance:g}")
    c_old, k_old = cand.get("old_accuracy"), cur.get("old_accuracy")
    if k_old is None:
        checks["old_classes"] = {"candidate": c_old, "current": None, "max_drop": max_old_drop, "passed": True,
                                 "note": "no holdout images of the classes current knew: not measured"}
    else:
        passed = c_old is not None and c_old >= k_old - max_old_drop - eps
        checks["old_classes"] = {"candidate": c_old, "current": k_old, "max_drop": max_old_drop, "passed": passed}
        if not passed:
            reasons.append(f"accuracy on the classes current knew fell from {k_old:.4f} to "
                           f"{c_old if c_old is not None else float('nan'):.4f} (more than {max_old_drop:g})")
    return {"publish": all(check["passed"] for check in checks.values()), "checks": checks, "reasons": reasons}


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_onnx(model_path: str | os.PathLike, samples: Sequence[tuple[str, str]], batch_size: int = 32,
                  tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Correct predictions per class of an exported model on ``samples`` ((image path, class name) pairs), in
    onnxruntime with the model's own eval transform. A prediction counts by class name, so models with other class
    lists are scored on the same images; a row of non-finite logits is wrong. Unreadable images are left out and
    named in ``skipped``.

    Returns:
        ``{"per_class": {class: {"correct": n, "images": n}}, "skipped": [path, ...]}``.
    """
    from ..data.images import load_image
    from ..deploy.onnxmeta import image_args, load_model_file, model_metadata
    from ..deploy.predict import session

    data, proto = load_model_file(model_path)  # self-contained, bounded metadata: as predict loads a model
    meta = model_metadata(proto, str(model_path))
    sess = session(data)
    del data, proto
    names, args, input_name = meta["class_names"], image_args(meta), sess.get_inputs()[0].name
    per_class = {label: {"correct": 0, "images": 0} for _, label in samples}
    skipped = []
    for start in range(0, len(samples), batch_size):
        xs, labels = [], []
        for path, label in samples[start:start + batch_size]:
            try:
                xs.append(load_image(path, **args))
            except DataError:
                skipped.append(str(path))
                continue
            labels.append(label)
        if xs:
            logits = sess.run(None, {input_name: np.stack(xs)})[0]
            for label, row in zip(labels, logits):
                per_class[label]["images"] += 1
                per_class[label]["correct"] += int(bool(np.isfinite(row).all()) and names[int(row.argmax())] == label)
        if tick:
            tick()
    return {"per_class": per_class, "skipped": skipped}


def holdout_figures(result: dict[str, Any], old_classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall, on ``old_classes``, on the others, and per class, from :func:`evaluate_onnx`'s counts."""
    per_class = result["per_class"]

    def accuracy(names) -> float | None:
        images = sum(per_class[n]["images"] for n in names)
        return sum(per_class[n]["correct"] for n in names) / images if images else None

    old = [n for n in per_class if n in set(old_classes)]
    new = [n for n in per_class if n not in set(old_classes)]
    return {"accuracy": accuracy(per_class), "old_accuracy": accuracy(old), "new_accuracy": accuracy(new),
            "images": sum(v["images"] for v in per_class.values()),
            "per_class": {n: accuracy([n]) for n in sorted(per_class)}, "skipped": result["skipped"]}


# ---------------------------------------------------------------------------------------------- head mapping
def imprint_rows(model, images: dict[str, list[str]], preprocess, state: dict, limit: int = IMPRINT_IMAGES,
                 tick: Callable[[], None] | None = None) -> dict[str, dict]:
    """Head rows for new classes from ``model``'s features (weight imprinting, Qi et al. 2018): per class, the mean
    of its images' L2-normalised pre-logits features, normalised, scaled to the mean norm of the head's rows; the
    bias is the mean of the head's biases. Classes whose images all fail to load get none (zeros)."""
    import torch
    import torch.nn.functional as F

    from ..model.names import HEAD_PREFIXES
    from ..training.run import spread

    heads = [k[:-len("weight")] for k in state if k.startswith(HEAD_PREFIXES) and k.endswith(".weight")]
    rows = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name, paths in images.items():
            feats = []
            for start in range(0, len(paths := spread(paths, limit)), 16):
                xs = []
                for path in paths[start:start + 16]:
                    try:
                        xs.append(preprocess(Path(path)))
                    except DataError:
                        continue
                if xs:
                    f = model.forward_head(model.forward_features(torch.stack(xs)), pre_logits=True)
                    feats.append(F.normalize(f.float(), dim=-1))
                if tick:
                    tick()
            if not feats:
                continue
            direction = F.normalize(torch.cat(feats).mean(0), dim=0)
            rows[name] = {}
            for prefix in heads:
                rows[name][prefix + "weight"] = direction * state[prefix + "weight"].float().norm(dim=1).mean()
                if prefix + "bias" in state:
                    rows[name][prefix + "bias"] = state[prefix + "bias"].float().mean()
    model.train(was_training)
    return rows


def _build_model(info: dict[str, Any], classes: Sequence[str], weights: str | os.PathLike):
    """The store's timm model with ``classes`` and ``weights`` loaded, and its preprocessing."""
    from ..data.loader import Preprocess
    from ..model.build import create_model, data_config, load_weights

    model = create_model(info["name"], num_classes=len(classes), img_size=int(info["img_size"]),
                         **(info.get("model_args") or {}))
    loaded = load_weights(model, weights)
    return model, Preprocess(int(info["img_size"]), **data_config(model)), loaded


def _save_safetensors(state: dict, path: Path) -> None:
    """Write ``state`` atomically; serialised in memory first, so a full disk is an ``OSError`` naming the file
    (safetensors' own writer reports it as a ``SafetensorError``)."""
    import safetensors.torch

    atomic_write_bytes(path, safetensors.torch.save({k: v.contiguous() for k, v in state.items()}))


# ---------------------------------------------------------------------------------------------- new images
def data_digest(root: Path) -> str:
    """A digest of every file under ``root`` (relative path, size, mtime): the same folder gives the same digest,
    so an interrupted update knows its data is unchanged without reading the images."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            try:
                st = path.stat()
            except OSError:
                continue
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def scan_entries(root: str | os.PathLike, option: str, classes: Sequence[str] | None = None,
                 max_bad_fraction: float = 0.5, tick: Callable[[], None] | None = None
                 ) -> tuple[dict[str, list[dict]], list[str]]:
    """The usable images of an ImageFolder as entries ``{class, path, sha256, bytes}`` per class (one per
    distinct content, sorted by sha256), and the scan's warnings."""
    from ..data.images import scan_image_folder, scan_warnings

    folder = scan_image_folder(root, classes=classes, option=option, max_bad_fraction=max_bad_fraction)
    by_class: dict[str, dict[str, dict]] = {}
    for path, index in folder.samples:
        name = folder.classes[index]
        digest = sha256_file(path)
        by_class.setdefault(name, {})[digest] = {"class": name, "path": str(Path(path).absolute()),
                                                 "sha256": digest, "bytes": Path(path).stat().st_size}
        if tick:
            tick()
    return ({name: [entries[d] for d in sorted(entries)] for name, entries in by_class.items()},
            scan_warnings(folder, option))


def split_holdout(entries: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(holdout, train) of one class's entries: a seeded share, chosen by hashing (seed, content), so the same
    image is held out in every attempt whatever else the folder holds. Two images or more: at least one on each
    side."""
    ranked = sorted(entries, key=lambda e: hashlib.sha256(f"{seed}:{e['sha256']}".encode()).hexdigest())
    n = len(ranked)
    n_hold = 0 if n < 2 else min(n - 1, max(1, round(n * fraction)))
    return ranked[:n_hold], ranked[n_hold:]


def _link_folder(root: Path, entries: list[dict]) -> None:
    """An ImageFolder at ``root`` of symlinks named by content: ``entries`` have ``class``, ``path`` (the
    target) and ``sha256``."""
    shutil.rmtree(root, ignore_errors=True)
    for entry in entries:
        (root / entry["class"]).mkdir(parents=True, exist_ok=True)
        link = root / entry["class"] / f"{entry['sha256']}{Path(entry['path']).suffix.lower()}"
        if not link.is_symlink():
            os.symlink(entry["path"], link)


# ---------------------------------------------------------------------------------------------- the update
class _Update:
    """One update of a locked store (see module docstring); :meth:`run` is the procedure, stage by stage."""

    def __init__(self, store: Store, data: Path, config: UpdateConfig, emit, should_stop, tick):
        self.store, self.data, self.config = store, data, config
        self.emit, self.should_stop, self.tick = emit, should_stop or (lambda: False), tick
        self.work = store.root / WORK
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------------ marker
    def read_marker(self) -> dict[str, Any] | None:
        try:
            marker = json.loads((self.work / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) and "key" in marker else None

    def save(self, marker: dict[str, Any]) -> None:
        atomic_write_json(self.work / MARKER, marker)

    def stage(self, name: str, message: str) -> None:
        self.emit({"event": "stage", "stage": name, "message": message})

    def interrupted(self, marker: dict[str, Any]) -> UpdateResult:
        event = {"event": "interrupted", "stage": marker["stage"], "resumable": True}
        self.emit(event)
        return UpdateResult("interrupted", event)

    # ------------------------------------------------------------------------ procedure
    def run(self) -> UpdateResult:
        store = self.store
        current = store.version()
        marker = self.read_marker()
        if (marker and marker.get("stage") == "decided" and marker.get("version") == current.name
                and marker["key"]["data"] == str(self.data)):
            return self.finish(marker)  # published, cut short after current switched: finish the bookkeeping
        problems = store.verify(current.name)
        if problems:
            raise ConfigError(f"STORE: current version {current.name} is damaged ({'; '.join(problems[:3])}); "
                              "roll back with `edge-alast store rollback`")
        if not self.data.is_dir():
            raise DataError(f"--data: {self.data} is not a folder")
        key = {"parent": current.name, "data": str(self.data), "data_digest": data_digest(self.data),
               "options": self.config.resume_key()}
        if marker is None:
            done = self.already_applied(current, key)
            if done is not None:
                return done
        if marker is None or marker["key"] != key:
            if marker is not None:
                self.emit({"event": "warning", "message": f"{self.work}: an update of other data, options or "
                                                          "parent was left unfinished; starting over"})
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir()
            marker = {"key": key, "id": uuid.uuid4().hex, "stage": "new"}
            self.save(marker)
        else:
            self.emit({"event": "resume", "stage": marker["stage"], "id": marker["id"]})

        if marker["stage"] == "new":
            self.stage("prepare", f"scanning {self.data}; holdout split, head mapping, replay")
            marker.update(stage="prepared", plan=self.prepare(current))
            self.save(marker)
        if self.should_stop():
            return self.interrupted(marker)
        if marker["stage"] == "prepared":
            self.stage("train", f"training the candidate ({self.config.method}, {self.config.steps} steps)")
            outcome = self.train(current, marker["plan"])
            if outcome is None:
                return self.interrupted(marker)
            marker.update(stage="trained", train=outcome)
            self.save(marker)
        if self.should_stop():
            return self.interrupted(marker)
        if marker["stage"] == "trained":
            self.stage("evaluate", "evaluating current and candidate on the holdout")
            figures = self.evaluate(current, marker["plan"], marker["train"])
            decision = gate(figures["current"], figures["candidate"], marker["train"]["parity"],
                            tolerance=self.config.tolerance, max_old_drop=self.config.max_old_drop)
            marker.update(stage="decided", figures=figures, decision=decision,
                          version=store.next_name() if decision["publish"] else None)
            self.save(marker)
        return self.finish(marker)

    def already_applied(self, current: Version, key: dict[str, Any]) -> UpdateResult | None:
        """The result of this very update when the newest history line is it: same folder, same files, same
        options, and current is what it left. A kill after the work folder was removed (the update complete) must
        not start the same update again from its own result (it would train on the replay alone and could publish
        a second version of the same images)."""
        last = next((r for r in reversed(self.store.history()) if r.get("event") == "update"), None)
        if last is None or last.get("data", {}).get("dir") != key["data"] or \
                last["data"].get("digest") != key["data_digest"] or last.get("options") != key["options"]:
            return None
        left = last.get("version") if last.get("decision") == "published" else last.get("parent")
        if left != current.name:
            return None
        record = {**last, "already_applied": True, "current": current.name}
        self.emit({"event": "warning", "message": f"--data: {self.data} was already applied by update "
                                                  f"{last.get('id')} ({last.get('decision')}); nothing to do"})
        self.emit(record)
        return UpdateResult(last["decision"], record)

    # ------------------------------------------------------------------------ 1. prepare
    def prepare(self, current: Version) -> dict[str, Any]:
        config, store = self.config, self.store
        new, warnings = scan_entries(self.data, "--data", max_bad_fraction=config.max_bad_fraction, tick=self.tick)
        for message in warnings:
            self.emit({"event": "warning", "message": message})
        state = store.state(current.name)
        in_holdout = {e["sha256"] for e in state["holdout"]}
        in_replay = {i["sha256"] for i in replay.items(state["replay"])}
        holdout_new, train_new, known = [], {}, 0
        for name, entries in new.items():
            fresh = [e for e in entries if e["sha256"] not in in_holdout | in_replay]
            known += len(entries) - len(fresh)  # already held out (stays so) or in the replay sample (trains)
            hold, train = split_holdout(fresh, config.holdout_fraction, config.seed)
            holdout_new += hold
            if train:
                train_new[name] = train
        classes = current.classes + sorted(set(new) - set(current.classes))
        new_classes = classes[len(current.classes):]
        for name in new_classes:
            if not any(e["class"] == name for e in holdout_new):
                self.emit({"event": "warning", "message": f"--data: new class {name!r} has too few images for a "
                                                          "holdout share (2 or more needed): not measured by the gate"})
        # The replay sample after this update: the current one offered this update's training images (a seeded
        # draw, so an attempt that starts over draws the same). Its images from earlier updates train now.
        sample = replay.offer(state["replay"], train_new, max_images=config.replay_max_images,
                              max_bytes=config.replay_max_bytes, seed=[config.seed, len(store.version_names())])
        replayed = [i for i in replay.items(sample) if "file" in i]
        n_train = sum(len(v) for v in train_new.values())
        if not n_train and not replayed:
            raise DataError(f"--data: nothing to train on in {self.data}: every image is already in the store's "
                            "holdout or replay sample")
        holdout = ([{"path": str(store.root / e["file"]), "class": e["class"], "sha256": e["sha256"]}
                    for e in state["holdout"]]
                   + [{k: e[k] for k in ("path", "class", "sha256")} for e in holdout_new])
        if not holdout:
            raise DataError(f"--data: no holdout: the store has no held-out images and {self.data} has no class "
                            "with 2 or more images; the gate cannot compare models")
        from ..training.run import spread

        _link_folder(self.work / "train", [e for v in train_new.values() for e in v]
                     + [{**i, "path": str(store.root / i["file"])} for i in replayed])
        _link_folder(self.work / "val", spread(holdout, VAL_IMAGES))
        init = self.start_weights(current, classes, new_classes, train_new)
        return {"classes": classes, "new_classes": new_classes, "new_class_init": init, "holdout": holdout,
                "holdout_new": holdout_new, "replay": sample, "warnings": warnings,
                "counts": {"images": sum(len(v) for v in new.values()), "train_new": n_train,
                           "holdout_new": len(holdout_new), "already_known": known, "replayed": len(replayed),
                           "holdout": len(holdout),
                           "per_class": {n: {"train": len(train_new.get(n, [])),
                                             "holdout": sum(e["class"] == n for e in holdout_new)}
                                         for n in sorted(new)}}}

    def start_weights(self, current: Version, classes: list[str], new_classes: list[str],
                      train_new: dict[str, list[dict]]) -> dict[str, list[str]]:
        """Write ``work/start.safetensors``: current's weights with the head mapped to ``classes``; returns how
        each new class's row was initialised."""
        from ..model.build import map_head, read_state_dict

        state = read_state_dict(current.path / MODEL_FILE)
        rows = {}
        if new_classes and self.config.new_class_init == "mean":
            model, preprocess, _ = _build_model(current.info["model"], current.classes, current.path / MODEL_FILE)
            images = {n: [e["path"] for e in train_new.get(n, [])] for n in new_classes}
            rows = imprint_rows(model, {n: p for n, p in images.items() if p}, preprocess, state, tick=self.tick)
            del model
        _save_safetensors(map_head(state, current.classes, classes, rows), self.work / "start.safetensors")
        return {"mean": sorted(rows), "zeros": sorted(set(new_classes) - set(rows))}

    # ------------------------------------------------------------------------ 2. train
    def train(self, current: Version, plan: dict[str, Any]) -> dict[str, Any] | None:
        """Train and export the candidate; None when stopped (train() checkpointed: running again resumes)."""
        from ..config import TrainConfig
        from ..training.trainer import train
        from ..deploy.export import ExportError

        config, info = self.config, current.info["model"]
        run_dir = self.work / "run"
        train_config = TrainConfig(
            data=str(self.work / "train"), val_data=str(self.work / "val"), out=str(run_dir),
            model=info["name"], model_args=dict(info.get("model_args") or {}), img_size=int(info["img_size"]),
            weights=str(self.work / "start.safetensors"), classes=list(plan["classes"]), method=config.method,
            steps=config.steps, max_tflops=config.max_tflops, lr=config.lr, batch_size=config.batch_size,
            profile=config.profile, device=config.device, precision=config.precision, seed=config.seed,
            max_bad_fraction=config.max_bad_fraction, checkpoint_every_seconds=config.checkpoint_every_seconds,
            checkpoint_every_steps=config.checkpoint_every_steps, export=True, device_key=config.device_key)

        def on_event(event: dict) -> None:
            self.tick()
            self.emit(event)

        try:
            result = train(train_config, on_event=on_event, should_stop=self.should_stop)
        except ExportError as e:  # the candidate cannot be deployed (parity failed: NaN weights, an exporter bug)
            return {"parity": {"passed": False, "message": str(e)},
                    "summary": _train_facts(_read_json(run_dir / "summary.json") or {})}
        except NonFiniteError as e:  # diverged: nothing was exported; the candidate is refused like one that fails
            return {"parity": {"passed": False, "diverged": True, "message": str(e)}, "summary": _train_facts({})}
        if result.summary.get("interrupted"):
            return None
        parity = json.loads((run_dir / MANIFEST_FILE).read_text())["parity"]
        passed = bool(parity["argmax_equal"] and parity["max_abs_diff"] <= parity["atol"])
        return {"parity": {"passed": passed, **parity}, "summary": _train_facts(result.summary)}

    # ------------------------------------------------------------------------ 3. evaluate
    def evaluate(self, current: Version, plan: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
        samples = [(e["path"], e["class"]) for e in plan["holdout"]]
        batch = self.config.eval_batch_size
        figures = {"current": holdout_figures(evaluate_onnx(current.path / ONNX_FILE, samples, batch, self.tick),
                                              current.classes), "candidate": None}
        candidate = self.work / "run" / ONNX_FILE
        if trained["parity"]["passed"]:
            expected = json.loads((self.work / "run" / MANIFEST_FILE).read_text())["sha256"]
            if sha256_file(candidate) != expected:
                raise ConfigError(f"{candidate}: sha256 differs from its export manifest (damaged work folder); "
                                  "run the update again")
            figures["candidate"] = holdout_figures(evaluate_onnx(candidate, samples, batch, self.tick),
                                                   current.classes)
        return figures

    # ------------------------------------------------------------------------ 4. publish or keep
    def finish(self, marker: dict[str, Any]) -> UpdateResult:
        store, plan = self.store, marker["plan"]
        publish = marker["decision"]["publish"]
        record = {"event": "update", "id": marker["id"], "decision": "published" if publish else "kept",
                  "version": marker.get("version"), "parent": marker["key"]["parent"],
                  "data": {"dir": marker["key"]["data"], "digest": marker["key"]["data_digest"], **plan["counts"]},
                  "classes": plan["classes"], "new_classes": plan["new_classes"],
                  "new_class_init": plan["new_class_init"], "figures": marker["figures"],
                  "checks": marker["decision"]["checks"], "reasons": marker["decision"]["reasons"],
                  "train": marker["train"]["summary"], "options": marker["key"]["options"]}
        if publish:
            name = marker["version"]
            if not (store.root / name).is_dir():
                self.stage("publish", f"writing {name}")
                store.write_version(name, lambda folder: self.fill_version(folder, marker))
            elif store.version(name).info.get("update_id") != marker["id"]:
                raise ConfigError(f"STORE: {name} exists and was not written by this update; remove "
                                  f"{self.work} to start over")
            if store.current_name() != name:
                store.set_current(name)
        if not any(r.get("id") == marker["id"] for r in store.history()):
            store.append_history(record)
        if publish:
            record["pruned"] = store.prune(self.config.keep)
            record["images_removed"] = store.collect_garbage()
        shutil.rmtree(self.work, ignore_errors=True)
        record["disk_bytes"] = store.disk_usage()["total"]
        record["current"] = store.current_name()
        self.emit(record)
        return UpdateResult(record["decision"], record)

    def fill_version(self, folder: Path, marker: dict[str, Any]) -> dict[str, Any]:
        store, plan, run_dir = self.store, marker["plan"], self.work / "run"
        manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
        copy_file(run_dir / MODEL_FILE, folder / MODEL_FILE)
        copy_file(run_dir / ONNX_FILE, folder / ONNX_FILE)
        if sha256_file(folder / ONNX_FILE) != manifest["sha256"]:
            raise ConfigError(f"{run_dir / ONNX_FILE}: sha256 differs from its export manifest; run the update again")
        parent_state = store.state(marker["key"]["parent"])
        holdout = parent_state["holdout"] + [store.add_image(HOLDOUT, e) for e in plan["holdout_new"]]
        sample = {name: {"seen": v["seen"], "items": [i if "file" in i else store.add_image(REPLAY, i)
                                                      for i in v["items"]]}
                  for name, v in plan["replay"].items()}
        atomic_write_json(folder / STATE_FILE, {"holdout": holdout, "replay": sample})
        return {**manifest, "store": {
            "parent": marker["key"]["parent"], "update_id": marker["id"], "classes": plan["classes"],
            "model": self.store.version(marker["key"]["parent"]).info["model"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": {"dir": marker["key"]["data"], "digest": marker["key"]["data_digest"], **plan["counts"]},
            "new_classes": plan["new_classes"], "new_class_init": plan["new_class_init"],
            "metrics": {"holdout": marker["figures"]["candidate"], "train": marker["train"]["summary"]},
            "decision": {"checks": marker["decision"]["checks"], "current": marker["figures"]["current"],
                         "options": marker["key"]["options"]},
            "replay": replay.totals(sample), "holdout": {"images": len(holdout)}}}


def _train_facts(summary: dict[str, Any]) -> dict[str, Any]:
    """What the history keeps of the candidate's training summary."""
    return {k: summary.get(k) for k in ("method", "steps", "finished_by", "val_accuracy", "final_loss",
                                        "mean_step_seconds", "peak_rss_bytes", "train_peak_rss_bytes",
                                        "train_flops_per_step", "profile", "precision", "batch_size")}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def update(store_root: str | os.PathLike, data: str | os.PathLike, config: UpdateConfig | None = None,
           on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
           tick: Callable[[], None] | None = None) -> UpdateResult:
    """Run (or resume) one update of the store at ``store_root`` with the images in ``data`` (see module
    docstring).

    Args:
        on_event: Called with each event (the trainer's, then ``stage``, ``warning`` and the final ``update``
            record, which is also the history line); library code never prints.
        should_stop: Polled after each training step and between stages; True stops with the work saved
            (``interrupted``; running again resumes).
        tick: Called at least once per training step, image hashed and evaluation batch (a systemd watchdog).

    Raises:
        ConfigError: bad options, a folder that is not a store, a damaged current version (exit 2).
        DataError: no usable images, nothing new to train on, no holdout (exit 3).
        StoreBusy: another update or rollback holds the store (exit 75).
        OSError: the disk is full or failing; ``current`` and every version are unchanged, and running again
            resumes.
    """
    config = config or UpdateConfig()
    config.validate()
    tick = tick or (lambda: None)
    emit = on_event or (lambda event: None)
    # Absolute: the training folder links to the store's replay and holdout images by their paths under its root.
    store = Store(Path(store_root).absolute(), key=read_device_key(config.device_key))
    with store.locked():
        return _Update(store, Path(data).absolute(), config, emit, should_stop, tick).run()


# ---------------------------------------------------------------------------------------------- init
def init_store(root: str | os.PathLike, *, run_dir: str | os.PathLike | None = None,
               weights: str | os.PathLike | None = None, classes: Sequence[str] | None = None,
               model: str | None = None, model_args: dict | None = None, img_size: int | None = None,
               holdout: str | os.PathLike | None = None, replay_data: str | os.PathLike | None = None,
               replay_max_images: int = 1000, replay_max_bytes: int = 256 * 2**20, seed: int = 0,
               on_event: Callable[[dict], None] | None = None,
               device_key: str | os.PathLike | None = None) -> dict[str, Any]:
    """Create the store ``root`` with version ``v0001``: a finished run's model (``run_dir``), or ``weights`` for
    ``classes`` (a head that does not fit them is left at its fresh init: the first update trains it).

    Args:
        holdout: An ImageFolder of held-out images of the model's classes (the gate's reference for them; none:
            the first updates can only measure forgetting on the images they hold out themselves).
        replay_data: An ImageFolder of training images to seed the replay sample with (e.g. the run's --data).
        device_key: A device key file: the store's manifests are signed with it (see :mod:`.store`).

    Returns:
        The history record of the init.
    """
    from ..deploy.export import export_onnx, validation_batch

    emit = on_event or (lambda event: None)
    key = read_device_key(device_key)
    if (run_dir is None) == (weights is None):
        raise ConfigError("store init: give --from RUN_DIR or --weights FILE (one of them)")
    eval_transform = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        config = (_read_json(run_dir / "config.json") or {}).get("config")
        summary = _read_json(run_dir / "summary.json")
        if not config or not summary or not (run_dir / MODEL_FILE).is_file():
            raise ConfigError(f"--from: {run_dir} is not a finished run folder (config.json, summary.json and "
                              f"{MODEL_FILE} needed)")
        if (summary.get("pruning") or {}):
            raise ConfigError(f"--from: {run_dir} is a Light-PEFT run with a pruned model; a store needs the "
                              "model's own architecture")
        info = {"name": config["model"], "model_args": config.get("model_args") or {},
                "img_size": int(config["img_size"])}
        classes, weights, eval_transform = list(summary["classes"]), run_dir / MODEL_FILE, summary.get("eval_transform")
    else:
        if not classes:
            raise ConfigError("--classes: needed with --weights (the class names, in the head's row order)")
        info = {"name": model or "vit_small_patch14_dinov2", "model_args": dict(model_args or {}),
                "img_size": int(img_size or 224)}
        classes = list(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"--classes: a classifier needs 2 or more distinct class names, got {', '.join(classes)}")
    torch_model, preprocess, loaded = _build_model(info, classes, weights)
    if loaded["skipped_head"]:
        emit({"event": "warning", "message": f"{weights}: its head does not fit {len(classes)} classes; the head "
                                             "starts at its fresh init (the first update trains it)"})
    if eval_transform:
        preprocess = dataclasses.replace(preprocess, crop_pct=float(eval_transform["crop_pct"]),
                                         crop_mode=eval_transform["crop_mode"])
    holdout_entries = scan_entries(holdout, "--holdout", classes=classes)[0] if holdout else {}
    replay_entries = scan_entries(replay_data, "--replay", classes=classes)[0] if replay_data else {}
    meta = {"classes": classes, "img_size": info["img_size"], "mean": preprocess.mean, "std": preprocess.std,
            "interpolation": preprocess.interpolation, "crop_pct": preprocess.crop_pct,
            "crop_mode": preprocess.crop_mode}
    parity_images = validation_batch(holdout, meta) if holdout else (None, None)
    record = {}

    def build(store: Store) -> None:
        entries = [store.add_image(HOLDOUT, e) for v in holdout_entries.values() for e in v]
        sample = replay.offer({}, replay_entries, max_images=replay_max_images, max_bytes=replay_max_bytes,
                              seed=[seed, 0])
        sample = {n: {"seen": v["seen"], "items": [store.add_image(REPLAY, i) for i in v["items"]]}
                  for n, v in sample.items()}

        def fill(folder: Path) -> dict[str, Any]:
            _save_safetensors(torch_model.state_dict(), folder / MODEL_FILE)
            manifest = export_onnx(torch_model, folder / ONNX_FILE, img_size=info["img_size"], class_names=classes,
                                   mean=preprocess.mean, std=preprocess.std, base_model=info["name"], profile=None,
                                   summary={"classes": classes}, parity_images=parity_images[0],
                                   parity_labels=parity_images[1], interpolation=preprocess.interpolation,
                                   crop_pct=preprocess.crop_pct, crop_mode=preprocess.crop_mode)
            atomic_write_json(folder / STATE_FILE, {"holdout": entries, "replay": sample})
            samples = [(str(store.root / e["file"]), e["class"]) for e in entries]
            figures = holdout_figures(evaluate_onnx(folder / ONNX_FILE, samples), classes) if samples else None
            return {**manifest, "store": {
                "parent": None, "classes": classes, "model": info, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "data": {"from": str(run_dir or weights), "holdout": str(holdout) if holdout else None,
                         "replay": str(replay_data) if replay_data else None},
                "metrics": {"holdout": figures}, "decision": {"kind": "init"},
                "replay": replay.totals(sample), "holdout": {"images": len(entries)}}}

        store.write_version("v0001", fill)
        store.set_current("v0001")
        record.update({"event": "init", "version": "v0001", "classes": classes, "model": info,
                       "from": str(run_dir or weights), "holdout_images": len(entries),
                       "replay": replay.totals(sample)})
        store.append_history(record)

    create_store(root, {"model": info, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, build,
                 key=key)
    return record
