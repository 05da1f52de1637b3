"""Benchmark of reading camera photos: scan time and decode rate through ``images.load_image``.

Generates an ImageFolder of synthetic but photo-like JPEGs (smooth gradients, shapes, sensor noise; random sizes
from 1600x1200 to 2400x1800, i.e. 2-4 MP; about a third stored in sensor orientation with an EXIF Orientation tag)
and the same content, upright, as small PNGs (short side 256 px). Measures:

- scan time of ``scan_image_folder`` with today's cheap check (header, size, end marker) against the full decode of
  every file it used to do (re-implemented here only, as ``full_decode_check``);
- images/s decoded to 224 px by ``load_image`` with and without JPEG draft (reduced-scale decoding),
- and, as a sanity check, how far the draft result is from the full decode and the JPEG from its PNG copy.

Prints a markdown table. Single process, single thread (PIL decodes on the calling thread); on a shared machine the
figures move by some 10-20 % between runs.

    .venv/bin/python tools/bench_images.py --count 120 --json-out runs/images.json
    .venv/bin/python tools/bench_images.py --markdown runs/images.json   # the table again, running nothing

``--hostile`` measures images made to exhaust a board instead: a 1 x 100000 PNG, a 1 x 1000000 PNG and a
144-megapixel PNG (12000 x 12000, one grey value: small on disk), and for scale a 39-megapixel RGB PNG, just under
the default pixel limit (what an accepted file can cost). Each is put in an ImageFolder beside an ordinary
image, scanned with ``scan_image_folder`` and, if the scan keeps it, read with ``load_image`` at each ``--sizes``
(the shared ViT-S/14's eval transform: crop_pct 1.0, centre crop), in a fresh process per case whose peak RSS above
its own baseline (after imports and one ordinary decode) is what is reported. ``--code DIR`` runs the cases on the
``edge_alast`` of another checkout (a worktree of main for the "before" figures); each child's address space is
capped (``--cap-mib`` above its baseline) so that the unbounded code fails with MemoryError instead of taking the
machine. With ``--limits-off`` the children of a checkout that has image limits run without them (what the bounded
resize alone does).

    .venv/bin/python tools/bench_images.py --hostile --code ../wt-before --label before --json-out runs/h.json
    .venv/bin/python tools/bench_images.py --hostile --label after --json-out runs/h.json   # adds to the file
    .venv/bin/python tools/bench_images.py --hostile --limits-off --label "after, limits off" --json-out runs/h.json
    .venv/bin/python tools/bench_images.py --markdown runs/h.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edge_alast.data import images  # noqa: E402
from edge_alast.data.images import READ_ERRORS, load_image, scan_image_folder  # noqa: E402

CLASSES = ("c0", "c1", "c2", "c3")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Stored pixels = upright pixels turned the other way; the tag tells the reader how to turn them back.
STORE_AS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth low-frequency background, a dozen shapes with soft edges, and sensor noise."""
    lw, lh = max(2, w // 64), max(2, h // 64)
    base = rng.uniform(0, 255, (lh, lw, 3)).astype(np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(0.05, 0.4) * w, y0 + rng.uniform(0.05, 0.4) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(2))  # lens softness: edges as a camera records them
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * 4.0
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def generate(root: Path, count: int, png_short_side: int, seed: int) -> dict:
    """``root/jpeg/CLASS/*.jpg`` (2-4 MP, some EXIF-rotated) and ``root/png/CLASS/*.png`` (same content, upright)."""
    rng = np.random.default_rng(seed)
    tagged = 0
    for i in range(count):
        cls = CLASSES[i % len(CLASSES)]
        for kind in ("jpeg", "png"):
            (root / kind / cls).mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(1600, 2401)), int(rng.integers(1200, 1801))
        upright = photo(rng, w, h)
        orientation = int(rng.choice([1, 1, 3, 6, 8])) if rng.random() < 0.4 else 1
        if orientation == 1:
            upright.save(root / "jpeg" / cls / f"{i:04d}.jpg", quality=90)
        else:
            tagged += 1
            exif = Image.Exif()
            exif[0x0112] = orientation
            upright.transpose(STORE_AS[orientation]).save(root / "jpeg" / cls / f"{i:04d}.jpg", quality=90,
                                                          exif=exif)
        scale = png_short_side / min(w, h)
        upright.resize((round(w * scale), round(h * scale)), Image.BICUBIC).save(root / "png" / cls / f"{i:04d}.png")
    return {"tagged": tagged}


def full_decode_check(path) -> str | None:
    """The scan's check before the cheap one: every file decoded in full."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            im.load()
        return None
    except READ_ERRORS as e:
        return f"{type(e).__name__}: {e}"


def time_scan(root: Path, check) -> tuple[float, int]:
    real = images.check_image_file
    images.check_image_file = check  # same folder walk, only the per-file check differs
    try:
        t = time.perf_counter()
        folder = scan_image_folder(root)
        return time.perf_counter() - t, len(folder)
    finally:
        images.check_image_file = real


def time_decode(paths: list[Path], size: int, draft: bool) -> tuple[float, list[np.ndarray]]:
    t = time.perf_counter()
    out = [load_image(p, size, MEAN, STD, draft=draft) for p in paths]
    return len(paths) / (time.perf_counter() - t), out


def markdown(results: dict) -> str:
    """The table of a ``--json-out`` file: scan and decode figures for the JPEGs and their PNG copies."""
    j, p = results["jpeg"], results["png"]
    return "\n".join([
        f"\n{results['count']} images each; load_image to {results['img_size']} px, bicubic\n",
        f"| what | JPEG, {j['mp']:.1f} MP mean ({j['mb']:.0f} MiB) | PNG, short side {results['png_short_side']} px "
        f"({p['mb']:.0f} MiB) |",
        "|---|---:|---:|",
        f"| scan, full decode of every file (before) | {j['old']:.2f} s ({j['old'] / j['files'] * 1e3:.1f} ms/file) "
        f"| {p['old']:.2f} s ({p['old'] / p['files'] * 1e3:.2f} ms/file) |",
        f"| scan, header + end marker (now) | {j['new']:.3f} s ({j['new'] / j['files'] * 1e3:.2f} ms/file) "
        f"| {p['new']:.3f} s ({p['new'] / p['files'] * 1e3:.2f} ms/file) |",
        f"| scan speed-up | {j['old'] / j['new']:.0f}× | {p['old'] / p['new']:.1f}× |",
        f"| load_image, full-resolution decode | {j['full']:.1f} img/s | {p['full']:.1f} img/s |",
        f"| load_image, JPEG draft (now) | {j['draft']:.1f} img/s | {p['draft']:.1f} img/s (no draft for PNG) |",
        f"| draft vs full decode, mean abs diff (of 0–1) | {j['diff']:.4f} | {p['diff']:.4f} |",
        f"| JPEG (EXIF applied) vs its upright PNG, mean abs diff (of 0–1) | {results['parity']:.4f} | |"])


# ---------------------------------------------------------------------------------------------- hostile images
HOSTILE = {  # name -> (width, height, mode)
    "tall-thin 1x100000": (1, 100_000, "RGB"),
    "tall-thin 1x1000000": (1, 1_000_000, "RGB"),
    "144 MP 12000x12000": (12_000, 12_000, "L"),
    "39 MP 6000x6500 (under the limit)": (6_000, 6_500, "RGB"),  # the largest kind of file the limits let through
}
HOSTILE_CROP = {"crop_pct": 1.0, "crop_mode": "center"}  # the shared ViT-S/14 (DINOv2)'s eval transform

# Run in a fresh interpreter per case: ``edge_alast`` is imported from the checkout under test before this tool is
# (the tool's own ``sys.path`` entry then finds it already loaded), and the measurement runs in hostile_child.
CHILD = """
import json, sys
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["code"])
import edge_alast.data.images
sys.path.insert(1, spec["tools"])
import bench_images
print(json.dumps(bench_images.hostile_child(spec)))
"""


def make_hostile(root: Path) -> dict[str, Path]:
    """The hostile PNGs, each in ``root/NAME/bad/`` beside one ordinary image in ``root/NAME/ok/``."""
    files = {}
    for i, (name, (w, h, mode)) in enumerate(HOSTILE.items()):
        folder = root / f"case{i}"
        for cls in ("ok", "bad"):
            (folder / cls).mkdir(parents=True, exist_ok=True)
        photo(np.random.default_rng(i), 320, 240).save(folder / "ok" / "photo.jpg", quality=90)
        path = folder / "bad" / "hostile.png"
        Image.new(mode, (w, h), 128).save(path, optimize=True)
        files[name] = path
    return files


def hostile_child(spec: dict) -> dict:
    """One case in this (fresh) process: baseline RSS, then the scan and the decode, then the peak above it."""
    import resource

    from edge_alast.device.memory import PeakTracker, rss_bytes
    from edge_alast.errors import DataError

    path, size = Path(spec["path"]), spec["size"]
    ok = next((path.parent.parent / "ok").iterdir())
    limits = {}
    if hasattr(images, "ImageLimits"):
        limits = {"limits": images.ImageLimits(None, None) if spec["limits_off"] else images.ImageLimits()}
    load_image(ok, size, MEAN, STD, **HOSTILE_CROP, **limits)  # PIL's plugins and numpy's paths loaded
    baseline = rss_bytes()
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm_size + spec["cap_mib"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    tracker = PeakTracker()
    tracker.interval_peak()  # reset the high-water mark to now
    outcome = ""
    try:
        folder = scan_image_folder(path.parent.parent, **limits)
        skipped = {str(p): why for p, why in folder.skipped}
        if str(path) in skipped:
            outcome = f"refused by the scan: {skipped[str(path)]}"
        else:
            out = load_image(path, size, MEAN, STD, **HOSTILE_CROP, **limits)
            outcome = f"decoded to {tuple(out.shape)}"
    except MemoryError:
        outcome = f"MemoryError (address space capped at {spec['cap_mib']} MiB above the baseline)"
    except DataError as e:
        outcome = f"unreadable when loaded: {e}"
    peak = tracker.interval_peak(reset=False)
    return {"baseline_bytes": baseline, "peak_bytes": peak, "above_baseline_bytes": max(0, peak - baseline),
            "outcome": outcome}


def run_hostile(args) -> dict:
    import subprocess

    code = str((args.code or Path(__file__).resolve().parent.parent).resolve())
    root = Path(tempfile.mkdtemp(prefix="bench_hostile_"))
    rows = []
    try:
        files = make_hostile(root)
        for name, path in files.items():
            for size in args.sizes:
                spec = {"code": code, "tools": str(Path(__file__).resolve().parent), "path": str(path),
                        "size": size, "limits_off": args.limits_off, "cap_mib": args.cap_mib}
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                                      text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                seconds = time.perf_counter() - t
                if proc.returncode != 0:
                    result = {"outcome": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
                else:
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                w, h, mode = HOSTILE[name]
                rows.append({"image": name, "file_bytes": path.stat().st_size, "width": w, "height": h, "mode": mode,
                             "img_size": size, "seconds": round(seconds, 2), **result})
                print(f"{args.label}: {name} at {size} px: {result.get('above_baseline_bytes', 0) / 2**20:.0f} MiB "
                      f"above baseline; {result['outcome']}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    commit = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"label": args.label, "code": code, "commit": commit.stdout.strip(), "limits_off": args.limits_off,
            "cap_mib": args.cap_mib, "eval_transform": HOSTILE_CROP, "rows": rows}


def hostile_markdown(results: dict) -> str:
    """The table of a ``--hostile --json-out`` file: one column per labelled run, one row per image and size."""
    runs = results["runs"]
    lines = ["\nPeak RSS above the process's baseline (MiB) while scanning and decoding one hostile image, a fresh "
             "process per case; eval transform crop_pct 1.0, centre crop.\n",
             "| image | file | px | " + " | ".join(f"{r['label']} (`{r['commit']}`)" for r in runs) + " |",
             "|---|---:|---:|" + "---:|" * len(runs)]
    keys = [(row["image"], row["img_size"]) for row in runs[0]["rows"]]
    for image, size in keys:
        cells, file_bytes = [], None
        for run in runs:
            row = next((r for r in run["rows"] if (r["image"], r["img_size"]) == (image, size)), None)
            if row is None:
                cells.append("–")
                continue
            file_bytes = row["file_bytes"]
            cells.append(f"{row.get('above_baseline_bytes', 0) / 2**20:.0f}: {_short(row['outcome'])}")
        lines.append(f"| {image} | {_kib(file_bytes)} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kib(n: int | None) -> str:
    return "–" if n is None else f"{n / 1024:.1f} KiB"


def _short(outcome: str) -> str:
    """An outcome as a table cell: what happened, without the file's path."""
    if outcome.startswith("refused by the scan"):
        return "refused (" + ("pixels" if "--max-image-pixels" in outcome else "aspect ratio"
                              if "--max-aspect-ratio" in outcome else outcome.split(": ", 1)[1][:40]) + ")"
    if outcome.startswith("MemoryError"):
        return "MemoryError at the cap"
    if outcome.startswith("decoded"):
        return "decoded"
    return outcome[:60]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="images of each kind")
    parser.add_argument("--out", type=Path, help="folder for the images (kept); default: a temporary folder")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--png-short-side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="also write the figures here (for --markdown)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="print the table of a --json-out file and exit")
    parser.add_argument("--hostile", action="store_true", help="measure the hostile images instead (see above)")
    parser.add_argument("--code", type=Path, help="--hostile: checkout whose edge_alast is measured; default: this one")
    parser.add_argument("--label", default="this checkout", help="--hostile: the column's name in the table")
    parser.add_argument("--limits-off", action="store_true", help="--hostile: run without the image limits")
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[32, 224],
                        help="--hostile: output sides, comma-separated")
    parser.add_argument("--cap-mib", type=int, default=3072,
                        help="--hostile: each child's address space above its baseline, MiB")
    args = parser.parse_args(argv)
    if args.markdown:
        results = json.loads(args.markdown.read_text())
        print(hostile_markdown(results) if "runs" in results else markdown(results))
        return
    if args.hostile:
        run = run_hostile(args)
        results = {"runs": []}
        if args.json_out and args.json_out.exists():
            results = json.loads(args.json_out.read_text())
        results["runs"] = [r for r in results["runs"] if r["label"] != run["label"]] + [run]
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(results, indent=1))
        print(hostile_markdown(results))
        return

    root = args.out or Path(tempfile.mkdtemp(prefix="bench_images_"))
    try:
        t = time.perf_counter()
        info = generate(root, args.count, args.png_short_side, args.seed)
        print(f"generated {args.count} JPEGs ({info['tagged']} with an EXIF rotation) and {args.count} PNGs "
              f"in {time.perf_counter() - t:.0f} s; {os.cpu_count()} CPUs", file=sys.stderr)
        rows = {}
        for kind in ("jpeg", "png"):
            files = sorted((root / kind).rglob("*.*"))
            mb = sum(p.stat().st_size for p in files) / 2**20
            pixels = [Image.open(p).size for p in files]
            mp = np.mean([w * h for w, h in pixels]) / 1e6
            old_s, n_old = time_scan(root / kind, full_decode_check)
            new_s, n_new = time_scan(root / kind, images.check_image_file)
            assert n_old == n_new == len(files), (n_old, n_new, len(files))
            full_rate, full = time_decode(files, args.img_size, draft=False)
            draft_rate, fast = time_decode(files, args.img_size, draft=True)
            diff = float(np.mean([np.abs(a - b).mean() for a, b in zip(fast, full)])) * STD[1]  # ≈ of [0, 1]
            rows[kind] = dict(files=len(files), mb=mb, mp=mp, old=old_s, new=new_s, full=full_rate,
                              draft=draft_rate, diff=diff, out=fast)
        pairs = zip(rows["jpeg"]["out"], rows["png"]["out"])
        parity = float(np.mean([np.abs(a - b).mean() for a, b in pairs])) * STD[1]
        results = {"count": args.count, "img_size": args.img_size, "png_short_side": args.png_short_side,
                   "parity": parity, **{kind: {k: v for k, v in r.items() if k != "out"} for kind, r in rows.items()}}
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1))
        print(markdown(results))
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
