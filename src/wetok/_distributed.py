"""Whether this process is one of several under ``torch.distributed``: one answer for metrics, losses and the quantizer."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available, initialised and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_initialized() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists (of any size)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when ``torch.distributed`` is not initialised."""
    if group_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def close_group(*, wait: bool) -> None:
    """Destroy the default process group before the interpreter exits. Lightning registers this only for NCCL; a
    gloo group left to interpreter teardown can abort a process ("terminate called without an active exception",
    SIGABRT) after its work has finished. ``wait``: barrier first, so no process leaves while another still
    communicates (skip it after a failure, when the others may be gone)."""
    if wait:
        dist.barrier()
    dist.destroy_process_group()
