"""Reconstruction evaluation of a WeTok model on a folder of images: the paper's protocols, exact aggregation.

Protocols (spec §6):

* ``crop256``: resize the short side to 256 (PIL bilinear with antialias) and center-crop 256 x 256, as the
  official ImageNet / COCO evaluation;
* ``original``: no resize; each image is padded to a multiple of the **model's** f (the official script always
  pads to 16, which is wrong for f = 32) with ``pad_mode`` (default ``replicate``; ``constant`` is the official
  zero = mid-grey padding), encoded, decoded and cropped back. Batch size 1 (sizes differ); no size limit (the
  official script skips images whose padded side exceeds 2000).

Everything else is fixed and reported: reconstructions are clamped to [-1, 1]; uint8 conversion for PSNR/SSIM
rounds (``official_compat=True``: truncates); every metric is a sum over images divided by the image count
(the official script averages batch means); the generative decoder's noise for image i is drawn on the CPU from a
generator seeded by ``(seed, i)``, so results do not depend on batch size, device or process count.

Under ``torch.distributed`` (e.g. ``torchrun``), rank r of W evaluates images r, r + W, r + 2W, ... (no padding
duplicates) and the metric sums are all-reduced, so any number of processes gives the numbers of one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ._distributed import rank_and_world
from ._versions import library_versions
from .autoencoder import draw_noise
from .data import (
    ImageDataset,
    check_pixels,
    collate_skip_bad,
    eval_transform,
    find_images,
    to_tensor_transform,
)
from .errors import InputError
from .fid import InceptionFeatures, frechet_distance, load_reference_stats
from .image import PAD_MODES, pad_to_multiple, unpad
from .metrics import DEFAULT_METRICS, ReconstructionMetrics, parse_metrics

__all__ = ["PROTOCOLS", "evaluate", "image_noise"]

log = logging.getLogger(__name__)

PROTOCOLS = ("crop256", "original")
CROP_SIZE = 256
_VERSIONED = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "scikit-image",
    "lpips",
    "pytorch-fid",
    "torchmetrics",
    "pillow",
)


def image_noise(model: nn.Module, indices: Tensor, image_index: Tensor, seed: int) -> Tensor:
    """Noise (B, d, h, w) for the generative decoder: image i's from a CPU generator seeded by (seed, i)."""
    cfg = model.config
    _, h, w, _ = indices.shape
    noise = []
    for i in image_index.tolist():
        state = int(np.random.SeedSequence([seed, int(i)]).generate_state(1, dtype=np.uint64)[0] >> 1)
        noise.append(draw_noise((cfg.z_channels, h, w), torch.Generator().manual_seed(state)))
    return torch.stack(noise)


def _paths(
    data: str | Path | Sequence[str | Path] | ImageDataset, limit: int | None
) -> tuple[list[Path], str]:
    if isinstance(data, ImageDataset):
        paths, where = list(data.paths), str(data.root) if data.root is not None else "<list of files>"
    elif isinstance(data, (str, Path)):
        paths, where = find_images(data), str(data)
    else:
        paths, where = [Path(p) for p in data], "<list of files>"
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        paths = paths[:limit]
    return paths, where


class _PaddedSizeCheck:
    """The ``original`` protocol's transform, refusing (:class:`InputError`) images whose padding to a multiple of
    f would exceed :func:`wetok.data.max_pixels` (a 1 x 80 million strip pads to 16 x 80 million)."""

    def __init__(self, f: int) -> None:
        self.f, self.transform = f, to_tensor_transform()

    def __call__(self, image: Any) -> Tensor:
        f, h, w = self.f, image.height, image.width
        check_pixels("image", h + (-h) % f, w + (-w) % f, f"padded to a multiple of {f}, it is")
        return self.transform(image)


@torch.no_grad()
def _reconstruct(model: nn.Module, images: Tensor, index: Tensor, *, protocol: str, pad_mode: str, seed: int):
    """(reconstruction clamped to [-1, 1], token indices) of a batch."""
    pad = None
    if protocol == "original":
        images, pad = pad_to_multiple(images, model.downsample_factor, pad_mode)
    tokens = model.encode(images)
    noise = None
    if model.config.generative_decoder:
        noise = image_noise(model, tokens.indices, index, seed).to(images.device, images.dtype)
    reconstruction = model.decode(tokens, noise=noise).float()
    if pad is not None:
        reconstruction = unpad(reconstruction, pad)
    return reconstruction.clamp(-1, 1), tokens.indices


def evaluate(
    model: nn.Module,
    data: str | Path | Sequence[str | Path] | ImageDataset,
    *,
    protocol: str = "crop256",
    metrics: str | Iterable[str] = DEFAULT_METRICS,
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    official_compat: bool = False,
    pad_mode: str = "replicate",
    fid_feature_extractor: nn.Module | None = None,
    lpips_nets: Mapping[str, nn.Module] | None = None,
    inception_weights: str | Path | None = None,
    ref_stats: str | Path | None = None,
    save_stats: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on the images of ``data`` (a folder, a list of files or an :class:`ImageDataset`).

    Returns the report: ``metrics`` (psnr, ssim, lpips_alex, lpips_vgg, rfid, usage, bits_per_pixel,
    compression_ratio, ...), ``settings`` (every choice that affects the numbers), ``data`` (counts, bad files),
    ``model`` and library ``versions``. ``limit`` takes the first N images in sorted order. ``ref_stats`` adds
    ``fid_ref`` (reconstructions vs saved statistics); ``save_stats`` writes the originals' Inception statistics
    (rank 0). ``fid_feature_extractor`` / ``lpips_nets`` replace the pretrained networks (tests). The model is put
    in eval mode and moved to ``device`` (default: cuda if available). Raises :class:`InputError` if no image
    could be decoded.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    names = parse_metrics(metrics)
    if (ref_stats is not None or save_stats is not None) and "fid" not in names:
        raise ValueError("ref_stats / save_stats need the fid metric")
    reference = load_reference_stats(ref_stats) if ref_stats is not None else None
    rank, world = rank_and_world()
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    paths, where = _paths(data, limit)
    if protocol == "original":
        batch_size = 1
    transform = eval_transform(CROP_SIZE) if protocol == "crop256" else _PaddedSizeCheck(model.downsample_factor)
    dataset = ImageDataset(paths, transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(range(rank, len(dataset), world)),  # disjoint strided shard, no duplicates
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda",
    )
    cfg = model.config
    metric = ReconstructionMetrics(
        names,
        groups=cfg.groups,
        bits_per_group=cfg.bits_per_group,
        official_compat=official_compat,
        lpips_nets=lpips_nets,
        feature_extractor=fid_feature_extractor,
        inception_weights=inception_weights,
        sync_on_compute=False,  # synced once, explicitly, below
    ).to(device)
    model.eval().to(device)
    dtype = next(model.parameters()).dtype

    from tqdm.auto import tqdm

    bad_files: list[tuple[str, str]] = []
    bar = tqdm(total=len(loader.sampler), desc="wetok eval", unit="img", disable=not progress or rank != 0)
    for batch in loader:
        bad_files += batch["bad_files"]
        if batch["image"] is not None:
            images = batch["image"].to(device, non_blocking=True)
            rec, indices = _reconstruct(
                model, images.to(dtype), batch["index"], protocol=protocol, pad_mode=pad_mode, seed=seed
            )
            metric.update(images, rec, indices)
        bar.update(len(batch["index"]) + batch["n_bad"])
    bar.close()

    if world > 1:
        metric.sync()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, bad_files)
        bad_files = sorted(b for part in gathered for b in part)
    if int(metric.n_images) == 0:  # summed over processes by the sync above
        first = f" (first: {bad_files[0][0]}: {bad_files[0][1]})" if bad_files else ""
        raise InputError(where, f"none of the {len(paths)} images could be decoded{first}")
    results = metric.compute()
    if reference is not None:
        fake = metric.feature_stats("fake")
        results["fid_ref"] = frechet_distance(reference[0], reference[1], fake.mu, fake.sigma)
    if save_stats is not None and rank == 0:
        metric.feature_stats("real").save(save_stats)

    extractor = metric.feature_extractor
    settings: dict[str, Any] = {
        "protocol": protocol,
        "metrics": list(names),
        "preprocessing": (
            f"resize short side to {CROP_SIZE} (PIL bilinear, antialias) + center crop {CROP_SIZE}"
            if protocol == "crop256"
            else f"original size, padded to a multiple of f={model.downsample_factor} ({pad_mode}), cropped back"
        ),
        "pad_mode": pad_mode if protocol == "original" else None,
        "uint8_conversion": "truncate (official)" if official_compat else "round",
        "official_compat": official_compat,
        "clamp": "[-1, 1]",
        "averaging": "sum over images / number of images",
        "seed": seed,
        "generative_decoder": bool(cfg.generative_decoder),
        "noise": "per image: CPU torch.randn, generator seeded by SeedSequence([seed, image index])"
        if cfg.generative_decoder
        else None,
        "batch_size": batch_size,
        "world_size": world,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "fid_features": _describe_extractor(extractor),
        "ref_stats": str(ref_stats) if ref_stats is not None else None,
    }
    report = {
        "metrics": results,
        "settings": settings,
        "data": {
            "source": where,
            "n_files": len(paths),
            "n_images": results["n_images"],
            "n_bad": len(bad_files),
            "bad_files": [{"path": p, "reason": r} for p, r in bad_files],
            "limit": limit,
        },
        "model": _model_summary(model),
        "versions": library_versions(("wetok", *_VERSIONED)),
    }
    return report


def _describe_extractor(extractor: nn.Module | None) -> str | None:
    if extractor is None:
        return None
    if isinstance(extractor, InceptionFeatures):
        return f"pytorch-fid InceptionV3 pool3, 2048-d ({extractor.weights_path})"
    return f"custom: {type(extractor).__name__} ({extractor.feature_dim}-d)"


def _model_summary(model: nn.Module) -> dict[str, Any]:
    try:
        from .checkpoints import describe

        return describe(model)
    except Exception:  # noqa: BLE001  a summary must never fail an evaluation
        return {"model_id": getattr(model, "model_id", None)}
