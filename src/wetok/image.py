"""Conversions between PIL / uint8 images and model tensors, and padding to a multiple of f.

Model tensors are float (3, H, W) or (B, 3, H, W) in [-1, 1] (uint8 / 127.5 - 1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

PAD_MODES = ("replicate", "reflect", "constant")


#: Rows converted at a time, so converting a large image needs a few MB besides its result.
_ROWS = 256


def pil_to_tensor(image: Image.Image) -> Tensor:
    """A PIL image (converted to RGB) -> float32 (3, H, W) in [-1, 1].

    Computed as uint8 / 127.5 - 1 in float64 and then rounded to float32, like the official data loader, so the
    official truncating uint8 conversion sees exactly the same values (a few rows at a time: memory stays near
    the size of the result).
    """
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    out = torch.empty((3, *array.shape[:2]), dtype=torch.float32)
    for start in range(0, array.shape[0], _ROWS):
        rows = torch.from_numpy(array[start:start + _ROWS].copy()).permute(2, 0, 1)
        out[:, start:start + _ROWS] = rows.double() / 127.5 - 1.0
    return out


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 by clamping and rounding to nearest (the official code truncates)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def tensor_to_pil(image: Tensor) -> Image.Image:
    """Float (3, H, W) in [-1, 1] (or (1, 3, H, W)) -> an RGB PIL image, rounded to uint8 (a few rows at a time)."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError("tensor_to_pil takes one image; index the batch first")
        image = image[0]
    out = np.empty((*image.shape[1:], 3), dtype=np.uint8)
    for start in range(0, image.shape[1], _ROWS):
        out[start:start + _ROWS] = to_uint8(image[:, start:start + _ROWS]).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(out, mode="RGB")


def pad_to_multiple(images: Tensor, multiple: int, mode: str = "replicate") -> tuple[Tensor, tuple[int, int, int, int]]:
    """Pad (B, C, H, W) symmetrically so H and W are multiples of ``multiple``.

    Returns the padded tensor and the padding (left, right, top, bottom) for :func:`unpad`. The extra pixel of an
    odd padding goes right / bottom. ``mode`` is ``replicate`` (edge pixels; the default, it keeps edge statistics
    and avoids the grey border that the official ``constant`` zero padding leaves in the latent), ``reflect``
    (falls back to replicate where the image is too small to mirror) or ``constant`` (0, i.e. mid-grey: the
    official original-resolution protocol).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    if ph == 0 and pw == 0:
        return images, pad
    if mode == "reflect" and (max(pad[:2]) >= w or max(pad[2:]) >= h):
        mode = "replicate"
    if mode == "constant":
        return F.pad(images, pad, mode="constant", value=0.0), pad
    return F.pad(images, pad, mode=mode), pad


def unpad(images: Tensor, pad: tuple[int, int, int, int]) -> Tensor:
    """Crop away the padding added by :func:`pad_to_multiple`."""
    left, right, top, bottom = pad
    h, w = images.shape[-2:]
    return images[..., top : h - bottom, left : w - right]
