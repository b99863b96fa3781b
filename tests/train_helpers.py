"""Shared by the training tests: a tiny recipe, a folder of small synthetic photos, running `wetok train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_RECIPE = """\
model:
  preset: null
  overrides: {channels: 8, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 8, groups: 2, bits_per_group: 4,
              norm_groups: 4}
loss: {perceptual_net: alex, perceptual_pretrained: false}
discriminator: {ndf: 8, n_layers: 2, norm: sync_batch}
data: {image_size: 32, batch_size: 4, micro_batch_size: 4, num_workers: 0, val_batch_size: 4}
trainer: {max_steps: 3, log_every: 1, val_every: 0, image_every: 0, checkpoint_every: 3, progress_bar: false}
"""


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` small piecewise-smooth RGB PNGs of varying sizes (>= 40 px), so 32-px random crops differ."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 64, 2))
        base = np.kron(rng.random((4, 4, 3)), np.ones((16, 16, 1)))[:h, :w]
        img = (base * 255 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def write_recipe(path: Path, text: str = TINY_RECIPE) -> Path:
    path.write_text(text)
    return path


def run_cli(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, torchrun: int = 0,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``wetok`` in a subprocess with one intra-op thread (deterministic, kind to a shared machine)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    if torchrun:
        # --standalone: torchrun's own store on a port it holds (no probe-then-release port race between tests)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "wetok.cli.main", *args]
    else:
        cmd = [sys.executable, "-m", "wetok.cli.main", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the floating-point tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(
        (a[k].double() - b[k].double()).abs().max().item() for k in a if torch.is_tensor(a[k]) and a[k].is_floating_point()
    )


# ------------------------------------------------------------------------------------------- generator training
TINY_AR_RECIPE = """\
task: generator
model:
  preset: ar-tiny
  overrides: {dim: 32, n_head: 2, spatial_layers: 1, intra_layers: 1}
optim: {lr: 3.0e-3, betas: [0.9, 0.95], weight_decay: 0.05, grad_clip: 1.0}
data: {batch_size: 4, micro_batch_size: 4, num_workers: 0, val_batch_size: 4}
samples: {per_class: 2, cfg_scale: 1.5}
trainer: {max_steps: 3, log_every: 1, val_every: 0, image_every: 0, checkpoint_every: 3, progress_bar: false}
"""


def make_token_shards(folder: Path, n: int, *, grid: tuple[int, int] = (2, 3), groups: int = 2, bits: int = 3,
                      classes: int = 3, shards: int = 2, seed: int = 0, tokenizer_id: str = "t" * 16,
                      tokenizer_name: str = "test", run: str | None = None) -> Path:
    """A token data set as `wetok tokenize` writes it: ``n`` samples over ``shards`` shards, class c's token maps
    mostly equal to c (mod 2^bits) with some random sub-tokens, so that there is something to learn."""
    from wetok.token_shards import ShardIndex, index_dtype, shard_name, write_index, write_shard

    rng = np.random.default_rng(seed)
    index = ShardIndex(
        run=run or f"run{seed:013d}", tokenizer={"id": tokenizer_id, "name": tokenizer_name}, groups=groups,
        bits_per_group=bits, grid=grid, image_size=(grid[0] * 8, grid[1] * 8),
        class_names=[f"class{c}" for c in range(classes)], views=["center"], preprocessing={}, source="test",
        num_images=n,
    )
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for number in range(shards):
        count = int(bounds[number + 1] - bounds[number])
        labels = rng.integers(0, classes, count)
        indices = np.broadcast_to(labels[:, None, None, None], (count, *grid, groups)).copy()
        noise = rng.random(indices.shape) < 0.3
        indices[noise] = rng.integers(0, 1 << bits, int(noise.sum()))
        write_shard(folder / shard_name(number), indices=(indices % (1 << bits)).astype(index_dtype(bits)),
                    labels=labels, images=np.arange(count) + bounds[number], views=np.zeros(count, np.uint8),
                    metadata={"format": "wetok-token-shards", "run": index.run, "shard": str(number)})
        index.shards.append({"file": shard_name(number), "count": count})
    write_index(folder, index)
    return folder


def assert_identical(a, b, where="") -> None:
    """Bit-for-bit equality of nested checkpoint contents (tensors with their dtypes, dicts, lists, values)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
