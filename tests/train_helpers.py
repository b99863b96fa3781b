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
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               f"--master_port={port}", "-m", "wetok.cli.main", *args]
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
