"""Generation metrics of a set of samples against a reference: FID, Inception Score, precision / recall.

Network: pytorch-fid's FID InceptionV3, exactly as the tokenizer's rFID (:mod:`wetok.fid`): images in [-1, 1],
resized to 299 x 299 by the network (bilinear), 2048-d pool3 features. The ADM evaluation suite (guided-diffusion
``evaluations/evaluator.py``, the usual source of ImageNet 256 gFID / IS / precision / recall) runs the same
TF-ported weights in TensorFlow, whose resize differs slightly, so numbers are close to, not identical with, its.

* **FID**: :func:`wetok.fid.frechet_distance` of the float64 mean / covariance of the sample and reference
  features. A reference ``.npz`` with only ``mu`` / ``sigma`` gives FID against those statistics; one with images
  *and* statistics (the ADM reference batches) gives ``fid`` from its images through our network and
  ``fid_stored_stats`` against its stored statistics (which ADM uses; they come from the TF network).
* **Inception Score**: softmax over the 1008 classes of the logits ``pool3 @ fc.weight^T`` **without the fc
  bias**, as ADM, the original improved-gan code and torch-fidelity's ``logits_unbiased`` do; the samples are
  cut, in their order, into consecutive splits of ``is_split_size`` (ADM: 5000, the last split may be shorter),
  ``exp(E_x KL(p(y|x) || p(y)))`` is computed per split in float64 (torch-fidelity's ``isc_features_to_metric``
  with one split) and the mean over splits is reported, as ADM does; their standard deviation is added.
* **Precision / recall** (Kynkäänniemi et al. 2019): k = 3 nearest-neighbour balls on the pool3 features;
  precision = fraction of samples inside some reference ball, recall = fraction of reference images inside some
  sample ball. torch-fidelity's ``prc_features_to_metric`` (row-chunked ``torch.cdist``) in float64; ADM computes
  the same definition with float16 distances.

Every image's features are gathered, in image order, onto rank 0 of ``torch.distributed`` and all metrics are
computed there from the full feature matrices, so results do not depend on the batch size or the number of
processes (up to the last bits that float32 convolutions may change with the batch make-up).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._versions import library_versions
from .errors import InputError
from .fid import FeatureStats, InceptionFeatures, frechet_distance
from .image_sets import FolderImages, NpzImages, npz_headers, open_images, read_stats
from .token_shards import shown

__all__ = [
    "GENERATION_METRICS",
    "Reference",
    "evaluate_generation",
    "fid_from_features",
    "inception_logit_weight",
    "inception_score",
    "open_reference",
    "precision_recall",
]

GENERATION_METRICS = ("fid", "is", "pr")
#: Distributions whose versions a report records.
_VERSIONED = ("wetok", "torch", "numpy", "scipy", "pytorch-fid", "torch-fidelity", "pillow")
#: Most images of a sample or reference set (2048 float32 features each, ~8 GiB for the limit).
MAX_IMAGES = 1_000_000
ADM_IS_SPLIT_SIZE = 5000


# ------------------------------------------------------------------------------------------- metric functions
def fid_from_features(samples: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID of sample features (N, D) against reference statistics, via :class:`wetok.fid.FeatureStats`."""
    stats = FeatureStats.zeros(samples.shape[1])
    stats.update(samples)
    return frechet_distance(stats.mu, stats.sigma, ref_mu, ref_sigma)


def inception_score(logits: Tensor | np.ndarray, split_size: int = ADM_IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std) over consecutive splits of ``split_size`` rows of exp(E KL(softmax(logits) || marginal))."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    logits = torch.as_tensor(logits).double()
    scores = [
        isc_features_to_metric(part, splits=1, shuffle=False)["inception_score_mean"]
        for part in logits.split(split_size)
    ]
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(
    samples: Tensor | np.ndarray,
    reference: Tensor | np.ndarray,
    *,
    k: int = 3,
    batch_size: int = 5000,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of sample features against reference features.

    A point's ball has the radius of its distance to its k-th nearest neighbour in its own set (itself
    excluded); float64 distances, ``batch_size`` rows at a time.
    """
    try:
        from torch_fidelity.metric_prc import prc_features_to_metric
    except ImportError as err:  # precision / recall arrived in torch-fidelity 0.4
        raise ImportError(f"precision / recall need torch-fidelity >= 0.4 ({err})") from err

    fake = torch.as_tensor(samples).to(device, torch.float64)
    real = torch.as_tensor(reference).to(device, torch.float64)
    for name, x in (("samples", fake), ("reference", real)):
        if x.shape[0] <= k:
            raise ValueError(f"precision / recall with k = {k} needs more than {k} {name}, got {x.shape[0]}")
    out = prc_features_to_metric(
        fake, real, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True, verbose=False
    )
    # torch-fidelity returns float32 means of 0/1 flags; recover the exact counts (exact below 2^23 points)
    precision = round(out["precision"] * fake.shape[0]) / fake.shape[0]
    return precision, round(out["recall"] * real.shape[0]) / real.shape[0]


def inception_logit_weight(weights_path: str | Path) -> Tensor:
    """The FID Inception's 1008-way classifier weight (1008, 2048) from its pytorch-fid weights file."""
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        weight = state["fc.weight"]
    except Exception as err:  # noqa: BLE001  a corrupt or foreign file: say which (torch's first line only)
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InputError(
            weights_path, f"cannot read the Inception classifier weight fc.weight ({reason})"
        ) from None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise InputError(weights_path, "fc.weight is not a floating-point tensor")
    if tuple(weight.shape) != (1008, 2048):
        raise InputError(weights_path, f"fc.weight is {tuple(weight.shape)}, expected (1008, 2048)")
    return weight


# ------------------------------------------------------------------------------------------------- inputs
@dataclass
class Reference:
    """A reference set: images (folder or ``arr_0``), stored ``mu`` / ``sigma``, or both."""

    path: Path
    images: NpzImages | FolderImages | None
    stats: tuple[np.ndarray, np.ndarray] | None

    def describe(self) -> dict[str, Any]:
        info = (
            self.images.describe() if self.images is not None else {"source": str(self.path), "kind": "npz"}
        )
        info["stored_stats"] = self.stats is not None
        return info


def open_reference(path: str | Path, crop: int | None = None) -> Reference:
    """A folder, an ``.npz`` of ``arr_0`` images, of ``mu`` / ``sigma`` statistics, or of both (checked)."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or path.is_dir():
        return Reference(path, open_images(path, crop), None)
    headers = npz_headers(path)
    has_stats = "mu" in headers and "sigma" in headers
    if "arr_0" not in headers and not has_stats:
        keys = shown(", ".join(headers) or "none")
        raise InputError(path, f"has neither 'arr_0' images nor 'mu' / 'sigma' statistics (arrays: {keys})")
    images = NpzImages(path, headers) if "arr_0" in headers else None
    return Reference(path, images, read_stats(path, headers) if has_stats else None)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_features(
    images: NpzImages | FolderImages,
    extractor: nn.Module,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "",
) -> np.ndarray | None:
    """Features (N, D) float32 of every image in order, on rank 0 (None on other ranks).

    An undecodable file in a folder raises :class:`InputError` on every rank (no image is silently dropped).
    """
    from tqdm.auto import tqdm

    rank, world = _dist_info()
    index, features = [], []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress or rank != 0)
    for batch in images.batches(batch_size, rank, world, num_workers):
        features.append(extractor(batch.images.to(device)).float().cpu().numpy())
        index.append(batch.index.numpy())
        bar.update(len(batch.index) * world)
    bar.close()
    bad = list(getattr(images, "bad_files", []))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, bad)
        bad = sorted(b for part in gathered for b in part)
    if bad:
        path, reason = bad[0]
        more = f" ({len(bad)} of {len(images)} images are unreadable)" if len(bad) > 1 else ""
        raise InputError(path, f"{reason}{more}")
    local = (
        np.concatenate(index) if index else np.zeros(0, np.int64),
        np.concatenate(features) if features else np.zeros((0, extractor.feature_dim), np.float32),
    )
    parts = [local]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(local, parts, dst=0)
        if rank != 0:
            return None
    order = np.concatenate([p[0] for p in parts])
    stacked = np.concatenate([p[1] for p in parts])
    if not np.array_equal(np.sort(order), np.arange(len(images))):
        raise RuntimeError("image indices gathered from the processes do not cover the set once")
    return stacked[np.argsort(order, kind="stable")]


# ------------------------------------------------------------------------------------------------- evaluation
def _on_rank0(compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``compute`` on rank 0 only and hand its result, or the fact that it failed, to every rank."""
    rank, world = _dist_info()
    result: list[Any] = [None]
    if rank == 0:
        try:
            result[0] = ("ok", compute())
        except Exception as err:
            if world > 1:
                dist.broadcast_object_list([("error", f"{type(err).__name__}: {err}")], src=0)
            raise
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    status, values = result[0]
    if status == "error":
        raise RuntimeError(f"generation metrics failed on rank 0: {values}")
    return values


def _describe_extractor(extractor: nn.Module) -> str:
    if isinstance(extractor, InceptionFeatures):
        return f"pytorch-fid InceptionV3 pool3, 2048-d ({extractor.weights_path})"
    return f"custom: {type(extractor).__name__} ({extractor.feature_dim}-d)"


def parse_generation_metrics(names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"fid,is,pr"`` (also ``inception_score``, ``precision_recall``) -> names in :data:`GENERATION_METRICS` order."""
    aliases = {"inception_score": "is", "isc": "is", "precision_recall": "pr", "prc": "pr", "gfid": "fid"}
    raw = names.split(",") if isinstance(names, str) else list(names)
    wanted = set()
    for name in (n.strip().lower().replace("-", "_") for n in raw if n.strip()):
        name = aliases.get(name, name)
        if name not in GENERATION_METRICS:
            raise InputError(
                "--metrics", f"unknown metric {name!r}; choose from {', '.join(GENERATION_METRICS)}"
            )
        wanted.add(name)
    if not wanted:
        raise InputError("--metrics", "no metric requested")
    return tuple(m for m in GENERATION_METRICS if m in wanted)


def _check_counts(
    samples: NpzImages | FolderImages, reference: Reference, names: tuple[str, ...], k: int
) -> None:
    for images in (samples, reference.images):
        if images is not None and len(images) > MAX_IMAGES:
            raise InputError(images.path, f"has {len(images)} images, over the limit of {MAX_IMAGES} (their "
                                          "features are held in memory)")
    if len(samples) < 2 and "fid" in names:
        raise InputError(samples.path, f"has {len(samples)} image; FID needs at least 2")
    if "pr" in names:
        for images in (samples, reference.images):
            if images is not None and len(images) <= k:
                raise InputError(
                    images.path, f"has {len(images)} images; precision / recall with k = {k} needs > {k}"
                )
    if "fid" in names and reference.images is not None and len(reference.images) < 2:
        raise InputError(reference.path, "has 1 image; FID needs at least 2")


def _compute(
    fake: np.ndarray,
    real: np.ndarray | None,
    reference: Reference,
    names: tuple[str, ...],
    *,
    logit_weight: Tensor | None,
    is_split_size: int,
    k: int,
    pr_batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n_samples": int(fake.shape[0]),
        "n_ref_images": None if real is None else int(real.shape[0]),
    }
    if "fid" in names:
        if real is not None:
            stats = FeatureStats.zeros(real.shape[1])
            stats.update(real)
            out["fid"] = fid_from_features(fake, stats.mu, stats.sigma)
        if reference.stats is not None:
            out["fid_stored_stats"] = fid_from_features(fake, *reference.stats)
            out.setdefault("fid", out["fid_stored_stats"])
    if "is" in names:
        logits = torch.from_numpy(fake).double() @ logit_weight.double().T
        out["inception_score"], out["inception_score_std"] = inception_score(logits, is_split_size)
        out["inception_score_splits"] = math.ceil(fake.shape[0] / is_split_size)
    if "pr" in names and real is not None:
        out["precision"], out["recall"] = precision_recall(
            fake, real, k=k, batch_size=pr_batch_size, device=device
        )
    return out


def evaluate_generation(
    samples: str | Path,
    ref: str | Path,
    *,
    metrics: str | tuple[str, ...] = GENERATION_METRICS,
    batch_size: int = 50,
    num_workers: int = 0,
    crop: int | None = None,
    is_split_size: int = ADM_IS_SPLIT_SIZE,
    k: int = 3,
    pr_batch_size: int = 5000,
    device: torch.device | str | None = None,
    feature_extractor: nn.Module | None = None,
    logit_weight: Tensor | None = None,
    inception_weights: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the images of ``samples`` (folder or ``.npz`` ``arr_0``) against ``ref`` (folder or ``.npz`` of
    images and / or ``mu`` / ``sigma``).

    Returns the report: ``metrics`` (``fid``, ``fid_stored_stats``, ``inception_score`` and its ``_std``,
    ``precision``, ``recall``, counts), ``settings`` (every choice that affects the numbers, ``notes`` on what
    could not be computed), ``data`` and library ``versions``. With a statistics-only reference, precision and
    recall are skipped (noted), FID uses the stored statistics and IS needs the samples only. ``crop`` resizes
    and center-crops folder images (not ``.npz`` arrays). ``feature_extractor`` (any module mapping [-1, 1]
    images to (B, feature_dim)) and ``logit_weight`` (C, feature_dim) replace the Inception network (tests).
    Under ``torch.distributed`` every rank returns the same report.
    """
    names = parse_generation_metrics(metrics)
    if batch_size < 1 or is_split_size < 1 or k < 1:
        raise ValueError("batch_size, is_split_size and k must be positive")
    sample_set = open_images(samples, crop)
    reference = open_reference(ref, crop)
    notes = []
    if "pr" in names and reference.images is None:
        names = tuple(n for n in names if n != "pr")
        notes.append(f"precision / recall skipped: {ref} holds statistics only, no images")
        if not names:
            raise InputError(ref, "holds statistics only; precision / recall need reference images")
    _check_counts(sample_set, reference, names, k)
    world = _dist_info()[1]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor = feature_extractor if feature_extractor is not None else InceptionFeatures(inception_weights)
    if "is" in names and logit_weight is None:
        if not isinstance(extractor, InceptionFeatures):
            raise ValueError("a custom feature_extractor needs logit_weight for the Inception Score")
        logit_weight = inception_logit_weight(extractor.weights_path)
    if reference.stats is not None and reference.stats[0].shape[0] != extractor.feature_dim:
        raise InputError(
            ref, f"mu is {reference.stats[0].shape[0]}-d; the features are {extractor.feature_dim}-d"
        )
    extractor = extractor.to(device).eval()

    kw = dict(batch_size=batch_size, device=device, num_workers=num_workers, progress=progress)
    fake = extract_features(sample_set, extractor, desc="samples", **kw)
    real = None
    if reference.images is not None and ("pr" in names or "fid" in names):
        real = extract_features(reference.images, extractor, desc="reference", **kw)
    values = _on_rank0(
        lambda: _compute(
            fake,
            real,
            reference,
            names,
            logit_weight=logit_weight,
            is_split_size=is_split_size,
            k=k,
            pr_batch_size=pr_batch_size,
            device=device,
        )
    )
    fid_reference = None
    if "fid" in names:
        fid_reference = (
            "reference images through the same network" if real is not None else "stored mu / sigma"
        )
    settings = {
        "metrics": list(names),
        "features": _describe_extractor(extractor),
        "preprocessing": "uint8 / 127.5 - 1, resized to 299 x 299 by the network (bilinear)"
        + (f"; folder images: short side to {crop} + center crop {crop}" if crop else ""),
        "fid_reference": fid_reference,
        "inception_score": None,
        "precision_recall": f"k = {k} nearest neighbours, float64 Euclidean distances"
        if "pr" in names
        else None,
        "batch_size": batch_size,
        "world_size": world,
        "device": str(device),
        "notes": notes,
    }
    if "is" in names:
        settings["inception_score"] = (
            f"softmax of features @ fc.weight^T (no bias, {logit_weight.shape[0]} classes), mean over "
            f"consecutive splits of {is_split_size} samples in input order (ADM)"
        )
    return {
        "metrics": values,
        "settings": settings,
        "data": {"samples": sample_set.describe(), "reference": reference.describe()},
        "versions": library_versions(_VERSIONED),
    }
