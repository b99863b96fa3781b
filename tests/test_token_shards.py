"""Token shards (wetok.token_shards): dtype choice, write / read round trip, view selection, hostile files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from wetok.errors import InputError, ModelMismatchError
from wetok.token_shards import (
    INDEX_NAME,
    ShardIndex,
    TokenDataset,
    index_dtype,
    read_index,
    shard_name,
    write_index,
    write_shard,
)

GRID, GROUPS = (3, 2), 4


@pytest.mark.parametrize(
    ("bits", "dtype"),
    [(1, "uint8"), (4, "uint8"), (8, "uint8"), (9, "uint16"), (16, "uint16"), (17, "uint32"), (32, "uint32"),
     (33, "int64"), (62, "int64")],
)
def test_index_dtype_is_smallest_holding_all_indices(bits: int, dtype: str) -> None:
    assert index_dtype(bits) == np.dtype(dtype)
    # the largest index fits, and no smaller unsigned type would hold it
    top = (1 << bits) - 1
    assert np.array(top, dtype=np.uint64).astype(index_dtype(bits)) == top
    smaller = [t for t in (np.uint8, np.uint16, np.uint32) if np.dtype(t).itemsize < index_dtype(bits).itemsize]
    assert all(np.iinfo(t).max < top for t in smaller)


def make_dataset(folder: Path, bits: int = 4, counts: tuple[int, ...] = (5, 0, 3), seed: int = 0,
                 views: tuple[str, ...] = ("center", "center-flip")) -> dict[str, np.ndarray]:
    """A hand-made data set: random indices < 2^bits, labels, views; returns the concatenated arrays."""
    rng = np.random.default_rng(seed)
    index = ShardIndex(
        run="r" * 16, tokenizer={"id": "abcd" * 4, "weights_id": "1234" * 4, "name": "test"}, groups=GROUPS, bits_per_group=bits,
        grid=GRID, image_size=(24, 16), class_names=["cat", "dog", "emu"], views=list(views),
        preprocessing={"size": 24}, source="nowhere", num_images=sum(counts),
    )
    parts: dict[str, list[np.ndarray]] = {"indices": [], "labels": [], "views": [], "images": []}
    for number, n in enumerate(counts):
        arrays = {
            "indices": rng.integers(0, 1 << bits, (n, *GRID, GROUPS)).astype(index_dtype(bits)),
            "labels": rng.integers(0, 3, n),
            "views": rng.integers(0, len(views), n).astype(np.uint8),
            "images": np.arange(n) + 100 * number,
        }
        write_shard(folder / shard_name(number), **arrays,
                    metadata={"format": "wetok-token-shards", "run": index.run, "shard": str(number)})
        index.shards.append({"file": shard_name(number), "count": n})
        for k, v in arrays.items():
            parts[k].append(v)
    write_index(folder, index)
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.mark.parametrize("bits", [4, 8, 10])
def test_round_trip(tmp_path: Path, bits: int) -> None:
    want = make_dataset(tmp_path, bits=bits)
    ds = TokenDataset(tmp_path)
    assert len(ds) == 8 and (ds.groups, ds.bits_per_group, ds.grid) == (GROUPS, bits, GRID)
    assert (ds.num_classes, ds.class_names, ds.tokenizer_id) == (3, ["cat", "dog", "emu"], "abcd" * 4)
    assert ds.image_size == (24, 16) and ds.view_names == ["center", "center-flip"]
    from safetensors.numpy import load_file

    assert load_file(str(tmp_path / shard_name(0)))["indices"].dtype == index_dtype(bits)
    for i in range(len(ds)):
        tokens, label = ds[i]
        assert tokens.dtype == torch.int64 and label.dtype == torch.int64 and label.dim() == 0
        assert np.array_equal(tokens.numpy(), want["indices"][i].astype(np.int64))
        assert int(label) == want["labels"][i]
    assert np.array_equal(ds.labels, want["labels"]) and np.array_equal(ds.views, want["views"])
    assert np.array_equal(ds.image_ids, want["images"])
    assert np.array_equal(ds[-1][0].numpy(), want["indices"][-1])
    with pytest.raises(IndexError):
        ds[8]
    # a DataLoader with default collation gives (B, h, w, g) and (B,)
    tokens, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert tokens.shape == (8, *GRID, GROUPS) and np.array_equal(labels.numpy(), want["labels"])
    # pickling (spawned DataLoader workers) carries no mapped data and reopens the maps
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 20_000 and np.array_equal(clone[5][0].numpy(), want["indices"][5])


def test_view_selection(tmp_path: Path) -> None:
    want = make_dataset(tmp_path)
    ds = TokenDataset(tmp_path, views=["center-flip"])
    rows = np.flatnonzero(want["views"] == 1)
    assert len(ds) == len(rows) > 0 and np.array_equal(ds.labels, want["labels"][rows])
    for j, i in enumerate(rows):
        assert np.array_equal(ds[j][0].numpy(), want["indices"][i])
    with pytest.raises(InputError, match="no view 'ten'"):
        TokenDataset(tmp_path, views=["ten"])


def test_check_tokenizer(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    ds = TokenDataset(tmp_path)

    class Model:
        model_id = "abcd" * 4
        weights_id = "1234" * 4

    assert ds.tokenizer_weights_id == "1234" * 4
    ds.check_tokenizer(Model())
    Model.weights_id = "9999" * 4
    with pytest.raises(ModelMismatchError, match="weights 12341234"):
        ds.check_tokenizer(Model())
    Model.model_id = "ffff" * 4
    with pytest.raises(ModelMismatchError, match="tokenizer abcdabcd"):
        ds.check_tokenizer(Model())


# ------------------------------------------------------------------------------------------------- hostile files
def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n, header = _header(path)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-7])


def _wrong_dtype(p: Path) -> None:
    # a well-formed safetensors file whose indices are int32
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(p))
    tensors["indices"] = tensors["indices"].astype(np.int32)
    save_file(tensors, str(p), metadata=_header(p)[1]["__metadata__"])


def _lying_shape(p: Path) -> None:
    _rewrite_header(p, lambda h: h["indices"].__setitem__("shape", [10**12, 3, 2, 4]))


def _huge_header_length(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**62) + raw[8:])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(100))


def _foreign_run(p: Path) -> None:
    _rewrite_header(p, lambda h: h["__metadata__"].__setitem__("run", "other"))


def _wrong_shard_number(p: Path) -> None:
    _rewrite_header(p, lambda h: h["__metadata__"].__setitem__("shard", "2"))


def _label_out_of_range(p: Path) -> None:
    n, header = _header(p)
    raw = bytearray(p.read_bytes())
    start = 8 + n + header["labels"]["data_offsets"][0]
    raw[start : start + 8] = struct.pack("<q", 3)
    p.write_bytes(bytes(raw))


def _appended(p: Path) -> None:
    p.write_bytes(p.read_bytes() + b"\0" * 8)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "truncated"),
        (_wrong_dtype, "tensor 'indices' is int32"),
        (_lying_shape, "claims bytes"),
        (_huge_header_length, "header length"),
        (_garbage, "not JSON"),
        (_foreign_run, "another tokenize run"),
        (_wrong_shard_number, "expected 0"),
        (_label_out_of_range, "labels outside"),
        (_appended, "beyond the tensors"),
        (lambda p: p.unlink(), "missing"),
        (lambda p: p.write_bytes(b"abc"), "truncated"),
    ],
)
def test_hostile_shard_gives_one_clear_error(tmp_path: Path, damage, message: str) -> None:
    make_dataset(tmp_path)
    shard = tmp_path / shard_name(0)
    damage(shard)
    with pytest.raises(InputError, match=message) as err:
        TokenDataset(tmp_path)
    assert err.value.path == str(shard)


def test_index_out_of_range_is_caught_when_read(tmp_path: Path) -> None:
    make_dataset(tmp_path, bits=4, counts=(2,))
    shard = tmp_path / shard_name(0)
    n, header = _header(shard)
    raw = bytearray(shard.read_bytes())
    raw[8 + n + header["indices"]["data_offsets"][0] + 1 * 24 + 5] = 16  # sample 1, an index of 16 >= 2^4
    shard.write_bytes(bytes(raw))
    ds = TokenDataset(tmp_path)
    ds[0]
    with pytest.raises(InputError, match="sample 1 has an index >= 2\\^4"):
        ds[1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "not a wetok token-shard index"),
        (lambda d: d.update(version=9), "version 9"),
        (lambda d: d.update(dtype="uint16"), "does not match bits_per_group"),
        (lambda d: d.update(grid=[3]), "two positive integers"),
        (lambda d: d.update(groups="4"), "'groups'"),
        (lambda d: d["shards"].append({"file": "../x.safetensors", "count": 1}), "bad shard entry"),
        (lambda d: d["shards"][0].update(count=6), "index says 6"),
    ],
)
def test_bad_index(tmp_path: Path, edit, message: str) -> None:
    make_dataset(tmp_path)
    path = tmp_path / INDEX_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        TokenDataset(tmp_path)


def test_missing_or_corrupt_index(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no token-shard index"):
        read_index(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        read_index(tmp_path)
