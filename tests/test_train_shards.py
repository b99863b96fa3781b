"""WebDataset-style tar shards: expansion, coverage, skipping bad members, exact resumption, a training run."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from train_helpers import write_recipe
from wetok.errors import InputError
from wetok.train import load_config, train
from wetok.train.data import CropSpec
from wetok.train.shards import build_shard_loader, expand_shards, is_shard_source, read_shard_index


def _png(value: int, size=(40, 48)) -> bytes:
    """A flat image whose red channel encodes ``value`` (so a crop identifies its sample)."""
    arr = np.zeros((size[0], size[1], 3), np.uint8)
    arr[..., 0] = value
    arr[..., 1] = np.arange(size[1], dtype=np.uint8)[None, :] * 3
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    value = 0
    for s in range(4):
        with tarfile.open(folder / f"part-{s:03d}.tar", "w") as tar:
            for k in range(5):
                value += 1
                _add(tar, f"sample{s}_{k}.jpg" if k == 0 else f"sub/sample{s}_{k}.png", _png(value * 10))
                _add(tar, f"sub/sample{s}_{k}.txt", b"a caption")  # ignored: not an image
            _add(tar, "broken.png", b"not a png")  # counted as skipped
    return folder


def _values(batch) -> list[int]:
    return [round((float(v) + 1) * 127.5) for v in batch["image"][:, 0, 0, 0]]


def test_expand_and_index(shards):
    assert is_shard_source(str(shards)) and is_shard_source(str(shards / "part-000.tar"))
    listed = expand_shards(str(shards / "part-{000..003}.tar"))
    assert listed == expand_shards(str(shards)) == expand_shards(str(shards / "part-*.tar"))
    assert len(listed) == 4
    with pytest.raises(InputError, match="part-004.tar: no such tar shard"):
        expand_shards(str(shards / "part-{000..004}.tar"))
    keys = [k for k, _ in read_shard_index(listed[0])]
    assert keys == ["sample0_0", "sub/sample0_1", "sub/sample0_2", "sub/sample0_3", "sub/sample0_4", "broken"]


def test_epoch_covers_every_sample_and_counts_bad_members(shards):
    loader = build_shard_loader(expand_shards(str(shards)), CropSpec(32), micro_batch=3, seed=0, rank=0,
                                world=1, num_workers=2)
    first_epoch, skipped, streams = [], 0, set()
    it = iter(loader)
    for _ in range(8):  # 2 streams x 4 batches x 3 samples: each stream's 10 epoch-0 samples and 2 more
        batch = next(it)
        assert len(set(batch["stream"].tolist())) == 1  # a batch comes from one worker's stream
        streams |= set(batch["stream"].tolist())
        first_epoch += [v for v, e in zip(_values(batch), batch["epoch"].tolist(), strict=True) if e == 0]
        skipped += batch["skipped"]
    assert streams == {0, 1}
    assert sorted(first_epoch) == [10 * v for v in range(1, 21)]  # every sample once
    assert skipped >= 4  # one broken member per shard (epoch 1 may add more)


def test_resume_from_cursors_continues_exactly(shards):
    files = expand_shards(str(shards))
    kw = dict(micro_batch=3, seed=1, rank=0, world=1, num_workers=2)
    it = iter(build_shard_loader(files, CropSpec(32), **kw))
    consumed, cursors = 5, {}
    for _ in range(consumed):  # what the training loop records per consumed batch
        b = next(it)
        cursors[int(b["stream"][-1])] = (int(b["epoch"][-1]), int(b["slot"][-1]), int(b["sample"][-1]))
    expected = [next(it) for _ in range(6)]  # runs into the next epoch
    resumed = iter(build_shard_loader(files, CropSpec(32), cursors=cursors, rotation=consumed % 2, **kw))
    for e in expected:
        r = next(resumed)
        assert torch.equal(r["image"], e["image"]) and torch.equal(r["stream"], e["stream"])


def test_training_on_shards_saves_the_stream_state(shards, tmp_path):
    write_recipe(tmp_path / "tiny.yaml")
    cfg = load_config(tmp_path / "tiny.yaml", [f"data.train={shards}", "trainer.max_steps=2",
                                               "trainer.checkpoint_every=2", "data.num_workers=2",
                                               "data.micro_batch_size=2"])
    ckpt = torch.load(train(cfg, tmp_path / "run"), weights_only=True)
    cursors = ckpt["shard_state"]["cursors"]
    assert cursors.shape == (1, 2, 4) and cursors[0, :, 0].tolist() == [1, 1]  # both worker streams consumed
    assert (tmp_path / "run" / "train_shards.txt").read_text().count(".tar") == 4


def test_members_over_the_size_limit_are_skipped_unread(tmp_path, monkeypatch):
    import wetok.train.shards as shards_module

    small = [_png(10 * v) for v in range(1, 5)]
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # noise: a PNG far larger
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert len(buf.getvalue()) > 2 * max(map(len, small))
    with tarfile.open(tmp_path / "part.tar", "w") as tar:
        _add(tar, "big.png", buf.getvalue())
        for k, data in enumerate(small):
            _add(tar, f"s{k}.png", data)
    monkeypatch.setattr(shards_module, "MAX_MEMBER_BYTES", max(map(len, small)))  # as a sparse 1 TB member would be
    loader = build_shard_loader([str(tmp_path / "part.tar")], CropSpec(32), micro_batch=4, seed=0, rank=0,
                                world=1, num_workers=0)
    batch = next(iter(loader))
    assert sorted(_values(batch)) == [10, 20, 30, 40] and int(torch.as_tensor(batch["skipped"]).sum()) == 1
