"""rFID: Inception features, mergeable feature statistics and the Fréchet distance.

Network and preprocessing follow the official WeTok evaluation, which uses the ``pytorch-fid`` package's
``InceptionV3`` with the TF-ported FID weights (``pt_inception-2015-12-05-6726825d.pth``): images in [0, 1] are
resized to 299 x 299 with ``F.interpolate(bilinear, align_corners=False)``, mapped to [-1, 1] and the 2048-d pool3
features are taken. We use that package directly (not torch-fidelity / torchmetrics, whose TF1-style resize gives
slightly different rFID values), so numbers are comparable with the paper's.

Statistics are kept as float64 sums (count, sum of features, sum of outer products) rather than lists of
features: exact, O(D^2) memory, and mergeable across batches and processes by plain addition.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from ._files import atomic_write
from .errors import InputError

__all__ = [
    "FID_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_ENV",
    "FeatureStats",
    "InceptionFeatures",
    "frechet_distance",
    "load_reference_stats",
    "resolve_weights",
]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: Environment variable naming a local copy of the FID Inception weights.
INCEPTION_WEIGHTS_ENV = "WETOK_INCEPTION_WEIGHTS"
#: Set to 1 to never download weights (``HF_HUB_OFFLINE=1`` is honoured too).
OFFLINE_ENV = "WETOK_OFFLINE"


# ------------------------------------------------------------------------------------------------- weight files
def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


def hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub`` caches a download of ``url`` (``$TORCH_HOME/hub/checkpoints/<file name>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_weights(
    url: str, what: str, *, explicit: str | Path | None = None, env: str | None = None
) -> Path:
    """Find pretrained weights locally, or download them into the torch hub cache.

    Order: ``explicit`` path, then ``$env``, then the torch hub cache. A missing file is downloaded unless
    ``WETOK_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``; if that is not possible, :class:`InputError` says which file to
    get, from where, and where to put it.
    """
    if explicit is not None or (env and os.environ.get(env)):
        path = Path(explicit if explicit is not None else os.environ[env])
        if not path.is_file():
            raise InputError(path, f"{what} weights file does not exist (download {url})")
        return path
    path = hub_checkpoint_path(url)
    if path.is_file():
        return path
    hint = f"download {url} and put it at {path}"
    if env:
        hint += f" (or pass the path of a copy: --inception-weights PATH or the environment variable {env})"
    if _offline():
        raise InputError(path, f"{what} weights are missing and downloads are off ({OFFLINE_ENV}); {hint}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as err:  # noqa: BLE001  any network / disk failure gets the same instructions
        raise InputError(path, f"{what} weights are missing and the download failed ({err}); {hint}") from err
    return path


# ------------------------------------------------------------------------------------------- feature extractors
class InceptionFeatures(nn.Module):
    """pytorch-fid's FID InceptionV3: float (B, 3, H, W) in [-1, 1] -> float32 (B, 2048) pool3 features.

    ``weights`` is a local ``pt_inception-2015-12-05-6726825d.pth``; if None it is looked up as described in
    :func:`resolve_weights` (``$WETOK_INCEPTION_WEIGHTS``, then the torch hub cache, then a download).

    Any module with a ``feature_dim`` attribute that maps [-1, 1] images to (B, feature_dim) can stand in for
    this one (tests use a small local network).
    """

    feature_dim = 2048

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        from pytorch_fid import inception as pfi

        path = resolve_weights(
            pfi.FID_WEIGHTS_URL, "FID Inception", explicit=weights, env=INCEPTION_WEIGHTS_ENV
        )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  a corrupt or foreign file: say which, in one line
            # (not torch's own message: it spans lines and suggests weights_only=False, which we never use)
            raise InputError(path, "cannot read FID Inception weights: not a torch file of tensors "
                                   f"({type(err).__name__})") from err

        def from_local_file(*_args: object, **_kwargs: object) -> dict[str, Tensor]:
            return state

        # pytorch-fid always fetches its weights by URL; hand it the local file instead, nothing else changes.
        try:
            with mock.patch.object(pfi, "load_state_dict_from_url", from_local_file):
                self.net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except RuntimeError as err:
            raise InputError(path, f"not the FID Inception weights ({err})") from err
        self.net.eval()
        self.weights_path = str(path)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        features = self.net((images.float() + 1) / 2)[
            0
        ]  # the network resizes to 299 and maps back to [-1, 1]
        return features.flatten(1)


# ------------------------------------------------------------------------------------------------- statistics
@dataclass
class FeatureStats:
    """Mergeable float64 statistics of a feature set: count, sum and sum of outer products."""

    n: int
    total: np.ndarray  # (D,)
    outer: np.ndarray  # (D, D)

    @classmethod
    def zeros(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def update(self, features: Tensor | np.ndarray) -> None:
        x = torch.as_tensor(features).detach().to("cpu", torch.float64).flatten(1).numpy()
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.n + other.n, self.total + other.total, self.outer + other.outer)

    @property
    def mu(self) -> np.ndarray:
        return self.total / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (divisor n - 1), as ``np.cov(features, rowvar=False)``."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: str | Path) -> None:
        """Write ``mu``, ``sigma``, ``n`` to an .npz (pytorch-fid reads the same ``mu`` / ``sigma`` keys)."""
        atomic_write(path, lambda tmp: np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.int64(self.n)),
                     suffix=".npz")  # np.savez appends .npz to names without it


def load_reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Read (mu, sigma, n) from an .npz written by :meth:`FeatureStats.save` or by pytorch-fid (n is None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "reference statistics file does not exist")
    try:
        with np.load(path) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            n = int(data["n"]) if "n" in data.files else None
    except Exception as err:  # noqa: BLE001  not an npz, or keys missing
        raise InputError(path, f"not a statistics .npz with 'mu' and 'sigma' ({err})") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(path, f"mu {mu.shape} and sigma {sigma.shape} do not match")
    return mu, sigma, n


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), in float64.

    As in the official code: ``scipy.linalg.sqrtm``; if the product's root is not finite, retry with ``eps`` on
    the diagonals; the real part of the root is used. (Hand-written rather than pytorch-fid's function because
    that one raises on a small imaginary part, which the official evaluation silently drops.)
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


FeatureExtractor = Callable[[Tensor], Tensor]
