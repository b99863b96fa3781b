"""An independent, functional re-statement of the official decoder (spec §1.1), for tests only.

It reads weights in the official layout (official names, DCR depth-to-space order) straight from a state dict,
and implements depth-to-space by its defining formula, so it shares no code with wetok's modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def depth_to_space_dcr(x: torch.Tensor) -> torch.Tensor:
    """output[c, 2h+i, 2w+j] = input[(2i+j)*C' + c, h, w], written with explicit index loops over (i, j)."""
    b, c4, h, w = x.shape
    c = c4 // 4
    out = x.new_empty(b, c, 2 * h, 2 * w)
    for i in range(2):
        for j in range(2):
            out[:, :, i::2, j::2] = x[:, (2 * i + j) * c : (2 * i + j + 1) * c]
    return out


def _gn(x, sd, prefix, groups=32):
    return F.group_norm(x, groups, sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)


def _resblock(x, sd, p):
    h = F.conv2d(F.silu(_gn(x, sd, p + ".norm1")), sd[p + ".conv1.weight"], padding=1)
    h = F.conv2d(F.silu(_gn(h, sd, p + ".norm2")), sd[p + ".conv2.weight"], padding=1)
    if p + ".nin_shortcut.weight" in sd:
        x = F.conv2d(x, sd[p + ".nin_shortcut.weight"])
    return x + h


def _adagn(x, style, sd, p):
    flat = style.flatten(2)
    std = torch.sqrt(flat.var(-1, unbiased=True) + 1e-6)
    scale = F.linear(std, sd[p + ".gamma.weight"], sd[p + ".gamma.bias"])
    shift = F.linear(flat.mean(-1), sd[p + ".beta.weight"], sd[p + ".beta.bias"])
    return F.group_norm(x, 32, eps=1e-6) * scale[..., None, None] + shift[..., None, None]


def official_decode(sd: dict, z: torch.Tensor, levels: int, num_res_blocks: int, noise=None) -> torch.Tensor:
    """Run the official (GAN)Decoder from an official-layout state dict with prefix ``decoder.`` stripped."""
    inp = z if noise is None else torch.cat([z, noise], dim=1)
    h = F.conv2d(inp, sd["conv_in.weight"], sd["conv_in.bias"], padding=1)
    for j in range(num_res_blocks):
        h = _resblock(h, sd, f"mid_block.{j}")
    for i in reversed(range(levels)):
        h = _adagn(h, z, sd, f"adaptive.{i}")
        for j in range(num_res_blocks):
            h = _resblock(h, sd, f"up.{i}.block.{j}")
        if i > 0:
            h = depth_to_space_dcr(
                F.conv2d(h, sd[f"up.{i}.upsample.conv1.weight"], sd[f"up.{i}.upsample.conv1.bias"], padding=1)
            )
    h = F.silu(_gn(h, sd, "norm_out"))
    return F.conv2d(h, sd["conv_out.weight"], sd["conv_out.bias"], padding=1)
