"""Reading speed of token shards (wetok.token_shards.TokenDataset) against an in-memory TensorDataset.

Writes a synthetic data set (``--samples`` samples of 16 x 16 x 4 uint8 sub-tokens in ``--shards`` shards), then
reads it in shuffled batches through a DataLoader (main process) with TokenDataset (memory-mapped, per-sample
checks) and with a TensorDataset over the same tokens already in memory as int64: the ratio is what the shard
reader costs over holding everything in RAM.

    python benchmarks/bench_token_dataset.py --samples 100000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine
from torch.utils.data import DataLoader, TensorDataset

from wetok.token_shards import ShardIndex, TokenDataset, shard_name, write_index, write_shard


def build(folder: Path, samples: int, shards: int) -> None:
    rng = np.random.default_rng(0)
    index = ShardIndex(run="bench", tokenizer={"id": "0" * 16, "name": "bench"}, groups=4, bits_per_group=8,
                       grid=(16, 16), image_size=(256, 256), class_names=[str(i) for i in range(1000)],
                       views=["center"], preprocessing={}, source="synthetic", num_images=samples)
    for k, part in enumerate(np.array_split(np.arange(samples), shards)):
        write_shard(folder / shard_name(k), indices=rng.integers(0, 256, (len(part), 16, 16, 4), dtype=np.uint8),
                    labels=rng.integers(0, 1000, len(part)), images=part, views=np.zeros(len(part), np.uint8),
                    metadata={"format": "wetok-token-shards", "run": "bench", "shard": str(k)})
        index.shards.append({"file": shard_name(k), "count": len(part)})
    write_index(folder, index)


def read_all(dataset, batch_size: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    n = 0
    for tokens, _ in loader:
        n += len(tokens)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.samples, args.shards)
        shards = TokenDataset(tmp)
        memory = TensorDataset(torch.stack([shards[i][0] for i in range(len(shards))]),
                               torch.from_numpy(shards.labels.copy()))
        read_all(shards, args.batch_size)  # warm the page cache
        rate_shards, rate_memory = read_all(shards, args.batch_size), read_all(memory, args.batch_size)
    print(f"| reader | samples/s (batch {args.batch_size}, shuffled, {args.samples} samples) | vs in-memory |")
    print("|---|---|---|")
    print(f"| TokenDataset (memory-mapped shards) | {rate_shards:,.0f} | {rate_shards / rate_memory:.2f}x |")
    print(f"| TensorDataset (int64 in RAM) | {rate_memory:,.0f} | 1.00x |")


if __name__ == "__main__":
    main()
