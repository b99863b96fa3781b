"""Fast inference: one call prepares a model, one context runs it.

    from wetok import WeTok
    from wetok.fast import inference, optimize

    model = optimize(WeTok.from_pretrained(path), device="cpu", dtype="auto", compile=False)
    with inference():
        tokens = model.encode(images)           # images: float32 (B, 3, H, W) in [-1, 1]
        images = model.decode(tokens)            # float32, whatever the compute dtype

What is always on, because outputs stay bit-identical: without autograd the blocks reuse their own buffers
(in-place SiLU, residual add and modulation, see :func:`wetok.blocks.no_autograd`), which removes about half of
the activation-sized allocations. What :func:`optimize` adds, each measured in ``benchmarks/bench_inference.py``:

* ``channels_last`` weights, so every convolution and GroupNorm runs NHWC (the layout oneDNN and cuDNN prefer)
  without reorders; float32 outputs differ from NCHW by summation order only (~1e-6).
* ``dtype``: bfloat16 (or float16 on GPUs) weights and activations. The quantizer always sees a float32 latent
  and decoders return float32 images. ``"auto"`` picks bfloat16 where the hardware has native bf16 arithmetic
  (CUDA with bf16 support; x86 CPUs with AVX512-BF16 or AMX) and float32 elsewhere. bfloat16 moves values near
  zero across the sign threshold, so about 1% of token bits differ from a float32 encode of random-weight
  models; decoding the same tokens agrees to ~48 dB PSNR.
* ``compile``: ``torch.compile`` of the encoder and decoder (Inductor; on the CPU with weight freezing, which
  fuses GroupNorm + SiLU and pre-packs the convolution weights). The first call per input shape compiles
  (minutes for the official models on a small CPU).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .model import WeTok

__all__ = ["DTYPES", "has_native_bf16", "inference", "optimize", "resolve_dtype"]

#: Names accepted for ``dtype`` (``"auto"`` is resolved by :func:`resolve_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` does bfloat16 arithmetic in hardware (rather than emulating it in float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def _cpu_flags() -> set[str]:
    if not sys.platform.startswith("linux"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """A ``dtype`` argument -> a torch dtype; ``None`` stays ``None`` (keep the model's), ``"auto"`` -> bfloat16
    where :func:`has_native_bf16`, else float32."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join([*DTYPES, 'auto'])}, got {dtype!r}")
    return DTYPES[dtype]


def optimize(
    model: WeTok,
    *,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype | None = None,
    channels_last: bool = True,
    compile: bool = False,
) -> WeTok:
    """Prepare ``model`` for fast inference, in place, and return it.

    Puts it in eval mode without gradients, moves it to ``device`` (default: where it is), casts it to ``dtype``
    (``None`` keeps its dtype; ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype),
    stores convolution weights ``channels_last`` and, with ``compile=True``, wraps the encoder and decoder in
    ``torch.compile``. Parameter names, shapes and values are unchanged (except for the dtype cast), so the model
    still saves and loads as before. Run it under :func:`inference`.
    """
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device=torch.device(device))
    param = next(model.parameters())
    target = resolve_dtype(dtype, param.device)
    if target is not None and target != param.dtype:
        if not target.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {target}")
        model.to(dtype=target)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        _compile(model.encoder, param.device)
        _compile(model.decoder, param.device)
    return model


def _compile(module: nn.Module, device: torch.device) -> None:
    # Freezing turns the (frozen, inference-only) weights into constants, so Inductor can pre-pack them for oneDNN
    # and fold the GroupNorm affine; it applies under inference_mode / no_grad only.
    options = {"freezing": True} if device.type == "cpu" else None
    module.compile(dynamic=False, options=options)


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """The context fast inference runs in: ``torch.inference_mode`` (no autograd bookkeeping, in-place blocks)."""
    with torch.inference_mode():
        yield
