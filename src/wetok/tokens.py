"""Token files: the JSON of the public fork's ``generate_wetok.py`` and a compact bit-packed ``.wtok``.

Both hold the indices of :class:`wetok.Tokens` (int64 (B, h, w, g), one index in [0, 2^d') per position and group)
plus what decoding needs: the size the encoder saw, the padding added to reach a multiple of f, the original image
size and the identity of the model that made them: its architecture (:meth:`WeTokConfig.identity`) and its
encoder + quantizer weights (:attr:`WeTok.weights_id`, 16 hex digits of a SHA-256). Decoding refuses tokens whose
identity differs from the decoding model's; files written before the weights identity was recorded (and the
fork's, which record neither) still load, checked on what they record.

JSON (``.json``), the fork's schema field for field::

    {"wetok": {"data": base64(flat indices as little-endian <dtype>), "dtype": "uint8" | "uint16" | "int64",
               "shape": [B*h*w*g]},
     "config": YAML path or null, "ckpt": checkpoint path or null, "image_size": requested short side (0 = none),
     "height": H, "width": W,                       # model input size, multiples of f
     "original_height": H0, "original_width": W0,   # the image before resizing and padding
     "wetok_meta": {...}}                           # ours: model_id, weights_id, groups, bits, h, w, padding, ...

The flat order is (batch, h, w, group), group fastest. dtype is uint8 when every index is below 256, uint16 below
65536, else int64. Files without ``wetok_meta`` (written by the fork) are read with the geometry of the model they
are decoded with: h = height / f, w = width / f, g = model groups.

Binary (``.wtok``), version 1, every integer little-endian::

    offset  size  field
    0       4     magic b"WTOK"
    4       1     version (1)
    5       1     bits per group d' (1..62)
    6       2     groups g
    8       2     batch B
    10      4     h, token rows
    14      4     w, token columns
    18      4     H, model input height (= h * f)
    22      4     W, model input width (= w * f)
    26      4     H0, original image height
    30      4     W0, original image width
    34      4x2   padding left, right, top, bottom (pixels added to the resized image; u16 each)
    42      1     n, length of the model identity
    43      n     model identity, ASCII: the architecture identity, then ":" and the weights identity
                  (files written before the weights identity have the architecture identity only)
    43+n    1     m, length of the model name
    44+n    m     the --model the file was made with, UTF-8 (informative, for messages; may be empty)
    44+n+m  P     payload: ceil(B*h*w*g*d' / 8) bytes
    end-4   4     CRC-32 (zlib) of every byte before it

Payload bit order: the indices in flat (batch, h, w, group) order, each written as d' bits least significant bit
first, into a bit stream that fills each byte from its least significant bit (``numpy.packbits(...,
bitorder="little")``). Since bit j of an index is channel j of its group, the stream is also the sign bits of the
quantized latent in (batch, h, w, channel) order. Unused high bits of the last byte are zero.

Reading (:func:`load_tokens`, :mod:`wetok.token_format`) treats a file as untrusted: its header and fields are
checked against each other and against the decoding model, and each image it decodes to is bounded
(:data:`DEFAULT_MAX_PIXELS`), before any index is expanded.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ._files import atomic_write
from ._limits import DEFAULT_MAX_PIXELS
from .errors import ModelMismatchError

__all__ = [
    "MAGIC",
    "VERSION",
    "Tokens",
    "check_model",
    "load_tokens",
    "pack_indices",
    "save_tokens",
    "unpack_indices",
    "wtok_size",
]

MAGIC = b"WTOK"
VERSION = 1
JSON_META_KEY = "wetok_meta"
IDENTITY_SEPARATOR = ":"
_HEADER = struct.Struct("<4sBBHHIIIIII4HB")  # everything up to and including the identity length
_CRC = struct.Struct("<I")
FORMATS = ("json", "wtok")


class ModelGeometry(Protocol):
    """What a token file needs from a model config (duck-typed :class:`wetok.WeTokConfig`)."""

    groups: int
    bits_per_group: int

    @property
    def downsample_factor(self) -> int: ...

    def identity(self) -> str: ...


@dataclass
class Tokens:
    """Discrete tokens of a batch of images with what decoding needs; what :meth:`WeTok.encode` returns and what
    token files hold (:meth:`save` / :meth:`load`).

    ``indices``: int64 (B, h, w, g), one index in [0, 2^bits_per_group) per position and group (bit j of a group
    is its channel j, least significant first). ``image_size``: (H, W) the encoder saw, multiples of f.
    ``model_id``: :meth:`WeTokConfig.identity` of the model that made them (the architecture; None for files
    written by the fork). ``weights_id``: :attr:`WeTok.weights_id`, the hash of that model's encoder and quantizer
    weights (None in files written before wetok recorded it: then only the architecture is checked).
    ``padding``: (left, right, top, bottom) pixels :func:`wetok.image.pad_to_multiple` added, removed by
    :func:`wetok.image.unpad`. ``original_size``: (H0, W0) of the image before any resize (default: the unpadded
    size); decoding resizes back to it when it differs from the unpadded size. ``groups`` is the last dimension
    of ``indices``.
    """

    indices: Tensor
    image_size: tuple[int, int]
    _: KW_ONLY
    bits_per_group: int
    model_id: str | None = None
    groups: int | None = None
    weights_id: str | None = None
    original_size: tuple[int, int] | None = None
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    model: str | None = None  # the --model the tokens were made with, for messages
    config: str | None = None  # fork field: YAML path
    ckpt: str | None = None  # fork field: checkpoint path
    requested_size: int = 0  # fork field "image_size": the short side asked for, 0 = original size
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.padding = tuple(int(p) for p in self.padding)  # type: ignore[assignment]
        if self.indices.dim() >= 1:
            last = int(self.indices.shape[-1])
            if self.groups is not None and self.groups != last:
                raise ValueError(f"groups={self.groups}, but the indices' last dimension is {last}")
            self.groups = last
        if self.original_size is None:
            self.original_size = self.resized_size
        self.original_size = (int(self.original_size[0]), int(self.original_size[1]))

    @property
    def grid_size(self) -> tuple[int, int]:
        return int(self.indices.shape[1]), int(self.indices.shape[2])

    @property
    def resized_size(self) -> tuple[int, int]:
        """(H1, W1): the model input size without the padding."""
        left, right, top, bottom = self.padding
        return self.image_size[0] - top - bottom, self.image_size[1] - left - right

    def to(self, device: torch.device | str) -> Tokens:
        return replace(self, indices=self.indices.to(device))

    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write a token file: ``fmt`` "json" (the fork's schema) or "wtok" (bit-packed); default from the suffix
        (``.wtok``, else JSON). Written to a temporary file, then renamed."""
        return save_tokens(path, self, fmt)

    @classmethod
    def load(cls, path: str | Path, model: Any = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tokens:
        """Read a token file of either format (see :func:`load_tokens`; ``model`` is the decoding model or its
        config, whose identity the tokens must match; ``max_pixels`` bounds each image it decodes to)."""
        return load_tokens(path, model, max_pixels=max_pixels)


# ----------------------------------------------------------------------------------------------------- bit packing
def pack_indices(indices: np.ndarray | Tensor, bits: int) -> bytes:
    """Flat indices in [0, 2^bits) -> ceil(n * bits / 8) bytes, LSB first (see the module docstring)."""
    flat = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices).reshape(-1).astype("<u8")
    # (n, 64) little-endian bits of each value, keep the low ``bits``
    value_bits = np.unpackbits(flat.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
    return np.packbits(value_bits.reshape(-1), bitorder="little").tobytes()


def unpack_indices(data: bytes | memoryview, count: int, bits: int, offset_bits: int = 0) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``count`` int64 indices of ``bits`` bits from the packed bytes, starting
    ``offset_bits`` bits into them. Costs ``bits + 16`` bytes per index."""
    first, skip = divmod(offset_bits, 8)
    stop = math.ceil((offset_bits + count * bits) / 8)
    if stop > len(data):
        raise ValueError(f"{count} indices of {bits} bits at bit {offset_bits} need {stop} bytes, got {len(data)}")
    chunk = np.frombuffer(data, dtype=np.uint8, count=stop - first, offset=first)
    stream = np.unpackbits(chunk, bitorder="little")[skip : skip + count * bits].reshape(count, bits)
    out = np.zeros(count, dtype=np.int64)
    for j in range(bits):
        out |= stream[:, j].astype(np.int64) << j
    return out


def wtok_size(batch: int, h: int, w: int, groups: int, bits_per_group: int, model_id: str, model: str = "",
              weights_id: str | None = None) -> int:
    """Bytes of a ``.wtok`` file: header (44 + identity + model name) + ceil(B*h*w*g*d'/8) payload + 4-byte CRC."""
    names = len(_identity_bytes(model_id, weights_id)) + 1 + len(_model_name_bytes(model))
    return _HEADER.size + names + math.ceil(batch * h * w * groups * bits_per_group / 8) + _CRC.size


def _model_name_bytes(model: str | None) -> bytes:
    return (model or "").encode("utf-8")[:255]


def _identity_bytes(model_id: str, weights_id: str | None) -> bytes:
    """The .wtok identity field: the architecture identity, then ``:`` and the weights identity when known."""
    return (model_id if weights_id is None else f"{model_id}{IDENTITY_SEPARATOR}{weights_id}").encode("ascii")


# ----------------------------------------------------------------------------------------------------- writing
def _check_record(tf: Tokens) -> None:
    if tf.indices.dim() != 4:
        raise ValueError(f"indices must be (B, h, w, g), got shape {tuple(tf.indices.shape)}")
    if tf.indices.is_floating_point():
        raise TypeError("indices must be an integer tensor")
    n = tf.indices.numel()
    if n and (int(tf.indices.min()) < 0 or int(tf.indices.max()) >= 2**tf.bits_per_group):
        raise ValueError(f"indices must lie in [0, 2^{tf.bits_per_group})")


def to_json_dict(tf: Tokens) -> dict[str, Any]:
    """The fork-schema dict (plus ``wetok_meta``) for ``tf``."""
    _check_record(tf)
    flat = tf.indices.detach().cpu().reshape(-1).numpy()
    top = int(flat.max()) if flat.size else 0
    dtype = "uint8" if top < 256 else "uint16" if top < 65536 else "int64"
    data = flat.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    b, h, w, g = tf.indices.shape
    meta = {
        "format_version": VERSION,
        "model_id": tf.model_id,
        "weights_id": tf.weights_id,
        "model": tf.model,
        "batch": int(b),
        "latent_height": int(h),
        "latent_width": int(w),
        "groups": int(g),
        "bits_per_group": tf.bits_per_group,
        "padding": list(tf.padding),
        **tf.extra,
    }
    return {
        "wetok": {"data": base64.b64encode(data).decode("ascii"), "dtype": dtype, "shape": [int(flat.size)]},
        "config": tf.config,
        "ckpt": tf.ckpt,
        "image_size": tf.requested_size,
        "height": tf.image_size[0],
        "width": tf.image_size[1],
        "original_height": tf.original_size[0],
        "original_width": tf.original_size[1],
        JSON_META_KEY: meta,
    }


def to_wtok_bytes(tf: Tokens) -> bytes:
    """The ``.wtok`` encoding of ``tf`` (layout in the module docstring)."""
    _check_record(tf)
    if tf.model_id is None:
        raise ValueError("a .wtok file needs the model identity")
    ident = _identity_bytes(tf.model_id, tf.weights_id)
    if len(ident) > 255:
        raise ValueError("the model identity is longer than 255 bytes")
    b, h, w, g = (int(s) for s in tf.indices.shape)
    name = _model_name_bytes(tf.model)
    header = _HEADER.pack(MAGIC, VERSION, tf.bits_per_group, g, b, h, w, *tf.image_size, *tf.original_size,
                          *tf.padding, len(ident)) + ident + bytes([len(name)]) + name
    body = header + pack_indices(tf.indices, tf.bits_per_group)
    return body + _CRC.pack(zlib.crc32(body))


def format_for(path: str | Path, fmt: str | None = None) -> str:
    """The token format: ``fmt`` if given, else from the suffix (``.wtok`` -> wtok, anything else -> json)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    return "wtok" if Path(path).suffix.lower() == ".wtok" else "json"


def save_tokens(path: str | Path, tf: Tokens, fmt: str | None = None) -> Path:
    """Write ``tf`` to ``path`` (a temporary file renamed into place, so no half-written file is left)."""
    path = Path(path)
    fmt = format_for(path, fmt)
    data = to_wtok_bytes(tf) if fmt == "wtok" else json.dumps(to_json_dict(tf)).encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


# ----------------------------------------------------------------------------------------------------- reading
def load_tokens(path: str | Path, model: Any = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tokens:
    """Read and validate a ``.json`` or ``.wtok`` token file (the format is sniffed from the content).

    ``model`` is the decoding :class:`wetok.WeTok` (or only its :class:`wetok.WeTokConfig`). With it the tokens'
    model identity must match (:class:`ModelMismatchError` otherwise, see :func:`check_model`), and files without
    our metadata (the fork's) take their geometry from it. Every other defect (truncation, bad magic, unknown
    version, checksum or field inconsistencies, an original size that no resize explains, an image of more than
    ``max_pixels`` pixels: default Pillow's bomb limit, None = no limit) raises :class:`InputError` naming the
    file, before the indices are expanded (:mod:`wetok.token_format`; :func:`wetok.token_format.open_tokens`
    reads a large batch a slice at a time).
    """
    from .token_format import open_tokens

    return open_tokens(path, model, max_pixels=max_pixels).load()


def _config_of(model: Any) -> ModelGeometry | None:
    return getattr(model, "config", model)


def check_model(path: str | Path, tf: Tokens, model: Any) -> None:
    """Raise :class:`ModelMismatchError` if ``tf`` was not made by ``model`` (a :class:`wetok.WeTok`, or a config).

    The architecture identities must agree (when the tokens record one), and, when both the tokens and ``model``
    know it, so must the identity of the encoder and quantizer weights (:attr:`wetok.WeTok.weights_id`): tokens
    of another trained model of the same architecture are refused. A stage-2 model made by
    :meth:`wetok.WeTok.to_generative` keeps the stage-1 encoder and so decodes its tokens. Files written before
    weights identities were recorded are checked on the architecture only.
    """
    config = _config_of(model)
    made = f" ({_printable(tf.model)})" if tf.model else ""
    if tf.model_id is not None and tf.model_id != config.identity():
        raise ModelMismatchError(
            f"{path}: tokens were made by model {_printable(tf.model_id)}{made}, but the decoding model is "
            f"{config.identity()}; pass the matching --model"
        )
    weights_id = getattr(model, "weights_id", None)
    if tf.weights_id is not None and weights_id is not None and tf.weights_id != weights_id:
        raise ModelMismatchError(
            f"{path}: tokens were made by a model with other trained weights{made} (encoder weights "
            f"{_printable(tf.weights_id)}, the decoding model's are {weights_id}); its decoder would give a wrong image, "
            "pass the --model that made them"
        )
    if tf.groups != config.groups or tf.bits_per_group != config.bits_per_group:
        raise ModelMismatchError(
            f"{path}: tokens have {tf.groups} groups of {tf.bits_per_group} bits, the model has "
            f"{config.groups} groups of {config.bits_per_group} bits"
        )
    f = config.downsample_factor
    h, w = tf.grid_size
    if tf.image_size != (h * f, w * f):
        raise ModelMismatchError(
            f"{path}: a {h}x{w} token map does not give the recorded {tf.image_size[0]}x{tf.image_size[1]} "
            f"image with the model's downsampling factor {f}"
        )


def _printable(text: str) -> str:
    """``text`` read from a file, for a message: non-printable characters (newlines, escapes) escaped."""
    return text if text.isprintable() else repr(text)[1:-1]
