"""``wetok reconstruct``: images -> tokens -> images, with PSNR and optional comparison grids."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from . import common

GAP = 4  # white pixels between the panels of a grid


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reconstruct",
        help="encode and decode images; write the reconstructions (and comparison grids)",
        description="Encode and decode images (files, folders, glob patterns) and write the reconstructions as "
        "PNG into a folder, printing the PSNR of each (uint8, against the original). --grid also writes "
        "<name>_grid.png: original | reconstruction | mean absolute error over channels (colour scale 0 "
        "to 64 grey levels, brighter = larger).",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--grid", action="store_true", help="also write original | reconstruction | error grids")
    common.add_seed_option(p)
    common.add_image_options(p)
    common.add_model_options(p)
    common.add_run_options(p)
    p.set_defaults(func=run)


def grid(original: Image.Image, reconstruction: Image.Image) -> Image.Image:
    """original | reconstruction | absolute error, side by side with white gaps."""
    panels = [original, reconstruction, common.abs_error_map(original, reconstruction)]
    width, height = original.width, original.height
    canvas = Image.new("RGB", (3 * width + 2 * GAP, height), (255, 255, 255))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * (width + GAP), 0))
    return canvas


def run(args: argparse.Namespace) -> int:
    from ..data import load_rgb
    from ..errors import printable
    from ..metrics import psnr_uint8
    from ..pipeline import reconstruct

    common.apply_max_pixels(args)
    items, errors = common.expand_inputs(args.inputs, "image", ("", "_grid") if args.grid else ("",))
    out = Path(args.output)
    if out.is_file():
        errors.insert(0, f"{out}: is a file; reconstruct writes into a folder")
        items = []
    model, _ = common.load_model_from_args(args)
    scores: list[float] = []

    def work(item: common.Item) -> None:
        original = load_rgb(item.path)
        (reconstruction,) = reconstruct(model, original, size=args.size, tile=args.tile, pad_mode=args.pad_mode,
                                        seed=args.seed, progress=common.show_progress(args))
        common.save_image(reconstruction, out / f"{item.name}.png")
        if args.grid:
            common.save_image(grid(original, reconstruction), out / f"{item.name}_grid.png")
        psnr = psnr_uint8(np.asarray(original), np.asarray(reconstruction))
        scores.append(psnr)
        if not args.quiet:
            print(f"{printable(item.path)}\tPSNR {psnr:.2f} dB", file=sys.stdout)

    code = common.run_batch(args, items, errors, work)
    if len(scores) > 1 and not args.quiet:
        print(f"mean PSNR {np.mean(scores):.2f} dB over {len(scores)} images")
    return code
