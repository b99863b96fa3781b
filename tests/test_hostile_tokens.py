"""Hostile token files (issue 14, items 1-5): each is built here, a few kilobytes to a few megabytes, and must be
refused by ``Tokens.load``, ``wetok decode`` and ``wetok inspect`` with one line naming the file, exit 2, nothing
written, and bounded memory; a large batch is decoded a slice at a time, giving the images of a whole-batch
decode.

The decode cases share one batch run (decode reports every bad input, one line each, and goes on), so the file
costs three interpreter starts plus two small runs.
"""

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

from hostile import DEFAULT_PEAK_MIB, assert_refused, run_wetok
from wetok import InputError, ModelMismatchError, get_config
from wetok.autoencoder import draw_noise
from wetok.cli.decode import decode_file
from wetok.cli.models import load_model
from wetok.pipeline import decode, prepare_image
from wetok.tiling import NoiseStream
from wetok.token_format import open_tokens, resized_size
from wetok.tokens import _HEADER, DEFAULT_MAX_PIXELS, MAGIC, Tokens, save_tokens

TINY = get_config("tiny-f8")  # f = 8, 4 groups of 4 bits
TINY_ARGS = ("--model", "tiny-f8", "--random-init", "-q")
PEAK_MIB = DEFAULT_PEAK_MIB  # 1500 MiB; decode of a good file with this model peaks at ~450-550 MiB


def wtok(*, h: int, w: int, bits: int = 4, groups: int = 4, batch: int = 1, f: int = 8,
         original: tuple[int, int] | None = None, padding: tuple[int, int, int, int] = (0, 0, 0, 0)) -> bytes:
    """A well-formed .wtok (right length, right checksum) with zero indices and any header: what a hostile user
    can write with the documented layout."""
    ident, name = TINY.identity().encode(), b"tiny-f8"
    h0, w0 = original or (h * f - padding[2] - padding[3], w * f - padding[0] - padding[1])
    body = (_HEADER.pack(MAGIC, 1, bits, groups, batch, h, w, h * f, w * f, h0, w0, *padding, len(ident))
            + ident + bytes([len(name)]) + name + bytes(math.ceil(batch * h * w * groups * bits / 8)))
    return body + struct.pack("<I", zlib.crc32(body))


def good_tokens(batch: int = 1, h: int = 4, w: int = 4, seed: int = 0, **kw) -> Tokens:
    gen = torch.Generator().manual_seed(seed)
    kw = {"model_id": TINY.identity(), "model": "tiny-f8", **kw}
    return Tokens(indices=torch.randint(0, 16, (batch, h, w, 4), generator=gen), image_size=(h * 8, w * 8),
                  bits_per_group=4, **kw)


def token_json(tmp: Path, **changes) -> dict:
    """A good token JSON's dict (batch 2 of 4x4), with top-level or ``wetok``/``wetok_meta`` fields replaced."""
    obj = json.loads(save_tokens(tmp / "base.json", good_tokens(batch=2)).read_text())
    for key, value in changes.items():
        where, _, field = key.rpartition("__")
        (obj[where] if where else obj)[field] = value
    return obj


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def hostile_files(root: Path) -> dict[str, str]:
    """Write every hostile token file under ``root``: name -> a text its refusal must contain."""
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[bytes | str, str]] = {
        # 1. memory amplification: 2 x 4096^2 one-bit groups (4 MB) are 268 M indices; a 1200^2 map of the
        # model's own geometry decodes to 9600^2 pixels
        "amp-bits.wtok": (wtok(h=4096, w=4096, bits=1, groups=2), "groups"),
        "amp-grid.wtok": (wtok(h=1200, w=1200), "megapixels"),
        # 2. tampered original size: consistent with a resize but huge, or no resize at all
        "orig-huge.wtok": (wtok(h=4, w=4, original=(60000, 60000)), "megapixels"),
        "orig-skew.wtok": (wtok(h=4, w=4, original=(20000, 100)), "original size"),
        # 5. JSON parser gaps and wrong types
        "dtype-list.json": (json.dumps(token_json(root, wetok__dtype=["uint8"])), "dtype"),
        "digits.json": (json.dumps(token_json(root)).replace('"height": 32', '"height": ' + "9" * 5000), "digits"),
        "deep.json": (json.dumps(token_json(root)).replace('"config": null', f'"config": {nested(200000)}'),
                      "nested"),
        "shape-text.json": (json.dumps(token_json(root, wetok__shape="128")), "shape"),
        "data-number.json": (json.dumps(token_json(root, wetok__data=12)), "base64"),
        "size-list.json": (json.dumps(token_json(root, image_size=[1, 2])), "image_size"),
        "config-object.json": (json.dumps(token_json(root, config={"a": 1})), "config"),
        "padding-bool.json": (json.dumps(token_json(root, wetok_meta__padding=[True, 0, 0, 0])), "padding"),
        "version-bool.json": (json.dumps(token_json(root, wetok_meta__format_version=True)), "version"),
        "model-id-number.json": (json.dumps(token_json(root, wetok_meta__model_id=7)), "model_id"),
        "meta-list.json": (json.dumps(token_json(root, wetok_meta=[1])), "wetok_meta"),
    }
    # 2. (JSON) a 100000^2 original recorded as the resize of a 32x32 image to short side 32
    obj = token_json(root, original_height=100000, original_width=100000, image_size=32)
    cases["orig-json.json"] = (json.dumps(obj), "megapixels")
    # 3. a batch of 65535 2x2 maps (1.4 MB) whose last image holds an index outside the model's 4 bits: refused
    # before any image is written
    obj = json.loads(save_tokens(root / "base.json", good_tokens(batch=65535, h=2, w=2)).read_text())
    raw = bytearray(base64.b64decode(obj["wetok"]["data"]))
    raw[-1] = 16
    obj["wetok"]["data"] = base64.b64encode(bytes(raw)).decode()
    cases["bad-last.json"] = (json.dumps(obj), "outside")
    (root / "base.json").unlink()
    for name, (data, _) in cases.items():
        path = root / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return {name: text for name, (_, text) in cases.items()}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, hostile_files(root / "in")


def test_library_refuses_every_hostile_file(hostile):
    root, cases = hostile
    for name, text in cases.items():
        path = root / "in" / name
        with pytest.raises((InputError, ModelMismatchError)) as info:
            Tokens.load(path, TINY)
        assert str(path) in str(info.value) and text in str(info.value), (name, str(info.value))
        if name != "amp-bits.wtok":
            assert isinstance(info.value, InputError), (name, info.value)
    # without a model the amplifying file is still refused, on its size, before its indices are expanded
    with pytest.raises(InputError, match="32768x32768 .1073.7 megapixels"):
        Tokens.load(root / "in" / "amp-bits.wtok")
    # the limit is a parameter: a 60000^2 original passes when it is lifted
    assert Tokens.load(root / "in" / "orig-huge.wtok", TINY, max_pixels=None).original_size == (60000, 60000)


def test_decode_reports_each_hostile_file_writes_nothing_of_them_and_streams_a_large_batch(hostile):
    """All hostile files and one good batch of 300 images of 64 x 64 in one run: one line per bad file, nothing of
    them written, every image of the good batch written (decoded a slice at a time, as decoding them in-process
    gives them), memory bounded."""
    root, cases = hostile
    many = good_tokens(batch=300, h=8, w=8, seed=3)
    save_tokens(root / "in" / "many.wtok", many)
    out = root / "decoded"
    result = run_wetok("decode", *sorted((root / "in").iterdir()), "-o", out, *TINY_ARGS[:-1])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.lines
    assert lines[-1] == f"wetok decode: {len(cases)} of {len(cases) + 1} inputs failed", lines
    assert len(lines) == len(cases) + 1, lines
    for name, text in cases.items():
        [line] = [line for line in lines if f"/{name}:" in line]
        assert line.startswith("wetok decode: error: ") and text in line, (name, line)
    # nothing of the bad files (the 65535-image bad-last.json included), no temporaries
    assert sorted(p.name for p in out.rglob("*")) == sorted(f"many_{i}.png" for i in range(300))
    assert result.peak_mib < PEAK_MIB, result.peak_mib
    from PIL import Image

    expected = decode(load_model("tiny-f8", random_init=True), Tokens(many.indices[[0, 299]], many.image_size,
                                                                      bits_per_group=4))
    for i, image in zip([0, 299], expected, strict=True):  # the command runs the fast path: < 1e-4 apart
        got = np.asarray(Image.open(out / f"many_{i}.png")).astype(int)
        assert np.abs(got - np.asarray(image).astype(int)).max() <= 1


def test_decode_max_pixels_option(tmp_path):
    small = save_tokens(tmp_path / "small.wtok", good_tokens(original_size=(64, 64), requested_size=32))
    refused = run_wetok("decode", small, "-o", tmp_path / "out.png", "--max-pixels", "4000", *TINY_ARGS)
    line = assert_refused(refused, contains=(str(small), "64x64", "4000", "--max-pixels"),
                          output=tmp_path / "out.png", peak_mib=PEAK_MIB)
    assert "0 = no limit" in line


def test_inspect_refuses_unbounded_drawings(hostile, tmp_path):
    root, _ = hostile
    groups = tmp_path / "groups.wtok"
    groups.write_bytes(wtok(h=1, w=1, bits=1, groups=65535))  # 8 KB: 65535 panels of 256 x 256 pixels
    for path, text in [(groups, "drawing"), (root / "in" / "amp-bits.wtok", "drawing")]:
        out = tmp_path / "map.png"
        result = run_wetok("inspect", path, "-o", out, *TINY_ARGS)
        assert_refused(result, contains=(str(path), text), output=out, peak_mib=PEAK_MIB)


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


@pytest.mark.parametrize("generative", [False, True])
def test_decode_file_in_slices_equals_decoding_the_whole_batch(tmp_path, generative):
    """decode_file (what ``wetok decode`` runs) against pipeline.decode of the whole batch. Slices of another batch
    size round differently in the convolutions (~1e-6), so images agree to one grey level; a slice of the whole
    batch agrees exactly. The generative decoder gets noise-channel weights, so that wrong noise would show."""
    model = load_model("tiny-f8", random_init=True)
    if generative:
        model = model.to_generative()
        with torch.no_grad():
            weight = model.decoder.conv_in.weight
            weight[:, TINY.z_channels :] = torch.randn_like(weight[:, TINY.z_channels :]) * 0.5
    tokens = good_tokens(batch=5, h=3, w=5, seed=1, padding=(1, 2, 0, 3), model_id=model.model_id)
    path = save_tokens(tmp_path / "t.wtok", tokens)
    whole = decode(model, tokens, seed=7)
    for chunk_pixels in (1, 2 * 24 * 40, 10**9):  # one image per slice, two, all
        sliced = list(decode_file(model, open_tokens(path, model), seed=7, chunk_pixels=chunk_pixels))
        assert len(sliced) == 5
        assert max(_max_diff(a, b) for a, b in zip(sliced, whole, strict=True)) <= (0 if chunk_pixels > 5 * 24 * 40
                                                                                    else 1)
    if generative:  # the noise matters: another seed gives other images
        assert max(_max_diff(a, b) for a, b in zip(decode(model, tokens, seed=8), whole, strict=True)) > 8


@pytest.mark.parametrize("shape,take", [((5, 3, 3, 3), 2), ((7, 32, 2, 2), 3), ((1, 1, 1, 3), 1), ((3, 1, 1, 5), 1),
                                        ((9, 2, 3, 1), 4), ((2, 3, 5, 7), 1)])
def test_noise_stream_equals_one_draw(shape, take):
    full = draw_noise(shape, torch.Generator().manual_seed(3))
    stream = NoiseStream(shape, torch.Generator().manual_seed(3))
    parts = [stream.take(min(take, shape[0] - i)) for i in range(0, shape[0], take)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError):
        stream.take(1)


@pytest.mark.parametrize("original", [(37, 29), (29, 37), (480, 640), (300, 3), (3, 300), (64, 64), (17, 999)])
@pytest.mark.parametrize("size", [1, 16, 33, 100])
def test_original_sizes_of_a_size_resize_are_accepted(tmp_path, original, size):
    """What ``encode --size`` records loads (prepare_image, i.e. Pillow, computes the resized size here)."""
    from PIL import Image

    prepared = prepare_image(Image.new("RGB", original[::-1]), 8, size)
    resized = prepared.pixels.shape[-2] - sum(prepared.padding[2:]), prepared.pixels.shape[-1] - sum(prepared.padding[:2])
    assert resized == resized_size(original, size)
    h, w = prepared.pixels.shape[-2] // 8, prepared.pixels.shape[-1] // 8
    tokens = Tokens(indices=torch.zeros(1, h, w, 4, dtype=torch.int64), image_size=(h * 8, w * 8), bits_per_group=4,
                    model_id=TINY.identity(), original_size=original, padding=prepared.padding, requested_size=size)
    for suffix in (".wtok", ".json"):
        assert Tokens.load(save_tokens(tmp_path / f"t{suffix}", tokens), TINY).original_size == original


def test_default_limit_is_pillows():
    from PIL import Image

    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


def test_names_read_from_a_token_file_are_escaped_in_messages(tmp_path):
    forged = good_tokens(model="x\nwetok decode: all good\x1b[0m", model_id="0123456789abcdef")
    path = save_tokens(tmp_path / "t.wtok", forged)
    with pytest.raises(ModelMismatchError) as info:
        Tokens.load(path, TINY)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value) and "\\x1b" in str(info.value)
