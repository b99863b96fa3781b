"""The baseline of the speed benchmarks: WeTok run the plain way the official code runs it.

A functional forward pass from a state dict (wetok's key names): eager, contiguous NCHW float32, every GroupNorm,
SiLU, residual add and modulation a separate out-of-place op, under ``torch.no_grad`` (the official scripts'
inference context), quantization by ``torch.where(u > 0, 1, -1)``. It shares no code with wetok's modules, so the
benchmarks can also check that the fast path computes the same function. The official swish is
``x * torch.sigmoid(x)`` (two ops); ``F.silu`` (one op) is used here, which makes the baseline a little faster,
not slower, than the official code. Depth-to-space is ``pixel_shuffle`` on wetok's (permuted) upsampler weights:
the same one copy the official DCR rearrange makes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wetok import WeTokConfig

EPS = 1e-6


def _gn(x: Tensor, sd: dict[str, Tensor], name: str, groups: int) -> Tensor:
    return F.group_norm(x, groups, sd[name + ".weight"], sd[name + ".bias"], eps=EPS)


def _conv(x: Tensor, sd: dict[str, Tensor], name: str, stride: int = 1) -> Tensor:
    w = sd[name + ".weight"]
    return F.conv2d(x, w, sd.get(name + ".bias"), stride=stride, padding=w.shape[-1] // 2)


def _resblock(x: Tensor, sd: dict[str, Tensor], p: str, groups: int) -> Tensor:
    h = _conv(F.silu(_gn(x, sd, p + ".norm1", groups)), sd, p + ".conv1")
    h = _conv(F.silu(_gn(h, sd, p + ".norm2", groups)), sd, p + ".conv2")
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(x, sd, p + ".nin_shortcut")
    return x + h


def plain_encoder(sd: dict[str, Tensor], cfg: WeTokConfig, x: Tensor) -> Tensor:
    """Images (B, 3, H, W) -> latent (B, z, H/f, W/f); ``sd`` holds the ``encoder.*`` entries."""
    g, n = cfg.norm_groups, cfg.num_res_blocks
    h = _conv(x, sd, "encoder.conv_in")
    for i in range(len(cfg.ch_mult)):
        for j in range(n):
            h = _resblock(h, sd, f"encoder.down.{i}.block.{j}", g)
        if i < len(cfg.ch_mult) - 1:
            w = sd[f"encoder.down.{i}.downsample.weight"]
            h = F.conv2d(h, w, sd[f"encoder.down.{i}.downsample.bias"], stride=2, padding=1)
    for j in range(n):
        h = _resblock(h, sd, f"encoder.mid_block.{j}", g)
    return _conv(F.silu(_gn(h, sd, "encoder.norm_out", g)), sd, "encoder.conv_out")


def _adaptive(x: Tensor, z: Tensor, sd: dict[str, Tensor], p: str, groups: int) -> Tensor:
    flat = z.flatten(2)
    std = torch.sqrt(flat.var(-1, unbiased=True) + 1e-6)
    scale = F.linear(std, sd[p + ".gamma.weight"], sd[p + ".gamma.bias"])[..., None, None]
    shift = F.linear(flat.mean(-1), sd[p + ".beta.weight"], sd[p + ".beta.bias"])[..., None, None]
    return F.group_norm(x, groups, eps=EPS) * scale + shift


def plain_decoder(sd: dict[str, Tensor], cfg: WeTokConfig, z: Tensor, noise: Tensor | None = None) -> Tensor:
    """Codes (B, z, h, w) of +1/-1 -> images (B, 3, h*f, w*f); ``noise`` for the generative decoder."""
    g, n = cfg.norm_groups, cfg.num_res_blocks
    h = _conv(z if noise is None else torch.cat([z, noise], 1), sd, "decoder.conv_in")
    for j in range(n):
        h = _resblock(h, sd, f"decoder.mid_block.{j}", g)
    for i in reversed(range(len(cfg.ch_mult))):
        h = _adaptive(h, z, sd, f"decoder.adaptive.{i}", g)
        for j in range(n):
            h = _resblock(h, sd, f"decoder.up.{i}.block.{j}", g)
        if i > 0:
            h = F.pixel_shuffle(_conv(h, sd, f"decoder.up.{i}.upsample.conv1"), 2)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out", g)), sd, "decoder.conv_out")


def plain_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A contiguous float32 copy of a model's state dict (independent of any later in-place optimisation)."""
    return {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}


def plain_indices(u: Tensor, cfg: WeTokConfig) -> Tensor:
    """Latent (B, d, h, w) -> indices (B, h, w, g) of its signs, bit j of a group = its channel j, LSB first."""
    b, d, h, w = u.shape
    bits = (u > 0).permute(0, 2, 3, 1).reshape(b, h, w, cfg.groups, cfg.bits_per_group).long()
    return (bits << torch.arange(cfg.bits_per_group)).sum(-1)


@torch.no_grad()
def plain_decode(sd: dict[str, Tensor], cfg: WeTokConfig, indices: Tensor) -> Tensor:
    """Indices (B, h, w, g) -> images (B, 3, H, W), deterministic decoder."""
    b, h, w, g = indices.shape
    bits = (indices.unsqueeze(-1) >> torch.arange(cfg.bits_per_group)) & 1
    codes = torch.where(bits.bool(), 1.0, -1.0).to(sd["decoder.conv_in.weight"].dtype)
    codes = codes.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    return plain_decoder(sd, cfg, codes)
