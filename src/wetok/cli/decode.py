"""``wetok decode``: token files -> images."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode",
        help="decode token files to images",
        description="Decode token files (.json or .wtok; files, folders, glob patterns) to images at their "
        "original size. The files must come from --model (same architecture and, where the file records it, the "
        "same encoder weights; a stage-2 model decodes its stage-1 model's tokens); JSON files "
        "written by the public fork's generate_wetok.py are read with --model's geometry.",
    )
    p.add_argument("inputs", nargs="+", metavar="TOKENS", help="token files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True,
                   help="output image (one input, e.g. out.png) or folder (<name>.png inside)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the generative decoder's noise (default 0; ignored by deterministic decoders)")
    common.add_model_options(p)
    common.add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import decode
    from ..tokens import load_tokens

    items, errors = common.expand_inputs(args.inputs, "tokens")
    out = Path(args.output)
    common.check_output(out, len(items), common.IMAGE_OUTPUT_SUFFIXES)
    model, _ = common.load_model_from_args(args)

    def work(item: common.Item) -> None:
        record = load_tokens(item.path, model)
        batch = record.indices.shape[0]
        targets = []
        for i in range(batch):
            name = item if batch == 1 else common.Item(item.path, f"{item.name}_{i}")
            targets.append(common.output_path(out, name, len(items) * batch, ".png", common.IMAGE_OUTPUT_SUFFIXES))
        images = decode(model, record, tile=args.tile, seed=args.seed, progress=common.show_progress(args))
        for image, target in zip(images, targets, strict=True):
            common.save_image(image, target)

    return common.run_batch(args, items, errors, work, unit="file")
