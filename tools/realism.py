"""Realism of reconstructions measured without a downloaded network (Inception and the LPIPS backbones cannot be
downloaded on the machines this project trains on).

    python tools/realism.py ../shared/data/images/val --features runs/ablations/d64-g4 \\
        --model src/wetok/weights/default --model runs/model-gd --out realism.json

For each ``--model`` (anything ``wetok --model`` accepts: a model folder, a training checkpoint, a registered
name) the validation images are reconstructed under the crop256 protocol (resize 256 + centre crop, uint8 by
rounding; the generative decoder's noise from ``--seed``) and compared with the originals by:

* **patch FID / KID in the features of a tokenizer encoder trained here** (``--features``): every 8 x 8 patch's
  vector of the encoder's last feature map (before the projection to the latent), so 100 images give 102,400
  samples, enough for a full-rank covariance in the 64 or 128 feature dimensions. The feature network should be a
  different model from those compared (one of the ablation runs), trained on ``../shared/data/images/train``; its
  features carry what an encoder needs to reconstruct, texture included, so blur and invented texture both move
  the statistics. KID is the unbiased polynomial-kernel MMD^2 (k(x, y) = (x.y / d + 1)^3) over ``--subsets``
  random subsets of 1000 patches per side, mean and standard deviation, times 1000.
* **sharpness**: Laplacian-variance ratio, reconstruction / original (as ``wetok eval``); 1 = as sharp.
* **colour drift**: PSNR of the 8x average-pooled images (``lowpass_psnr``: layout and colour at the token scale,
  insensitive to texture) and the mean absolute difference of the per-image mean RGB (``mean_rgb_shift``, uint8
  levels).

Patch statistics, FID and KID are written by hand (about 30 lines): torchmetrics' FID / KID take one feature
vector per image, and 100 images cannot give a covariance in 64+ dimensions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wetok.cli.models import load_model
from wetok.data import eval_transform, find_images, load_rgb
from wetok.fid import frechet_distance
from wetok.metrics import laplacian_energy, psnr_uint8, to_uint8_hwc


def patch_features(encoder: torch.nn.Module, images_u8: np.ndarray, batch: int = 10) -> torch.Tensor:
    """(N * h * w, C) float64: the encoder's last feature map (input of its norm_out), one row per position."""
    rows: list[torch.Tensor] = []
    captured: list[torch.Tensor] = []
    hook = encoder.norm_out.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        with torch.inference_mode():
            for i in range(0, len(images_u8), batch):
                x = torch.from_numpy(images_u8[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
                captured.clear()
                encoder(x)
                rows.append(captured[0].permute(0, 2, 3, 1).reshape(-1, captured[0].shape[1]).double())
    finally:
        hook.remove()
    return torch.cat(rows)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    stats = [(x.mean(0).numpy(), torch.cov(x.T).numpy()) for x in (a, b)]
    return frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])


def kid(a: torch.Tensor, b: torch.Tensor, subsets: int, size: int, seed: int) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel over random subsets (KID, Binkowski et al. 2018)."""
    generator = torch.Generator().manual_seed(seed)
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        kxx, kyy, kxy = [(p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y))]
        m = len(x)
        values.append(((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                       + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean()).item())
    return float(np.mean(values)), float(np.std(values))


def reconstruct_all(model: torch.nn.Module, originals: np.ndarray, seed: int, batch: int = 10) -> np.ndarray:
    out = []
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for i in range(0, len(originals), batch):
            x = torch.from_numpy(originals[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
            out.append(to_uint8_hwc(model.reconstruct(x, generator=generator).clamp(-1, 1)))
    return np.concatenate(out)


def lowpass(images_u8: np.ndarray, factor: int = 8) -> np.ndarray:
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).double()
    return F.avg_pool2d(x, factor).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save(folder: Path, paths: list[Path], images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(folder / f"{Path(path).stem}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of validation images")
    parser.add_argument("--model", action="append", required=True, help="model to measure (repeatable)")
    parser.add_argument("--features", required=True, help="the tokenizer whose encoder gives the features")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of generative decoders")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--subset-size", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--save-dir", help="also write the originals (original/) and each model's "
                        "reconstructions (one folder per model, named after it) here as PNG")
    parser.add_argument("--out", help="JSON report")
    args = parser.parse_args()
    torch.manual_seed(0)

    transform = eval_transform(256)
    paths = find_images(args.images)[: args.limit]
    originals = np.stack([to_uint8_hwc(transform(load_rgb(p))[None])[0] for p in paths])
    feature_net = load_model(args.features, None).eval().requires_grad_(False)
    reference = patch_features(feature_net.encoder, originals)
    sharp_ref = laplacian_energy(originals)
    low_ref = lowpass(originals)
    if args.save_dir:
        save(Path(args.save_dir) / "original", paths, originals)
    report = {"images": len(paths), "features": args.features, "feature_dims": reference.shape[1],
              "patches": reference.shape[0], "seed": args.seed, "models": {}}
    for spec in args.model:
        model = load_model(spec, None).eval().requires_grad_(False)
        recon = reconstruct_all(model, originals, args.seed)
        if args.save_dir:
            save(Path(args.save_dir) / Path(spec).name, paths, recon)
        feats = patch_features(feature_net.encoder, recon)
        kid_mean, kid_std = kid(reference, feats, args.subsets, args.subset_size, args.seed)
        row = {
            "psnr": float(np.mean([psnr_uint8(a, b) for a, b in zip(originals, recon, strict=True)])),
            "patch_fid": fid(reference, feats),
            "patch_kid_x1000": 1000 * kid_mean, "patch_kid_std_x1000": 1000 * kid_std,
            "sharpness": float(np.mean(laplacian_energy(recon) / sharp_ref)),
            "lowpass_psnr": float(np.mean([psnr_uint8(a, b) for a, b in zip(low_ref, lowpass(recon), strict=True)])),
            "mean_rgb_shift": float(np.abs(originals.reshape(len(paths), -1, 3).mean(1)
                                           - recon.reshape(len(paths), -1, 3).mean(1)).mean()),
            "generative_decoder": bool(model.config.generative_decoder),
        }
        report["models"][spec] = row
        print(f"{spec}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
