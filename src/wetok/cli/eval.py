"""``wetok eval``: reconstruction metrics of a model on a folder of images (spec §6 protocols)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from .._files import atomic_write
from ..errors import InputError, printable
from . import common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure PSNR, SSIM, LPIPS, rFID and codebook usage on a folder of images",
        description="Encode and decode every image of DATA (any folder, ImageNet val/<wnid>/*.JPEG, COCO val2017) "
        "and report reconstruction metrics: a JSON report (--out) and a Markdown table on stdout. Means are "
        "sums over images divided by their count, so batch size and process count (torchrun) do not change them. "
        "Images that cannot be read are listed in the report and on stderr, one line each, and make the exit "
        "code 2 (unless --skip-bad); the report is still written.",
    )
    p.add_argument("data", metavar="DATA", help="image folder (searched recursively) or one image")
    p.add_argument("--out", required=True, help="JSON report path (written atomically)")
    p.add_argument(
        "--protocol",
        choices=("crop256", "original"),
        default="crop256",
        help="crop256: short side to 256 + center crop (the paper's tables); original: full size, padded "
        "to a multiple of the model's f and cropped back (default crop256)",
    )
    p.add_argument(
        "--metrics",
        default="psnr,ssim,lpips,fid,usage",
        help="comma-separated: psnr, ssim, lpips (= lpips_alex + lpips_vgg), lpips_alex, lpips_vgg, fid, "
        "usage, sharpness (Laplacian-variance ratio, reconstruction / original) (default: all but sharpness)",
    )
    p.add_argument("--batch-size", type=common.int_range(1, 65536), default=16,
                   help="images per batch (crop256; original uses 1)")
    p.add_argument(
        "--limit", type=common.positive_int, default=None, metavar="N", help="only the first N images (sorted order)"
    )
    common.add_seed_option(p)
    p.add_argument("--skip-bad", action="store_true",
                   help="exit 0 even if some images could not be read (they are still listed in the report and "
                   "on stderr); by default any unreadable image makes the exit code 2")
    p.add_argument(
        "--official-compat",
        action="store_true",
        help="truncate to uint8 for PSNR/SSIM as the official code does (default: round)",
    )
    p.add_argument(
        "--pad-mode",
        choices=("replicate", "reflect", "constant"),
        default="replicate",
        help="padding of the original protocol (constant = the official zero, mid-grey)",
    )
    p.add_argument("--num-workers", type=common.int_range(0, 1024), default=0,
                   help="DataLoader worker processes (default 0)")
    common.add_max_pixels_option(p)
    common.add_inception_option(p)
    p.add_argument(
        "--save-stats", default=None, metavar="NPZ", help="write the originals' Inception mu/sigma/n"
    )
    p.add_argument(
        "--ref-stats",
        default=None,
        metavar="NPZ",
        help="also report fid_ref: reconstructions vs these statistics (ours or pytorch-fid's .npz)",
    )
    common.add_model_options(p)
    common.add_run_options(p, tile=False)
    p.set_defaults(func=run)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(report: dict[str, Any]) -> str:
    """The report's headline numbers as a two-column Markdown table."""
    m, s = report["metrics"], report["settings"]
    rows = [("images", m["n_images"]), ("bad files", report["data"]["n_bad"]), ("protocol", s["protocol"])]
    labels = [
        ("psnr", "PSNR (dB)"),
        ("ssim", "SSIM"),
        ("lpips_alex", "LPIPS alex"),
        ("lpips_vgg", "LPIPS vgg"),
        ("rfid", "rFID"),
        ("sharpness", "sharpness (Laplacian variance, rec / orig)"),
        ("fid_ref", "FID vs ref stats"),
        ("bits_per_pixel", "bits per pixel"),
        ("compression_ratio", "compression ratio"),
    ]
    rows += [(label, m[key]) for key, label in labels if key in m]
    if "psnr_inf" in m and m["psnr_inf"]:
        rows.append(("identical images (PSNR inf, not averaged)", m["psnr_inf"]))
    if "usage" in m:
        u = m["usage"]
        rows.append(("codebook usage, pooled over groups", f"{u['pooled']['utilization']:.4f}"))
        rows.append(
            ("codebook perplexity, pooled", f"{u['pooled']['perplexity']:.2f} of {u['codebook_size']}")
        )
        rows.append(("usage per group", ", ".join(f"{g['utilization']:.3f}" for g in u["per_group"])))
        rows.append(("bits that never flip", ", ".join(u["stuck_bits"]) or "none"))
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows]
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """NaN / infinity -> null, so the report is strict JSON (``psnr_inf`` counts infinite PSNRs)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json_atomic(report: dict[str, Any], path: Path) -> None:
    """Write through a temporary file in the same folder, renamed into place (no half-written report)."""
    text = json.dumps(_finite(report), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate
    from ..metrics import parse_metrics

    out = Path(args.out)
    if out.is_dir():
        raise InputError(out, "is a folder; --out names the JSON report file")
    common.apply_max_pixels(args)
    logging.getLogger("wetok.data").setLevel(logging.ERROR)  # bad images: one line each at the end, below
    names = parse_metrics(args.metrics)
    if (args.save_stats or args.ref_stats) and "fid" not in names:
        raise InputError("--save-stats/--ref-stats", "need the fid metric in --metrics")
    distributed = common.init_distributed(args)
    model, spec = common.load_model_from_args(args)
    report = evaluate(
        model,
        args.data,
        protocol=args.protocol,
        metrics=names,
        batch_size=args.batch_size,
        limit=args.limit,
        seed=args.seed,
        device=model.decoder.conv_in.weight.device,
        num_workers=args.num_workers,
        official_compat=args.official_compat,
        pad_mode=args.pad_mode,
        inception_weights=args.inception_weights,
        ref_stats=args.ref_stats,
        save_stats=args.save_stats,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    report["model"]["spec"] = spec
    bad = report["data"]["bad_files"]
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        write_json_atomic(report, out)
        for entry in bad:
            print(f"wetok eval: error: {printable(entry['path'])}: {printable(entry['reason'])}", file=sys.stderr)
        if bad and not args.quiet:
            print(f"wetok eval: {len(bad)} of {report['data']['n_files']} inputs failed"
                  + (" (--skip-bad)" if args.skip_bad else f"; the report {out} lists them"), file=sys.stderr)
        if not args.quiet:
            print(markdown_table(report))
    if distributed:
        torch.distributed.destroy_process_group()
    return 2 if bad and not args.skip_bad else 0


