"""``wetok convert``: an official Lightning checkpoint + YAML -> the native format."""

from __future__ import annotations

import argparse

from ..errors import printable
from ..official import load_official_with_report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an official WeTok .ckpt (+ its YAML config) to config.json + model.safetensors",
        description="Convert an official WeTok Lightning checkpoint to the native format. Uses the EMA weights "
        "(what the official evaluation uses) unless --raw is given.",
    )
    p.add_argument("ckpt", help="official .ckpt file")
    p.add_argument("--config", required=True, help="the official YAML config, or a preset name")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, report = load_official_with_report(args.ckpt, args.config, ema=not args.raw)
    model.save_pretrained(args.output)
    print(printable(f"{args.ckpt} -> {args.output}: {report.summary()}"))
    return 0
