"""How fast can bfloat16 be on this CPU? The bound on the bf16 speed-up of the f = 16 model, in one process.

1. The plain float32 pass (the baseline of bench_inference.py) and the bfloat16 fast pass, interleaved; a profile
   of the bf16 pass gives the time spent in convolutions. With every other op free, the speed-up could not exceed
   plain time / bf16 convolution time.
2. The one way past that bound is fewer multiplications: Winograd F(4x4, 3x3) in bfloat16 (input and output
   transforms as GEMMs with the Kronecker transform matrices, 36 batched bf16 GEMMs), against oneDNN's direct
   bf16 convolution, per layer shape of the f = 16 model, with the error of each against a float64 convolution.
   (A throw-away experiment written here because no library ships a bf16 Winograd for the CPU.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inference import build, load_base  # noqa: E402
from common import interleaved, machine  # noqa: E402

_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def winograd_weights(w: torch.Tensor) -> torch.Tensor:
    """(Co, C, 3, 3) -> G w G^T as (36, C, Co) bfloat16."""
    g = torch.tensor(_G, dtype=torch.float64)
    u = torch.einsum("ai,ocij,bj->abco", g, w.double(), g)
    return u.reshape(36, w.shape[1], w.shape[0]).bfloat16().contiguous()


def winograd_conv(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """3x3, padding 1 convolution of bf16 NCHW/NHWC ``x`` by Winograd F(4x4, 3x3) with transformed weights ``u``."""
    n, c, h, w = x.shape
    th, tw = -(-h // 4), -(-w // 4)
    xp = F.pad(x, (1, 1 + 4 * tw - w, 1, 1 + 4 * th - h)).contiguous(memory_format=torch.channels_last)
    s_n, s_c, s_h, s_w = xp.stride()
    tiles = xp.as_strided((6, 6, n, th, tw, c), (s_h, s_w, s_n, 4 * s_h, 4 * s_w, s_c)).reshape(36, -1)
    bk = torch.kron(torch.tensor(_BT, dtype=x.dtype), torch.tensor(_BT, dtype=x.dtype))
    ak = torch.kron(torch.tensor(_AT, dtype=x.dtype), torch.tensor(_AT, dtype=x.dtype))
    m = torch.bmm((bk @ tiles).view(36, n * th * tw, c), u)
    y = (ak @ m.view(36, -1)).view(4, 4, n, th, tw, -1).permute(2, 5, 3, 0, 4, 1).reshape(n, -1, 4 * th, 4 * tw)
    return y[:, :, :h, :w]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="ImageNet_downsample16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    runs, _ = build(load_base(args.preset, None), ["plain", "bf16"])  # bench_inference's plain and bf16 passes
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    passes = {name: (lambda run=run: run(x)) for name, run in runs.items()}
    for run in passes.values():
        run()  # warm-up
    times, _ = interleaved(passes, args.reps, log=False)
    bf16 = passes["bf16"]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bf16()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / 1e6
    t_plain, t_bf16 = statistics.median(times["plain"]), statistics.median(times["bf16"])
    print(f"{args.preset}, 256x256, batch 1, {args.threads} thread(s), median of {args.reps}")
    print(f"  plain float32 {t_plain:.3f} s, bf16 fast {t_bf16:.3f} s: {t_plain / t_bf16:.2f}x")
    print(f"  profiled bf16 pass {total:.3f} s, of which convolutions {conv:.3f} s ({conv / total:.0%})")
    print(f"  bound with zero-cost non-convolution ops: plain / bf16 convolutions = {t_plain / conv:.2f}x")
    print("Winograd F(4x4,3x3) in bf16 vs oneDNN's direct bf16 convolution (error: RMS relative to float64)")
    for channels, size in ((256, 256), (256, 128), (512, 64), (1024, 16)):
        g = torch.Generator().manual_seed(0)
        xi = F.silu(torch.randn(1, channels, size, size, generator=g)).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3, generator=g) * (2 / (9 * channels)) ** 0.5
        ref = F.conv2d(xi.double(), w.double(), padding=1)
        xb, wb, u = xi.bfloat16(), w.bfloat16().contiguous(memory_format=torch.channels_last), winograd_weights(w)
        with torch.inference_mode():
            out = {"direct": lambda xb=xb, wb=wb: F.conv2d(xb, wb, padding=1),
                   "winograd": lambda xb=xb, u=u: winograd_conv(xb, u)}
            errors = {name: ((fn().double() - ref).square().mean() / ref.square().mean()).sqrt().item()
                      for name, fn in out.items()}  # also the warm-up
            layer_times, _ = interleaved(out, args.reps, log=False)
            res = {name: (min(layer_times[name]), errors[name]) for name in out}
        (td, ed), (tw, ew) = res["direct"], res["winograd"]
        print(f"  {channels:4d} ch {size:3d}x{size:<3d} direct {td * 1e3:6.1f} ms err {ed:.1e} | winograd "
              f"{tw * 1e3:6.1f} ms err {ew:.1e} | {td / tw:.2f}x faster, {20 * torch.log10(torch.tensor(ew / ed)):.0f} dB "
              "more error")


if __name__ == "__main__":
    main()
