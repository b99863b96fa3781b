"""What the CPU offers: its model, the bfloat16 / AMX features, one line for benchmark output, a key for caches.

Linux reports the model and feature flags in /proc/cpuinfo; elsewhere the model falls back to
:func:`platform.processor` and the features to torch's own CPU probes (``torch.cpu._is_*_supported``, private but
present since torch 2.3; absent ones read as False).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

__all__ = ["cpu_description", "cpu_flags", "cpu_key", "cpu_model", "has_amx", "has_avx512_bf16"]


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux or when unreadable)."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    """The CPU feature flags as Linux names them (e.g. ``avx512_bf16``, ``amx_bf16``); empty when unknown."""
    return set(_cpuinfo().get("flags", "").split())


def _torch_probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def has_amx() -> bool:
    """Whether the CPU has AMX tiles with bfloat16 (Intel Xeon 4th generation and later)."""
    flags = cpu_flags()
    return "amx_bf16" in flags if flags else _torch_probe("_is_amx_tile_supported")


def has_avx512_bf16() -> bool:
    """Whether the CPU has the AVX512-BF16 instructions (bfloat16 dot products in vector registers)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags if flags else _torch_probe("_is_avx512_bf16_supported")


def cpu_model() -> str:
    """The model name, with the family / model numbers where Linux gives them (VMs often shorten the name)."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def cpu_description() -> str:
    """One line naming the CPU and what matters for speed here, printed first by every benchmark."""
    yes = {True: "yes", False: "no"}
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs; AMX-BF16: {yes[has_amx()]}, "
            f"AVX512-BF16: {yes[has_avx512_bf16()]}; torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


def cpu_key() -> str:
    """A short hash of the CPU model and feature flags: what per-machine caches are keyed by."""
    text = "\n".join([cpu_model(), platform.machine(), " ".join(sorted(cpu_flags()))])
    return hashlib.sha256(text.encode()).hexdigest()[:12]
