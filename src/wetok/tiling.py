"""Tiled encoding and decoding, so that memory stays bounded on large images.

Both work on a grid of overlapping tiles laid out in token units (:func:`tile_spans`): every tile is ``tile``
tokens wide (except when the whole side is shorter), neighbours overlap by at least ``overlap`` tokens, and the
tiles are spread evenly so the last one ends at the border.

* :func:`encode_tiled` encodes the pixels under each tile and keeps the tokens of the tile's *core*: the overlap
  between two neighbours is split at its middle, so every token comes from the tile where it has the most context.
* :func:`decode_tiled` decodes each tile of tokens and blends the pixels of overlapping tiles with a raised-cosine
  ramp across the overlap (weights normalised to sum to one), so there is no visible seam.

The encoder and decoder are convolutional, but their GroupNorm / adaptive GroupNorm statistics are computed over the
whole input, so tiles see slightly different statistics than the full image: that is the (measured) seam cost,
see ``benchmarks/bench_tiling.py``. A tile that covers the whole image gives exactly the untiled result.
Peak memory is that of one tile plus the (B, 3, H, W) float32 output and the token map.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .autoencoder import draw_noise
from .model import WeTok

__all__ = ["NoiseStream", "decode_tiled", "encode_tiled", "reconstruct_tiled", "tile_count", "tile_spans"]


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spread [start, stop) spans of ``tile`` covering [0, length), neighbours overlapping >= ``overlap``.

    One span (0, length) when ``length <= tile``.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [(s, s + tile) for s in starts]


def _cores(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Split every overlap between neighbouring spans at its middle: a partition of [0, length)."""
    cuts = [0] + [(spans[i][1] + spans[i + 1][0]) // 2 for i in range(len(spans) - 1)] + [spans[-1][1]]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _ramp(spans: list[tuple[int, int]], index: int, scale: int, device: torch.device) -> Tensor:
    """Blending weight along one axis for tile ``index`` (in pixels): 1 inside, a raised cosine over overlaps."""
    start, stop = spans[index]
    weight = torch.ones((stop - start) * scale, dtype=torch.float64, device=device)
    n = (spans[index - 1][1] - start) * scale if index > 0 else 0
    if n > 0:  # rises across the overlap with the previous tile
        t = (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n
        weight[:n] = 0.5 - 0.5 * torch.cos(math.pi * t)
    n = (stop - spans[index + 1][0]) * scale if index < len(spans) - 1 else 0
    if n > 0:  # falls across the overlap with the next tile
        t = (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n
        weight[-n:] = weight[-n:] * (0.5 + 0.5 * torch.cos(math.pi * t))
    return weight


def _check_tile(tile: int, overlap: int | None) -> int:
    overlap = tile // 4 if overlap is None else overlap
    if tile < 2:  # the adaptive GroupNorm of the decoder needs at least two positions
        raise ValueError(f"tile must be at least 2 tokens, got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must lie in [0, tile/2], got {overlap} for tile {tile}")
    return overlap


@torch.no_grad()
def encode_tiled(
    model: WeTok,
    images: Tensor,
    *,
    tile: int = 32,
    overlap: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Indices (B, h, w, g) of ``images`` (B, 3, H, W), H and W multiples of f, encoded tile by tile.

    ``tile`` and ``overlap`` are in tokens (pixels / f); ``overlap`` defaults to tile // 4. ``images`` may live on
    the CPU while the model is on an accelerator: each tile is moved to the model's device.
    """
    overlap = _check_tile(tile, overlap)
    f = model.downsample_factor
    b, _, height, width = images.shape
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not a multiple of f={f}; pad it first")
    h, w = height // f, width // f
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    indices = torch.empty((b, h, w, model.config.groups), dtype=torch.int64)
    for (r0, r1), (cr0, cr1) in zip(rows, _cores(rows), strict=True):
        for (c0, c1), (cc0, cc1) in zip(cols, _cores(cols), strict=True):
            crop = images[:, :, r0 * f : r1 * f, c0 * f : c1 * f].to(device=device, dtype=dtype).contiguous()
            tile_indices = model.encode(crop).indices.cpu()
            indices[:, cr0:cr1, cc0:cc1] = tile_indices[:, cr0 - r0 : cr1 - r0, cc0 - c0 : cc1 - c0]
            if progress is not None:
                progress(1)
    return indices


@torch.no_grad()
def decode_tiled(
    model: WeTok,
    indices: Tensor,
    *,
    tile: int = 32,
    overlap: int | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_scale: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Images (B, 3, h*f, w*f), float32 on the CPU and not clamped, from indices (B, h, w, g), tile by tile.

    With the generative decoder the noise for the whole token map (B, d, h, w) is drawn once from ``generator``
    (or given as ``noise``) and cropped per tile, so a tile covering the whole map equals ``model.decode``.
    """
    overlap = _check_tile(tile, overlap)
    f = model.downsample_factor
    b, h, w, _ = indices.shape
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if model.config.generative_decoder and noise is None:
        noise = draw_noise((b, model.config.z_channels, h, w), generator)
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    single = len(rows) == 1 and len(cols) == 1
    out = torch.zeros((b, 3, h * f, w * f), dtype=torch.float32)
    total = None if single else torch.zeros((h * f, w * f), dtype=torch.float32)
    for i, (r0, r1) in enumerate(rows):
        wy = _ramp(rows, i, f, torch.device("cpu"))
        for j, (c0, c1) in enumerate(cols):
            tile_noise = None if noise is None else noise[:, :, r0:r1, c0:c1].to(device=device, dtype=dtype)
            pixels = model.decode(indices[:, r0:r1, c0:c1].to(device), noise=tile_noise,
                                  noise_scale=noise_scale).float().cpu()
            if single:
                out = pixels
            else:
                weight = (wy[:, None] * _ramp(cols, j, f, torch.device("cpu"))[None, :]).float()
                out[:, :, r0 * f : r1 * f, c0 * f : c1 * f] += pixels * weight
                total[r0 * f : r1 * f, c0 * f : c1 * f] += weight
            if progress is not None:
                progress(1)
    return out if single else out.div_(total)


def reconstruct_tiled(
    model: WeTok,
    images: Tensor,
    *,
    tile: int = 32,
    overlap: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`encode_tiled` then :func:`decode_tiled`: (B, 3, H, W) float32 on the CPU, not clamped."""
    indices = encode_tiled(model, images, tile=tile, overlap=overlap)
    return decode_tiled(model, indices, tile=tile, overlap=overlap, generator=generator)


def tile_count(height: int, width: int, f: int, tile: int, overlap: int | None = None) -> int:
    """Number of tiles :func:`encode_tiled` / :func:`decode_tiled` visit for an H x W image (for progress bars)."""
    overlap = _check_tile(tile, overlap)
    return len(tile_spans(height // f, tile, overlap)) * len(tile_spans(width // f, tile, overlap))


class NoiseStream:
    """The generative decoder's noise for a batch of token maps, (B, d, h, w), handed out a few images at a time.

    The pieces are exactly those of one ``draw_noise((B, d, h, w), generator)``, so decoding a batch in slices
    gives the images of decoding it whole, while holding the noise of a slice only. This relies on how torch draws
    float32 normals on the CPU (blocks of 16 values; a draw whose length is not a multiple of 16 redraws its last
    16): the stream draws pieces whose lengths are multiples of 16, except the last, which is at least 16 long.
    ``tests/test_hostile_tokens.py`` checks the equality.
    """

    def __init__(self, shape: tuple[int, int, int, int], generator: torch.Generator | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.per_image = math.prod(self.shape[1:])
        self.left = self.shape[0] * self.per_image  # values not drawn yet
        self.generator = generator
        self.buffer = torch.empty(0)

    def take(self, images: int) -> Tensor:
        """Noise (images, d, h, w) of the next ``images`` images."""
        need = images * self.per_image
        if need > self.buffer.numel() + self.left:
            raise ValueError(f"only {(self.buffer.numel() + self.left) // self.per_image} images of noise left")
        if need > self.buffer.numel():
            size = -(-(need - self.buffer.numel()) // 16) * 16
            if size > self.left - 16:  # the last piece: everything left, so that it is at least 16 long
                size = self.left
            self.left -= size
            self.buffer = torch.cat([self.buffer, draw_noise((size,), self.generator)])
        out, self.buffer = self.buffer[:need], self.buffer[need:]
        return out.view(images, *self.shape[1:])
