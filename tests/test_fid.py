"""wetok.fid: Fréchet distance vs an independent scipy route, statistics files, the real Inception path."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from pytorch_fid import inception as pfi

from wetok.errors import InputError
from wetok.fid import (
    FID_WEIGHTS_FILE,
    FeatureStats,
    InceptionFeatures,
    frechet_distance,
    load_reference_stats,
)


def _random_stats(dim: int, seed: int, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, rank or dim))
    return rng.normal(size=dim), a @ a.T / dim


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """tr sqrt(S1 S2) = sum of sqrt of eigenvalues of the symmetric S1^1/2 S2 S1^1/2 (eigh route, no sqrtm of S1 S2)."""
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    )


@pytest.mark.parametrize("dim", [1, 5, 32])
def test_frechet_distance_equals_eigen_route(dim):
    mu1, s1 = _random_stats(dim, 0)
    mu2, s2 = _random_stats(dim, 1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rank_deficient_covariances():
    # fewer samples than dimensions, as with a small evaluation set: sqrtm is ill-conditioned, result stays close
    mu1, s1 = _random_stats(16, 2, rank=4)
    mu2, s2 = _random_stats(16, 3, rank=4)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-4)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])


def test_stats_file_round_trip_and_pytorch_fid_format(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 4))
    stats = FeatureStats.zeros(4)
    stats.update(x)
    stats.save(tmp_path / "s.npz")
    mu, sigma, n = load_reference_stats(tmp_path / "s.npz")
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)
    assert n == 30 and not list(tmp_path.glob("*.tmp*"))
    np.savez(tmp_path / "pfid.npz", mu=mu, sigma=sigma)  # what pytorch-fid --save-stats writes
    assert load_reference_stats(tmp_path / "pfid.npz")[2] is None
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(InputError, match="bad.npz"):
        load_reference_stats(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="does not exist"):
        load_reference_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.zeros(4).sigma  # noqa: B018


# ------------------------------------------------------------------------------------- the real Inception path
def test_inception_without_weights_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("WETOK_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("WETOK_OFFLINE", "1")
    with pytest.raises(InputError) as info:
        InceptionFeatures()
    message = str(info.value)
    assert pfi.FID_WEIGHTS_URL in message and FID_WEIGHTS_FILE in message
    assert str(tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILE) in message
    assert "WETOK_INCEPTION_WEIGHTS" in message


def test_inception_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("WETOK_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("WETOK_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(url, dst, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(InputError, match="download failed .*Name or service not known.*put it at"):
        InceptionFeatures()
    with pytest.raises(InputError, match="does not exist"):
        InceptionFeatures(tmp_path / "nowhere.pth")


def test_inception_with_local_weights_equals_pytorch_fid(tmp_path, monkeypatch):
    # weights made here: a randomly initialised network of the FID Inception's exact layout
    torch.manual_seed(0)
    captured = {}
    original = pfi.fid_inception_v3

    def build_random():
        with mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, **k: None):
            with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}):
                net = original()
        captured["state"] = {k: v.clone() for k, v in net.state_dict().items()}
        return net

    build_random()
    path = tmp_path / FID_WEIGHTS_FILE
    torch.save(captured["state"], path)
    monkeypatch.setenv("WETOK_OFFLINE", "1")
    ours = InceptionFeatures(path)
    assert ours.weights_path == str(path) and ours.feature_dim == 2048
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: captured["state"]):
        direct = pfi.InceptionV3([3]).eval()
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = direct((images + 1) / 2)[0].flatten(1)
    features = ours(images)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(InputError, match="not the FID Inception weights"):
        InceptionFeatures(bad)
