"""Token files: exact round trips, the .wtok size formula and bit layout, the fork's JSON schema, validation."""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from wetok import InputError, ModelMismatchError, get_config
from wetok.quantizer import indices_to_codes
from wetok.tokens import Tokens, load_tokens, pack_indices, save_tokens, unpack_indices, wtok_size

TINY = get_config("tiny-f8")  # f = 8, 4 groups of 4 bits


def _random_record(b=1, h=3, w=5, g=4, bits=4, seed=0, model_id=None, **kw) -> Tokens:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 2**bits, (b, h, w, g), generator=gen)
    f = TINY.downsample_factor
    return Tokens(indices=indices, bits_per_group=bits, image_size=(h * f, w * f),
                  original_size=kw.pop("original_size", (h * f - 3, w * f - 5)),
                  padding=kw.pop("padding", (2, 3, 1, 2)), model_id=model_id or TINY.identity(),
                  model="tiny-f8", **kw)


def _bitstream_reference(values: list[int], bits: int) -> bytes:
    """Pure-Python packing: each value LSB first, bytes filled from their least significant bit."""
    stream = "".join(format(v, f"0{bits}b")[::-1] for v in values)
    stream += "0" * (-len(stream) % 8)
    return bytes(sum(int(stream[i + k]) << k for k in range(8)) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 11, 17, 40])
def test_pack_matches_pure_python_and_round_trips(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=37, dtype=np.int64)
    packed = pack_indices(values, bits)
    assert len(packed) == math.ceil(37 * bits / 8)
    assert packed == _bitstream_reference(values.tolist(), bits)
    np.testing.assert_array_equal(unpack_indices(packed, 37, bits), values)


def test_payload_is_the_sign_bits_of_the_codes():
    tf = _random_record(b=2, h=2, w=3)
    codes = indices_to_codes(tf.indices, 4)  # (B, g*d', h, w) of +-1 from the quantizer's own definition
    signs = (codes.permute(0, 2, 3, 1) > 0).numpy().astype(np.uint8).reshape(-1)
    assert pack_indices(tf.indices, 4) == np.packbits(signs, bitorder="little").tobytes()


@pytest.mark.parametrize("fmt", ["json", "wtok"])
def test_tokens_save_and_load_round_trip(tmp_path, fmt):
    """Tokens.save / Tokens.load in both formats, the format given explicitly (the name has no suffix)."""
    tokens = _random_record(b=2, h=4, w=7, weights_id="00112233aabbccdd")
    path = tokens.save(tmp_path / "t", fmt)
    data = path.read_bytes()
    assert data[:4] == b"WTOK" if fmt == "wtok" else json.loads(data)["wetok_meta"]["weights_id"] == tokens.weights_id
    back = Tokens.load(path, TINY)
    assert torch.equal(back.indices, tokens.indices) and back.indices.dtype == torch.int64
    for name in ("bits_per_group", "groups", "image_size", "original_size", "padding", "model_id", "weights_id",
                 "model"):
        assert getattr(back, name) == getattr(tokens, name), name


@pytest.mark.parametrize("suffix", [".json", ".wtok"])
def test_round_trip_is_exact(tmp_path, suffix):
    tf = _random_record(b=2, h=4, w=7)
    path = save_tokens(tmp_path / f"t{suffix}", tf)
    back = load_tokens(path, TINY)
    assert torch.equal(back.indices, tf.indices) and back.indices.dtype == torch.int64
    for name in ("bits_per_group", "image_size", "original_size", "padding", "model_id", "model"):
        assert getattr(back, name) == getattr(tf, name), name
    assert [p.name for p in tmp_path.iterdir()] == [f"t{suffix}"]  # no temporary file left behind


@pytest.mark.parametrize("shape,bits", [((1, 3, 5, 4), 4), ((2, 7, 9, 3), 5), ((1, 1, 1, 1), 1), ((1, 16, 16, 4), 8)])
def test_wtok_size_formula(tmp_path, shape, bits):
    b, h, w, g = shape
    tf = Tokens(indices=torch.randint(0, 2**bits, shape), bits_per_group=bits, image_size=(h * 8, w * 8),
                   original_size=(h * 8, w * 8), model_id="0123456789abcdef", model="small-f8")
    path = save_tokens(tmp_path / "t.wtok", tf)
    header = 43 + len("0123456789abcdef") + 1 + len("small-f8")  # fixed fields, identity, name (docstring)
    assert path.stat().st_size == header + math.ceil(b * h * w * g * bits / 8) + 4
    assert path.stat().st_size == wtok_size(b, h, w, g, bits, "0123456789abcdef", "small-f8")


def test_wtok_header_fields_at_documented_offsets(tmp_path):
    tf = _random_record(h=3, w=5)
    data = save_tokens(tmp_path / "t.wtok", tf).read_bytes()
    assert data[:4] == b"WTOK" and data[4] == 1 and data[5] == 4
    assert struct.unpack_from("<HHIIIIII4HB", data, 6) == (4, 1, 3, 5, 24, 40, 21, 35, 2, 3, 1, 2, 16)
    assert data[43:59] == TINY.identity().encode()
    assert data[59] == len("tiny-f8") and data[60:67] == b"tiny-f8"
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])


@pytest.mark.parametrize("top,dtype", [(200, "uint8"), (300, "uint16"), (70000, "int64")])
def test_json_dtype_follows_the_fork(tmp_path, top, dtype):
    bits = max(1, top.bit_length())
    indices = torch.tensor([[[[0], [top]]]])
    tf = Tokens(indices=indices, bits_per_group=bits, image_size=(8, 16), original_size=(8, 16),
                   model_id="x")
    obj = json.loads(save_tokens(tmp_path / "t.json", tf).read_text())
    assert obj["wetok"]["dtype"] == dtype and obj["wetok"]["shape"] == [2]
    raw = base64.b64decode(obj["wetok"]["data"])
    assert np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).tolist() == [0, top]
    for key in ("config", "ckpt", "image_size", "height", "width", "original_height", "original_width"):
        assert key in obj


def test_hand_written_fork_json_decodes(tmp_path):
    # spec section 8: f8, 4 groups, a 112x392 input gives 14x49x4 uint8 indices in (b, h, w, g) order
    rng = np.random.default_rng(1)
    flat = rng.integers(0, 16, size=14 * 49 * 4).astype(np.uint8)
    obj = {"wetok": {"data": base64.b64encode(flat.tobytes()).decode(), "dtype": "uint8", "shape": [2744]},
           "config": "configs/WeToK/Inference/GeneralDomain_compratio48.yaml", "ckpt": "WeTok.ckpt",
           "image_size": 112, "height": 112, "width": 392, "original_height": 120, "original_width": 400}
    path = tmp_path / "q.json"
    path.write_text(json.dumps(obj))
    tf = load_tokens(path, TINY)
    assert tf.indices.shape == (1, 14, 49, 4) and tf.model_id is None
    for r, c, g in [(0, 0, 0), (0, 0, 3), (0, 1, 0), (1, 0, 2), (13, 48, 3), (7, 20, 1)]:
        assert tf.indices[0, r, c, g] == flat[(r * 49 + c) * 4 + g]
    assert tf.image_size == (112, 392) and tf.original_size == (120, 400) and tf.padding == (0, 0, 0, 0)
    with pytest.raises(InputError, match="needs a model"):
        load_tokens(path)
    with pytest.raises(ModelMismatchError, match=str(path)):  # f16 model: 112/16 is not whole
        load_tokens(path, get_config("tiny-f16"))
    flat[5] = 200  # an 8-bit index (the official models) read with 4 bits per group
    obj["wetok"]["data"] = base64.b64encode(flat.tobytes()).decode()
    path.write_text(json.dumps(obj))
    with pytest.raises(ModelMismatchError, match="index 200 does not fit the model's 4 bits"):
        load_tokens(path, TINY)


def _expect_input_error(path: Path, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        load_tokens(path, TINY)
    assert str(path) in str(info.value)


def test_wtok_validation(tmp_path):
    good = save_tokens(tmp_path / "good.wtok", _random_record()).read_bytes()

    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    def with_crc(body: bytes) -> bytes:
        return body + struct.pack("<I", zlib.crc32(body))

    _expect_input_error(write("cut.wtok", good[:-3]), "truncated")
    _expect_input_error(write("head.wtok", good[:20]), "truncated")
    _expect_input_error(write("magic.wtok", b"XTOK" + good[4:]), "not a token file")
    _expect_input_error(write("ver.wtok", with_crc(good[:4] + b"\x07" + good[5:-4])), "version 7")
    tampered = bytearray(good)
    tampered[14] ^= 1  # w: 5 -> 4
    _expect_input_error(write("tamper.wtok", bytes(tampered)), "checksum")
    tampered_payload = bytearray(good)
    tampered_payload[-6] ^= 0x10
    _expect_input_error(write("payload.wtok", bytes(tampered_payload)), "checksum")
    tampered[18] ^= 8  # H 24 -> 16 with a fresh CRC: the geometry no longer fits
    _expect_input_error(write("resealed.wtok", with_crc(bytes(tampered[:-4]))), "corrupt|truncated")
    _expect_input_error(write("empty.wtok", b""), "empty")
    _expect_input_error(tmp_path / "missing.wtok", "no such file")


def test_json_validation(tmp_path):
    good = json.loads(save_tokens(tmp_path / "good.json", _random_record()).read_text())

    def write(name: str, obj) -> Path:
        (tmp_path / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return tmp_path / name

    _expect_input_error(write("cut.json", json.dumps(good)[:-40]), "valid token JSON")
    short = json.loads(json.dumps(good))
    short["wetok"]["data"] = base64.b64encode(base64.b64decode(good["wetok"]["data"])[:-2]).decode()
    _expect_input_error(write("short.json", short), "truncated")
    meta = json.loads(json.dumps(good))
    meta["wetok_meta"]["latent_width"] = 6
    _expect_input_error(write("meta.json", meta), "corrupt")
    version = json.loads(json.dumps(good))
    version["wetok_meta"]["format_version"] = 9
    _expect_input_error(write("ver.json", version), "version 9")
    _expect_input_error(write("other.json", {"hello": 1}), "no 'wetok' field")
    bad64 = json.loads(json.dumps(good))
    bad64["wetok"]["data"] = "@@@@"
    _expect_input_error(write("b64.json", bad64), "base64")


@pytest.mark.parametrize("suffix", [".json", ".wtok"])
def test_another_model_is_refused(tmp_path, suffix):
    path = save_tokens(tmp_path / f"t{suffix}", _random_record())
    with pytest.raises(ModelMismatchError) as info:
        load_tokens(path, get_config("small-f8"))
    assert str(path) in str(info.value) and TINY.identity() in str(info.value)
