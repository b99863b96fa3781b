"""Reading token files safely (the formats are described in :mod:`wetok.tokens`).

A token file is untrusted input: everything it says is checked before anything it implies is allocated.
:func:`open_tokens` reads the header (and, for JSON, parses the document with :func:`wetok._json.parse_json`,
checking every field's type), then checks, in this order and without expanding the payload:

1. the structure: sizes non-zero, bits per group in 1..62, payload length equal to what the header implies,
   checksum (``.wtok``), index range (JSON; a ``.wtok`` index cannot exceed its bits);
2. the geometry: the token map times a power-of-two f gives the recorded model input size, padding below f, and
   the original size is the recorded size, or what ``encode --size`` resizing it would give (files of the public
   fork, which resize differently, are not held to that);
3. the decoding model, when given (:func:`wetok.tokens.check_model`: identity, groups, bits, f);
4. the output size: the model input size and the original size, each at most ``max_pixels`` per image
   (default :data:`DEFAULT_MAX_PIXELS`, Pillow's decompression-bomb limit; None or 0 = no limit).

The indices are then expanded on demand, a slice of the batch at a time (:meth:`TokenFile.tokens`), so a file
of many images costs the memory of a few (a .wtok index of d' bits becomes 8 bytes).
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._files import read_limited
from ._json import parse_json
from .errors import InputError, ModelMismatchError
from .tokens import (
    _CRC,
    _HEADER,
    DEFAULT_MAX_PIXELS,
    IDENTITY_SEPARATOR,
    JSON_META_KEY,
    MAGIC,
    VERSION,
    Tokens,
    _config_of,
    check_model,
    unpack_indices,
)

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_TOKEN_FILE_BYTES", "TokenFile", "open_tokens"]

#: Largest token file read (bytes): it is read whole; 1 GiB holds ~100 million 8-bit indices.
MAX_TOKEN_FILE_BYTES = 1 << 30

_JSON_DTYPES = {"uint8": "<u1", "uint16": "<u2", "int16": "<i2", "int32": "<i4", "uint32": "<u4", "int64": "<i8"}
_META_FIELDS = {"format_version", "model_id", "weights_id", "model", "batch", "latent_height", "latent_width",
                "groups", "bits_per_group", "padding"}


@dataclass
class TokenFile:
    """A validated token file whose indices are expanded on demand.

    ``header``: every field of the file as a :class:`Tokens` whose ``indices`` are an empty (0, h, w, g) tensor;
    ``batch``: the number of images. :meth:`tokens` expands a slice of the batch, :meth:`load` all of it.
    """

    path: Path
    header: Tokens
    batch: int
    _read: Callable[[int, int], np.ndarray]  # (first, stop) image -> their flat int64 indices

    @property
    def positions(self) -> int:
        """Indices per image: h * w * g."""
        return math.prod(self.header.indices.shape[1:])

    def tokens(self, start: int = 0, stop: int | None = None) -> Tokens:
        """Images ``start`` to ``stop`` (exclusive; default: the end) of the batch."""
        stop = self.batch if stop is None else min(stop, self.batch)
        if not 0 <= start <= stop:
            raise ValueError(f"bad slice [{start}, {stop}) of a batch of {self.batch}")
        _, h, w, g = self.header.indices.shape
        flat = self._read(start, stop)
        return replace(self.header, indices=torch.from_numpy(flat).reshape(stop - start, h, w, g))

    def chunks(self, images: int) -> Iterator[Tokens]:
        """The batch, ``images`` images at a time."""
        for start in range(0, self.batch, max(1, images)):
            yield self.tokens(start, start + max(1, images))

    def load(self) -> Tokens:
        return self.tokens()


def open_tokens(path: str | Path, model: Any = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> TokenFile:
    """Read and validate a ``.json`` or ``.wtok`` token file without expanding its indices (see the module
    docstring for what is checked). ``model``: the decoding :class:`wetok.WeTok` or its config (needed for the
    fork's JSON); a mismatch raises :class:`ModelMismatchError`, every other defect :class:`InputError`."""
    config = _config_of(model)
    path = Path(path)
    data = read_limited(path, MAX_TOKEN_FILE_BYTES, "token file")  # no pipes or devices: they never end
    if not data:
        raise InputError(path, "empty file (0 bytes)")
    if data[:4] == MAGIC:
        tf = _open_wtok(path, data)
    elif data.lstrip()[:1] == b"{":
        tf = _open_json(path, data, config)
    elif MAGIC.startswith(data[:4]):
        raise InputError(path, "truncated .wtok file (shorter than its header)")
    else:
        raise InputError(path, "not a token file (neither .wtok magic nor JSON)")
    if model is not None:
        check_model(path, tf.header, model)
    check_size(path, tf.header, max_pixels)
    return tf


def check_size(path: str | Path, tf: Tokens, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """:class:`InputError` if an image of ``tf`` decodes (model input size or original size) to more than
    ``max_pixels`` pixels (None or 0: no limit)."""
    if not max_pixels:
        return
    for what, (height, width) in (("an image of", tf.original_size), ("a model input of", tf.image_size)):
        if height * width > max_pixels:
            raise InputError(path, f"decodes to {what} {height}x{width} ({height * width / 1e6:.1f} megapixels), "
                                   f"over the limit of {max_pixels} pixels (--max-pixels; 0 = no limit)")


def _header(indices_shape: tuple[int, int, int], **fields: Any) -> Tokens:
    return Tokens(indices=torch.empty((0, *indices_shape), dtype=torch.int64), **fields)


# ------------------------------------------------------------------------------------------------------- .wtok
def _open_wtok(path: Path, data: bytes) -> TokenFile:
    if len(data) < _HEADER.size:
        raise InputError(path, f"truncated .wtok file ({len(data)} bytes, shorter than its header)")
    (_, version, bits, g, b, h, w, height, width, h0, w0, pl, pr, pt, pb, n_id) = _HEADER.unpack_from(data)
    if version != VERSION:
        raise InputError(path, f"unsupported .wtok version {version} (this wetok reads version {VERSION})")
    if not 1 <= bits <= 62 or min(g, b, h, w) == 0:
        raise InputError(path, "corrupt .wtok header (zero sizes or bits per group out of range)")
    n_name = data[_HEADER.size + n_id] if len(data) > _HEADER.size + n_id else 0
    start = _HEADER.size + n_id + 1 + n_name  # of the payload
    payload_bytes = math.ceil(b * h * w * g * bits / 8)
    expected = start + payload_bytes + _CRC.size
    crc_ok = len(data) >= _HEADER.size + _CRC.size and (
        _CRC.unpack_from(data, len(data) - _CRC.size)[0] == zlib.crc32(memoryview(data)[: -_CRC.size])
    )
    if len(data) < expected and not crc_ok:
        raise InputError(path, f"truncated .wtok file ({len(data)} bytes, header says {expected})")
    if not crc_ok:
        raise InputError(path, "corrupt or tampered .wtok file (checksum mismatch)")
    if len(data) != expected:
        raise InputError(path, f"corrupt .wtok header ({len(data)} bytes, header says {expected})")
    try:
        identity = data[_HEADER.size : _HEADER.size + n_id].decode("ascii")
        model = data[_HEADER.size + n_id + 1 : start].decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "corrupt .wtok header (model identity or name is not text)") from None
    model_id, _, weights_id = identity.partition(IDENTITY_SEPARATOR)
    header = _header((h, w, g), bits_per_group=bits, image_size=(height, width), original_size=(h0, w0),
                     padding=(pl, pr, pt, pb), model_id=model_id, weights_id=weights_id or None, model=model or None)
    _check_geometry(path, header, fork=False)
    payload = memoryview(data)[start : start + payload_bytes]
    per_image = h * w * g

    def read(first: int, stop: int) -> np.ndarray:
        return unpack_indices(payload, (stop - first) * per_image, bits, offset_bits=first * per_image * bits)

    return TokenFile(path, header, b, read)


# ------------------------------------------------------------------------------------------------------- JSON
def _int_field(path: Path, obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise InputError(path, f"token JSON lacks the field {key!r}")
    if type(value) is not int or value < 0:
        raise InputError(path, f"token JSON field {key!r} must be a non-negative integer, got {_short(value)}")
    return value


def _text_field(path: Path, obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise InputError(path, f"token JSON field {key!r} must be a string or null, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    """A JSON value for a message: its repr, cut to 40 characters (long lists and objects: their length)."""
    if isinstance(value, list | dict) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _open_json(path: Path, data: bytes, config: Any) -> TokenFile:
    obj = parse_json(path, data, "token JSON")
    del data
    if not isinstance(obj, dict) or "wetok" not in obj:
        raise InputError(path, "not a token JSON (no 'wetok' field)")
    block = obj["wetok"]
    if isinstance(block, list):
        raise InputError(path, "factorized token lists are not supported (one index array expected)")
    if not isinstance(block, dict) or not {"data", "dtype", "shape"} <= set(block):
        raise InputError(path, "the 'wetok' field must hold 'data', 'dtype' and 'shape'")
    dtype = _JSON_DTYPES.get(block["dtype"]) if isinstance(block["dtype"], str) else None
    if dtype is None:
        raise InputError(path, f"unsupported index dtype {_short(block['dtype'])}")
    shape = block["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or not all(type(s) is int and s > 0 for s in shape):
        raise InputError(path, f"'shape' must be a list of 1 to 8 positive integers, got {_short(shape)}")
    if not isinstance(block["data"], str):
        raise InputError(path, "token data is not valid base64 (not a string)")
    count = math.prod(shape)
    itemsize = np.dtype(dtype).itemsize
    text = block["data"]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(path, "token data is not valid base64") from None
    if len(raw) != count * itemsize:
        raise InputError(path, f"token data holds {len(raw)} bytes, shape {_short(shape)} of {block['dtype']} "
                               f"needs {count * itemsize} (truncated?)")
    del text, block
    values = np.frombuffer(raw, dtype=dtype)  # a view: converted to int64 a slice at a time
    height, width = _int_field(path, obj, "height", 0), _int_field(path, obj, "width", 0)
    original = (_int_field(path, obj, "original_height", height), _int_field(path, obj, "original_width", width))
    requested = 0 if obj.get("image_size") is None else _int_field(path, obj, "image_size")
    common = dict(config=_text_field(path, obj, "config"), ckpt=_text_field(path, obj, "ckpt"),
                  requested_size=requested)
    meta = obj.get(JSON_META_KEY)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
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
        if high >= 2**bits:
            raise ModelMismatchError(f"{path}: index {high} does not fit the model's {bits} bits per group")
        if b * h * w * g != count or height % f or width % f:
            raise ModelMismatchError(
                f"{path}: {count} indices do not fit a {height}x{width} image with this model "
                f"(f={f}, {g} groups)"
            )
        header = _header((h, w, g), bits_per_group=bits, image_size=(height, width),
                         original_size=original if all(original) else (height, width), **common)
    else:
        if not isinstance(meta, dict):
            raise InputError(path, f"'{JSON_META_KEY}' must be an object")
        version = meta.get("format_version")
        if type(version) is not int or version != VERSION:
            raise InputError(path, f"unsupported token JSON version {_short(version)} "
                                   f"(this wetok reads version {VERSION})")
        b, h, w, g, bits = (_int_field(path, meta, k) for k in
                            ("batch", "latent_height", "latent_width", "groups", "bits_per_group"))
        padding = meta.get("padding")
        if not (isinstance(padding, list) and len(padding) == 4 and all(type(p) is int and p >= 0
                                                                        for p in padding)):
            raise InputError(path, f"'padding' must be four non-negative integers, got {_short(padding)}")
        if not 1 <= bits <= 62:
            raise InputError(path, f"corrupt token JSON: bits_per_group {bits} out of range")
        if min(b, h, w, g) == 0 or b * h * w * g != count:
            raise InputError(path, f"corrupt token JSON: {count} indices, but batch {b} x {h}x{w} x {g} groups")
        model_id = _text_field(path, meta, "model_id")
        if model_id is None:
            raise InputError(path, "token JSON lacks the model identity")
        extra = {k: v for k, v in meta.items() if k not in _META_FIELDS}
        header = _header((h, w, g), bits_per_group=bits, image_size=(height, width), original_size=original,
                         padding=tuple(padding), model_id=model_id, weights_id=_text_field(path, meta, "weights_id"),
                         model=_text_field(path, meta, "model"), extra=extra, **common)
    if low < 0 or high >= 2**header.bits_per_group:
        raise InputError(path, f"corrupt token file: an index is outside [0, 2^{header.bits_per_group})")
    _check_geometry(path, header, fork=meta is None)
    per_image = h * w * g

    def read(first: int, stop: int) -> np.ndarray:
        return values[first * per_image : stop * per_image].astype(np.int64)

    return TokenFile(path, header, b, read)


# ------------------------------------------------------------------------------------------------------- geometry
def _check_geometry(path: Path, tf: Tokens, *, fork: bool) -> None:
    """Field consistency that a tampered or corrupt file breaks (before any index is expanded)."""
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
    if not fork:
        _check_original_size(path, tf)


def resized_size(original: tuple[int, int], short: int) -> tuple[int, int]:
    """(H, W) of an ``original`` (H0, W0) image whose short side ``encode --size short`` resized to ``short``
    (:func:`wetok.pipeline.prepare_image`)."""
    scale = short / min(original)
    return max(1, round(original[0] * scale)), max(1, round(original[1] * scale))


def _check_original_size(path: Path, tf: Tokens) -> None:
    """The original size must be the encoded (unpadded) size, or the size that resizing it with ``--size S``
    gives, S the encoded short side (and the recorded ``--size`` of a JSON file, where there is one)."""
    resized = tf.resized_size
    original = tf.original_size
    if original == resized:
        return
    short = resized[0] if original[0] <= original[1] else resized[1]
    expected = resized_size(original, short)
    ok = abs(expected[0] - resized[0]) <= 1 and abs(expected[1] - resized[1]) <= 1
    if not ok or tf.requested_size not in (0, short):
        raise InputError(path, f"corrupt token file: original size {original[0]}x{original[1]} is not the encoded "
                               f"{resized[0]}x{resized[1]} image before a resize"
                               + (f" to short side {tf.requested_size}" if tf.requested_size else ""))
