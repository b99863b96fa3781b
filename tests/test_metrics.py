"""wetok.metrics: PSNR/SSIM vs scikit-image, LPIPS vs the lpips package, codebook usage, exact aggregation
(batch-size invariance, 1 vs 2 processes)."""

from __future__ import annotations

import math
import os
import tempfile

import lpips
import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from conftest import PHOTOS
from wetok.data import eval_transform, find_images, load_rgb, to_model_range
from wetok.errors import InputError
from wetok.fid import FeatureStats, frechet_distance
from wetok.metrics import (
    ReconstructionMetrics,
    build_lpips,
    codebook_usage,
    parse_metrics,
    psnr_ssim,
    to_uint8_hwc,
)


class TinyFeatures(nn.Module):
    """A small, fixed, locally made stand-in for the Inception network: [-1, 1] images -> 8-d features."""

    feature_dim = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float())).mean((2, 3))


def _real_batch(n: int = 4, size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """Real crops (float [-1, 1]) and their uint8 (B, H, W, 3) values."""
    paths = find_images(PHOTOS)[:n]
    images = torch.stack([eval_transform(size)(load_rgb(p)) for p in paths])
    u8 = np.stack([np.asarray(load_rgb(p).resize((size, size))) for p in paths])  # only for shapes
    return images, u8


def _perturbed(target_u8: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A "reconstruction": uint8 noise added to the target, plus sub-level float noise that rounding removes."""
    rng = np.random.default_rng(seed)
    rec_u8 = np.clip(target_u8.astype(int) + rng.integers(-12, 13, target_u8.shape), 0, 255).astype(np.uint8)
    rec = to_model_range(torch.from_numpy(rec_u8).permute(0, 3, 1, 2))
    rec = rec + torch.from_numpy(rng.uniform(-0.3, 0.3, rec.shape).astype(np.float32)) / 127.5
    return rec, rec_u8


# ---------------------------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_ssim_equal_skimage_on_real_images():
    target, _ = _real_batch()
    target_u8 = ((target.double().numpy() + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    rec, rec_u8 = _perturbed(target_u8)
    psnr, ssim = psnr_ssim(rec, target)
    for i in range(len(target)):
        ref_psnr = peak_signal_noise_ratio(target_u8[i], rec_u8[i], data_range=255)
        ref_ssim = structural_similarity(target_u8[i], rec_u8[i], data_range=255, channel_axis=-1)
        assert abs(psnr[i] - ref_psnr) < 1e-6 and abs(ssim[i] - ref_ssim) < 1e-6
    assert 20 < psnr.mean() < 40


def test_official_truncation():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = to_model_range(levels)
    rounded = to_uint8_hwc(x)[0, ..., 0].ravel()
    truncated = to_uint8_hwc(x, official_compat=True)[0, ..., 0].ravel()
    assert np.array_equal(rounded, np.arange(256))
    # spec 6.2: with truncation 95 of the 256 grey levels come out one lower
    assert (truncated != np.arange(256)).sum() == 95 and (np.arange(256) - truncated.astype(int)).max() == 1
    # independent numpy float32 computation of the official formula, on real images and a reconstruction
    target, _ = _real_batch(2)
    target_u8 = ((target.double().numpy() + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    rec, _ = _perturbed(target_u8, seed=1)

    def trunc(t: torch.Tensor) -> np.ndarray:
        a = t.numpy().astype(np.float32).transpose(0, 2, 3, 1)
        return ((a + np.float32(1)) / np.float32(2) * np.float32(255)).astype(np.uint8)

    psnr, ssim = psnr_ssim(rec, target, official_compat=True)
    for i in range(2):
        g, r = trunc(target)[i], trunc(rec)[i]
        assert abs(psnr[i] - peak_signal_noise_ratio(g, r, data_range=255)) < 1e-6
        assert abs(ssim[i] - structural_similarity(g, r, data_range=255, channel_axis=-1)) < 1e-6


def test_identical_images_infinite_psnr_counted_not_averaged():
    target, _ = _real_batch(3, 32)
    rec = target.clone()
    rec[1] += 4 / 127.5  # shifted by 4 levels except where clipped
    metric = ReconstructionMetrics("psnr,ssim")
    metric.update(target, rec)
    out = metric.compute()
    assert out["psnr_inf"] == 2 and out["n_images"] == 3
    ref = psnr_ssim(rec[1:2], target[1:2])[0][0]
    assert math.isfinite(ref) and out["psnr"] == pytest.approx(ref, abs=1e-12)


# ---------------------------------------------------------------------------------------------------- LPIPS
def test_lpips_equals_the_lpips_package():
    torch.manual_seed(0)
    ours = {"alex": build_lpips("alex", pretrained=False), "vgg": build_lpips("vgg", pretrained=False)}
    target, _ = _real_batch(3, 64)
    rec = target + 0.1 * torch.randn_like(target)  # out of range values: our metric clamps first
    metric = ReconstructionMetrics("lpips", lpips_nets=ours)
    metric.update(target[:2], rec[:2])
    metric.update(target[2:], rec[2:])
    out = metric.compute()
    for net in ("alex", "vgg"):
        direct = ours[net]  # the lpips package's own module, called directly image by image
        assert isinstance(direct, lpips.LPIPS) and direct.pnet_type == net
        with torch.no_grad():
            values = [float(direct(rec[i : i + 1].clamp(-1, 1), target[i : i + 1])) for i in range(3)]
        assert out[f"lpips_{net}"] == pytest.approx(np.mean(values), rel=1e-6, abs=1e-9)
        assert abs(out[f"lpips_{net}"]) > 1e-6


def test_real_lpips_without_backbone_weights_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("WETOK_OFFLINE", "1")
    with pytest.raises(InputError, match="alexnet-owt-7be5be79.pth") as info:
        build_lpips("alex")
    assert str(tmp_path) in str(info.value) and "download" in str(info.value)


# ------------------------------------------------------------------------------------------- codebook usage
def test_codebook_usage_against_hand_counts():
    # 2 groups of 2 bits: group 0 uses codes {0, 1, 3}, group 1 always code 2 (bit 0 never +1, bit 1 always)
    indices = torch.tensor([[0, 2], [1, 2], [3, 2], [3, 2]]).view(1, 2, 2, 2)
    metric = ReconstructionMetrics("usage", groups=2, bits_per_group=2)
    metric.update(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), indices)
    out = metric.compute()
    usage = out["usage"]
    assert usage["per_group"][0]["used_codes"] == 3 and usage["per_group"][1]["used_codes"] == 1
    pooled_counts = np.array([1, 1, 4, 2])  # codes 0..3 over both groups
    assert usage["pooled"]["used_codes"] == 4 and usage["pooled"]["utilization"] == 1.0
    assert usage["pooled"]["entropy_bits"] == pytest.approx(scipy.stats.entropy(pooled_counts, base=2))
    assert usage["per_group"][0]["entropy_bits"] == pytest.approx(scipy.stats.entropy([1, 1, 0, 2], base=2))
    assert usage["per_group"][1]["perplexity"] == pytest.approx(1.0)
    # bit j of index k is (k >> j) & 1: group 0 codes 0,1,3,3 -> bit0 3/4, bit1 2/4
    assert usage["bit_ones"] == [[0.75, 0.5], [0.0, 1.0]]
    assert usage["stuck_bits"] == ["g1.b0", "g1.b1"]
    # 16 x 16 px, 2 x 2 positions x 2 groups x 2 bits = 16 bits
    assert out["bits_per_pixel"] == 16 / 256 and out["compression_ratio"] == 256 * 24 / 16


def test_codebook_usage_function_direct():
    hist = np.array([[5, 0, 0, 0]])
    out = codebook_usage(hist, np.array([[0, 0]]), 5)
    assert out["pooled"]["utilization"] == 0.25 and out["pooled"]["entropy_bits"] == 0.0
    assert out["stuck_bits"] == ["g0.b0", "g0.b1"]


def test_parse_metrics():
    assert parse_metrics("psnr, lpips") == ("psnr", "lpips_alex", "lpips_vgg")
    assert parse_metrics(["usage", "rfid", "ssim"]) == ("ssim", "fid", "usage")
    with pytest.raises(InputError, match="unknown metric 'psnrr'"):
        parse_metrics("psnrr")


# ------------------------------------------------------------------------------------ exact aggregation
def _make_metric(seed: int = 0) -> ReconstructionMetrics:
    torch.manual_seed(seed)
    nets = {"alex": build_lpips("alex", pretrained=False)}
    return ReconstructionMetrics(
        "psnr,ssim,lpips_alex,fid,usage",
        groups=2,
        bits_per_group=3,
        lpips_nets=nets,
        feature_extractor=TinyFeatures(seed),
    )


def _data(n: int = 9, size: int = 64):
    g = torch.Generator().manual_seed(5)
    target = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    rec = target + 0.2 * torch.randn(n, 3, size, size, generator=g)
    indices = torch.randint(0, 8, (n, size // 8, size // 8, 2), generator=g)
    return target, rec, indices


def _run(metric: ReconstructionMetrics, batch: int, shard: slice = slice(None)) -> None:
    target, rec, indices = (t[shard] for t in _data())
    for i in range(0, len(target), batch):
        metric.update(target[i : i + batch], rec[i : i + batch], indices[i : i + batch])


def _flat(report: dict) -> dict:
    out = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


def _assert_same(a: dict, b: dict) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            # float32 networks (LPIPS, features) give per-image values that move ~1e-7 with the batch make-up;
            # everything computed in float64 from uint8 images (PSNR, SSIM, usage) must agree to rounding.
            rel = 1e-5 if key.startswith(("lpips", "rfid")) else 1e-12
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-12), key
        else:
            assert a[key] == b[key], key


def test_batch_size_invariance_and_brute_force_fid():
    reports = []
    for batch in (1, 3, 7):
        metric = _make_metric()
        _run(metric, batch)
        reports.append(metric.compute())
    _assert_same(reports[0], reports[1])
    _assert_same(reports[0], reports[2])
    # brute force: per-image values averaged, FID from np.cov of stored features
    target, rec, _ = _data()
    metric = _make_metric()
    rec = rec.clamp(-1, 1)
    psnr, ssim = psnr_ssim(rec, target)
    with torch.no_grad():
        lp = metric.lpips_nets["alex"](rec, target).flatten().double().numpy()
        real, fake = (
            metric.feature_extractor(target).double().numpy(),
            metric.feature_extractor(rec).double().numpy(),
        )
    fid = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    r = reports[0]
    assert r["psnr"] == pytest.approx(psnr.mean(), rel=1e-12) and r["ssim"] == pytest.approx(
        ssim.mean(), rel=1e-12
    )
    assert r["lpips_alex"] == pytest.approx(lp.mean(), rel=1e-6)
    assert r["rfid"] == pytest.approx(fid, rel=1e-6) and r["rfid"] > 0
    assert r["n_images"] == 9 and r["usage"]["positions"] == 9 * 8 * 8


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        metric = _make_metric()
        _run(metric, batch=2, shard=slice(rank, None, world))  # disjoint strided shards
        report = metric.compute()
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    single = _make_metric()
    _run(single, batch=4)
    expected = single.compute()
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        _assert_same(torch.load(tmp_path / f"rank{rank}.pt", weights_only=False), expected)


def test_feature_stats_match_numpy_and_merge():
    x = np.random.default_rng(0).normal(size=(50, 6)) + 3.0
    a, b = FeatureStats.zeros(6), FeatureStats.zeros(6)
    a.update(torch.from_numpy(x[:20]))
    b.update(x[20:])
    merged = a.merge(b)
    assert merged.n == 50
    np.testing.assert_allclose(merged.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_sharpness_is_the_laplacian_variance_ratio():
    from scipy import ndimage

    from wetok.metrics import ReconstructionMetrics

    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 24, 20, generator=g) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
    metric = ReconstructionMetrics(["sharpness"])
    metric.update(target, blurred)
    expected = []
    for rec, ref in zip(blurred, target, strict=True):
        lum = [((x.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).double().numpy() @ [0.299, 0.587, 0.114]
               for x in (rec, ref)]
        expected.append(ndimage.laplace(lum[0], mode="reflect").var() / ndimage.laplace(lum[1], mode="reflect").var())
    assert metric.compute()["sharpness"] == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert metric.compute()["sharpness"] < 0.5  # a 3x3 box blur removes most Laplacian energy
