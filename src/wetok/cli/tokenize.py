"""``wetok tokenize``: encode a class-labelled image set once into token shards for generator training."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch

from . import common

#: Most DataLoader processes decoding images.
MAX_WORKERS = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="encode a labelled image set into token shards (generator training data)",
        description="Encode every image of DATA (a folder per class, e.g. ImageNet train/<wnid>/*.JPEG, or a file "
        "list of path<TAB>label / path,label lines) with a tokenizer, deterministically: resize the short side "
        "to --size and take the centre crop, plus optional mirrored and ten-crop views, each recorded per sample. "
        "Writes safetensors shards, images.txt and index.json (last) into OUT. Under torchrun each process "
        "encodes every P-th shard. A rerun keeps finished shards and encodes the rest. Unreadable images are "
        "skipped, reported on stderr and listed in index.json.",
    )
    p.add_argument("data", metavar="DATA", help="class-folder tree or file list (.txt/.csv/.tsv/.lst)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--class-names", metavar="FILE", default=None,
                   help="for a file list: the class names, one per line (line i names label i, or fixes the "
                   "numbering of name labels); default: '0', '1', ... for integer labels, sorted names otherwise")
    p.add_argument("--size", type=int, default=256, help="crop size in pixels, a multiple of f (default 256)")
    p.add_argument("--flip", action="store_true", help="also encode the left-right mirrored centre crop")
    p.add_argument("--ten-crop", action="store_true",
                   help="also encode ten crops (corners + centre, and of the mirrored image) of the image resized "
                   "to --crop-scale x --size")
    p.add_argument("--crop-scale", type=float, default=1.1,
                   help="short side of the ten-crop resize relative to --size (default 1.1)")
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard, the unit of resuming "
                   "(default 5000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default 32)")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding images (default: 4, or the CPU count if smaller)")
    p.add_argument("--strict", action="store_true", help="stop with an error at the first unreadable image")
    common.add_model_options(p)
    common.add_run_options(p, tile=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._distributed import rank_and_world
    from ..errors import InputError
    from ..pretokenize import ViewSpec, list_labelled_images, tokenize_dataset

    if not 0 <= args.num_workers <= MAX_WORKERS:
        raise InputError("--num-workers", f"must be from 0 to {MAX_WORKERS}, got {args.num_workers}")
    spec = ViewSpec(size=args.size, flip=args.flip, ten_crop=args.ten_crop, crop_scale=args.crop_scale)
    # a long timeout: rank 0 waits at the end for the slowest rank's shards, not for a hung peer
    distributed = common.init_distributed(args, timeout=timedelta(hours=48))
    try:
        images = list_labelled_images(args.data, _read_names(args.class_names))
        model, name = common.load_model_from_args(args)
        rank, world = rank_and_world()

        def on_bad(path: str, reason: str) -> None:
            print(f"wetok tokenize: skipped {path}: {reason}", file=sys.stderr)

        index = tokenize_dataset(
            model, images, args.output, spec=spec, shard_size=args.shard_size, batch_size=args.batch_size,
            num_workers=args.num_workers, rank=rank, world_size=world, strict=args.strict, tokenizer_name=name,
            progress=common.show_progress(args), on_bad=on_bad,
            barrier=torch.distributed.barrier if world > 1 else None,
        )
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if index is None:
        return 0
    n_bad = len(index.bad_images)
    if index.num_samples == 0:
        raise InputError(args.data, f"none of the {index.num_images} images could be read")
    common.note(args, f"wetok tokenize: {index.num_images - n_bad} images, {index.num_samples} samples "
                      f"({len(index.views)} views) in {len(index.shards)} shards -> {args.output}"
                      + (f"; {n_bad} unreadable images skipped (listed in index.json)" if n_bad else ""))
    return 0


def _read_names(path: str | None) -> list[str] | None:
    from ..errors import InputError
    from ..pretokenize import MAX_CLASSES, read_lines

    if path is None:
        return None
    names = []
    for _, line in read_lines(path, "class-name file"):
        if line.strip():
            names.append(line.strip())
            if len(names) > MAX_CLASSES:
                raise InputError(path, f"more than {MAX_CLASSES} class names")
    if not names or len(set(names)) != len(names):
        raise InputError(path, "class names must be a non-empty list without repeats")
    return names
