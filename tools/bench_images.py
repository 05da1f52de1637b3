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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="images of each kind")
    parser.add_argument("--out", type=Path, help="folder for the images (kept); default: a temporary folder")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--png-short-side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="also write the figures here (for --markdown)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="print the table of a --json-out file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
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
