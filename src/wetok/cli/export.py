"""``wetok export CHECKPOINT -o DIR``: the EMA weights of a training checkpoint (tokenizer or generator) in the
native format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the EMA weights of a training checkpoint as a native model folder",
        description="Write config.json + model.safetensors (the EMA weights, or --raw for the live weights; the "
        "live ones when the run kept no EMA) of a `wetok train` checkpoint into DIR. A tokenizer run gives a "
        "folder for WeTok.from_pretrained / --model DIR; a generator run one for WeTokAR.from_pretrained, with "
        "its tokenizer in DIR/tokenizer when the run knew it.",
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
