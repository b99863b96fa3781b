"""Building blocks of the WeTok encoder and decoder (the Open-MAGVIT2 family).

Module and parameter names follow the official implementation so that its state dicts map one to one; the only
layout difference is :class:`Upsample`, which uses ``pixel_shuffle`` where the official code uses a DCR
depth-to-space (the permutation is applied to the weights at load time, see :func:`dcr_to_pixel_shuffle`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-6


def swish(x: Tensor, inplace: bool = False) -> Tensor:
    """x * sigmoid(x), the only activation in the tokenizer; ``inplace`` overwrites ``x`` (same values)."""
    return F.silu(x, inplace=inplace)


def no_autograd() -> bool:
    """True under ``torch.no_grad`` / ``torch.inference_mode``: the blocks then reuse their own intermediate
    buffers (in-place activation, residual add, modulation), which gives bit-identical outputs with fewer large
    allocations; on the CPU every fresh activation-sized buffer costs page faults."""
    return not torch.is_grad_enabled()


def group_norm(channels: int, groups: int = 32, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=affine)


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a (1x1 conv when widths differ) shortcut.

    The convolutions have no bias, as in the official code.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        inplace = no_autograd()
        h = self.conv1(swish(self.norm1(x), inplace))
        h = self.conv2(swish(self.norm2(h), inplace))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut) if inplace else shortcut + h


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine parameters, modulated by statistics of the quantized latent ("style").

    For each sample and latent channel, mu and sigma = sqrt(var + 1e-6) are taken over the latent's h*w
    positions (unbiased variance, as the official code computes it); ``gamma(sigma)`` scales and ``beta(mu)``
    shifts the normalised features (no "1 +" on the scale). Unlike the official code, a 1x1 latent gets a zero
    variance instead of NaN.
    """

    def __init__(self, z_channels: int, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        flat = style.flatten(2)
        if flat.dtype in (torch.float16, torch.bfloat16):  # statistics in at least float32
            flat = flat.float()
        n = flat.shape[-1]
        mean = flat.mean(-1)
        var = flat.var(-1, correction=1) if n > 1 else torch.zeros_like(mean)
        std = torch.sqrt(var + 1e-6)
        scale = self.gamma(std.to(style.dtype))[:, :, None, None]
        shift = self.beta(mean.to(style.dtype))[:, :, None, None]
        if no_autograd():
            return self.norm(x).mul_(scale).add_(shift)
        return self.norm(x) * scale + shift


class Upsample(nn.Module):
    """conv3x3 C -> 4C then 2x depth-to-space, implemented with ``pixel_shuffle``.

    Our ``conv1`` output channel 4c + s equals the official (DCR-ordered) output channel s*C + c.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels * 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv1(x), 2)


def dcr_to_pixel_shuffle(tensor: Tensor) -> Tensor:
    """Reorder the output channels of an official upsampler conv (weight or bias) for ``pixel_shuffle``.

    The official layer reads output channel s*C + c for sub-pixel s of channel c (DCR); ``pixel_shuffle`` reads
    channel 4c + s (CRD). Returns a tensor whose row 4c + s is the official row s*C + c.
    """
    c = tensor.shape[0] // 4
    return tensor.reshape(4, c, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def pixel_shuffle_to_dcr(tensor: Tensor) -> Tensor:
    """Inverse of :func:`dcr_to_pixel_shuffle`: our upsampler rows back to the official order."""
    c = tensor.shape[0] // 4
    return tensor.reshape(c, 4, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
