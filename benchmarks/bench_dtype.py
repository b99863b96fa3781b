"""Encode and decode in float32 vs bfloat16 (wetok.fast): what the ``dtype="auto"`` policy trades, on this machine.

Model: a preset with random weights (seed 0) or ``--checkpoint`` (a native model folder, e.g. the bundled trained
``src/wetok/weights/default``); input: ``--batch`` real photos (BSDS val, centre crop, bicubic resize to ``--size``).
Four timed calls, each on its own ``optimize``d copy, interleaved (ABCD...) after one warm-up each: the fast float32
encode and the bfloat16 encode of the images, the fast float32 decode and the bfloat16 decode of the float32
encode's tokens. Accuracy: PSNR (dB, images clamped to [-1, 1], peak-to-peak 2) of the bf16 decode against the
float32 decode of the same tokens, and the share of token indices a bf16 encode changes (why "auto" encodes in
float32). Speed: float32 time / bf16 time per stage (median wall and median process CPU time).

Run: python benchmarks/bench_dtype.py --checkpoint src/wetok/weights/default --size 256 --batch 1 --reps 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import load_base  # noqa: E402
from common import DEFAULT_IMAGES, interleaved, load_images, psnr, summary  # noqa: E402

from wetok._cpu import cpu_description  # noqa: E402
from wetok.fast import auto_dtypes, inference, optimize  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="ImageNet_downsample16")
    p.add_argument("--checkpoint", default=None, help="a native model folder instead of the random-weight preset")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--images", default=DEFAULT_IMAGES)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_description())
    encode_dtype, decode_dtype = auto_dtypes("cpu")
    print(f"dtype='auto' here: encode {encode_dtype}, decode {decode_dtype}")
    x = load_images(args.images, args.batch, args.size)
    base = load_base(args.preset, args.checkpoint)
    print(f"{args.checkpoint or args.preset}, batch {args.batch} at {args.size}x{args.size}, {args.reps} rounds")
    f32 = optimize(copy.deepcopy(base), dtype="float32")
    bf16 = optimize(copy.deepcopy(base), dtype="bfloat16")
    with inference():
        tokens = f32.encode(x)
        ref = f32.decode(tokens.indices)
        decoded = bf16.decode(tokens.indices)
        bf16_tokens = bf16.encode(x)
    runs = {
        "encode float32": lambda: f32.encode(x),
        "encode bfloat16": lambda: bf16.encode(x),
        "decode float32": lambda: f32.decode(tokens.indices),
        "decode bfloat16": lambda: bf16.decode(tokens.indices),
    }
    with inference():
        wall, cpu = interleaved(runs, args.reps)
    result = {"machine": cpu_description(), "decode_psnr_db": psnr(decoded, ref),
              "token_agreement_bf16_encode": (bf16_tokens.indices == tokens.indices).float().mean().item()}
    for stage in ("encode", "decode"):
        w = summary({k: v for k, v in wall.items() if k.startswith(stage)}, f"{stage} float32")
        c = summary({k: v for k, v in cpu.items() if k.startswith(stage)}, f"{stage} float32")
        for name in w:
            print(f"{name:<16} {w[name]['median_s']:8.3f} s wall {c[name]['median_s']:8.3f} s CPU  "
                  f"x {w[name]['ratio_median']:.2f} wall, x {c[name]['ratio_median']:.2f} CPU")
        result[f"{stage}_speedup_wall"] = w[f"{stage} bfloat16"]["ratio_median"]
        result[f"{stage}_speedup_cpu"] = c[f"{stage} bfloat16"]["ratio_median"]
    print(f"bf16 decode vs float32 decode of the same tokens: {result['decode_psnr_db']:.1f} dB; "
          f"a bf16 encode keeps {result['token_agreement_bf16_encode']:.2%} of the float32 tokens")
    return result


if __name__ == "__main__":
    main()
