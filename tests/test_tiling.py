"""Tiled encode / decode: tile layout, exactness on a purely local model, and the seam cost of a real model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PHOTO
from wetok import WeTok
from wetok.image import to_uint8
from wetok.tiling import _cores, _ramp, decode_tiled, encode_tiled, reconstruct_tiled, tile_spans


@pytest.mark.parametrize("length", [1, 5, 8, 9, 17, 31, 64, 100])
@pytest.mark.parametrize("tile,overlap", [(8, 0), (8, 2), (8, 4), (5, 1)])
def test_tile_spans_cover_evenly(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    covered = np.zeros(length, dtype=int)
    for start, stop in spans:
        assert 0 <= start < stop <= length
        assert stop - start == min(tile, length)
        covered[start:stop] += 1
    assert covered.min() >= 1
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (_, stop), (start, _) in zip(spans[:-1], spans[1:], strict=True):
        assert stop - start >= overlap  # neighbours overlap by at least ``overlap``
    # the smallest count of tiles that achieves this: one fewer could not cover with that overlap
    n = len(spans)
    assert n == 1 or (n - 1) * (tile - overlap) + tile >= length > (n - 2) * (tile - overlap) + tile
    cores = _cores(spans)
    assert [c for core in cores for c in range(*core)] == list(range(length))  # a partition, in order
    for (start, stop), (c0, c1) in zip(spans, cores, strict=True):
        assert start <= c0 < c1 <= stop


def test_ramps_sum_to_one_across_overlaps():
    spans = tile_spans(40, 16, 6)
    total = torch.zeros(40 * 2, dtype=torch.float64)
    for i, (start, stop) in enumerate(spans):
        total[start * 2 : stop * 2] += _ramp(spans, i, 2, torch.device("cpu"))
    # with two tiles per overlap the raised-cosine ramps are complementary: they sum to 1 without normalising
    assert torch.allclose(total, torch.ones_like(total), atol=1e-12)


class LocalModel(nn.Module):
    """A stand-in whose encoder and decoder are purely local (no normalisation), so tiling must change nothing.

    Encoder: 4x4 average pooling, then signs -> group 0 = 2-bit index of channels (0, 1), group 1 = channel 2.
    Decoder: each token -> a 4x4 block whose 3 channels are (index0, index1, index0 * index1).
    """

    downsample_factor = 4
    config = SimpleNamespace(groups=2, z_channels=3, generative_decoder=False, bits_per_group=2)

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def encode(self, images):
        bits = (F.avg_pool2d(images, 4) > 0).long()
        indices = torch.stack([bits[:, 0] + 2 * bits[:, 1], bits[:, 2]], dim=-1)
        return SimpleNamespace(indices=indices)

    def decode(self, indices, noise=None, noise_scale=1.0):
        a, b = indices[..., 0].double(), indices[..., 1].double()
        planes = torch.stack([a, b, a * b], dim=1)
        return planes.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


@pytest.mark.parametrize("tile,overlap", [(3, 1), (4, 2), (5, 0), (7, 3)])
def test_tiling_is_exact_for_a_local_model(tile, overlap):
    model = LocalModel()
    images = torch.randn(2, 3, 4 * 13, 4 * 9, generator=torch.Generator().manual_seed(0))
    expected = model.encode(images).indices
    indices = encode_tiled(model, images, tile=tile, overlap=overlap)
    assert torch.equal(indices, expected)
    decoded = decode_tiled(model, indices, tile=tile, overlap=overlap)
    torch.testing.assert_close(decoded, model.decode(expected).float(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny() -> WeTok:
    torch.manual_seed(0)
    return WeTok.from_preset("tiny-f8").eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    from wetok.data import load_rgb
    from wetok.image import pil_to_tensor

    return pil_to_tensor(load_rgb(PHOTO).resize((128, 96)))[None]


@torch.no_grad()
def test_one_tile_equals_untiled(tiny, image):
    indices = encode_tiled(tiny, image, tile=16)  # 16 tokens = 128 px covers the 96 x 128 image
    assert torch.equal(indices, tiny.encode(image).indices)
    assert torch.equal(decode_tiled(tiny, indices, tile=16), tiny.decode(indices))


@torch.no_grad()
def test_one_tile_equals_untiled_with_generative_noise(tiny, image):
    model = tiny.to_generative()
    with torch.no_grad():  # give the noise channels weight so the noise matters
        model.decoder.conv_in.weight[:, model.config.z_channels :].normal_(0, 0.1)
    indices = model.encode(image).indices
    expected = model.decode(indices, generator=torch.Generator().manual_seed(3))
    got = decode_tiled(model, indices, tile=16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)
    other = decode_tiled(model, indices, tile=16, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other, expected)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((to_uint8(a).double() - to_uint8(b).double()) ** 2).mean().item()
    return 10 * np.log10(255**2 / mse)


@torch.no_grad()
def test_tiled_decode_stays_close_to_untiled(tiny, image):
    # Normalisation statistics are per tile, so tiles differ slightly from the whole image: the seam cost.
    # Measured on this randomly initialised tiny-f8 (8-token tiles = 64 px on a 96x128 image) against untiled:
    # decode 23.2 dB with a 2-token overlap, 20.8 dB without overlap; encode + decode 15.9 dB; decoding the
    # vertically flipped token map (what a misplaced tile would give) 14.0 dB. Thresholds sit ~1.5 dB inside.
    indices = tiny.encode(image).indices
    untiled = tiny.decode(indices)
    blended = _psnr(decode_tiled(tiny, indices, tile=8, overlap=2), untiled)
    assert blended > 21.5
    assert blended > _psnr(decode_tiled(tiny, indices, tile=8, overlap=0), untiled) + 1.0  # blending helps
    assert _psnr(reconstruct_tiled(tiny, image, tile=8, overlap=2), untiled) > 14.5
    assert _psnr(decode_tiled(tiny, indices.flip(1), tile=8, overlap=2), untiled) < 17.0
