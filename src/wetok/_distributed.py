"""Whether this process is one of several under ``torch.distributed``: one answer for metrics, losses and the quantizer."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available, initialised and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
