"""Cost of each evaluation metric per 256 x 256 image, as a ratio to reconstructing it with a model.

    python benchmarks/bench_eval.py [--model tiny-f8] [--images 16] [--batch-size 8] [--device cpu]

Baseline (ratio 1.00): encode + decode of the batch by --model. LPIPS and the feature extractor use random
weights (same cost as the pretrained ones); the FID extractor is pytorch-fid's InceptionV3 layout at 299 x 299.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from wetok import WeTok
from wetok._cpu import cpu_description
from wetok.metrics import ReconstructionMetrics, build_lpips


def _random_inception() -> torch.nn.Module:
    from pytorch_fid import inception as pfi

    with mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, **k: None):
        with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}):
            net = pfi.InceptionV3([3]).eval()

    class Features(torch.nn.Module):
        feature_dim = 2048

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x + 1) / 2)[0].flatten(1)

    return Features()


def _time(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-f8")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = WeTok.from_preset(args.model).eval().to(device)
    images = (torch.rand(args.images, 3, 256, 256) * 2 - 1).to(device)
    batches = images.split(args.batch_size)
    with torch.no_grad():
        recs = [model.reconstruct(b).clamp(-1, 1) for b in batches]
        indices = [model.encode(b).indices for b in batches]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def reconstruct() -> None:
        with torch.no_grad():
            for b in batches:
                model.reconstruct(b)
        sync()

    cfg = model.config
    candidates = {
        "psnr": dict(metrics="psnr"),
        "ssim": dict(metrics="ssim"),
        "lpips_alex": dict(metrics="lpips_alex", lpips_nets={"alex": build_lpips("alex", pretrained=False)}),
        "lpips_vgg": dict(metrics="lpips_vgg", lpips_nets={"vgg": build_lpips("vgg", pretrained=False)}),
        "fid (Inception, both sides)": dict(metrics="fid", feature_extractor=_random_inception()),
        "usage": dict(metrics="usage"),
    }
    base = _time(reconstruct)
    print(cpu_description())
    print(f"device {device}, model {args.model}, {args.images} images of 256 x 256, batch {args.batch_size}")
    print(
        f"| step | s / image | ratio to reconstruct |\n|---|---|---|\n| reconstruct (baseline) | "
        f"{base / args.images:.4f} | 1.00 |"
    )
    for name, kw in candidates.items():
        metric = ReconstructionMetrics(groups=cfg.groups, bits_per_group=cfg.bits_per_group, **kw).to(device)

        def update(metric: ReconstructionMetrics = metric) -> None:
            for b, r, i in zip(batches, recs, indices, strict=True):
                metric.update(b, r, i)
            sync()

        t = _time(update)
        print(f"| {name} | {t / args.images:.4f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
