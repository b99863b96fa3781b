"""wetok.pipeline: any image in, tokens and PIL images out, equal to the hand-written pad / encode / decode / crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTO
from wetok import ModelMismatchError, WeTok, WeTokConfig
from wetok.image import pad_to_multiple, pil_to_tensor, tensor_to_pil, unpad
from wetok.pipeline import WeTokPipeline, decode, encode, load_image, reconstruct
from wetok.tiling import decode_tiled, encode_tiled

# f = 4, a generative decoder (so the noise draw is part of what must agree)
CFG = WeTokConfig(channels=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, groups=2, bits_per_group=4,
                  norm_groups=8, generative_decoder=True)


@pytest.fixture(scope="module")
def model() -> WeTok:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return WeTok(CFG).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 37 x 29 crop of a photograph (odd sides: padding 3 and 3 with f = 4)."""
    return np.asarray(Image.open(PHOTO).convert("RGB"))[10:47, 20:49].copy()


def _by_hand(model: WeTok, rgb: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, tuple]:
    """What a user would write without the pipeline: pad, encode, decode with a seeded generator, crop."""
    x, pad = pad_to_multiple(pil_to_tensor(Image.fromarray(rgb))[None], model.downsample_factor)
    with torch.no_grad():
        indices = model.encode(x).indices
        pixels = model.decode(indices, generator=torch.Generator().manual_seed(seed))
    return indices, np.asarray(tensor_to_pil(unpad(pixels, pad)[0])), pad


def _modes(rgb: np.ndarray) -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Images in other modes and the RGB each should become, computed here (not with wetok.data.to_rgb)."""
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.where(np.arange(rgb.shape[1])[None, :] < 7, 0, 255).astype(np.uint8).repeat(rgb.shape[0], 0)
    rgba = np.dstack([rgb, alpha])
    white = np.where(alpha[..., None] == 0, 255, rgb).astype(np.uint8)  # alpha 0 or 255: composite on white exactly
    sixteen = (grey.astype(np.uint16) * 257 + (grey < 255) * 100).astype(np.uint16) # the +100 rounds away under 255/65535
    palette = Image.fromarray(rgb).quantize(8)
    return {
        "L": (Image.fromarray(grey, "L"), np.dstack([grey] * 3)),
        "RGBA": (Image.fromarray(rgba, "RGBA"), white),
        "LA": (Image.fromarray(np.dstack([grey, alpha]), "LA"), np.where(alpha[..., None] == 0, 255, np.dstack([grey] * 3))),
        "P": (palette, np.asarray(palette.convert("RGB"))),
        "I;16": (Image.fromarray(sixteen), np.dstack([grey] * 3)),
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))),
    }


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "I;16", "CMYK"])
def test_any_mode_equals_the_hand_written_path_on_its_rgb(model, photo, mode):
    image, rgb = _modes(photo)[mode]
    assert image.mode == mode
    assert np.array_equal(np.asarray(load_image(image)), rgb)
    (tokens,) = encode(model, image)
    (decoded,) = decode(model, tokens)
    indices, expected, pad = _by_hand(model, rgb)
    assert torch.equal(tokens.indices, indices)
    assert tokens.padding == pad == (1, 2, 1, 2) and tokens.original_size == (37, 29)
    assert decoded.size == (29, 37) and decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), expected)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (8, 8), (9, 30), (33, 7)])
def test_any_size_comes_back_at_its_size(model, shape):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    (tokens,) = encode(model, rgb)
    f = model.downsample_factor
    assert tokens.indices.shape == (1, -(-shape[0] // f), -(-shape[1] // f), CFG.groups)
    assert tokens.image_size == (f * tokens.indices.shape[1], f * tokens.indices.shape[2])
    (image,) = decode(model, tokens, seed=3)
    indices, expected, _ = _by_hand(model, rgb, seed=3)
    assert torch.equal(tokens.indices, indices) and np.array_equal(np.asarray(image), expected)
    assert np.array_equal(np.asarray(reconstruct(model, rgb, seed=3)[0]), expected)


def test_paths_pil_arrays_and_tensors_give_the_same_tokens(model, photo, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    float_array = photo.astype(np.float64) / 255
    tensor = torch.from_numpy(photo).permute(2, 0, 1)
    inputs = [str(path), path, Image.open(path), photo, float_array, float_array.astype(np.float32), tensor,
              tensor.float() / 255]
    records = encode(model, inputs)
    assert len(records) == len(inputs)
    for record in records[1:]:
        assert torch.equal(record.indices, records[0].indices)
    batch = encode(model, np.stack([photo, photo[::-1]]))  # (B, H, W, C): one record per image
    assert len(batch) == 2 and torch.equal(batch[0].indices, records[0].indices)
    assert torch.equal(batch[1].indices, encode(model, photo[::-1].copy())[0].indices)
    assert torch.equal(encode(model, tensor[None])[0].indices, records[0].indices)


def test_one_tile_equals_untiled_and_several_equal_the_tiling_module(model):
    rgb = np.random.default_rng(5).integers(0, 256, (30, 26, 3), dtype=np.uint8)
    untiled = encode(model, rgb, tile=0)[0]
    one_tile = encode(model, rgb, tile=64)[0]  # 32 x 28 padded: one 64-pixel tile covers it
    assert torch.equal(untiled.indices, one_tile.indices)
    a, b = decode(model, untiled, tile=0)[0], decode(model, untiled, tile=64)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # tiles of 16 pixels = 4 tokens: exactly wetok.tiling on the hand-padded image
    x, pad = pad_to_multiple(pil_to_tensor(Image.fromarray(rgb))[None], 4)
    tiled = encode(model, rgb, tile=16)[0]
    assert torch.equal(tiled.indices, encode_tiled(model, x, tile=4))
    pixels = decode_tiled(model, tiled.indices, tile=4, generator=torch.Generator().manual_seed(0))
    expected = np.asarray(tensor_to_pil(unpad(pixels, pad)[0]))
    assert np.array_equal(np.asarray(decode(model, tiled, tile=16)[0]), expected)


def test_size_resizes_the_short_side_and_decode_restores_the_original_size(model, photo):
    (tokens,) = encode(model, photo, size=16)
    assert tokens.original_size == (37, 29) and tokens.requested_size == 16
    resized = Image.fromarray(photo).resize((16, round(37 * 16 / 29)), Image.Resampling.BICUBIC)  # 16 x 20
    indices, small, _ = _by_hand(model, np.asarray(resized))
    assert torch.equal(tokens.indices, indices)
    (image,) = decode(model, tokens)
    expected = Image.fromarray(small).resize((29, 37), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_pipeline_object_and_its_settings(model, photo):
    pipe = WeTokPipeline(model, size=16, seed=7)
    tokens = pipe.encode([photo])
    assert torch.equal(tokens[0].indices, encode(model, photo, size=16)[0].indices)
    assert np.array_equal(np.asarray(pipe.decode(tokens)[0]), np.asarray(decode(model, tokens, seed=7)[0]))
    assert np.array_equal(np.asarray(pipe(photo)[0]), np.asarray(pipe.decode(tokens)[0]))
    assert pipe.encode(photo, size=None)[0].original_size == (37, 29)
    with pytest.raises(TypeError, match="seed"):
        pipe.encode(photo, seed=1)


def test_bad_inputs_raise_clear_errors(model, photo, tmp_path):
    with pytest.raises(ValueError, match=r"image 0: float images must lie in \[0, 1\]"):
        encode(model, photo / 127.5 - 1)
    with pytest.raises(ValueError, match="image 1: expected an image of shape"):
        encode(model, [photo, np.zeros((4, 4, 5), np.uint8)])
    with pytest.raises(ValueError, match=r"image 0: expected a tensor \(C, H, W\) .* got \(37, 29, 3\)"):
        encode(model, torch.from_numpy(photo))  # channels last: a tensor is (C, H, W)
    with pytest.raises(ValueError, match="unsupported dtype int32"):
        encode(model, photo.astype(np.int32))
    with pytest.raises(TypeError, match="got int"):
        encode(model, [3])
    from wetok import InputError

    with pytest.raises(InputError, match="missing.png: does not exist"):
        encode(model, tmp_path / "missing.png")
    other = WeTok(CFG.replace(groups=4, bits_per_group=2)).eval()
    (tokens,) = encode(other, photo)
    with pytest.raises(ModelMismatchError, match="tokens 0"):
        decode(model, tokens)
    retrained = WeTok(CFG).eval()  # same architecture, other weights
    with pytest.raises(ModelMismatchError, match="tokens 1: .*other trained weights"):
        decode(model, [encode(model, photo)[0], encode(retrained, photo)[0]])


def test_from_pretrained_loads_the_model_and_keeps_the_settings(model, photo, tmp_path):
    model.save_pretrained(tmp_path / "m")
    pipe = WeTokPipeline.from_pretrained(tmp_path / "m", size=16, dtype=torch.float32)
    assert not pipe.model.training and pipe.settings["size"] == 16
    assert torch.equal(pipe.encode(photo)[0].indices, encode(model, photo, size=16)[0].indices)
