import numpy as np
import pytest
import torch
from PIL import Image

from wetok.image import pad_to_multiple, pil_to_tensor, tensor_to_pil, to_uint8, unpad


def test_pil_round_trip_is_exact_for_uint8_images():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    t = pil_to_tensor(Image.fromarray(array))
    assert t.shape == (3, 7, 9) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(t)), array)


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0 / 127.5 * 0.49, 1.0 / 127.5 * 0.51, 1.0, 3.0])
    # (x + 1) * 127.5 = [-, 0, 127.5, 127.99, 128.01, 255, -] -> rounds half to even at 127.5
    assert to_uint8(x).tolist() == [0, 0, 128, 128, 128, 255, 255]


@pytest.mark.parametrize("mode", ["replicate", "reflect", "constant"])
@pytest.mark.parametrize("h,w,f", [(30, 17, 8), (32, 32, 16), (5, 3, 32)])
def test_pad_to_multiple_and_unpad(mode, h, w, f):
    x = torch.randn(2, 3, h, w)
    padded, pad = pad_to_multiple(x, f, mode)
    assert padded.shape[-2] % f == 0 and padded.shape[-1] % f == 0
    assert padded.shape[-2] - h < f and padded.shape[-1] - w < f
    assert torch.equal(unpad(padded, pad), x)
    left, right, top, bottom = pad
    assert left <= right <= left + 1 and top <= bottom <= top + 1
    if mode == "constant" and top:
        assert padded[..., 0, :].abs().sum() == 0  # official padding: 0 = mid-grey
    if mode == "replicate" and left:
        assert torch.equal(padded[..., top : top + h, 0], x[..., :, 0])
