"""``edge-alast doctor``: what this host is and what edge-alast will do on it, before a long run.

Every finding is ``ok``, ``note`` (worth knowing), ``warning`` (a feature will be missing or slower) or
``problem`` (a run would stop); each warning and problem names its fix. The exit code is 1 only when a problem was
found. :func:`diagnose` takes its probes as arguments, so tests fake any host.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import click

from ..errors import EXIT_FAILURE, EXIT_OK

OK, NOTE, WARNING, PROBLEM = "ok", "note", "warning", "problem"
MIN_PYTHON = (3, 10)
# Below this much memory usable by the process, even ViT-S at 112 px with the planner's lowest budgets does not fit
# (the runtime alone, torch + timm + the model, is about 0.6 GiB).
MIN_USABLE_BYTES = 1 << 30


@dataclass(frozen=True)
class Finding:
    level: str
    topic: str
    message: str
    fix: str | None = None


def probe() -> dict:
    """Read everything :func:`diagnose` looks at from this host (imports torch and onnxruntime if present)."""
    from ..device import host
    from ..device.allocator import find_library

    facts = {"platform": host.platform_summary(), "board": host.board_model(), "cpu_model": host.cpu_model(),
             "cpu_threads": host.cpu_threads(), "torch": host.torch_build(),
             "memory": host.memory_available(host.cgroup_memory()), "onnxruntime": host.onnxruntime_build(),
             "versions": {name: host.distribution_version(name) for name in ("timm", "onnx", "flwr", "matplotlib")},
             "allocators": {name: find_library(name) for name in ("tcmalloc", "jemalloc")}}
    try:
        from .. import _compat  # noqa: F401  (torchvision's CPU import fix, before timm)
        import timm  # noqa: F401
    except Exception as e:  # noqa: BLE001
        facts["timm_error"] = f"{type(e).__name__}: {e}"
    return facts


def diagnose(facts: dict) -> list[Finding]:
    """The findings for a host described by ``facts`` (as :func:`probe` returns them)."""
    from ..device.profiles import match_host

    found: list[Finding] = []
    plat, board, torch_info = facts["platform"], facts["board"], facts["torch"]
    machine = plat["machine"]
    arm = machine in ("aarch64", "arm64")
    jetson = bool(board.get("l4t")) or "jetson" in (board.get("model") or "").lower()
    where = board.get("model") or facts.get("cpu_model") or "unknown board"
    found.append(Finding(OK, "host", f"{machine}, {where}, Python {plat['python']}, {facts['cpu_threads']} cores"
                                     + (f", L4T {board['l4t']}" if board.get("l4t") else "")))

    # ---- Python and torch
    if tuple(int(x) for x in plat["python"].split(".")[:2]) < MIN_PYTHON:
        found.append(Finding(PROBLEM, "python", f"Python {plat['python']} is older than 3.10",
                             "install Python 3.10 or newer (JetPack 6 ships 3.10; Raspberry Pi OS 12 ships 3.11)"))
    if "error" in torch_info:
        error = torch_info["error"]
        if "libcudart" in error or "libcu" in error or "cuda" in error.lower():
            fix = ("this torch is a CUDA build whose CUDA libraries are missing. On a Raspberry Pi or another "
                   "aarch64 board without CUDA install the CPU wheel: pip install -c requirements/aarch64.txt "
                   "'torch==2.10.0'; on a Jetson use NVIDIA's torch wheel for your JetPack "
                   "(pip install -c requirements/jetson.txt keeps it)")
        else:
            fix = "reinstall torch (see README, Install)"
        found.append(Finding(PROBLEM, "torch", f"torch {torch_info.get('version') or ''} cannot be imported: {error}",
                             fix))
    else:
        build = f"CUDA {torch_info['cuda']}" if torch_info.get("cuda") else "CPU-only"
        device = torch_info.get("device")
        if device:
            found.append(Finding(OK, "torch", f"torch {torch_info['version']} ({build}); CUDA device "
                                              f"{device['name']}, {device['memory_bytes'] / 2**30:.1f} GiB, compute "
                                              f"capability {device['capability']}"))
        elif jetson:
            found.append(Finding(PROBLEM, "torch", f"this is a Jetson but torch {torch_info['version']} ({build}) "
                                                   "sees no CUDA device",
                                 "install NVIDIA's torch wheel for your JetPack (README, Install on a Jetson); "
                                 "pip install -c requirements/jetson.txt never replaces it"))
        elif torch_info.get("cuda"):
            found.append(Finding(NOTE, "torch", f"torch {torch_info['version']} is a {build} build but no CUDA "
                                                "device is visible: training runs on the CPU"))
        else:
            found.append(Finding(OK, "torch", f"torch {torch_info['version']} ({build}), "
                                              f"{torch_info.get('threads')} threads"))
    if facts.get("timm_error"):
        found.append(Finding(PROBLEM, "timm", f"timm cannot be imported: {facts['timm_error']}",
                             "pip install -c requirements/<your platform>.txt timm"))

    # ---- memory
    memory = facts["memory"]
    cgroup = memory.get("cgroup")
    limit = (f", cgroup v{cgroup['version']} limit {cgroup['limit_bytes'] / 2**30:.1f} GiB" if cgroup else "")
    usable = memory["usable_bytes"]
    text = (f"{usable / 2**30:.1f} GiB usable by this process (RAM {memory['total_bytes'] / 2**30:.1f} GiB, "
            f"{memory['available_bytes'] / 2**30:.1f} GiB available{limit})")
    if usable < MIN_USABLE_BYTES:
        found.append(Finding(PROBLEM, "memory", text, "free memory (stop other services) or raise the cgroup's "
                                                      "memory limit: a run needs at least 1 GiB"))
    else:
        found.append(Finding(OK, "memory", text))

    # ---- allocator (train --allocator auto)
    tcmalloc = facts["allocators"].get("tcmalloc")
    if tcmalloc:
        found.append(Finding(OK, "allocator", f"--allocator auto preloads tcmalloc ({tcmalloc})"))
    else:
        found.append(Finding(WARNING, "allocator", "--allocator auto runs on glibc's malloc: tcmalloc is not "
                                                   "installed (glibc's heap fragments under changing token counts)",
                             "apt-get install libtcmalloc-minimal4"))

    # ---- onnxruntime: export's parity check and predict need it; the ORT training build exists on x86_64 only
    ort = facts["onnxruntime"]
    dists = ort.get("distributions", {})
    if "error" in ort:
        found.append(Finding(PROBLEM, "onnxruntime", f"onnxruntime cannot be imported: {ort['error']}; train's "
                                                     "export (on by default), export and predict need it",
                             "pip install onnxruntime (aarch64) or onnxruntime-training-cpu (x86_64), or train "
                             "with --no-export"))
    else:
        found.append(Finding(OK, "onnxruntime", f"onnxruntime {ort['version']}, providers "
                                                f"{', '.join(ort.get('providers', []))}"))
        if "onnxruntime" in dists and any(d.startswith("onnxruntime-training") for d in dists):
            found.append(Finding(PROBLEM, "onnxruntime", "both plain onnxruntime and the onnxruntime-training build "
                                                         "are installed: they overwrite each other's files",
                                 "pip uninstall -y onnxruntime onnxruntime-training-cpu && pip install "
                                 "-c requirements/constraints.txt onnxruntime-training-cpu"))
        if ort.get("training"):
            found.append(Finding(OK, "ort-training", "ONNX Runtime training is available (export --format "
                                                     "ort-training, train-ort)"))
        elif arm:
            found.append(Finding(NOTE, "ort-training", "ONNX Runtime training has no aarch64 build: export "
                                                       "--format ort-training and train-ort are unavailable here "
                                                       "(train fine-tunes with PyTorch)"))
        else:
            found.append(Finding(WARNING, "ort-training", "ONNX Runtime training is not installed: export --format "
                                                          "ort-training and train-ort are unavailable",
                                 "pip install -c requirements/constraints.txt onnxruntime-training-cpu"))
        if device_has_cuda(facts) and "CUDAExecutionProvider" not in ort.get("providers", []):
            found.append(Finding(NOTE, "onnxruntime", "a CUDA device is present but onnxruntime has no CUDA "
                                                      "provider: predict --provider auto runs on the CPU "
                                                      "(install onnxruntime-gpu for your CUDA)"))
    if not facts["versions"].get("onnx"):
        found.append(Finding(PROBLEM, "onnx", "onnx is not installed: train's export (on by default) needs it",
                             "pip install -c requirements/<your platform>.txt onnx, or train with --no-export"))

    # ---- the profile that describes this host
    profile = match_host(machine, board.get("model"), memory["total_bytes"])
    if profile is not None:
        found.append(Finding(OK, "profile", f"--profile {profile.name} describes this host ({profile.description})"))
    else:
        found.append(Finding(NOTE, "profile", "no shipped profile describes this host: use --profile auto, or "
                                              "measure one with: edge-alast profiles calibrate --out my_board.yaml"))
    return found


def device_has_cuda(facts: dict) -> bool:
    return bool(facts["torch"].get("device"))


@click.command(context_settings={"show_default": True})
@click.option("--json", "as_json", is_flag=True, help="Print the findings and the probed facts as one JSON object.")
def doctor(as_json):
    """Check this host before a long run: architecture, Python, the torch build and CUDA device, a Jetson or
    Raspberry Pi board, memory usable by this process (cgroup limits included), the allocator `train --allocator
    auto` picks, onnxruntime's build and providers, and the shipped profile that matches. Exits 1 when a problem
    would stop a run; each problem names its fix.

    \b
    Example:
      edge-alast doctor && edge-alast train --profile "$(edge-alast doctor --json | jq -r .profile)" ...
    """
    facts = probe()
    findings = diagnose(facts)
    problems = [f for f in findings if f.level == PROBLEM]
    profile = next((f.message.split()[1] for f in findings if f.topic == "profile" and f.level == OK), None)
    if as_json:
        click.echo(json.dumps({"ok": not problems, "profile": profile, "findings": [asdict(f) for f in findings],
                               "facts": facts}, default=str))
    else:
        for f in findings:
            click.echo(f"{f.level:8} {f.topic:13} {f.message}")
            if f.fix:
                click.echo(f"{'':8} {'':13} fix: {f.fix}")
        click.echo(f"{len(problems)} problem{'s' * (len(problems) != 1)}"
                   + (": a run would stop, see the fixes above" if problems else ""))
    sys.exit(EXIT_FAILURE if problems else EXIT_OK)
