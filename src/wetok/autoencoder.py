"""The WeTok CNN encoder and (generative) decoder, structured exactly like the official modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .blocks import AdaptiveGroupNorm, ResBlock, Upsample, group_norm, no_autograd, swish


def draw_noise(shape: Sequence[int], generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """Standard Gaussian float32 noise for the generative decoder: the one place it is drawn.

    Drawn on ``generator``'s device when one is given (so a seeded CPU generator gives the same noise whatever
    device the model runs on), else on ``device`` (default CPU) from torch's global generator.
    """
    device = generator.device if generator is not None else (device if device is not None else "cpu")
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)

class _Level(nn.Module):
    """One resolution level: ``block`` (a list of ResBlocks) plus an optional resampler."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> continuous latent (B, z_channels, ceil(H/f), ceil(W/f)), f = 2^(len(ch_mult)-1)."""

    def __init__(
        self,
        *,
        channels: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int = 3,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        widths = [channels * m for m in ch_mult]
        self.down = nn.ModuleList()
        block_in = channels
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(block_in, width, norm_groups))
                block_in = width
            level = _Level(blocks)
            if i < len(widths) - 1:
                level.downsample = nn.Conv2d(block_in, block_in, 3, stride=2, padding=1)
            self.down.append(level)
        self.mid_block = nn.ModuleList([ResBlock(block_in, block_in, norm_groups) for _ in range(num_res_blocks)])
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h), no_autograd()))


class Decoder(nn.Module):
    """Quantized latent (B, z, h, w) -> image (B, 3, h*f, w*f), not clamped.

    With ``generative=True`` this is the generative decoder (GD): ``conv_in`` takes 2*z channels, the quantized
    latent followed by Gaussian noise of the same shape. The adaptive group norms are always modulated by the
    quantized latent alone.
    """

    def __init__(
        self,
        *,
        channels: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        out_channels: int = 3,
        generative: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.z_channels = z_channels
        self.generative = generative
        widths = [channels * m for m in ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(z_channels * (2 if generative else 1), block_in, 3, padding=1)
        self.mid_block = nn.ModuleList([ResBlock(block_in, block_in, norm_groups) for _ in range(num_res_blocks)])
        levels: list[nn.Module] = [nn.Module()] * len(widths)
        adaptive: list[nn.Module] = [nn.Module()] * len(widths)
        for i in reversed(range(len(widths))):
            adaptive[i] = AdaptiveGroupNorm(z_channels, block_in, norm_groups)
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(block_in, widths[i], norm_groups))
                block_in = widths[i]
            level = _Level(blocks)
            if i > 0:
                level.upsample = Upsample(block_in)
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.adaptive = nn.ModuleList(adaptive)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor, noise: Tensor | None = None) -> Tensor:
        style = z
        if self.generative:
            if noise is None:
                raise ValueError("the generative decoder needs a noise tensor (use WeTok.decode to draw one)")
            if noise.shape != z.shape:
                raise ValueError(f"noise must have the latent's shape {tuple(z.shape)}, got {tuple(noise.shape)}")
            h = self.conv_in(torch.cat([z, noise.to(z.dtype)], dim=1))
        else:
            h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for i in reversed(range(len(self.up))):
            h = self.adaptive[i](h, style)
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h), no_autograd()))
