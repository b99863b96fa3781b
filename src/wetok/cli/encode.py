"""``wetok encode``: images -> token files (the fork-compatible JSON or the compact ``.wtok``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tokens import FORMATS
from . import common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode",
        help="encode images to token files",
        description="Encode images (files, folders, glob patterns) to token files: JSON in the schema of the "
        "public WeTok fork's generate_wetok.py, or the compact bit-packed .wtok. Any size and mode; images are "
        "padded to a multiple of the model's downsampling factor and the padding is recorded.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True,
                   help="output file (one input, ending in .json or .wtok) or folder (<name>.<format> inside; inputs "
                   "that would share a name keep their ending: a.png, a.jpg -> a.png.json, a.jpg.json)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="token file format (default: from the -o suffix, else json)")
    common.add_image_options(p)
    common.add_model_options(p)
    common.add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..pipeline import encode
    from ..tokens import save_tokens

    common.apply_max_pixels(args)
    items, errors = common.expand_inputs(args.inputs, "image")
    out = Path(args.output)
    fmt = args.format or (out.suffix.lower().lstrip(".") if out.suffix.lower() in common.TOKEN_SUFFIXES else "json")
    common.check_output(out, len(items), common.TOKEN_SUFFIXES)
    model, spec = common.load_model_from_args(args)
    official = spec.endswith(".ckpt")

    def work(item: common.Item) -> None:
        target = common.output_path(out, item, len(items), f".{fmt}", common.TOKEN_SUFFIXES)
        (record,) = encode(model, item.path, size=args.size, tile=args.tile, pad_mode=args.pad_mode,
                           progress=common.show_progress(args))
        record = replace(record, model=spec, config=args.config if official else None,
                         ckpt=spec if official else None)
        save_tokens(target, record, fmt)

    return common.run_batch(args, items, errors, work)
