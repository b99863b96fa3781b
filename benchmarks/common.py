"""What the speed benchmarks share: the machine line, test images, interleaved timing, PSNR."""

from __future__ import annotations

import glob
import os
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image

from wetok._cpu import cpu_description
from wetok.image import pil_to_tensor

DEFAULT_IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "images", "val")


def machine() -> str:
    """The line every benchmark prints first: CPU model, AMX / AVX512-BF16, torch version and threads."""
    return cpu_description()


def load_images(folder: str, count: int, size: int) -> torch.Tensor:
    """``count`` real photos, centre-cropped square and resized to ``size`` (bicubic), in [-1, 1].

    Falls back to seeded uniform noise (with a note) when the folder has too few images.
    """
    files = sorted(glob.glob(os.path.join(folder, "*.jpg")) + glob.glob(os.path.join(folder, "*.png")))[:count]
    if len(files) < count:
        print(f"note: fewer than {count} images in {folder}; using seeded noise images")
        return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = []
    for path in files:
        img = Image.open(path).convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
        out.append(pil_to_tensor(img))
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] after clamping (peak-to-peak 2, i.e. the usual PSNR on [0, 1])."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def interleaved(
    runs: dict[str, Callable[[], object]], reps: int, log: bool = True
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every run ``reps`` times, interleaved (ABCABC..., the starting run rotating each round), so that load
    from other processes falls on all of them alike.

    Returns (wall seconds, process CPU seconds) per call. On a shared machine the CPU time (all threads of this
    process, ``time.process_time``) is the steadier figure: time slices taken by other processes are not counted.
    """
    names = list(runs)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if log:
                print(f"  rep {r + 1}/{reps} {name}: {wall[name][-1]:.3f} s wall, {cpu[name][-1]:.3f} s CPU",
                      flush=True)
    return wall, cpu


def summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median and best time per run, and the speed-up ratios against ``baseline`` (median/median, min/min)."""
    base_med, base_min = statistics.median(times[baseline]), min(times[baseline])
    out = {}
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        out[name] = {"median_s": med, "min_s": best, "ratio_median": base_med / med, "ratio_min": base_min / best}
    return out
