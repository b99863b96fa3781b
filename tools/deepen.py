"""Deepen a trained tokenizer without changing what it computes, to warm-start a larger model from a smaller one.

    python tools/deepen.py src/wetok/weights/default runs/deep-init --num-res-blocks 2
    wetok train configs/train/cpu-small.yaml model.init=runs/deep-init ... -o runs/deep

The new model has ``--num-res-blocks`` residual blocks per level (and in the middle) where the source has fewer.
The source's blocks keep their weights and positions (block i stays block i); every added block is a residual
block whose last convolution is zero, so it is the identity at first and the deepened model reconstructs exactly
like the source (checked on random input before anything is written; its layers have no biases). The added
blocks' other weights keep PyTorch's initialisation (seed ``--seed``), so they learn as soon as training moves the
zero convolution. This is the identity-initialised growth of Net2DeeperNet (Chen et al., 2016) for residual blocks;
no maintained library does it for this architecture, hence the 40 lines here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from wetok import WeTok
from wetok.cli.models import load_model
from wetok.errors import WetokError, describe_error, printable


def deepen(source: WeTok, num_res_blocks: int, seed: int = 0) -> WeTok:
    """``source`` with ``num_res_blocks`` blocks per level; the added blocks are identities (see the module)."""
    cfg = source.config
    if num_res_blocks <= cfg.num_res_blocks:
        raise ValueError(f"--num-res-blocks must exceed the source's {cfg.num_res_blocks}, got {num_res_blocks}")
    torch.manual_seed(seed)
    name = f"{cfg.name}-r{num_res_blocks}" if cfg.name else None
    model = WeTok(cfg.replace(num_res_blocks=num_res_blocks, name=name))
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"source weights with no place in the deepened model: {unexpected[:3]}")
    added = {key.rsplit(".", 2)[0] for key in missing}
    if any(".block." not in key and ".mid_block." not in key for key in missing):
        raise ValueError(f"unexpected new weights: {sorted(missing)[:3]}")
    with torch.no_grad():
        for prefix in added:
            model.get_submodule(prefix).conv2.weight.zero_()
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 written; 2 bad input (one line on stderr, nothing written); 1 the check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a model folder, a training checkpoint or a registered name")
    parser.add_argument("output", type=Path, help="the folder to write (config.json + model.safetensors)")
    parser.add_argument("--num-res-blocks", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        print(f"error: {args.output}: exists and is not an empty folder", file=sys.stderr)
        return 2
    try:
        source = load_model(args.source)
        model = deepen(source, args.num_res_blocks, args.seed)
    except (WetokError, ValueError) as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 2
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        diff = (model(x).reconstruction - source(x).reconstruction).abs().max().item()
    if diff > 1e-5:
        print(f"error: the deepened model differs from the source by {diff:.2e}", file=sys.stderr)
        return 1
    model.save_pretrained(args.output)
    print(f"wrote {args.output}: {model.num_parameters()['total'] / 1e6:.2f}M parameters (source "
          f"{source.num_parameters()['total'] / 1e6:.2f}M), max |reconstruction difference| {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
