"""Rebuild the pictures of MODEL_CARD.md.

    python docs/make_model_card_figures.py curves RUN [RUN ...]
    python docs/make_model_card_figures.py side-by-side ORIGINALS STAGE1 STAGE2 [--names a.png,b.png]

``curves`` reads the CSV logs that ``wetok train`` writes (``RUN/logs/csv/version_*/metrics.csv``; runs given in
training order, their steps continued one after the other) and writes docs/model-card-curves.png: validation
PSNR and the training L1 (mean of each 100 steps). ``side-by-side`` takes three folders of same-named PNGs
(``tools/realism.py --save-dir`` writes the reconstructions; ORIGINALS holds the crop256 originals) and writes
docs/model-card-gd.png: one row per image, original | stage 1 | stage 2, with a 2x zoom of the centre below.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def read_csv(run: Path) -> dict[str, list[tuple[int, float]]]:
    columns: dict[str, dict[int, float]] = {}
    for path in sorted(run.glob("logs/csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key != "step" and value:
                        columns.setdefault(key, {})[int(row["step"])] = float(value)
    return {k: sorted(v.items()) for k, v in columns.items()}


def curves(runs: list[str], offsets: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run, offset in zip(runs, offsets, strict=True):
        logs = read_csv(Path(run))
        if "val/psnr" in logs:
            steps, values = zip(*logs["val/psnr"], strict=True)
            left.plot([s + offset for s in steps], values, marker="o", markersize=3, label=Path(run).name)
        if "train/l1" in logs:
            buckets: dict[int, list[float]] = {}
            for step, value in logs["train/l1"]:
                buckets.setdefault((step + offset) // 100 * 100, []).append(value)
            xs = sorted(buckets)
            right.plot(xs, [sum(buckets[x]) / len(buckets[x]) for x in xs], label=Path(run).name)
    left.set(xlabel="step (from the start of training)", ylabel="val PSNR (dB)",
             title="validation: EMA weights, 20 val images")
    right.set(xlabel="step (from the start of training)", ylabel="L1 (mean of 100 steps)", title="training L1")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = HERE / "model-card-curves.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def side_by_side(folders: list[str], names: list[str], size: int = 256, gap: int = 4) -> None:
    rows = []
    for name in names:
        images = [Image.open(Path(f) / name).convert("RGB") for f in folders]
        zooms = [im.crop((size // 4, size // 4, 3 * size // 4, 3 * size // 4)).resize((size, size),
                                                                                      Image.Resampling.NEAREST)
                 for im in images]
        rows += [images, zooms]
    labels = ["original", "stage 1 (default)", "stage 2 (not shipped)"]
    top = 22
    canvas = Image.new("RGB", (3 * size + 2 * gap, top + len(rows) * (size + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        draw.text((c * (size + gap) + 4, 4), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image, (c * (size + gap), top + r * (size + gap)))
    out = HERE / "model-card-gd.png"
    canvas.save(out, optimize=True)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves")
    c.add_argument("runs", nargs="+")
    c.add_argument("--offsets", help="comma-separated step offset per run (default 0 each)")
    s = sub.add_parser("side-by-side")
    s.add_argument("folders", nargs=3)
    s.add_argument("--names", required=True, help="comma-separated PNG names present in all three folders")
    args = parser.parse_args()
    if args.command == "curves":
        offsets = [int(x) for x in args.offsets.split(",")] if args.offsets else [0] * len(args.runs)
        curves(args.runs, offsets)
    else:
        side_by_side(args.folders, args.names.split(","))


if __name__ == "__main__":
    main()
