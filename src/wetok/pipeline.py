"""Images of any kind -> tokens -> images, with the resizing, padding and tiling of the ``wetok`` command.

:class:`WeTokPipeline` (or the functions :func:`encode`, :func:`decode`, :func:`reconstruct`) takes image files,
PIL images, numpy arrays or tensors of any size and mode and returns :class:`wetok.Tokens` and PIL images::

    from wetok import WeTokPipeline

    pipe = WeTokPipeline.from_pretrained("default")
    tokens = pipe.encode(["a.jpg", "b.png"])       # one wetok.Tokens per image
    images = pipe.decode(tokens)                  # PIL RGB images at the original sizes
    tokens[0].save("a.wtok")                      # wetok.tokens: the .json / .wtok file formats

Each image goes through the same steps as in the command line:

1. to RGB (:func:`load_image`: EXIF orientation applied, 16-bit scaled, transparency composited on white);
2. with ``size``, the short side is resized to ``size`` pixels (bicubic);
3. padded to a multiple of the model's f (:func:`wetok.image.pad_to_multiple`, ``pad_mode``);
4. encoded whole, or in overlapping tiles of ``tile`` pixels (:mod:`wetok.tiling`); by default images over
   :data:`AUTO_TILE_PIXELS` pixels are tiled in tiles of :data:`AUTO_TILE`, ``tile=0`` never tiles.

The tokens keep the padding and the original size, so decoding crops the padding away and resizes back
to the original size. Images are processed one at a time (they may differ in size).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .data import check_pixels, load_rgb, to_rgb
from .errors import InputError
from .image import pad_to_multiple, pil_to_tensor, tensor_to_pil, unpad
from .model import WeTok
from .tokens import Tokens, check_model

__all__ = [
    "AUTO_TILE",
    "AUTO_TILE_PIXELS",
    "ImageInput",
    "Prepared",
    "WeTokPipeline",
    "decode",
    "decode_indices",
    "encode",
    "encode_pixels",
    "finish_image",
    "load_image",
    "load_images",
    "prepare_image",
    "reconstruct",
    "tile_tokens",
]

#: Images with more pixels than this are tiled when ``tile`` is None.
AUTO_TILE_PIXELS = 1024 * 1024
#: The tile side (pixels) used then.
AUTO_TILE = 512

#: One image: a file path, a PIL image, a numpy array (H, W) / (H, W, C) or a tensor (C, H, W); C in 1..4.
ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


# ------------------------------------------------------------------------------------------------------ inputs
def _from_array(array: np.ndarray, what: str) -> Image.Image:
    """(H, W) or (H, W, C) array -> PIL. uint8 as is, uint16 scaled by 255/65535, bool to 0/255, floats in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in _MODES):
        raise ValueError(f"{what}: expected an image of shape (H, W) or (H, W, C) with C in 1..4, "
                         f"got {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{what}: empty image of shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array * (255.0 / 65535.0)).astype(np.uint8)  # as wetok.data.to_rgb reads 16-bit files
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{what}: float images must lie in [0, 1] (for [-1, 1] model tensors use "
                             "WeTok.encode, or pass (x + 1) / 2)")
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"{what}: unsupported dtype {array.dtype} (use uint8, uint16, bool or float in [0, 1])")
    mode = "L" if array.ndim == 2 else _MODES[array.shape[-1]]
    return to_rgb(Image.fromarray(np.ascontiguousarray(array), mode=mode))


def load_image(image: ImageInput, what: str = "image") -> Image.Image:
    """Any one image -> an RGB PIL image.

    Paths are decoded with :func:`wetok.data.load_rgb` (errors name the file). PIL images get their EXIF
    orientation applied like files and any mode converted by :func:`wetok.data.to_rgb`. Arrays are (H, W) or
    (H, W, C) (channels last, C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA); tensors are (C, H, W) (channels
    first); both are uint8, uint16 (scaled by 255/65535), bool, or float in [0, 1] (rounded to 1/255).
    """
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(Path(image))
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, Tensor):
        if image.dim() not in (2, 3) or (image.dim() == 3 and image.shape[0] not in _MODES):
            raise ValueError(f"{what}: expected a tensor (C, H, W) with C in 1..4, or (H, W), got "
                             f"{tuple(image.shape)}")
        if image.dim() == 3:
            image = image.permute(1, 2, 0)
        if image.dtype == torch.bfloat16 or image.dtype == torch.float16:
            image = image.float()
        return _from_array(image.detach().cpu().numpy(), what)
    if isinstance(image, np.ndarray):
        return _from_array(image, what)
    raise TypeError(f"{what}: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")


def _image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, Tensor) and images.dim() == 4:
        return list(images.unbind(0))
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, Tensor)):
        return [images]
    return list(images)


def load_images(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """One image, a sequence of images, or a batch (an array (B, H, W, C) / a tensor (B, C, H, W)) -> RGB PILs."""
    return [load_image(image, f"image {i}") for i, image in enumerate(_image_list(images))]


def _each_image(images: ImageInput | Sequence[ImageInput], progress: bool, desc: str) -> Iterator[Image.Image]:
    """The images one at a time (each decoded when its turn comes), with a bar over several when ``progress``."""
    from tqdm.auto import tqdm

    items = _image_list(images)
    for i, image in enumerate(tqdm(items, desc=desc, unit="image", disable=not progress or len(items) < 2)):
        yield load_image(image, f"image {i}")


# ------------------------------------------------------------------------------------------------------ steps
@dataclass
class Prepared:
    """An image ready for the model: (1, 3, H, W) in [-1, 1], plus how to undo the resize and padding."""

    pixels: Tensor
    padding: tuple[int, int, int, int]
    original_size: tuple[int, int]


def prepare_image(image: Image.Image, f: int, size: int | None = None, pad_mode: str = "replicate") -> Prepared:
    """Resize the short side to ``size`` (if given, bicubic), convert to [-1, 1] and pad to a multiple of ``f``.

    Sizes over :func:`wetok.data.max_pixels` (after the resize, and after padding) raise :class:`InputError`
    before anything is allocated."""
    original = (image.height, image.width)
    if size is not None:
        if size < 1:
            raise InputError("--size", f"must be a positive number of pixels, got {size}")
        scale = size / min(original)
        new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        check_pixels("--size", new[1], new[0], f"{size} makes this {image.width} x {image.height} image")
        if new != image.size:
            image = image.resize(new, Image.Resampling.BICUBIC)
    height, width = image.height, image.width
    check_pixels("image", height + (-height) % f, width + (-width) % f, f"padded to a multiple of {f}, it is")
    pixels, padding = pad_to_multiple(pil_to_tensor(image)[None], f, pad_mode)
    return Prepared(pixels.contiguous(), tuple(int(p) for p in padding), original)


def finish_image(pixels: Tensor, padding: Sequence[int], original_size: Sequence[int]) -> Image.Image:
    """Model output (1, 3, H, W) -> PIL RGB at the original size: crop the padding, undo the resize (bicubic)."""
    image = tensor_to_pil(unpad(pixels, tuple(padding))[0].float())
    if (image.height, image.width) != tuple(original_size):
        image = image.resize((original_size[1], original_size[0]), Image.Resampling.BICUBIC)
    return image


def tile_tokens(tile: int | None, height: int, width: int, f: int) -> int | None:
    """A tile size in pixels (None: automatic, 0: never) -> tokens per tile for :mod:`wetok.tiling`, or None."""
    if tile is None:
        tile = AUTO_TILE if height * width > AUTO_TILE_PIXELS else 0
    if tile == 0:
        return None
    if tile < 2 * f:
        raise InputError("--tile", f"must be at least {2 * f} pixels (two tokens) for this model, got {tile}")
    return tile // f


def _tile_bar(show: bool, height: int, width: int, f: int, tokens: int, desc: str):
    """A per-tile progress bar, shown for images that take several tiles."""
    from tqdm.auto import tqdm

    from .tiling import tile_count

    total = tile_count(height, width, f, tokens)
    return tqdm(total=total, desc=desc, unit="tile", leave=False, disable=not show or total < 2)


@torch.inference_mode()
def encode_pixels(model: WeTok, pixels: Tensor, tile: int | None = None, show: bool = False) -> Tensor:
    """(1, 3, H, W) padded pixels -> int64 indices (1, h, w, g) on the CPU, tiled per :func:`tile_tokens`."""
    from .tiling import encode_tiled

    f = model.downsample_factor
    tokens = tile_tokens(tile, pixels.shape[-2], pixels.shape[-1], f)
    if tokens is None:
        param = next(model.parameters())
        return model.encode(pixels.to(device=param.device, dtype=param.dtype)).indices.cpu()
    with _tile_bar(show, pixels.shape[-2], pixels.shape[-1], f, tokens, "encoding tiles") as bar:
        return encode_tiled(model, pixels, tile=tokens, progress=bar.update)


@torch.inference_mode()
def decode_indices(model: WeTok, indices: Tensor, tile: int | None = None, seed: int | None = 0,
                   show: bool = False) -> Tensor:
    """Indices (B, h, w, g) -> float32 pixels (B, 3, H, W) on the CPU, not clamped, tiled per :func:`tile_tokens`.

    ``seed`` fixes the generative decoder's noise (drawn on the CPU, so it is the same on every device); None
    draws it from torch's global generator.
    """
    from .tiling import decode_tiled

    f = model.downsample_factor
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    height, width = indices.shape[1] * f, indices.shape[2] * f
    tokens = tile_tokens(tile, height, width, f)
    if tokens is None:
        tokens = max(indices.shape[1], indices.shape[2], 2)  # one tile: exactly model.decode, same noise draw
    with _tile_bar(show, height, width, f, tokens, "decoding tiles") as bar:
        return decode_tiled(model, indices, tile=tokens, generator=generator, progress=bar.update)


# ------------------------------------------------------------------------------------------------------ the API
def _encode_one(model: WeTok, image: Image.Image, size: int | None, tile: int | None, pad_mode: str,
                show: bool) -> Tokens:
    prepared = prepare_image(image, model.downsample_factor, size, pad_mode)
    indices = encode_pixels(model, prepared.pixels, tile, show)
    return Tokens(
        indices,
        (int(prepared.pixels.shape[-2]), int(prepared.pixels.shape[-1])),
        bits_per_group=model.config.bits_per_group,
        model_id=model.model_id,
        weights_id=model.weights_id,
        original_size=prepared.original_size,
        padding=prepared.padding,
        requested_size=size or 0,
    )


def encode(model: WeTok, images: ImageInput | Sequence[ImageInput], *, size: int | None = None,
           tile: int | None = None, pad_mode: str = "replicate", progress: bool = False) -> list[Tokens]:
    """Images (see :func:`load_images`) -> one :class:`Tokens` per image, each with its padding and original size.

    ``size``: resize the short side to this many pixels first (bicubic); ``tile``: tile side in pixels (None:
    automatic, 0: never); ``pad_mode``: see :func:`wetok.image.pad_to_multiple`.
    """
    return [_encode_one(model, image, size, tile, pad_mode, progress)
            for image in _each_image(images, progress, "encoding")]


def decode(model: WeTok, tokens: Tokens | Sequence[Tokens], *, tile: int | None = None,
           seed: int | None = 0, progress: bool = False) -> list[Image.Image]:
    """Tokens -> PIL RGB images at their original sizes (tokens of a batch give one image each).

    Tokens made by another model are refused (:class:`wetok.ModelMismatchError`). ``seed`` fixes the
    generative decoder's noise, drawn afresh for every Tokens (None: torch's global generator).
    """
    records = [tokens] if isinstance(tokens, Tokens) else list(tokens)
    out: list[Image.Image] = []
    f = model.downsample_factor
    for i, record in enumerate(records):
        check_model(f"tokens {i}", record, model)
        check_pixels(f"tokens {i}", record.indices.shape[1] * f, record.indices.shape[2] * f, "decoded at")
        check_pixels(f"tokens {i}", *record.original_size, "the original size is")
        pixels = decode_indices(model, record.indices, tile, seed, progress)
        out += [finish_image(pixels[b : b + 1], record.padding, record.original_size) for b in range(len(pixels))]
    return out


def reconstruct(model: WeTok, images: ImageInput | Sequence[ImageInput], *, size: int | None = None,
                tile: int | None = None, pad_mode: str = "replicate", seed: int | None = 0,
                progress: bool = False) -> list[Image.Image]:
    """Encode and decode images: PIL RGB reconstructions at the original sizes (see :func:`encode`, :func:`decode`)."""
    out = []
    for image in _each_image(images, progress, "reconstructing"):
        tokens = _encode_one(model, image, size, tile, pad_mode, progress)
        out += decode(model, tokens, tile=tile, seed=seed, progress=progress)
    return out


class WeTokPipeline:
    """A model plus the image settings of :func:`encode` / :func:`decode` / :func:`reconstruct`.

    ``size``, ``tile``, ``pad_mode`` and ``seed`` are the defaults of its methods; each call may override them.
    """

    def __init__(self, model: WeTok, *, size: int | None = None, tile: int | None = None,
                 pad_mode: str = "replicate", seed: int | None = 0, progress: bool = False) -> None:
        self.model = model
        self.settings: dict[str, Any] = dict(size=size, tile=tile, pad_mode=pad_mode, seed=seed, progress=progress)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, size: int | None = None, tile: int | None = None,
                        pad_mode: str = "replicate", seed: int | None = 0, progress: bool = False,
                        **model_kwargs: Any) -> WeTokPipeline:
        """A pipeline around :meth:`WeTok.from_pretrained` (``model_kwargs`` go to it), in eval mode."""
        model = WeTok.from_pretrained(name_or_path, **model_kwargs).eval().requires_grad_(False)
        return cls(model, size=size, tile=tile, pad_mode=pad_mode, seed=seed, progress=progress)

    def _with(self, names: tuple[str, ...], overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(names)
        if unknown:
            raise TypeError(f"unexpected settings {sorted(unknown)}; this method takes {list(names)}")
        return {k: overrides.get(k, self.settings[k]) for k in names}

    def encode(self, images: ImageInput | Sequence[ImageInput], **overrides: Any) -> list[Tokens]:
        return encode(self.model, images, **self._with(("size", "tile", "pad_mode", "progress"), overrides))

    def decode(self, tokens: Tokens | Sequence[Tokens], **overrides: Any) -> list[Image.Image]:
        return decode(self.model, tokens, **self._with(("tile", "seed", "progress"), overrides))

    def reconstruct(self, images: ImageInput | Sequence[ImageInput], **overrides: Any) -> list[Image.Image]:
        names = ("size", "tile", "pad_mode", "seed", "progress")
        return reconstruct(self.model, images, **self._with(names, overrides))

    __call__ = reconstruct

    def __repr__(self) -> str:
        return f"WeTokPipeline({self.model.config.name or 'WeTok'}, {self.settings})"

