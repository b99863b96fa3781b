"""``wetok info``: the registered models, or what one model is: configuration, weights, parameters, compression
ratio, bits and tokens per image."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..config import WeTokConfig
from ..errors import printable
from ..model import WeTok
from ..registry import ModelEntry, find_model, list_models
from . import common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="list the registered models, or describe one: configuration, weights, parameters, tokens per image",
        description="Without MODEL: list the registered model names with their configuration, parameter count and "
        "weights (bundled: in the package; hub: downloaded on first use; none: configuration only, usable with "
        "--random-init). With MODEL (a registered name, a native model folder, a Hub id, an official .ckpt with "
        "--config): describe it. Registered names are described without loading or downloading their weights.",
    )
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model (same forms as --model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_model_options(p, speed=False)
    common.add_run_options(p, tile=False)
    p.set_defaults(func=run)


def _meta_model(config: Any) -> WeTok:
    """A model on the meta device: parameter counts without allocating weights."""
    with torch.device("meta"):
        return WeTok(config)


def _weights_kind(entry: ModelEntry) -> str:
    return entry.weights.source if entry.weights is not None else "none"


def registry_rows(family: str | None = None) -> list[dict[str, Any]]:
    """One JSON-able row per registered entry: name, family, parameters, weights kind and location."""
    rows = []
    for entry in list_models(family):
        params = None
        if isinstance(entry.config, WeTokConfig):
            params = _meta_model(entry.config).num_parameters()["total"]
        elif entry.build is not None:
            with torch.device("meta"):
                params = sum(p.numel() for p in entry.build(entry.config).parameters())
        cfg = entry.config
        rows.append({
            "name": entry.name,
            "family": entry.family,
            "parameters": params,
            "downsample_factor": getattr(cfg, "downsample_factor", None),
            "groups_x_bits": f"{cfg.groups}x{cfg.bits_per_group}" if hasattr(cfg, "bits_per_group") else None,
            "weights": _weights_kind(entry),
            "weights_location": entry.weights.describe() if entry.weights is not None else None,
            "description": entry.description,
        })
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = registry_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':28} {'family':10} {'params':>12} {'f':>3} {'g x bits':>8}  weights")
    for r in rows:
        params = f"{r['parameters']:,}" if r["parameters"] is not None else "?"
        weights = r["weights_location"] if r["weights"] == "hub" else r["weights"]
        print(f"{r['name']:28} {r['family']:10} {params:>12} {r['downsample_factor'] or '':>3} "
              f"{r['groups_x_bits'] or '':>8}  {weights}")
    print("\nA name loads its weights (--model NAME); names with weights 'none' need --random-init. "
          "`wetok info NAME` describes one.")
    return 0


def _model(args: argparse.Namespace) -> tuple[WeTok, str, str]:
    """The model to describe (on the meta device when its configuration is enough), its spec and weights kind."""
    spec = common.model_spec(args)
    entry = find_model(spec)
    if entry is not None and entry.family == "tokenizer":  # no weights to read
        random = getattr(args, "random_init", False)
        return _meta_model(entry.config), spec, "random (--random-init)" if random else _weights_kind(entry)
    model, spec = common.load_model_from_args(args)
    return model, spec, "random" if getattr(args, "random_init", False) else "loaded"


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import describe

    if args.model_arg is None and args.model is None:
        return _list(args)
    if args.model_arg is not None:
        args.model = args.model_arg
    entry = find_model(args.model)
    if entry is not None and entry.family == "generator":
        return _generator(args, entry)
    model, spec, weights = _model(args)
    info = {"model": spec, "weights": weights, **describe(model)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    params = info["parameters"]
    f = info["downsample_factor"]
    lines = [
        f"model                 {spec}" + (f" ({info['name']})" if info.get("name") not in (None, spec) else ""),
        f"weights               {weights}",
        f"model id              {info['model_id']}"
        + (f", weights id {info['weights_id']}" if info.get("weights_id") else ""),
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
    print("\n".join(printable(line) for line in lines))  # names come from the model's files
    return 0


def _generator(args: argparse.Namespace, entry: ModelEntry) -> int:
    """A registered generator, described from its configuration (nothing is loaded or downloaded)."""
    row = next(r for r in registry_rows("generator") if r["name"] == entry.name)
    cfg = entry.config.to_dict()
    info = {"model": entry.name, "family": "generator", "weights": row["weights"],
            "weights_location": row["weights_location"], "parameters": row["parameters"],
            "description": entry.description, "config": cfg}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = entry.config
    lines = [
        f"model                 {entry.name} (generator)",
        f"weights               {row['weights_location'] or row['weights']}",
        f"about                 {entry.description}",
        f"parameters            {row['parameters']:,}",
        f"classes               {c.num_classes} (+ the null class {c.num_classes} for guidance)",
        f"token grid            {c.grid_height} x {c.grid_width} positions x {c.groups} sub-tokens of "
        f"{c.bits_per_group} bits",
        f"transformer           dim {c.dim}, {c.n_head} heads, {c.spatial_layers} spatial + {c.intra_layers} "
        f"intra-position layers, FFN {c.ffn_hidden}",
    ]
    print("\n".join(lines))
    return 0
