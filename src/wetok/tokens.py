"""Token files: the JSON of the public fork's ``generate_wetok.py`` and a compact bit-packed ``.wtok``.

Both hold the indices of :class:`wetok.Tokens` (int64 (B, h, w, g), one index in [0, 2^d') per position and group)
plus what decoding needs: the size the encoder saw, the padding added to reach a multiple of f, the original image
size and the identity of the model (:meth:`WeTokConfig.identity`).

JSON (``.json``), the fork's schema field for field::

    {"wetok": {"data": base64(flat indices as little-endian <dtype>), "dtype": "uint8" | "uint16" | "int64",
               "shape": [B*h*w*g]},
     "config": YAML path or null, "ckpt": checkpoint path or null, "image_size": requested short side (0 = none),
     "height": H, "width": W,                       # model input size, multiples of f
     "original_height": H0, "original_width": W0,   # the image before resizing and padding
     "wetok_meta": {...}}                           # ours: model identity, groups, bits, h, w, padding, ...

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
    43      n     model identity, ASCII
    43+n    1     m, length of the model name
    44+n    m     the --model the file was made with, UTF-8 (informative, for messages; may be empty)
    44+n+m  P     payload: ceil(B*h*w*g*d' / 8) bytes
    end-4   4     CRC-32 (zlib) of every byte before it

Payload bit order: the indices in flat (batch, h, w, group) order, each written as d' bits least significant bit
first, into a bit stream that fills each byte from its least significant bit (``numpy.packbits(...,
bitorder="little")``). Since bit j of an index is channel j of its group, the stream is also the sign bits of the
quantized latent in (batch, h, w, channel) order. Unused high bits of the last byte are zero.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ._files import atomic_write
from .errors import InputError, ModelMismatchError

__all__ = [
    "MAGIC",
    "VERSION",
    "TokenFile",
    "load_tokens",
    "pack_indices",
    "save_tokens",
    "unpack_indices",
    "wtok_size",
]

MAGIC = b"WTOK"
VERSION = 1
JSON_META_KEY = "wetok_meta"
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


@dataclass(frozen=True)
class TokenFile:
    """The content of a token file.

    ``indices``: int64 (B, h, w, g). ``image_size``: (H, W) the encoder saw, multiples of f. ``padding``: (left,
    right, top, bottom) pixels that :func:`wetok.image.pad_to_multiple` added, removed by
    :func:`wetok.image.unpad`. ``original_size``: (H0, W0) of the image before any resize; decoding resizes back to
    it when it differs from the unpadded size. ``model_id`` is None for files written by the fork.
    """

    indices: Tensor
    bits_per_group: int
    image_size: tuple[int, int]
    original_size: tuple[int, int]
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    model_id: str | None = None
    model: str | None = None  # the --model the file was made with, for messages
    config: str | None = None  # fork field: YAML path
    ckpt: str | None = None  # fork field: checkpoint path
    requested_size: int = 0  # fork field "image_size": the short side asked for, 0 = original size
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return int(self.indices.shape[-1])

    @property
    def grid_size(self) -> tuple[int, int]:
        return int(self.indices.shape[1]), int(self.indices.shape[2])

    @property
    def resized_size(self) -> tuple[int, int]:
        """(H1, W1): the model input size without the padding."""
        left, right, top, bottom = self.padding
        return self.image_size[0] - top - bottom, self.image_size[1] - left - right


# ----------------------------------------------------------------------------------------------------- bit packing
def pack_indices(indices: np.ndarray | Tensor, bits: int) -> bytes:
    """Flat indices in [0, 2^bits) -> ceil(n * bits / 8) bytes, LSB first (see the module docstring)."""
    flat = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices).reshape(-1).astype("<u8")
    # (n, 64) little-endian bits of each value, keep the low ``bits``
    value_bits = np.unpackbits(flat.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
    return np.packbits(value_bits.reshape(-1), bitorder="little").tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``count`` int64 indices of ``bits`` bits from the packed bytes."""
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    value_bits = np.zeros((count, 64), dtype=np.uint8)
    value_bits[:, :bits] = stream.reshape(count, bits)
    return np.packbits(value_bits, axis=1, bitorder="little").reshape(-1).view("<u8").astype(np.int64)


def wtok_size(batch: int, h: int, w: int, groups: int, bits_per_group: int, model_id: str, model: str = "") -> int:
    """Bytes of a ``.wtok`` file: header (44 + identity + model name) + ceil(B*h*w*g*d'/8) payload + 4-byte CRC."""
    names = len(model_id.encode("ascii")) + 1 + len(_model_name_bytes(model))
    return _HEADER.size + names + math.ceil(batch * h * w * groups * bits_per_group / 8) + _CRC.size


def _model_name_bytes(model: str | None) -> bytes:
    return (model or "").encode("utf-8")[:255]


# ----------------------------------------------------------------------------------------------------- writing
def _check_record(tf: TokenFile) -> None:
    if tf.indices.dim() != 4:
        raise ValueError(f"indices must be (B, h, w, g), got shape {tuple(tf.indices.shape)}")
    if tf.indices.is_floating_point():
        raise TypeError("indices must be an integer tensor")
    n = tf.indices.numel()
    if n and (int(tf.indices.min()) < 0 or int(tf.indices.max()) >= 2**tf.bits_per_group):
        raise ValueError(f"indices must lie in [0, 2^{tf.bits_per_group})")


def to_json_dict(tf: TokenFile) -> dict[str, Any]:
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


def to_wtok_bytes(tf: TokenFile) -> bytes:
    """The ``.wtok`` encoding of ``tf`` (layout in the module docstring)."""
    _check_record(tf)
    if tf.model_id is None:
        raise ValueError("a .wtok file needs the model identity")
    ident = tf.model_id.encode("ascii")
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


def save_tokens(path: str | Path, tf: TokenFile, fmt: str | None = None) -> Path:
    """Write ``tf`` to ``path`` (a temporary file renamed into place, so no half-written file is left)."""
    path = Path(path)
    fmt = format_for(path, fmt)
    data = to_wtok_bytes(tf) if fmt == "wtok" else json.dumps(to_json_dict(tf)).encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


# ----------------------------------------------------------------------------------------------------- reading
def load_tokens(path: str | Path, config: ModelGeometry | None = None) -> TokenFile:
    """Read and validate a ``.json`` or ``.wtok`` token file (the format is sniffed from the content).

    With ``config`` (the decoding model's config) the file's model identity must match it
    (:class:`ModelMismatchError` otherwise), and files without our metadata (the fork's) take their geometry from
    it. Every other defect (truncation, bad magic, unknown version, checksum or field inconsistencies) raises
    :class:`InputError` naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a token file") from None
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror})") from None
    if not data:
        raise InputError(path, "empty file (0 bytes)")
    if data[:4] == MAGIC:
        tf = _parse_wtok(path, data)
    elif data.lstrip()[:1] == b"{":
        tf = _parse_json(path, data, config)
    elif MAGIC.startswith(data[:4]):
        raise InputError(path, "truncated .wtok file (shorter than its header)")
    else:
        raise InputError(path, "not a token file (neither .wtok magic nor JSON)")
    if config is not None:
        check_model(path, tf, config)
    return tf


def check_model(path: str | Path, tf: TokenFile, config: ModelGeometry) -> None:
    """Raise :class:`ModelMismatchError` if ``tf`` was not made by a model with ``config``'s architecture."""
    if tf.model_id is not None and tf.model_id != config.identity():
        made = f" ({tf.model})" if tf.model else ""
        raise ModelMismatchError(
            f"{path}: tokens were made by model {tf.model_id}{made}, but the decoding model is "
            f"{config.identity()}; pass the matching --model"
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


def _parse_wtok(path: Path, data: bytes) -> TokenFile:
    if len(data) < _HEADER.size:
        raise InputError(path, f"truncated .wtok file ({len(data)} bytes, shorter than its header)")
    (_, version, bits, g, b, h, w, height, width, h0, w0, pl, pr, pt, pb, n_id) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise InputError(path, f"unsupported .wtok version {version} (this wetok reads version {VERSION})")
    if not 1 <= bits <= 62 or min(g, b, h, w) == 0:
        raise InputError(path, "corrupt .wtok header (zero sizes or bits per group out of range)")
    n_name = data[_HEADER.size + n_id] if len(data) > _HEADER.size + n_id else 0
    start = _HEADER.size + n_id + 1 + n_name  # of the payload
    expected = start + math.ceil(b * h * w * g * bits / 8) + _CRC.size
    crc_ok = len(data) >= _HEADER.size + _CRC.size and (
        _CRC.unpack_from(data, len(data) - _CRC.size)[0] == zlib.crc32(data[: -_CRC.size])
    )
    if len(data) < expected and not crc_ok:
        raise InputError(path, f"truncated .wtok file ({len(data)} bytes, header says {expected})")
    if not crc_ok:
        raise InputError(path, "corrupt or tampered .wtok file (checksum mismatch)")
    if len(data) != expected:
        raise InputError(path, f"corrupt .wtok header ({len(data)} bytes, header says {expected})")
    try:
        model_id = data[_HEADER.size : _HEADER.size + n_id].decode("ascii")
        model = data[_HEADER.size + n_id + 1 : start].decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "corrupt .wtok header (model identity or name is not text)") from None
    payload = data[start : -_CRC.size]
    flat = unpack_indices(payload, b * h * w * g, bits)
    tf = TokenFile(
        indices=torch.from_numpy(flat).reshape(b, h, w, g),
        bits_per_group=bits,
        image_size=(height, width),
        original_size=(h0, w0),
        padding=(pl, pr, pt, pb),
        model_id=model_id,
        model=model or None,
    )
    _check_geometry(path, tf)
    return tf


def _json_int(path: Path, obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise InputError(path, f"token JSON lacks the field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(path, f"token JSON field {key!r} must be a non-negative integer, got {value!r}")
    return value


_JSON_DTYPES = {"uint8": "<u1", "uint16": "<u2", "int16": "<i2", "int32": "<i4", "uint32": "<u4", "int64": "<i8"}


def _parse_json(path: Path, data: bytes, config: ModelGeometry | None) -> TokenFile:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not a valid token JSON ({e})") from None
    if not isinstance(obj, dict) or "wetok" not in obj:
        raise InputError(path, "not a token JSON (no 'wetok' field)")
    block = obj["wetok"]
    if isinstance(block, list):
        raise InputError(path, "factorized token lists are not supported (one index array expected)")
    if not isinstance(block, dict) or not {"data", "dtype", "shape"} <= set(block):
        raise InputError(path, "the 'wetok' field must hold 'data', 'dtype' and 'shape'")
    dtype = _JSON_DTYPES.get(block["dtype"])
    if dtype is None:
        raise InputError(path, f"unsupported index dtype {block['dtype']!r}")
    shape = block["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                              for s in shape):
        raise InputError(path, f"'shape' must be a list of positive integers, got {shape!r}")
    try:
        raw = base64.b64decode(block["data"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InputError(path, "token data is not valid base64") from None
    count = math.prod(shape)
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != count * itemsize:
        raise InputError(path, f"token data holds {len(raw)} bytes, shape {shape} of {block['dtype']} needs "
                               f"{count * itemsize} (truncated?)")
    flat = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    height, width = _json_int(path, obj, "height", 0), _json_int(path, obj, "width", 0)
    original = (_json_int(path, obj, "original_height", height), _json_int(path, obj, "original_width", width))
    meta = obj.get(JSON_META_KEY)
    common = dict(config=obj.get("config"), ckpt=obj.get("ckpt"), requested_size=obj.get("image_size") or 0)
    if meta is None:  # written by the fork: geometry comes from the decoding model
        if config is None:
            raise InputError(path, "token JSON without wetok_meta (the fork's) needs a model to be read")
        g, f, bits = config.groups, config.downsample_factor, config.bits_per_group
        if height and width:
            b, h, w = count // max(1, (height // f) * (width // f) * g), height // f, width // f
        else:  # the oldest fork files record no size: accept square maps only
            side = math.isqrt(count // g)
            b, h, w = 1, side, side
            height, width = h * f, w * f
        if flat.size and int(flat.max()) >= 2**bits:
            raise ModelMismatchError(f"{path}: index {int(flat.max())} does not fit the model's {bits} bits per group")
        if b * h * w * g != count or height % f or width % f:
            raise ModelMismatchError(
                f"{path}: {count} indices do not fit a {height}x{width} image with this model "
                f"(f={f}, {g} groups)"
            )
        tf = TokenFile(indices=torch.from_numpy(flat).reshape(b, h, w, g), bits_per_group=bits,
                       image_size=(height, width), original_size=original if all(original) else (height, width),
                       **common)
    else:
        if not isinstance(meta, dict):
            raise InputError(path, f"'{JSON_META_KEY}' must be an object")
        if meta.get("format_version") != VERSION:
            raise InputError(path, f"unsupported token JSON version {meta.get('format_version')!r} "
                                   f"(this wetok reads version {VERSION})")
        b, h, w, g, bits = (_json_int(path, meta, k) for k in
                            ("batch", "latent_height", "latent_width", "groups", "bits_per_group"))
        padding = meta.get("padding")
        if not (isinstance(padding, list) and len(padding) == 4 and all(isinstance(p, int) and p >= 0
                                                                        for p in padding)):
            raise InputError(path, f"'padding' must be four non-negative integers, got {padding!r}")
        if b * h * w * g != count:
            raise InputError(path, f"corrupt token JSON: {count} indices, but batch {b} x {h}x{w} x {g} groups")
        if not 1 <= bits <= 62:
            raise InputError(path, f"corrupt token JSON: bits_per_group {bits} out of range")
        model_id = meta.get("model_id")
        if not isinstance(model_id, str):
            raise InputError(path, "token JSON lacks the model identity")
        extra = {k: v for k, v in meta.items() if k not in {
            "format_version", "model_id", "model", "batch", "latent_height", "latent_width", "groups",
            "bits_per_group", "padding"}}
        tf = TokenFile(indices=torch.from_numpy(flat).reshape(b, h, w, g), bits_per_group=bits,
                       image_size=(height, width), original_size=original, padding=tuple(padding),
                       model_id=model_id, model=meta.get("model"), extra=extra, **common)
    _check_geometry(path, tf)
    return tf


def _check_geometry(path: Path, tf: TokenFile) -> None:
    """Field consistency that a tampered or corrupt file breaks."""
    h, w = tf.grid_size
    height, width = tf.image_size
    if height == 0 or width == 0 or height % h or width % w or height // h != width // w:
        raise InputError(path, f"corrupt token file: a {h}x{w} token map cannot give a {height}x{width} image")
    f = height // h
    if f & (f - 1):
        raise InputError(path, f"corrupt token file: downsampling factor {f} is not a power of two")
    left, right, top, bottom = tf.padding
    if max(left + right, top + bottom) >= f:
        raise InputError(path, f"corrupt token file: padding {tf.padding} is not less than f={f}")
    if min(tf.original_size) == 0:
        raise InputError(path, "corrupt token file: original size is zero")
    if int(tf.indices.max()) >= 2**tf.bits_per_group or int(tf.indices.min()) < 0:
        raise InputError(path, f"corrupt token file: an index is outside [0, 2^{tf.bits_per_group})")
