"""``wetok export CHECKPOINT -o DIR``: the EMA weights of a training checkpoint in the native format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the EMA weights of a training checkpoint as a native model folder",
        description="Write config.json + model.safetensors (the EMA weights, or --raw for the live weights) of a "
        "`wetok train` checkpoint into DIR, loadable with WeTok.from_pretrained / --model DIR.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoints/step-*.pt file, or a run folder (its last)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output model folder")
    p.add_argument("--raw", action="store_true", help="export the live (non-EMA) weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoints import export

    out = export(args.checkpoint, args.output, ema=not args.raw)
    print(f"wrote {out}")
    return 0
