"""``make check-arm64``: edge-alast installed as the README tells a Raspberry Pi user, run on emulated aarch64.

    python tools/check_arm64.py [--constraints requirements/aarch64.txt ...] [--cache DIR]

For each constraints file (default: ``requirements/aarch64.txt``, the README's Raspberry Pi pins with torch
2.10.0, and ``requirements/aarch64-oldest.txt``, the oldest torch the package claims, standing in for a JetPack
torch) it:

1. prepares, once, a Debian bookworm arm64 userland (Raspberry Pi OS 12's base: Python 3.11, with the README's
   ``python3-venv libtcmalloc-minimal4``): ``debootstrap --foreign`` downloads the packages and ``dpkg -x``
   unpacks them (nothing runs as arm64 during preparation);
2. installs the project and its dependencies for linux aarch64 cp311 into a site folder, the README's
   ``pip install -c requirements/aarch64.txt .`` made to work from an x86_64 host: a wheel of this checkout is
   built here and installed with its dependencies under the constraints by ``uv pip install --target
   --python-platform aarch64-manylinux_2_28``. Not pip: pip's ``--platform`` picks aarch64 wheels but evaluates
   environment markers for the host, so it asks for ``onnxruntime-training-cpu`` (x86_64-only) and fails; uv
   evaluates them for the target, as pip on a Pi does. The site folder is reused while the constraints file and
   pyproject.toml are unchanged; this checkout's package is reinstalled into it on every run;
3. runs, each through ``qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3.11`` (there is no binfmt_misc here,
   so nothing arm64 can be started except through qemu): ``platform.machine()``, ``edge-alast doctor`` (text and
   ``--json``: no problem, and torch, timm, onnx and onnxruntime at the constraints file's pins, no CUDA, no ORT
   training build, tcmalloc found), ``demo-data``, a tiny ``train`` (vit_tiny_patch16_224 at 32 px, 3 steps, no
   export), ``export``, ``export --format ort-training`` (must exit 2 on aarch64), ``predict --json`` and ``eval
   --json``, and checks each result: exit codes, the files written, the manifest's parity, predict's JSON, eval
   against train's own evaluation.

``train --allocator auto`` re-executes itself with ``LD_PRELOAD`` when the allocator is not already tcmalloc; an
arm64 interpreter cannot be re-executed here (the host kernel cannot run it), so the check starts ``train`` with
tcmalloc already preloaded through qemu (``qemu -E LD_PRELOAD=...``): ``auto`` then keeps it, and the check reads
``allocator: tcmalloc`` back from summary.json. The re-execution itself is not exercised under emulation (it is on
x86_64, in tests/device/test_allocator.py).

Prints one line per check, then a summary per constraints file; writes the ``doctor`` text of each to
``CACHE/work/<name>/doctor.txt`` and all results to ``CACHE/work/check_arm64.json``. Exit 0 only when every check
passed. Needs root for apt-get (qemu-user-static, debootstrap) and debootstrap, or both tools already present.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = os.environ.get("EDGE_ALAST_ARM64_CACHE", "/var/cache/edge-alast-arm64")
DEFAULT_CONSTRAINTS = ("requirements/aarch64.txt", "requirements/aarch64-oldest.txt")
SUITE = "bookworm"  # Raspberry Pi OS 12's Debian release (Python 3.11)
# What the README's Raspberry Pi install has apt install (python3-venv pulls python3).
USERLAND_PACKAGES = ("python3", "python3-venv", "libtcmalloc-minimal4")
GUEST_PYTHON = "usr/bin/python3.11"
TCMALLOC = "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"
PLATFORM = "aarch64-manylinux_2_28"  # uv's name for the manylinux_2_28_aarch64 wheel tag (glibc 2.28+; bookworm: 2.36)
# The tiny run: small enough for emulation (each step is tens of seconds under qemu), big enough to be a timm ViT
# with the real patching (12 blocks, 4 tokens + the class token at 32 px).
MODEL, IMG_SIZE, STEPS, BATCH = "vit_tiny_patch16_224", 32, 3, 8
READY = ".edge-alast-ready"


def log(message: str) -> None:
    print(message, flush=True)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], **kw)


# ================================================================================================================
# Host tools
# ================================================================================================================


def ensure_host_tools() -> str:
    """qemu-aarch64-static and debootstrap, installed with apt-get when missing and running as root."""
    missing = [pkg for tool, pkg in (("qemu-aarch64-static", "qemu-user-static"), ("debootstrap", "debootstrap"))
               if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"error: {', '.join(missing)} missing: sudo apt-get install -y {' '.join(missing)}")
        log(f"apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if sh(["apt-get", "update", "-qq"], env=env).returncode or \
                sh(["apt-get", "install", "-y", "-qq", *missing], env=env, stdout=subprocess.DEVNULL).returncode:
            sys.exit(f"error: apt-get install {' '.join(missing)} failed")
    return shutil.which("qemu-aarch64-static") or "/usr/bin/qemu-aarch64-static"


def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses on this host for SUITE (sources.list or deb822 .sources), else deb.debian.org."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):  # deb822: URIs: ... / Suites: ...
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split() and "debian" in uris.group(1):
                return uris.group(1)
        for line in text.splitlines():  # one-line style: deb [opts] URI SUITE COMPONENTS
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == SUITE and "debian" in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def find_uv(cache: Path) -> str:
    """uv beside this interpreter (the project's .venv has it, through flwr), on PATH, or installed into the cache
    at the version requirements/constraints.txt pins."""
    for candidate in (Path(sys.executable).parent / "uv", shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    target = cache / "host-uv"
    uv = target / "bin" / "uv"
    if not uv.is_file():
        pin = re.search(r"^uv==(\S+)", (REPO / "requirements/constraints.txt").read_text(), re.M)
        spec = f"uv=={pin.group(1)}" if pin else "uv"
        log(f"pip install --target {target} {spec}")
        if sh([sys.executable, "-m", "pip", "install", "--quiet", "--target", target, spec]).returncode:
            sys.exit("error: cannot install uv (needed to install for aarch64 from this host)")
    return str(uv)


# ================================================================================================================
# The arm64 userland
# ================================================================================================================


def prepare_userland(cache: Path, qemu: str, mirror: str) -> tuple[Path, bool]:
    """CACHE/rootfs-bookworm-arm64 with Python 3.11 runnable under qemu; reused when already prepared."""
    root = cache / f"rootfs-{SUITE}-arm64"
    if (root / READY).exists():
        return root, True
    tmp = cache / f"rootfs-{SUITE}-arm64.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
           f"--include={','.join(USERLAND_PACKAGES)}", SUITE, tmp, mirror]
    log(" ".join(map(str, cmd)))
    done = sh(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: debootstrap failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    # --foreign only unpacks the essential set; unpack every downloaded package (nothing is configured: no
    # maintainer script can run on this host, and none is needed to run Python).
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    for deb in debs:
        if sh(["dpkg", "-x", deb, tmp]).returncode:
            sys.exit(f"error: dpkg -x {deb} failed")
    probe = sh([qemu, "-L", tmp, tmp / GUEST_PYTHON, "-c", "import platform; print(platform.machine())"],
               capture_output=True, text=True)
    if probe.returncode or probe.stdout.strip() != "aarch64":
        sys.exit(f"error: the arm64 Python does not run under qemu: {probe.stdout}{probe.stderr}")
    (tmp / READY).write_text(f"{SUITE} {mirror} {len(debs)} packages\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root, False


# ================================================================================================================
# Installing edge-alast for aarch64
# ================================================================================================================


def build_wheel(work: Path) -> Path:
    """A wheel of this checkout (its tracked and untracked-not-ignored files), built outside the tree."""
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    files = sh(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
               capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    done = sh([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", dist, src],
              capture_output=True, text=True)
    wheels = sorted(dist.glob("edge_alast-*.whl"))
    if done.returncode or not wheels:
        sys.exit(f"error: building the wheel failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return wheels[0]


def uv_install(uv: str, target: Path, constraints: Path, wheel: Path, *extra: str) -> None:
    cmd = [uv, "pip", "install", "--quiet", "--target", target, "--python-platform", PLATFORM, "--python-version",
           "3.11", "--only-binary", ":all:", "--compile-bytecode", "-c", constraints, *extra, wheel]
    log(" ".join(map(str, cmd)))
    done = sh(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: installing for aarch64 under {constraints.name} failed:\n{done.stderr[-3000:]}")


def site_key(constraints_text: str, pyproject_text: str) -> str:
    """What a site folder was installed from: the constraints' requirement lines (comments and blank lines do not
    count) and pyproject.toml."""
    lines = [ln.split("#", 1)[0].strip() for ln in constraints_text.splitlines()]
    pins = "\n".join(sorted(ln for ln in lines if ln))
    return hashlib.sha256((pins + "\0" + pyproject_text).encode()).hexdigest()[:12]


def prepare_site(cache: Path, uv: str, constraints: Path, wheel: Path) -> tuple[Path, bool]:
    """The site folder for ``constraints``: the project and its dependencies for aarch64 cp311. Reused while the
    constraints file and pyproject.toml are the same; the project itself is reinstalled from ``wheel`` each time."""
    key = site_key(constraints.read_text(), (REPO / "pyproject.toml").read_text())
    name = constraints.stem
    site = cache / "sites" / f"{name}-{key}"
    reused = (site / READY).exists()
    if not reused:
        for old in (cache / "sites").glob(f"{name}-*"):  # this file's earlier sites (not aarch64-oldest's for aarch64)
            if re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{12}}(\.partial)?", old.name):
                shutil.rmtree(old, ignore_errors=True)
        partial = site.with_name(site.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        uv_install(uv, partial, constraints, wheel)
        (partial / READY).write_text(f"{constraints}\n")
        partial.rename(site)
    else:
        uv_install(uv, site, constraints, wheel, "--no-deps", "--reinstall-package", "edge-alast")
    return site, reused


# ================================================================================================================
# Running under qemu, and the checks
# ================================================================================================================


class Guest:
    """Runs the arm64 Python (and the edge-alast console script) under qemu-aarch64-static."""

    def __init__(self, qemu: str, root: Path, site: Path, cwd: Path):
        self.qemu, self.root, self.site, self.cwd = qemu, root, site, cwd

    def run(self, args: list, guest_env: dict | None = None, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
        cmd = [self.qemu, "-L", self.root]
        for k, v in (guest_env or {}).items():
            cmd += ["-E", f"{k}={v}"]  # set in the arm64 process only (an LD_PRELOAD here would hit qemu itself)
        cmd += [self.root / GUEST_PYTHON, *args]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV", "LD_PRELOAD")}
        env["PYTHONPATH"] = str(self.site)
        t0 = time.monotonic()
        done = sh(cmd, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return done, time.monotonic() - t0

    def cli(self, *args, **kw):
        return self.run([self.site / "bin" / "edge-alast", *args], **kw)


class Checks:
    def __init__(self, name: str):
        self.name, self.results = name, []

    def record(self, step: str, ok: bool, detail: str, seconds: float, output: str = "") -> bool:
        self.results.append({"step": step, "ok": ok, "detail": detail, "seconds": round(seconds, 1)})
        log(f"  {'ok  ' if ok else 'FAIL'} {step:<12} {detail} ({seconds:.0f} s)")
        if not ok and output:
            log("       " + output.strip()[-3000:].replace("\n", "\n       "))
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r["ok"] for r in self.results)


def pinned(constraints: Path, package: str) -> str | None:
    m = re.search(rf"^{re.escape(package)}==(\S+)", constraints.read_text(), re.M)
    return m.group(1) if m else None


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


MACHINE = "import json, platform; print(json.dumps({'machine': platform.machine(), 'python': platform.python_version()}))"


def installed_version(site: Path, package: str) -> str | None:
    """The version of ``package`` the site folder holds (from its .dist-info folder's name)."""
    for d in site.glob(f"{package.replace('-', '_')}-*.dist-info"):
        return d.name[len(package) + 1:-len(".dist-info")]
    return None


def check_one(guest: Guest, constraints: Path, work: Path) -> tuple[Checks, dict]:
    c = Checks(constraints.name)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # ---- the interpreter (no import of torch: that is doctor's)
    done, t = guest.run(["-c", MACHINE], timeout=600)
    info = (json_lines(done.stdout) or [{}])[-1]
    c.record("machine", done.returncode == 0 and info.get("machine") == "aarch64",
             f"platform.machine() = {info.get('machine')!r}, Python {info.get('python')}", t, done.stderr)

    # ---- doctor: the text a user reads, then the probed facts, checked against the constraints file
    done, t = guest.cli("doctor", timeout=900)
    (work / "doctor.txt").write_text(done.stdout)
    problems = re.search(r"^(\d+) problems?$", done.stdout, re.M)
    c.record("doctor", done.returncode == 0 and problems is not None and problems.group(1) == "0",
             f"exit {done.returncode}, {problems.group(0) if problems else 'no summary line'}", t,
             done.stdout + done.stderr)
    done, t = guest.cli("doctor", "--json", timeout=900)
    try:
        facts = json.loads(done.stdout).get("facts", {})
    except (json.JSONDecodeError, AttributeError):
        facts = {}
    torch_info, ort = facts.get("torch", {}), facts.get("onnxruntime", {})
    versions = facts.get("versions", {})
    info.update(torch=torch_info.get("version"), cuda=torch_info.get("cuda"), timm=versions.get("timm"),
                onnx=versions.get("onnx"), onnxruntime=ort.get("version"), ort_training=ort.get("training"),
                torchvision=installed_version(guest.site, "torchvision"))
    want = {name: pinned(constraints, name) for name in ("torch", "timm", "onnx", "onnxruntime")}
    got = {"torch": (info["torch"] or "").split("+")[0], "timm": info["timm"], "onnx": info["onnx"],
           "onnxruntime": info["onnxruntime"]}
    tcmalloc = facts.get("allocators", {}).get("tcmalloc")
    c.record("doctor-json", done.returncode == 0 and facts.get("platform", {}).get("machine") == "aarch64"
             and got == want and not info["cuda"] and ort.get("training") is False and bool(tcmalloc),
             f"exit {done.returncode}, machine {facts.get('platform', {}).get('machine')!r}, torch {info['torch']} "
             f"(CUDA {info['cuda']}), timm {info['timm']}, onnx {info['onnx']}, onnxruntime {info['onnxruntime']} "
             f"(training build: {info['ort_training']}; pinned: {want}), tcmalloc {tcmalloc}", t,
             done.stdout[-2000:] + done.stderr)

    # ---- demo data
    done, t = guest.cli("demo-data", "--per-class", "8", "--size", str(IMG_SIZE), work / "data", timeout=600)
    classes = sorted(p.name for p in (work / "data/train").iterdir()) if (work / "data/train").is_dir() else []
    val_images = sorted((work / "data/val").glob("*/*.png"))
    c.record("demo-data", done.returncode == 0 and len(classes) == 4 and len(val_images) > 0,
             f"exit {done.returncode}, classes {classes}, {len(val_images)} val images", t, done.stderr)

    # ---- train (tcmalloc preloaded through qemu: see the module docstring)
    run = work / "run"
    done, t = guest.cli("train", "--data", work / "data/train", "--val-data", work / "data/val", "--model", MODEL,
                        "--img-size", str(IMG_SIZE), "--steps", str(STEPS), "--batch-size", str(BATCH),
                        "--no-export", "--allocator", "auto", "--json", "--out", run,
                        guest_env={"LD_PRELOAD": TCMALLOC}, timeout=1800)
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = {}
    steps = [e for e in json_lines(done.stdout) if e.get("event") == "step"]
    loss = summary.get("final_loss")
    c.record("train", done.returncode == 0 and summary.get("steps") == STEPS and len(steps) == STEPS
             and isinstance(loss, float) and math.isfinite(loss) and (run / "model.safetensors").is_file()
             and summary.get("allocator") == "tcmalloc",
             f"exit {done.returncode}, {len(steps)} steps of {MODEL} at {IMG_SIZE} px, loss {loss}, "
             f"val accuracy {summary.get('val_accuracy')}, allocator {summary.get('allocator')}", t,
             done.stdout[-1500:] + done.stderr)

    # ---- export (fp32 ONNX, parity-checked in onnxruntime), and ort-training refused on aarch64
    done, t = guest.cli("export", run, "--json", timeout=1200)
    try:
        manifest = json.loads((run / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        manifest = {}
    parity = manifest.get("parity", {})
    c.record("export", done.returncode == 0 and (run / "model.onnx").is_file() and parity.get("argmax_equal") is True
             and parity.get("max_abs_diff", math.inf) <= parity.get("atol", 0)
             and manifest.get("onnxruntime_version") == info.get("onnxruntime"),
             f"exit {done.returncode}, model.onnx {manifest.get('size_bytes')} bytes, parity max |diff| "
             f"{parity.get('max_abs_diff')} (atol {parity.get('atol')}), onnxruntime "
             f"{manifest.get('onnxruntime_version')}", t, done.stdout[-1500:] + done.stderr)
    done, t = guest.cli("export", run, "--format", "ort-training", timeout=1200)
    c.record("ort-training", done.returncode == 2 and "x86_64" in done.stderr,
             f"exit {done.returncode} (2 expected): {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}",
             t, done.stdout + done.stderr)

    # ---- predict (onnxruntime only)
    images = [val_images[0], val_images[-1]] if val_images else []
    done, t = guest.cli("predict", run / "model.onnx", *images, "--top-k", "2", "--json", timeout=600)
    preds = json_lines(done.stdout)
    good = (done.returncode == 0 and len(preds) == len(images) == 2
            and all(p.get("provider") == "CPUExecutionProvider" and len(p.get("top", [])) == 2
                    and all(x.get("class") in classes for x in p["top"])
                    and 0 <= p["top"][1]["probability"] <= p["top"][0]["probability"] <= 1 for p in preds))
    c.record("predict", good, f"exit {done.returncode}, " + "; ".join(
        f"{Path(p.get('image', '?')).parent.name}/{Path(p.get('image', '?')).name} -> {p['top'][0]['class']} "
        f"{p['top'][0]['probability']:.2f}" for p in preds if p.get("top")) + f", provider "
        f"{preds[0].get('provider') if preds else None}", t, done.stdout + done.stderr)

    # ---- eval: all tokens on the validation folder, the same as train's closing evaluation
    done, t = guest.cli("eval", run, "--data", work / "data/val", "--batch-size", str(BATCH), "--json", timeout=900)
    result = (json_lines(done.stdout) or [{}])[-1]
    acc = result.get("accuracy")
    c.record("eval", done.returncode == 0 and result.get("images") == len(val_images) and isinstance(acc, float)
             and summary.get("val_accuracy") is not None and abs(acc - summary["val_accuracy"]) < 1e-6,
             f"exit {done.returncode}, accuracy {acc} on {result.get('images')} images (train's own evaluation: "
             f"{summary.get('val_accuracy')})", t, done.stdout + done.stderr)
    return c, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--constraints", action="append",
                    help=f"constraints file, repeatable (default: {', '.join(DEFAULT_CONSTRAINTS)})")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="userland, site folders and run folders "
                    "(default: $EDGE_ALAST_ARM64_CACHE or %(default)s)")
    ap.add_argument("--mirror", default=None, help="Debian mirror for debootstrap (default: the one apt uses here)")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    qemu = ensure_host_tools()
    mirror = args.mirror or apt_mirror()
    t0 = time.monotonic()
    root, reused = prepare_userland(cache, qemu, mirror)
    log(f"arm64 userland: {root} ({'reused' if reused else f'built from {mirror}'}, {time.monotonic() - t0:.0f} s)")
    uv = find_uv(cache)
    wheel = build_wheel(cache / "work")
    log(f"wheel: {wheel.name}")

    summaries = []
    for name in args.constraints or DEFAULT_CONSTRAINTS:
        constraints = (REPO / name) if not Path(name).is_absolute() else Path(name)
        t0 = time.monotonic()
        site, reused = prepare_site(cache, uv, constraints, wheel)
        prep = time.monotonic() - t0
        log(f"{name}: site {site} ({'reused' if reused else 'installed'}, {prep:.0f} s)")
        guest = Guest(qemu, root, site, cache / "work")
        t0 = time.monotonic()
        checks, info = check_one(guest, constraints, cache / "work" / constraints.stem)
        summaries.append({"constraints": name, "ok": checks.ok, "site_reused": reused, "site_seconds": round(prep, 1),
                          "check_seconds": round(time.monotonic() - t0, 1), "stack": info,
                          "results": checks.results})

    total = time.monotonic() - t_start
    (cache / "work" / "check_arm64.json").write_text(json.dumps(
        {"total_seconds": round(total, 1), "qemu": qemu, "rootfs": str(root), "runs": summaries}, indent=2) + "\n")
    log("")
    log("check-arm64 (qemu-aarch64-static, Debian bookworm arm64, the README's Raspberry Pi install):")
    for s in summaries:
        st = s["stack"]
        passed = sum(r["ok"] for r in s["results"])
        log(f"  {'PASS' if s['ok'] else 'FAIL'} {s['constraints']}: {st.get('machine')} Python {st.get('python')}, "
            f"torch {st.get('torch')}, torchvision {st.get('torchvision')}, timm {st.get('timm')}, onnx "
            f"{st.get('onnx')}, onnxruntime {st.get('onnxruntime')}: {passed}/{len(s['results'])} checks "
            f"(doctor, train, export, predict, eval) in {s['check_seconds']:.0f} s")
    ok = bool(summaries) and all(s["ok"] for s in summaries)
    log(f"check-arm64: {'passed' if ok else 'FAILED'} in {total:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
