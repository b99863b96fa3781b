"""``wetok decode``: token files -> images."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import common

if TYPE_CHECKING:
    from PIL import Image

    from ..model import WeTok
    from ..token_format import TokenFile


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode",
        help="decode token files to images",
        description="Decode token files (.json or .wtok; files, folders, glob patterns) to images at their "
        "original size. The files must come from --model (same architecture and, where the file records it, the "
        "same encoder weights; a stage-2 model decodes its stage-1 model's tokens); JSON files "
        "written by the public fork's generate_wetok.py are read with --model's geometry. A file is checked "
        "whole before any image of it is written; a file of many images is decoded a few at a time.",
    )
    p.add_argument("inputs", nargs="+", metavar="TOKENS", help="token files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True,
                   help="output image (one input, e.g. out.png) or folder (<name>.png inside)")
    common.add_seed_option(p, help="seed of the generative decoder's noise (ignored by deterministic decoders)")
    common.add_max_pixels_option(p)
    common.add_model_options(p)
    common.add_run_options(p)
    p.set_defaults(func=run)


def decode_file(model: WeTok, tokens: TokenFile, *, tile: int | None = None, seed: int = 0,
                chunk_pixels: int | None = None) -> Iterator[Image.Image]:
    """The images of a checked token file (:func:`wetok.token_format.open_tokens`), decoded a slice of its batch at
    a time (images of ``chunk_pixels`` pixels in all, default one automatic tile, :data:`wetok.pipeline.AUTO_TILE`
    squared; at least one image): the images of :func:`wetok.pipeline.decode` of the whole file (up to float
    rounding that depends on the batch size), in the memory of a slice."""
    import torch

    from ..pipeline import AUTO_TILE, finish_image, tile_tokens
    from ..tiling import NoiseStream, decode_tiled

    f = model.downsample_factor
    height, width = tokens.header.image_size
    per_chunk = max(1, (chunk_pixels or AUTO_TILE * AUTO_TILE) // (height * width))
    tile_size = tile_tokens(tile, height, width, f) or max(height // f, width // f, 2)
    noise = None
    if model.config.generative_decoder:  # drawn as pipeline.decode draws it for the whole batch, a slice at a time
        shape = (tokens.batch, model.config.z_channels, height // f, width // f)
        noise = NoiseStream(shape, torch.Generator().manual_seed(seed))
    for record in tokens.chunks(per_chunk):
        count = record.indices.shape[0]
        with torch.inference_mode():
            pixels = decode_tiled(model, record.indices, tile=tile_size,
                                  noise=None if noise is None else noise.take(count))
        for b in range(count):
            yield finish_image(pixels[b : b + 1], record.padding, record.original_size)


def run(args: argparse.Namespace) -> int:
    from ..token_format import open_tokens

    items, errors = common.expand_inputs(args.inputs, "tokens")
    out = Path(args.output)
    common.check_output(out, len(items), common.IMAGE_OUTPUT_SUFFIXES)
    model, _ = common.load_model_from_args(args)

    def work(item: common.Item) -> None:
        tokens = open_tokens(item.path, model, max_pixels=args.max_pixels or None)  # checked whole, not expanded
        batch = tokens.batch

        def target(i: int) -> Path:
            name = item if batch == 1 else common.Item(item.path, f"{item.name}_{i}")
            return common.output_path(out, name, len(items) * batch, ".png", common.IMAGE_OUTPUT_SUFFIXES)

        target(0)  # a bad -o fails before any work
        for i, image in enumerate(decode_file(model, tokens, tile=args.tile, seed=args.seed)):
            common.save_image(image, target(i))

    return common.run_batch(args, items, errors, work, unit="file")
