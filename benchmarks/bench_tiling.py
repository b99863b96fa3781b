"""Peak memory of tiled encoding / decoding of a large image, and the seam cost of tiling (PSNR tiled vs untiled).

Every measurement runs in a fresh child process, which reports its peak resident memory (``ru_maxrss``) before the
work (interpreter + torch + model: the baseline) and after it; figures are printed next to that baseline and as
ratios against the untiled run of the comparison size. The image is a validation photo resized to the target size.

    python benchmarks/bench_tiling.py                       # tiny-f16, 4096 x 4096 tiled, 1024 x 1024 compared
    python benchmarks/bench_tiling.py --model small-f16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "val"
if not VAL.is_dir():
    VAL = Path("/work/shared/data/images/val")


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process from /proc, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the peak resident size (Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(args: argparse.Namespace) -> None:
    """One measurement: prints a JSON line with the baseline / peak memory, the time and the output's path."""
    import numpy as np
    import torch

    from wetok.cli.models import load_model
    from wetok.data import load_rgb
    from wetok.image import pil_to_tensor, to_uint8
    from wetok.tiling import decode_tiled, encode_tiled

    torch.manual_seed(0)
    device = torch.device(args.device)
    from wetok.registry import find_model

    entry = find_model(args.model)  # a configuration without weights runs randomly initialised (seed 0)
    model = load_model(args.model, random_init=entry is not None and not entry.has_weights).eval().to(device)
    model.requires_grad_(False)
    f = model.downsample_factor
    image = load_rgb(VAL / args.image).resize((args.size, args.size), resample=3)  # bicubic
    pixels = pil_to_tensor(image)[None].contiguous()
    original = np.asarray(image)
    del image
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _reset_peak()
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        if args.mode == "untiled":
            out = model.reconstruct(pixels.to(device)).float().cpu()
        else:
            tile = args.tile // f
            if args.mode == "decode":  # decoding only: tokens of the image, encoded tiled outside the measurement
                indices = encode_tiled(model, pixels, tile=tile)
                _reset_peak()
                baseline = _status_mb("VmRSS")
                start = time.perf_counter()
                out = decode_tiled(model, indices, tile=tile)
            else:
                out = decode_tiled(model, encode_tiled(model, pixels, tile=tile), tile=tile)
    seconds = time.perf_counter() - start
    result = {"baseline_mb": baseline, "peak_mb": _status_mb("VmHWM"), "seconds": seconds}
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if args.save:
        np.save(args.save, to_uint8(out)[0].permute(1, 2, 0).numpy())
        np.save(args.save.replace(".npy", "_original.npy"), original)
    print(json.dumps(result))


def run_child(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def psnr(a_path: str, b_path: str) -> float:
    import numpy as np

    a, b = np.load(a_path).astype(np.float64), np.load(b_path).astype(np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-f16",
                   help="a 16x preset (randomly initialised, seed 0) or any --model of the wetok command")
    p.add_argument("--size", type=int, default=4096, help="side of the large image (tiled only)")
    p.add_argument("--compare-size", type=int, default=1024, help="side where tiled and untiled are compared")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels")
    p.add_argument("--image", default="101085.jpg", help="validation photo to resize")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="tiled", choices=["tiled", "untiled", "decode"], help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    import tempfile

    common = ["--model", args.model, "--tile", str(args.tile), "--image", args.image, "--device", args.device]
    with tempfile.TemporaryDirectory() as tmp:
        small = str(args.compare_size)
        untiled = run_child([*common, "--mode", "untiled", "--size", small, "--save", f"{tmp}/u.npy"])
        tiled = run_child([*common, "--mode", "tiled", "--size", small, "--save", f"{tmp}/t.npy"])
        seam = psnr(f"{tmp}/u.npy", f"{tmp}/t.npy")
        quality = (psnr(f"{tmp}/u_original.npy", f"{tmp}/u.npy"), psnr(f"{tmp}/u_original.npy", f"{tmp}/t.npy"))
    big = str(args.size)
    large_decode = run_child([*common, "--mode", "decode", "--size", big])
    large = run_child([*common, "--mode", "tiled", "--size", big])

    def extra(r: dict) -> float:
        return r["peak_mb"] - r["baseline_mb"]

    from wetok._cpu import cpu_description

    print(cpu_description())
    print(f"model {args.model}, tiles of {args.tile} px, device {args.device}; memory: resident set of a fresh "
          "process, 'before' = after loading the model and the image, 'peak' = the highest during the run")
    print(f"{'run':44s} {'before MB':>10s} {'peak MB':>9s} {'extra MB':>9s} {'extra / untiled':>15s} {'s':>7s}")
    rows = [(f"untiled reconstruct {small}x{small}", untiled), (f"tiled reconstruct {small}x{small}", tiled),
            (f"tiled decode only {big}x{big}", large_decode), (f"tiled reconstruct {big}x{big}", large)]
    for name, r in rows:
        line = (f"{name:44s} {r['baseline_mb']:10.0f} {r['peak_mb']:9.0f} {extra(r):9.0f} "
                f"{extra(r) / extra(untiled):15.2f} {r['seconds']:7.1f}")
        if "cuda_peak_mb" in r:
            line += f"   cuda peak {r['cuda_peak_mb']:.0f} MB"
        print(line)
    scale = (args.size / args.compare_size) ** 2
    print(f"untiled {big}x{big} would need about {extra(untiled) * scale:.0f} MB extra "
          f"({scale:.0f} x the {small}x{small} untiled run; activations grow with the pixel count)")
    print(f"seam cost at {small}x{small}: PSNR tiled vs untiled reconstruction = {seam:.2f} dB; against the "
          f"original: untiled {quality[0]:.2f} dB, tiled {quality[1]:.2f} dB")


if __name__ == "__main__":
    main()
