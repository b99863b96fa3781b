"""Rebuild the pictures of docs/cifar10-generator.md from the runs' logs and samples.

    python docs/make_cifar10_figures.py curves --tokenizer RUN_TOK [--ar RUN_AR] [--classifier CLS.json]
    python docs/make_cifar10_figures.py samples --unguided U.npz --guided G.npz --per-class K [--show 10]

``curves`` reads the CSV logs that ``wetok train`` writes (``RUN/logs/csv/version_*/metrics.csv``) and the
classifier's JSON report, and writes docs/cifar10-training-curves.png. ``samples`` takes two ``wetok sample --npz``
files (uint8 ``arr_0`` (N, 32, 32, 3), K samples per class in class order) and writes docs/cifar10-samples.png:
one row per class, without guidance on the left, with guidance on the right.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HERE = Path(__file__).resolve().parent


def read_csv(run: str | Path) -> dict[str, list[tuple[float, float]]]:
    """column -> [(step, value)] over every version_* log of a run (a resumed run appends a version)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for path in sorted(Path(run).glob("logs/csv/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                step = float(row["step"])
                for key, value in row.items():
                    if key != "step" and value not in ("", None):
                        series.setdefault(key, []).append((step, float(value)))
    return series


def smooth(values: np.ndarray, k: int = 9) -> np.ndarray:
    if len(values) < k:
        return values
    return np.convolve(np.pad(values, (k // 2, k // 2), mode="edge"), np.ones(k) / k, mode="valid")


def plot_series(ax, series, key: str, label: str, color: str, *, smoothed: bool = True) -> None:
    if key not in series:
        return
    steps, values = np.asarray(series[key]).T
    ax.plot(steps, smooth(values) if smoothed else values, color=color, label=label,
            marker=None if smoothed else "o", markersize=3)


def curves(args: argparse.Namespace) -> None:
    panels = 1 + bool(args.ar) + bool(args.classifier)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.4), squeeze=False)
    axes = list(axes[0])
    tok = read_csv(args.tokenizer)
    ax = axes.pop(0)
    plot_series(ax, tok, "train/l1", "train L1 (smoothed)", "tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("L1")
    ax.set_title("tokenizer")
    twin = ax.twinx()
    plot_series(twin, tok, "val/psnr", "val PSNR (EMA)", "tab:red", smoothed=False)
    twin.set_ylabel("PSNR (dB)")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    if args.ar:
        ar = read_csv(args.ar)
        ax = axes.pop(0)
        train_keys = [k for k in ar if k.startswith("train/") and "loss" in k]
        val_keys = [k for k in ar if k.startswith("val/") and "loss" in k]
        for key, color in zip(train_keys, ("tab:blue", "tab:green", "tab:purple"), strict=False):
            plot_series(ax, ar, key, f"{key} (smoothed)", color)
        for key, color in zip(val_keys, ("tab:red", "tab:orange"), strict=False):
            plot_series(ax, ar, key, key, color, smoothed=False)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats, sum over sub-tokens)")
        ax.set_title("WeTok-AR")
        ax.legend(fontsize=8)
    if args.classifier:
        report = json.loads(Path(args.classifier).read_text())
        ax = axes.pop(0)
        epochs = [e["epoch"] for e in report["log"]]
        ax.plot(epochs, [e["train_loss"] for e in report["log"]], marker="o", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy (label smoothing 0.1)")
        ax.set_title(f"classifier (test accuracy {100 * report['test_accuracy']:.1f}%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = HERE / "cifar10-training-curves.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def class_rows(path: str, per_class: int, show: int) -> np.ndarray:
    with np.load(path) as data:
        images = data["arr_0"]
    rows = [np.concatenate(list(images[c * per_class:c * per_class + show]), axis=1)
            for c in range(len(images) // per_class)]
    return np.concatenate(rows, axis=0)


def samples(args: argparse.Namespace) -> None:
    grids = [(class_rows(args.unguided, args.per_class, args.show), f"no guidance ({args.unguided_label})"),
             (class_rows(args.guided, args.per_class, args.show), f"guidance ({args.guided_label})")]
    fig, axes = plt.subplots(1, 2, figsize=(2 * 0.42 * args.show + 1.4, 0.42 * len(CLASSES) + 0.6))
    for ax, (grid, title) in zip(axes, grids, strict=True):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        rows = grid.shape[0] // 32
        ax.set_yticks(np.arange(rows) * 32 + 16, CLASSES[:rows], fontsize=8)
    axes[1].set_yticks([])
    fig.tight_layout()
    out = HERE / "cifar10-samples.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("curves")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--ar")
    p.add_argument("--classifier")
    p = sub.add_parser("samples")
    p.add_argument("--unguided", required=True)
    p.add_argument("--guided", required=True)
    p.add_argument("--unguided-label", default="cfg 1")
    p.add_argument("--guided-label", default="cfg > 1")
    p.add_argument("--per-class", type=int, required=True)
    p.add_argument("--show", type=int, default=10)
    args = parser.parse_args()
    curves(args) if args.command == "curves" else samples(args)


if __name__ == "__main__":
    main()
