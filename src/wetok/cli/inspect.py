"""``wetok inspect``: draw a token file's token map, one panel per group, and print its statistics."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError, printable
from . import common

if TYPE_CHECKING:
    from ..tokens import Tokens

MIN_PANEL = 256  # small token maps are upscaled (nearest) to at least this many pixels on their long side
GAP, LABEL = 6, 16  # pixels between panels, height of the label strip
MAX_CANVAS_PIXELS = 2**24  # default --max-pixels: a 16-megapixel drawing (48 MiB of RGB)
_ROWS_AT_ONCE = 2**20  # token positions coloured together (bounds colorize's float64 temporaries)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="draw the token map of a token file (one panel per group)",
        description="Draw a token file's map: each group's indices coloured on a black-purple-orange-yellow scale (dark = 0, "
        "bright = 2^bits - 1), panels side by side (one row per image of the batch), small maps upscaled with "
        "nearest neighbour. Prints the shape and, per group, the number of distinct indices and their entropy.",
    )
    p.add_argument("tokens", metavar="TOKENS", help="a .json or .wtok token file")
    p.add_argument("-o", "--output", required=True, help="output image, e.g. map.png")
    p.add_argument("--max-pixels", type=int, default=MAX_CANVAS_PIXELS, metavar="N",
                   help=f"refuse token files whose drawing would have more than N pixels (default {MAX_CANVAS_PIXELS}; "
                   "0 = no limit)")
    common.add_model_options(p, speed=False)
    common.add_run_options(p, tile=False)
    p.set_defaults(func=run)


def canvas_size(batch: int, h: int, w: int, groups: int) -> tuple[int, int]:
    """(width, height) of :func:`token_map`'s picture of ``batch`` maps of h x w tokens and ``groups`` groups."""
    scale = max(1, math.ceil(MIN_PANEL / max(h, w)))
    ph, pw = h * scale, w * scale
    return groups * pw + (groups - 1) * GAP, batch * (ph + LABEL) + (batch - 1) * GAP


def _colour_panel(indices: np.ndarray, top: int) -> np.ndarray:
    """(h, w) indices -> (h, w, 3) uint8 on :func:`common.colorize`'s ramp, dark = 0, bright = ``top``, coloured a
    block of rows at a time."""
    h, w = indices.shape
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    rows = max(1, _ROWS_AT_ONCE // max(w, 1))
    for r in range(0, h, rows):
        rgb[r : r + rows] = common.colorize(indices[r : r + rows] / max(top, 1))
    return rgb


def token_map(record: Tokens) -> Image.Image:
    """The picture: rows = images of the batch, columns = groups."""
    b, h, w, g = record.indices.shape
    scale = max(1, math.ceil(MIN_PANEL / max(h, w)))
    ph, pw = h * scale, w * scale
    canvas = Image.new("RGB", canvas_size(b, h, w, g), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = 2**record.bits_per_group - 1
    indices = record.indices.numpy()
    for i in range(b):
        y = i * (ph + LABEL + GAP)
        for k in range(g):
            x = k * (pw + GAP)
            panel = Image.fromarray(_colour_panel(indices[i, :, :, k], top)).resize((pw, ph), Image.Resampling.NEAREST)
            canvas.paste(panel, (x, y + LABEL))
            draw.text((x + 2, y + 2), f"group {k}" + (f", image {i}" if b > 1 else ""), fill=(0, 0, 0))
    return canvas


def group_stats(record: Tokens) -> list[tuple[int, float]]:
    """Per group: number of distinct indices and the empirical entropy of their histogram in bits."""
    stats = []
    for k in range(record.groups):
        _, counts = np.unique(record.indices[..., k].numpy(), return_counts=True)
        p = counts / counts.sum()
        stats.append((len(counts), float(-(p * np.log2(p)).sum())))
    return stats


def run(args: argparse.Namespace) -> int:
    from ..token_format import open_tokens

    if args.max_pixels < 0:
        raise InputError("--max-pixels", f"must be a number of pixels (0 = no limit), got {args.max_pixels}")
    path = Path(args.tokens)
    try:
        tokens = open_tokens(path, max_pixels=None)  # nothing is decoded: the drawing's size is what is bounded
    except InputError as err:
        if "needs a model" not in str(err):
            raise
        tokens = open_tokens(path, common.config_from_args(args), max_pixels=None)  # the fork's JSON
    _, h, w, g = tokens.header.indices.shape
    width, height = canvas_size(tokens.batch, h, w, g)
    if args.max_pixels and width * height > args.max_pixels:
        raise InputError(path, f"drawing its {tokens.batch} token map(s) of {h}x{w} tokens x {g} groups needs "
                               f"{width}x{height} pixels, over the limit of {args.max_pixels} (--max-pixels; "
                               "0 = no limit)")
    record = tokens.load()
    out = Path(args.output)
    common.save_image(token_map(record), out)
    if not args.quiet:
        b, h, w, g = record.indices.shape
        print(f"{printable(path)}: {b} image(s), {h}x{w} tokens x {g} groups of {record.bits_per_group} bits, "
              f"image {record.image_size[0]}x{record.image_size[1]}, model {printable(record.model_id or 'unrecorded')}",
              file=sys.stdout)
        for k, (used, entropy) in enumerate(group_stats(record)):
            print(f"  group {k}: {used} distinct of {2**record.bits_per_group}, entropy {entropy:.3f} bits")
        print(f"wrote {printable(out)}")
    return 0
