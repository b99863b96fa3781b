"""Images/s of WeTok-AR sampling: the cached sampler (``wetok.generation.generate``) against a straightforward
sampler that recomputes the whole sequence at every step, and the cached sampler as a bfloat16 model.

The straightforward sampler has no caches: for each position it runs the spatial transformer over the whole
prefix (class slot + all earlier positions), and for each sub-token the intra-position transformer over all
earlier sub-tokens of the position. It is checked to draw the same greedy samples as the cached one (on a small
model). Its cost grows linearly with the position, so at the official size it is timed at a few positions and
the full map is extrapolated by linear interpolation between them (printed as such).

All samplers: random weights (heads re-drawn so that logits are informative), classifier-free guidance on
(conditional and unconditional rows in one batch), top-k 0 / top-p 1 / temperature 1, a seeded generator.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved, machine  # noqa: E402

from wetok.generation import WeTokAR, guide, sample_logits  # noqa: E402


def random_model(preset: str, **overrides: object) -> WeTokAR:
    torch.manual_seed(0)
    model = WeTokAR.from_preset(preset, **overrides).eval()
    for head in model.head:
        torch.nn.init.normal_(head.weight, std=0.02)
    return model


@torch.no_grad()
def recompute_position(model: WeTokAR, rows: torch.Tensor, done: torch.Tensor, t: int, scale: float,
                       generator: torch.Generator | None, top_k: int = 0) -> torch.Tensor:
    """The straightforward sampler's work for position ``t``: ``done`` (B, >= t, g) holds positions < t; returns
    the g sub-tokens drawn for position t, (B, g)."""
    bsz, g = done.shape[0], model.config.groups
    prefix = done[:, :t].repeat(2, 1, 1)
    x = torch.cat([model.class_emb(rows), model.embed_position(prefix)], dim=1)
    seq = model.spatial(x)[:, -1:]
    out = torch.empty(bsz, g, dtype=torch.long)
    for i in range(g):
        logits = model.head_logits(model.intra(seq)[:, -1], i).float()
        token = sample_logits(guide(logits[:bsz], logits[bsz:], scale), top_k=top_k, generator=generator)
        out[:, i] = token
        seq = torch.cat([seq, model.token_emb[i](token.repeat(2))[:, None]], dim=1)
    return out


def recompute_sample(model: WeTokAR, labels: torch.Tensor, scale: float,
                     generator: torch.Generator | None = None, top_k: int = 0) -> torch.Tensor:
    cfg = model.config
    rows = torch.cat([labels, torch.full_like(labels, cfg.null_class)])
    done = torch.empty(labels.shape[0], cfg.num_positions, cfg.groups, dtype=torch.long)
    for t in range(cfg.num_positions):
        done[:, t] = recompute_position(model, rows, done, t, scale, generator, top_k)
    return done.view(labels.shape[0], cfg.grid_height, cfg.grid_width, cfg.groups)


def check_baseline_agrees() -> bool:
    """Greedy samples of the straightforward sampler = those of the cached one (small model, guidance 2)."""
    model = random_model("ar-tiny")
    for head in model.head:
        torch.nn.init.normal_(head.weight, std=0.5)
    labels = torch.tensor([0, 3, 7])
    return torch.equal(model.generate(labels, cfg_scale=2.0, top_k=1), recompute_sample(model, labels, 2.0, top_k=1))


def time_baseline(model: WeTokAR, batch: int, scale: float, points: list[int],
                  reps: int) -> tuple[float, float, str]:
    """(wall, CPU) seconds for one full map, interpolated linearly between positions ``points`` (the minimum
    over ``reps`` at each)."""
    cfg = model.config
    n = cfg.num_positions
    labels = torch.arange(batch) % cfg.num_classes
    rows = torch.cat([labels, torch.full_like(labels, cfg.null_class)])
    done = torch.randint(0, cfg.vocab_size, (batch, n, cfg.groups))
    gen = torch.Generator().manual_seed(0)
    wall, cpu = {}, {}
    for t in points:
        times = []
        for _ in range(reps):
            start, start_cpu = time.perf_counter(), time.process_time()
            recompute_position(model, rows, done, t, scale, gen)
            times.append((time.perf_counter() - start, time.process_time() - start_cpu))
        wall[t], cpu[t] = min(w for w, _ in times), min(c for _, c in times)

    def integrate(cost: dict[int, float]) -> float:
        total = 0.0
        for t in range(n):
            lo, hi = max(p for p in points if p <= t), min(p for p in points if p >= t)
            total += cost[lo] if hi == lo else cost[lo] + (cost[hi] - cost[lo]) * (t - lo) / (hi - lo)
        return total

    if points == list(range(n)):
        return sum(wall.values()), sum(cpu.values()), "timed at every position"
    detail = ", ".join(f"t={t}: {wall[t]:.3f} s" for t in points)
    return integrate(wall), integrate(cpu), f"extrapolated linearly from single positions, wall {detail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama_B_GFQ")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (images per call)")
    p.add_argument("--cfg", type=float, default=1.75)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--baseline-points", default="0,85,170,255",
                   help="positions at which the straightforward sampler is timed; 'all' runs it in full")
    p.add_argument("--compile", action="store_true", help="also time the cached sampler with torch.compile")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    print(f"amx_bf16: {'amx_bf16' in flags}, avx512_bf16: {'avx512_bf16' in flags}")
    print(f"load (os.getloadavg) at start: {os.getloadavg()}")
    print(f"straightforward sampler draws the same greedy samples as the cached one (ar-tiny): "
          f"{check_baseline_agrees()}")

    model = random_model(args.preset)
    cfg = model.config
    model_bf16 = random_model(args.preset).to(torch.bfloat16)
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {cfg.grid_height}x{cfg.grid_width}"
          f"x{cfg.groups} sub-tokens of {cfg.bits_per_group} bits, guidance {args.cfg}")
    n = cfg.num_positions
    points = list(range(n)) if args.baseline_points == "all" else [int(x) for x in args.baseline_points.split(",")]
    for batch in [int(b) for b in args.batches.split(",")]:
        labels = torch.arange(batch) % cfg.num_classes

        def cached(m: WeTokAR = model, compile: bool = False, labels: torch.Tensor = labels) -> None:
            m.generate(labels, cfg_scale=args.cfg, generator=torch.Generator().manual_seed(0), compile=compile)

        runs = {"cached float32": cached, "cached bfloat16": lambda: cached(model_bf16)}
        if args.compile:
            cached(model_bf16, compile=True)  # compile outside the timing
            runs["cached bfloat16 compiled"] = lambda: cached(model_bf16, compile=True)
        print(f"\nbatch {batch}:")
        wall, cpu = interleaved(runs, args.reps)
        base_wall, base_cpu, how = time_baseline(model, batch, args.cfg, points, 1 if args.reps < 3 else 2)
        print(f"  straightforward float32: {base_wall:.1f} s wall, {base_cpu:.1f} s CPU per call ({how})")
        print(f"  {'sampler':<28} {'s/call':>8} {'images/s':>9} {'vs straightforward':>19} {'(CPU time)':>11}")
        print(f"  {'straightforward float32':<28} {base_wall:8.2f} {batch / base_wall:9.4f} {1.0:18.2f}x "
              f"{1.0:10.2f}x")
        for name in runs:
            med, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
            print(f"  {name:<28} {med:8.2f} {batch / med:9.4f} {base_wall / med:18.2f}x {base_cpu / med_cpu:10.2f}x")
        speedup = statistics.median(wall["cached float32"]) / statistics.median(wall["cached bfloat16"])
        speedup_cpu = statistics.median(cpu["cached float32"]) / statistics.median(cpu["cached bfloat16"])
        print(f"  bfloat16 speed-up of the cached sampler: {speedup:.2f}x wall, {speedup_cpu:.2f}x CPU time")
    print(f"\nload (os.getloadavg) at end: {os.getloadavg()}")
    print("The official sampler itself cannot run here (no official code in this environment): no comparison.")


if __name__ == "__main__":
    main()
