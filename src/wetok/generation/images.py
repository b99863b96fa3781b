"""From class labels to images: sample token maps with a :class:`WeTokAR`, decode them with its tokenizer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..image import to_uint8
from ..pipeline import decode_indices

if TYPE_CHECKING:
    from ..model import WeTok
    from .model import WeTokAR

#: Most pixels the tokenizer decodes at once (64 images of 256 x 256): larger batches are decoded in parts, so
#: the decoder's memory does not grow with the batch size.
MAX_DECODE_PIXELS = 1 << 22


def iter_images(
    model: WeTokAR,
    labels: Sequence[int] | Tensor,
    *,
    tokenizer: WeTok | None = None,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    noise_seed: int = 0,
    progress: bool = False,
    **sampling: Any,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (labels (b,), uint8 images (b, H, W, 3) on the CPU) batch by batch, ``batch_size`` labels at a time.

    ``tokenizer`` defaults to ``model.tokenizer``; ``sampling`` goes to :meth:`WeTokAR.generate` (``cfg_scale``,
    ``temperature``, ``top_k``, ``top_p``, ``compile``). One ``generator`` serves all batches, so samples depend
    on ``batch_size``. Batches are decoded in parts of at most :data:`MAX_DECODE_PIXELS` pixels; a generative
    decoder's noise for the part starting at label i is seeded ``noise_seed + i``.
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer attached; pass tokenizer=")
    cfg, tok = model.config, tokenizer.config
    if (tok.groups, tok.bits_per_group) != (cfg.groups, cfg.bits_per_group):
        raise ValueError(f"tokenizer has {tok.groups} groups of {tok.bits_per_group} bits, the generator's tokens "
                         f"have {cfg.groups} sub-tokens of {cfg.bits_per_group} bits")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    f = tok.downsample_factor
    part = max(1, MAX_DECODE_PIXELS // (cfg.grid_height * f * cfg.grid_width * f))
    for start in range(0, labels.numel(), batch_size):
        batch = labels[start:start + batch_size]
        indices = model.generate(batch, generator=generator, progress=progress, **sampling).cpu()
        images = [to_uint8(decode_indices(tokenizer, indices[i:i + part], None, noise_seed + start + i))
                  for i in range(0, len(indices), part)]
        yield batch, torch.cat(images).permute(0, 2, 3, 1).contiguous()


def generate_images(model: WeTokAR, labels: Sequence[int] | Tensor, **kwargs: Any) -> Tensor:
    """All images of :func:`iter_images` at once: uint8 (N, H, W, 3)."""
    return torch.cat([images for _, images in iter_images(model, labels, **kwargs)])
