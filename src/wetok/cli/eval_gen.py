"""``wetok eval-gen``: FID, Inception Score and precision / recall of generated samples against a reference."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from ..errors import InputError
from . import common
from .eval import _fmt, write_json_atomic

#: Largest --batch-size (Inception batches), --crop (pixels) and --num-workers.
MAX_BATCH = 1024
MAX_CROP = 4096
MAX_WORKERS = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-gen",
        help="measure generated samples: FID, Inception Score, precision / recall",
        description="Compare SAMPLES with REF in pytorch-fid's Inception features (as the tokenizer's rFID) and "
        "report FID, Inception Score (ADM's definition: unbiased logits, splits of 5000) and precision / recall "
        "(k = 3): a Markdown table on stdout and, with --out, a JSON report. Features are gathered in image "
        "order, so batch size and process count (torchrun) do not change the numbers (up to float32 rounding "
        "inside the network). A statistics-only REF "
        "(mu / sigma) gives FID and IS, not precision / recall.",
    )
    p.add_argument(
        "samples", metavar="SAMPLES", help="folder of images, or .npz with arr_0 uint8 (N, H, W, 3)"
    )
    p.add_argument(
        "--ref",
        required=True,
        metavar="REF",
        help="folder of images, .npz with arr_0 images, or .npz with mu / sigma statistics (or both, as the ADM "
        "reference batches VIRTUAL_imagenet256_labeled.npz)",
    )
    p.add_argument("--out", default=None, help="JSON report path (written atomically)")
    p.add_argument("--metrics", default="fid,is,pr", help="comma-separated: fid, is, pr (default: all)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default 50)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for folders (default 0)")
    p.add_argument(
        "--crop",
        type=int,
        default=None,
        metavar="S",
        help="resize the short side of folder images to S and center-crop S x S (default: as stored; "
        ".npz arrays are never changed)",
    )
    p.add_argument(
        "--is-split-size",
        type=int,
        default=5000,
        metavar="N",
        help="Inception Score: samples per split, in order; the mean over splits is reported (default 5000, ADM)",
    )
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision / recall (default 3)")
    common.add_inception_option(p)
    common.add_device_option(p)
    common.add_run_options(p, tile=False)
    p.set_defaults(func=run)


def markdown_table(report: dict[str, Any]) -> str:
    """The report's numbers as a two-column Markdown table."""
    m = report["metrics"]
    labels = [
        ("n_samples", "samples"),
        ("n_ref_images", "reference images"),
        ("fid", "FID"),
        ("fid_stored_stats", "FID vs the reference's stored mu / sigma"),
        ("inception_score", "Inception Score"),
        ("inception_score_std", "Inception Score std over splits"),
        ("inception_score_splits", "Inception Score splits"),
        ("precision", "precision"),
        ("recall", "recall"),
    ]
    lines = ["| metric | value |", "|---|---|"]
    if report["settings"]["fid_reference"] == "stored mu / sigma":  # then fid is that same number
        labels = [row for row in labels if row[0] != "fid_stored_stats"]
    lines += [f"| {label} | {_fmt(m[key])} |" for key, label in labels if m.get(key) is not None]
    lines += [f"| note | {note} |" for note in report["settings"]["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..generation_metrics import evaluate_generation, parse_generation_metrics

    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise InputError(out, "is a folder; --out names the JSON report file")
    if out is not None:
        folder = out.absolute().parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(out, f"cannot write the report here ({folder} is not a writable folder)")
    for flag, value, top in (
        ("--batch-size", args.batch_size, MAX_BATCH),
        ("--is-split-size", args.is_split_size, None),
        ("--k", args.k, None),
        ("--crop", 1 if args.crop is None else args.crop, MAX_CROP),
    ):
        if value < 1 or (top is not None and value > top):
            raise InputError(flag, f"must be from 1 to {top or 'the number of images'}, got {value}")
    if not 0 <= args.num_workers <= MAX_WORKERS:
        raise InputError("--num-workers", f"must be from 0 to {MAX_WORKERS}, got {args.num_workers}")
    names = parse_generation_metrics(args.metrics)
    distributed = common.init_distributed(args)
    report = evaluate_generation(
        args.samples,
        args.ref,
        metrics=names,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        crop=args.crop,
        is_split_size=args.is_split_size,
        k=args.k,
        device=common.resolve_device(args.device),
        inception_weights=args.inception_weights,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        if out is not None:
            try:
                write_json_atomic(report, out)
            except OSError as err:
                raise InputError(out, f"cannot write the report ({err.strerror or err})") from None
        if not args.quiet:
            print(markdown_table(report))
    if distributed:
        torch.distributed.destroy_process_group()
    return 0
