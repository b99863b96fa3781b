"""``wetok info``: what a model is: configuration, parameters, compression ratio, bits and tokens per image."""

from __future__ import annotations

import argparse
import json

import torch

from ..model import WeTok
from ..presets import get_config, is_preset
from . import common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a model: configuration, parameters, compression ratio, tokens per image",
        description="Describe a model (a preset name, a native model folder, a Hub id, an official .ckpt with "
        "--config). Presets are described without allocating their weights.",
    )
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (same forms as --model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_model_options(p, speed=False)
    common.add_run_options(p, tile=False)
    p.set_defaults(func=run)


def _model(args: argparse.Namespace) -> tuple[WeTok, str]:
    if args.model_arg is not None:
        args.model = args.model_arg
    spec = common.model_spec(args)
    if is_preset(spec):  # no weights to read: build on the meta device, which allocates nothing
        with torch.device("meta"):
            return WeTok(get_config(spec)), spec
    return common.load_model_from_args(args)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import describe

    model, spec = _model(args)
    info = {"model": spec, **describe(model)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    params = info["parameters"]
    f = info["downsample_factor"]
    lines = [
        f"model                 {spec}" + (f" ({info['name']})" if info.get("name") not in (None, spec) else ""),
        f"model id              {info['model_id']}",
        f"architecture          channels {cfg['channels']}, ch_mult {tuple(cfg['ch_mult'])}, "
        f"{cfg['num_res_blocks']} res blocks, z_channels {cfg['z_channels']}",
        f"decoder               {'generative (noise input)' if cfg['generative_decoder'] else 'deterministic'}",
        f"parameters            {params['total']:,} (encoder {params['encoder']:,}, decoder {params['decoder']:,})",
        f"downsampling f        {f} ({256 // f}x{256 // f} token positions for 256x256)",
        f"groups x bits         {cfg['groups']} x {cfg['bits_per_group']} "
        f"(implicit codebook 2^{cfg['bits_per_group']} per group)",
        f"bits per token        {info['bits_per_token']} per position ({info['bits_per_pixel']:.4g} per pixel)",
        f"tokens per 256x256    {info['tokens_per_256px_image']} group indices",
        f"compression at 256    {info['compression_ratio_256px']:.4g}x (24-bit RGB bits / token bits)",
    ]
    print("\n".join(lines))
    return 0
