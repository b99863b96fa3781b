"""``wetok export-onnx MODEL -o DIR``: the encoder and decoder as ONNX graphs (or torch.export programs) with
dynamic batch, height and width, plus a ``metadata.json``; the library is :mod:`wetok.onnx_export`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..onnx_export import DEFAULT_OPSET, FORMATS, MIN_LATENT_SIZE, MIN_OPSET

    p = subparsers.add_parser(
        "export-onnx",
        help="write the encoder and decoder as ONNX graphs (or torch.export programs) for other runtimes",
        description="Write MODEL's encoder (images float32 (batch, 3, H, W) in [-1, 1] -> indices int64 (batch, "
        "H/f, W/f, groups) and the latent before quantization) and decoder (indices, plus noise (batch, d, H/f, "
        "W/f) for a generative decoder -> images float32, not clamped) into the new folder DIR, with a "
        "metadata.json describing inputs, outputs, f, groups, bits, the weights identity and the opset. Batch, H "
        f"and W are dynamic; H and W must be multiples of f, at least {MIN_LATENT_SIZE}*f. --format onnx needs "
        "the optional packages onnx and onnxscript (pip install 'wetok[onnx]').",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a registered name (e.g. default, the bundled model), native model folder, Hugging Face Hub id, "
                   "wetok train checkpoint (.pt) or run folder, or official .ckpt (with --config)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (must not exist, or be empty)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx: encoder.onnx + decoder.onnx (default); exported-program: encoder.pt2 + decoder.pt2 "
                   "(torch.export, load with torch.export.load)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset version, {MIN_OPSET} or higher (default {DEFAULT_OPSET})")
    p.add_argument("--config", default=None, help="the official YAML config (or a preset name) of a .ckpt MODEL")
    p.add_argument("--random-init", action="store_true",
                   help="MODEL's configuration with random weights (seeded) instead of its trained weights")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes or summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..onnx_export import MIN_OPSET, export_graphs, require_onnx
    from . import common
    from .models import load_model, random_init_note

    out = Path(args.output)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(out, "exists and is not an empty folder")
    if args.format == "onnx":
        if args.opset < MIN_OPSET:
            raise InputError("--opset", f"must be {MIN_OPSET} or higher (the lowest PyTorch's exporter writes)")
        try:
            require_onnx()
        except ImportError as err:
            raise InputError("--format onnx", str(err)) from None
    model = load_model(args.model, args.config, random_init=args.random_init, progress=not args.quiet)
    if args.random_init:
        common.note(args, random_init_note(args.model))
    paths = export_graphs(model, out, format=args.format, opset=args.opset)
    if not args.quiet:
        for path in paths.values():
            print(f"wrote {path}")
    return 0
