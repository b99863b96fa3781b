"""Encode + decode speed: wetok's fast path against the plain official-style forward, in the same process.

Model: a preset with random weights (seed 0), or ``--checkpoint`` (trained weights); input: ``--batch`` real photos (BSDS val, centre crop, bicubic
resize to ``--size``). One timed call = ``model.encode(images)`` then ``model.decode(tokens)`` (or the plain
equivalent). Variants (``--variants``, comma-separated):

* ``plain``: the baseline, :mod:`plain` (eager, contiguous NCHW float32, separate out-of-place GroupNorm / SiLU /
  add, ``torch.no_grad``), the way the official code runs;
* ``fast``: ``wetok.fast.optimize(model, dtype="float32")`` under ``wetok.fast.inference()``: its defaults on
  the CPU, NNPACK Winograd or oneDNN for each wide 3x3 convolution, whichever a one-off measurement on this
  machine found faster (cached; the first call of each layer shape, in the warm-up, measures), channels_last for
  the others;
* ``fast-rules``: ``fast`` with ``WETOK_CONV_CHOICE=rules`` (the fixed Winograd thresholds tuned on one AMD
  Zen 5) instead of the per-machine measured choice ``fast`` makes;
* ``fast-cl``: float32 with channels_last and oneDNN's direct convolutions (``winograd=False``);
* ``fast-nchw``: float32, NCHW, direct convolutions: what in-place blocks + inference_mode alone give;
* ``bf16``: ``optimize(model, dtype="bfloat16")``: bfloat16 encoder and decoder, float32 quantizer;
* ``compile``, ``compile-nchw``, ``compile-bf16``: ``compile=True`` (torch.compile; compiling happens in the
  warm-up) with channels_last, without it, and in bfloat16.

Every variant runs once to warm up (its outputs are the accuracy figures), then ``--reps`` timed rounds,
interleaved (ABCABC...) so that load from other processes hits all variants alike; the table gives the median and
the best time, images/s and the speed-up over ``plain`` computed from medians and from best times. Accuracy, each
against ``plain``: max |difference| of the reconstructions, their PSNR (clamped to [-1, 1], peak-to-peak 2), the
share of equal token indices, and the PSNR of decoding ``plain``'s own tokens (the decoder's precision alone).

Run: python benchmarks/bench_inference.py --preset ImageNet_downsample16 --size 256 --batch 1 --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_IMAGES, interleaved, load_images, machine, psnr, summary  # noqa: E402
from plain import plain_decode, plain_encoder, plain_indices  # noqa: E402

from wetok import WeTok  # noqa: E402
from wetok.fast import inference, optimize  # noqa: E402

VARIANTS = {  # name -> optimize() keyword arguments
    "fast": dict(dtype="float32"),
    "fast-rules": dict(dtype="float32"),
    "fast-cl": dict(dtype="float32", channels_last=True, winograd=False),
    "fast-nchw": dict(dtype="float32", channels_last=False, winograd=False),
    "bf16": dict(dtype="bfloat16", channels_last=True),
    "compile": dict(dtype="float32", channels_last=True, compile=True),
    "compile-nchw": dict(dtype="float32", channels_last=False, compile=True),
    "compile-bf16": dict(dtype="bfloat16", channels_last=True, compile=True),
}


ENVIRONMENT = {"fast-rules": {"WETOK_CONV_CHOICE": "rules"}}  # name -> environment while it runs


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_base(preset: str, checkpoint: str | None) -> WeTok:
    """The preset with random weights (seed 0), a native model directory, or a ``wetok train`` checkpoint (EMA)."""
    if checkpoint and Path(checkpoint).is_dir():
        return WeTok.from_pretrained(checkpoint).eval().requires_grad_(False)
    if checkpoint:
        from wetok.train.module import load_training_checkpoint, model_from_checkpoint

        return model_from_checkpoint(load_training_checkpoint(checkpoint)).eval().requires_grad_(False)
    torch.manual_seed(0)
    return WeTok.from_preset(preset).eval().requires_grad_(False)


def build(base: WeTok, names: list[str]) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """Per variant: a function images -> (latent, indices, reconstruction) and one indices -> images."""
    cfg = base.config
    # the baseline reads the (contiguous float32) parameters of `base`; `fast-nchw` optimises `base` in place,
    # which changes no parameter, and every other variant works on its own copy
    sd = {k: v.detach() for k, v in base.state_dict().items()}

    @torch.no_grad()
    def plain_run(x):
        latent = plain_encoder(sd, cfg, x)
        indices = plain_indices(latent, cfg)
        return latent, indices, plain_decode(sd, cfg, indices)

    runs, decoders = {"plain": plain_run}, {"plain": lambda i: plain_decode(sd, cfg, i)}
    for name in names:
        if name == "plain":
            continue
        model = optimize(base if name == "fast-nchw" else copy.deepcopy(base), **VARIANTS[name])

        env = ENVIRONMENT.get(name, {})

        def run(x, model=model, env=env):  # model.encode + model.decode, keeping the latent
            with inference(), environment(env):
                latent = model.encode_latent(x)
                indices = model.quantizer(latent).indices
                return latent, indices, model.decode(indices)

        def decode(indices, model=model, env=env):
            with inference(), environment(env):
                return model.decode(indices)

        runs[name], decoders[name] = run, decode
    return {n: runs[n] for n in ["plain", *[n for n in names if n != "plain"]]}, decoders


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="ImageNet_downsample16")
    p.add_argument("--checkpoint", default=None,
                   help="a native model directory (e.g. src/wetok/weights/default, the bundled trained model) or a "
                   "`wetok train` checkpoint (its EMA weights) instead of the random-weight preset")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="plain,fast,bf16", help=f"comma-separated from plain,{','.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice, one per core); with 1 the CPU time is the work done, "
                   "untouched by other processes' load")
    p.add_argument("--images", default=DEFAULT_IMAGES)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n != "plain" and n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants: {', '.join(unknown)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    x = load_images(args.images, args.batch, args.size)
    base = load_base(args.preset, args.checkpoint)
    name = f"{base.config.name} from {args.checkpoint}" if args.checkpoint else f"{args.preset} (random weights)"
    print(f"{name}, {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters, batch {args.batch} at "
          f"{args.size}x{args.size}, warm-up then {args.reps} interleaved rounds")
    runs, decoders = build(base, names)
    outputs = {}
    for name, run in runs.items():
        outputs[name] = run(x)
        print(f"  warm-up {name} done", flush=True)
    ref_latent, ref_indices, ref_images = outputs["plain"]
    accuracy = {}
    for name in runs:
        latent, indices, images = outputs[name]
        decoded = decoders[name](ref_indices)
        accuracy[name] = {
            "latent_max_abs_diff": (latent.float() - ref_latent).abs().max().item(),
            "decode_max_abs_diff": (decoded.float() - ref_images).abs().max().item(),
            "max_abs_diff": (images.float() - ref_images).abs().max().item(),
            "psnr_db": psnr(images, ref_images),
            "token_agreement": (indices == ref_indices).float().mean().item(),
            "decode_psnr_db": psnr(decoded, ref_images),
        }
    wall, cpu = interleaved({n: (lambda r=r: r(x)) for n, r in runs.items()}, args.reps)
    stats, cpu_stats = summary(wall, "plain"), summary(cpu, "plain")

    print(f"{'variant':<13} {'wall s':>7} {'best':>7} {'img/s':>6} {'x wall':>6} {'x best':>6} {'CPU s':>7} "
          f"{'x CPU':>6} | {'latent':>8} {'decode':>8} {'recon':>8} {'PSNR':>5} {'tokens':>6} {'dPSNR':>5}")
    for name in runs:
        s, c, a = stats[name], cpu_stats[name], accuracy[name]
        print(f"{name:<13} {s['median_s']:>7.3f} {s['min_s']:>7.3f} {args.batch / s['median_s']:>6.3f} "
              f"{s['ratio_median']:>6.2f} {s['ratio_min']:>6.2f} {c['median_s']:>7.3f} {c['ratio_median']:>6.2f} | "
              f"{a['latent_max_abs_diff']:>8.1e} {a['decode_max_abs_diff']:>8.1e} {a['max_abs_diff']:>8.1e} "
              f"{a['psnr_db']:>5.1f} {a['token_agreement']:>6.4f} {a['decode_psnr_db']:>5.1f}")
    print("x wall / x best / x CPU: speed-up over plain from median wall, best wall and median CPU time. "
          "latent / decode / recon: max |difference| from plain of the encoder output, of decoding plain's tokens "
          "and of the reconstruction; PSNR (dB) of the reconstruction and dPSNR of decoding plain's tokens; "
          "tokens: share of token indices equal to plain's.")
    result = {"machine": machine(), "args": vars(args), "wall": stats, "cpu": cpu_stats, "accuracy": accuracy}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
