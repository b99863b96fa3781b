"""The paper's claims in miniature: train every arm of docs/ablations.md with one shared recipe, evaluate it,
and write the tables and the training-curve plot.

    python tools/ablations.py run --data ../shared/data/images -o runs/ablations      # trains + evaluates
    python tools/ablations.py report -o runs/ablations                                 # tables + docs/ablations.png

Every arm is ``wetok train configs/train/cpu-ablation-tiny.yaml`` with only the keys the arm names changed (the
quantizer's groups / bits / entropy form, or stage 2 for the generative decoder), followed by
``wetok eval --protocol crop256`` on the validation folder. The run folder keeps each arm's training run and its
evaluation report; an arm whose report exists is skipped, so the command continues after an interruption.
``--steps`` and ``--precision`` apply to every arm alike (no tuning per arm).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "train" / "cpu-ablation-tiny.yaml"
WETOK = [sys.executable, "-c", "from wetok.cli.main import main; main()"]

# name -> (what the arm is, recipe overrides). The d = 16, g = 4, grouped-entropy arm is shared by three studies.
ARMS: dict[str, tuple[str, list[str]]] = {
    "lfq-g1": ("LFQ: g = 1 x 16 bits", ["model.overrides.groups=1", "model.overrides.bits_per_group=16"]),
    "gq-g2": ("GQ: g = 2 x 8 bits", ["model.overrides.groups=2", "model.overrides.bits_per_group=8"]),
    "gq-g4": ("GQ: g = 4 x 4 bits", []),
    "gq-g8": ("GQ: g = 8 x 2 bits", ["model.overrides.groups=8", "model.overrides.bits_per_group=2"]),
    "bsq-g16": ("per-bit (BSQ-like): g = 16 x 1 bit",
                ["model.overrides.groups=16", "model.overrides.bits_per_group=1"]),
    "pooled-g4": ("g = 4, pooled entropy (official code)", ["model.overrides.codebook_form=pooled"]),
    "joint-g4": ("g = 4, joint entropy (exact LFQ over 2^16 codes)", ["model.overrides.codebook_form=joint"]),
    "d32-g4": ("d = 32: g = 4 x 8 bits", ["model.overrides.z_channels=32", "model.overrides.bits_per_group=8"]),
    "d64-g4": ("d = 64: g = 4 x 16 bits", ["model.overrides.z_channels=64", "model.overrides.bits_per_group=16"]),
    "f16-stage1": ("f = 16, stage 1 (deterministic decoder)", ["model.preset=tiny-f16"]),
    "f16-stage2": ("f = 16, stage 2 (generative decoder)", ["model.preset=tiny-f16", "trainer.stage=2",
                                                            "loss.gan_start=0", "optim.lr=2e-4"]),
}

STUDIES: dict[str, list[str]] = {
    "Quantizers at d = 16 bits per token (grouped entropy)": ["lfq-g1", "gq-g2", "gq-g4", "gq-g8", "bsq-g16"],
    "Entropy forms at g = 4, d = 16": ["gq-g4", "pooled-g4", "joint-g4"],
    "Scaling d at g = 4": ["gq-g4", "d32-g4", "d64-g4"],
    "Generative decoder at f = 16": ["f16-stage1", "f16-stage2"],
}


def last_checkpoint(run: Path) -> Path:
    checkpoints = sorted((run / "checkpoints").glob("step-*.pt"))
    if not checkpoints:
        raise SystemExit(f"{run}: no checkpoint")
    return checkpoints[-1]


def run_arm(name: str, args: argparse.Namespace) -> None:
    out = Path(args.output)
    run, report = out / name, out / f"{name}.eval.json"
    if report.exists():
        print(f"{name}: done already", flush=True)
        return
    overrides = list(ARMS[name][1])
    if name == "f16-stage2":
        overrides.append(f"model.init={last_checkpoint(out / 'f16-stage1')}")
    data = Path(args.data)
    command = [*WETOK, "train", str(RECIPE), *overrides,
               f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"trainer.max_steps={args.steps}",
               f"trainer.precision={args.precision}", "-o", str(run)]
    if (run / "checkpoints").is_dir():
        command.append("--resume")
    start = time.time()
    with open(out / f"{name}.train.log", "a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.time() - start) / 60
    subprocess.run([*WETOK, "eval", str(data / "val"), "--model", str(last_checkpoint(run)),
                    "--protocol", "crop256", "--metrics", "psnr,ssim,usage,sharpness", "--seed", "0",
                    "--out", str(report)], check=True, stdout=subprocess.DEVNULL)
    info = json.loads(report.read_text())
    info["train_minutes"] = minutes
    report.write_text(json.dumps(info, indent=1))
    m = info["metrics"]
    print(f"{name}: {minutes:.1f} min, PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}", flush=True)


def read_curve(run: Path, column: str) -> list[tuple[int, float]]:
    points: dict[int, float] = {}
    for path in sorted(run.glob("logs/csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get(column):
                    points[int(row["step"])] = float(row[column])
    return sorted(points.items())


def arm_row(name: str, out: Path) -> str:
    info = json.loads((out / f"{name}.eval.json").read_text())
    m, usage = info["metrics"], info["metrics"]["usage"]
    groups = usage["per_group"]
    used = sum(g["utilization"] for g in groups) / len(groups)
    perplexity = sum(g["perplexity"] for g in groups) / len(groups)
    bits = sum(g["entropy_bits"] for g in groups)
    d = len(groups) * round(math.log2(usage["codebook_size"]))
    curve = read_curve(out / name, "val/psnr")
    return (f"| {ARMS[name][0]} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['sharpness']:.3f} | "
            f"{100 * used:.1f}% | {perplexity:.1f} of {usage['codebook_size']} | {bits:.2f} of {d} | "
            f"{curve[-1][1] if curve else float('nan'):.2f} | {info.get('train_minutes', float('nan')):.1f} |")


def report(args: argparse.Namespace) -> None:
    out = Path(args.output)
    lines = []
    for title, names in STUDIES.items():
        names = [n for n in names if (out / f"{n}.eval.json").exists()]
        if not names:
            continue
        lines += [f"#### {title}", "",
                  "| arm | PSNR (dB) | SSIM | sharpness | codebook usage (mean per group) | perplexity (mean per group)"
                  " | token entropy bound (sum over groups, bits) | val PSNR at the last step (128 px) | train minutes |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [arm_row(n, out) for n in names] + [""]
    text = "\n".join(lines)
    print(text)
    (out / "tables.md").write_text(text)
    plot(out, Path(args.figure))


def plot(out: Path, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = [(t, [n for n in names if (out / n).is_dir()]) for t, names in STUDIES.items()]
    studies = [(t, names) for t, names in studies if names]
    fig, axes = plt.subplots(1, len(studies), figsize=(4.2 * len(studies), 3.4), squeeze=False)
    for ax, (title, names) in zip(axes[0], studies, strict=True):
        for name in names:
            curve = read_curve(out / name, "val/psnr")
            if curve:
                ax.plot(*zip(*curve, strict=True), marker="o", markersize=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("val PSNR (dB, 20 images, 128 px)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    print(f"wrote {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate the arms (skips finished ones)")
    run.add_argument("--data", required=True, help="folder with train/ and val/ image folders")
    run.add_argument("--steps", type=int, default=2000)
    run.add_argument("--precision", default="bf16-mixed", help="trainer.precision for every arm (32 on CPUs "
                     "without native bf16)")
    run.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset, in order")
    run.add_argument("-o", "--output", required=True)
    rep = sub.add_parser("report", help="tables (stdout and OUTPUT/tables.md) and the curves figure")
    rep.add_argument("-o", "--output", required=True)
    rep.add_argument("--figure", default=str(ROOT / "docs" / "ablations.png"))
    args = parser.parse_args()
    if args.command == "run":
        Path(args.output).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        for name in args.arms.split(","):
            if name not in ARMS:
                raise SystemExit(f"unknown arm {name!r}; arms: {', '.join(ARMS)}")
            run_arm(name, args)
    else:
        report(args)


if __name__ == "__main__":
    main()
